"""Stage-1 (CPT) datasets and collation: weak pairs -> Arrow dataset of token ids -> padded or packed batches.

Dataset: the weak-pairs file is validated in one streaming pass (errors name ``file:line``), then its normalised
``(text, query)`` records are written to an Arrow table by ``datasets`` (memory-mapped, cached, never a Python list of
the whole file) and tokenized in batches by :func:`tsarank.prompts.encode_pairs`, the same code inference uses.

Batches: :class:`CPTCollator` pads on the right, or packs several pairs into one row with ``position_ids`` restarting
at 0 for every pair. A packed row must not let a pair attend to (or be predicted from) another pair:

* with FlashAttention-2, transformers turns restarting ``position_ids`` into a varlen call (``attention_mask=None``);
* with SDPA/eager, :func:`packed_attention_mask` builds a 4D block-diagonal causal mask, which transformers v5 takes
  as-is for a ``[B, 1, L, L]`` tensor (bool for SDPA, additive float for eager);
* any other backend is refused with a message (:func:`model_attention_inputs`).

Labels: ``-100`` everywhere except the tokens the loss covers: the query span (``mask_source=True``) or every real
token but the first of each pair (``mask_source=False``; the first token has no prefix to be predicted from, and in a
packed row predicting it from the previous pair would leak across pairs).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..prompts import PromptTemplate, encode_pairs

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
#: Attention implementations that take packed rows through ``position_ids`` alone (varlen kernels).
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")
#: Attention implementations that take an explicit 4D mask.
MASKED_ATTENTION = ("sdpa", "eager")


# ------------------------------------------------------------------------------------------- dataset
def _weak_pair_records(path: str, stamp: str) -> Iterator[dict[str, str]]:
    """Normalised ``{"text", "query"}`` records of a weak-pairs file (``stamp`` only keys the ``datasets`` cache)."""
    from .formats import read_weak_pairs

    for _line, text, query in read_weak_pairs(path):
        yield {"text": text, "query": query}


def validate_weak_pairs(path: str | os.PathLike) -> int:
    """Stream the whole file through :func:`tsarank.data.formats.read_weak_pairs`; return the number of pairs.

    Raises:
        DataError: the first malformed line (``file:line: field ...``) or an empty file.
    """
    from .formats import read_weak_pairs

    n = 0
    for _ in read_weak_pairs(path):
        n += 1
    return n


def build_cpt_dataset(
    path: str | os.PathLike,
    tokenizer: Any,
    template: PromptTemplate,
    *,
    max_samples: int | None = None,
    num_proc: int | None = None,
    cache_dir: str | None = None,
    validate: bool = True,
) -> Any:
    """Validate, load and tokenize a weak-pairs JSONL file into a ``datasets.Dataset``.

    Columns: ``input_ids`` (list of int), ``target_start``, ``target_end`` (the query span) and ``length``.

    Args:
        path: Weak pairs, ``{"text", "query"}`` or RankingGPT ``{"query": "Document: ... Query:", "response"}`` lines.
        tokenizer: Fast tokenizer of the model.
        template: Prompt template and token budgets.
        max_samples: Keep only the first N pairs.
        num_proc: Processes for tokenization (``datasets.map``).
        cache_dir: ``datasets`` cache directory (default: the HF datasets cache).
        validate: Run the up-front validation pass (set False only for a file already validated).

    Returns:
        A tokenized, Arrow-backed ``datasets.Dataset``.
    """
    import datasets

    path = str(path)
    if validate:
        n = validate_weak_pairs(path)
        logger.info("%s: %d valid weak pairs", path, n)
    st = os.stat(path)
    # The cache key includes size and mtime: an edited file is re-read, an unchanged one is not.
    stamp = f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"
    features = datasets.Features({"text": datasets.Value("string"), "query": datasets.Value("string")})
    ds = datasets.Dataset.from_generator(
        _weak_pair_records, gen_kwargs={"path": path, "stamp": stamp}, features=features, cache_dir=cache_dir
    )
    if max_samples is not None:
        ds = ds.select(range(min(max_samples, len(ds))))

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[Any]]:
        enc = encode_pairs(tokenizer, template, batch["query"], batch["text"])
        return {
            "input_ids": [e.input_ids for e in enc],
            "target_start": [e.target_start for e in enc],
            "target_end": [e.target_end for e in enc],
            "length": [len(e.input_ids) for e in enc],
        }

    return ds.map(
        tokenize, batched=True, batch_size=1000, remove_columns=["text", "query"], num_proc=num_proc,
        desc=f"tokenizing {Path(path).name}",
    )


# ------------------------------------------------------------------------------------------- labels
def pair_labels(input_ids: Sequence[int], target_start: int, target_end: int, mask_source: bool) -> list[int]:
    """Labels of one unpadded pair.

    Args:
        input_ids: The pair's token ids.
        target_start: First query token.
        target_end: One past the last query token.
        mask_source: True: only ``[target_start, target_end)`` is labelled; False: every token except the first.

    Returns:
        ``len(input_ids)`` labels, ``-100`` where there is no loss.
    """
    n = len(input_ids)
    if not 0 < target_start < target_end <= n:
        raise ValueError(f"bad query span [{target_start}, {target_end}) for a sequence of {n} tokens")
    if mask_source:
        return [IGNORE_INDEX] * target_start + list(input_ids[target_start:target_end]) + [IGNORE_INDEX] * (n - target_end)
    return [IGNORE_INDEX] + list(input_ids[1:])


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing bin packing of sequence indices into rows of at most ``capacity`` tokens.

    A sequence longer than ``capacity`` gets a row of its own. Within a row, indices keep ascending order (the order
    pairs are laid out in), so the packing is deterministic.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    used: list[int] = []
    for i in order:
        for r, u in enumerate(used):
            if u + lengths[i] <= capacity:
                rows[r].append(i)
                used[r] += lengths[i]
                break
        else:
            rows.append([i])
            used.append(lengths[i])
    return [sorted(r) for r in rows]


@dataclass
class CPTCollator:
    """Turn tokenized pairs into a CPT batch.

    Output (all ``[R, C]``): ``input_ids`` (right-padded with ``pad_token_id``), ``attention_mask`` (1 on real tokens;
    also what the Trainer counts as tokens seen), ``labels`` (see module docstring), ``target_mask`` (bool, the query
    tokens, used for the validation query perplexity whatever ``mask_source`` is), and with ``packing`` also
    ``position_ids`` (restarting at 0 for each pair; the padding tail of a row is its own segment ``0, 1, ...``).

    Args:
        pad_token_id: Padding id.
        mask_source: Loss on query tokens only (True) or on every token but each pair's first (False).
        packing: Pack several pairs per row (first-fit decreasing).
        packing_max_length: Row capacity; default (None) the longest pair of the batch, so rows are never longer than
            the padded batch would be (and attention cost per row does not grow).
        pad_to_multiple_of: Round the row length up to a multiple of this (tensor cores).
    """

    pad_token_id: int
    mask_source: bool = True
    packing: bool = False
    packing_max_length: int | None = None
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("CPTCollator got an empty batch")
        seqs = [list(f["input_ids"]) for f in features]
        labels = [pair_labels(s, int(f["target_start"]), int(f["target_end"]), self.mask_source) for s, f in zip(seqs, features)]
        spans = [(int(f["target_start"]), int(f["target_end"])) for f in features]
        lengths = [len(s) for s in seqs]
        if self.packing:
            capacity = max(max(lengths), self.packing_max_length or 0)
            rows = pack_rows(lengths, capacity)
        else:
            rows = [[i] for i in range(len(seqs))]
        width = max(sum(lengths[i] for i in row) for row in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        n = len(rows)
        ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        att = torch.zeros((n, width), dtype=torch.long)
        lab = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        tgt = torch.zeros((n, width), dtype=torch.bool)
        pos = torch.zeros((n, width), dtype=torch.long)
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                k = lengths[i]
                ids[r, at : at + k] = torch.tensor(seqs[i])
                att[r, at : at + k] = 1
                lab[r, at : at + k] = torch.tensor(labels[i])
                tgt[r, at + spans[i][0] : at + spans[i][1]] = True
                pos[r, at : at + k] = torch.arange(k)
                at += k
            pos[r, at:] = torch.arange(width - at)  # padding tail: a segment of its own, never labelled
        batch = {"input_ids": ids, "attention_mask": att, "labels": lab, "target_mask": tgt}
        if self.packing:
            batch["position_ids"] = pos
        return batch


# ------------------------------------------------------------------------------------------- packed attention
def segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """``[R, C]`` segment index per token: a new segment starts wherever ``position_ids`` is 0."""
    starts = (position_ids == 0).to(torch.long)
    return starts.cumsum(dim=-1)


def packed_attention_mask(
    position_ids: torch.Tensor, attention_mask: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """4D block-diagonal causal mask for packed rows.

    Token ``i`` may attend to token ``j`` iff both are in the same segment (see :func:`segment_ids`), ``j <= i``, and
    ``j`` is a real token (or ``j == i``, so that padding rows are never fully masked).

    Args:
        position_ids: ``[R, C]``, restarting at 0 for each pair.
        attention_mask: ``[R, C]``, 1 on real tokens.
        dtype: ``None`` for a bool mask (True = attend; what SDPA takes), or a float dtype for an additive mask
            (0 = attend, ``finfo.min`` = masked; what eager attention adds to its scores).

    Returns:
        ``[R, 1, C, C]``.
    """
    seg = segment_ids(position_ids)
    c = position_ids.shape[1]
    same = seg[:, :, None] == seg[:, None, :]
    causal = torch.ones(c, c, dtype=torch.bool, device=position_ids.device).tril()
    real = attention_mask.bool()[:, None, :] | torch.eye(c, dtype=torch.bool, device=position_ids.device)[None]
    allowed = (same & causal[None] & real)[:, None]
    if dtype is None:
        return allowed
    out = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    return out.masked_fill(~allowed, torch.finfo(dtype).min)


def model_attention_inputs(
    batch: dict[str, torch.Tensor], attn_implementation: str, dtype: torch.dtype
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(attention_mask, position_ids)`` to pass to the model for a (padded or packed) batch.

    Padded batches: the 2D mask. Packed batches: ``(None, position_ids)`` for varlen FlashAttention, a 4D block mask
    plus ``position_ids`` for SDPA/eager.

    Raises:
        ValueError: packing with an attention backend that takes neither.
    """
    position_ids = batch.get("position_ids")
    if position_ids is None:
        return batch["attention_mask"], None
    if attn_implementation in VARLEN_ATTENTION:
        return None, position_ids
    if attn_implementation == "sdpa":
        return packed_attention_mask(position_ids, batch["attention_mask"]), position_ids
    if attn_implementation == "eager":
        return packed_attention_mask(position_ids, batch["attention_mask"], dtype), position_ids
    raise ValueError(
        f"packing needs FlashAttention-2 (varlen) or an SDPA/eager model that accepts a 4D block mask; this model "
        f"uses attn_implementation={attn_implementation!r}. Fix: set packing: false, or attn_implementation: sdpa "
        "(or flash_attention_2 on CUDA)."
    )
