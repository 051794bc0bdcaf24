"""The selected-row LM head: log-probabilities (and KL to a frozen reference) on the rows that need them only.

Scoring, stage 1 (CPT) and stage 2 (SFT) all end the same way: the transformer body has produced hidden states,
a few rows of them predict a token that matters (a query token, a labelled token), and the LM head turns those
rows into ``log p(target)``; SFT also needs ``KL(p_ref || p_theta)`` on some rows. :func:`row_logprobs` is the
one implementation, and it never materialises ``[batch, seq, vocab]`` logits.

What it guarantees:

- **fp32**: logits, softmax and KL are computed in fp32 whatever the weights' dtype (a bf16 logit carries ~0.06
  of rounding error at |z| ~ 20, enough to move ``exp(s) / 0.001`` by more than 1). Autocast is off inside. The
  price with bf16/fp16 weights is an fp32 copy of the head weight while the head runs (``4 * V * H`` bytes, in the
  forward and again in the backward; 0.11 GB for SmolLM2's 49k x 576 head, 2.2 GB for a 152k x 3584 one).
- **Memory**: rows go through the head in chunks of about 8 MiB of fp32 logits, and for a plain ``nn.Linear``
  head the backward is hand-written (:class:`_RowHeadFn`): nothing but the inputs is saved, each chunk's logits
  are recomputed, and the weight gradient is accumulated in one fp32 ``[V, H]`` buffer for all chunks (autograd
  would hold one per chunk).
- **DeepSpeed ZeRO-3**: the head is called through its module (``head(...)``, with the fused function as its
  forward), so ZeRO-3's module hooks gather the partitioned weight before the forward and again before the
  backward, and hand the gradient back to the partition, exactly as for any ``nn.Linear``. The number of
  collectives does not depend on the number of rows: one module call per :func:`row_logprobs` call, one gather of
  a partitioned reference head in the forward and one in the backward. Every process must therefore make the same
  number of :func:`row_logprobs` calls, which the training loops do (one per step, even with zero rows).
- **Other heads** (a LoRA-wrapped ``lm_head``, a quantized head) go through autograd in the head's own dtype:
  chunked and checkpointed, or, when the head's weights are ZeRO-3 partitioned, in one call over all rows (a
  checkpoint's recomputation would run after ZeRO-3 released the gathered weight, and per-chunk calls would give
  ranks different collective counts); that call holds every row's ``[V]`` logits, so keep LoRA off ``lm_head``
  under ZeRO-3 (the default targets leave it alone).

Definitions, per row ``n`` with logits ``z_n = transform(W h_n + b)`` (:class:`LogitTransform`)::

    lp_n = log softmax(z_n)[target_n]
    kl_n = sum_v p_ref(v) (log p_ref(v) - log p_theta(v)),   p_ref = softmax(transform(W_ref h_ref_n + b_ref))

(entries with ``p_ref = 0`` contribute 0).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Protocol

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from .wrappers import call_as_forward, full_shape, is_zero3_param

__all__ = [
    "ReferenceHead",
    "LogitTransform",
    "row_logprobs",
    "chunk_rows_for",
    "target_rows",
    "segment_mean",
    "is_plain_linear",
]

_CHUNK_BYTES = 2**23  # ~8 MiB per [n, V] fp32 tensor of a chunk (a chunk holds a few of them)

RefWeights = tuple[torch.Tensor, "torch.Tensor | None"]


class ReferenceHead(Protocol):
    """What :func:`row_logprobs` needs from a frozen reference: its head's weights, for the duration of a block.

    ``head_weights()`` yields ``(weight [V, H], bias [V] | None)`` as full tensors (gathering them first under
    ZeRO-3: a collective), or ``None`` when the reference's head is the policy's own head (LoRA with the adapters
    off, a frozen shared head).
    """

    def head_weights(self) -> ContextManager[RefWeights | None]: ...


def chunk_rows_for(vocab_size: int) -> int:
    """Rows per head chunk: about 8 MiB of fp32 logits, at least 16 rows (42 rows for a 49k vocabulary)."""
    return max(16, _CHUNK_BYTES // (4 * max(int(vocab_size), 1)))


def target_rows(target_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions whose hidden state predicts a target token.

    Args:
        target_mask: ``[B, L]`` bool, True at tokens to be predicted (never at position 0).

    Returns:
        ``(seq [N], pred_pos [N])`` in row-major order: token ``(b, t)`` is predicted by the hidden state at
        ``(b, t - 1)``.

    Raises:
        ValueError: A target at position 0 (nothing precedes it).
    """
    b, t = target_mask.nonzero(as_tuple=True)
    if (t == 0).any():
        raise ValueError("a target token at position 0 has no prefix to be predicted from")
    return b, t - 1


def segment_mean(values: torch.Tensor, segment: torch.Tensor, n: int) -> torch.Tensor:
    """Mean of ``values [N]`` per segment id in ``[0, n)``; empty segments give 0."""
    total = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, segment, values)
    count = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, segment, torch.ones_like(values))
    return total / count.clamp(min=1)


def is_plain_linear(head: nn.Module) -> bool:
    """True when the head is a linear layer with a floating-point weight, whose rows the fused path can compute."""
    w = getattr(head, "weight", None)
    return isinstance(head, nn.Linear) and w is not None and w.is_floating_point()


@dataclass(frozen=True)
class LogitTransform:
    """What an architecture does to ``W h + b`` before the softmax: ``z = c * tanh(scale * raw / c)``.

    ``scale`` is Cohere's ``logit_scale``; ``softcap`` (``c``) is Gemma-2/3's ``final_logit_softcapping``
    (``None`` = no soft cap).
    """

    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def of(cls, config: Any) -> "LogitTransform":
        """Read a model config (absent attributes mean identity)."""
        scale = getattr(config, "logit_scale", None)
        cap = getattr(config, "final_logit_softcapping", None)
        return cls(scale=float(scale) if scale is not None else 1.0, softcap=float(cap) if cap else None)

    def apply(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(z, tanh term)``; the tanh term (``None`` without a soft cap) serves the backward."""
        z = raw * self.scale if self.scale != 1.0 else raw
        if self.softcap is None:
            return z, None
        t = torch.tanh(z / self.softcap)
        return t * self.softcap, t

    def backward(self, g_z: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        """``dL/d raw`` from ``dL/dz`` (in place on ``g_z``)."""
        if t is not None:
            g_z *= 1 - t * t
        if self.scale != 1.0:
            g_z *= self.scale
        return g_z


IDENTITY = LogitTransform()


def _logits(h: torch.Tensor, w32: torch.Tensor, b32: torch.Tensor | None, transform: LogitTransform) -> torch.Tensor:
    """fp32 logits of rows ``h``."""
    return transform.apply(F.linear(h.float(), w32, b32))[0]


def _kl_rows(p_ref: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """``sum_v p_ref (log p_ref - log p)`` per row; entries with ``p_ref = 0`` contribute 0."""
    return (torch.xlogy(p_ref, p_ref) - p_ref * logp).sum(-1)


def _fp32(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    return weight.float(), (bias.float() if bias is not None else None)


@contextlib.contextmanager
def _no_autocast(device: torch.device) -> Iterator[None]:
    with torch.autocast(device_type=device.type, enabled=False):
        yield


class _RowHeadFn(torch.autograd.Function):
    """Head rows with a hand-written backward (see the module docstring).

    Gradients w.r.t. the (soft-capped) logits ``z`` of a row: ``d log p(y) / dz = onehot(y) - p_theta`` and
    ``d KL(p_ref || p_theta) / dz = p_theta - p_ref``; through the soft cap ``dz/dz_raw = 1 - tanh(z_raw/c)^2``.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, ref_h, targets, chunk, transform, ref_weights):  # noqa: D401
        n = h.shape[0]
        m = ref_h.shape[0] if ref_h is not None else 0
        lp = torch.empty(n, dtype=torch.float32, device=h.device)
        kl = torch.empty(m, dtype=torch.float32, device=h.device)
        w32, b32 = _fp32(weight, bias)
        with _no_autocast(h.device), (ref_weights() if ref_weights is not None else contextlib.nullcontext()) as rw:
            rw32, rb32 = (w32, b32) if rw is None else _fp32(*rw)
            for s in range(0, n, chunk):
                e = min(s + chunk, n)
                logp = torch.log_softmax(_logits(h[s:e], w32, b32, transform), dim=-1)
                lp[s:e] = logp.gather(-1, targets[s:e, None]).squeeze(-1)
                if s < m:
                    k = min(e, m)
                    p_ref = torch.softmax(_logits(ref_h[s:k], rw32, rb32, transform), dim=-1)
                    kl[s:k] = _kl_rows(p_ref, logp[: k - s])
                    del p_ref
                del logp
        ctx.save_for_backward(h, weight, bias, ref_h, targets)
        ctx.chunk, ctx.transform, ctx.ref_weights, ctx.m = chunk, transform, ref_weights, m
        return lp, kl

    @staticmethod
    def backward(ctx, g_lp, g_kl):
        h, weight, bias, ref_h, targets = ctx.saved_tensors
        chunk, transform, m = ctx.chunk, ctx.transform, ctx.m
        n = h.shape[0]
        need_h = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        d_h = torch.empty_like(h) if need_h else None
        d_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        d_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        g_lp = torch.zeros(n, device=h.device) if g_lp is None else g_lp.float()
        g_kl = torch.zeros(m, device=h.device) if g_kl is None else g_kl.float()
        w32, b32 = _fp32(weight, bias)
        # Entered whenever there is a reference (not only when this process has KL rows): under ZeRO-3 it is a
        # collective, and every process must make it.
        ref_ctx = ctx.ref_weights() if ctx.ref_weights is not None else contextlib.nullcontext()
        with torch.no_grad(), _no_autocast(h.device), ref_ctx as rw:
            rw32, rb32 = (w32, b32) if rw is None else _fp32(*rw)
            for s in range(0, n, chunk):
                e = min(s + chunk, n)
                z, t = transform.apply(F.linear(h[s:e].float(), w32, b32))
                p = torch.softmax(z, dim=-1)
                del z
                # d/dz of (g_lp * log p(y)): g_lp * (onehot(y) - p)
                g_z = p * (-g_lp[s:e, None])
                g_z.scatter_add_(-1, targets[s:e, None], g_lp[s:e, None])
                if s < m:
                    k = min(e, m)
                    p_ref = torch.softmax(_logits(ref_h[s:k], rw32, rb32, transform), dim=-1)
                    g_z[: k - s] += g_kl[s:k, None] * (p[: k - s] - p_ref)
                    del p_ref
                del p
                g_z = transform.backward(g_z, t)
                if d_h is not None:
                    d_h[s:e] = (g_z @ w32).to(h.dtype)
                if d_w is not None:
                    d_w.addmm_(g_z.t(), h[s:e].float())
                if d_b is not None:
                    d_b += g_z.sum(0)
        if d_w is not None:
            d_w = d_w.to(weight.dtype)
        if d_b is not None:
            d_b = d_b.to(bias.dtype)
        return d_h, d_w, d_b, None, None, None, None, None


def _autograd_rows(
    head: nn.Module, h: torch.Tensor, targets: torch.Tensor, ref_h: torch.Tensor | None,
    ref_weights: Callable[[], ContextManager[RefWeights | None]] | None, chunk: int, transform: LogitTransform,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows through ``head``'s own forward (heads the fused path cannot read), with autograd."""
    m = ref_h.shape[0] if ref_h is not None else 0
    base = getattr(head, "base_layer", head)  # a peft-wrapped head: the reference is the frozen base layer

    def rows(hc: torch.Tensor, tc: torch.Tensor, rc: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        z = transform.apply(head(hc).float())[0]
        logp = torch.log_softmax(z, dim=-1)
        lp = logp.gather(-1, tc[:, None]).squeeze(-1)
        if ref_weights is None:
            return lp, logp.new_zeros(0)
        rc = rc if rc is not None else hc.new_zeros(0, hc.shape[-1])
        with torch.no_grad(), ref_weights() as rw:  # entered even without rows: a collective under ZeRO-3
            w, b = rw if rw is not None else (base.weight, base.bias)
            p_ref = torch.softmax(_logits(rc, *_fp32(w, b), transform), dim=-1)
        return lp, _kl_rows(p_ref, logp[: rc.shape[0]])

    if any(is_zero3_param(p) for p in head.parameters()):
        # One call over every row: the same collectives on every process, and no recomputation after ZeRO-3 has
        # released the gathered weights (at the cost of holding all rows' logits).
        return rows(h, targets, ref_h)
    lps, kls = [], []
    for s in range(0, h.shape[0], chunk):
        e = min(s + chunk, h.shape[0])
        rc = ref_h[s : min(e, m)] if s < m else None
        args = (h[s:e], targets[s:e], rc)
        lp, kl = checkpoint(rows, *args, use_reentrant=False) if torch.is_grad_enabled() else rows(*args)
        lps.append(lp)
        kls.append(kl)
    if not lps:
        return h.new_zeros(0, dtype=torch.float32), h.new_zeros(0, dtype=torch.float32)
    return torch.cat(lps), torch.cat(kls)


def row_logprobs(
    head: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    *,
    reference: ReferenceHead | None = None,
    ref_hidden: torch.Tensor | None = None,
    transform: LogitTransform = IDENTITY,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log p(target)`` of selected rows, and ``KL(p_ref || p_theta)`` on the first rows.

    Args:
        head: The policy's LM head module (``model.get_output_embeddings()``).
        hidden: ``[N, H]`` final hidden states of the rows (after the final norm).
        targets: ``[N]`` token predicted by each row.
        reference: Frozen reference whose head gives ``p_ref`` (see :class:`ReferenceHead`); ``None`` = no KL.
        ref_hidden: ``[M, H]`` reference hidden states for rows ``0..M-1`` (``M <= N``).
        transform: The architecture's logit scale / soft cap (:meth:`LogitTransform.of` of the config).
        chunk_rows: Rows per chunk (default :func:`chunk_rows_for`).

    Returns:
        ``(lp [N], kl [M])``, fp32, differentiable w.r.t. ``hidden`` and the head's parameters.
    """
    if (reference is None) != (ref_hidden is None):
        raise ValueError("reference and ref_hidden go together: pass both (KL rows) or neither")
    if ref_hidden is not None and ref_hidden.shape[0] > hidden.shape[0]:
        raise ValueError(f"ref_hidden has {ref_hidden.shape[0]} rows, more than hidden's {hidden.shape[0]}")
    weight = getattr(head, "weight", None)
    vocab = full_shape(weight)[0] if weight is not None else getattr(head, "out_features", 1)
    chunk = chunk_rows or chunk_rows_for(vocab)
    ref_weights = reference.head_weights if reference is not None else None
    targets = targets.to(hidden.device)
    if not is_plain_linear(head):
        return _autograd_rows(head, hidden, targets, ref_hidden, ref_weights, chunk, transform)

    def fused(h: torch.Tensor, t: torch.Tensor, rh: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return _RowHeadFn.apply(h, head.weight, head.bias, rh, t, chunk, transform, ref_weights)

    return call_as_forward(head, fused, hidden, targets, ref_hidden)
