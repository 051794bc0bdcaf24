#!/usr/bin/env python
"""Render ``BENCHMARKS.md`` from the ``RESULT {json}`` lines of tsarank's benchmark scripts.

``scripts/bench_all.sh`` runs the benchmarks, keeps their logs and calls this script; it can also be run by hand on
saved logs::

    python scripts/write_benchmarks.py \\
        --result score outputs/bench_logs/score.log "python scripts/bench_score.py" \\
        --result cpt   outputs/bench_logs/cpt.log   "python scripts/bench_cpt.py" \\
        --result sft   outputs/bench_logs/sft.log   "python scripts/bench_sft_step.py" \\
        --out BENCHMARKS.md

Each ``--result NAME LOG COMMAND`` names a benchmark (``score``, ``cpt``, ``sft``, ``trunk`` or ``zero3``), the file holding its output
(the last line starting with ``RESULT `` is used) and the exact command that produced it. Every figure is shown
next to its baseline, measured in the same process (the benchmarks' own design), as a ratio; the machine
description (CPU model, cores, RAM, torch version, date) is collected here, so run this on the benchmark machine.

The section is written between ``<!-- bench_all:begin -->`` and ``<!-- bench_all:end -->``: an existing
``BENCHMARKS.md`` keeps everything outside those markers (e.g. a GPU section written by another script). The file is
replaced atomically.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from tsarank.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
TITLE = "# Benchmarks\n"

Row = tuple[str, str, str, str, str]  # figure, tsarank, baseline, ratio, reading


# ------------------------------------------------------------------------------------------------ parsing
def read_result(path: Path) -> dict[str, Any]:
    """The JSON of the last ``RESULT {...}`` line of a benchmark's output.

    Raises:
        ValueError: No such line, or its JSON is invalid (the message names the file and line).
    """
    found: tuple[int, str] | None = None
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if line.startswith("RESULT "):
            found = (number, line[len("RESULT "):])
    if found is None:
        raise ValueError(f"{path}: no 'RESULT {{json}}' line; did the benchmark finish? (see the log)")
    try:
        value = json.loads(found[1])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{found[0]}: RESULT line is not valid JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}:{found[0]}: expected a JSON object after RESULT, got {type(value).__name__}")
    return value


# ------------------------------------------------------------------------------------------------ formatting
def num(value: Any, digits: int = 3) -> str:
    """A number with ``digits`` significant digits, thousands separated; ``-`` when missing."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if value == 0:
        return "0"
    if abs(value) < 1e-3:
        return f"{value:.1e}"
    text = f"{value:.{digits}g}"
    if "e" in text:
        text = f"{value:.0f}"
    if abs(value) >= 1000:
        text = f"{float(text):,.0f}"
    return text


def ratio(value: Any) -> str:
    return "-" if value is None else f"{num(value)}x"


def div(a: Any, b: Any) -> float | None:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or b == 0:
        return None
    return a / b


def table(rows: list[Row]) -> str:
    lines = ["| figure | tsarank | baseline | ratio | reading |", "| --- | ---: | ---: | ---: | --- |"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ sections
def score_section(r: dict[str, Any]) -> tuple[str, list[str], str]:
    """``scripts/bench_score.py``: Ranker.score_pairs vs the paper's eval loop, and vs the bare transformer body."""
    rows: list[Row] = [
        ("scoring throughput, docs/s (wall)", num(r.get("docs_per_s")), num(r.get("baseline_docs_per_s")),
         ratio(r.get("speedup")), "speed-up over the paper's eval loop (higher is better)"),
        ("scoring, CPU time", "", "", ratio(r.get("cpu_speedup")), "CPU-time speed-up over the same baseline"),
        ("scoring vs the transformer body alone, docs/s", num(r.get("docs_per_s")), num(r.get("floor_docs_per_s")),
         ratio(r.get("floor_ratio")), "Ranker time / body-only time (1.0 = no overhead; lower is better)"),
        ("peak RSS growth while scoring, MB", num(r.get("peak_growth_mb")), num(r.get("baseline_peak_growth_mb")),
         ratio(div(r.get("peak_growth_mb"), r.get("baseline_peak_growth_mb"))), "tsarank / baseline (lower is better)"),
        ("peak RSS while scoring, MB", num(r.get("peak_mb")), num(r.get("baseline_peak_mb")),
         ratio(div(r.get("peak_mb"), r.get("baseline_peak_mb"))), "tsarank / baseline, model included"),
        ("max abs score difference", num(r.get("max_abs_diff")), "0", "-", "same scores as the baseline"),
    ]
    if r.get("sweep_docs_per_s"):
        for budget, rate in r["sweep_docs_per_s"].items():
            rows.append((f"docs/s at max_tokens {budget}", num(rate), num(r.get("baseline_docs_per_s")),
                         ratio(div(rate, r.get("baseline_docs_per_s"))), "token-budget sweep (informational)"))
    setup = (f"{r.get('pairs', '?')} (query, passage) pairs from DL19 BM25 candidates, default model, fp32, "
             f"{r.get('threads', '?')} threads, token budget {r.get('max_tokens', '?')}, best of {r.get('repeats', '?')} "
             "interleaved repeats. Baseline: RankingGPT's eval loop (fixed batches of 8 in file order, full "
             "[B, L, V] logits, log_softmax, gather); floor: the transformer body alone over the Ranker's batches.")
    headline = [f"scoring: **{ratio(r.get('speedup'))}** the throughput of the paper's evaluation loop "
                f"({num(r.get('docs_per_s'))} vs {num(r.get('baseline_docs_per_s'))} docs/s), "
                f"{ratio(r.get('floor_ratio'))} the time of the bare transformer body"]
    return table(rows), headline, setup


def cpt_section(r: dict[str, Any]) -> tuple[str, list[str], str]:
    """``scripts/bench_cpt.py``: packed vs padded CPT training steps."""
    rows: list[Row] = [
        ("CPT training tokens/s, packed (row = longest pair)", num(r.get("tokens_per_s_packed")),
         num(r.get("tokens_per_s_padded")), ratio(r.get("speedup_packed_vs_padded")),
         "packed / padded non-padding tokens per second (higher is better)"),
    ]
    for key in sorted(k for k in r if re.fullmatch(r"tokens_per_s_packed\d+", k)):
        mode = key[len("tokens_per_s_"):]
        capacity = mode[len("packed"):]
        rows.append((f"CPT training tokens/s, packed (row capacity {capacity})", num(r[key]),
                     num(r.get("tokens_per_s_padded")), ratio(r.get(f"speedup_{mode}_vs_padded")),
                     "packed / padded (higher is better)"))
    rows.append(("padding share of positions", num(r.get("padding_fraction_packed")),
                 num(r.get("padding_fraction_padded")),
                 ratio(div(r.get("padding_fraction_packed"), r.get("padding_fraction_padded"))),
                 "packed / padded (lower is better)"))
    rows.append(("max abs loss difference", num(r.get("max_loss_diff")), "0", "-", "packing changes layout, not the loss"))
    setup = (f"{r.get('model', 'default model')} on {r.get('device', 'cpu')}, {r.get('threads', '?')} thread(s), "
             f"batches of {r.get('batch_size', '?')} DL19 (query, passage) pairs, {r.get('steps', '?')} timed steps "
             f"per mode (forward + backward), doc budget {r.get('max_doc_tokens', '?')}, attention "
             f"{r.get('attn', '?')}. Baseline: right-padded batches of the same pairs.")
    headline = [f"CPT: packing gives **{ratio(r.get('speedup_packed_vs_padded'))}** the training tokens/s of padded "
                f"batches (padding {num(100 * r['padding_fraction_padded'] if 'padding_fraction_padded' in r else None)}% "
                f"-> {num(100 * r['padding_fraction_packed'] if 'padding_fraction_packed' in r else None)}% of positions)"]
    return table(rows), headline, setup


def sft_section(r: dict[str, Any]) -> tuple[str, list[str], str]:
    """``scripts/bench_sft_step.py``: one SFT step, row-gathered losses vs full logits."""
    peak, step, loss = r.get("peak_mib", {}), r.get("step_s", {}), r.get("loss", {})
    rows: list[Row] = [
        ("SFT step peak transient memory, MiB (dp_span=all)", num(peak.get("all")), num(peak.get("baseline")),
         ratio(r.get("mem_ratio_all")), "tsarank / full logits, same objective (lower is better)"),
        ("SFT step peak transient memory, MiB (defaults)", num(peak.get("default")), num(peak.get("baseline")),
         ratio(r.get("mem_ratio_default")), "tsarank defaults (dp_span=query) / full logits"),
        ("SFT step time, s (dp_span=all)", num(step.get("all")), num(step.get("baseline")),
         ratio(r.get("time_ratio_all")), "tsarank / full logits (lower is better)"),
        ("SFT step time, s (defaults)", num(step.get("default")), num(step.get("baseline")),
         ratio(r.get("time_ratio_default")), "tsarank defaults / full logits"),
        ("reference forward with a shared frozen prefix", "", "", ratio(r.get("shared_prefix_ref_time_ratio")),
         "shared prefix / separate reference model (lower is better)"),
        ("SFT loss (dp_span=all vs full logits)", num(loss.get("all"), 8), num(loss.get("baseline"), 8), "-",
         f"abs difference {num(r.get('loss_abs_diff_all'))}"),
    ]
    setup = (f"One step (forward + backward) of L_rank + L_gen + L_dp on {r.get('device', 'cpu')}: default model, one "
             "query with G = 16 MS MARCO passages, doc budget 128, query budget 32, gradient checkpointing, a separate "
             "frozen reference. Baseline: the released code's formulation, full [B*G, L, V] logits of policy and "
             "reference (padding masked). Memory in a fresh process per variant, time interleaved.")
    headline = [f"SFT step: **{ratio(r.get('mem_ratio_all'))}** the peak transient memory and "
                f"{ratio(r.get('time_ratio_all'))} the time of the full-logits formulation with the same objective "
                f"(loss abs difference {num(r.get('loss_abs_diff_all'))}); with the defaults (L_dp on query tokens) "
                f"{ratio(r.get('mem_ratio_default'))} the memory and {ratio(r.get('time_ratio_default'))} the time"]
    return table(rows), headline, setup


def trunk_section(r: dict[str, Any]) -> tuple[str, list[str], str]:
    """``scripts/bench_shared_trunk.py``: several checkpoints with a shared trunk vs one Ranker pass each."""
    rows: list[Row] = [
        (f"scoring {r.get('models', '?')} checkpoints, time", "", "", ratio(r.get("speedup")),
         f"speed-up of one shared-trunk pass over separate passes (ideal {ratio(r.get('ideal_speedup'))})"),
        ("peak RSS growth while scoring, MB", num(r.get("peak_growth_mb")), num(r.get("separate_peak_growth_mb")),
         ratio(div(r.get("peak_growth_mb"), r.get("separate_peak_growth_mb"))), "shared / separate (lower is better)"),
        ("max abs score difference", num(r.get("max_abs_diff")), "0", "-", "same scores as separate passes"),
    ]
    setup = (f"{r.get('pairs', '?')} DL19 (query, passage) pairs scored by {r.get('models', '?')} checkpoints sharing "
             f"{r.get('shared_blocks', '?')} of {r.get('blocks', '?')} blocks (the default model and copies with the "
             f"top blocks changed, as `train_top_layers` training in both stages leaves them), fp32, best of "
             f"{r.get('repeats', '?')} interleaved repeats. Baseline: `Ranker.score_pairs` once per checkpoint.")
    headline = [f"evaluating {r.get('models', '?')} checkpoints that share {r.get('shared_blocks', '?')} of "
                f"{r.get('blocks', '?')} blocks: **{ratio(r.get('speedup'))}** faster in one shared-trunk pass"]
    return table(rows), headline, setup


def zero3_section(r: dict[str, Any]) -> tuple[str, list[str], str]:
    """``scripts/bench_zero3_step.py``: an SFT step under ZeRO-3 on 2 processes vs 1 process without DeepSpeed."""
    z, s = "zero3_2proc", "single"
    groups_per_s = div(2 / r[f"median_step_s_{z}"], 1 / r[f"median_step_s_{s}"]) if r.get(f"median_step_s_{z}") else None
    rows: list[Row] = [
        ("step time per process, s", num(r.get(f"median_step_s_{z}")), num(r.get(f"median_step_s_{s}")),
         ratio(r.get("step_time_ratio")), "ZeRO-3 process / single process, one group each (lower is better)"),
        ("groups trained per second, all processes", "", "", ratio(groups_per_s),
         "2 ZeRO-3 processes / 1 process (higher is better)"),
        ("peak RSS per process, MB", num(r.get(f"peak_rss_mb_{z}")), num(r.get(f"peak_rss_mb_{s}")),
         ratio(r.get("peak_rss_ratio")), "ZeRO-3 / single (lower is better)"),
        ("RSS growth while training, MB", num(r.get(f"rss_growth_mb_{z}")), num(r.get(f"rss_growth_mb_{s}")),
         ratio(r.get("rss_growth_ratio")), "above the level after loading (weights, gradients, Adam, activations)"),
        ("RSS after loading, MB", num(r.get(f"rss_at_train_start_mb_{z}")), num(r.get(f"rss_at_train_start_mb_{s}")),
         ratio(div(r.get(f"rss_at_train_start_mb_{z}"), r.get(f"rss_at_train_start_mb_{s}"))),
         "policy + sharded reference + DeepSpeed runtime vs policy + reference"),
    ]
    setup = (f"One SFT step (L_rank + L_gen + L_dp, separate frozen reference) of the default model, blocks trained: "
             f"{'all' if not r.get('train_top_layers') else 'top ' + str(r['train_top_layers'])}, fp32 AdamW, one group of "
             f"G = {r.get('group_size', '?')} MS MARCO passages per process and step, {r.get('threads_per_process', 1)} "
             f"thread per process, median of {r.get('steps', '?')} - 1 steps (the first is warm-up). tsarank: DeepSpeed "
             "ZeRO-3 on 2 CPU processes (gloo), query lengths differing per rank. Baseline: 1 process, no DeepSpeed.")
    headline = [f"ZeRO-3 SFT step on 2 CPU processes: {ratio(r.get('step_time_ratio'))} the step time and "
                f"{ratio(r.get('peak_rss_ratio'))} the peak memory of one process without DeepSpeed, per process "
                f"({ratio(groups_per_s)} the groups per second of all processes)"]
    return table(rows), headline, setup


def bf16_section(r: dict[str, Any]) -> tuple[str, list[str], str]:
    """``scripts/bench_cpu_bf16.py``: bf16 weights (scoring) and bf16 autocast (training) against fp32 on this CPU."""
    rows: list[Row] = [
        ("scoring throughput, docs/s", num(r.get("docs_per_s_bf16")), num(r.get("docs_per_s_fp32")),
         ratio(r.get("score_speedup")), "bf16 / fp32 (higher is better)"),
        ("DL19 nDCG@10 of the re-ranked run", num(r.get("ndcg10_bf16"), 4), num(r.get("ndcg10_fp32"), 4),
         f"{r.get('ndcg_delta', 0):+.4f}", "bf16 - fp32 (dtype auto picks bf16 only when within 0.005)"),
        ("SFT step, s (quick config)", num(r.get("s_per_step_bf16")), num(r.get("s_per_step_fp32")),
         ratio(r.get("train_speedup")), "fp32 time / bf16-autocast time (higher is better)"),
    ]
    flags = ", ".join(r.get("bf16_flags") or []) or "none"
    setup = (f"CPU: {r.get('cpu', '?')} (model number {r.get('cpu_model_number', '?')}), bf16 instructions: {flags}; "
             f"{r.get('threads', '?')} threads, torch {r.get('torch', '?')}. Scoring: `Ranker.default` re-ranks DL19's BM25 "
             f"top-{r.get('depth', '?')} ({r.get('pairs', '?')} pairs, {r.get('queries', '?')} queries), bf16 weights vs "
             f"fp32 weights. Training: {r.get('train_steps', '?')} steps of `tsarank train sft` with "
             "sft/configs/smollm2_quick.yaml, `--bf16 true` (CPU autocast, fp32 master weights) vs `--bf16 false`, "
             "median step after the first.")
    headline = [f"bf16 on this CPU ({flags}): scoring **{ratio(r.get('score_speedup'))}** the docs/s of fp32 at DL19 "
                f"nDCG@10 {num(r.get('ndcg10_bf16'), 4)} vs {num(r.get('ndcg10_fp32'), 4)}; an SFT step "
                f"{ratio(r.get('train_speedup'))} faster under bf16 autocast"]
    return table(rows), headline, setup


def processes_section(r: dict[str, Any]) -> tuple[str, list[str], str]:
    """``scripts/bench_score.py --processes N``: N scoring processes x 1 thread vs 1 process with 1 and N threads."""
    w = r.get("world", 2)
    one, threads, procs = r.get("docs_per_s_1x1"), r.get(f"docs_per_s_1x{w}"), r.get(f"docs_per_s_{w}x1")
    rows: list[Row] = [
        (f"{w} processes x 1 thread, docs/s", num(procs), num(one), ratio(r.get("process_speedup_over_1x1")),
         "vs 1 process x 1 thread (higher is better)"),
        (f"{w} processes x 1 thread, docs/s", num(procs), num(threads), ratio(r.get("process_speedup_over_threads")),
         f"vs 1 process x {w} threads (higher is better)"),
        (f"1 process x {w} threads, docs/s", num(threads), num(one), ratio(div(threads, one)),
         "what threads alone give"),
        ("max abs score difference", num(r.get("process_max_abs_diff")), "0", "-", "sharded scores vs one process"),
    ]
    setup = (f"{r.get('process_pairs', '?')} DL19 (query, passage) pairs, default model, fp32; each setup in fresh "
             "processes timed from a barrier all reach with the model loaded; the queries split by estimated tokens "
             "(longest first), as `tsarank rerank --devices` splits them.")
    headline = [f"scoring on {w} processes x 1 thread: {ratio(r.get('process_speedup_over_1x1'))} one process x 1 thread, "
                f"{ratio(r.get('process_speedup_over_threads'))} one process x {w} threads"]
    return table(rows), headline, setup


SECTIONS: dict[str, tuple[str, str, Callable[[dict[str, Any]], tuple[str, list[str], str]]]] = {
    "bf16": ("bf16 against fp32 on this CPU", "scripts/bench_cpu_bf16.py", bf16_section),
    "processes": ("Scoring on several processes", "scripts/bench_score.py --processes 2", processes_section),
    "score": ("Scoring (inference)", "scripts/bench_score.py", score_section),
    "cpt": ("Stage 1 (CPT) training throughput", "scripts/bench_cpt.py", cpt_section),
    "sft": ("Stage 2 (SFT) step: memory and time", "scripts/bench_sft_step.py", sft_section),
    "trunk": ("Evaluating checkpoints that share frozen blocks", "scripts/bench_shared_trunk.py", trunk_section),
    "zero3": ("Stage 2 (SFT) step under DeepSpeed ZeRO-3, 2 processes", "scripts/bench_zero3_step.py", zero3_section),
}


# ------------------------------------------------------------------------------------------------ machine
def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=ROOT).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> dict[str, str]:
    """CPU model (lscpu), cores, RAM, GPU, library versions and the git commit."""
    lscpu = dict(
        (k.strip(), v.strip()) for k, v in (line.split(":", 1) for line in _run(["lscpu"]).splitlines() if ":" in line)
    )
    cpu = lscpu.get("Model name") or platform.processor() or platform.machine()
    cores = lscpu.get("Core(s) per socket")
    sockets = lscpu.get("Socket(s)")
    threads = lscpu.get("Thread(s) per core")
    logical = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    core_text = f"{logical} logical CPUs"
    if cores and sockets:
        core_text = f"{int(cores) * int(sockets)} cores x {threads or 1} thread(s) = {logical} logical CPUs"
    if usable != logical:
        core_text += f" ({usable} usable by this process)"
    ram = "?"
    try:
        kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal:"))
        ram = f"{kb / 2**20:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    info = {"CPU": cpu + (f" ({lscpu['Hypervisor vendor']} VM)" if lscpu.get("Hypervisor vendor") else ""),
            "cores": core_text, "RAM": ram, "OS": f"{platform.system()} {platform.release()}",
            "Python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["GPU"] = (", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
                       if torch.cuda.is_available() else "none (CPU only)")
    except ImportError:
        info["torch"] = "not installed"
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    commit = _run(["git", "rev-parse", "--short", "HEAD"]).strip()
    if commit:
        dirty = bool(_run(["git", "status", "--porcelain", "--untracked-files=no"]).strip())
        info["tsarank commit"] = commit + (" (with uncommitted changes)" if dirty else "")
    return info


# ------------------------------------------------------------------------------------------------ document
def markers(block: str) -> tuple[str, str]:
    return f"<!-- {block}:begin -->", f"<!-- {block}:end -->"


def render(results: list[tuple[str, dict[str, Any], str]], info: dict[str, str], started: str | None,
           finished: str | None, loadavg: str | None, block: str = "bench_all",
           heading: str = "CPU benchmarks (`scripts/bench_all.sh`)") -> str:
    """The markdown block (between the markers) for the given ``(name, result, command)`` triples."""
    when = finished or dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    begin, end = markers(block)
    rerun = ("bash scripts/bench_all.sh" if block == "bench_all" else
             f'ONLY="{" ".join(name for name, _, _ in results)}" BLOCK={block} bash scripts/bench_all.sh')
    out = [begin, "", f"## {heading}", "",
           f"Measured {when}" + (f" (started {started})" if started and started != when else "") + ". Every figure is "
           "compared with a baseline measured in the same process on the same inputs; ratios are tsarank / baseline "
           f"unless the row says otherwise. Re-run with `{rerun}`.", ""]
    headlines: list[str] = []
    bodies: list[str] = []
    for name, result, command in results:
        title, _script, section = SECTIONS[name]
        body, headline, setup = section(result)
        headlines += headline
        bodies += [f"### {title}", "", setup, "", body, "", f"Command: `{command}`", "",
                   "<details><summary>raw RESULT line</summary>", "", "```", "RESULT " + json.dumps(result), "```", "",
                   "</details>", ""]
    out += ["**Headline ratios**", ""] + [f"- {h}" for h in headlines] + [""]
    out += ["### Machine", "", "| | |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in info.items()]
    if loadavg:
        out.append(f"| load average at start | {loadavg} (the machine may be shared; see the ratios, not the absolutes) |")
    out += [""] + bodies + [end]
    return "\n".join(out) + "\n"


def merge(existing: str | None, block: str, name: str = "bench_all") -> str:
    """Put ``block`` into ``existing``: replace the old block of that name, else insert it after the title."""
    begin, end = markers(name)
    if not existing:
        return TITLE + "\n" + block
    if begin in existing and end in existing:
        head, rest = existing.split(begin, 1)
        _, tail = rest.split(end, 1)
        return head + block.rstrip("\n") + tail if tail.strip() else head + block
    if existing.startswith("# "):
        title, _, body = existing.partition("\n")
        return f"{title}\n\n{block}\n{body.lstrip()}" if body.strip() else f"{title}\n\n{block}"
    return TITLE + "\n" + block + "\n" + existing


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--result", nargs=3, action="append", required=True, metavar=("NAME", "LOG", "COMMAND"),
                    help=f"benchmark name ({', '.join(SECTIONS)}), its output file, the command that produced it")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="file to write (default: BENCHMARKS.md)")
    ap.add_argument("--started", help="start time of the benchmark run (shown in the file)")
    ap.add_argument("--finished", help="end time of the benchmark run (default: now)")
    ap.add_argument("--loadavg", help="load average when the run started")
    ap.add_argument("--stdout", action="store_true", help="print the block instead of writing --out")
    ap.add_argument("--block", default="bench_all",
                    help="name of the marked block to write (default bench_all; other blocks are kept)")
    ap.add_argument("--heading", default=None, help="the block's heading (default: bench_all's)")
    args = ap.parse_args(argv)

    results = []
    try:
        for name, log, command in args.result:
            if name not in SECTIONS:
                raise ValueError(f"--result {name}: unknown benchmark; expected one of {', '.join(SECTIONS)}")
            results.append((name, read_result(Path(log)), command))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}; {args.out} left unchanged", file=sys.stderr)
        return 2
    block = render(results, machine(), args.started, args.finished, args.loadavg, args.block,
                   args.heading or "CPU benchmarks (`scripts/bench_all.sh`)")
    if args.stdout:
        sys.stdout.write(block)
        return 0
    out = Path(args.out)
    existing = out.read_text(encoding="utf-8") if out.is_file() else None
    atomic_write_text(out, merge(existing, block, args.block))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
