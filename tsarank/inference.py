"""``Ranker``: score and re-rank passages with a tsarank (or any causal-LM) checkpoint.

Speed comes from doing less, not from approximations: candidates are sorted by length and packed into
batches under a token budget (little padding), the LM head runs only on the query rows, everything runs under
``torch.inference_mode()``, and on CUDA an out-of-memory batch is split in half and retried.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .backend import check_device_available, resolve_dtype
from .modeling import LastTokenHead, last_token_scores, query_likelihood_scores
from .prompts import LAST_TOKEN, EncodedPair, PromptTemplate, check_query, check_room, encode_pairs
from .wrappers import is_zero3_param

logger = logging.getLogger(__name__)

# Padded tokens per batch. On CPU the body is GEMM-bound and ~1k rows already run matmuls at full speed, while
# bigger budgets let one batch span a wider range of lengths: on 200 DL19 candidates 8192 pads 25% extra tokens,
# 2048 6%, 1024 3% (measured per token: same CPU time at 1024, 2048 and 4096). On GPU large batches fill the device.
DEFAULT_MAX_TOKENS = {"cpu": 1024, "cuda": 65536}


@dataclass
class Batch:
    """Right-padded model inputs for a list of encoded pairs (all ``[B, L]``)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_mask: torch.Tensor


def collate_pairs(encoded: Sequence[EncodedPair], pad_id: int, device: torch.device | str = "cpu") -> Batch:
    """Pad a list of pairs on the right; ``target_mask`` marks each pair's scored span."""
    length = max(len(e.input_ids) for e in encoded)
    # One tensor construction from padded Python lists, then masks by broadcasting: no per-row tensor ops.
    ids = torch.tensor([e.input_ids + [pad_id] * (length - len(e.input_ids)) for e in encoded], dtype=torch.long)
    pos = torch.arange(length)
    lens = torch.tensor([len(e.input_ids) for e in encoded])
    span = torch.tensor([[e.target_start, e.target_end] for e in encoded])
    att = (pos[None, :] < lens[:, None]).long()
    tgt = (pos[None, :] >= span[:, :1]) & (pos[None, :] < span[:, 1:])
    return Batch(ids.to(device), att.to(device), tgt.to(device))


def plan_batches(lengths: Sequence[int], max_tokens: int, max_batch: int | None = None) -> list[list[int]]:
    """Group indices into batches, longest first, so that ``len(batch) * longest <= max_tokens``.

    A single sequence longer than ``max_tokens`` still gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        # Sorted descending, so the first element of `cur` is its longest.
        longest = lengths[cur[0]] if cur else lengths[i]
        if cur and ((len(cur) + 1) * longest > max_tokens or (max_batch and len(cur) >= max_batch)):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def positive_int_or_none(value: Any, name: str) -> int | None:
    """The CLI's rule (``--batch-size``, ``--top-k`` >= 1) on the Python API: any integer type (``numpy.int64``
    included, via ``__index__``) that is >= 1, or ``None``; not a bool or a float.

    Raises:
        ValueError: Anything else; the message names the argument.
    """
    if value is None:
        return None
    try:
        number = operator.index(value)
    except TypeError:
        number = None
    if isinstance(value, bool) or number is None or number < 1:
        raise ValueError(f"{name} must be an int >= 1 or None, got {value!r}")
    return number


def _check_batch_size(batch_size: Any) -> None:
    positive_int_or_none(batch_size, "batch_size")


def _partitioned(model: nn.Module) -> bool:
    """The weights are DeepSpeed ZeRO-3 partitions (gathered collectively by every process at each forward)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


#: ``show_progress_bar=None`` shows a bar from this many pairs on (about a minute of CPU scoring).
PROGRESS_MIN_PAIRS = 512


def check_docs(query: Any, docs: Any) -> list[str]:
    """``score(query, docs)``'s arguments checked as the CLI checks its inputs (before any model is loaded).

    Returns:
        ``docs`` as a list.

    Raises:
        TypeError: ``docs`` is a single string (``list("a doc")`` would score each character), a dict (its keys would
            be scored) or holds a non-string.
        ValueError: An empty query.
    """
    check_query(query)
    if isinstance(docs, (str, bytes)):
        raise TypeError("docs must be a list of strings, got a single string; pass [doc] to score one document")
    if isinstance(docs, Mapping):  # iterating a dict gives its keys: the ids would be scored, not the texts
        raise TypeError("docs must be a list of strings, got a dict; pass list(docs.values()) and keep "
                        "list(docs.keys()) to map the scores back to ids")
    if hasattr(docs, "columns"):  # a DataFrame iterates over its column names
        raise TypeError("docs must be a list of strings, got a DataFrame; pass one column, e.g. df['text'].tolist()")
    if isinstance(docs, (set, frozenset)):  # no order: the scores could not be mapped back
        raise TypeError("docs must be a list of strings, got a set (unordered: the scores could not be matched to "
                        "the documents); pass a list")
    docs = list(docs)
    for i, d in enumerate(docs):
        if not isinstance(d, str):
            raise TypeError(f"docs[{i}] must be a str, got {type(d).__name__}")
    return docs


def check_pairs(pairs: Any) -> list[tuple[str, str]]:
    """``(query, doc)`` pairs checked as the CLI checks its inputs.

    Raises:
        TypeError: A bare string, an element that is not a pair of strings.
        ValueError: An empty query.
    """
    if isinstance(pairs, (str, bytes)):
        raise TypeError("pairs must be a list of (query, doc) pairs, got a single string")
    if isinstance(pairs, Mapping):
        raise TypeError("pairs must be a list of (query, doc) pairs, got a dict; pass list(pairs.items()) if it maps "
                        "queries to documents")
    if isinstance(pairs, tuple) and len(pairs) == 2 and all(isinstance(x, str) for x in pairs):
        raise TypeError("pairs must be a list of (query, doc) pairs, got one pair; wrap it in a list: [(query, doc)]")
    pairs = list(pairs)
    for i, pair in enumerate(pairs):
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise TypeError(f"pairs[{i}] must be a (query, doc) pair, got {_describe(pair)}")
    for i, (q, d) in enumerate(pairs):
        check_query(q, f"pairs[{i}][0] (query)")
        if not isinstance(d, str):
            raise TypeError(f"pairs[{i}][1] (doc) must be a str, got {type(d).__name__}")
    return pairs


class Ranker:
    """A re-ranker around a causal LM and its tsarank template.

    Args:
        model: A causal LM (``*ForCausalLM``), in eval mode.
        tokenizer: Its fast tokenizer.
        template: Prompt template and token budgets (from the checkpoint's ``tsarank_config.json``).
        head: The linear head for ``last_token`` checkpoints, else ``None``.
        max_tokens: Token budget per batch (padded tokens); defaults per device type.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        template: PromptTemplate | None = None,
        head: LastTokenHead | None = None,
        max_tokens: int | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = template or PromptTemplate()
        if self.template.scoring_head == LAST_TOKEN and head is None:
            raise ValueError("a last_token template needs its LastTokenHead")
        check_room(tokenizer, self.template)  # a max_length that leaves no document: now, not at the first score
        self.head = head.to(self.device).eval() if head is not None else None
        positive_int_or_none(max_tokens, "max_tokens")  # 0 used to mean the default silently
        self.max_tokens = max_tokens or DEFAULT_MAX_TOKENS.get(self.device.type, 8192)
        # Scoring a model that is being trained under ZeRO-3 (ranking evaluation): DeepSpeed gathers and caches the
        # full parameters itself, and tensors it made under inference_mode could not take part in the next training
        # step's backward. no_grad there; inference_mode (a little faster) everywhere else.
        self._no_grad_only = any(is_zero3_param(p) for p in model.parameters())
        from .loading import pad_id_of

        self.pad_id = pad_id_of(tokenizer)
        #: What :meth:`from_pretrained` recognised (:data:`tsarank.loading.KINDS`); ``None`` for a model given directly.
        self.checkpoint_kind: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        attn_implementation: str = "auto",
        max_tokens: int | None = None,
        template: PromptTemplate | str | None = None,
        max_doc_tokens: int | None = None,
        max_query_tokens: int | None = None,
        max_length: int | None = None,
        trust_remote_code: bool = False,
    ) -> "Ranker":
        """Load a tsarank checkpoint, any causal LM, a LoRA adapter directory, or a published ranker, by path or Hub
        id (through the HF cache; ``HF_HUB_OFFLINE`` is honoured).

        What the checkpoint is, and which template and head it scores with, is decided by
        :func:`tsarank.loading.resolve_checkpoint`: its ``tsarank_config.json``; a RankLLaMA-style LoRA
        sequence-classification adapter; a RankingGPT checkpoint (by name); any other causal LM with tsarank's
        default template.

        Args:
            name_or_path: Checkpoint directory or Hub id.
            device: Default: CUDA when available.
            dtype: Default: bf16 on GPUs that compute it natively, else fp32.
            attn_implementation: ``"auto"`` (FlashAttention-2 where it can run, else SDPA) or a name.
            max_tokens: Padded tokens per batch.
            template: A :class:`~tsarank.prompts.PromptTemplate` or a name (``tsarank``, ``rankinggpt``,
                ``rankllama``, ...) to score with instead of the checkpoint's own.
            max_doc_tokens: Document budget instead of the template's (the checkpoint's training budget).
            max_query_tokens: Query budget instead of the template's.
            max_length: Total budget: the document gets what the prompt and the query leave (RankingGPT's eval).
            trust_remote_code: Allow a checkpoint's own modelling code (RankingGPT-qwen-7b, -baichuan2-7b).
        """
        from .loading import load_for_scoring, resolve_checkpoint

        for name, value in (("max_tokens", max_tokens), ("max_doc_tokens", max_doc_tokens),
                            ("max_query_tokens", max_query_tokens), ("max_length", max_length)):
            positive_int_or_none(value, name)  # as the CLI's --max-tokens, --max-doc-tokens...: before any loading
        device = check_device_available(device)
        spec = resolve_checkpoint(name_or_path, template)
        chosen = spec.template.with_budgets(max_doc_tokens, max_query_tokens, max_length)  # bad budgets: before loading
        model, tokenizer, head = load_for_scoring(
            spec, dtype=resolve_dtype(dtype, device), attn_implementation=attn_implementation, device=device,
            trust_remote_code=trust_remote_code,
        )
        logger.info("%s: %s checkpoint, %s template", name_or_path, spec.kind, chosen.style)
        ranker = cls(model, tokenizer, chosen, head=head, max_tokens=max_tokens)
        ranker.checkpoint_kind = spec.kind
        return ranker

    @classmethod
    def default(cls, **kwargs: Any) -> "Ranker":
        """The embedded default model (SmolLM2-135M-Instruct), converted on first use."""
        from .default_model import default_model_path

        if kwargs.get("template") is None:  # its own template, said explicitly: no "which prompt?" warning
            kwargs["template"] = "tsarank"
        return cls.from_pretrained(str(default_model_path()), **kwargs)

    # ------------------------------------------------------------------------------ scoring
    def encode(self, queries: Sequence[str], docs: Sequence[str]) -> list[EncodedPair]:
        return encode_pairs(self.tokenizer, self.template, queries, docs)

    def _forward(self, batch: Batch) -> torch.Tensor:
        if self.head is not None:
            return last_token_scores(self.model, self.head, batch.input_ids, batch.attention_mask)
        return query_likelihood_scores(self.model, batch.input_ids, batch.attention_mask, batch.target_mask)

    def score_encoded(
        self,
        encoded: Sequence[EncodedPair],
        *,
        batch_size: int | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> list[float]:
        """Score already-encoded pairs; results in input order.

        Args:
            encoded: Pairs from :meth:`encode`.
            batch_size: Optional cap on sequences per batch (the token budget applies as well).
            on_batch: Called with the number of pairs after each batch (progress bars).
        """
        _check_batch_size(batch_size)
        scores = [0.0] * len(encoded)
        pending = plan_batches([len(e.input_ids) for e in encoded], self.max_tokens, batch_size)
        with torch.no_grad() if self._no_grad_only else torch.inference_mode():
            while pending:
                idx = pending.pop(0)
                try:
                    out = self._forward(collate_pairs([encoded[i] for i in idx], self.pad_id, self.device))
                except RuntimeError as err:
                    # With ZeRO-3-partitioned weights (ranking evaluation during training) every process must run
                    # the same batches, so a local retry with other batch sizes is not an option there. Sharded
                    # scoring (rerank on several processes) has whole models per process: it backs off like one.
                    if self.device.type != "cuda" or not _is_oom(err) or len(idx) == 1 or _partitioned(self.model):
                        raise
                    torch.cuda.empty_cache()
                    half = len(idx) // 2
                    self.max_tokens = max(1, self.max_tokens // 2)  # remember: later batches start smaller
                    logger.warning("CUDA out of memory on %d sequences; retrying in halves", len(idx))
                    pending[:0] = [idx[:half], idx[half:]]
                    continue
                for i, s in zip(idx, out.tolist()):
                    scores[i] = s
                if on_batch is not None:
                    on_batch(len(idx))
        return scores

    def score_pairs(
        self,
        pairs: Iterable[tuple[str, str]],
        *,
        batch_size: int | None = None,
        on_batch: Callable[[int], None] | None = None,
        show_progress_bar: bool | None = None,
    ) -> list[float]:
        """Score many (query, doc) pairs at once, batching across queries. Results in input order.

        Args:
            pairs: ``(query, doc)`` pairs.
            batch_size: Fixed batch size instead of the token budget.
            on_batch: Called with the number of pairs after each batch.
            show_progress_bar: A progress bar (documents, docs/s, time left) on stderr; ``None``: for
                :data:`PROGRESS_MIN_PAIRS` pairs or more, on a terminal.
        """
        _check_batch_size(batch_size)
        pairs = check_pairs(pairs)
        if not pairs:
            return []
        encoded = self.encode([q for q, _ in pairs], [d for _, d in pairs])
        show = len(pairs) >= PROGRESS_MIN_PAIRS if show_progress_bar is None else bool(show_progress_bar)
        if not show:
            return self.score_encoded(encoded, batch_size=batch_size, on_batch=on_batch)
        from tqdm import tqdm

        # disable=None: off when stderr is not a terminal unless asked for explicitly.
        with tqdm(total=len(pairs), unit="doc", desc="score", disable=None if show_progress_bar is None else False,
                  mininterval=0.5) as bar:
            def progress(n: int) -> None:
                bar.update(n)
                if on_batch is not None:
                    on_batch(n)

            return self.score_encoded(encoded, batch_size=batch_size, on_batch=progress)

    def score(self, query: str, docs: Sequence[str], *, batch_size: int | None = None,
              show_progress_bar: bool | None = None) -> list[float]:
        """Score each doc for ``query`` (mean log p(query tokens | doc), or the last-token head); input order."""
        docs = check_docs(query, docs)
        if not docs:
            return []
        return self.score_pairs([(query, d) for d in docs], batch_size=batch_size, show_progress_bar=show_progress_bar)

    def rerank(self, query: str, docs: Sequence[str], top_k: int | None = None) -> list[tuple[int, float]]:
        """``(index, score)`` best first; ties broken by the lower input index (deterministic).

        Raises:
            ValueError: ``top_k`` below 1 (``None`` keeps every document).
        """
        top_k = positive_int_or_none(top_k, "top_k")
        scores = self.score(query, docs)
        ranked = sorted(enumerate(scores), key=lambda t: (-t[1], t[0]))
        return ranked[:top_k] if top_k is not None else ranked

    # ------------------------------------------------------------------------------ CrossEncoder-shaped API
    def rank(
        self,
        query: str,
        documents: Sequence[str],
        top_k: int | None = None,
        return_documents: bool = False,
        batch_size: int | None = None,
        show_progress_bar: bool | None = None,
    ) -> list[dict[str, Any]]:
        """sentence-transformers ``CrossEncoder.rank``'s shape: ``[{"corpus_id", "score"(, "text")}]`` best first.

        Args:
            query: The query.
            documents: The documents (a list; a bare string or a dict is a ``TypeError``).
            top_k: Keep the best ``top_k`` (``None``: all).
            return_documents: Add each document's ``"text"``.
            batch_size: Fixed batch size instead of the token budget.
            show_progress_bar: See :meth:`score_pairs`.

        Returns:
            One dict per kept document; ties by the lower ``corpus_id``.
        """
        top_k = positive_int_or_none(top_k, "top_k")
        documents = check_docs(query, documents)
        scores = self.score(query, documents, batch_size=batch_size, show_progress_bar=show_progress_bar)
        ranked = sorted(enumerate(scores), key=lambda t: (-t[1], t[0]))[:top_k]
        return [{"corpus_id": i, "score": s, **({"text": documents[i]} if return_documents else {})}
                for i, s in ranked]

    def predict(
        self,
        sentences: Sequence[tuple[str, str]] | Sequence[Sequence[str]],
        batch_size: int | None = None,
        show_progress_bar: bool | None = None,
        convert_to_numpy: bool = True,
    ) -> Any:
        """sentence-transformers ``CrossEncoder.predict``'s shape: one score per ``(query, document)`` pair.

        Args:
            sentences: ``(query, document)`` pairs (tuples or two-element lists).
            batch_size: Fixed batch size instead of the token budget.
            show_progress_bar: See :meth:`score_pairs`.
            convert_to_numpy: Return a numpy array (float64), as CrossEncoder returns an array; else a list.

        Raises:
            TypeError: A bare string, a dict, or an element that is not a pair of strings.
        """
        scores = self.score_pairs(sentences, batch_size=batch_size, show_progress_bar=show_progress_bar)
        if not convert_to_numpy:
            return scores
        import numpy as np

        return np.asarray(scores, dtype=np.float64)
