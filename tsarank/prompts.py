"""Prompt template and token-budget truncation: the one place that turns (query, doc) text into model inputs.

Both training stages and inference call :func:`encode_pairs`, so a score computed by :class:`tsarank.Ranker`
is exactly the quantity the model was trained on. Documents and queries are truncated on token ids *before*
the template is filled, so a long document can never push the query (or the template) out of the budget.
The tokenizer's own special-token defaults are applied once, to the full filled-in text (no BOS/EOS by hand).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Sequence

# Scoring heads a checkpoint may declare.
QUERY_LIKELIHOOD = "query_likelihood"
LAST_TOKEN = "last_token"
SCORING_HEADS = (QUERY_LIKELIHOOD, LAST_TOKEN)


@dataclass(frozen=True)
class PromptTemplate:
    """How a (query, document) pair becomes text, and the token budgets applied first.

    For the ``query_likelihood`` head the text is ``source.format(doc=...) + target.format(query=...)`` and the
    score is the mean log-probability of the target's tokens. For the ``last_token`` head (RankLLaMA) the text
    is ``source.format(doc=..., query=...)`` followed by the tokenizer's EOS token; ``target`` is unused.

    Attributes:
        source: Text before the scored span; must contain ``{doc}``.
        target: The scored span; must contain ``{query}`` (query-likelihood head only).
        max_doc_tokens: Document budget in tokens (without special tokens).
        max_query_tokens: Query budget in tokens (without special tokens).
        scoring_head: ``"query_likelihood"`` or ``"last_token"``.
    """

    source: str = "Document: {doc} Query:"
    target: str = " {query}"
    max_doc_tokens: int = 256
    max_query_tokens: int = 32
    scoring_head: str = QUERY_LIKELIHOOD

    def __post_init__(self) -> None:
        if self.scoring_head not in SCORING_HEADS:
            raise ValueError(f"scoring_head must be one of {SCORING_HEADS}, got {self.scoring_head!r}")
        if "{doc}" not in self.source:
            raise ValueError(f"template source must contain '{{doc}}', got {self.source!r}")
        if self.scoring_head == QUERY_LIKELIHOOD and "{query}" not in self.target:
            raise ValueError(f"template target must contain '{{query}}', got {self.target!r}")
        if self.scoring_head == LAST_TOKEN and "{query}" not in self.source:
            raise ValueError(f"a last_token template's source must contain '{{query}}', got {self.source!r}")
        if self.max_doc_tokens < 0 or self.max_query_tokens < 1:
            raise ValueError(
                f"token budgets must be max_doc_tokens >= 0 and max_query_tokens >= 1, got "
                f"{self.max_doc_tokens} and {self.max_query_tokens}"
            )

    @classmethod
    def last_token(cls, **kw: Any) -> "PromptTemplate":
        """RankLLaMA's prompt: ``"query: {query} document: {doc}</s>"``."""
        return cls(source="query: {query} document: {doc}", target="", scoring_head=LAST_TOKEN, **kw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PromptTemplate":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class EncodedPair:
    """One tokenized (query, doc) pair.

    Attributes:
        input_ids: Token ids of the full sequence, special tokens included.
        target_start: Index of the first scored (query) token; for ``last_token`` the index of the last token.
        target_end: One past the last scored token.
    """

    input_ids: list[int]
    target_start: int
    target_end: int


def _truncate(tokenizer: Any, texts: Sequence[str], budget: int) -> list[str]:
    """Cut each text to at most ``budget`` tokens (no special tokens); texts within budget are returned unchanged.

    The cut is made in the *original string*, at the character offset where token ``budget`` starts, so the
    kept text is an exact prefix of the input: no ``decode`` round trip, hence no U+FFFD where a byte-level
    token splits a multi-byte character (the partial character is dropped instead) and no clean-up of spaces.
    For ordinary text the prefix re-tokenizes to exactly the first ``budget`` tokens.
    """
    if not texts:
        return []
    enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    out = list(texts)
    cut_at: dict[int, list[int]] = {}  # text index -> candidate cut offsets, best first
    for i, (ids, offsets) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
        if len(ids) > budget:
            # Start offsets of tokens budget, budget-1, ...: fall back to an earlier one if re-tokenizing the
            # prefix ever gives more than `budget` tokens (BPE of a prefix can differ from a prefix of BPE).
            starts = sorted({s for s, _ in offsets[: budget + 1]}, reverse=True)
            cut_at[i] = starts
            out[i] = texts[i][: starts[0]]
    pending = list(cut_at)
    while pending:
        lengths = tokenizer([out[i] for i in pending], add_special_tokens=False)["input_ids"]
        retry = []
        for i, ids in zip(pending, lengths):
            if len(ids) > budget and len(cut_at[i]) > 1:
                cut_at[i].pop(0)
                out[i] = texts[i][: cut_at[i][0]]
                retry.append(i)
        pending = retry
    return out


def check_query(query: Any, where: str = "query") -> str:
    """Validate one query string (non-empty after stripping)."""
    if not isinstance(query, str):
        raise TypeError(f"{where} must be a str, got {type(query).__name__}")
    if not query.strip():
        raise ValueError(f"{where} is empty; a query-likelihood score needs at least one query token")
    return query


def encode_pairs(
    tokenizer: Any, template: PromptTemplate, queries: Sequence[str], docs: Sequence[str]
) -> list[EncodedPair]:
    """Tokenize (query, doc) pairs with the template, truncating each part to its budget first.

    Args:
        tokenizer: A fast HF tokenizer (offset mapping is needed to locate the query span).
        template: The prompt template and budgets.
        queries: Query texts, length N.
        docs: Document texts, length N (may be empty strings).

    Returns:
        N :class:`EncodedPair`, the scored span located by character offsets so that tokenizers that merge
        across the boundary or add special tokens still get the right span.
    """
    if len(queries) != len(docs):
        raise ValueError(f"got {len(queries)} queries but {len(docs)} docs")
    if not queries:
        return []
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("tsarank needs a fast (Rust) tokenizer to locate the query span; load it with use_fast=True")
    qs = _truncate(tokenizer, queries, template.max_query_tokens)
    ds = _truncate(tokenizer, docs, template.max_doc_tokens)
    if template.scoring_head == LAST_TOKEN:
        eos = tokenizer.eos_token or ""
        texts = [template.source.format(doc=d, query=q) + eos for q, d in zip(qs, ds)]
        enc = tokenizer(texts, add_special_tokens=True)
        return [EncodedPair(ids, len(ids) - 1, len(ids)) for ids in enc["input_ids"]]

    sources = [template.source.format(doc=d) for d in ds]
    texts = [s + template.target.format(query=q) for s, q in zip(sources, qs)]
    enc = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True)
    out = []
    for src, ids, offsets in zip(sources, enc["input_ids"], enc["offset_mapping"]):
        boundary = len(src)
        # Query tokens: real (non-special, non-empty span) tokens ending after the source text.
        span = [i for i, (s, e) in enumerate(offsets) if e > s and e > boundary]
        if not span:
            raise ValueError(f"query produced no tokens after the template source {src[-40:]!r}")
        out.append(EncodedPair(list(ids), span[0], span[-1] + 1))
    return out
