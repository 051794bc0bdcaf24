"""``tsarank retrieve``: BM25 first stage over a corpus, written as a TREC run."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tsarank.errors import DataError

HELP = "BM25 retrieval (bm25s) over a BEIR or TSV corpus, written as a TREC run"

DESCRIPTION = """\
BM25 (Lucene variant, bm25s + PyStemmer) over the corpus; documents are indexed
as "title text". When --corpus is a BEIR directory, --queries defaults to
DIR/queries.jsonl and --qrels-split SPLIT (or --qrels SPLIT) restricts the
queries to those judged in DIR/qrels/SPLIT.tsv. With qrels, nDCG@10 and
recall of the run are printed.

examples:
  tsarank retrieve --corpus data/beir/scifact --qrels-split test --out scifact.bm25.trec
  tsarank retrieve --corpus collection.tsv --queries topics.tsv --top-k 1000 --out run.trec
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``retrieve`` subcommand."""
    parser = subparsers.add_parser(
        "retrieve", help=HELP, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", metavar="DIR_OR_FILE", help="BEIR dataset directory, corpus.jsonl, TSV 'docid<TAB>text', or irds:ID")
    parser.add_argument("--dataset", metavar="ID", help="an ir_datasets id (e.g. beir/scifact/test): its documents, queries "
                        "and qrels instead of --corpus/--queries/--qrels (pip install 'tsarank[irds]')")
    parser.add_argument("--queries", metavar="FILE", help="queries.jsonl or TSV 'qid<TAB>text' (default with a BEIR directory: DIR/queries.jsonl)")
    parser.add_argument("--qrels", metavar="QRELS_OR_SPLIT", help="qrels file, or a split name of the BEIR directory; only judged queries are retrieved")
    parser.add_argument("--qrels-split", metavar="SPLIT", help="BEIR split (e.g. test): use DIR/qrels/SPLIT.tsv")
    parser.add_argument("--top-k", type=int, default=100, help="results per query (default 100)")
    parser.add_argument("--out", required=True, help="output TREC run (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    from tsarank.retrieval import add_bm25_arguments

    add_bm25_arguments(parser)
    parser.add_argument("--tag", default="bm25", help="run tag (default bm25)")
    parser.set_defaults(func=run)
    return parser


def _resolve_qrels(args: argparse.Namespace, corpus: Path) -> Path | None:
    if args.qrels and args.qrels_split:
        raise ValueError("give --qrels or --qrels-split, not both")
    if args.qrels_split:
        if not corpus.is_dir():
            raise ValueError("--qrels-split needs --corpus to be a BEIR directory (with qrels/SPLIT.tsv); pass --qrels FILE instead")
        name = args.qrels_split
    elif args.qrels:
        if Path(args.qrels).exists() or not corpus.is_dir():
            return Path(args.qrels)
        name = args.qrels
    else:
        return None
    from tsarank.retrieval import qrels_split_path

    return qrels_split_path(corpus, name)


def run(args: argparse.Namespace) -> int:
    """Execute ``tsarank retrieve``; returns the process exit code."""
    from tsarank.commands import run_locked

    return run_locked(_run, args, args.out, "tsarank retrieve")


def _run(args: argparse.Namespace) -> int:
    from tsarank.data.formats import read_corpus, read_qrels, read_queries, write_run
    from tsarank.evaluation import evaluate
    from tsarank.atomic import check_output_file
    from tsarank.retrieval import bm25_options, bm25_retrieve, queries_source

    from tsarank.data.irds import apply_dataset

    out = Path(args.out)
    try:
        apply_dataset(args, ("corpus", "queries", "qrels"))
        if not args.corpus:
            raise ValueError("give --corpus (a BEIR directory, corpus file or irds:ID) or --dataset ID")
    except (DataError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    corpus_path = Path(args.corpus)
    try:
        if args.top_k < 1:
            raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
        if not args.tag or any(ch.isspace() for ch in args.tag):
            raise ValueError(f"--tag must be a non-empty word without whitespace, got {args.tag!r}")
        check_output_file(out, args.overwrite)
        options = bm25_options(args)
        queries_path = queries_source(corpus_path, args.queries)
        qrels_path = _resolve_qrels(args, corpus_path)

        t0 = time.perf_counter()
        corpus = read_corpus(corpus_path)
        queries = read_queries(queries_path)
        qrels = read_qrels(qrels_path) if qrels_path else None
    except (DataError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    if qrels is not None:
        unknown = [q for q in qrels if q not in queries]
        if unknown:
            print(f"warning: {len(unknown)} of {len(qrels)} judged queries have no text in {queries_path} (e.g. {unknown[:3]}); they are skipped", file=sys.stderr)
        queries = {q: text for q, text in queries.items() if q in qrels}
        if not queries:
            print(f"error: none of the queries in {queries_path} is judged in {qrels_path}; are they from the same dataset?", file=sys.stderr)
            return 2
    print(f"read {len(corpus):,} documents and {len(queries):,} queries in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    t1 = time.perf_counter()
    try:
        results = bm25_retrieve(corpus, queries, top_k=args.top_k, **options)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    empty = sum(1 for ranked in results.values() if not ranked)
    try:
        write_run(out, results, tag=args.tag, top_k=args.top_k)
    except OSError as exc:
        print(f"error: could not write {out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"retrieved top-{args.top_k} for {len(results):,} queries in {time.perf_counter() - t1:.1f} s; wrote {out}", file=sys.stderr)
    if empty:
        print(f"warning: {empty} queries matched no document and have no lines in the run", file=sys.stderr)
    if qrels is not None:
        scores = evaluate(results, qrels, ["nDCG@10", f"R@{args.top_k}"])
        print("  ".join(f"{name} {value:.4f}" for name, value in scores.items()))
    return 0
