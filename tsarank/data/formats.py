"""Readers and writers for tsarank's data contracts (docs/design.md, section 3).

Every reader validates its whole input before returning (or, for the streaming
readers, line by line as it goes; call :func:`validate_jsonl` first to check a
big file up front) and raises :class:`~tsarank.errors.DataError` naming
``file:line``, the field, what was expected, what came and how to fix it.

Conventions shared by all readers:

* Files are UTF-8 (a leading BOM is ignored); lines end in LF or CRLF; only
  ``\\n`` splits lines, so a stray ``\\r`` inside a passage is kept as text.
  Blank (whitespace-only) lines are skipped anywhere, so trailing blank lines
  are fine. ``.gz`` files are read transparently.
* Files are read line by line (streaming); a file is read a second time only to
  locate the first occurrence of a duplicate when reporting an error.
* Query ids and document ids are always ``str``; integer ids in JSON become
  strings. Ids must be non-empty and contain no whitespace (they could not be
  written to a TREC run otherwise).
* The format of a corpus / queries file is sniffed from its first non-blank
  line: a line starting with ``{`` means JSON Lines, anything else TSV.
  (A JSON array, ``[``, is rejected with a hint to convert it to JSON Lines.)
"""

from __future__ import annotations

import gzip
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from tsarank.atomic import atomic_open
from tsarank.errors import DataError, describe

from . import irds as _irds

__all__ = [
    "Doc",
    "CandidateList",
    "PathLike",
    "iter_lines",
    "iter_jsonl",
    "validate_jsonl",
    "read_corpus",
    "read_queries",
    "read_qrels",
    "read_run",
    "format_run_lines",
    "write_run",
    "read_rank_llm",
    "load_candidates",
    "parse_weak_pair",
    "read_weak_pairs",
    "parse_group",
    "read_groups",
    "RUN_SCORE_FORMAT",
]

PathLike = str | os.PathLike
T = TypeVar("T")

#: ``format()`` spec used for scores in written runs: 8 significant digits
#: (``format(score, ".8g")``). Enough to keep the order of any two float32 scores
#: that differ in more than their last bit; exactly equal scores are tie-broken by
#: docid, and :func:`read_run` breaks ties by the written rank, so a write/read
#: round trip keeps the order.
RUN_SCORE_FORMAT = ".8g"

_RANKING_GPT_PREFIX = "Document:"
_RANKING_GPT_SUFFIX = "Query:"


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class Doc:
    """One corpus document.

    Attributes:
        docid: Document id (always a string).
        title: Title, ``""`` when the corpus has none (TSV corpora never do).
        text: Body text.
    """

    docid: str
    title: str
    text: str

    @property
    def full_text(self) -> str:
        """The text tsarank indexes and scores: ``title + " " + text``, stripped.

        When the title is empty this is ``text`` unchanged. (tsarank joins title
        and body with a single space, as BEIR's usual "title text" concatenation.)
        """
        if self.title:
            return f"{self.title} {self.text}".strip()
        return self.text


@dataclass
class CandidateList:
    """A query with its first-stage candidates, in first-stage order.

    Attributes:
        qid: Query id.
        query: Query text.
        docids: Candidate document ids, best first.
        texts: Candidate texts aligned with ``docids`` (:attr:`Doc.full_text` for
            corpus documents, ``content`` for rank_llm hits).
        scores: First-stage scores aligned with ``docids``.
    """

    qid: str
    query: str
    docids: list[str]
    texts: list[str]
    scores: list[float]

    def __post_init__(self) -> None:
        if not len(self.docids) == len(self.texts) == len(self.scores):
            raise ValueError(
                f"CandidateList {self.qid!r}: docids, texts and scores must have the same length, "
                f"got {len(self.docids)}, {len(self.texts)} and {len(self.scores)}"
            )

    def __len__(self) -> int:
        return len(self.docids)

    def head(self, k: int | None) -> CandidateList:
        """The first ``k`` candidates (all of them when ``k`` is ``None``)."""
        if k is None or k >= len(self.docids):
            return self
        return CandidateList(self.qid, self.query, self.docids[:k], self.texts[:k], self.scores[:k])


# --------------------------------------------------------------------------- low-level I/O


def _check_file(path: Path) -> None:
    if not path.exists():
        text = str(path)
        if "/" in text and not Path(text).suffix and not text.startswith((".", "/", "~")):
            # msmarco-passage/trec-dl-2019/judged: an ir_datasets id, most likely
            raise DataError(path, None, None, "file not found", fix=f"for the ir_datasets dataset write irds:{text} "
                            "(pip install 'tsarank[irds]'); otherwise check the path")
        raise DataError(path, None, None, "file not found", fix="check the path (relative paths are relative to the current directory)")
    if path.is_dir():
        raise DataError(path, None, None, "expected a file, got a directory", fix="pass the file inside it")


def _open_binary(path: Path) -> IO[bytes]:
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    return open(path, "rb")


def _utf16(head: bytes) -> bool:
    """A UTF-16 file: its byte-order mark, or (without one) a NUL byte beside every ASCII character."""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return True
    sample = head[:200]
    return len(sample) >= 4 and sample.count(b"\x00") * 3 >= len(sample)


def _utf16_error(path: Path) -> DataError:
    return DataError(path, 1, None, "expected UTF-8 text, got UTF-16 (a byte-order mark or NUL bytes between characters)",
                     fix=f"re-encode the file as UTF-8 (e.g. `iconv -f utf-16 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}`)")


def iter_lines(path: PathLike) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, text)`` for every non-blank line, streaming.

    Line numbers are 1-based and count blank lines; the line ending (LF or CRLF)
    is removed; a UTF-8 BOM at the start is dropped.

    Args:
        path: File to read (``.gz`` is decompressed).

    Raises:
        DataError: If the file is missing or a line is not valid UTF-8.
    """
    path = Path(path)
    _check_file(path)
    with _open_binary(path) as fh:
        for number, raw in enumerate(fh, 1):
            if raw.endswith(b"\n"):
                raw = raw[:-1]
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            if number == 1 and _utf16(raw):
                raise _utf16_error(path)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    path, number, None,
                    f"expected UTF-8 text, got byte {raw[exc.start:exc.start + 1]!r} at column {exc.start + 1} that is not valid UTF-8",
                    fix="re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in > out`)",
                ) from None
            if number == 1 and text.startswith("\ufeff"):
                text = text[1:]
            if not text.strip():
                continue
            yield number, text


def _first_line(path: Path) -> str | None:
    for _, text in iter_lines(path):
        return text
    return None


def _looks_like_jsonl(path: Path) -> bool:
    first = _first_line(path)
    if first is None:
        raise DataError(path, None, None, "expected at least one record, got an empty file", fix="check that the file was written completely")
    return first.lstrip().startswith(("{", "["))  # "[": a JSON array, reported as such by the JSONL parser


def _parse_json_line(path: Path, number: int, text: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        if number == 1 and text.lstrip().startswith("["):
            raise DataError(
                path, number, None, "expected JSON Lines (one JSON object per line), got a JSON array",
                fix="convert it, e.g. `jq -c '.[]' in.json > out.jsonl`",
            ) from None
        raise DataError(
            path, number, None, f"expected one JSON object on this line, got invalid JSON ({exc.msg} at column {exc.colno})",
            fix="write one complete JSON object per line (JSON Lines)",
        ) from None
    if isinstance(obj, list):
        raise DataError(
            path, number, None, "expected JSON Lines (one JSON object per line), got a JSON array",
            fix="convert it, e.g. `jq -c '.[]' in.json > out.jsonl`",
        )
    if not isinstance(obj, dict):
        raise DataError(path, number, None, f"expected a JSON object, got {describe(obj)}", fix="write one JSON object per line")
    return obj


def _require_records(path: Path, count: int, what: str) -> None:
    if count == 0:
        raise DataError(path, None, None, f"expected at least one {what}, got none (the file is empty)", fix="check that the file was written completely")


# --------------------------------------------------------------------------- field validation


def _check_id(path: Path, line: int | None, field: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(path, line, field, f"expected a string or integer id, got {describe(value)}")
    text = str(value)
    if not text:
        raise DataError(path, line, field, "expected a non-empty id, got ''")
    if any(ch.isspace() for ch in text):
        raise DataError(
            path, line, field, f"expected an id without whitespace, got {text!r}",
            fix="replace whitespace in ids (TREC run and qrels files are whitespace-separated)",
        )
    return text


def _get_id(obj: Mapping[str, Any], key: str, path: Path, line: int, prefix: str = "", required: bool = True) -> str | None:
    field = prefix + key
    if key not in obj:
        if not required:
            return None
        raise DataError(path, line, field, f"missing; the object has keys {sorted(obj)}", fix=f"add '{key}'")
    return _check_id(path, line, field, obj[key])


def _get_str(
    obj: Mapping[str, Any], key: str, path: Path, line: int, *, prefix: str = "",
    required: bool = True, non_empty: bool = False, default: str = "",
) -> str:
    field = prefix + key
    if key not in obj or (obj[key] is None and not required):
        if not required:
            return default
        raise DataError(path, line, field, f"missing; the object has keys {sorted(obj)}", fix=f"add '{key}' (a string)")
    value = obj[key]
    if not isinstance(value, str):
        expected = "a non-empty string" if non_empty else "a string"
        raise DataError(path, line, field, f"expected {expected}, got {describe(value)}")
    if non_empty and not value.strip():
        raise DataError(path, line, field, f"expected a non-empty string, got {describe(value)}", fix="drop the record or fill in the text")
    return value


def _check_number(path: Path, line: int | None, field: str, value: Any, *, allow_inf: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(path, line, field, f"expected a number, got {describe(value)}")
    number = float(value)
    if math.isnan(number) or (not allow_inf and math.isinf(number)):
        raise DataError(path, line, field, f"expected a finite number, got {value!r}")
    return number


def _parse_float(path: Path, line: int, field: str, text: str) -> float:
    try:
        number = float(text)
    except ValueError:
        raise DataError(path, line, field, f"expected a number, got {text!r}") from None
    if math.isnan(number):
        raise DataError(path, line, field, f"expected a number, got {text!r}", fix="remove NaN scores from the run")
    return number


def _parse_int(path: Path, line: int, field: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if number.is_integer():
        return int(number)
    raise DataError(path, line, field, f"expected an integer, got {text!r}")


def _find_first(path: Path, key_of: Callable[[int, str], Any], key: Any, before: int) -> int | None:
    """Line number of the first line (before ``before``) whose key is ``key``; error path only."""
    for number, text in iter_lines(path):
        if number >= before:
            break
        try:
            if key_of(number, text) == key:
                return number
        except (DataError, ValueError, KeyError, IndexError, TypeError):
            continue
    return None


def _lines_phrase(first: int | None, second: int) -> str:
    return f"lines {first} and {second}" if first is not None else f"line {second} and an earlier line"


# --------------------------------------------------------------------------- JSONL helpers


def iter_jsonl(path: PathLike, validator: Callable[[dict[str, Any], Path, int], T]) -> Iterator[tuple[int, T]]:
    """Stream a JSON Lines file, validating each object.

    Args:
        path: The JSONL file.
        validator: ``validator(obj, path, line) -> value``; raises
            :class:`DataError` for a bad record (see :func:`parse_weak_pair`,
            :func:`parse_group`).

    Yields:
        ``(line_number, validator(obj, path, line_number))`` per non-blank line.
    """
    path = Path(path)
    for number, text in iter_lines(path):
        yield number, validator(_parse_json_line(path, number, text), path, number)


def validate_jsonl(path: PathLike, validator: Callable[[dict[str, Any], Path, int], Any]) -> int:
    """Validate a whole JSONL file in one streaming pass (constant memory).

    Use it before model work so that a bad line 9,000,000 fails in seconds,
    not hours into training.

    Args:
        path: The JSONL file.
        validator: Per-record validator, as for :func:`iter_jsonl`.

    Returns:
        The number of records.

    Raises:
        DataError: On the first bad line, or when the file has no records.
    """
    count = 0
    for _ in iter_jsonl(path, validator):
        count += 1
    _require_records(Path(path), count, "record")
    return count


# --------------------------------------------------------------------------- corpus / queries


def _resolve_beir_member(path: Path, member: str) -> Path:
    if path.is_dir():
        for name in (member, member + ".gz"):
            if (path / name).is_file():
                return path / name
        raise DataError(
            path, None, None, f"expected a BEIR dataset directory containing {member}, found no {member} in it",
            fix=f"pass the {member} file itself or the directory that holds it",
        )
    return path


def read_corpus(path: PathLike) -> dict[str, Doc]:
    """Read a corpus: BEIR ``corpus.jsonl``, a BEIR directory, or TSV ``docid<TAB>text``.

    JSONL records need ``_id`` (string or integer) and ``text`` (string);
    ``title`` is optional (missing or null -> ``""``); other keys (``metadata``)
    are ignored. TSV lines are split on the first tab only, so passages may
    contain tabs. Empty documents are allowed.

    Args:
        path: ``corpus.jsonl`` (or ``.gz``), a directory containing it, or a TSV file.

    Returns:
        ``{docid: Doc}`` in file order.

    Raises:
        DataError: Bad JSON, missing/mistyped fields, a TSV line without a tab,
            or a duplicate docid (naming both lines).
    """
    if _irds.is_irds(path):  # irds:ID, an ir_datasets dataset
        return {docid: Doc(docid, title, text) for docid, title, text in _irds.corpus(path)}
    path = _resolve_beir_member(Path(path), "corpus.jsonl")
    jsonl = _looks_like_jsonl(path)
    corpus: dict[str, Doc] = {}

    if jsonl:
        def key_of(number: int, text: str) -> str | None:
            return str(json.loads(text).get("_id"))
    else:
        def key_of(number: int, text: str) -> str | None:
            return text.split("\t", 1)[0]

    for number, text in iter_lines(path):
        if jsonl:
            obj = _parse_json_line(path, number, text)
            docid = _get_id(obj, "_id", path, number)
            doc = Doc(
                docid,
                _get_str(obj, "title", path, number, required=False),
                _get_str(obj, "text", path, number),
            )
        else:
            if "\t" not in text:
                raise DataError(
                    path, number, "docid", "expected 'docid<TAB>text', got a line without a tab",
                    fix="separate the id from the text with a tab, or convert to BEIR corpus.jsonl",
                )
            raw_id, body = text.split("\t", 1)
            docid = _check_id(path, number, "docid", raw_id)
            doc = Doc(docid, "", body)
        if docid in corpus:
            first = _find_first(path, key_of, docid, number)
            raise DataError(
                path, number, "_id" if jsonl else "docid",
                f"duplicate docid {docid!r} on {_lines_phrase(first, number)}",
                fix="remove or rename one of the two documents",
            )
        corpus[docid] = doc
    _require_records(path, len(corpus), "document")
    return corpus


def read_queries(path: PathLike) -> dict[str, str]:
    """Read queries: BEIR ``queries.jsonl`` (``_id``, ``text``) or TSV ``qid<TAB>text``.

    A BEIR directory is accepted too (its ``queries.jsonl`` is read). Query
    text is returned as written (no stripping) and must not be blank.

    Args:
        path: The queries / topics file, or a BEIR directory.

    Returns:
        ``{qid: text}`` in file order.

    Raises:
        DataError: Bad JSON, missing/mistyped fields, empty query text, a TSV
            line without a tab, or a duplicate qid (naming both lines).
    """
    if _irds.is_irds(path):
        return _irds.queries(path)
    path = _resolve_beir_member(Path(path), "queries.jsonl")
    jsonl = _looks_like_jsonl(path)
    queries: dict[str, str] = {}

    if jsonl:
        def key_of(number: int, text: str) -> str | None:
            return str(json.loads(text).get("_id"))
    else:
        def key_of(number: int, text: str) -> str | None:
            return text.split("\t", 1)[0]

    for number, text in iter_lines(path):
        if jsonl:
            obj = _parse_json_line(path, number, text)
            qid = _get_id(obj, "_id", path, number)
            query = _get_str(obj, "text", path, number, non_empty=True)
        else:
            if "\t" not in text:
                raise DataError(
                    path, number, "qid", "expected 'qid<TAB>query text', got a line without a tab",
                    fix="separate the query id from its text with a tab",
                )
            raw_id, query = text.split("\t", 1)
            qid = _check_id(path, number, "qid", raw_id)
            if not query.strip():
                raise DataError(path, number, "text", f"expected non-empty query text for qid {qid!r}, got {query!r}", fix="fill in the query or drop the line")
        if qid in queries:
            first = _find_first(path, key_of, qid, number)
            raise DataError(
                path, number, "_id" if jsonl else "qid",
                f"duplicate qid {qid!r} on {_lines_phrase(first, number)}",
                fix="remove or rename one of the two queries",
            )
        queries[qid] = query
    _require_records(path, len(queries), "query")
    return queries


# --------------------------------------------------------------------------- qrels


def read_qrels(path: PathLike) -> dict[str, dict[str, int]]:
    """Read relevance judgments.

    Two layouts, told apart by the column count of the first data line:

    * TREC: ``qid 0 docid grade`` (4 whitespace-separated columns; the second
      column is ignored);
    * BEIR ``qrels/*.tsv``: ``query-id<TAB>corpus-id<TAB>score`` with a header
      line (a first line whose score column is not a number is taken as header).

    Grades are integers (``"2.0"`` is accepted as 2; negative grades are kept).
    A repeated (qid, docid) with the same grade is ignored; with a different
    grade it is an error.

    Args:
        path: The qrels file.

    Returns:
        ``{qid: {docid: grade}}``.

    Raises:
        DataError: Wrong column count, non-integer grade, conflicting duplicates.
    """
    if _irds.is_irds(path):
        return _irds.qrels(path)
    path = Path(path)
    qrels: dict[str, dict[str, int]] = {}
    ncols: int | None = None
    count = 0
    for number, text in iter_lines(path):
        cols = text.split()
        if ncols is None:
            if len(cols) == 3:
                try:
                    float(cols[2])
                except ValueError:
                    continue  # BEIR header "query-id corpus-id score"
            if len(cols) not in (3, 4):
                raise DataError(
                    path, number, None,
                    f"expected TREC qrels 'qid 0 docid grade' (4 columns) or BEIR 'query-id<TAB>corpus-id<TAB>score' (3 columns), got {len(cols)} columns",
                    fix="check the file is a qrels file (a run file has 6 columns)",
                )
            ncols = len(cols)
        if len(cols) != ncols:
            layout = "'qid 0 docid grade'" if ncols == 4 else "'query-id<TAB>corpus-id<TAB>score'"
            raise DataError(path, number, None, f"expected {ncols} columns {layout} like the first line, got {len(cols)}", fix="fix or remove the malformed line")
        qid = _check_id(path, number, "qid", cols[0])
        docid = _check_id(path, number, "docid", cols[-2])
        grade = _parse_int(path, number, "grade", cols[-1])
        per_query = qrels.setdefault(qid, {})
        if docid in per_query and per_query[docid] != grade:
            first = _find_first(path, lambda n, t: (t.split()[0], t.split()[-2]), (qid, docid), number)
            raise DataError(
                path, number, "grade",
                f"conflicting grades {per_query[docid]} and {grade} for qid {qid!r}, docid {docid!r} on {_lines_phrase(first, number)}",
                fix="keep one judgment per (query, document)",
            )
        per_query[docid] = grade
        count += 1
    _require_records(path, count, "judgment")
    return qrels


# --------------------------------------------------------------------------- runs


def read_run(path: PathLike) -> dict[str, list[tuple[str, float]]]:
    """Read a TREC run ``qid Q0 docid rank score tag``.

    Args:
        path: The run file (6 whitespace-separated columns; column 2 and the tag
            are not checked).

    Returns:
        ``{qid: [(docid, score), ...]}``; queries in order of first appearance,
        each list in :func:`trec_order` (score descending, ties by docid
        descending): the order trec_eval and ir_measures evaluate, whatever the
        rank column says.

    Raises:
        DataError: Wrong column count, non-numeric rank/score, NaN score, or the
            same (qid, docid) twice (naming both lines).
    """
    if _irds.is_irds(path):  # the dataset's scoreddocs, in trec_eval's order
        return {qid: trec_order(ranked) for qid, ranked in _irds.scoreddocs(path).items()}
    path = Path(path)
    rows: dict[str, dict[str, tuple[float, int, int]]] = {}
    for number, text in iter_lines(path):
        cols = text.split()
        if len(cols) != 6:
            hint = "this looks like a qrels file; pass it as --qrels" if len(cols) == 4 else "write 'qid Q0 docid rank score tag'"
            raise DataError(path, number, None, f"expected 6 whitespace-separated columns 'qid Q0 docid rank score tag', got {len(cols)}", fix=hint)
        qid = _check_id(path, number, "qid", cols[0])
        docid = _check_id(path, number, "docid", cols[2])
        rank = _parse_int(path, number, "rank", cols[3])
        score = _parse_float(path, number, "score", cols[4])
        per_query = rows.setdefault(qid, {})
        if docid in per_query:
            first = per_query[docid][2]
            raise DataError(
                path, number, "docid",
                f"duplicate (qid {qid!r}, docid {docid!r}) on lines {first} and {number}",
                fix="keep one line per (query, document)",
            )
        per_query[docid] = (score, rank, number)
    _require_records(path, len(rows), "run line")
    return {
        qid: trec_order((d, s) for d, (s, _, _) in per.items())
        for qid, per in rows.items()
    }


def _check_token(what: str, value: Any) -> str:
    if not isinstance(value, str) or not value or any(ch.isspace() for ch in value):
        raise ValueError(f"{what} must be a non-empty string without whitespace, got {value!r}")
    return value


def trec_order(items: Iterable[tuple[str, float]]) -> list[tuple[str, float]]:
    """``(docid, score)`` pairs in the order trec_eval (and so ir_measures, pytrec_eval) ranks them: score
    descending, ties by docid descending. Every reader and writer of runs in tsarank uses it, so that the order a
    run is re-ranked in, cut at ``--top-k`` in, and evaluated in are one order.
    """
    ordered = sorted(items, key=lambda it: it[0], reverse=True)
    ordered.sort(key=lambda it: -it[1])  # stable: equal scores keep the docid-descending order
    return ordered


def format_run_lines(qid: str, ranked: Iterable[tuple[str, float]], tag: str = "tsarank", top_k: int | None = None) -> list[str]:
    """Format one query's ranking as TREC run lines.

    The candidates are put in :func:`trec_order` (score descending, ties by
    docid descending, as trec_eval ranks them), cut to ``top_k`` and numbered 1..k. Scores are written with
    :data:`RUN_SCORE_FORMAT` (``format(score, ".8g")``).

    Args:
        qid: Query id.
        ranked: ``(docid, score)`` pairs, any order.
        tag: Run tag (no whitespace).
        top_k: Keep the best ``top_k`` (all when ``None``).

    Returns:
        Lines ``"qid Q0 docid rank score tag\\n"``, each ending in a newline,
        ready for ``file.writelines``.

    Raises:
        ValueError: Ids or tag with whitespace, a NaN score, a repeated docid.
    """
    _check_token("qid", qid)
    _check_token("tag", tag)
    items = []
    seen: set[str] = set()
    for docid, score in ranked:
        _check_token(f"docid (query {qid!r})", docid)
        if docid in seen:
            raise ValueError(f"docid {docid!r} appears twice in the ranking of query {qid!r}")
        seen.add(docid)
        score = float(score)
        if math.isnan(score):
            raise ValueError(f"score of docid {docid!r} for query {qid!r} is NaN")
        items.append((docid, score))
    items = trec_order(items)
    if top_k is not None:
        items = items[:top_k]
    return [f"{qid} Q0 {docid} {rank} {format(score, RUN_SCORE_FORMAT)} {tag}\n" for rank, (docid, score) in enumerate(items, 1)]


def write_run(path: PathLike, run: Mapping[str, Iterable[tuple[str, float]]], tag: str = "tsarank", top_k: int | None = None) -> None:
    """Write a TREC run atomically (temp file in the same directory, fsync, ``os.replace``).

    Queries are written in the mapping's order; each is formatted with
    :func:`format_run_lines` (:func:`trec_order`, ranks 1..k, one tag).
    A crash leaves either the old file or the complete new one, never half a run.

    Args:
        path: Output file.
        run: ``{qid: [(docid, score), ...]}``.
        tag: Run tag.
        top_k: Keep the best ``top_k`` per query.
    """
    with atomic_open(path) as fh:
        for qid, ranked in run.items():
            fh.writelines(format_run_lines(qid, ranked, tag=tag, top_k=top_k))


# --------------------------------------------------------------------------- rank_llm JSON


def _iter_json_entries(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line, element)`` for a JSON array file (or JSON Lines), with the line each element starts on."""
    _check_file(path)
    with _open_binary(path) as fh:
        raw = fh.read()
    if _utf16(raw[:4096]):
        raise _utf16_error(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(path, line, None, "expected UTF-8 text, got bytes that are not valid UTF-8", fix="re-encode the file as UTF-8") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    decoder = json.JSONDecoder()
    n = len(text)
    idx, line, line_pos = 0, 1, 0

    def skip_ws(i: int) -> int:
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    def line_at(i: int) -> int:
        nonlocal line, line_pos
        line += text.count("\n", line_pos, i)
        line_pos = i
        return line

    idx = skip_ws(idx)
    if idx == n:
        raise DataError(path, None, None, "expected a JSON array of {\"query\", \"hits\"} objects, got an empty file")
    is_array = text[idx] == "["
    if is_array:
        idx = skip_ws(idx + 1)
        if idx < n and text[idx] == "]":
            return
    while idx < n:
        start_line = line_at(idx)
        try:
            obj, idx = decoder.raw_decode(text, idx)
        except json.JSONDecodeError as exc:
            raise DataError(path, exc.lineno, None, f"expected valid JSON, got {exc.msg} at column {exc.colno}", fix="repair or re-export the file") from None
        yield start_line, obj
        idx = skip_ws(idx)
        if not is_array:
            continue
        if idx < n and text[idx] == ",":
            idx = skip_ws(idx + 1)
            continue
        if idx < n and text[idx] == "]":
            if skip_ws(idx + 1) != n:
                raise DataError(path, line_at(idx), None, "expected end of file after the closing ']', got more text")
            return
        raise DataError(path, line_at(min(idx, n)), None, "expected ',' or ']' between array elements", fix="repair or re-export the file")
    if is_array:
        raise DataError(path, line_at(n), None, "expected ']' closing the array, got end of file", fix="the file is truncated; re-export it")


#: Keys of a rank_llm Request candidate's ``doc`` that hold its text, in the order rank_llm itself reads them.
RANK_LLM_TEXT_KEYS = ("text", "segment", "contents", "content", "body", "passage")


class _Candidates:
    """The candidates of one rank_llm entry as they are read: docids unique, a missing score replaced by ``-rank``
    (``-1, -2, ...`` by position) so that the file's order is kept. Shared by both layouts."""

    def __init__(self, path: Path, line: int, list_name: str, noun: str) -> None:
        self.path, self.line, self.list_name, self.noun = path, line, list_name, noun
        self.docids: list[str] = []
        self.texts: list[str] = []
        self.scores: list[float] = []
        self.positions: dict[str, int] = {}

    def claim(self, i: int, docid: str) -> None:
        """Candidate ``i`` is ``docid``; a docid seen before is an error naming both places."""
        if docid in self.positions:
            raise DataError(self.path, self.line, f"{self.list_name}[{i}].docid", f"duplicate docid {docid!r} (also "
                            f"{self.list_name}[{self.positions[docid]}])", fix=f"keep one {self.noun} per document")
        self.positions[docid] = i

    def add(self, i: int, docid: str, text: str, score: Any) -> None:
        """The claimed candidate ``i``'s text and score (``None``: ``-(i + 1)``)."""
        self.docids.append(docid)
        self.texts.append(text)
        self.scores.append(_check_number(self.path, self.line, f"{self.list_name}[{i}].score", score)
                           if score is not None else -float(i + 1))


def _request_entry(path: Path, line: int, entry: dict[str, Any]) -> tuple[str, str, _Candidates]:
    """rank_llm's current Request layout: ``{"query": {"text", "qid"}, "candidates": [{"docid", "score", "doc"}]}``
    where ``doc`` is a string or an object with a title and one of :data:`RANK_LLM_TEXT_KEYS`."""
    q = entry["query"]
    query = _get_str(q, "text", path, line, prefix="query.", non_empty=True)
    qid = _get_id(q, "qid", path, line, prefix="query.")
    cands = entry.get("candidates")
    if not isinstance(cands, list):
        raise DataError(path, line, "candidates", f"expected a list of candidates, got {describe(cands)}",
                        fix="each request needs \"candidates\": [{\"docid\", \"score\", \"doc\"}, ...]")
    got = _Candidates(path, line, "candidates", "candidate")
    for i, cand in enumerate(cands):
        prefix = f"candidates[{i}]."
        if not isinstance(cand, dict):
            raise DataError(path, line, f"candidates[{i}]", f"expected an object {{\"docid\", \"score\", \"doc\"}}, got {describe(cand)}")
        docid = _get_id(cand, "docid", path, line, prefix=prefix)
        got.claim(i, docid)
        doc = cand.get("doc")
        if isinstance(doc, str):
            text = doc
        elif isinstance(doc, dict):
            key = next((k for k in RANK_LLM_TEXT_KEYS if isinstance(doc.get(k), str)), None)
            if key is None:
                raise DataError(path, line, prefix + "doc", f"expected a text under one of {', '.join(RANK_LLM_TEXT_KEYS)}, got keys {sorted(doc)}")
            title = doc.get("title")
            text = f"{title} {doc[key]}" if isinstance(title, str) and title.strip() else doc[key]
        else:
            raise DataError(path, line, prefix + "doc", f"expected a string or an object with the text, got {describe(doc)}")
        got.add(i, docid, text, cand.get("score"))
    return qid, query, got


def _hits_entry(path: Path, line: int, entry: dict[str, Any]) -> tuple[str, str, _Candidates]:
    """rank_llm's "retrieve results" layout: ``{"query": str, "hits": [{"qid", "docid", "content", "score"?}]}``."""
    query = _get_str(entry, "query", path, line, non_empty=True)
    hits = entry.get("hits")
    if not isinstance(hits, list):
        raise DataError(path, line, "hits", f"expected a list of hits, got {describe(hits)}", fix="each entry needs \"hits\": [{\"qid\", \"docid\", \"content\"}, ...]")
    qid = _get_id(entry, "qid", path, line, required=False)
    got = _Candidates(path, line, "hits", "hit")
    for i, hit in enumerate(hits):
        prefix = f"hits[{i}]."
        if not isinstance(hit, dict):
            raise DataError(path, line, f"hits[{i}]", f"expected an object {{\"qid\", \"docid\", \"content\"}}, got {describe(hit)}")
        hit_qid = _get_id(hit, "qid", path, line, prefix=prefix)
        if qid is None:
            qid = hit_qid
        elif hit_qid != qid:
            raise DataError(path, line, prefix + "qid", f"expected qid {qid!r} like the entry's other hits, got {hit_qid!r}", fix="one entry per query")
        docid = _get_id(hit, "docid", path, line, prefix=prefix)
        got.claim(i, docid)
        got.add(i, docid, _get_str(hit, "content", path, line, prefix=prefix), hit.get("score"))
    if qid is None:
        raise DataError(path, line, "qid", "entry has no hits and no 'qid', so its query id is unknown", fix="add \"qid\" to the entry or drop it")
    return qid, query, got


def format_rank_llm_request(qid: str, query: str, ranked: Iterable[tuple[str, float]], texts: Mapping[str, str]) -> str:
    """One rank_llm Request as a JSON line: ``{"query": {"text", "qid"}, "candidates": [{"docid", "score", "doc":
    {"text"}}]}``, candidates in :func:`trec_order` (best first, as rank_llm writes them), scores as in TREC runs.

    Args:
        qid: Query id.
        query: Query text.
        ranked: ``(docid, score)`` pairs, any order.
        texts: Text of each docid.

    Returns:
        The line, ending in a newline.
    """
    cands = [{"docid": d, "score": float(format(s, RUN_SCORE_FORMAT)), "doc": {"text": texts[d]}}
             for d, s in trec_order(ranked)]
    return json.dumps({"query": {"text": query, "qid": qid}, "candidates": cands}, ensure_ascii=False) + "\n"


def read_rank_llm(path: PathLike) -> list[CandidateList]:
    """Read rank_llm JSON, in either of its layouts (detected per entry):

    - the current Request layout (JSON Lines or an array): ``{"query": {"text", "qid"}, "candidates": [{"docid",
      "score", "doc"}]}``, ``doc`` a string or an object (``title`` plus ``text``/``segment``/``contents``/...);
    - the "retrieve results" layout: ``[{"query": str, "hits": [{"qid", "docid", "content", ...}]}]``.

    The array may also be written as JSON Lines (one entry per line). Hits keep
    their order in the file (rank_llm writes them best first). ``score`` is
    optional per hit; when absent ``-rank`` (``-1, -2, ...`` by position) stands
    in so that the order is kept. The qid comes from the hits (all hits of an
    entry must share it) or from an optional top-level ``"qid"`` key, which an
    entry without hits needs. Errors name the line the entry starts on and the
    field, e.g. ``hits[7].docid``.

    Args:
        path: The JSON file.

    Returns:
        One :class:`CandidateList` per entry, in file order.

    Raises:
        DataError: Any malformed entry, a repeated docid within an entry, a
            repeated qid across entries.
    """
    path = Path(path)
    out: list[CandidateList] = []
    seen_qids: dict[str, int] = {}
    for line, entry in _iter_json_entries(path):
        if not isinstance(entry, dict):
            raise DataError(path, line, None, f"expected an object {{\"query\", \"hits\"}}, got {describe(entry)}")
        request = isinstance(entry.get("query"), dict)  # rank_llm's Request layout; else the "hits" one
        qid, query, got = (_request_entry if request else _hits_entry)(path, line, entry)
        if qid in seen_qids:
            raise DataError(path, line, "query.qid" if request else "qid", f"duplicate qid {qid!r} in entries starting "
                            f"on lines {seen_qids[qid]} and {line}", fix="merge the two entries")
        seen_qids[qid] = line
        out.append(CandidateList(qid, query, got.docids, got.texts, got.scores))
    _require_records(path, len(out), "entry")
    return out


# --------------------------------------------------------------------------- candidates


def _is_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike))


def load_candidates(
    run: PathLike | Mapping[str, Sequence[tuple[str, float]]] | None = None,
    queries: PathLike | Mapping[str, str] | None = None,
    corpus: PathLike | Mapping[str, Doc] | None = None,
    candidates: PathLike | Sequence[CandidateList] | None = None,
    top_k: int | None = None,
) -> tuple[list[CandidateList], list[str]]:
    """Assemble re-ranking inputs from run + queries + corpus, or from rank_llm JSON.

    Each argument may be a path (read with the matching reader) or an already
    loaded object. ``top_k`` keeps the first-stage top k of each query *before*
    documents missing from the corpus are dropped.

    Args:
        run: TREC run (path or :func:`read_run` result).
        queries: Queries (path or ``{qid: text}``).
        corpus: Corpus (path or ``{docid: Doc}``).
        candidates: rank_llm JSON (path or list of :class:`CandidateList`);
            exclusive with ``run``/``queries``/``corpus``.
        top_k: Candidates kept per query (all when ``None``).

    Returns:
        ``(candidate_lists, missing_docids)``: one list per run query, in run
        order, and the docids of the run that the corpus lacks (unique, in order
        of first appearance; they are left out of the candidate lists).

    Raises:
        ValueError: Wrong combination of arguments or bad ``top_k``.
        DataError: A run query has no text in the queries (or any reader error).
    """
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if candidates is not None:
        if run is not None or queries is not None or corpus is not None:
            raise ValueError("pass either candidates= (rank_llm JSON) or run= + queries= + corpus=, not both")
        lists = read_rank_llm(candidates) if _is_path(candidates) else list(candidates)
        return [c.head(top_k) for c in lists], []
    if run is None or queries is None or corpus is None:
        missing = [name for name, v in (("run", run), ("queries", queries), ("corpus", corpus)) if v is None]
        raise ValueError(f"missing {', '.join(missing)}: pass run=, queries= and corpus= together, or candidates= (rank_llm JSON)")

    run_map = read_run(run) if _is_path(run) else run
    query_map = read_queries(queries) if _is_path(queries) else queries
    corpus_map = read_corpus(corpus) if _is_path(corpus) else corpus

    no_text = [qid for qid in run_map if not (isinstance(query_map.get(qid), str) and query_map[qid].strip())]
    if no_text:
        qid = no_text[0]
        where: PathLike = run if _is_path(run) else "<run>"
        line = None
        if _is_path(run):
            line = _find_first(Path(run), lambda n, t: t.split()[0], qid, math.inf)  # type: ignore[arg-type]
        source = str(queries) if _is_path(queries) else "the queries given"
        examples = ", ".join(repr(q) for q in no_text[:5])
        raise DataError(
            where, line, "qid",
            f"expected every run query to have text in {source}; {len(no_text)} of {len(run_map)} have none (e.g. {examples})",
            fix="pass the queries/topics file that belongs to this run (same query ids)",
        )

    lists: list[CandidateList] = []
    missing_docs: dict[str, None] = {}
    for qid, ranked in run_map.items():
        ranked = list(ranked)[:top_k] if top_k is not None else list(ranked)
        docids, texts, scores = [], [], []
        for docid, score in ranked:
            doc = corpus_map.get(docid)
            if doc is None:
                missing_docs.setdefault(docid, None)
                continue
            docids.append(docid)
            texts.append(doc.full_text)
            scores.append(float(score))
        lists.append(CandidateList(qid, query_map[qid], docids, texts, scores))
    return lists, list(missing_docs)


# --------------------------------------------------------------------------- training data


def parse_weak_pair(obj: dict[str, Any], path: Path, line: int) -> tuple[str, str]:
    """Validate one weak-supervision (CPT) record and return ``(text, query)``.

    Accepted records:

    * ``{"text": str, "query": str}``;
    * RankingGPT's ``{"query": "Document: <text> Query:", "response": "<query>"}``:
      the ``Document:`` prefix and trailing ``Query:`` are removed to recover the text.

    Both returned strings are stripped and must be non-empty.

    Raises:
        DataError: Unknown layout, wrong types, empty text or query.
    """
    if "response" in obj:
        prompt = _get_str(obj, "query", path, line, non_empty=True)
        query = _get_str(obj, "response", path, line, non_empty=True).strip()
        body = prompt.strip()
        if not (body.startswith(_RANKING_GPT_PREFIX) and body.endswith(_RANKING_GPT_SUFFIX)):
            raise DataError(
                path, line, "query",
                f"expected a RankingGPT prompt 'Document: <text> Query:', got {describe(prompt)}",
                fix="use {\"text\": ..., \"query\": ...} records for plain pairs",
            )
        text = body[len(_RANKING_GPT_PREFIX): len(body) - len(_RANKING_GPT_SUFFIX)].strip()
        if not text:
            raise DataError(path, line, "query", "expected document text between 'Document:' and 'Query:', got none", fix="drop the record")
        return text, query
    if "text" in obj or "query" in obj:
        text = _get_str(obj, "text", path, line, non_empty=True).strip()
        query = _get_str(obj, "query", path, line, non_empty=True).strip()
        return text, query
    raise DataError(
        path, line, None,
        f"expected a weak pair {{\"text\", \"query\"}} or RankingGPT {{\"query\": \"Document: ... Query:\", \"response\"}}, got keys {sorted(obj)}",
        fix="rename the fields",
    )


def read_weak_pairs(path: PathLike) -> Iterator[tuple[int, str, str]]:
    """Stream weak (text, query) pairs for continual pre-training.

    Lazy: a bad record raises when it is reached. Call
    ``validate_jsonl(path, parse_weak_pair)`` first to check the whole file
    up front.

    Yields:
        ``(line_number, text, query)``.

    Raises:
        DataError: A malformed record (see :func:`parse_weak_pair`) or an empty file.
    """
    count = 0
    for number, (text, query) in iter_jsonl(path, parse_weak_pair):
        count += 1
        yield number, text, query
    _require_records(Path(path), count, "pair")


def _parse_passages(obj: dict[str, Any], key: str, path: Path, line: int, required: bool) -> list[dict[str, Any]]:
    if key not in obj:
        if required:
            raise DataError(path, line, key, f"missing; the object has keys {sorted(obj)}", fix=f"add \"{key}\": [{{\"docid\", \"text\"}}, ...]")
        return []
    items = obj[key]
    if not isinstance(items, list):
        raise DataError(path, line, key, f"expected a list of passages, got {describe(items)}")
    passages = []
    for i, passage in enumerate(items):
        prefix = f"{key}[{i}]."
        if not isinstance(passage, dict):
            raise DataError(path, line, f"{key}[{i}]", f"expected an object {{\"docid\"?, \"title\"?, \"text\"}}, got {describe(passage)}")
        docid = _get_id(passage, "docid", path, line, prefix=prefix, required=False)
        title = _get_str(passage, "title", path, line, prefix=prefix, required=False)
        text = _get_str(passage, "text", path, line, prefix=prefix)
        if not (title.strip() or text.strip()):
            raise DataError(path, line, prefix + "text", "expected a passage with text or title, got an empty one", fix="drop the empty passage")
        passages.append({"docid": docid, "title": title, "text": text})
    return passages


def parse_group(obj: dict[str, Any], path: Path, line: int) -> dict[str, Any]:
    """Validate one SFT ranking group and return it normalised.

    Input: ``{"query_id"?, "query", "positive_passages": [{"docid"?, "title"?, "text"}],
    "negative_passages"?: [...], "teacher_scores"?: [float]}``; other keys are ignored.

    Returns:
        ``{"query_id": str | None, "query": str, "positive_passages": [...],
        "negative_passages": [...], "teacher_scores": list[float] | None}`` where
        each passage is ``{"docid": str | None, "title": str, "text": str}``.
        ``negative_passages`` defaults to ``[]`` (negatives can be mined later).

    Raises:
        DataError: Wrong types, no positive passage, empty passage, or
            ``teacher_scores`` not aligned with positives + negatives.
    """
    query_id = _get_id(obj, "query_id", path, line, required=False)
    query = _get_str(obj, "query", path, line, non_empty=True)
    positives = _parse_passages(obj, "positive_passages", path, line, required=True)
    if not positives:
        raise DataError(path, line, "positive_passages", "expected at least one positive passage, got an empty list", fix="drop the group or add its relevant passage")
    negatives = _parse_passages(obj, "negative_passages", path, line, required=False)
    teacher = obj.get("teacher_scores")
    if teacher is not None:
        if not isinstance(teacher, list):
            raise DataError(path, line, "teacher_scores", f"expected a list of numbers, got {describe(teacher)}")
        teacher = [_check_number(path, line, f"teacher_scores[{i}]", v, allow_inf=False) for i, v in enumerate(teacher)]
        expected = len(positives) + len(negatives)
        if len(teacher) != expected:
            raise DataError(
                path, line, "teacher_scores",
                f"expected {expected} scores (one per positive then negative passage: {len(positives)} + {len(negatives)}), got {len(teacher)}",
                fix="align teacher_scores with positive_passages + negative_passages",
            )
    return {
        "query_id": query_id,
        "query": query,
        "positive_passages": positives,
        "negative_passages": negatives,
        "teacher_scores": teacher,
    }


def read_groups(path: PathLike) -> list[dict[str, Any]]:
    """Read and validate all SFT ranking groups of a JSONL file (see :func:`parse_group`).

    Returns:
        The normalised groups in file order.

    Raises:
        DataError: The first malformed group, or an empty file.
    """
    groups = [group for _, group in iter_jsonl(path, parse_group)]
    _require_records(Path(path), len(groups), "group")
    return groups
