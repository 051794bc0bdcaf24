"""``tsarank demo``: both stages on the embedded default model and real data, with a report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole two-stage pipeline (weak pairs, CPT, groups, SFT, evaluation, report) on real data",
        description="Builds weak pairs, runs CPT, mines SFT groups, runs SFT, and evaluates BM25 / zero-shot / "
        "M_cpt / M_sft on DL19, SciFact and NFCorpus. Writes report.md, report.json and report.png to --out.",
    )
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--preset", choices=["quick", "full"], default="quick",
                   help="quick: 6 to 15 min measured on 2 CPU cores, reduced depth/queries; full: for a GPU")
    p.add_argument("--scoring-head", choices=["query_likelihood", "last_token"], default="query_likelihood",
                   help="the head SFT trains: query_likelihood (the paper's) or last_token (a linear score on the "
                   "final token, sft/configs/last_token.yaml)")
    p.add_argument("--data", default=None, help="data folder (default: $TSARANK_DATA, else ../shared/data)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo, skipping finished phases")
    p.add_argument("--overwrite", action="store_true", help="delete a previous demo output in --out and start over")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``tsarank demo`` under the output lock of ``--out`` (a second demo into it stops at once)."""
    from . import run_locked

    return run_locked(_run, args, str(Path(args.out).resolve()), "tsarank demo")


def _run(args: argparse.Namespace) -> int:
    import dataclasses

    from ..demo import PRESETS, Demo, for_this_machine, prepare_out_dir, resolve_data_dir

    try:
        data = resolve_data_dir(args.data)  # fail before touching the output directory
        out = Path(args.out).resolve()
        prepare_out_dir(out, resume=args.resume, overwrite=args.overwrite)
    except OSError as exc:  # no data; a non-empty, unwritable or file --out
        print(f"error: {exc}", file=sys.stderr)
        return 2
    preset = dataclasses.replace(for_this_machine(PRESETS[args.preset]), sft_scoring_head=args.scoring_head)
    try:
        Demo(out, preset, data).run()
    except ValueError as exc:  # a resumed demo with other settings
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: the finished phases are kept in {out}; run the same command with --resume to "
              "continue from the next one", file=sys.stderr)
        return 130
    return 0
