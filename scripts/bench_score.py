#!/usr/bin/env python
"""Benchmark ``Ranker.score_pairs`` against the paper's released evaluation style, and against the floor.

Workload: the default model (or ``--model``) and the first ``--queries`` DL19 queries x ``--docs`` BM25
candidates (200 pairs by default) from ``../shared/data``.

Phases, all on the same encoded inputs (``encode_pairs``, so every phase sees the same token ids):

* ``baseline`` -- RankingGPT's ``eval.py`` style: fixed batches of 8 in file order, right padding, full
  ``[B, L, V]`` logits from ``model(...)``, ``log_softmax``, ``gather``, masked mean over the query tokens,
  under ``torch.no_grad()``. Its timing includes tokenization (``encode_pairs``), as does the Ranker's.
* ``ranker``   -- ``Ranker.score_pairs`` (length-sorted token-budget batches, LM head on query rows only).
* ``floor``    -- the bare transformer body (no head, no tokenization, inputs collated beforehand) over the very
  batches the Ranker uses (``plan_batches`` with its ``max_tokens``). ``ranker / floor`` is the cost of
  everything that is not the body.

``--processes N`` adds a scaling phase over ``--process-queries`` DL19 queries x ``--docs`` candidates: the
Ranker in fresh processes, each scoring its share of the queries (split by estimated tokens, longest first, as
``tsarank rerank`` on several devices splits them), timed from a barrier all of them reach with the model loaded:
``1x1`` (1 process, 1 thread), ``1xN`` (1 process, N threads) and ``Nx1`` (N processes, 1 thread each). The
scores of ``Nx1`` must equal those of ``1x1``.

Each phase is warmed up once, then timed ``--repeats`` times, interleaved (baseline, ranker, floor, baseline,
...), and the best time is kept, which is the most robust statistic on a shared machine. Peak memory is the
RSS high-water mark during a phase (``/proc/self/clear_refs`` + ``VmHWM``, after ``malloc_trim`` so that memory
freed by the previous phase does not count), reported as the absolute peak and the growth over the model-loaded
process. The last line is ``RESULT {json}``.

    python scripts/bench_score.py                       # 2 queries x 100 docs, 3 repeats
    python scripts/bench_score.py --sweep-max-tokens 1024 2048 4096 8192
    python scripts/bench_score.py --processes 2      # also 1 vs 2 processes vs 2 threads
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DL19 = ROOT.parent / "shared" / "data" / "trec-dl-passage" / "bm25_top100" / "retrieve_results_dl19.json"


# ------------------------------------------------------------------------------------------------ memory
def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakRSS:
    """RSS high-water mark of a code region (Linux): reset with ``clear_refs`` 5, read ``VmHWM``."""

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        _malloc_trim()
        self.start_kb = _status_kb("VmRSS") or 0
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.supported = True
        except OSError:
            self.supported = False
        return self

    def __exit__(self, *exc) -> None:
        hwm = _status_kb("VmHWM") if self.supported else None
        self.peak_mb = hwm / 1024 if hwm else float("nan")
        self.growth_mb = (hwm - self.start_kb) / 1024 if hwm else float("nan")


# ------------------------------------------------------------------------------------------------ phases
def baseline_scores(model, encoded, pad_id: int, batch_size: int = 8) -> list[float]:
    """The paper's evaluation: fixed batches in file order, full [B, L, V] logits, log_softmax, gather."""
    from tsarank.inference import collate_pairs

    scores: list[float] = []
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            batch = collate_pairs(encoded[start : start + batch_size], pad_id)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # [B, L, V]
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            labels = batch.input_ids[:, 1:]
            mask = batch.target_mask[:, 1:].float()  # token t is predicted at position t-1
            token_lp = logprobs[:, :-1].gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # [B, L-1]
            scores.extend(((token_lp * mask).sum(-1) / mask.sum(-1)).tolist())
            del logits, logprobs
    return scores


def floor_forward(body, batches) -> None:
    """The transformer body alone over pre-collated batches: the time no scorer can beat."""
    with torch.inference_mode():
        for batch in batches:
            body(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)


def load_pairs(n_queries: int, n_docs: int) -> list[tuple[str, str]]:
    if not DL19.is_file():
        sys.exit(f"error: {DL19} not found (the benchmark needs ../shared/data beside the repository)")
    data = json.loads(DL19.read_text(encoding="utf-8"))
    return [(entry["query"], hit["content"]) for entry in data[:n_queries] for hit in entry["hits"][:n_docs]]


# ------------------------------------------------------------------------------------------------ processes
Chunk = tuple[int, list[tuple[str, str]]]  # (index, one query's pairs)


def _process_worker(path: str, chunks: list[Chunk], threads: int, barrier, results) -> None:
    """One scoring process: load the Ranker, wait for the others, score its chunks."""
    torch.set_num_threads(threads)
    from tsarank.inference import Ranker

    ranker = Ranker.from_pretrained(path, dtype="float32")
    ranker.score_pairs(chunks[0][1][:4])  # warm-up, out of the timing
    barrier.wait()
    start = time.perf_counter()
    scores = {i: ranker.score_pairs(pairs) for i, pairs in chunks}
    results.put((start, time.perf_counter(), scores))


def _run_processes(path: str, shares: list[list[Chunk]], threads: int) -> tuple[float, dict[int, list[float]]]:
    """Wall seconds from the common barrier to the last process's end, and the scores of every chunk."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(len(shares)), ctx.Queue()
    procs = [ctx.Process(target=_process_worker, args=(path, share, threads, barrier, results)) for share in shares]
    for proc in procs:
        proc.start()
    got = [results.get(timeout=3600) for _ in procs]
    for proc in procs:
        proc.join()
        if proc.exitcode != 0:
            sys.exit(f"error: a scoring process exited {proc.exitcode}")
    scores = {i: s for _, _, part in got for i, s in part.items()}
    return max(end for _, end, _ in got) - min(start for start, _, _ in got), scores


def bench_processes(path: str, n_queries: int, n_docs: int, world: int, repeats: int) -> dict[str, object]:
    """docs/s of 1 process x 1 thread, 1 process x ``world`` threads and ``world`` processes x 1 thread."""
    from tsarank.sharding import assign_chunks, chunk_cost

    pairs = load_pairs(n_queries, n_docs)
    chunks: list[Chunk] = [(i, pairs[s : s + n_docs]) for i, s in enumerate(range(0, len(pairs), n_docs))]
    costs = [chunk_cost(c[0][0], [d for _, d in c], doc_chars=4 * 256) for _, c in chunks]
    split = [[chunks[i] for i in idx] for idx in assign_chunks(costs, world)]
    setups = {"1x1": ([chunks], 1), f"1x{world}": ([chunks], world), f"{world}x1": (split, 1)}
    best: dict[str, float] = {}
    scores: dict[str, dict[int, list[float]]] = {}
    for _ in range(repeats):
        for name, (shares, threads) in setups.items():
            seconds, scores[name] = _run_processes(path, shares, threads)
            best[name] = min(best.get(name, float("inf")), seconds)
            print(f"  processes x threads {name:5s} {seconds:7.2f} s  {len(pairs) / seconds:6.2f} docs/s", flush=True)
    diff = max(abs(a - b) for i in scores["1x1"] for a, b in zip(scores["1x1"][i], scores[f"{world}x1"][i]))
    return {"process_pairs": len(pairs), "world": world,
            **{f"docs_per_s_{k}": round(len(pairs) / v, 3) for k, v in best.items()},
            "process_speedup_over_1x1": round(best["1x1"] / best[f"{world}x1"], 3),
            "process_speedup_over_threads": round(best[f"1x{world}"] / best[f"{world}x1"], 3),
            "process_max_abs_diff": float(f"{diff:.3g}")}


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="checkpoint (default: the embedded default model)")
    ap.add_argument("--queries", type=int, default=2, help="DL19 queries (default 2)")
    ap.add_argument("--docs", type=int, default=100, help="candidates per query (default 100)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions per phase; the best is kept (default 3)")
    ap.add_argument("--max-tokens", type=int, default=None, help="Ranker token budget (default: the Ranker's CPU/GPU default)")
    ap.add_argument("--baseline-batch-size", type=int, default=8, help="paper's eval batch size (default 8)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--processes", type=int, default=0, metavar="N",
                    help="also time N processes x 1 thread against 1 process with 1 and with N threads (default off)")
    ap.add_argument("--process-queries", type=int, default=8,
                    help="DL19 queries (x --docs) of the --processes phase (default 8)")
    ap.add_argument("--sweep-max-tokens", type=int, nargs="*", default=None, metavar="N",
                    help="also time the Ranker at these token budgets (informational)")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    from tsarank.default_model import default_model_path
    from tsarank.inference import Ranker, collate_pairs, plan_batches
    from tsarank.modeling import body_and_head
    from tsarank.prompts import encode_pairs

    path = str(default_model_path()) if args.model == "default" else args.model
    ranker = Ranker.from_pretrained(path, device=args.device, dtype="float32", max_tokens=args.max_tokens)
    model, tok, template = ranker.model, ranker.tokenizer, ranker.template
    body, _ = body_and_head(model)
    pairs = load_pairs(args.queries, args.docs)
    n = len(pairs)
    queries, docs = [q for q, _ in pairs], [d for _, d in pairs]
    encoded = ranker.encode(queries, docs)
    lengths = [len(e.input_ids) for e in encoded]
    plan = plan_batches(lengths, ranker.max_tokens)
    floor_batches = [collate_pairs([encoded[i] for i in idx], ranker.pad_id, ranker.device) for idx in plan]
    padded_baseline = sum(args.baseline_batch_size * max(lengths[i : i + args.baseline_batch_size])
                          for i in range(0, n, args.baseline_batch_size))
    padded_ranker = sum(len(idx) * max(lengths[i] for i in idx) for idx in plan)
    print(f"model {path} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, vocab {model.config.vocab_size}), "
          f"{n} pairs, {sum(lengths)} tokens (mean {sum(lengths) / n:.0f}, max {max(lengths)}); "
          f"padded tokens: baseline {padded_baseline}, ranker {padded_ranker} in {len(plan)} batches (max_tokens {ranker.max_tokens})")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")

    def run_baseline():
        enc = encode_pairs(tok, template, queries, docs)
        return baseline_scores(model, enc, ranker.pad_id, args.baseline_batch_size)

    phases = {
        "baseline": run_baseline,
        "ranker": lambda: ranker.score_pairs(pairs),
        "floor": lambda: floor_forward(body, floor_batches),
    }
    # Warm-up on a slice (first-call allocations, oneDNN/MKL initialisation).
    warm = pairs[:16]
    baseline_scores(model, encoded[:16], ranker.pad_id, args.baseline_batch_size)
    ranker.score_pairs(warm)
    floor_forward(body, floor_batches[-1:])

    times: dict[str, list[float]] = {k: [] for k in phases}
    cpu: dict[str, list[float]] = {k: [] for k in phases}
    peak: dict[str, float] = {}
    growth: dict[str, float] = {}
    outputs: dict[str, list[float]] = {}
    for rep in range(args.repeats):
        for name, fn in phases.items():
            with PeakRSS() as mem:
                t0, c0 = time.perf_counter(), time.process_time()
                out = fn()
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
            times[name].append(dt)
            cpu[name].append(dc)
            peak[name] = max(peak.get(name, 0.0), mem.peak_mb)
            growth[name] = max(growth.get(name, 0.0), mem.growth_mb)
            if out is not None:
                outputs[name] = out
            print(f"  rep {rep + 1} {name:8s} {dt:7.2f} s wall  {dc:7.2f} s cpu  {n / dt:6.2f} docs/s  "
                  f"peak RSS {mem.peak_mb:7.0f} MB (+{mem.growth_mb:.0f})", flush=True)

    best = {k: min(v) for k, v in times.items()}
    best_cpu = {k: min(v) for k, v in cpu.items()}
    max_abs_diff = max(abs(a - b) for a, b in zip(outputs["baseline"], outputs["ranker"]))
    result = {
        "speedup": round(best["baseline"] / best["ranker"], 3),
        "max_abs_diff": float(f"{max_abs_diff:.3g}"),
        "floor_ratio": round(best["ranker"] / best["floor"], 3),
        "docs_per_s": round(n / best["ranker"], 3),
        "baseline_docs_per_s": round(n / best["baseline"], 3),
        "floor_docs_per_s": round(n / best["floor"], 3),
        "peak_mb": round(peak["ranker"]),
        "baseline_peak_mb": round(peak["baseline"]),
        "peak_growth_mb": round(growth["ranker"]),
        "baseline_peak_growth_mb": round(growth["baseline"]),
        "cpu_speedup": round(best_cpu["baseline"] / best_cpu["ranker"], 3),
        "cpu_floor_ratio": round(best_cpu["ranker"] / best_cpu["floor"], 3),
        "pairs": n,
        "max_tokens": ranker.max_tokens,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
    }

    if args.sweep_max_tokens:
        sweep = {}
        for mt in args.sweep_max_tokens:
            ranker.max_tokens = mt
            ranker.score_pairs(warm)
            sweep[mt] = min(_timed(lambda: ranker.score_pairs(pairs)) for _ in range(args.repeats))
            print(f"  max_tokens {mt:6d}: {n / sweep[mt]:6.2f} docs/s", flush=True)
        result["sweep_docs_per_s"] = {str(k): round(n / v, 3) for k, v in sweep.items()}

    if args.processes > 1:
        result.update(bench_processes(path, args.process_queries, args.docs, args.processes, args.repeats))
        w = args.processes
        print(f"{w} processes x 1 thread: {result[f'docs_per_s_{w}x1']:.2f} docs/s, x{result['process_speedup_over_1x1']:.2f} "
              f"over 1 process x 1 thread, x{result['process_speedup_over_threads']:.2f} over 1 process x {w} threads "
              f"(max |score diff| {result['process_max_abs_diff']:.1e})")

    print(f"baseline (batches of {args.baseline_batch_size}, full logits): {n / best['baseline']:.2f} docs/s, "
          f"peak RSS {peak['baseline']:.0f} MB (+{growth['baseline']:.0f} MB)")
    print(f"Ranker.score_pairs:                     {n / best['ranker']:.2f} docs/s, "
          f"peak RSS {peak['ranker']:.0f} MB (+{growth['ranker']:.0f} MB)")
    print(f"floor (transformer body only):          {n / best['floor']:.2f} docs/s")
    print(f"speed-up {result['speedup']:.2f}x (target >= 2), Ranker/floor {result['floor_ratio']:.3f} (goal <= 1.15), "
          f"max |score diff| {max_abs_diff:.2e} (target <= 1e-4); CPU-time speed-up {result['cpu_speedup']:.2f}x")
    print("RESULT " + json.dumps(result))
    return 0


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(main())
