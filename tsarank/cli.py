"""The ``tsarank`` console script: one sub-command module per verb under ``tsarank/commands/``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__

# Each module exposes add_parser(subparsers) and sets `func` on its parser.
COMMANDS = ("default_model", "rerank", "retrieve", "evaluate", "data", "train", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tsarank", description="Two-stage LLM re-ranking toolkit (TSARankLLM).")
    parser.add_argument("--version", action="version", version=f"tsarank {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    # `deepspeed --module tsarank.cli train ...` (an installed wheel, several GPUs) passes --local_rank=N first; the
    # training code reads LOCAL_RANK from the environment.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"tsarank.commands.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to start the same command again (rerank --devices)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        # Ctrl-C: outputs are written atomically, so nothing half-written is left; `rerank` and `train` catch it
        # themselves to say how to resume. 130 = 128 + SIGINT, as a shell reports it.
        print(f"\ninterrupted: tsarank {args.command} stopped; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
