"""FlashAttention-2 on a CPU: torch reference kernels behind transformers' real ``flash_attention_2`` dispatch.

transformers decides what FlashAttention computes (dense kernel per row, or the varlen kernel over
``cu_seqlens``) in ``_flash_attention_forward`` from what the model receives: ``attention_mask``, ``position_ids``,
``cu_seq_lens_*``. Those decisions, not the CUDA kernels, are where packed sequences leak into each other. This
module replaces only the two kernels with exact torch equivalents of flash-attn 2's ``flash_attn_func`` /
``flash_attn_varlen_func`` (same signatures, same causal semantics), so a CPU test runs transformers' FA2 code path
with the exact inputs a GPU run would give the kernels, and records which kernel ran.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch


class KernelLog:
    """Which emulated kernel ran, with its ``cu_seqlens`` when varlen."""

    def __init__(self) -> None:
        self.dense = 0
        self.varlen: list[list[int]] = []


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, causal: bool) -> torch.Tensor:
    """One sequence: ``q [Lq, Hq, D]``, ``k, v [Lk, Hk, D]`` -> ``[Lq, Hq, D]``; GQA by repeating kv heads;
    causal masks are bottom-right aligned, as flash-attn 2 (>= 2.1) does."""
    hq, hk = q.shape[1], k.shape[1]
    if hq != hk:
        k = k.repeat_interleave(hq // hk, dim=1)
        v = v.repeat_interleave(hq // hk, dim=1)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    if causal:
        lq, lk = q.shape[0], k.shape[0]
        allowed = torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq)
        scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.float())
    return out.to(q.dtype)


def _make_kernels(log: KernelLog):
    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                        softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
        log.dense += 1
        return torch.stack([_attend(q[b], k[b], v[b], softmax_scale, causal) for b in range(q.shape[0])])

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                               alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        log.varlen.append(cq)
        out = torch.empty_like(q)
        for i in range(len(cq) - 1):
            out[cq[i]:cq[i + 1]] = _attend(q[cq[i]:cq[i + 1]], k[ck[i]:ck[i + 1]], v[ck[i]:ck[i + 1]], softmax_scale,
                                           causal)
        return out

    return flash_attn_func, flash_attn_varlen_func


@contextmanager
def emulated_flash_attention(monkeypatch) -> Iterator[KernelLog]:
    """Within the block, models whose ``config._attn_implementation == "flash_attention_2"`` run the emulated
    kernels through transformers' own dispatch. Yields the :class:`KernelLog`."""
    import transformers.modeling_flash_attention_utils as fa

    log = KernelLog()
    dense, varlen = _make_kernels(log)
    monkeypatch.setattr(fa, "_lazy_imports", lambda *a, **k: (dense, varlen, None, fa._pad_input, fa._unpad_input))
    monkeypatch.setattr(fa, "_loaded_implementation", None)
    try:
        yield log
    finally:
        fa._loaded_implementation = None  # the next real load must not reuse the emulated kernels


def use_flash_attention(model) -> None:
    """Switch a loaded model to the ``flash_attention_2`` code path (the emulated kernels stand in for flash-attn)."""
    model.config._attn_implementation = "flash_attention_2"
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and cfg is not model.config:
            cfg._attn_implementation = "flash_attention_2"
