#!/usr/bin/env python
"""Benchmark shared-trunk scoring of several checkpoints (``tsarank.shared_trunk.score_pairs_shared``) against
scoring each checkpoint on its own (``Ranker.score_pairs`` once per model), as the demo's evaluation does.

Workload: ``--models`` checkpoints (default: the embedded default model plus two copies whose top
``--top-layers`` blocks are perturbed, which is what ``train_top_layers`` training in both stages produces: a
zero-shot model, M_cpt and M_sft), over the first ``--queries`` DL19 queries x ``--docs`` BM25 candidates.

Both phases are warmed up, then timed ``--repeats`` times interleaved; the best time is kept. The score check is
the maximum absolute difference between the two phases over every model and pair. The ideal ratio is
``M / (k/L + M (L-k)/L)`` for ``M`` models sharing ``k`` of ``L`` blocks. The last line is ``RESULT {json}``.

    python scripts/bench_shared_trunk.py
    python scripts/bench_shared_trunk.py --models default runs/demo/cpt runs/demo/sft
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_score import PeakRSS, load_pairs  # noqa: E402


def perturbed_copy(ranker, top: int, seed: int):
    """A Ranker whose model is a copy of ``ranker``'s with its top ``top`` blocks changed (a stand-in for a
    checkpoint trained with ``train_top_layers = top``)."""
    from tsarank.inference import Ranker
    from tsarank.layers import find_decoder_layers

    model = copy.deepcopy(ranker.model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in list(find_decoder_layers(model))[-top:]:
            for p in block.parameters():
                p.mul_(1 + 0.01 * torch.randn(p.shape, generator=g))
    return Ranker(model, ranker.tokenizer, ranker.template, max_tokens=ranker.max_tokens)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=None, help="checkpoints ('default' = the embedded model)")
    ap.add_argument("--top-layers", type=int, default=8, help="perturbed top blocks of the stand-in copies (default 8)")
    ap.add_argument("--queries", type=int, default=2, help="DL19 queries (default 2)")
    ap.add_argument("--docs", type=int, default=50, help="candidates per query (default 50)")
    ap.add_argument("--repeats", type=int, default=2, help="timed repetitions per phase; the best is kept (default 2)")
    ap.add_argument("--max-doc-tokens", type=int, default=128, help="document budget of every model (default 128)")
    args = ap.parse_args(argv)

    import dataclasses

    from tsarank.default_model import default_model_path
    from tsarank.inference import Ranker
    from tsarank.layers import find_decoder_layers
    from tsarank.shared_trunk import score_pairs_shared, shared_prefix_blocks

    def load(name: str) -> Ranker:
        r = Ranker.from_pretrained(str(default_model_path()) if name == "default" else name, device="cpu",
                                   dtype="float32")
        r.template = dataclasses.replace(r.template, max_doc_tokens=args.max_doc_tokens)
        return r

    if args.models:
        rankers = [load(m) for m in args.models]
    else:
        base = load("default")
        rankers = [base, perturbed_copy(base, args.top_layers, 1), perturbed_copy(base, args.top_layers, 2)]
    m = len(rankers)
    n_layers = len(find_decoder_layers(rankers[0].model))
    k = shared_prefix_blocks([r.model for r in rankers])
    ideal = m / (k / n_layers + m * (n_layers - k) / n_layers)
    pairs = load_pairs(args.queries, args.docs)
    print(f"{m} models, {k} of {n_layers} blocks shared (ideal ratio {ideal:.2f}), {len(pairs)} pairs")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")

    phases = {
        "separate": lambda: [r.score_pairs(pairs) for r in rankers],
        "shared": lambda: score_pairs_shared(rankers, pairs)[0],
    }
    # Warm-up (oneDNN/MKL initialisation, first-call allocations).
    rankers[0].score_pairs(pairs[:8])
    score_pairs_shared(rankers, pairs[:8])
    times: dict[str, list[float]] = {p: [] for p in phases}
    growth: dict[str, float] = {}
    outputs: dict[str, list[list[float]]] = {}
    for rep in range(args.repeats):
        for name, fn in phases.items():
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                outputs[name] = fn()
                dt = time.perf_counter() - t0
            times[name].append(dt)
            growth[name] = max(growth.get(name, 0.0), mem.growth_mb)
            print(f"  rep {rep + 1} {name:8s} {dt:7.2f} s  {m * len(pairs) / dt:6.2f} model-docs/s  "
                  f"peak RSS +{mem.growth_mb:.0f} MB", flush=True)
    best = {p: min(v) for p, v in times.items()}
    diff = max(abs(a - b) for sa, sb in zip(outputs["separate"], outputs["shared"]) for a, b in zip(sa, sb))
    result = {
        "speedup": round(best["separate"] / best["shared"], 3),
        "ideal_speedup": round(ideal, 3),
        "max_abs_diff": float(f"{diff:.3g}"),
        "models": m,
        "shared_blocks": k,
        "blocks": n_layers,
        "pairs": len(pairs),
        "peak_growth_mb": round(growth["shared"]),
        "separate_peak_growth_mb": round(growth["separate"]),
        "repeats": args.repeats,
    }
    print(f"separate: {best['separate']:.2f} s, shared trunk: {best['shared']:.2f} s -> speed-up "
          f"{result['speedup']:.2f}x (ideal {ideal:.2f}x), max |score diff| {diff:.2e}")
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
