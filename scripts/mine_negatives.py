#!/usr/bin/env python
"""Build SFT ranking groups with hard negatives; the same as ``tsarank data groups``.

Examples:
    python scripts/mine_negatives.py --corpus ../shared/data/beir/nfcorpus --qrels train \\
        --out nfcorpus.train.groups.jsonl --negatives 47 --depth-start 10 --depth-end 100 --max-queries 300
    python scripts/mine_negatives.py --corpus collection.tsv --queries topics.tsv --qrels qrels.txt \\
        --run bm25.trec --out groups.jsonl

Run with --help for every option (see tsarank/data/mining.py for the exact sampling rules).
"""

from __future__ import annotations

import argparse
import sys

from tsarank.commands.groups import add_groups_arguments, run_groups


def main(argv: list[str] | None = None) -> int:
    parser = add_groups_arguments(argparse.ArgumentParser(prog="mine_negatives.py"))
    return run_groups(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
