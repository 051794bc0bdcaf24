"""Prompt template and token-budget truncation: the one place that turns (query, doc) text into model inputs.

Both training stages and inference call :func:`encode_pairs`, so a score computed by :class:`tsarank.Ranker`
is exactly the quantity the model was trained on. Documents and queries are truncated on token ids *before*
the template is filled, so a long document can never push the query (or the template) out of the budget.
The tokenizer's own special-token defaults are applied once, to the full filled-in text (no BOS/EOS by hand).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Sequence

# Scoring heads a checkpoint may declare.
QUERY_LIKELIHOOD = "query_likelihood"
LAST_TOKEN = "last_token"
SCORING_HEADS = (QUERY_LIKELIHOOD, LAST_TOKEN)

#: How a template turns text into token ids (see :class:`PromptTemplate`).
STYLES = ("tsarank", "rankinggpt", "rankllama")
#: The margin RankingGPT's eval.py leaves when it sizes the document budget (``512 - prompt - query - 10``).
RANKINGGPT_MARGIN = 10


@dataclass(frozen=True)
class PromptTemplate:
    """How a (query, document) pair becomes token ids, and the token budgets applied first.

    Three styles, each the exact construction of the code that trained the checkpoints using it:

    - ``"tsarank"`` (default). ``query_likelihood``: the text ``source.format(doc) + target.format(query)``
      tokenized as one string; the scored tokens are located by character offsets (those ending after the
      source). ``last_token``: ``source.format(doc, query)`` plus the EOS token; the last token is scored.
      Documents and queries are cut to their budgets as exact prefixes of the text.
    - ``"rankinggpt"``: RankingGPT's released code (pretrain.py, sft.py, eval.py): the text ``source + query`` with
      no space before the query (``"Document: {doc} Query:{query}"``) tokenized as one string, and the scored tokens
      are those after the first ``len(tokenize(source))`` tokens (the released label mask). Texts are cut by
      ``decode(encode(text)[:budget])``; with ``max_length`` the document budget follows eval.py:
      ``max_length - len(encode(prompt)) - len(encode(query)) - 10``.
    - ``"rankllama"`` (``last_token``): RankLLaMA's released usage, ``tokenizer(source.format(query),
      target.format(doc))`` as a text pair (``"query: {query}"``, ``"document: {doc}"``), no EOS; the last token is
      scored.

    Attributes:
        source: Text before the scored span (``{doc}``); for ``rankllama`` the first segment (``{query}``).
        target: The scored span (``{query}``); for ``rankllama`` the second segment (``{doc}``); unused by the
            ``tsarank`` last-token prompt.
        max_doc_tokens: Document budget in tokens (without special tokens).
        max_query_tokens: Query budget in tokens (without special tokens).
        scoring_head: ``"query_likelihood"`` or ``"last_token"``.
        style: ``"tsarank"``, ``"rankinggpt"`` or ``"rankllama"``.
        max_length: Optional total budget; the document gets what the prompt and the query leave (RankingGPT's
            evaluation rule, with its margin of 10 tokens), capped at ``max_doc_tokens``.
    """

    source: str = "Document: {doc} Query:"
    target: str = " {query}"
    max_doc_tokens: int = 256
    max_query_tokens: int = 32
    scoring_head: str = QUERY_LIKELIHOOD
    style: str = "tsarank"
    max_length: int | None = None

    def __post_init__(self) -> None:
        if self.scoring_head not in SCORING_HEADS:
            raise ValueError(f"scoring_head must be one of {SCORING_HEADS}, got {self.scoring_head!r}")
        if self.style not in STYLES:
            raise ValueError(f"template style must be one of {STYLES}, got {self.style!r}")
        need = {  # where each placeholder must be, per style and head
            ("tsarank", QUERY_LIKELIHOOD): (("source", "{doc}"), ("target", "{query}")),
            ("tsarank", LAST_TOKEN): (("source", "{doc}"), ("source", "{query}")),
            ("rankinggpt", QUERY_LIKELIHOOD): (("source", "{doc}"), ("target", "{query}")),
            ("rankllama", LAST_TOKEN): (("source", "{query}"), ("target", "{doc}")),
        }.get((self.style, self.scoring_head))
        if need is None:
            head = QUERY_LIKELIHOOD if self.style == "rankinggpt" else LAST_TOKEN
            raise ValueError(f"a {self.style!r} template scores with the {head} head, got {self.scoring_head!r}")
        for part, placeholder in need:
            if placeholder not in getattr(self, part):
                raise ValueError(f"template {part} must contain '{placeholder}' ({self.style} style, "
                                 f"{self.scoring_head} head), got {getattr(self, part)!r}")
        if self.max_doc_tokens < 0 or self.max_query_tokens < 1:
            raise ValueError(
                f"token budgets must be max_doc_tokens >= 0 and max_query_tokens >= 1, got "
                f"{self.max_doc_tokens} and {self.max_query_tokens}"
            )
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be >= 1 or None, got {self.max_length}")
        if self.max_length is not None and self.style != "rankinggpt":
            raise ValueError(f"max_length (a total budget, RankingGPT's evaluation rule) applies to the rankinggpt "
                             f"style only; the {self.style} style cuts by max_doc_tokens / max_query_tokens")

    @classmethod
    def last_token(cls, **kw: Any) -> "PromptTemplate":
        """tsarank's last-token prompt: ``"query: {query} document: {doc}</s>"`` (one string, EOS appended)."""
        return cls(source="query: {query} document: {doc}", target="", scoring_head=LAST_TOKEN, **kw)

    @classmethod
    def named(cls, name: str, **overrides: Any) -> "PromptTemplate":
        """A template by name (see :data:`NAMED_TEMPLATES`), with fields overridden (budgets, ...).

        Raises:
            ValueError: An unknown name; the message lists the known ones.
        """
        if name not in NAMED_TEMPLATES:
            raise ValueError(f"unknown template {name!r}; known templates: {', '.join(NAMED_TEMPLATES)}")
        return replace(NAMED_TEMPLATES[name], **overrides)

    def with_budgets(self, max_doc_tokens: int | None = None, max_query_tokens: int | None = None,
                     max_length: int | None = None) -> "PromptTemplate":
        """The same template with the given budgets changed (``None`` keeps a budget)."""
        changes = {k: v for k, v in (("max_doc_tokens", max_doc_tokens), ("max_query_tokens", max_query_tokens),
                                     ("max_length", max_length)) if v is not None}
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PromptTemplate":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


#: Templates by name: tsarank's own, and the released constructions of RankingGPT and RankLLaMA with the budgets of
#: their released evaluations (RankingGPT: the document gets 512 minus prompt and query; RankLLaMA's usage scores
#: untruncated pairs, cut here only beyond 512 document / 64 query tokens).
NAMED_TEMPLATES: dict[str, PromptTemplate] = {
    "tsarank": PromptTemplate(),
    "tsarank-last-token": PromptTemplate.last_token(),
    "rankinggpt": PromptTemplate(source="Document: {doc} Query:", target="{query}", style="rankinggpt",
                                 max_doc_tokens=512, max_query_tokens=512, max_length=512),
    "rankllama": PromptTemplate(source="query: {query}", target="document: {doc}", style="rankllama",
                                scoring_head=LAST_TOKEN, max_doc_tokens=512, max_query_tokens=64),
}


@dataclass
class EncodedPair:
    """One tokenized (query, doc) pair.

    Attributes:
        input_ids: Token ids of the full sequence, special tokens included.
        target_start: Index of the first scored (query) token; for ``last_token`` the index of the last token.
        target_end: One past the last scored token.
        query_start: First token of the query (for ``query_likelihood`` the scored span itself; for ``last_token``
            the query inside the prompt, which the ``query`` spans of L_gen / L_dp cover).
        query_end: One past the query's last token.
    """

    input_ids: list[int]
    target_start: int
    target_end: int
    query_start: int = -1
    query_end: int = -1

    def __post_init__(self) -> None:
        if self.query_start < 0:
            self.query_start, self.query_end = self.target_start, self.target_end


#: A text is tokenized only up to ``(budget + 1) * CHARS_PER_TOKEN_BOUND`` characters (at least 4096): the time
#: and memory of one document then depend on its token budget, not on its length (a 100 MB "passage" costs what a
#: page does). Real tokens are far shorter than 64 characters, so the first ``budget`` tokens always lie inside.
CHARS_PER_TOKEN_BOUND = 64


def _heads(texts: Sequence[str], budget: int) -> list[str]:
    limit = max(4096, (budget + 1) * CHARS_PER_TOKEN_BOUND)
    return [t[:limit] for t in texts]


def _truncate(tokenizer: Any, texts: Sequence[str], budget: int) -> list[str]:
    """Cut each text to at most ``budget`` tokens (no special tokens); texts within budget are returned unchanged.

    The cut is made in the *original string*, at the character offset where token ``budget`` starts, so the
    kept text is an exact prefix of the input: no ``decode`` round trip, hence no U+FFFD where a byte-level
    token splits a multi-byte character (the partial character is dropped instead) and no clean-up of spaces.
    For ordinary text the prefix re-tokenizes to exactly the first ``budget`` tokens.
    """
    if not texts:
        return []
    texts = _heads(texts, budget)
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


def _truncate_decode(tokenizer: Any, texts: Sequence[str], budgets: Sequence[int]) -> list[str]:
    """RankingGPT's cut: ``decode(encode(text, add_special_tokens=False)[:budget])``, the text as the tokenizer writes
    it back (its released code round-trips every document this way, within budget or not)."""
    ids = tokenizer(_heads(texts, max(budgets, default=0)), add_special_tokens=False)["input_ids"]
    return [tokenizer.decode(x[: max(b, 0)]) for x, b in zip(ids, budgets)]


def _query_token_span(offsets: Sequence[tuple[int, int]], start: int, end: int,
                      sequence_ids: Sequence[int | None] | None = None, sequence: int = 0) -> tuple[int, int]:
    """First and one-past-last token overlapping the characters ``[start, end)`` (of segment ``sequence``)."""
    hits = [i for i, (s, e) in enumerate(offsets)
            if e > s and s < end and e > start and (sequence_ids is None or sequence_ids[i] == sequence)]
    if not hits:
        raise ValueError("the query produced no tokens inside the prompt")
    return hits[0], hits[-1] + 1


def _prefix_before_query(template: PromptTemplate, part: str, doc: str) -> str:
    """The text of ``part`` (a template string) before its ``{query}``, with the document filled in."""
    return part.split("{query}", 1)[0].replace("{doc}", doc)


def encode_pairs(
    tokenizer: Any, template: PromptTemplate, queries: Sequence[str], docs: Sequence[str]
) -> list[EncodedPair]:
    """Tokenize (query, doc) pairs with the template, truncating each part to its budget first.

    Args:
        tokenizer: A HF tokenizer; the ``tsarank`` and ``rankllama`` styles need a fast one (character offsets
            locate the query), the ``rankinggpt`` style works with any (as its released code did).
        template: The prompt template and budgets (see :class:`PromptTemplate` for the three styles).
        queries: Query texts, length N.
        docs: Document texts, length N (may be empty strings).

    Returns:
        N :class:`EncodedPair`.
    """
    if len(queries) != len(docs):
        raise ValueError(f"got {len(queries)} queries but {len(docs)} docs")
    if not queries:
        return []
    if template.style == "rankinggpt":
        return _encode_rankinggpt(tokenizer, template, queries, docs)
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("tsarank needs a fast (Rust) tokenizer to locate the query span; load it with use_fast=True")
    qs = _truncate(tokenizer, queries, template.max_query_tokens)
    ds = _truncate(tokenizer, docs, template.max_doc_tokens)
    if template.style == "rankllama":
        firsts = [template.source.format(query=q) for q in qs]
        enc = tokenizer(firsts, [template.target.format(doc=d) for d in ds], add_special_tokens=True,
                        return_offsets_mapping=True)
        out = []
        for i, (q, ids, offsets) in enumerate(zip(qs, enc["input_ids"], enc["offset_mapping"])):
            start = len(_prefix_before_query(template, template.source, ""))
            qs_, qe = _query_token_span(offsets, start, start + len(q), enc.sequence_ids(i), 0)
            out.append(EncodedPair(list(ids), len(ids) - 1, len(ids), qs_, qe))
        return out
    if template.scoring_head == LAST_TOKEN:
        eos = tokenizer.eos_token or ""
        texts = [template.source.format(doc=d, query=q) + eos for q, d in zip(qs, ds)]
        enc = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True)
        out = []
        for q, d, ids, offsets in zip(qs, ds, enc["input_ids"], enc["offset_mapping"]):
            start = len(_prefix_before_query(template, template.source, d))
            qs_, qe = _query_token_span(offsets, start, start + len(q))
            out.append(EncodedPair(list(ids), len(ids) - 1, len(ids), qs_, qe))
        return out

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


def check_room(tokenizer: Any, template: PromptTemplate) -> int:
    """A RankingGPT-style ``max_length`` must leave room for a document after the prompt; other styles always do.

    Cheap (tokenizes the prompt once), so callers run it before reading any input.

    Returns:
        The prompt's length in tokens with special tokens (0 for styles without ``max_length``).

    Raises:
        ValueError: ``max_length`` minus the prompt and eval.py's margin leaves fewer than 2 tokens.
    """
    if template.style != "rankinggpt" or template.max_length is None:
        return 0
    # eval.py: passage_max_len = 512 - prompt_len - query_len - 10, both lengths with special tokens.
    prompt_len = len(tokenizer(template.source)["input_ids"])
    if template.max_length - prompt_len - RANKINGGPT_MARGIN < 2:
        raise ValueError(f"max_length {template.max_length} leaves no room for the document: the prompt takes "
                         f"{prompt_len} tokens and eval.py's margin {RANKINGGPT_MARGIN}, before the query. Fix: "
                         f"--max-length {prompt_len + RANKINGGPT_MARGIN + 64} or more (eval.py: 512)")
    return prompt_len


def _encode_rankinggpt(
    tokenizer: Any, template: PromptTemplate, queries: Sequence[str], docs: Sequence[str]
) -> list[EncodedPair]:
    """RankingGPT's construction (pretrain.py / sft.py / eval.py), see :class:`PromptTemplate`."""
    q_ids = tokenizer(_heads(queries, template.max_query_tokens), add_special_tokens=False)["input_ids"]
    # A query is cut only beyond its budget (eval.py never cuts it; sft.py round-trips it at 32 tokens).
    qs = [q if len(ids) <= template.max_query_tokens else tokenizer.decode(ids[: template.max_query_tokens])
          for q, ids in zip(queries, q_ids)]
    budgets = [template.max_doc_tokens] * len(qs)
    if template.max_length is not None:
        prompt_len = check_room(tokenizer, template)
        query_lens = [len(ids) for ids in tokenizer(qs)["input_ids"]]
        budgets = [min(b, template.max_length - prompt_len - n - RANKINGGPT_MARGIN) for b, n in zip(budgets, query_lens)]
    ds = _truncate_decode(tokenizer, docs, budgets)
    sources = [template.source.format(doc=d).replace("[PAD]", "PAD") for d in ds]
    texts = [s + template.target.format(query=q.replace("[PAD]", "PAD")) for s, q in zip(sources, qs)]
    ids = tokenizer(texts)["input_ids"]
    source_lens = [len(x) for x in tokenizer(sources)["input_ids"]]
    out = []
    for seq, n_src in zip(ids, source_lens):
        if n_src >= len(seq):
            raise ValueError("the query produced no tokens after the template source")
        out.append(EncodedPair(list(seq), n_src, len(seq)))
    return out
