#!/usr/bin/env python
"""Benchmark one SFT step: tsarank's row-gathered loss vs the released code's full-logits formulation.

Setting (docs/design.md section 2): the default model (SmolLM2-135M, fp32 on CPU / bf16 on CUDA), one query
with G = 16 documents (B = 1, 16 sequences), document budget 128 and query budget 32 tokens,
``lambda_gen = lambda_dp = 1``, gradient checkpointing ON, a separate frozen reference model.

Variants (each in a fresh subprocess so memory peaks do not mix):

- ``baseline``: the released code's way -- full ``[B*G, L, V]`` logits of policy and reference, log-softmax,
  scores from the gathered query tokens, L_gen over the positive's full logits, full-vocabulary KL at every
  position (padding masked so the numbers are comparable);
- ``all``: :class:`tsarank.training.sft_trainer.RankingTrainer` with ``dp_span = all`` (the same objective; loss must equal
  the baseline within 1e-4);
- ``default``: tsarank defaults (``dp_span = query``, ``gen_span = all``).

The policy is the default model with a small deterministic perturbation (a policy some way into training), so
``L_dp`` is not trivially 0. A step is forward + backward; gradients are zeroed in place, not freed.

Memory: each variant in a fresh subprocess, one warm-up step (so parameter gradients exist), then the measured
step. Transient memory = the peak above the level before the measured step: on Linux ``VmHWM`` after resetting
it through ``/proc/self/clear_refs``, with ``MALLOC_MMAP_THRESHOLD_=65536`` so that RSS follows live tensors;
on CUDA ``torch.cuda.max_memory_allocated`` minus the allocated memory before the step.
Time: all variants in one process, interleaved, best of ``--repeats`` steps after a warm-up each; wall-clock
(the ``time_ratio_*`` figures) and process CPU time (``cpu_time_ratio_*``, less sensitive to other load on a
shared machine). The same
process also times the reference forward with a shared frozen prefix (``train_top_layers = --top-layers``)
against a separate reference.

Run: ``python scripts/bench_sft_step.py [--repeats 2] [--top-layers 8] [--device cpu|cuda]``. The last line is
``RESULT {json}`` with ``mem_ratio_all``, ``mem_ratio_default``, ``time_ratio_all``, ``time_ratio_default``
(tsarank / baseline) and ``loss_abs_diff_all``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "msmarco-train-sample" / "rankinggpt_msmarco.json"
VARIANTS = ("baseline", "all", "default")
G, DOC_TOKENS, QUERY_TOKENS = 16, 128, 32


# ------------------------------------------------------------------------------------------ memory probes
def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class MemoryProbe:
    """Peak memory of a region above the level at its start (bytes)."""

    def __init__(self, device: str) -> None:
        import torch

        self.torch = torch
        self.cuda = device.startswith("cuda")
        if not self.cuda and not Path("/proc/self/clear_refs").exists():
            raise RuntimeError("CPU memory measurement needs Linux /proc/self/clear_refs")

    def start(self) -> None:
        import gc

        gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            self.base = self.torch.cuda.memory_allocated()
        else:
            _malloc_trim()
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.base = _status_kb("VmRSS") * 1024

    def peak(self) -> int:
        if self.cuda:
            self.torch.cuda.synchronize()
            return self.torch.cuda.max_memory_allocated() - self.base
        return _status_kb("VmHWM") * 1024 - self.base


# ------------------------------------------------------------------------------------------------ inputs
def build_batch(tokenizer, seed: int = 0):
    """One group of G (query, doc) sequences from the MS MARCO sample (synthetic text if it is absent)."""
    from tsarank.data.groups import GroupCollator, GroupDataset
    from tsarank.prompts import PromptTemplate

    template = PromptTemplate(max_doc_tokens=DOC_TOKENS, max_query_tokens=QUERY_TOKENS)
    if DATA.is_file():
        from tsarank.data.formats import read_groups

        records = [r for r in read_groups(DATA) if len(r["negative_passages"]) >= G - 1]
    else:
        words = "the of ranking passage model query document retrieval neural language large".split()
        text = " ".join(words[i % len(words)] for i in range(400))
        records = [{"query": "what is passage re-ranking with large language models", "teacher_scores": None,
                    "positive_passages": [{"title": "", "text": text}],
                    "negative_passages": [{"title": "", "text": text[i:]} for i in range(G)]}]
    dataset = GroupDataset(records, G, seed=seed)
    return GroupCollator(tokenizer, template, G)([dataset[0]])


def load_models(device: str):
    import torch

    from tsarank.default_model import default_model_path
    from tsarank.modeling import load_causal_lm

    path = str(default_model_path())
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    policy = load_causal_lm(path, dtype=dtype, attn_implementation="sdpa", device=device)
    policy.train()
    policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.config.use_cache = False
    # A policy a little way into training: without this the policy equals the reference, L_dp is 0 whatever the
    # span and the loss comparison would not exercise the KL. Deterministic, so every process gets the same one.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in policy.named_parameters():
            p.add_(0.02 * p.float().std() * torch.randn(p.shape, generator=gen).to(p.device, p.dtype))
    ref = load_causal_lm(path, dtype=dtype, attn_implementation="sdpa", device=device).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return path, policy, ref


# ------------------------------------------------------------------------------------------------- steps
def baseline_loss(policy, ref, batch, tau: float, transform: str):
    """The released code's formulation: full logits everywhere, padding masked."""
    import torch

    ids, am, qm = batch["input_ids"], batch["attention_mask"], batch["query_mask"]
    logits = policy(input_ids=ids, attention_mask=am).logits  # [B*G, L, V]
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    tok_lp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    real = am[:, 1:].bool()
    q = qm[:, 1:].bool() & real
    scores = ((tok_lp * q).sum(1) / q.sum(1)).view(-1, G)
    z = (scores.exp() if transform == "prob" else scores) / tau
    rank = -torch.log_softmax(z, dim=-1)[:, 0].mean()
    pos = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    pos[::G] = True
    gm = real & pos[:, None]
    gen = -(tok_lp * gm).sum() / gm.sum()
    with torch.no_grad():
        ref_logp = torch.log_softmax(ref(input_ids=ids, attention_mask=am).logits[:, :-1].float(), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    dp = (kl * real).sum() / real.sum()
    return rank + gen + dp


def setup(device: str):
    """Models, tokenizer, batch and one step function per variant (they share the policy and the reference)."""
    import torch
    from transformers import AutoTokenizer, TrainingArguments

    from tsarank.reference import SeparateReference
    from tsarank.training.sft_loss import RankingLossConfig
    from tsarank.training.sft_trainer import RankingTrainer

    torch.manual_seed(0)
    path, policy, ref = load_models(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = {k: v.to(device) for k, v in build_batch(tokenizer).items()}
    reference = SeparateReference(ref)
    args = TrainingArguments(output_dir="/tmp/tsarank_bench_sft", report_to=[], use_cpu=device == "cpu")
    trainers = {}
    for variant in ("all", "default"):
        cfg = RankingLossConfig(group_size=G, lambda_gen=1.0, lambda_dp=1.0, gen_span="all",
                                dp_span="all" if variant == "all" else "query")
        trainers[variant] = RankingTrainer(model=policy, args=args, loss_config=cfg, reference=reference,
                                           processing_class=tokenizer)
    tau, transform = trainers["all"].loss_config.temperature, trainers["all"].loss_config.score_transform

    def make_step(variant):
        def step():
            for p in policy.parameters():  # gradients stay allocated (zeroed in place), as in training
                if p.grad is not None:
                    p.grad.zero_()
            if variant == "baseline":
                loss = baseline_loss(policy, ref, batch, tau, transform)
            else:
                loss = trainers[variant].compute_loss(policy, batch)
            loss.backward()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            return loss.item()
        return step

    return {"policy": policy, "ref": ref, "batch": batch, "tokenizer": tokenizer,
            "steps": {v: make_step(v) for v in VARIANTS}}


def batch_info(batch) -> dict:
    import torch

    return {"threads": torch.get_num_threads(), "seqs": int(batch["input_ids"].shape[0]),
            "seq_len": int(batch["input_ids"].shape[1]), "real_tokens": int(batch["attention_mask"].sum()),
            "query_tokens": int(batch["query_mask"].sum())}


def run_memory(variant: str, device: str) -> dict:
    """Transient memory of one step of ``variant`` (fresh process): one warm-up step, then the measured one."""
    env = setup(device)
    step = env["steps"][variant]
    probe = MemoryProbe(device)
    step()  # warm-up: gradients exist afterwards
    probe.start()
    loss = step()
    return {"variant": variant, "peak_bytes": probe.peak(), "loss": loss, **batch_info(env["batch"])}


def run_timing(device: str, repeats: int, top_layers: int) -> dict:
    """Step times of all variants in one process, interleaved (robust to load drift), best of ``repeats``;
    then the reference forward with a shared frozen prefix vs a separate reference."""
    import torch

    from tsarank.layers import find_decoder_layers, freeze_all_but_top
    from tsarank.modeling import body_and_head
    from tsarank.packing import padded_inputs
    from tsarank.reference import SeparateReference, SharedPrefixReference
    from tsarank.row_head import target_rows

    env = setup(device)
    times = {v: [] for v in VARIANTS}
    cpu_times = {v: [] for v in VARIANTS}
    losses = {}
    for v in VARIANTS:
        losses[v] = env["steps"][v]()  # warm-up
    for _ in range(repeats):
        for v in VARIANTS:
            t0, c0 = time.perf_counter(), time.process_time()
            losses[v] = env["steps"][v]()
            times[v].append(time.perf_counter() - t0)
            cpu_times[v].append(time.process_time() - c0)

    # Shared frozen prefix (train_top_layers = N): the reference re-runs only the top N blocks.
    policy, batch = env["policy"], env["batch"]
    n_layers = len(find_decoder_layers(policy))
    freeze_all_but_top(policy, top_layers)
    shared = SharedPrefixReference(policy, top_layers)
    separate = SeparateReference(env["ref"])
    ids, am = batch["input_ids"], batch["attention_mask"]
    inputs = padded_inputs(ids, am)
    rows = target_rows(batch["query_mask"])
    body, _ = body_and_head(policy)
    ref_times = {"separate": [], "shared_prefix": []}
    for _ in range(max(repeats, 2)):
        t0 = time.perf_counter()
        separate.hidden_at(inputs, *rows)
        ref_times["separate"].append(time.perf_counter() - t0)
        shared.prepare(policy)
        with torch.no_grad():
            body(input_ids=ids, attention_mask=am, use_cache=False)  # the policy's forward fills the prefix capture
        t0 = time.perf_counter()
        shared.hidden_at(inputs, *rows)
        ref_times["shared_prefix"].append(time.perf_counter() - t0)
    shared.remove()
    return {
        # Best of the repeats (as timeit does): on a shared machine the fastest step is the least disturbed one.
        "step_s": {v: min(t) for v, t in times.items()}, "times": times, "loss": losses,
        "cpu_s": {v: min(t) for v, t in cpu_times.items()}, "cpu_times": cpu_times,
        "ref_s": {k: min(t) for k, t in ref_times.items()}, "top_layers": top_layers,
        "n_layers": n_layers, **batch_info(batch),
    }


def _subprocess(args: list[str], env: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("PART ")), None)
    if proc.returncode or line is None:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{' '.join(args)} failed (exit {proc.returncode})")
    return json.loads(line[len("PART "):])


def main() -> int:
    global G
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per variant (after one warm-up each)")
    parser.add_argument("--top-layers", type=int, default=8, help="N of the shared-prefix reference measurement")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--group-size", type=int, default=G, help=f"documents per query, G (default {G})")
    parser.add_argument("--part", help=argparse.SUPPRESS)  # internal: memory:<variant> | timing
    args = parser.parse_args()
    G = args.group_size
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.part:
        if args.part == "timing":
            out = run_timing(args.device, args.repeats, args.top_layers)
        else:
            out = run_memory(args.part.split(":", 1)[1], args.device)
        print("PART " + json.dumps(out), flush=True)
        return 0

    common = ["--device", args.device, "--repeats", str(args.repeats), "--top-layers", str(args.top_layers),
              "--group-size", str(G)]
    # Memory: one fresh process per variant. Every allocation of 64 KiB or more gets its own mmap, so RSS follows
    # the live tensors (glibc's heap would otherwise keep freed blocks and blur the peaks).
    mem_env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    mem = {v: _subprocess(["--part", f"memory:{v}", *common], env=mem_env) for v in VARIANTS}
    timing = _subprocess(["--part", "timing", *common])

    base_mem, base_t = mem["baseline"]["peak_bytes"], timing["step_s"]["baseline"]
    info = mem["baseline"]
    print(f"device {args.device} ({info['threads']} threads); {info['seqs']} sequences x {info['seq_len']} positions "
          f"({info['real_tokens']} real tokens, {info['query_tokens']} query tokens); G={G}, doc budget {DOC_TOKENS}, "
          f"query budget {QUERY_TOKENS}, lambda_gen = lambda_dp = 1, gradient checkpointing on")
    base_c = timing["cpu_s"]["baseline"]
    print(f"{'variant':<24}{'transient MiB':>14}{'step s':>9}{'CPU s':>9}{'loss':>12}{'mem ratio':>11}"
          f"{'time ratio':>12}{'CPU ratio':>11}")
    names = {"baseline": "baseline (full logits)", "all": "tsarank dp_span=all", "default": "tsarank defaults"}
    for v in VARIANTS:
        m, t, c = mem[v]["peak_bytes"], timing["step_s"][v], timing["cpu_s"][v]
        print(f"{names[v]:<24}{m / 2**20:>14.1f}{t:>9.2f}{c:>9.2f}{mem[v]['loss']:>12.6f}{m / base_mem:>11.3f}"
              f"{t / base_t:>12.3f}{c / base_c:>11.3f}")
    print("step times (s), interleaved: " + "; ".join(
        f"{v} " + ", ".join(f"{x:.1f}" for x in timing["times"][v]) for v in VARIANTS))
    rs = timing["ref_s"]
    print(f"reference forward, train_top_layers={timing['top_layers']} of {timing['n_layers']} blocks: separate "
          f"{rs['separate']:.2f} s, shared frozen prefix {rs['shared_prefix']:.2f} s "
          f"(ratio {rs['shared_prefix'] / rs['separate']:.3f}; blocks re-run {timing['top_layers'] / timing['n_layers']:.3f})")
    summary = {
        "mem_ratio_all": round(mem["all"]["peak_bytes"] / base_mem, 4),
        "mem_ratio_default": round(mem["default"]["peak_bytes"] / base_mem, 4),
        "time_ratio_all": round(timing["step_s"]["all"] / base_t, 4),
        "time_ratio_default": round(timing["step_s"]["default"] / base_t, 4),
        "loss_abs_diff_all": abs(mem["all"]["loss"] - mem["baseline"]["loss"]),
        "loss": {v: mem[v]["loss"] for v in VARIANTS},
        "peak_mib": {v: round(mem[v]["peak_bytes"] / 2**20, 1) for v in VARIANTS},
        "step_s": {v: round(timing["step_s"][v], 3) for v in VARIANTS},
        "cpu_time_ratio_all": round(timing["cpu_s"]["all"] / base_c, 4),
        "cpu_time_ratio_default": round(timing["cpu_s"]["default"] / base_c, 4),
        "loss_abs_diff_all_same_process": abs(timing["loss"]["all"] - timing["loss"]["baseline"]),
        "shared_prefix_ref_time_ratio": round(rs["shared_prefix"] / rs["separate"], 4),
        "device": args.device,
    }
    print("RESULT " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
