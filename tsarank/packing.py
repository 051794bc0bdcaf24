"""Sequence packing: run ``R`` right-padded sequences as fewer rows, each sequence attending only to itself.

Padding costs compute (a CPT batch of weak pairs or an SFT group of 48 passages is ~20-40% padding). Packing lays
the sequences end to end and restarts ``position_ids`` at 0 for each. What keeps one sequence from attending to
another depends on the attention implementation, and this module is the one place that knows it:

=====================  =========================================================================================
``flash_attention_2``  **one row** holding every sequence, ``attention_mask=None`` and explicit varlen arguments
``flash_attention_3``  (``cu_seq_lens_q/k``, ``max_length_q/k``). transformers runs its varlen kernel only for a
                       batch of one row or with those arguments; packed rows with ``R > 1`` and no mask would run
                       the dense kernel and let the sequences of a row attend to each other.
``sdpa``               rows of ``capacity`` positions (first-fit decreasing) and a 4D block-diagonal causal mask
``eager``              ``[P, 1, C, C]`` (bool for SDPA, additive float for eager), which transformers uses as is.
anything else          not packed: :func:`pack_sequences` raises, :func:`can_pack` says no.
=====================  =========================================================================================

:class:`ModelInputs` carries the batch as the body runs it (padded or packed) and the map from a sequence's token
``(r, t)`` to its place in the rows, so callers gather the hidden states they need without unpacking.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

__all__ = [
    "VARLEN_ATTENTION",
    "MASKED_ATTENTION",
    "can_pack",
    "ModelInputs",
    "padded_inputs",
    "pack_sequences",
    "plan_rows",
    "block_causal_mask",
]

#: Attention implementations that take packed sequences as one row with varlen arguments.
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")
#: Attention implementations that take an explicit 4D block mask.
MASKED_ATTENTION = ("sdpa", "eager")


def can_pack(attn_implementation: str | None) -> bool:
    """True when :func:`pack_sequences` supports this attention implementation."""
    return attn_implementation in VARLEN_ATTENTION + MASKED_ATTENTION


@dataclass
class ModelInputs:
    """A batch as the transformer body runs it, and where every sequence's tokens are in it.

    Attributes:
        input_ids: ``[P, C]``.
        attention_mask: ``[P, C]`` padding mask (padded batch), ``[P, 1, C, C]`` block mask (packed, SDPA/eager) or
            ``None`` (packed, varlen FlashAttention).
        position_ids: ``[P, C]`` restarting at 0 for each sequence (packed), or ``None`` (padded).
        seq_row: ``[R]`` row of each sequence.
        seq_offset: ``[R]`` column of each sequence's first token.
        flash_kwargs: Varlen arguments for FlashAttention (``cu_seq_lens_q/k``, ``max_length_q/k``), else empty.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    seq_row: torch.Tensor
    seq_offset: torch.Tensor
    flash_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def packed(self) -> bool:
        return self.position_ids is not None

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the model's (or body's) forward."""
        kw: dict[str, Any] = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.position_ids is not None:
            kw["position_ids"] = self.position_ids
        kw.update(self.flash_kwargs)
        return kw

    def locate(self, seq: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map sequence coordinates ``(seq [N], pos [N])`` to ``(row [N], col [N])`` in the rows as run."""
        return self.seq_row[seq], self.seq_offset[seq] + pos

    def gather(self, hidden: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """``hidden [P, C, H]`` at sequence coordinates ``(seq, pos)`` -> ``[N, H]``."""
        row, col = self.locate(seq, pos)
        return hidden[row, col]


def padded_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> ModelInputs:
    """The unpacked batch: one row per sequence."""
    n = input_ids.shape[0]
    rows = torch.arange(n, device=input_ids.device)
    return ModelInputs(input_ids, attention_mask, None, rows, torch.zeros_like(rows))


def plan_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing bin packing of sequence indices into rows of at most ``capacity`` tokens.

    A sequence longer than ``capacity`` gets a row of its own. Ties are broken by index and each row lists its
    indices in ascending order, so the layout is deterministic.
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


def block_causal_mask(
    position_ids: torch.Tensor, real: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """4D block-diagonal causal mask for packed rows.

    Token ``i`` may attend to token ``j`` iff both are in the same segment (a segment starts wherever
    ``position_ids`` is 0), ``j <= i``, and ``j`` is a real token (or ``j == i``, so a padding row is never fully
    masked).

    Args:
        position_ids: ``[P, C]``.
        real: ``[P, C]``, 1 on real tokens.
        dtype: ``None`` for a bool mask (True = attend; SDPA), or a float dtype for an additive mask (0 = attend,
            ``finfo.min`` = masked; eager).

    Returns:
        ``[P, 1, C, C]``.
    """
    seg = (position_ids == 0).to(torch.long).cumsum(dim=-1)
    c = position_ids.shape[1]
    device = position_ids.device
    same = seg[:, :, None] == seg[:, None, :]
    causal = torch.ones(c, c, dtype=torch.bool, device=device).tril()
    keys = real.bool()[:, None, :] | torch.eye(c, dtype=torch.bool, device=device)[None]
    allowed = (same & causal[None] & keys)[:, None]
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


def pack_sequences(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    pad_id: int,
    attn_implementation: str,
    capacity: int | None = None,
    mask_dtype: torch.dtype = torch.float32,
) -> ModelInputs:
    """Pack right-padded sequences for ``attn_implementation`` (see the module table).

    Args:
        input_ids: ``[R, L]``, right-padded.
        attention_mask: ``[R, L]``, 1 on each sequence's tokens (a prefix of the row).
        pad_id: Fill value of row tails (SDPA/eager rows that are not full).
        attn_implementation: The model's ``config._attn_implementation``.
        capacity: Most tokens per row for SDPA/eager (at least ``L``; default ``L``); rows are as wide as the fullest
            one. Ignored by varlen FlashAttention, whose single row costs attention only within each sequence.
        mask_dtype: Dtype of eager attention's additive mask (the model's compute dtype).

    Raises:
        ValueError: An attention implementation that cannot keep packed sequences apart.
    """
    if not can_pack(attn_implementation):  # models are checked first by tsarank.modeling.check_packing
        raise ValueError(f"no packed layout keeps sequences apart under attn_implementation={attn_implementation!r}; "
                         f"supported: {VARLEN_ATTENTION + MASKED_ATTENTION}")
    device = input_ids.device
    lengths_t = attention_mask.sum(dim=1)
    lengths = lengths_t.tolist()
    real = attention_mask.bool()
    seq, tok = real.nonzero(as_tuple=True)  # every real token, in sequence order
    if attn_implementation in VARLEN_ATTENTION:
        starts = torch.zeros(len(lengths) + 1, dtype=torch.long, device=device)
        starts[1:] = lengths_t.cumsum(0)
        total = int(starts[-1])
        ids = input_ids[seq, tok][None]
        positions = tok[None].clone()
        cu = starts.to(torch.int32)
        longest = int(max(lengths)) if lengths else 0
        flash = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
        zeros = torch.zeros(len(lengths), dtype=torch.long, device=device)
        assert ids.shape[1] == total
        return ModelInputs(ids, None, positions, zeros, starts[:-1].clone(), flash)

    rows = plan_rows(lengths, max(int(capacity or 0), input_ids.shape[1]))
    seq_row = [0] * len(lengths)
    seq_offset = [0] * len(lengths)
    used = []
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            seq_row[i], seq_offset[i] = r, at
            at += lengths[i]
        used.append(at)
    width = max(used)  # as wide as the fullest row, not the capacity: no all-padding columns
    seq_row_t = torch.tensor(seq_row, dtype=torch.long, device=device)
    seq_offset_t = torch.tensor(seq_offset, dtype=torch.long, device=device)
    used_t = torch.tensor(used, dtype=torch.long, device=device)
    ids = torch.full((len(rows), width), pad_id, dtype=input_ids.dtype, device=device)
    occupied = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    row, col = seq_row_t[seq], seq_offset_t[seq] + tok
    ids[row, col] = input_ids[seq, tok]
    occupied[row, col] = 1
    # Positions restart for every sequence; a row's tail is a segment of its own (0, 1, ...), never joined to the
    # last sequence of the row.
    cols = torch.arange(width, device=device)
    positions = (cols[None, :] - used_t[:, None]).clamp(min=0)
    positions[row, col] = tok
    mask = block_causal_mask(positions, occupied, None if attn_implementation == "sdpa" else mask_dtype)
    return ModelInputs(ids, mask, positions, seq_row_t, seq_offset_t)
