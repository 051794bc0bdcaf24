"""``tsarank data``: build training data. ``weak-pairs`` for stage 1 (CPT); ``groups`` for stage 2 (SFT)."""

from __future__ import annotations

import argparse
import sys

WEAK_PAIRS_DESCRIPTION = """\
Build (text, query) pairs for continual pre-training (stage 1):
  * (title -> body) pairs from BEIR-format corpora (--corpus DIR_OR_FILE, repeatable);
  * (query -> positive passage) pairs from ranking-group files (--groups FILE ...).
Pairs are filtered by length, deduplicated, split into train/validation by a
seeded hash of the text, and written atomically to OUT/train.jsonl,
OUT/validation.jsonl and OUT/stats.json.

--exclude-qrels FILE ... keeps evaluation data out of training: every query id
and document id judged in those qrels is dropped. When a qrels file sits in a
BEIR directory (DIR/qrels/test.tsv with DIR/queries.jsonl, DIR/corpus.jsonl),
the judged queries' texts and documents' texts are excluded too (compared
lower-cased with collapsed whitespace), catching the same text under another id.

example:
  tsarank data weak-pairs --corpus data/beir/scifact --corpus data/beir/nfcorpus \\
      --exclude-qrels data/beir/scifact/qrels/test.tsv data/beir/nfcorpus/qrels/test.tsv --out wp/
"""


def add_weak_pairs_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``tsarank data weak-pairs`` (also used by ``scripts/build_weak_pairs.py``)."""
    p.add_argument("--corpus", action="append", default=[], metavar="DIR_OR_FILE",
                   help="BEIR corpus.jsonl or its directory; title -> body pairs (repeatable)")
    p.add_argument("--groups", nargs="+", action="extend", default=[], metavar="FILE",
                   help="ranking-group JSONL files; query -> positive passage pairs")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (must be empty unless --overwrite)")
    p.add_argument("--exclude-qrels", nargs="+", action="extend", default=[], metavar="FILE",
                   help="qrels whose query and document ids (and, in a BEIR directory, texts) are excluded")
    p.add_argument("--min-chars", type=int, default=20, help="minimum characters of the text (default 20)")
    p.add_argument("--min-text-tokens", type=int, default=0,
                   help="minimum whitespace-separated words of the text (default 0 = off)")
    p.add_argument("--min-query-chars", type=int, default=3, help="minimum characters of the query (default 3)")
    p.add_argument("--max-pairs", type=int, default=None, help="keep a seeded random sample of N pairs (default all)")
    p.add_argument("--val-fraction", type=float, default=0.02, help="share of pairs held out for validation (default 0.02)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and of --max-pairs sampling (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty --out")
    return p


def run_weak_pairs(args: argparse.Namespace) -> int:
    """Execute ``tsarank data weak-pairs``; exit code 0 ok, 2 bad input."""
    from . import run_locked

    return run_locked(_run_weak_pairs, args, args.out, "tsarank data weak-pairs")


def _run_weak_pairs(args: argparse.Namespace) -> int:
    from ..data.weak_pairs import build_weak_pairs
    from ..errors import DataError

    try:
        stats = build_weak_pairs(
            args.out, corpora=args.corpus, groups=args.groups, exclude_qrels=args.exclude_qrels,
            min_chars=args.min_chars, min_text_tokens=args.min_text_tokens, min_query_chars=args.min_query_chars,
            max_pairs=args.max_pairs, val_fraction=args.val_fraction, seed=args.seed, overwrite=args.overwrite,
        )
    except (DataError, ValueError, FileNotFoundError, PermissionError) as e:  # bad input or place: before the work
        print(f"tsarank data weak-pairs: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a place that became read-only: one line; the old files stay as they were
        print(f"tsarank data weak-pairs: error: could not write {args.out}: {e}", file=sys.stderr)
        return 1
    for name, counts in stats["sources"].items():
        drops = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k not in ("read", "kept"))
        print(f"{name}: read {counts.get('read', 0)}, kept {counts.get('kept', 0)}" + (f" (dropped: {drops})" if drops else ""))
    ex = stats["exclusions"]
    if stats["exclusions"]["files"]:
        print(f"excluded: {ex['doc_ids']} doc ids, {ex['query_ids']} query ids, {ex['query_texts']} query texts, "
              f"{ex['doc_texts']} doc texts")
    print(f"wrote {stats['train']} train and {stats['validation']} validation pairs to {args.out}")
    if stats["train"] == 0:
        print("warning: no training pairs were kept; check the filters and sources", file=sys.stderr)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``tsarank data`` and its sub-commands."""
    p = sub.add_parser("data", help="build training data (weak pairs for stage 1, ranking groups for stage 2)",
                       description="Build training data. Run `tsarank data SUBCOMMAND --help` for details.")
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    wp = dsub.add_parser("weak-pairs", help="(title -> text) and (query -> positive) pairs for stage 1 (CPT)",
                         description=WEAK_PAIRS_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_weak_pairs_arguments(wp)
    wp.set_defaults(func=run_weak_pairs)
    from .groups import add_groups_arguments, run_groups

    g = dsub.add_parser("groups", help="ranking groups with hard negatives for stage 2 (SFT)")
    add_groups_arguments(g)
    g.set_defaults(func=run_groups)

    def _usage(args: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=_usage)
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m tsarank.commands.data`` / ``scripts/build_weak_pairs.py`` entry (weak pairs only)."""
    parser = argparse.ArgumentParser(prog="build_weak_pairs", description=WEAK_PAIRS_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_weak_pairs_arguments(parser)
    return run_weak_pairs(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
