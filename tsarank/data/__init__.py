"""Data readers and writers (see :mod:`tsarank.data.formats`)."""

from tsarank.data.formats import (
    CandidateList,
    Doc,
    format_run_lines,
    iter_jsonl,
    load_candidates,
    parse_group,
    parse_weak_pair,
    read_corpus,
    read_groups,
    read_qrels,
    read_queries,
    read_rank_llm,
    read_run,
    read_weak_pairs,
    validate_jsonl,
    write_run,
)
from tsarank.errors import DataError

__all__ = [
    "CandidateList",
    "DataError",
    "Doc",
    "format_run_lines",
    "iter_jsonl",
    "load_candidates",
    "parse_group",
    "parse_weak_pair",
    "read_corpus",
    "read_groups",
    "read_qrels",
    "read_queries",
    "read_rank_llm",
    "read_run",
    "read_weak_pairs",
    "validate_jsonl",
    "write_run",
]
