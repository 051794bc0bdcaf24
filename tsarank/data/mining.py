"""Build SFT ranking groups (docs/design.md, section 3) with hard negatives from a first-stage ranking.

Two sources of the first-stage ranking:

* **BM25** over a BEIR-format corpus (:func:`mine_bm25_groups`): the judged queries of a train qrels file are
  retrieved with :func:`tsarank.retrieval.bm25_retrieve` (bm25s);
* **a TREC run** (:func:`groups_from_run`): any first-stage run you already have, plus its qrels.

Either way, for every query with at least one positive (``grade >= min_grade``):

1. the *window* is ranks ``depth_start..depth_end`` (1-based, both inclusive) of the first-stage ranking **as
   retrieved**, i.e. positives still count as ranks. ``depth_start=10, depth_end=100`` is the "deep sampling"
   of TSARankLLM: the first ranks are skipped because unjudged relevant documents crowd them (false negatives);
2. every document judged relevant for the query (any grade > 0, so grade-1 "related" documents of graded qrels
   are never negatives even when positives need grade 2), and documents missing from the corpus, are removed;
3. ``negatives`` of the remaining documents are drawn without replacement with a per-query RNG seeded by
   ``(seed, query id)``, and kept in rank order. A query's draw therefore does not depend on which other
   queries are in the file or on ``max_queries``. Fewer remaining documents than ``negatives``: all are kept
   (the SFT data loader samples with replacement); none remain: the query is skipped and counted.

The output is the group JSONL that :func:`tsarank.data.formats.read_groups` reads::

    {"query_id", "query", "positive_passages": [{"docid", "title", "text"}], "negative_passages": [...]}

Command line: ``tsarank data groups`` (:mod:`tsarank.commands.groups`) or
``scripts/mine_negatives.py``.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tsarank.atomic import atomic_open, check_output_file
from tsarank.data.formats import Doc, PathLike

__all__ = [
    "MiningStats",
    "select_negatives",
    "build_groups",
    "mine_bm25_groups",
    "groups_from_run",
    "write_groups",
    "DEFAULT_NEGATIVES",
]

#: Negatives kept per query by default: 47 fills the paper's G = 48 without replacement; the SFT loader
#: re-samples G - 1 of them every epoch, so keeping more than G - 1 adds variety across epochs.
DEFAULT_NEGATIVES = 47


@dataclass
class MiningStats:
    """Counts reported after building groups.

    Attributes:
        candidate_queries: Queries of the qrels (and of the run, for a run source) considered.
        no_text: Queries skipped because the queries file has no text for them.
        no_positive: Queries skipped because no document with ``grade >= min_grade`` is in the corpus.
        selected: Queries kept after ``max_queries``.
        no_negatives: Selected queries skipped because their window held no usable negative.
        groups: Groups written.
        positives: Positive passages over all groups.
        negatives: Negative passages over all groups.
        short_groups: Groups with fewer negatives than asked for (the window was too thin).
        missing_docs: Distinct first-stage docids absent from the corpus (run source only).
        seconds: Wall-clock time of the whole build.
        examples: A few query ids / docids per skip reason (``no_text``, ``no_positive``, ``no_negatives``,
            ``missing_docs``, ``run_without_qrels``), for messages.
    """

    candidate_queries: int = 0
    no_text: int = 0
    no_positive: int = 0
    selected: int = 0
    no_negatives: int = 0
    groups: int = 0
    positives: int = 0
    negatives: int = 0
    short_groups: int = 0
    missing_docs: int = 0
    seconds: float = 0.0
    examples: dict[str, list[str]] = field(default_factory=dict)

    def summary(self) -> str:
        """One human-readable paragraph of the counts."""
        mean = self.negatives / self.groups if self.groups else 0.0
        lines = [
            f"{self.groups:,} groups from {self.selected:,} selected of {self.candidate_queries:,} candidate queries; "
            f"{self.positives:,} positives, {self.negatives:,} negatives ({mean:.1f} per group) in {self.seconds:.1f} s",
        ]
        skipped = [
            (self.no_text, "without query text"),
            (self.no_positive, "without a positive in the corpus"),
            (self.no_negatives, "without any negative in the depth window"),
        ]
        for count, why in skipped:
            if count:
                lines.append(f"skipped {count:,} queries {why}")
        if self.short_groups:
            lines.append(f"{self.short_groups:,} groups have fewer negatives than asked (thin window; the loader samples with replacement)")
        if self.missing_docs:
            lines.append(f"{self.missing_docs:,} run docids are not in the corpus and were left out")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("examples")
        return data


def _check_window(depth_start: int, depth_end: int, negatives: int | None) -> None:
    if isinstance(depth_start, bool) or not isinstance(depth_start, int) or depth_start < 1:
        raise ValueError(f"depth_start must be an integer >= 1 (ranks are 1-based), got {depth_start!r}")
    if isinstance(depth_end, bool) or not isinstance(depth_end, int) or depth_end < depth_start:
        raise ValueError(f"depth_end must be an integer >= depth_start ({depth_start}), got {depth_end!r}")
    if negatives is not None and (isinstance(negatives, bool) or not isinstance(negatives, int) or negatives < 1):
        raise ValueError(f"negatives must be a positive integer or None (= every document of the window), got {negatives!r}")


def select_negatives(
    ranking: Sequence[str],
    excluded: Iterable[str],
    *,
    depth_start: int,
    depth_end: int,
    negatives: int | None,
    rng: random.Random,
) -> list[str]:
    """Pick hard negatives from one query's first-stage ranking (pure apart from ``rng``).

    Args:
        ranking: Docids best first; position ``i`` (0-based) is rank ``i + 1``.
        excluded: Docids that may never be negatives (judged relevant, missing from the corpus).
        depth_start: First rank of the window (1-based, inclusive).
        depth_end: Last rank of the window (inclusive).
        negatives: How many to draw without replacement; ``None`` keeps the whole window.
        rng: Source of randomness for the draw.

    Returns:
        The chosen docids in rank order (at most ``negatives``; fewer when the window is thin).
    """
    _check_window(depth_start, depth_end, negatives)
    banned = set(excluded)
    seen: set[str] = set()
    window = []
    for docid in ranking[depth_start - 1 : depth_end]:
        if docid not in banned and docid not in seen:
            seen.add(docid)
            window.append(docid)
    if negatives is None or len(window) <= negatives:
        return window
    chosen = sorted(rng.sample(range(len(window)), negatives))
    return [window[i] for i in chosen]


def _passage(doc: Doc) -> dict[str, str]:
    return {"docid": doc.docid, "title": doc.title, "text": doc.text}


def _query_rng(seed: int, qid: str) -> random.Random:
    # A str seed is hashed with SHA-512 by `random` (not Python's salted hash), so this is reproducible across
    # processes, and one query's draw does not depend on the others.
    return random.Random(f"tsarank-groups:{seed}:{qid}")


def _eligible_queries(
    qids: Iterable[str],
    qrels: Mapping[str, Mapping[str, int]],
    corpus: Mapping[str, Doc],
    queries: Mapping[str, str],
    min_grade: int,
    stats: MiningStats,
) -> dict[str, list[str]]:
    """``{qid: positive docids in the corpus}`` for the queries that can form a group, counting the others."""
    eligible: dict[str, list[str]] = {}
    for qid in qids:
        stats.candidate_queries += 1
        text = queries.get(qid)
        if not (isinstance(text, str) and text.strip()):
            stats.no_text += 1
            stats.examples.setdefault("no_text", []).append(qid)
            continue
        positives = [d for d, grade in qrels.get(qid, {}).items() if grade >= min_grade and d in corpus]
        if not positives:
            stats.no_positive += 1
            stats.examples.setdefault("no_positive", []).append(qid)
            continue
        eligible[qid] = positives
    return eligible


def _choose_queries(qids: Sequence[str], max_queries: int | None, seed: int) -> list[str]:
    """A seeded random subset of ``max_queries`` queries, kept in their original order."""
    if max_queries is None or max_queries >= len(qids):
        return list(qids)
    if max_queries < 1:
        raise ValueError(f"max_queries must be >= 1 or None, got {max_queries}")
    keep = set(random.Random(f"tsarank-queries:{seed}").sample(range(len(qids)), max_queries))
    return [q for i, q in enumerate(qids) if i in keep]


def build_groups(
    rankings: Mapping[str, Sequence[str]],
    positives: Mapping[str, Sequence[str]],
    qrels: Mapping[str, Mapping[str, int]],
    corpus: Mapping[str, Doc],
    queries: Mapping[str, str],
    *,
    negatives: int | None = DEFAULT_NEGATIVES,
    depth_start: int = 10,
    depth_end: int = 100,
    seed: int = 0,
    max_positives: int | None = None,
    stats: MiningStats | None = None,
) -> list[dict[str, Any]]:
    """Turn first-stage rankings into group records (the shared back end of both sources).

    Args:
        rankings: ``{qid: docids best first}`` (docids absent from the corpus are skipped but keep their rank).
        positives: ``{qid: positive docids}``; the queries, in output order.
        qrels: ``{qid: {docid: grade}}``; every docid with grade > 0 is excluded from the negatives.
        corpus: ``{docid: Doc}``.
        queries: ``{qid: text}``.
        negatives: Negatives per query (``None``: the whole window).
        depth_start: First rank of the window (1-based, inclusive).
        depth_end: Last rank of the window (inclusive).
        seed: Seed of the per-query draws.
        max_positives: Keep at most this many positives per query (a seeded draw, in qrels order); ``None``
            keeps all. Every judged-relevant document stays excluded from the negatives either way.
        stats: Counts to update (``no_negatives``, ``groups``, ``positives``, ``negatives``, ``short_groups``).

    Returns:
        Group records ``{"query_id", "query", "positive_passages", "negative_passages"}``.
    """
    _check_window(depth_start, depth_end, negatives)
    stats = stats if stats is not None else MiningStats()
    groups = []
    if max_positives is not None and max_positives < 1:
        raise ValueError(f"max_positives must be >= 1 or None, got {max_positives}")
    for qid, pos in positives.items():
        excluded_pos = set(pos)
        if max_positives is not None and len(pos) > max_positives:
            rng = random.Random(f"tsarank-positives:{seed}:{qid}")
            pos = [pos[i] for i in sorted(rng.sample(range(len(pos)), max_positives))]
        judged = {d for d, grade in qrels.get(qid, {}).items() if grade > 0}
        ranking = rankings.get(qid, ())
        missing = {d for d in ranking[depth_start - 1 : depth_end] if d not in corpus}
        chosen = select_negatives(
            ranking, judged | excluded_pos | missing, depth_start=depth_start, depth_end=depth_end,
            negatives=negatives, rng=_query_rng(seed, qid),
        )
        if not chosen:
            stats.no_negatives += 1
            stats.examples.setdefault("no_negatives", []).append(qid)
            continue
        if negatives is not None and len(chosen) < negatives:
            stats.short_groups += 1
        groups.append({
            "query_id": qid,
            "query": queries[qid],
            "positive_passages": [_passage(corpus[d]) for d in pos],
            "negative_passages": [_passage(corpus[d]) for d in chosen],
        })
        stats.groups += 1
        stats.positives += len(pos)
        stats.negatives += len(chosen)
    return groups


def mine_bm25_groups(
    corpus: Mapping[str, Doc],
    queries: Mapping[str, str],
    qrels: Mapping[str, Mapping[str, int]],
    *,
    negatives: int | None = DEFAULT_NEGATIVES,
    depth_start: int = 10,
    depth_end: int = 100,
    max_queries: int | None = None,
    seed: int = 0,
    min_grade: int = 1,
    max_positives: int | None = None,
    k1: float = 0.9,
    b: float = 0.4,
    stemmer: str | None = "english",
    stopwords: str | list[str] | None = "en",
) -> tuple[list[dict[str, Any]], MiningStats]:
    """Groups with BM25 hard negatives for the judged queries of ``qrels`` (see the module docstring).

    The BM25 ranking is ``bm25_retrieve(corpus, {qid: text}, top_k=depth_end)`` for the selected queries, so a
    window rank is exactly the rank a ``tsarank retrieve`` run would show.

    Args:
        corpus: ``{docid: Doc}``.
        queries: ``{qid: text}`` (may hold more queries than the qrels; only judged ones are used).
        qrels: ``{qid: {docid: grade}}`` (e.g. BEIR ``qrels/train.tsv``).
        negatives: Negatives per query (``None``: the whole window).
        depth_start: First rank of the window (1-based, inclusive).
        depth_end: Last rank of the window (inclusive); also BM25's depth.
        max_queries: Keep a seeded random subset of this many eligible queries.
        seed: Seed of the query subset and the negative draws.
        min_grade: Positives are judged documents with ``grade >= min_grade``.
        max_positives: Keep at most this many positives per group (see :func:`build_groups`).
        k1: BM25 k1.
        b: BM25 b.
        stemmer: PyStemmer algorithm or ``None``.
        stopwords: bm25s stop-word list or ``None``.

    Returns:
        ``(groups, stats)``.
    """
    from tsarank.retrieval import bm25_retrieve

    _check_window(depth_start, depth_end, negatives)
    if min_grade < 1:
        raise ValueError(f"min_grade must be >= 1 (grade 0 means judged non-relevant), got {min_grade}")
    start = time.perf_counter()
    stats = MiningStats()
    eligible = _eligible_queries(qrels, qrels, corpus, queries, min_grade, stats)
    selected = _choose_queries(list(eligible), max_queries, seed)
    stats.selected = len(selected)
    positives = {q: eligible[q] for q in selected}
    results = bm25_retrieve(
        corpus, {q: queries[q] for q in selected}, top_k=depth_end, stemmer=stemmer, stopwords=stopwords, k1=k1, b=b
    ) if selected else {}
    rankings = {q: [d for d, _ in ranked] for q, ranked in results.items()}
    groups = build_groups(
        rankings, positives, qrels, corpus, queries, negatives=negatives, depth_start=depth_start,
        depth_end=depth_end, seed=seed, max_positives=max_positives, stats=stats,
    )
    stats.seconds = time.perf_counter() - start
    return groups, stats


def groups_from_run(
    run: Mapping[str, Sequence[tuple[str, float]]],
    corpus: Mapping[str, Doc],
    queries: Mapping[str, str],
    qrels: Mapping[str, Mapping[str, int]],
    *,
    negatives: int | None = DEFAULT_NEGATIVES,
    depth_start: int = 10,
    depth_end: int = 100,
    max_queries: int | None = None,
    seed: int = 0,
    min_grade: int = 1,
    max_positives: int | None = None,
) -> tuple[list[dict[str, Any]], MiningStats]:
    """Groups whose negatives are the run's documents not judged relevant, within the depth window.

    Only queries both in the run and in the qrels are used (a run query without judgments has no positive).
    Positives come from the qrels, whether or not the run retrieved them.

    Args:
        run: ``{qid: [(docid, score), ...]}`` best first (:func:`tsarank.data.formats.read_run`).
        corpus: ``{docid: Doc}``; run docids missing from it are skipped (and counted).
        queries: ``{qid: text}``.
        qrels: ``{qid: {docid: grade}}``.
        negatives, depth_start, depth_end, max_queries, seed, min_grade, max_positives: As for :func:`mine_bm25_groups`.

    Returns:
        ``(groups, stats)``.
    """
    _check_window(depth_start, depth_end, negatives)
    if min_grade < 1:
        raise ValueError(f"min_grade must be >= 1 (grade 0 means judged non-relevant), got {min_grade}")
    start = time.perf_counter()
    stats = MiningStats()
    rankings = {q: [d for d, _ in ranked] for q, ranked in run.items()}
    missing = {d for ranking in rankings.values() for d in ranking if d not in corpus}
    stats.missing_docs = len(missing)
    stats.examples["missing_docs"] = sorted(missing)[:5]
    judged_in_run = [q for q in rankings if q in qrels]
    stats.examples["run_without_qrels"] = [q for q in rankings if q not in qrels][:5]
    eligible = _eligible_queries(judged_in_run, qrels, corpus, queries, min_grade, stats)
    selected = _choose_queries(list(eligible), max_queries, seed)
    stats.selected = len(selected)
    groups = build_groups(
        rankings, {q: eligible[q] for q in selected}, qrels, corpus, queries, negatives=negatives,
        depth_start=depth_start, depth_end=depth_end, seed=seed, max_positives=max_positives, stats=stats,
    )
    stats.seconds = time.perf_counter() - start
    return groups, stats


def write_groups(path: PathLike, groups: Iterable[Mapping[str, Any]], *, overwrite: bool = False) -> int:
    """Write group records as JSON Lines, atomically (a crash never leaves half a file).

    Args:
        path: Output file; its directory must exist.
        groups: Records as returned by :func:`build_groups`.
        overwrite: Replace an existing file (refused otherwise).

    Returns:
        The number of records written.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
        FileNotFoundError: The output directory does not exist.
    """
    path = check_output_file(path, overwrite)
    count = 0
    with atomic_open(path) as fh:
        for group in groups:
            # ensure_ascii=False keeps texts readable and byte-identical to the corpus (mojibake included).
            fh.write(json.dumps(group, ensure_ascii=False) + "\n")
            count += 1
    return count
