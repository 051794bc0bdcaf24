"""The benchmark report writer: blocks of BENCHMARKS.md replaced one at a time, ratios from the RESULT lines."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import write_benchmarks as wb  # noqa: E402


def test_blocks_are_replaced_one_at_a_time():
    one = wb.merge(None, "<!-- bench_all:begin -->\nA1\n<!-- bench_all:end -->\n")
    two = wb.merge(one, "<!-- gpu_check:begin -->\nG1\n<!-- gpu_check:end -->\n", "gpu_check")
    three = wb.merge(two, "<!-- bench_all:begin -->\nA2\n<!-- bench_all:end -->\n")
    four = wb.merge(three, "<!-- gpu_check:begin -->\nG2\n<!-- gpu_check:end -->\n", "gpu_check")
    assert four.startswith("# Benchmarks\n") and "A2" in four and "G2" in four
    assert "A1" not in four and "G1" not in four and four.count("begin -->") == 2


def test_bf16_and_processes_sections_show_the_measured_ratios():
    bf16 = {"cpu": "Xeon", "bf16_flags": ["amx_bf16"], "docs_per_s_fp32": 8.0, "docs_per_s_bf16": 20.0,
            "score_speedup": 2.5, "ndcg10_fp32": 0.5621, "ndcg10_bf16": 0.5622, "ndcg_delta": 0.0001,
            "s_per_step_fp32": 0.8, "s_per_step_bf16": 0.6, "train_speedup": 0.8 / 0.6}
    body, headline, setup = wb.bf16_section(bf16)
    assert "| 2.5x |" in body and "+0.0001" in body and "1.33x" in body and "amx_bf16" in setup
    procs = {"world": 2, "docs_per_s_1x1": 5.0, "docs_per_s_1x2": 8.0, "docs_per_s_2x1": 9.5,
             "process_speedup_over_1x1": 1.9, "process_speedup_over_threads": 9.5 / 8.0, "process_max_abs_diff": 0.0}
    body, headline, _ = wb.processes_section(procs)
    assert "| 1.9x |" in body and "| 1.19x |" in body and "| 1.6x |" in body  # 8.0 / 5.0: threads alone
    block = wb.render([("bf16", bf16, "python scripts/bench_cpu_bf16.py")], {"CPU": "Xeon"}, None, None, None,
                      block="cpu_scaling", heading="bf16 and processes")
    assert block.startswith("<!-- cpu_scaling:begin -->") and "## bf16 and processes" in block
