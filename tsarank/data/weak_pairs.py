"""Build weakly supervised (text, query) pairs for stage 1 (continual pre-training).

Sources:

* **BEIR-format corpora** (``corpus.jsonl`` or the directory holding it): each document with a non-empty title and
  body gives the pair ``query = title``, ``text = body`` (the title as the "query" the body should predict);
* **ranking-group files** (the SFT group JSONL): each positive passage gives ``query = the group's query``,
  ``text = passage title + " " + passage text``.

Every candidate pair then goes through, in order:

1. **exclusion** (``exclude_qrels``): every document id and query id that appears in the given qrels files is dropped
   (corpus documents by ``_id``; group files by ``query_id`` and by positive ``docid``). Ids are matched as plain
   strings across all sources. When a qrels file sits in a BEIR dataset directory (``DIR/qrels/*.tsv`` or
   ``DIR/*``) whose ``queries.jsonl`` / ``corpus.jsonl`` exist, the **texts** of the judged queries and documents are
   excluded too: a pair whose query equals a judged query's text, or whose text equals a judged document's body (or
   "title body"), is dropped. Texts are compared after lower-casing and collapsing whitespace. This catches the same
   test query or document arriving under another id (e.g. as a group-file positive without a docid, or an NFCorpus
   test query that is also a document title);
2. **length filters** on the text (``min_chars`` characters, ``min_text_tokens`` whitespace-separated words) and on
   the query (``min_query_chars``); pairs whose query equals their text are dropped;
3. **deduplication** of exact (query, text) pairs (after the same normalisation);
4. optional **subsampling** to ``max_pairs`` (seeded reservoir sample over all kept pairs);
5. the **validation split**: a pair goes to validation when a seeded hash of its normalised *text* falls below
   ``val_fraction``, so the same text never lands on both sides and the split does not depend on input order.

Outputs (written atomically into ``out``): ``train.jsonl`` and ``validation.jsonl`` with records
``{"text", "query", "source", "id"}`` (the weak-pairs schema of docs/design.md, section 3; ``source``/``id`` say where a pair
came from), and ``stats.json`` with counts per source and per drop reason.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from ..errors import DataError
from ..atomic import atomic_open, check_writable_dir, nearest_existing, new_directory
from .formats import PathLike, _get_id, _get_str, iter_jsonl, parse_group, read_corpus, read_qrels, read_queries

__all__ = ["Exclusions", "WeakPair", "build_weak_pairs", "normalise", "iter_corpus_pairs", "iter_group_pairs"]

_WS = re.compile(r"\s+")


def normalise(text: str) -> str:
    """Lower-case, collapse whitespace, strip: the form texts are compared in."""
    return _WS.sub(" ", text).strip().lower()


def _digest(*parts: str) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(p.encode("utf-8"))
        h.update(b"\x00")
    return h.digest()


@dataclass
class WeakPair:
    """A candidate pair with provenance: ``source`` (e.g. ``scifact:title``), ``id`` and the ids to check."""

    query: str
    text: str
    source: str
    id: str
    doc_id: str | None = None
    query_id: str | None = None


@dataclass
class Exclusions:
    """What ``--exclude-qrels`` removes: ids (strings) and normalised-text digests."""

    doc_ids: set[str] = field(default_factory=set)
    query_ids: set[str] = field(default_factory=set)
    query_texts: set[bytes] = field(default_factory=set)
    doc_texts: set[bytes] = field(default_factory=set)
    files: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_qrels(cls, paths: Sequence[PathLike]) -> "Exclusions":
        """Collect ids from each qrels file, and texts from its BEIR directory when there is one."""
        ex = cls()
        for p in paths:
            path = Path(p)
            qrels = read_qrels(path)
            qids = set(qrels)
            dids = {d for judged in qrels.values() for d in judged}
            ex.query_ids |= qids
            ex.doc_ids |= dids
            info: dict[str, Any] = {"qrels": str(path), "query_ids": len(qids), "doc_ids": len(dids)}
            beir = path.parent.parent if path.parent.name == "qrels" else path.parent
            queries_file = beir / "queries.jsonl"
            if queries_file.is_file():
                queries = read_queries(queries_file)
                texts = [queries[q] for q in qids if q in queries]
                ex.query_texts |= {_digest(normalise(t)) for t in texts}
                info["query_texts_from"] = str(queries_file)
                info["query_texts"] = len(texts)
            corpus_file = beir / "corpus.jsonl"
            if corpus_file.is_file():
                corpus = read_corpus(corpus_file)
                docs = [corpus[d] for d in dids if d in corpus]
                for d in docs:
                    if d.text.strip():
                        ex.doc_texts.add(_digest(normalise(d.text)))
                    ex.doc_texts.add(_digest(normalise(d.full_text)))
                info["doc_texts_from"] = str(corpus_file)
                info["doc_texts"] = len(docs)
            ex.files.append(info)
        return ex

    def reason(self, pair: WeakPair) -> str | None:
        """Why ``pair`` is excluded (a drop-reason name), or ``None``."""
        if pair.doc_id is not None and pair.doc_id in self.doc_ids:
            return "excluded_doc_id"
        if pair.query_id is not None and pair.query_id in self.query_ids:
            return "excluded_query_id"
        if self.query_texts and _digest(normalise(pair.query)) in self.query_texts:
            return "excluded_query_text"
        if self.doc_texts and _digest(normalise(pair.text)) in self.doc_texts:
            return "excluded_doc_text"
        return None


# ------------------------------------------------------------------------------------------- sources
def _corpus_file(path: Path) -> Path:
    if path.is_dir():
        for name in ("corpus.jsonl", "corpus.jsonl.gz"):
            if (path / name).is_file():
                return path / name
        raise DataError(path, None, None, "expected a BEIR dataset directory containing corpus.jsonl, found none",
                        fix="pass the corpus.jsonl file itself or the directory that holds it")
    return path


def _parse_corpus_record(obj: dict[str, Any], path: Path, line: int) -> tuple[str, str, str]:
    docid = _get_id(obj, "_id", path, line)
    title = _get_str(obj, "title", path, line, required=False)
    text = _get_str(obj, "text", path, line)
    return docid, title, text


def iter_corpus_pairs(path: PathLike) -> Iterator[WeakPair]:
    """(title -> body) pairs of a BEIR ``corpus.jsonl`` (or its directory), streamed line by line.

    Documents without a title or without a body yield nothing (the caller counts them from the return value of
    :func:`build_weak_pairs`' statistics as ``no_title``).

    Raises:
        DataError: a malformed line, or a TSV corpus (it has no titles).
    """
    file = _corpus_file(Path(path))
    name = file.parent.name if file.name.startswith("corpus.jsonl") else file.stem
    for _line, (docid, title, text) in iter_jsonl(file, _parse_corpus_record):
        yield WeakPair(query=title.strip(), text=text.strip(), source=f"{name}:title", id=docid, doc_id=docid)


def iter_group_pairs(path: PathLike) -> Iterator[WeakPair]:
    """(query -> positive passage) pairs of a ranking-group JSONL, streamed."""
    path = Path(path)
    for line, group in iter_jsonl(path, parse_group):
        qid = group["query_id"]
        for i, p in enumerate(group["positive_passages"]):
            text = f"{p['title']} {p['text']}".strip() if p["title"] else p["text"].strip()
            pid = f"{qid if qid is not None else f'line{line}'}:{p['docid'] if p['docid'] is not None else i}"
            yield WeakPair(query=group["query"].strip(), text=text, source=f"{path.stem}:positive", id=pid,
                           doc_id=p["docid"], query_id=qid)


# ------------------------------------------------------------------------------------------- builder
def _split_value(text_norm: str, seed: int) -> float:
    h = hashlib.blake2b(f"{seed}\x00{text_norm}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def _record(pair: WeakPair) -> str:
    return json.dumps({"text": pair.text, "query": pair.query, "source": pair.source, "id": pair.id}, ensure_ascii=False) + "\n"


def build_weak_pairs(
    out: PathLike,
    *,
    corpora: Sequence[PathLike] = (),
    groups: Sequence[PathLike] = (),
    exclude_qrels: Sequence[PathLike] = (),
    min_chars: int = 20,
    min_text_tokens: int = 0,
    min_query_chars: int = 3,
    max_pairs: int | None = None,
    val_fraction: float = 0.02,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Build ``train.jsonl``, ``validation.jsonl`` and ``stats.json`` in ``out`` (see the module docstring).

    Returns:
        The statistics written to ``stats.json``.

    Raises:
        ValueError: bad options or a non-empty ``out`` without ``overwrite``.
        DataError: a malformed input line (file:line:field).
    """
    if not corpora and not groups:
        raise ValueError("no sources: pass at least one --corpus (BEIR corpus) or --groups (ranking-group JSONL)")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if max_pairs is not None and max_pairs < 1:
        raise ValueError(f"--max-pairs must be >= 1, got {max_pairs}")
    for name, value in (("min_chars", min_chars), ("min_text_tokens", min_text_tokens),
                        ("min_query_chars", min_query_chars)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a whole number >= 0, got {value!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out} is not empty; pass --overwrite to replace its files, or choose a new directory")
    base = nearest_existing(out)
    if not base.is_dir():
        raise ValueError(f"--out {out}: {base} is a file, so the directory cannot be created")
    check_writable_dir(base, "--out")  # a read-only place fails now, not after reading every source
    for p in [*corpora, *groups, *exclude_qrels]:
        if not Path(p).exists():
            raise FileNotFoundError(f"{p}: no such file or directory")
    t0 = time.perf_counter()
    exclusions = Exclusions.from_qrels(exclude_qrels)

    sources: list[tuple[str, Iterable[WeakPair]]] = [(str(c), iter_corpus_pairs(c)) for c in corpora]
    sources += [(str(g), iter_group_pairs(g)) for g in groups]
    per_source: dict[str, Counter] = {}
    seen: set[bytes] = set()
    rng = random.Random(seed)
    reservoir: list[WeakPair] = []
    n_kept = 0
    with new_directory(out):
        split_counts = Counter()

        def split_of(pair: WeakPair) -> str:
            return "validation" if _split_value(normalise(pair.text), seed) < val_fraction else "train"

        with atomic_open(out / "train.jsonl") as train_fh, atomic_open(out / "validation.jsonl") as val_fh:
            handles = {"train": train_fh, "validation": val_fh}
            for name, pairs in sources:
                counts = per_source.setdefault(name, Counter())
                for pair in pairs:
                    counts["read"] += 1
                    if not pair.query or not pair.text:
                        counts["no_title" if pair.source.endswith(":title") else "empty"] += 1
                        continue
                    reason = exclusions.reason(pair)
                    if reason is None:
                        if len(pair.text) < min_chars or (min_text_tokens and len(pair.text.split()) < min_text_tokens):
                            reason = "text_too_short"
                        elif len(pair.query) < min_query_chars:
                            reason = "query_too_short"
                        elif normalise(pair.query) == normalise(pair.text):
                            reason = "query_equals_text"
                    if reason is None:
                        key = _digest(normalise(pair.query), normalise(pair.text))
                        if key in seen:
                            reason = "duplicate"
                        else:
                            seen.add(key)
                    if reason is not None:
                        counts[reason] += 1
                        continue
                    counts["kept"] += 1
                    n_kept += 1
                    if max_pairs is None:
                        s = split_of(pair)
                        handles[s].write(_record(pair))
                        split_counts[s] += 1
                    elif len(reservoir) < max_pairs:
                        reservoir.append(pair)
                    else:
                        j = rng.randrange(n_kept)
                        if j < max_pairs:
                            reservoir[j] = pair
            if max_pairs is not None:
                rng.shuffle(reservoir)  # sources were read in order; mix them
                for pair in reservoir:
                    s = split_of(pair)
                    handles[s].write(_record(pair))
                    split_counts[s] += 1

        stats = {
            "sources": {k: dict(v) for k, v in per_source.items()},
            "kept_before_max_pairs": n_kept,
            "train": split_counts["train"],
            "validation": split_counts["validation"],
            "exclusions": {
                "doc_ids": len(exclusions.doc_ids), "query_ids": len(exclusions.query_ids),
                "query_texts": len(exclusions.query_texts), "doc_texts": len(exclusions.doc_texts),
                "files": exclusions.files,
            },
            "options": {"min_chars": min_chars, "min_text_tokens": min_text_tokens, "min_query_chars": min_query_chars,
                        "max_pairs": max_pairs, "val_fraction": val_fraction, "seed": seed},
            "seconds": round(time.perf_counter() - t0, 2),
        }
        with atomic_open(out / "stats.json") as fh:
            fh.write(json.dumps(stats, indent=2) + "\n")
    return stats
