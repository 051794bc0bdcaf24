#!/usr/bin/env python
"""Benchmark one stage-2 (SFT) training step under DeepSpeed ZeRO-3 on 2 processes against 1 process without it.

Both runs are the real `tsarank train sft` code path on the default model (SmolLM2-135M-Instruct, every block
trained, fp32, AdamW), one group of G MS MARCO passages per process and step, L_rank + L_gen + L_dp with a
separate frozen reference (ZeRO-3: sharded like the policy), 1 thread per process. A callback records every step's
wall time and each process's resident memory; the first step is warm-up. Per process, it prints:

- median step time, 2 processes (each doing one group) vs 1 process (one group): the cost of ZeRO-3's gathers,
  reduce-scatters and partitioned optimizer on this machine;
- peak resident memory (RSS) of each process and its growth during training (above the level after loading):
  ZeRO-3 holds a half of the weights, gradients and Adam states per process;

and a last line ``RESULT {json}``. About 5 minutes on a 2-core machine.

    python scripts/bench_zero3_step.py [--steps 6] [--group-size 8] [--train-top-layers 0]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "msmarco-train-sample" / "rankinggpt_msmarco.json"


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(out: Path, argv: list[str]) -> int:
    """One process of a run: `tsarank train sft` with a timing callback; writes out/rank<r>.json."""
    from transformers import TrainerCallback

    from tsarank.training import sft

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[float] = []
            self.rss_at_start = 0.0
            self._t0 = 0.0

        def on_train_begin(self, args, state, control, **kw):
            self.rss_at_start = _rss_mb()

        def on_step_begin(self, args, state, control, **kw):
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.steps.append(time.perf_counter() - self._t0)

    timer = Timer()
    rc = sft.main(argv, extra_callbacks=[timer])
    rank = int(os.environ.get("RANK", "0"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "steps_s": timer.steps, "rss_at_train_start_mb": timer.rss_at_start, "peak_rss_mb": peak}))
    return rc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _groups(path: Path, n: int) -> Path:
    """n MS MARCO groups, alternating short and long queries (the two ranks get uneven work)."""
    sys.path.insert(0, str(ROOT))
    from tsarank.data.formats import read_groups

    groups = sorted(read_groups(DATA), key=lambda g: len(g["query"]))
    order = [groups[i // 2] if i % 2 == 0 else groups[-1 - i // 2] for i in range(n)]
    with open(path, "w") as f:
        for g in order:
            f.write(json.dumps({k: g[k] for k in ("query_id", "query", "positive_passages", "negative_passages")}) + "\n")
    return path


def _summary(out: Path) -> dict:
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    steps = [s for r in ranks for s in r["steps_s"][1:]]  # the first step of each process is warm-up
    return {"processes": len(ranks), "median_step_s": statistics.median(steps),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks),
            "rss_growth_mb": max(r["peak_rss_mb"] - r["rss_at_train_start_mb"] for r in ranks),
            "rss_at_train_start_mb": max(r["rss_at_train_start_mb"] for r in ranks)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is warm-up)")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--train-top-layers", type=int, default=0, help="0 = every block trained")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: OUT dir of a worker process
    args, rest = parser.parse_known_args()
    if args.worker:
        return worker(Path(args.worker), [a for a in rest if not a.startswith("--local_rank")])
    if not DATA.is_file():
        sys.exit(f"error: {DATA} not found (the benchmark needs ../shared/data beside the repository)")

    tmp = Path(tempfile.mkdtemp(prefix="tsarank_bench_zero3_"))
    groups = _groups(tmp / "groups.jsonl", 2 * args.steps)
    sft_args = [
        "--model_name_or_path", "default", "--dtype", "float32", "--train_file", str(groups),
        "--train_group_size", str(args.group_size), "--max_doc_tokens", "128", "--max_query_tokens", "32",
        "--train_top_layers", str(args.train_top_layers), "--lambda_dp", "1", "--dp_span", "query",
        "--lambda_gen", "1", "--gen_span", "all", "--learning_rate", "1e-5", "--max_steps", str(args.steps),
        "--per_device_train_batch_size", "1", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
        "--train_sampling_strategy", "sequential", "--dataloader_num_workers", "0", "--seed", "7",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline",
           "HF_HUB_OFFLINE": "1"}
    runs = {
        "zero3_2proc": ["deepspeed", "--num_gpus", "2", "--master_port", str(_free_port()), __file__,
                        "--worker", str(tmp / "zero3"), *sft_args, "--deepspeed", str(ROOT / "ds_configs/zero3.json"),
                        "--output_dir", str(tmp / "zero3_out")],
        "single": [sys.executable, __file__, "--worker", str(tmp / "single"), *sft_args,
                   "--output_dir", str(tmp / "single_out")],
    }
    results = {}
    for name, cmd in runs.items():
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
            raise SystemExit(f"{name} failed (exit {proc.returncode})")
        results[name] = _summary(tmp / ("zero3" if name == "zero3_2proc" else "single"))
        r = results[name]
        print(f"{name:>12}: {r['processes']} process(es), median step {r['median_step_s']:.2f} s, peak RSS/process "
              f"{r['peak_rss_mb']:.0f} MB (growth during training {r['rss_growth_mb']:.0f} MB)", flush=True)
    z, s = results["zero3_2proc"], results["single"]
    ratios = {"step_time_ratio": z["median_step_s"] / s["median_step_s"],
              "peak_rss_ratio": z["peak_rss_mb"] / s["peak_rss_mb"],
              "rss_growth_ratio": z["rss_growth_mb"] / s["rss_growth_mb"]}
    print(f"ZeRO-3 (2 processes) / 1 process without DeepSpeed, per process: step time {ratios['step_time_ratio']:.2f}x, "
          f"peak RSS {ratios['peak_rss_ratio']:.2f}x, RSS growth while training {ratios['rss_growth_ratio']:.2f}x")
    result = {"model": "SmolLM2-135M-Instruct", "group_size": args.group_size, "steps": args.steps,
              "train_top_layers": args.train_top_layers, "threads_per_process": 1,
              **{f"{k}_{name}": round(v, 3) for name, r in results.items() for k, v in r.items()},
              **{k: round(v, 3) for k, v in ratios.items()}}
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
