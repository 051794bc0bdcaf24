"""``Ranker``: score and re-rank passages with a tsarank (or any causal-LM) checkpoint.

Speed comes from doing less, not from approximations: candidates are sorted by length and packed into
batches under a token budget (little padding), the LM head runs only on the query rows, everything runs under
``torch.inference_mode()``, and on CUDA an out-of-memory batch is split in half and retried.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .backend import resolve_device, resolve_dtype
from .distributed import world
from .hub import CONFIG_NAME, load_tsarank_config
from .modeling import HEAD_WEIGHTS, LastTokenHead, last_token_scores, load_causal_lm, query_likelihood_scores
from .prompts import LAST_TOKEN, EncodedPair, PromptTemplate, check_query, encode_pairs
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
        self.head = head.to(self.device).eval() if head is not None else None
        self.max_tokens = max_tokens or DEFAULT_MAX_TOKENS.get(self.device.type, 8192)
        # Scoring a model that is being trained under ZeRO-3 (ranking evaluation): DeepSpeed gathers and caches the
        # full parameters itself, and tensors it made under inference_mode could not take part in the next training
        # step's backward. no_grad there; inference_mode (a little faster) everywhere else.
        self._no_grad_only = any(is_zero3_param(p) for p in model.parameters())
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)

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
        template: PromptTemplate | None = None,
    ) -> "Ranker":
        """Load a full checkpoint, a merged one, a LoRA adapter directory, or a Hub id.

        ``tsarank_config.json`` (template, scoring head, budgets) is read when present; otherwise the default
        :class:`~tsarank.prompts.PromptTemplate` applies. Hub ids go through the HF cache and honour ``HF_HUB_OFFLINE``.
        """
        from transformers import AutoTokenizer

        device = resolve_device(device)
        local = Path(name_or_path)
        meta_dir = local if local.is_dir() else _hub_sidecar_dir(name_or_path)
        meta = load_tsarank_config(meta_dir) if meta_dir is not None else None
        if template is None:
            template = meta["template"] if meta else PromptTemplate()
        model_kw = dict(dtype=resolve_dtype(dtype, device), attn_implementation=attn_implementation, device=device)
        tokenizer_source = name_or_path
        if local.is_dir() and (local / "adapter_config.json").is_file() and not (local / "config.json").is_file():
            model, base = _load_lora(local, model_kw)
            # An adapter directory often holds no tokenizer of its own: use the base model's then.
            if not any((local / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
                tokenizer_source = base
        else:
            model = load_causal_lm(name_or_path, **model_kw)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
        head = None
        if template.scoring_head == LAST_TOKEN:
            if meta_dir is None or not (Path(meta_dir) / HEAD_WEIGHTS).is_file():
                raise FileNotFoundError(f"{name_or_path}: last_token checkpoint without {HEAD_WEIGHTS}")
            head = LastTokenHead.load(str(meta_dir), model.config.hidden_size)
        return cls(model, tokenizer, template, head=head, max_tokens=max_tokens)

    @classmethod
    def default(cls, **kwargs: Any) -> "Ranker":
        """The embedded default model (SmolLM2-135M-Instruct), converted on first use."""
        from .default_model import default_model_path

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
        scores = [0.0] * len(encoded)
        pending = plan_batches([len(e.input_ids) for e in encoded], self.max_tokens, batch_size)
        with torch.no_grad() if self._no_grad_only else torch.inference_mode():
            while pending:
                idx = pending.pop(0)
                try:
                    out = self._forward(collate_pairs([encoded[i] for i in idx], self.pad_id, self.device))
                except RuntimeError as err:
                    # Inside a distributed run (ranking evaluation under ZeRO-3) every process must run the same
                    # batches, so a local retry with other batch sizes is not an option there.
                    if self.device.type != "cuda" or not _is_oom(err) or len(idx) == 1 or world()[1] > 1:
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
    ) -> list[float]:
        """Score many (query, doc) pairs at once, batching across queries. Results in input order."""
        pairs = list(pairs)
        for i, (q, d) in enumerate(pairs):
            check_query(q, f"pairs[{i}][0] (query)")
            if not isinstance(d, str):
                raise TypeError(f"pairs[{i}][1] (doc) must be a str, got {type(d).__name__}")
        if not pairs:
            return []
        encoded = self.encode([q for q, _ in pairs], [d for _, d in pairs])
        return self.score_encoded(encoded, batch_size=batch_size, on_batch=on_batch)

    def score(self, query: str, docs: Sequence[str], *, batch_size: int | None = None) -> list[float]:
        """Score each doc for ``query`` (mean log p(query tokens | doc), or the last-token head); input order."""
        check_query(query)
        docs = list(docs)
        for i, d in enumerate(docs):
            if not isinstance(d, str):
                raise TypeError(f"docs[{i}] must be a str, got {type(d).__name__}")
        if not docs:
            return []
        return self.score_pairs([(query, d) for d in docs], batch_size=batch_size)

    def rerank(self, query: str, docs: Sequence[str], top_k: int | None = None) -> list[tuple[int, float]]:
        """``(index, score)`` best first; ties broken by the lower input index (deterministic)."""
        scores = self.score(query, docs)
        ranked = sorted(enumerate(scores), key=lambda t: (-t[1], t[0]))
        return ranked[:top_k] if top_k is not None else ranked


def _hub_sidecar_dir(name: str) -> str | None:
    """Fetch ``tsarank_config.json`` (and a last-token head) of a Hub model into the HF cache, if any."""
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(name, CONFIG_NAME)
    except Exception as e:  # noqa: BLE001 - offline, missing file or no such repo: fall back to defaults
        logger.info("no %s for %s (%s); using default template", CONFIG_NAME, name, type(e).__name__)
        return None
    try:
        hf_hub_download(name, HEAD_WEIGHTS)
    except Exception:  # noqa: BLE001 - only last_token checkpoints have one
        pass
    return os.path.dirname(path)


def _load_lora(directory: Path, model_kw: dict[str, Any]) -> tuple[nn.Module, str]:
    """Load base model + LoRA adapter and merge for inference (merged weights are faster to run).

    Returns:
        ``(merged model, base model name or path)``.
    """
    import json

    from peft import PeftModel

    base = json.loads((directory / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(
            f"{directory / 'adapter_config.json'} names no base_model_name_or_path; set it to the base checkpoint's "
            "path or Hub id"
        )
    model = load_causal_lm(base, **model_kw)
    return PeftModel.from_pretrained(model, str(directory)).merge_and_unload(), base
