#!/usr/bin/env python
"""bf16 against fp32 on this CPU: scoring speed and ranking quality, and training step time.

The measurement behind ``dtype="auto"`` on CPUs (:func:`tsarank.backend.cpu_native_bf16`): on a CPU with
AVX512-BF16 or AMX, ``auto`` picks bf16 weights for scoring; this script shows, on the machine it runs on, whether
that is faster and whether the ranking holds.

Phases (one process, the same inputs for both dtypes):

* ``score`` -- ``Ranker.default(dtype=...)`` re-ranks DL19's BM25 top-``--depth`` (43 queries x 20 = 860 pairs by
  default) from ``../shared/data``; docs/s over the whole set after one warm-up query, best of ``--repeats``
  passes, interleaved fp32, bf16, fp32, bf16...; nDCG@10 of each re-ranked run against the DL19 qrels
  (``rel`` graded, as trec_eval's ndcg_cut_10).
* ``train`` -- ``--train-steps`` steps of ``tsarank train sft`` with ``sft/configs/smollm2_quick.yaml`` (the
  default model, top 4 blocks trained, frozen shared-prefix reference): fp32 against ``--bf16 true`` (CPU autocast,
  fp32 master weights); seconds per step from the Trainer's step callbacks, the first step left out as warm-up,
  median of the rest.

The last line is ``RESULT {json}`` with ``score_speedup`` (bf16 docs/s over fp32), ``ndcg_delta`` (bf16 - fp32),
``train_speedup`` (fp32 s/step over bf16 s/step) and the CPU's name and bf16 flags.

    python scripts/bench_cpu_bf16.py                       # 860 pairs, 1 pass each, 8 training steps each
    python scripts/bench_cpu_bf16.py --repeats 2 --train-steps 12
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DL19_RUN = DATA / "trec-dl-passage" / "bm25_top100" / "retrieve_results_dl19.json"
DL19_QRELS = DATA / "trec-dl-passage" / "qrels.dl19-passage.txt"


def cpu_description() -> dict[str, object]:
    """The CPU's name, logical cores and the flags that decide bf16 (from /proc/cpuinfo and lscpu where present)."""
    from tsarank.backend import cpu_bf16_flags

    name, model = "unknown CPU", None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name == "unknown CPU":
                name = line.split(":", 1)[1].strip()
            elif line.startswith("model\t") and model is None:
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": name, "cpu_model_number": model, "logical_cpus": os.cpu_count(),
            "bf16_flags": sorted(cpu_bf16_flags()), "torch": torch.__version__, "threads": torch.get_num_threads()}


def load_dl19(depth: int) -> tuple[list[tuple[str, str, list[tuple[str, str]]]], dict]:
    """``[(qid, query, [(docid, text), ...]), ...]`` in file order, and the qrels."""
    from tsarank.data.formats import read_qrels

    if not DL19_RUN.is_file():
        sys.exit(f"error: {DL19_RUN} not found (the benchmark needs ../shared/data beside the repository)")
    entries = json.loads(DL19_RUN.read_text(encoding="utf-8"))
    queries = []
    for e in entries:
        hits = e["hits"][:depth]
        queries.append((str(hits[0]["qid"]), e["query"], [(str(h["docid"]), h["content"]) for h in hits]))
    return queries, read_qrels(DL19_QRELS)


def score_pass(ranker, queries) -> tuple[float, dict[str, list[tuple[str, float]]]]:
    """Seconds for one pass over every query, and the run it produced."""
    run = {}
    start = time.perf_counter()
    for qid, query, docs in queries:
        scores = ranker.score(query, [text for _, text in docs])
        run[qid] = [(docid, float(s)) for (docid, _), s in zip(docs, scores)]
    return time.perf_counter() - start, run


def bench_score(depth: int, repeats: int) -> dict[str, object]:
    from tsarank import Ranker
    from tsarank.evaluation import evaluate

    queries, qrels = load_dl19(depth)
    n_pairs = sum(len(d) for _, _, d in queries)
    rankers = {name: Ranker.default(dtype=name) for name in ("float32", "bfloat16")}
    for ranker in rankers.values():  # warm-up: first-call costs (kernels, allocator) out of the timing
        score_pass(ranker, queries[:1])
    best: dict[str, float] = {}
    runs: dict[str, dict] = {}
    for _ in range(repeats):
        for name, ranker in rankers.items():
            seconds, run = score_pass(ranker, queries)
            best[name] = min(best.get(name, float("inf")), seconds)
            runs[name] = run
    ndcg = {name: evaluate(run, qrels, ["nDCG@10"])["nDCG@10"] for name, run in runs.items()}
    out = {
        "pairs": n_pairs, "depth": depth, "queries": len(queries),
        "docs_per_s_fp32": n_pairs / best["float32"], "docs_per_s_bf16": n_pairs / best["bfloat16"],
        "ndcg10_fp32": ndcg["float32"], "ndcg10_bf16": ndcg["bfloat16"],
    }
    out["score_speedup"] = out["docs_per_s_bf16"] / out["docs_per_s_fp32"]
    out["ndcg_delta"] = out["ndcg10_bf16"] - out["ndcg10_fp32"]
    return out


class _StepTimer:
    """Seconds of each optimizer step (a TrainerCallback without the import)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)


def bench_train(steps: int) -> dict[str, object]:
    from tsarank.training import sft

    out: dict[str, object] = {"train_steps": steps}
    per_step: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for bf16 in ("false", "true"):
            timer = _StepTimer()
            argv = ["--config", str(ROOT / "sft" / "configs" / "smollm2_quick.yaml"),
                    "--train_file", str(DATA / "msmarco-train-sample" / "rankinggpt_msmarco.json"),
                    "--output_dir", str(Path(tmp) / f"bf16-{bf16}"), "--max_steps", str(steps),
                    "--save_strategy", "no", "--logging_steps", str(steps), "--bf16", bf16, "--report_to", "none"]
            cwd = os.getcwd()
            os.chdir(ROOT)  # the config's paths are relative to the repository root
            try:
                rc = sft.main(argv, extra_callbacks=[timer])
            finally:
                os.chdir(cwd)
            if rc != 0:
                sys.exit(f"error: the SFT run with --bf16 {bf16} exited {rc}")
            per_step["bf16" if bf16 == "true" else "fp32"] = statistics.median(timer.seconds[1:] or timer.seconds)
    out["s_per_step_fp32"], out["s_per_step_bf16"] = per_step["fp32"], per_step["bf16"]
    out["train_speedup"] = per_step["fp32"] / per_step["bf16"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", type=int, default=20, help="BM25 candidates per DL19 query (default 20)")
    ap.add_argument("--repeats", type=int, default=1, help="timed scoring passes per dtype; best kept (default 1)")
    ap.add_argument("--train-steps", type=int, default=8, help="SFT steps per dtype; 0 skips training (default 8)")
    ap.add_argument("--skip-score", action="store_true", help="only the training phase")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result: dict[str, object] = cpu_description()
    if not args.skip_score:
        result.update(bench_score(args.depth, args.repeats))
        print(f"scoring  fp32 {result['docs_per_s_fp32']:.1f} docs/s  bf16 {result['docs_per_s_bf16']:.1f} docs/s  "
              f"x{result['score_speedup']:.2f}   nDCG@10 fp32 {result['ndcg10_fp32']:.4f} bf16 "
              f"{result['ndcg10_bf16']:.4f} (delta {result['ndcg_delta']:+.4f})", flush=True)
    if args.train_steps > 0:
        result.update(bench_train(args.train_steps))
        print(f"training fp32 {result['s_per_step_fp32']:.2f} s/step  bf16 autocast {result['s_per_step_bf16']:.2f} "
              f"s/step  x{result['train_speedup']:.2f}", flush=True)
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
