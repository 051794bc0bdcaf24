"""ir_datasets as a source beside the file readers: ``irds:ID`` wherever a corpus, queries, qrels or run file goes.

``irds:beir/scifact/test`` names the ir_datasets dataset ``beir/scifact/test``. Its documents become
:class:`~tsarank.data.formats.Doc` (``title`` and ``text`` where the dataset has them, else its text field), its
queries ``{qid: text}``, its qrels ``{qid: {docid: grade}}`` and its scoreddocs (when it has them) a first-stage run.
ir_datasets downloads on first use into ``$IR_DATASETS_HOME`` (``~/.ir_datasets``); for a machine without internet,
``python scripts/irds_offline_home.py`` lays out local copies where ir_datasets looks for its downloads.

ir_datasets is an optional dependency: ``pip install 'tsarank[irds]'``.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

from ..errors import DataError

__all__ = ["PREFIX", "is_irds", "dataset_id", "load", "corpus", "queries", "qrels", "scoreddocs"]

#: How a source names an ir_datasets dataset: ``irds:beir/scifact/test``.
PREFIX = "irds:"


def is_irds(source: Any) -> bool:
    """``source`` (a string or path) names an ir_datasets dataset (``irds:...``)."""
    return isinstance(source, (str, os.PathLike)) and str(source).startswith(PREFIX)


def dataset_id(source: str) -> str:
    """``irds:beir/scifact/test`` -> ``beir/scifact/test`` (a bare id passes through)."""
    return str(source)[len(PREFIX):] if is_irds(source) else str(source)


def load(source: str) -> Any:
    """The ir_datasets dataset, with a one-line error for a missing package or an unknown id.

    Raises:
        ImportError: ir_datasets is not installed (the message says how to install it).
        DataError: No such dataset id (the message names close ones).
    """
    try:
        import ir_datasets
    except ImportError:
        raise ImportError("ir_datasets is not installed; pip install 'tsarank[irds]' (or ir_datasets)") from None
    name = dataset_id(source)
    try:
        return ir_datasets.load(name)
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, list(ir_datasets.registry._registered), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise DataError(f"{PREFIX}{name}", None, None, f"no such ir_datasets dataset{hint}",
                        fix="see https://ir-datasets.com for the ids") from None


def _need(ds: Any, what: str, source: str) -> None:
    if not getattr(ds, f"has_{what}")():
        raise DataError(f"{PREFIX}{dataset_id(source)}", None, None, f"this dataset has no {what}",
                        fix="name a dataset id that has them (e.g. beir/scifact/test for queries and qrels)")


def _doc_fields(doc: Any) -> tuple[str, str]:
    """``(title, text)`` of an ir_datasets document namedtuple, whatever its type."""
    fields = doc._asdict()
    title = fields.get("title") or ""
    for key in ("text", "body", "passage", "contents", "abstract"):
        if isinstance(fields.get(key), str):
            return str(title), fields[key]
    text = doc.default_text() if hasattr(doc, "default_text") else ""
    return "", text


def corpus(source: str) -> Iterator[tuple[str, str, str]]:
    """``(docid, title, text)`` for every document of the dataset."""
    ds = load(source)
    _need(ds, "docs", source)
    for doc in ds.docs_iter():
        title, text = _doc_fields(doc)
        yield doc.doc_id, title, text


def docs(source: str, docids: list[str]) -> dict[str, tuple[str, str]]:
    """``{docid: (title, text)}`` for just these documents, from the dataset's document store (a first stage over
    MS MARCO's 8.8M passages needs a few thousand of them, not the whole corpus in memory). Unknown ids are left out."""
    ds = load(source)
    _need(ds, "docs", source)
    found = ds.docs_store().get_many(docids)
    return {d: _doc_fields(doc) for d, doc in found.items()}


def queries(source: str) -> dict[str, str]:
    """``{qid: text}`` in the dataset's order (its ``text`` field, else ir_datasets' default text)."""
    ds = load(source)
    _need(ds, "queries", source)
    out: dict[str, str] = {}
    for q in ds.queries_iter():
        text = getattr(q, "text", None)
        out[q.query_id] = text if isinstance(text, str) else q.default_text()
    return out


def qrels(source: str) -> dict[str, dict[str, int]]:
    """``{qid: {docid: grade}}``."""
    ds = load(source)
    _need(ds, "qrels", source)
    out: dict[str, dict[str, int]] = {}
    for q in ds.qrels_iter():
        out.setdefault(q.query_id, {})[q.doc_id] = int(q.relevance)
    return out


def has_scoreddocs(source: str) -> bool:
    return bool(load(source).has_scoreddocs())


def scoreddocs(source: str) -> dict[str, list[tuple[str, float]]]:
    """The dataset's first-stage run ``{qid: [(docid, score), ...]}`` (e.g. msmarco-passage/trec-dl-2019's BM25)."""
    ds = load(source)
    _need(ds, "scoreddocs", source)
    out: dict[str, list[tuple[str, float]]] = {}
    for sd in ds.scoreddocs_iter():
        out.setdefault(sd.query_id, []).append((sd.doc_id, float(sd.score)))
    return out


def apply_dataset(args: Any, fields: tuple[str, ...]) -> str | None:
    """``--dataset ID`` of a command: point its ``fields`` (``corpus``, ``queries``, ``qrels``) at ``irds:ID``.

    Returns:
        ``irds:ID``, or ``None`` without ``--dataset``.

    Raises:
        ValueError: ``--dataset`` together with one of those options.
        ImportError, DataError: ir_datasets missing, or an unknown id (before any reading).
    """
    name = getattr(args, "dataset", None)
    if not name:
        return None
    clash = [f"--{f}" for f in fields if getattr(args, f, None)]
    if clash:
        raise ValueError(f"--dataset {name} provides the {', '.join(fields)}; drop {', '.join(clash)}")
    src = PREFIX + dataset_id(name)
    ds = load(src)
    for f in fields:
        if f != "qrels" or ds.has_qrels():
            setattr(args, f, src)
    return src
