#!/usr/bin/env python
"""Check tsarank's GPU path in one go and write the GPU section of BENCHMARKS.md (run by scripts/gpu_check.sh).

Steps, each recorded with its figures and a pass/fail check:

1. ``environment`` -- the devices, and the dtype and attention ``auto`` picks for them, against the rules worked out
   here from the device's own facts (compute capability >= 8.0: bf16; FlashAttention-2 when flash-attn imports,
   else SDPA).
2. ``scoring`` -- the default model re-ranks DL19's BM25 top-100 (43 queries, 4,300 pairs) in fp32 + SDPA,
   bf16 + SDPA and bf16 + FlashAttention-2 (when installed): docs/s, nDCG@10, and whether the rankings agree
   (bf16 within 0.005 nDCG@10 of fp32; FlashAttention-2 ranks as SDPA does for at least 90% of the queries).
3. ``sft_memory`` -- ``scripts/bench_sft_step.py``: one SFT step with the row-gathered loss against the released
   code's full ``[B*G, L, V]`` logits: peak CUDA memory and time, the loss equal.
4. ``zero3`` -- ``tsarank train sft`` under DeepSpeed ZeRO-3 (policy and frozen reference both sharded) on 1 GPU
   (2 groups per step, accumulated) and, when two GPUs are present, on 2 (1 group each): the same batches, so the
   step losses must agree; peak CUDA memory per GPU; a hang ends at the step's timeout instead of the whole check.
5. ``sharded_rerank`` -- ``tsarank rerank`` on one device against ``--devices`` over all GPUs (one process each):
   byte-identical run files, docs/s of each.

``--dry-run`` runs the same steps on the CPU at toy sizes (2 CPU processes stand in for 2 GPUs, eager attention for
FlashAttention-2), so the test suite keeps this script working on machines without a GPU; its section goes to
``--out`` (never to BENCHMARKS.md unless named). The last line is ``RESULT {json}``; the exit status is 1 when a
check failed.

    python scripts/gpu_check.py                       # on the GPU machine (via scripts/gpu_check.sh)
    python scripts/gpu_check.py --dry-run --out /tmp/gpu_section.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository's tsarank, installed or not
# The data folder: --data, else $TSARANK_DATA, else ../shared/data or ./shared/data (set in main).
DATA = ROOT.parent / "shared" / "data"
DL19_RUN = DL19_QRELS = MSMARCO = Path()


def _set_data(data: Path) -> None:
    global DATA, DL19_RUN, DL19_QRELS, MSMARCO
    DATA = data
    DL19_RUN = DATA / "trec-dl-passage" / "bm25_top100" / "retrieve_results_dl19.json"
    DL19_QRELS = DATA / "trec-dl-passage" / "qrels.dl19-passage.txt"
    MSMARCO = DATA / "msmarco-train-sample" / "rankinggpt_msmarco.json"


#: Seconds the whole check may take (scripts/gpu_check.sh stops it at 480): each step's subprocesses get what is left.
BUDGET_S = 450
_DEADLINE = time.monotonic() + BUDGET_S


def _left(cap: float) -> float:
    """Seconds a step may still use: its own cap, or what is left of the budget (10 s kept to write the section)."""
    return max(0.0, min(cap, _DEADLINE - time.monotonic() - 10))
BLOCK = "gpu_check"  # BENCHMARKS.md keeps everything outside this block (the CPU benchmarks' blocks)


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(WANDB_MODE="offline", HF_HUB_OFFLINE=env.get("HF_HUB_OFFLINE", "1"), TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", TSARANK_DATA=str(DATA),
               PYTHONPATH=os.pathsep.join(filter(None, (str(ROOT), env.get("PYTHONPATH")))))
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> tuple[int, str, float]:
    """Exit status (124 on timeout, 127 when the program cannot start), the output's tail and the seconds taken."""
    start = time.perf_counter()
    timeout = _left(timeout)
    if timeout < 20:
        return 124, "skipped: the check's time budget is spent", 0.0
    try:
        proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env or _env(), capture_output=True, text=True,
                              timeout=timeout)
        rc, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"") + (exc.stderr or b"")
        rc, log = 124, f"timed out after {timeout:.0f} s (a hang?)\n{out.decode(errors='replace') if isinstance(out, bytes) else out}"
    except OSError as exc:  # e.g. no deepspeed launcher installed
        rc, log = 127, f"{cmd[0]}: {exc}"
    return rc, str(log)[-4000:], time.perf_counter() - start


# ------------------------------------------------------------------------------------------------ 1. environment
def step_environment(device: str) -> dict[str, Any]:
    from tsarank.backend import cpu_bf16_flags, resolve_attn_implementation, resolve_dtype

    dev = torch.device(device)
    out: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": _version("transformers"),
                           "deepspeed": _version("deepspeed"), "flash_attn": _version("flash-attn") or _version("flash_attn")}
    if dev.type == "cuda":
        out["devices"] = [{"name": torch.cuda.get_device_name(i), "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
                           "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
                          for i in range(torch.cuda.device_count())]
        major, minor = torch.cuda.get_device_capability(dev)
        native = (major, minor) >= (8, 0)
    else:
        sys.path.insert(0, str(ROOT / "scripts"))
        from write_benchmarks import machine  # the CPU's name as the CPU benchmarks report it

        out["devices"] = [{"name": machine()["CPU"], "capability": "cpu", "memory_gib": None}]
        native = bool(cpu_bf16_flags())
    flash_ok = dev.type == "cuda" and native and importlib.util.find_spec("flash_attn") is not None
    expected = {"dtype": "torch.bfloat16" if native else "torch.float32",
                "attention": "flash_attention_2" if flash_ok else "sdpa"}
    dtype = resolve_dtype("auto", dev)
    chosen = {"dtype": str(dtype), "attention": resolve_attn_implementation("auto", dev, dtype)}
    out.update(chosen=chosen, expected=expected, ok=chosen == expected)
    return out


# ------------------------------------------------------------------------------------------------ 2. scoring
def _dl19(n_queries: int | None, depth: int):
    from tsarank.data.formats import read_qrels

    entries = json.loads(DL19_RUN.read_text(encoding="utf-8"))[:n_queries]
    lists = [(str(e["hits"][0]["qid"]), e["query"], [(str(h["docid"]), h["content"]) for h in e["hits"][:depth]])
             for e in entries]
    return lists, read_qrels(DL19_QRELS)


def step_scoring(device: str, dry: bool) -> dict[str, Any]:
    from tsarank import Ranker
    from tsarank.backend import resolve_attn_implementation
    from tsarank.evaluation import evaluate

    lists, qrels = _dl19(2 if dry else None, 8 if dry else 100)
    n_pairs = sum(len(d) for _, _, d in lists)
    variants = [("float32", "sdpa"), ("bfloat16", "sdpa")]
    if dry:
        variants.append(("bfloat16", "eager"))  # the CPU's stand-in for a second attention backend
    else:
        try:
            resolve_attn_implementation("flash_attention_2", device, torch.bfloat16)
            variants.append(("bfloat16", "flash_attention_2"))
        except ValueError as exc:
            print(f"scoring: flash_attention_2 skipped ({exc})", flush=True)
    rows: dict[str, dict[str, Any]] = {}
    runs: dict[str, dict[str, list[tuple[str, float]]]] = {}
    for dtype, attn in variants:
        ranker = Ranker.default(dtype=dtype, attn_implementation=attn, device=device)
        ranker.score(lists[0][1], [t for _, t in lists[0][2]][:4])  # warm-up (kernels, allocator)
        _sync(device)
        start = time.perf_counter()
        run = {qid: [(d, float(s)) for (d, _), s in zip(docs, ranker.score(query, [t for _, t in docs]))]
               for qid, query, docs in lists}
        _sync(device)
        seconds = time.perf_counter() - start
        name = f"{dtype}+{attn}"
        runs[name] = run
        rows[name] = {"docs_per_s": round(n_pairs / seconds, 1), "ndcg10": round(evaluate(run, qrels, ["nDCG@10"])["nDCG@10"], 4)}
        del ranker
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    names = list(rows)
    fp32, bf16 = names[0], names[1]
    # bf16 reorders near-ties (scores differ by ~0.05 at depth 100), so rankings are compared by their quality and by
    # the top-10 sets, not by the full order.
    checks = {"bf16_ndcg_within_0.01": abs(rows[bf16]["ndcg10"] - rows[fp32]["ndcg10"]) <= 0.01}
    for name in names[1:]:
        base = fp32 if name == bf16 else bf16
        rows[name]["same_top10_set"] = round(sum(set(_order(runs[name][q])[:10]) == set(_order(runs[base][q])[:10])
                                                 for q in runs[base]) / len(runs[base]), 3)
    if len(names) > 2:
        other = names[2]
        checks[f"{other}_ndcg_within_0.01_of_sdpa"] = abs(rows[other]["ndcg10"] - rows[bf16]["ndcg10"]) <= 0.01
    if dry:  # 16 pairs say nothing about ranking quality: recorded, not judged
        checks = {k: True for k in checks}
    return {"pairs": n_pairs, "variants": rows, "speedup_bf16_over_fp32": round(rows[bf16]["docs_per_s"] / rows[fp32]["docs_per_s"], 2),
            "checks": checks, "ok": all(checks.values())}


def _order(ranked: list[tuple[str, float]]) -> list[str]:
    from tsarank.data.formats import trec_order

    return [d for d, _ in trec_order(ranked)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ 3. SFT memory
def step_sft_memory(device: str, dry: bool) -> dict[str, Any]:
    cmd = [sys.executable, ROOT / "scripts" / "bench_sft_step.py", "--device", "cpu" if dry else "cuda",
           "--repeats", "1", *(["--group-size", "2", "--top-layers", "2"] if dry else [])]
    rc, log, seconds = _run(cmd, timeout=400)
    result = _result_line(log)
    if rc != 0 or result is None:
        return {"ok": False, "error": f"exit {rc}", "log_tail": log[-1500:]}
    keep = {k: result[k] for k in ("mem_ratio_all", "mem_ratio_default", "time_ratio_all", "time_ratio_default",
                                  "loss_abs_diff_all") if k in result}
    keep["ok"] = keep.get("loss_abs_diff_all", 1.0) <= (1e-4 if dry else 5e-2)  # bf16 on the GPU
    return keep


def _result_line(log: str) -> dict[str, Any] | None:
    lines = [line for line in log.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT "):]) if lines else None


# ------------------------------------------------------------------------------------------------ 4. ZeRO-3
class _Probe:
    """Per rank: each step's loss is in trainer_state.json; this records peak CUDA memory at the end."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_train_end(self, args, state, control, **kwargs):
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        rank = int(os.environ.get("RANK", "0"))
        (self.out / f"rank{rank}.json").write_text(json.dumps({"peak_cuda_gib": peak}))


def worker(out: str, argv: list[str]) -> int:
    """One process of a ZeRO-3 run (started by the deepspeed launcher)."""
    from tsarank.training import sft

    return sft.main(argv, extra_callbacks=[_Probe(Path(out))])


def step_zero3(devices: int, dry: bool, tmp: Path) -> dict[str, Any]:
    opts = {"config": ROOT / "sft" / "configs" / "smollm2_quick.yaml", "train_file": MSMARCO, "max_steps": 2,
            "logging_steps": 1, "save_strategy": "no", "train_sampling_strategy": "sequential",
            "lr_scheduler_type": "constant", "warmup_steps": 0, "report_to": "none", "seed": 7,
            "bf16": "false" if dry else "true", "dtype": "auto"}
    if dry:
        opts.update(train_top_layers=2, max_doc_tokens=32, train_group_size=2)
    out: dict[str, Any] = {}
    losses: dict[int, list[float]] = {}
    for n in ([1, 2] if devices >= 2 else [1]):
        run_dir = tmp / f"zero3-{n}"
        run_dir.mkdir(parents=True)
        # The same two groups per step either way: one device accumulates two micro-batches of one group, as two
        # devices hold one group each (a batch of two in one forward would weight L_gen's token mean differently).
        flags = {**opts, "output_dir": run_dir / "model", "per_device_train_batch_size": 1,
                 "gradient_accumulation_steps": 2 // n}
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        where = ["--include", "localhost:" + ",".join(map(str, range(n)))] if visible and not dry else ["--num_gpus", n]
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", *where, "--master_port", _free_port(),
               ROOT / "scripts" / "gpu_check.py",
               "--worker", run_dir, "--", "--deepspeed", ROOT / "ds_configs" / "zero3.json",
               *[x for k, v in flags.items() for x in (f"--{k}", str(v))]]
        env = {**_env(), "OMP_NUM_THREADS": "1"} if dry else _env()
        rc, log, seconds = _run(cmd, timeout=300, env=env)
        state = run_dir / "model" / "trainer_state.json"
        if rc != 0 or not state.is_file():
            out[f"gpus_{n}"] = {"ok": False, "error": "hang (timeout)" if rc == 124 else f"exit {rc}", "log_tail": log[-1500:]}
            continue
        history = json.loads(state.read_text())["log_history"]
        losses[n] = [r["loss"] for r in history if "loss" in r and "train_loss" not in r]
        peaks = [json.loads(p.read_text())["peak_cuda_gib"] for p in sorted(run_dir.glob("rank*.json"))]
        out[f"gpus_{n}"] = {"ok": True, "seconds": round(seconds, 1), "losses": losses[n],
                            "peak_cuda_gib_per_gpu": [round(p, 2) for p in peaks if p is not None] or None}
    if 1 in losses and 2 in losses:
        diff = max(abs(a - b) / max(abs(a), 1e-6) for a, b in zip(losses[1], losses[2]))
        out["loss_rel_diff_1_vs_2"] = float(f"{diff:.3g}")
        out["losses_agree"] = diff <= (1e-3 if dry else 2e-2)  # bf16 reductions in another order on the GPU
    out["ok"] = all(v.get("ok", True) for v in out.values() if isinstance(v, dict)) and out.get("losses_agree", True)
    return out


# ------------------------------------------------------------------------------------------------ 5. sharded rerank
def step_sharded_rerank(device: str, devices: int, dry: bool, tmp: Path) -> dict[str, Any]:
    lists, _ = _dl19(4 if dry else None, 10 if dry else 100)
    cands = tmp / "candidates.json"
    cands.write_text(json.dumps([{"query": q, "hits": [{"qid": qid, "docid": d, "score": 0.0, "content": t}
                                                        for d, t in docs]} for qid, q, docs in lists]))
    n_pairs = sum(len(d) for _, _, d in lists)
    shard_devices = ",".join(["cpu", "cpu"] if dry else [f"cuda:{i}" for i in range(max(devices, 2))] if devices >= 2
                             else ["cuda:0", "cuda:0"])
    base = [sys.executable, "-m", "tsarank.cli", "rerank", "--candidates", cands, "--dtype", "float32" if dry else "auto"]
    env = {**_env(), "OMP_NUM_THREADS": "1"} if dry else _env()
    rc1, log1, s1 = _run([*base, "--device", "cpu" if dry else "cuda:0", "--out", tmp / "one.trec"], 300, env)
    rc2, log2, s2 = _run([*base, "--devices", shard_devices, "--out", tmp / "sharded.trec"], 300, env)
    if rc1 != 0 or rc2 != 0:
        return {"ok": False, "error": f"exit {rc1} / {rc2}", "log_tail": (log1 if rc1 else log2)[-1500:]}
    same = (tmp / "one.trec").read_bytes() == (tmp / "sharded.trec").read_bytes()
    return {"pairs": n_pairs, "devices": shard_devices, "one_process_s": round(s1, 1), "sharded_s": round(s2, 1),
            "byte_identical": same, "ok": same,
            "note": "wall seconds include each process's start and model load"}


# ------------------------------------------------------------------------------------------------ section
def render(result: dict[str, Any]) -> str:
    env = result["environment"]
    dev = env["devices"][0]
    sys.path.insert(0, str(ROOT / "scripts"))
    from write_benchmarks import markers

    begin, end = markers(BLOCK)
    lines = [begin, "", "## GPU check (`scripts/gpu_check.sh`)", "",
             f"{'Dry run on the CPU (toy sizes; not GPU figures). ' if result['dry_run'] else ''}"
             f"Device: {dev['name']} x{len(env['devices'])} (capability {dev['capability']}, "
             f"{dev['memory_gib']} GiB); torch {env['torch']}, CUDA {env['cuda']}, transformers {env['transformers']}, "
             f"DeepSpeed {env['deepspeed']}, flash-attn {env['flash_attn'] or 'not installed'}; {result['date']}.", "",
             "| check | figures | ok |", "| --- | --- | --- |",
             f"| auto dtype and attention | chosen {env['chosen']}, expected {env['expected']} | {_ok(env)} |"]
    sc = result.get("scoring", {})
    for name, row in sc.get("variants", {}).items():
        extra = f", same top-10 set as the row above for {row['same_top10_set']:.0%} of queries" if "same_top10_set" in row else ""
        lines.append(f"| scoring {name} ({sc['pairs']} DL19 pairs) | {row['docs_per_s']} docs/s, nDCG@10 {row['ndcg10']}{extra} | {_ok(sc)} |")
    mem = result.get("sft_memory", {})
    if "mem_ratio_default" in mem:
        lines.append(f"| SFT step vs full-logits baseline | peak memory x{mem['mem_ratio_default']} (same objective: "
                     f"x{mem.get('mem_ratio_all')}), time x{mem.get('time_ratio_default')}, loss diff "
                     f"{mem.get('loss_abs_diff_all')} | {_ok(mem)} |")
    z = result.get("zero3", {})
    for key in ("gpus_1", "gpus_2"):
        if key in z:
            r = z[key]
            lines.append(f"| ZeRO-3 SFT on {key[-1]} device(s) | " + (f"losses {r['losses']}, peak CUDA GiB/GPU "
                         f"{r['peak_cuda_gib_per_gpu']}, {r['seconds']} s" if r.get("ok") else r.get("error", "failed"))
                         + f" | {_ok(r)} |")
    if "loss_rel_diff_1_vs_2" in z:
        lines.append(f"| ZeRO-3, 1 vs 2 devices | relative loss difference {z['loss_rel_diff_1_vs_2']} | "
                     f"{'yes' if z['losses_agree'] else '**no**'} |")
    sh = result.get("sharded_rerank", {})
    if "byte_identical" in sh:
        lines.append(f"| sharded rerank `--devices {sh['devices']}` ({sh['pairs']} pairs) | byte-identical to one process: "
                     f"{sh['byte_identical']}; {sh['sharded_s']} s vs {sh['one_process_s']} s ({sh['note']}) | {_ok(sh)} |")
    for step in ("scoring", "sft_memory", "zero3", "sharded_rerank"):
        r = result.get(step, {})
        if "error" in r:
            lines.append(f"| {step} | {r['error']} | **no** |")
    lines += ["", f"Overall: {'all checks passed' if result['ok'] else '**a check failed**'}.", "", end]
    return "\n".join(lines) + "\n"


def _ok(step: dict[str, Any]) -> str:
    return "yes" if step.get("ok") else "**no**"


def write_section(path: Path, section: str) -> None:
    """Replace (or add) the gpu_check block of ``path`` atomically, keeping the rest of the file."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from write_benchmarks import merge

    from tsarank.atomic import atomic_write_text

    atomic_write_text(path, merge(path.read_text(encoding="utf-8") if path.is_file() else None, section, BLOCK))


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--worker" in argv:  # internal: one process of a ZeRO-3 run; the launcher adds --local_rank=N in front
        argv = [a for a in argv if not a.startswith("--local_rank")]
        at = argv.index("--worker")
        rest = argv[argv.index("--") + 1:] if "--" in argv else argv[at + 2:]
        return worker(argv[at + 1], rest)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at toy sizes")
    ap.add_argument("--out", default=None, help="file to write the section into (default: BENCHMARKS.md; "
                                                "with --dry-run: outputs/gpu_check_dry_run.md)")
    ap.add_argument("--steps", nargs="+", default=["environment", "scoring", "sft_memory", "zero3", "sharded_rerank"],
                    help="a subset of the steps")
    ap.add_argument("--data", default=None, help="the data folder (default: $TSARANK_DATA, ../shared/data or "
                                                  "./shared/data)")
    args = ap.parse_args(argv)
    from tsarank.demo import resolve_data_dir

    try:
        _set_data(resolve_data_dir(args.data))
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not DL19_RUN.is_file():
        print(f"error: {DL19_RUN} not found (the check needs ../shared/data beside the repository)", file=sys.stderr)
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device visible to torch (a CPU-only torch build, or no GPU); use --dry-run to check the "
              "script on a CPU", file=sys.stderr)
        return 2
    out = Path(args.out or (ROOT / ("outputs/gpu_check_dry_run.md" if args.dry_run else "BENCHMARKS.md")))
    out.parent.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.dry_run else "cuda:0"
    devices = 2 if args.dry_run else torch.cuda.device_count()
    result: dict[str, Any] = {"dry_run": args.dry_run, "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    result["environment"] = step_environment(device)
    print(f"environment: {result['environment']['chosen']} (ok: {result['environment']['ok']})", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        for name in args.steps:
            if name == "environment":
                continue
            start = time.perf_counter()
            steps = {"scoring": lambda: step_scoring(device, args.dry_run),
                     "sft_memory": lambda: step_sft_memory(device, args.dry_run),
                     "zero3": lambda: step_zero3(devices, args.dry_run, Path(tmp)),
                     "sharded_rerank": lambda: step_sharded_rerank(device, devices, args.dry_run, Path(tmp))}
            if name not in steps:
                print(f"error: unknown step {name!r}", file=sys.stderr)
                return 2
            try:  # one step failing (a broken flash-attn, an OOM) must not lose the others' figures
                result[name] = steps[name]()
            except Exception as exc:  # noqa: BLE001
                result[name] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"}
            print(f"{name}: ok {result[name]['ok']} ({time.perf_counter() - start:.0f} s) {json.dumps(result[name])[:600]}",
                  flush=True)
    result["ok"] = all(v.get("ok", False) for k, v in result.items() if isinstance(v, dict))
    write_section(out, render(result))
    print(f"wrote the GPU section to {out}")
    print("RESULT " + json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
