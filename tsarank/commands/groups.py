"""``tsarank data groups``: SFT ranking groups with hard negatives, from the command line (the mining itself is
:mod:`tsarank.data.mining`)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..atomic import check_output_file
from ..data.formats import read_corpus, read_qrels, read_queries, read_run
from ..data.mining import DEFAULT_NEGATIVES, _check_window, groups_from_run, mine_bm25_groups, write_groups
from ..errors import DataError

DESCRIPTION = """\
Build SFT ranking groups (JSONL: query, positive_passages, negative_passages) with hard negatives.

Negatives are drawn from ranks --depth-start..--depth-end (1-based, inclusive, counted in the first-stage
ranking as retrieved, positives included) after removing every document judged relevant (grade > 0) and
documents missing from the corpus. Without --run, the first stage is BM25 (bm25s) over --corpus for the
judged queries of --qrels; with --run, it is that TREC run. Draws are seeded per query.

examples:
  tsarank data groups --corpus data/beir/nfcorpus --qrels train --out nfcorpus.train.groups.jsonl \\
      --negatives 47 --depth-start 10 --depth-end 100 --max-queries 300 --seed 0
  tsarank data groups --corpus collection.tsv --queries train.topics.tsv --qrels train.qrels \\
      --run train.bm25.trec --out groups.jsonl --depth-start 1 --depth-end 200
"""


def _negatives_arg(text: str) -> int | None:
    if text.lower() == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {value}")
    return value


def add_groups_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of ``tsarank data groups`` to ``parser`` (the caller sets ``func``).

    Args:
        parser: A fresh (sub)parser.

    Returns:
        The same parser.
    """
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    if not parser.description:
        parser.description = DESCRIPTION
    parser.add_argument("--corpus", metavar="DIR_OR_FILE", help="BEIR dataset directory, corpus.jsonl, TSV 'docid<TAB>text', or irds:ID")
    parser.add_argument("--dataset", metavar="ID", help="an ir_datasets id (e.g. beir/nfcorpus/train): its documents, queries "
                        "and qrels instead of --corpus/--queries/--qrels (pip install 'tsarank[irds]')")
    parser.add_argument("--queries", metavar="FILE", help="queries.jsonl or TSV 'qid<TAB>text' (default with a BEIR directory: DIR/queries.jsonl)")
    parser.add_argument("--qrels", metavar="QRELS_OR_SPLIT", help="qrels file (TREC or BEIR tsv), or a split name of the BEIR directory (e.g. train)")
    parser.add_argument("--run", metavar="FILE", help="TREC run to take negatives from; without it, BM25 over --corpus")
    parser.add_argument("--out", required=True, help="output group JSONL (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--negatives", type=_negatives_arg, default=DEFAULT_NEGATIVES, metavar="N|all", help=f"negatives per query (default {DEFAULT_NEGATIVES}; 'all' = the whole window)")
    parser.add_argument("--depth-start", type=int, default=10, help="first rank of the negative window, 1-based inclusive (default 10: skip likely false negatives)")
    parser.add_argument("--depth-end", type=int, default=100, help="last rank of the window, inclusive (default 100; also the BM25 depth)")
    parser.add_argument("--max-queries", type=int, default=None, help="keep a seeded random subset of this many queries (default all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the query subset and the negative draws (default 0)")
    parser.add_argument("--max-positives", type=int, default=None, help="keep at most N positives per group (seeded draw; default all). NFCorpus has ~40 per query")
    parser.add_argument("--min-grade", type=int, default=1, help="positives are judged documents with grade >= this (default 1; use 2 for TREC DL)")
    from tsarank.retrieval import add_bm25_arguments

    bm25 = parser.add_argument_group("BM25 (without --run)")
    add_bm25_arguments(bm25)
    return parser


def _resolve_qrels(spec: str, corpus: Path) -> Path:
    path = Path(spec)
    if path.exists() or not corpus.is_dir():
        return path
    from tsarank.retrieval import qrels_split_path

    try:
        return qrels_split_path(corpus, spec)
    except ValueError as exc:
        raise ValueError(f"--qrels {spec}: neither a file nor a split ({exc})") from None


def run_groups(args: argparse.Namespace) -> int:
    """Execute ``tsarank data groups``; returns the process exit code (0 ok, 2 bad input)."""
    from tsarank.commands import run_locked

    return run_locked(_run_groups, args, args.out, "tsarank data groups")


def _run_groups(args: argparse.Namespace) -> int:
    from tsarank.retrieval import bm25_options, queries_source

    from ..data.irds import apply_dataset

    out = Path(args.out)
    try:
        apply_dataset(args, ("corpus", "queries", "qrels"))
        if not args.corpus or not args.qrels:
            raise ValueError("give --corpus and --qrels (files, a BEIR directory and split, or irds:ID) or --dataset ID")
    except (DataError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    corpus_path = Path(args.corpus)
    try:
        _check_window(args.depth_start, args.depth_end, args.negatives)
        if args.max_queries is not None and args.max_queries < 1:
            raise ValueError(f"--max-queries must be >= 1, got {args.max_queries}")
        if args.max_positives is not None and args.max_positives < 1:
            raise ValueError(f"--max-positives must be >= 1, got {args.max_positives}")
        if args.min_grade < 1:
            raise ValueError(f"--min-grade must be >= 1 (grade 0 means judged non-relevant), got {args.min_grade}")
        check_output_file(out, args.overwrite)
        bm25 = bm25_options(args) if args.run is None else {}  # --stemmer, --k1, --b: checked before any reading
        queries_path = queries_source(corpus_path, args.queries)
        qrels_path = _resolve_qrels(args.qrels, corpus_path)

        t0 = time.perf_counter()
        # Read (and so validate) every input before the retrieval work.
        qrels = read_qrels(qrels_path)
        run = read_run(args.run) if args.run else None
        queries = read_queries(queries_path)
        corpus = read_corpus(corpus_path)
        print(
            f"read {len(corpus):,} documents, {len(queries):,} queries, judgments for {len(qrels):,} queries"
            + (f", a run of {len(run):,} queries" if run is not None else "") + f" in {time.perf_counter() - t0:.1f} s",
            file=sys.stderr,
        )
        common = dict(
            negatives=args.negatives, depth_start=args.depth_start, depth_end=args.depth_end,
            max_queries=args.max_queries, seed=args.seed, min_grade=args.min_grade,
            max_positives=args.max_positives,
        )
        if run is None:
            groups, stats = mine_bm25_groups(
                corpus, queries, qrels, **bm25, **common)
        else:
            groups, stats = groups_from_run(run, corpus, queries, qrels, **common)
    except (DataError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    if stats.no_text:
        print(f"warning: {stats.no_text:,} judged queries have no text in {queries_path} (e.g. {stats.examples['no_text'][:3]})", file=sys.stderr)
    if run is not None and stats.examples.get("run_without_qrels"):
        print(f"note: run queries without judgments in {qrels_path} are skipped (e.g. {stats.examples['run_without_qrels'][:3]})", file=sys.stderr)
    if not groups:
        print(f"error: no group could be built.\n{stats.summary()}\nFix: check that --qrels, --queries and --corpus "
              f"belong together, and widen --depth-start/--depth-end.", file=sys.stderr)
        return 2
    try:
        write_groups(out, groups, overwrite=args.overwrite)
    except OSError as exc:
        print(f"error: could not write {out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(stats.summary(), file=sys.stderr)
    print(f"wrote {len(groups):,} groups to {out}")
    return 0
