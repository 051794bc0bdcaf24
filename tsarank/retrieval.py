"""BM25 first-stage retrieval with bm25s (Lucene BM25 variant) and PyStemmer.

Documents are indexed as :attr:`tsarank.data.formats.Doc.full_text` (title and
text joined by a space). Tokenisation is bm25s's: lower-cased, tokens of two or
more word characters, optional stop-word removal and Snowball stemming.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tsarank.data.formats import Doc, trec_order

__all__ = ["add_bm25_arguments", "bm25_options", "bm25_retrieve", "qrels_split_path"]


def add_bm25_arguments(group: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Add ``--k1 --b --stemmer --stopwords`` (Pyserini's defaults) to a CLI parser or argument group."""
    group.add_argument("--k1", type=float, default=0.9, help="BM25 k1 (default 0.9, as Pyserini)")
    group.add_argument("--b", type=float, default=0.4, help="BM25 b (default 0.4, as Pyserini)")
    group.add_argument("--stemmer", default="english", help="PyStemmer algorithm, or 'none' (default english)")
    group.add_argument("--stopwords", default="en", help="bm25s stop-word list, or 'none' (default en)")


def bm25_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :func:`bm25_retrieve` from options added by :func:`add_bm25_arguments`."""
    options = {
        "k1": args.k1, "b": args.b,
        "stemmer": None if args.stemmer.lower() == "none" else args.stemmer,
        "stopwords": None if args.stopwords.lower() == "none" else args.stopwords,
    }
    _stemmer(options["stemmer"])  # an unknown stemmer fails here, before any corpus is read
    if options["stopwords"] is not None:  # and an unknown stop-word list, in bm25s's own terms
        from bm25s.tokenization import _infer_stopwords

        try:
            _infer_stopwords(options["stopwords"])
        except Exception:  # noqa: BLE001 - bm25s raises a bare ValueError/KeyError depending on version
            raise ValueError(f"--stopwords {args.stopwords!r}: not a bm25s stop-word list (e.g. en, de, fr, es, "
                             "or none)") from None
    if not (args.k1 > 0 and math.isfinite(args.k1)) or not 0 <= args.b <= 1:  # inf scored every document 0
        raise ValueError(f"--k1 must be a finite number > 0 and --b within [0, 1], got {args.k1} and {args.b}")
    return options


def queries_source(corpus: Path, queries: str | None) -> Path:
    """The queries file of a command: ``--queries`` when given, else the BEIR directory ``--corpus`` itself (its
    ``queries.jsonl``).

    Raises:
        ValueError: Neither (``--corpus`` is a file and no ``--queries``).
    """
    if queries:
        return Path(queries)
    if Path(corpus).is_dir():
        return Path(corpus)
    raise ValueError("--queries is required when --corpus is a file (it defaults to DIR/queries.jsonl only for a BEIR "
                     "directory)")


def qrels_split_path(corpus_dir: Path, split: str) -> Path:
    """``DIR/qrels/SPLIT.tsv`` of a BEIR directory; a missing split is an error listing the splits found."""
    path = corpus_dir / "qrels" / f"{split}.tsv"
    if not path.is_file():
        found = sorted(p.stem for p in (corpus_dir / "qrels").glob("*.tsv")) if (corpus_dir / "qrels").is_dir() else []
        raise ValueError(f"no qrels split {split!r} in {corpus_dir}: {path} does not exist "
                         f"(splits found: {', '.join(found) or 'none'})")
    return path


def _stemmer(name: str | None):
    if not name:
        return None
    import Stemmer

    try:
        return Stemmer.Stemmer(name)
    except KeyError:
        raise ValueError(
            f"unknown stemmer {name!r}; use one of {sorted(Stemmer.algorithms())} or None for no stemming"
        ) from None


def bm25_retrieve(
    corpus: Mapping[str, Doc],
    queries: Mapping[str, str],
    top_k: int = 100,
    stemmer: str | None = "english",
    stopwords: str | list[str] | None = "en",
    k1: float = 0.9,
    b: float = 0.4,
    exclude: Mapping[str, set[str]] | None = None,
) -> dict[str, list[tuple[str, float]]]:
    """Retrieve the BM25 top-k documents of every query.

    Scoring is bm25s's ``method="lucene"``: ``sum over query tokens t of
    idf(t) * tf / (tf + k1 * (1 - b + b * dl / avgdl))`` with
    ``idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5))`` (a token repeated in the
    query counts each time). Defaults k1=0.9, b=0.4 are Pyserini's.

    Only documents that match at least one query token are returned (BM25
    score > 0), so a query may get fewer than ``top_k`` results. Ties in score
    are broken by docid ascending, so results are deterministic.

    Args:
        corpus: ``{docid: Doc}``.
        queries: ``{qid: text}``.
        top_k: Results per query.
        stemmer: PyStemmer algorithm name (``"english"``...) or ``None``.
        stopwords: bm25s stop-word list name (``"en"``), a list of words, or ``None``.
        k1: BM25 k1.
        b: BM25 b.
        exclude: ``{qid: docids}`` never returned for that query (e.g. the
            positives when mining hard negatives); ``top_k`` results are still
            returned when enough other documents match.

    Returns:
        ``{qid: [(docid, score), ...]}`` best first, queries in input order.

    Raises:
        ValueError: Empty corpus, ``top_k < 1`` or an unknown stemmer.
    """
    import logging

    import bm25s

    # bm25s sets its own logger to DEBUG, so any root handler (our CLIs configure one) printed its internals.
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if not corpus:
        raise ValueError("the corpus is empty; nothing to retrieve from")
    if not queries:
        return {}
    stem = _stemmer(stemmer)
    stop = stopwords if stopwords else None
    docids = list(corpus)
    texts = [doc.full_text for doc in corpus.values()]

    corpus_tokens = bm25s.tokenize(texts, stopwords=stop, stemmer=stem, show_progress=False)
    retriever = bm25s.BM25(k1=k1, b=b, method="lucene")
    retriever.index(corpus_tokens, show_progress=False)

    qids = list(queries)
    query_tokens = bm25s.tokenize([queries[q] for q in qids], stopwords=stop, stemmer=stem, return_ids=False, show_progress=False)
    vocab = retriever.vocab_dict
    n_docs = len(docids)
    docid_arr = np.asarray(docids, dtype=object)

    results: dict[str, list[tuple[str, float]]] = {}
    for qid, tokens in zip(qids, query_tokens):
        token_ids = [vocab[t] for t in tokens if t in vocab]
        if not token_ids:
            results[qid] = []
            continue
        scores = retriever.get_scores_from_ids(token_ids)
        excluded = exclude.get(qid, ()) if exclude else ()
        want = min(n_docs, top_k + len(excluded))
        # Threshold at the want-th best score, then keep every document at or
        # above it, so that ties at the cut are resolved by docid (as trec_eval
        # orders them), not by chance.
        kth = np.partition(scores, n_docs - want)[n_docs - want]
        keep = np.nonzero((scores >= kth) & (scores > 0))[0]
        ranked = trec_order(zip(docid_arr[keep].tolist(), scores[keep].tolist()))
        if excluded:
            ranked = [item for item in ranked if item[0] not in excluded]
        results[qid] = [(d, float(s)) for d, s in ranked[:top_k]]
    return results
