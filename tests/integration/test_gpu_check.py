"""scripts/gpu_check.sh in its CPU dry-run mode: every step of the GPU check runs (2 CPU processes stand in for 2
GPUs), so the script cannot rot on machines without a GPU; the section it writes keeps the rest of the file."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.distributed]


def test_gpu_check_dry_run_runs_every_step_and_keeps_the_rest_of_the_file(tmp_path, shared_data):
    from tsarank.backend import cpu_bf16_flags

    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nCPU figures above, kept.\n")
    env = {**os.environ, "OUT": str(out), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    result = json.loads(next(line for line in reversed(log.splitlines()) if line.startswith("RESULT "))[7:])
    # 1. The auto choice on this CPU, worked out independently from its flags.
    assert result["environment"]["chosen"] == {"dtype": "torch.bfloat16" if cpu_bf16_flags() else "torch.float32",
                                               "attention": "sdpa"}
    # 2. Three scoring variants, each with a rate and an nDCG@10.
    assert set(result["scoring"]["variants"]) == {"float32+sdpa", "bfloat16+sdpa", "bfloat16+eager"}
    assert all(v["docs_per_s"] > 0 and 0 <= v["ndcg10"] <= 1 for v in result["scoring"]["variants"].values())
    # 3. The SFT step: the row-gathered loss equals the full-logits baseline's and needs less memory.
    assert result["sft_memory"]["loss_abs_diff_all"] <= 1e-4 and result["sft_memory"]["mem_ratio_default"] < 1
    # 4. ZeRO-3 on 1 and 2 processes: no hang, two logged steps each, the same losses.
    z = result["zero3"]
    assert len(z["gpus_1"]["losses"]) == len(z["gpus_2"]["losses"]) == 2 and z["losses_agree"], z
    # 5. Sharded re-ranking: byte-identical to one process.
    assert result["sharded_rerank"]["byte_identical"] and result["ok"]
    text = out.read_text()
    assert text.startswith("# Benchmarks\n") and text.count("CPU figures above, kept.") == 1  # the rest is kept
    assert "<!-- gpu_check:begin -->" in text and "Dry run on the CPU" in text and "Overall: all checks passed" in text
    for row in ("| auto dtype and attention |", "| scoring bfloat16+sdpa", "| SFT step vs full-logits baseline |",
                "| ZeRO-3 SFT on 2 device(s) |", "| ZeRO-3, 1 vs 2 devices |", "| sharded rerank `--devices cpu,cpu`"):
        assert row in text, row
