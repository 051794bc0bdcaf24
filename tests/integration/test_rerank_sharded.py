"""`tsarank rerank` on several processes (2 CPU processes here, as on 2 GPUs): under torchrun and with --devices,
the merged run is byte-identical to one process's, and --resume works across process counts.

The real default model on real DL19 candidates; 3 chunks of 2 queries, so the two processes get uneven work (2
chunks and 1). Each process uses one thread (as torchrun sets it), so that the comparison is of the sharding, not
of thread counts.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from itertools import product
from pathlib import Path

import pytest

from tsarank.sharding import assign_chunks, chunk_cost, free_port

pytestmark = pytest.mark.integration

OPTIONS = ["--max-queries", "6", "--top-k", "6", "--chunk-docs", "10"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def rerank(*args: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = [*(launcher or [sys.executable]), "-m", "tsarank.cli", "rerank", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=_env())


@pytest.fixture(scope="module")
def reference(shared_data, default_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """One process's run: what every sharded run must reproduce byte for byte."""
    candidates = shared_data / "trec-dl-passage" / "bm25_top100" / "retrieve_results_dl19.json"
    out = tmp_path_factory.mktemp("sharded") / "one.trec"
    proc = rerank("--candidates", str(candidates), *OPTIONS, "--device", "cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return candidates, out


def test_devices_two_processes_byte_identical(reference, tmp_path):
    candidates, one = reference
    out = tmp_path / "two.trec"
    proc = rerank("--candidates", str(candidates), *OPTIONS, "--devices", "cpu,cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == one.read_bytes()
    assert "scoring on 2 processes: 36 documents in 3 chunks" in proc.stderr
    assert "on 2 processes" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two.trec"]  # sidecars, options and lock removed


def test_torchrun_two_processes_byte_identical(reference, tmp_path):
    candidates, one = reference
    out = tmp_path / "torchrun.trec"
    proc = rerank("--candidates", str(candidates), *OPTIONS, "--out", str(out),
                  launcher=[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                            "--master_port", str(free_port())])
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == one.read_bytes()


def test_resume_across_process_counts(reference, tmp_path):
    """An interrupted 2-process run (process 1 finished its chunk; process 0 died inside its first one) resumed by
    2 processes, and the same state resumed by 1 process: both give the uninterrupted bytes."""
    from tsarank.cli import build_parser
    from tsarank.commands.rerank import run_options

    candidates, one = reference
    lines = one.read_text().splitlines(keepends=True)
    qids = list(dict.fromkeys(line.split()[0] for line in lines))
    chunk = lambda k: [l for l in lines if l.split()[0] in qids[2 * k: 2 * k + 2]]  # noqa: E731 - 2 queries each
    for launcher_args in (["--devices", "cpu,cpu"], ["--device", "cpu"]):
        out = tmp_path / f"resumed{len(launcher_args[1])}.trec"
        argv = ["rerank", "--candidates", str(candidates), *OPTIONS, *launcher_args, "--out", str(out)]
        args = build_parser().parse_args(argv)
        Path(f"{out}.partial.json").write_text(json.dumps(run_options(args)))
        Path(f"{out}.partial.1").write_text("".join(chunk(2)) + "".join(chunk(0))[:30])  # chunk 3, then torn
        Path(f"{out}.partial").write_text("".join(chunk(1)[:3]))  # half of chunk 2: rescored
        proc = rerank(*argv[1:], "--resume")
        assert proc.returncode == 0, proc.stderr
        assert "resuming: 2 of 6 queries already in" in proc.stderr
        assert out.read_bytes() == one.read_bytes()
        assert not list(tmp_path.glob(f"{out.name}.partial*"))


def test_one_process_refuses_devices_and_device_together(reference, tmp_path):
    candidates, _ = reference
    proc = rerank("--candidates", str(candidates), "--devices", "cpu,cpu", "--device", "cpu", "--out",
                  str(tmp_path / "x.trec"))
    assert proc.returncode == 2 and "give --device (one process) or --devices" in proc.stderr


# ------------------------------------------------------------------------------ the split itself
def _best_makespan(costs: list[int], world: int) -> int:
    best = None
    for owners in product(range(world), repeat=len(costs)):
        loads = [0] * world
        for c, o in zip(costs, owners):
            loads[o] += c
        best = max(loads) if best is None else min(best, max(loads))
    return best


def test_assign_chunks_covers_everything_once_and_is_near_optimal():
    rng = random.Random(0)
    for _ in range(200):
        world = rng.randint(1, 3)
        costs = [rng.randint(1, 100) for _ in range(rng.randint(0, 7))]
        shares = assign_chunks(costs, world)
        assert len(shares) == world and sorted(i for s in shares for i in s) == list(range(len(costs)))
        assert all(s == sorted(s) for s in shares)
        assert shares == assign_chunks(costs, world)  # every process computes the same split
        if costs:
            makespan = max(sum(costs[i] for i in s) for s in shares)
            # Longest-first greedy is within 4/3 of the best split (Graham's bound), checked by brute force.
            assert makespan <= _best_makespan(costs, world) * (4 / 3 - 1 / (3 * world)) + 1e-9
    with pytest.raises(ValueError):
        assign_chunks([1], 0)


def test_chunk_cost_follows_the_document_budget():
    assert chunk_cost("q" * 8, ["d" * 40, "d" * 10_000], doc_chars=400) == (48 + 408) // 4 + 1
