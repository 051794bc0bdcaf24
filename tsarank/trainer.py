"""``RankingTrainer``: the stage-2 objective ``L = L_rank + lambda_gen * L_gen + lambda_dp * L_dp``.

One step over a batch of ``B`` groups of ``G`` sequences (``[B*G, L]``, row ``b*G + j``, ``j = 0`` positive):

1. the policy body runs **once** over all ``B*G`` sequences (through the DDP / DeepSpeed wrapper, so their
   hooks run); a forward hook on the body captures the final hidden states ``[B*G, L, H]``. When the model
   supports it the sequences are first packed into fewer rows (per-sequence ``position_ids``, block-diagonal
   causal attention), so padding costs no compute; the hidden states are unpacked afterwards;
2. the rows each loss needs are gathered -- a row ``(b, p)`` is the hidden state at position ``p`` that
   predicts token ``p + 1``:

   - scores: the query tokens of every sequence (``query_likelihood``) or the last token (``last_token``);
   - ``L_gen``: the positive's tokens 1.. (span ``all``) or its query tokens (span ``query``);
   - ``L_dp``: the query tokens of every sequence (span ``query``) or every non-pad token 1.. (span ``all``);

3. ``lm_head`` is applied to the union of those rows only, in chunks of ``logit_chunk_rows`` rows, and each
   chunk's ``[n, V]`` logits are recomputed in the backward pass, so the head never holds more than one chunk
   of vocabulary-sized tensors. For a plain ``nn.Linear`` head the backward is hand-written
   (``_FusedRowHead``) and keeps one ``[V, H]`` weight gradient for all chunks; otherwise (LoRA on the head,
   ZeRO-3 partitioned weights) each chunk is an autograd checkpoint;
4. the reference's hidden states at the ``L_dp`` rows come from :mod:`tsarank.reference` (no grad) and its
   head is applied chunk by chunk as well.

Definitions (exactly those of the full-logits formulation with padding masked):

- ``s_j = mean_t log p(q_t | ...)`` over the query tokens of sequence ``j``; ``L_rank = loss(s [B, G])``;
- ``L_gen = -(1/|T|) sum_{(b,t) in T} log p(x_{b,t} | x_{b,<t})`` pooled over the positives' target tokens;
- ``L_dp = (1/|D|) sum_{(b,p) in D} KL(p_ref(.|b,p) || p_theta(.|b,p))`` pooled over the selected positions.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import Trainer

from tsarank.losses import get_loss, requires_teacher
from tsarank.modeling import HEAD_WEIGHTS, LastTokenHead, body_and_head, segment_mean, unwrap_model
from tsarank.prompts import LAST_TOKEN, QUERY_LIKELIHOOD, SCORING_HEADS
from tsarank.reference import Reference, forward_hidden, is_peft_model

logger = logging.getLogger(__name__)

__all__ = [
    "RankingLossConfig", "RankingTrainer", "ranking_loss_terms", "group_loss", "SCORE_HEAD_ATTR", "LossTerms",
    "PackedBatch", "pack_sequences", "supports_packing", "packing_capacity",
]

SCORE_HEAD_ATTR = "tsarank_score_head"
_SPANS = ("all", "query")
_CHUNK_BYTES = 2**23  # ~8 MiB per [n, V] fp32 tensor in a logits chunk (a chunk holds about 6 of them)


@dataclass
class RankingLossConfig:
    """Settings of the stage-2 loss (see the module docstring for the formulas).

    Attributes:
        group_size: ``G`` (rows per group in the batch).
        loss: Group loss name in :data:`tsarank.losses.LOSSES`.
        temperature: ``tau`` of the listwise / Poly-1 softmax.
        score_transform: ``"prob"`` (``exp``, paper) or ``"logprob"``, listwise softmax only.
        poly_epsilon: ``epsilon`` of Poly-1.
        distill_temperature: ``T`` of the distillation KL.
        lambda_gen: Weight of ``L_gen`` (0 = off).
        gen_span: ``"all"`` (positive's whole sequence, paper code) or ``"query"``.
        lambda_dp: Weight of ``L_dp`` (0 = off, no reference needed).
        dp_span: ``"query"`` (default) or ``"all"`` non-pad positions.
        scoring_head: ``"query_likelihood"`` or ``"last_token"``.
        logit_chunk_rows: Rows per ``lm_head`` chunk; ``None`` = about 8 MiB of fp32 logits per chunk (at least
            16 rows): 42 rows for a 49k vocabulary.
        pack_sequences: Run the body on the ``B*G`` sequences packed into as few rows as fit (per-sequence
            ``position_ids``, block-diagonal causal attention) instead of padded; ``None`` = when the model
            supports it (:func:`supports_packing`). Same values, less padding compute.
        fused_head: Compute the head rows with a hand-written backward that keeps a single ``[V, H]`` weight
            gradient (see ``_FusedRowHead``); ``None`` = when the head is a plain ``nn.Linear`` outside ZeRO-3,
            else the checkpointed autograd path. Same values and gradients.
    """

    group_size: int = 16
    loss: str = "softmax"
    temperature: float = 0.001
    score_transform: str = "prob"
    poly_epsilon: float = 1.0
    distill_temperature: float = 1.0
    lambda_gen: float = 1.0
    gen_span: str = "all"
    lambda_dp: float = 1.0
    dp_span: str = "query"
    scoring_head: str = QUERY_LIKELIHOOD
    logit_chunk_rows: int | None = None
    pack_sequences: bool | None = None
    fused_head: bool | None = None

    def __post_init__(self) -> None:
        get_loss(self.loss)  # unknown names fail here, with the list of valid ones
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        for name in ("gen_span", "dp_span"):
            if getattr(self, name) not in _SPANS:
                raise ValueError(f"{name} must be one of {_SPANS}, got {getattr(self, name)!r}")
        if self.scoring_head not in SCORING_HEADS:
            raise ValueError(f"scoring_head must be one of {SCORING_HEADS}, got {self.scoring_head!r}")
        if self.lambda_gen < 0 or self.lambda_dp < 0:
            raise ValueError(f"lambda_gen and lambda_dp must be >= 0, got {self.lambda_gen} and {self.lambda_dp}")
        if self.scoring_head == LAST_TOKEN:
            for name, lam in (("gen_span", self.lambda_gen), ("dp_span", self.lambda_dp)):
                if lam > 0 and getattr(self, name) == "query":
                    raise ValueError(
                        f"{name}='query' needs a scored query span, which the last_token head does not have "
                        f"(its query sits inside the prompt); use {name}='all' or set its lambda to 0"
                    )
        if self.logit_chunk_rows is not None and self.logit_chunk_rows < 1:
            raise ValueError(f"logit_chunk_rows must be >= 1 or None, got {self.logit_chunk_rows}")

    @classmethod
    def from_args(cls, sft_args: Any, **overrides: Any) -> "RankingLossConfig":
        """Build from :class:`tsarank.config.SFTArguments` (``train_group_size`` -> ``group_size``)."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            src = "train_group_size" if f.name == "group_size" else f.name
            if hasattr(sft_args, src):
                values[f.name] = getattr(sft_args, src)
        values.update(overrides)
        return cls(**values)

    def needs_reference(self) -> bool:
        return self.lambda_dp > 0

    def chunk_rows(self, vocab_size: int) -> int:
        if self.logit_chunk_rows is not None:
            return self.logit_chunk_rows
        return max(16, _CHUNK_BYTES // (4 * max(vocab_size, 1)))


def group_loss(config: RankingLossConfig, scores: torch.Tensor, teacher: torch.Tensor | None) -> torch.Tensor:
    """``L_rank`` of ``scores [B, G]`` (positive at 0) with the configured loss and its own hyper-parameters."""
    fn = get_loss(config.loss)
    if requires_teacher(config.loss):
        if teacher is None:
            raise ValueError(f"loss {config.loss!r} needs teacher scores; give the groups 'teacher_scores'")
        if config.loss.strip().lower() == "distill_kl":
            return fn(scores, teacher, temperature=config.distill_temperature)
        return fn(scores, teacher)
    name = fn.__name__
    if name == "listwise_softmax_ce":
        return fn(scores, temperature=config.temperature, transform=config.score_transform)
    if name == "poly1_softmax_ce":
        return fn(scores, temperature=config.temperature, epsilon=config.poly_epsilon)
    return fn(scores)


@dataclass
class LossTerms:
    """The loss of one batch and its parts (``rank``, ``gen``, ``dp`` are unweighted; ``None`` = off)."""

    loss: torch.Tensor
    rank: torch.Tensor
    gen: torch.Tensor | None
    dp: torch.Tensor | None
    scores: torch.Tensor


# ---------------------------------------------------------------------------------------------- packing
_PACKING_ATTN = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
# With a dense block-diagonal mask (SDPA / eager) a packed row of C positions costs C^2 attention, so rows are kept
# short (1.5x the longest sequence: most of the padding goes, attention grows little); varlen FlashAttention only
# computes within sequences, so everything goes into one row.
_PACK_FACTOR = 1.5


def packing_capacity(model: nn.Module, attention_mask: torch.Tensor) -> int:
    """Row length for :func:`pack_sequences` given the model's attention backend."""
    attn = getattr(getattr(unwrap_model(model), "config", None), "_attn_implementation", None) or ""
    length = attention_mask.shape[1]
    if attn.startswith("flash_attention"):
        return max(length, int(attention_mask.sum()))
    return int(_PACK_FACTOR * length + 0.5)


def supports_packing(model: nn.Module) -> bool:
    """True when the model builds its attention mask with ``transformers.masking_utils`` (which turns
    restarting ``position_ids`` without an attention mask into block-diagonal causal attention) and uses an
    attention backend that honours it. Llama, Qwen2, Mistral, Gemma, ... in transformers v5."""
    lm = unwrap_model(model)
    body, _ = body_and_head(lm)
    mods = {sys.modules.get(type(m).__module__) for m in (lm, body)}
    uses_masking_utils = any(m is not None and hasattr(m, "create_causal_mask") for m in mods)
    attn = getattr(getattr(lm, "config", None), "_attn_implementation", None)
    return uses_masking_utils and attn in _PACKING_ATTN


@dataclass
class PackedBatch:
    """``R`` right-padded sequences packed into ``P`` rows of ``C`` positions.

    Attributes:
        input_ids: ``[P, C]``; unused tails hold the pad id (a separate "sequence" of their own).
        position_ids: ``[P, C]``, restarting at 0 for every sequence (and for each tail).
        seq_row: ``[R]`` packed row of each sequence.
        seq_offset: ``[R]`` start of each sequence in its packed row.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    seq_row: torch.Tensor
    seq_offset: torch.Tensor

    def to_packed(self, rows: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Map padded coordinates ``(seq, pos)`` to packed ``(row, pos)``."""
        r, p = rows
        return self.seq_row[r], self.seq_offset[r] + p

    def unpack(self, hidden: torch.Tensor, length: int) -> torch.Tensor:
        """``[P, C, H]`` -> the padded layout ``[R, length, H]`` (padding positions hold arbitrary rows)."""
        cols = (self.seq_offset[:, None] + torch.arange(length, device=hidden.device)).clamp(max=hidden.shape[1] - 1)
        return hidden[self.seq_row[:, None], cols]


def pack_sequences(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int, capacity: int | None = None
) -> PackedBatch:
    """First-fit-decreasing packing of right-padded sequences into rows of ``capacity`` positions.

    Args:
        input_ids: ``[R, L]`` right-padded.
        attention_mask: ``[R, L]``.
        pad_id: Fill value of unused tails.
        capacity: Row length, at least ``L`` (default ``L``).
    """
    lengths = attention_mask.sum(dim=1).tolist()
    capacity = max(int(capacity or 0), input_ids.shape[1])
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    free: list[int] = []  # remaining capacity per packed row
    seq_row, seq_offset = [0] * len(lengths), [0] * len(lengths)
    for i in order:
        n = lengths[i]
        row = next((j for j, f in enumerate(free) if f >= n), None)
        if row is None:
            free.append(capacity)
            row = len(free) - 1
        seq_row[i], seq_offset[i] = row, capacity - free[row]
        free[row] -= n
    device = input_ids.device
    packed = torch.full((len(free), capacity), pad_id, dtype=input_ids.dtype, device=device)
    positions = torch.zeros((len(free), capacity), dtype=torch.long, device=device)
    ar = torch.arange(capacity, device=device)
    for i, n in enumerate(lengths):
        r, o = seq_row[i], seq_offset[i]
        packed[r, o : o + n] = input_ids[i, :n]
        positions[r, o : o + n] = ar[:n]
    for r, f in enumerate(free):  # the tail restarts its own positions so it never joins the last sequence
        positions[r, capacity - f :] = ar[:f]
    return PackedBatch(packed, positions, torch.tensor(seq_row, device=device), torch.tensor(seq_offset, device=device))


# ------------------------------------------------------------------------------------------- row losses
def _rows_logprob(head: nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log p(target | row)`` for ``h [n, H]``, ``targets [n]`` -> ``[n]`` fp32."""
    logp = torch.log_softmax(head(h).float(), dim=-1)
    return logp.gather(-1, targets[:, None]).squeeze(-1)


def _rows_logprob_kl(
    head: nn.Module, ref_head: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, ref_h: torch.Tensor,
    targets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(target), KL(p_ref || p_theta))`` per row, ``[n]`` each, fp32.

    ``KL = sum_v p_ref (log p_ref - log p_theta)``; vocabulary entries with ``p_ref = 0`` contribute 0 (as in
    :func:`tsarank.losses.kl_ref_policy`). The reference side is computed without grad.
    """
    logp = torch.log_softmax(head(h).float(), dim=-1)
    lp = logp.gather(-1, targets[:, None]).squeeze(-1)
    return lp, _kl_rows(_ref_probs(ref_head, ref_h), logp)


def _chunked(fn: Callable[..., Any], tensors: list[torch.Tensor], chunk: int, *, use_checkpoint: bool) -> list[Any]:
    """Apply ``fn`` to row chunks of ``tensors``, each chunk checkpointed: its ``[n, V]`` intermediates are
    freed as soon as the chunk is done and recomputed, one chunk at a time, in the backward pass. (Even a
    single chunk: otherwise its log-probabilities and reference probabilities would stay alive through the
    whole body backward.)"""
    n = tensors[0].shape[0]
    outs = []
    for start in range(0, n, chunk):
        parts = [t[start : start + chunk] for t in tensors]
        if use_checkpoint and torch.is_grad_enabled():
            outs.append(checkpoint(fn, *parts, use_reentrant=False))
        else:
            outs.append(fn(*parts))
    return outs


class _FusedRowHead(torch.autograd.Function):
    """``lm_head`` + log-softmax + target log-prob (+ KL to the reference on the first ``n_kl`` rows), chunked,
    with a hand-written backward that accumulates the weight gradient into ONE ``[V, H]`` buffer.

    Autograd over chunks would create one ``[V, H]`` weight gradient per chunk and add them pairwise (two alive
    at once), and hold the first until the whole body backward has finished (the weight is tied to the input
    embeddings). Here nothing but the inputs is saved; each chunk's logits are recomputed in the backward pass.

    Gradients w.r.t. the logits ``z`` of a row: ``d log p(y)/dz = onehot(y) - p_theta`` and
    ``d KL(p_ref || p_theta)/dz = p_theta - p_ref``.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, ref_h, targets, n_kl, chunk, ref_head):  # noqa: D401
        n = h.shape[0]
        lp = torch.empty(n, dtype=torch.float32, device=h.device)
        kl = torch.empty(n_kl, dtype=torch.float32, device=h.device)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            logp = torch.log_softmax(nn.functional.linear(h[s:e], weight, bias).float(), dim=-1)
            lp[s:e] = logp.gather(-1, targets[s:e, None]).squeeze(-1)
            if s < n_kl:
                k = min(e, n_kl)
                p_ref = _ref_probs(ref_head, ref_h[s:k])
                kl[s:k] = _kl_rows(p_ref, logp[: k - s])
        ctx.save_for_backward(h, weight, bias, ref_h, targets)
        ctx.n_kl, ctx.chunk, ctx.ref_head = n_kl, chunk, ref_head
        return lp, kl

    @staticmethod
    def backward(ctx, g_lp, g_kl):
        h, weight, bias, ref_h, targets = ctx.saved_tensors
        n_kl, chunk = ctx.n_kl, ctx.chunk
        n = h.shape[0]
        need_w = ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        d_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        d_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        d_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        g_lp = torch.zeros(n, device=h.device) if g_lp is None else g_lp.float()
        if g_kl is None:
            g_kl = torch.zeros(n_kl, device=h.device)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            with torch.no_grad():
                p = torch.softmax(nn.functional.linear(h[s:e], weight, bias).float(), dim=-1)
                # d/dz of (g_lp * log p(y)): g_lp * (onehot(y) - p)
                g_z = p * (-g_lp[s:e, None])
                g_z.scatter_add_(-1, targets[s:e, None], g_lp[s:e, None])
                if s < n_kl:
                    k = min(e, n_kl)
                    p_ref = _ref_probs(ctx.ref_head, ref_h[s:k])
                    g_z[: k - s] += g_kl[s:k, None] * (p[: k - s] - p_ref)
                    del p_ref
                del p
                if d_h is not None:
                    d_h[s:e] = (g_z.to(weight.dtype) @ weight).to(h.dtype)
                if d_w is not None:
                    d_w.addmm_(g_z.t(), h[s:e].float())
                if d_b is not None:
                    d_b += g_z.sum(0)
        if d_w is not None:
            d_w = d_w.to(weight.dtype)
        if d_b is not None:
            d_b = d_b.to(bias.dtype)
        return d_h, d_w, d_b, None, None, None, None, None


def _ref_probs(ref_head: Callable[[torch.Tensor], torch.Tensor], ref_h: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(ref_head(ref_h).float(), dim=-1)


def _kl_rows(p_ref: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """``sum_v p_ref (log p_ref - log p)`` per row; entries with ``p_ref = 0`` contribute 0."""
    return (torch.xlogy(p_ref, p_ref) - p_ref * logp).sum(-1)


def _can_fuse(head: nn.Module) -> bool:
    """The fused path reads ``head.weight`` directly: only for a plain ``nn.Linear`` whose weight is a real
    tensor (not a ZeRO-3 placeholder, not wrapped by an adapter)."""
    w = getattr(head, "weight", None)
    return type(head) is nn.Linear and w is not None and not hasattr(w, "ds_id") and w.dim() == 2 and w.numel() > 0


def ranking_loss_terms(
    config: RankingLossConfig,
    head: nn.Module,
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    query_mask: torch.Tensor,
    *,
    teacher: torch.Tensor | None = None,
    reference: Reference | None = None,
    score_head: LastTokenHead | None = None,
    packed: PackedBatch | None = None,
) -> LossTerms:
    """All stage-2 loss terms from the policy's final hidden states (pure given its inputs; no full logits).

    Args:
        config: Loss settings.
        head: The policy's LM head.
        hidden: ``[B*G, L, H]`` final hidden states of the policy (right padding).
        input_ids: ``[B*G, L]``.
        attention_mask: ``[B*G, L]`` (1 = real token).
        query_mask: ``[B*G, L]`` bool, the scored query tokens (never position 0).
        teacher: ``[B, G]`` teacher scores for distillation losses.
        reference: Frozen reference (required when ``config.lambda_dp > 0``); its ``prepare`` must have been
            called before the policy forward that produced ``hidden``.
        score_head: The ``last_token`` head (required for that scoring head).
        packed: When the policy ran on packed sequences: the packing (``hidden`` is already unpacked); the
            reference then runs on the same packed rows.

    Returns:
        :class:`LossTerms`.
    """
    n_seq, length = input_ids.shape
    g = config.group_size
    if n_seq % g:
        raise ValueError(f"batch has {n_seq} sequences, not a multiple of group_size {g}")
    b = n_seq // g
    device = input_ids.device
    real = attention_mask.bool()
    query_mask = query_mask.bool() & real
    # A prediction row (r, p) predicts token p + 1, so a token mask [.., 1:] becomes a row mask [.., :-1].
    tokens_after_first = real.clone()
    tokens_after_first[:, 0] = False
    is_pos = torch.zeros(n_seq, dtype=torch.bool, device=device)
    is_pos[::g] = True

    last_token = config.scoring_head == LAST_TOKEN
    score_rows = torch.zeros_like(real) if last_token else query_mask
    if config.lambda_gen > 0:
        gen_tokens = (tokens_after_first if config.gen_span == "all" else query_mask) & is_pos[:, None]
    else:
        gen_tokens = torch.zeros_like(real)
    if config.lambda_dp > 0:
        if reference is None:
            raise ValueError("lambda_dp > 0 needs a reference model; build one with tsarank.reference.build_reference")
        dp_tokens = tokens_after_first if config.dp_span == "all" else query_mask
    else:
        dp_tokens = torch.zeros_like(real)

    def rows_of(token_mask: torch.Tensor) -> torch.Tensor:
        return token_mask[:, 1:]  # [R, L-1] over prediction positions 0..L-2

    score_r, gen_r, dp_r = rows_of(score_rows), rows_of(gen_tokens), rows_of(dp_tokens)
    chunk = config.chunk_rows(getattr(head, "out_features", None) or head.weight.shape[0])

    # Group A: rows needing the KL (and their log-prob); group B: log-prob only.
    a_mask = dp_r
    b_mask = (score_r | gen_r) & ~dp_r
    lp_grid = torch.zeros(n_seq, length - 1, dtype=torch.float32, device=device)
    dp_value = None
    ra, pa = a_mask.nonzero(as_tuple=True)
    rb, pb = b_mask.nonzero(as_tuple=True)
    n_a = int(ra.numel())
    ref_h = None
    if n_a:
        if packed is None:
            ref_h = reference.hidden_at(input_ids, attention_mask, (ra, pa))
        else:
            ref_h = reference.hidden_at(packed.input_ids, None, packed.to_packed((ra, pa)), packed.position_ids)
    fuse = config.fused_head if config.fused_head is not None else _can_fuse(head)
    if fuse and n_a + int(rb.numel()):
        rows_r, rows_p = torch.cat([ra, rb]), torch.cat([pa, pb])
        ref_fn = reference.head_logits if n_a else None
        lp_all, kl = _FusedRowHead.apply(
            hidden[rows_r, rows_p], head.weight, head.bias, ref_h if n_a else hidden.new_zeros(0, hidden.shape[-1]),
            input_ids[rows_r, rows_p + 1], n_a, chunk, ref_fn,
        )
        lp_grid = lp_grid.index_put((rows_r, rows_p), lp_all)
        if n_a:
            dp_value = kl.mean()
    else:
        if n_a:
            outs = _chunked(
                lambda h, rh, t: _rows_logprob_kl(head, reference.head_logits, h, rh, t),
                [hidden[ra, pa], ref_h, input_ids[ra, pa + 1]], chunk, use_checkpoint=True,
            )
            dp_value = torch.cat([o[1] for o in outs]).mean()
            lp_grid = lp_grid.index_put((ra, pa), torch.cat([o[0] for o in outs]))
        if rb.numel():
            outs = _chunked(lambda h, t: _rows_logprob(head, h, t), [hidden[rb, pb], input_ids[rb, pb + 1]], chunk,
                            use_checkpoint=True)
            lp_grid = lp_grid.index_put((rb, pb), torch.cat(outs))
    if dp_value is None and config.lambda_dp > 0:
        dp_value = hidden.sum() * 0.0

    if last_token:
        if score_head is None:
            raise ValueError("scoring_head 'last_token' needs a LastTokenHead (score_head=...)")
        last = attention_mask.sum(dim=1) - 1
        scores = score_head(hidden, last)
    else:
        rs, ps = score_r.nonzero(as_tuple=True)
        scores = segment_mean(lp_grid[rs, ps], rs, n_seq)
    scores = scores.view(b, g)
    rank = group_loss(config, scores, teacher)

    gen_value = None
    if config.lambda_gen > 0:
        gen_lp = lp_grid[gen_r]
        gen_value = -gen_lp.mean() if gen_lp.numel() else hidden.sum() * 0.0
    total = rank
    if gen_value is not None:
        total = total + config.lambda_gen * gen_value
    if dp_value is not None:
        total = total + config.lambda_dp * dp_value
    return LossTerms(loss=total, rank=rank, gen=gen_value, dp=dp_value, scores=scores)


# --------------------------------------------------------------------------------------------- trainer
class RankingTrainer(Trainer):
    """``transformers.Trainer`` with the stage-2 ranking objective.

    Args:
        *args, **kwargs: As for ``Trainer`` (model, args, train_dataset, data_collator, ...). The data collator
            must be a :class:`tsarank.data.groups.GroupCollator` (or produce the same keys).
        loss_config: :class:`RankingLossConfig`.
        reference: Frozen reference (``None`` allowed only with ``lambda_dp == 0``).
        score_head: The ``last_token`` head. It becomes a submodule of the policy (attribute
            ``tsarank_score_head``) so the optimizer, DDP and DeepSpeed see its parameters; it is removed from the
            saved model weights and written to ``tsarank_head.safetensors`` instead (:meth:`LastTokenHead.load`).

    The logged ``loss`` is accompanied by ``loss_rank``, ``loss_gen`` and ``loss_dp`` (unweighted means over the
    micro-batches since the last log, averaged over processes).
    """

    def __init__(
        self,
        *args: Any,
        loss_config: RankingLossConfig,
        reference: Reference | None = None,
        score_head: LastTokenHead | None = None,
        **kwargs: Any,
    ) -> None:
        if loss_config.needs_reference() and reference is None:
            raise ValueError(
                "lambda_dp > 0 needs a frozen reference (tsarank.reference.build_reference); "
                "pass reference=..., or set lambda_dp to 0"
            )
        if loss_config.scoring_head == LAST_TOKEN and score_head is None:
            raise ValueError("scoring_head 'last_token' needs score_head=LastTokenHead(hidden_size)")
        model = kwargs.get("model", args[0] if args else None)
        if score_head is not None:
            if model is None:
                raise ValueError("RankingTrainer needs the model to attach the score head to")
            unwrap_model(model).add_module(SCORE_HEAD_ATTR, score_head)
        super().__init__(*args, **kwargs)
        self.loss_config = loss_config
        self.reference = reference
        self.loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean
        self._term_sums: dict[str, torch.Tensor] = {}
        self._term_count = 0
        self._supports_packing: bool | None = None

    def _pad_id(self, model: nn.Module) -> int:
        tok = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        pad = getattr(tok, "pad_token_id", None)
        if pad is None:
            pad = getattr(unwrap_model(model).config, "pad_token_id", None)
        return int(pad) if pad is not None else 0

    # The collator's keys are not forward() arguments of the model; keep them.
    def _get_collator_with_removed_columns(self, data_collator: Callable, description: str | None = None) -> Callable:
        return data_collator

    @property
    def score_head(self) -> LastTokenHead | None:
        return getattr(unwrap_model(self.model), SCORE_HEAD_ATTR, None)

    # -------------------------------------------------------------------------------------------- loss
    def _policy_hidden(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None = None,
    ):
        """Run the policy once through its wrapper; return (final hidden [R, L, H], an output to anchor)."""
        return forward_hidden(model, input_ids, attention_mask, position_ids)

    def compute_terms(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> LossTerms:
        """The loss terms of one batch (``inputs`` from :class:`~tsarank.data.groups.GroupCollator`)."""
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        if self.reference is not None and self.loss_config.lambda_dp > 0:
            self.reference.prepare(model)
        pack = self.loss_config.pack_sequences
        if pack is None:
            if self._supports_packing is None:
                self._supports_packing = supports_packing(model)
            pack = self._supports_packing
        packed = None
        if pack and not bool(attention_mask.all()):
            packed = pack_sequences(input_ids, attention_mask, self._pad_id(model),
                                    packing_capacity(model, attention_mask))
            if packed.input_ids.shape[0] == input_ids.shape[0]:
                packed = None  # nothing saved: keep the plain padded forward
        if packed is not None:
            hidden, anchor = self._policy_hidden(model, packed.input_ids, None, packed.position_ids)
            hidden = packed.unpack(hidden, input_ids.shape[1])
        else:
            hidden, anchor = self._policy_hidden(model, input_ids, attention_mask)
        _, head = body_and_head(model)
        terms = ranking_loss_terms(
            self.loss_config, head, hidden, input_ids, attention_mask, inputs["query_mask"],
            teacher=inputs.get("teacher"), reference=self.reference, score_head=self.score_head, packed=packed,
        )
        if anchor.requires_grad and type(model).__name__ == "DeepSpeedEngine":
            # Keep the engine's forward output in the graph (value and gradient unchanged): DeepSpeed runs its
            # backward prologue from hooks on that output. (Elsewhere this would only cost a [V, H] zero gradient.)
            terms.loss = terms.loss + 0.0 * anchor.float().sum()
        return terms

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        terms = self.compute_terms(model, inputs)
        if model.training:
            self._accumulate(terms)
        if return_outputs:
            return terms.loss, {"scores": terms.scores.detach()}
        return terms.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            terms = self.compute_terms(model, inputs)
        if prediction_loss_only:
            return terms.loss.detach(), None, None
        return terms.loss.detach(), terms.scores.detach(), None

    # ----------------------------------------------------------------------------------------- logging
    def _accumulate(self, terms: LossTerms) -> None:
        for name in ("rank", "gen", "dp"):
            value = getattr(terms, name)
            if value is not None:
                v = value.detach().float()
                self._term_sums[name] = self._term_sums.get(name, torch.zeros_like(v)) + v
        self._term_count += 1

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._term_count:
            names = sorted(self._term_sums)
            values = torch.stack([self._term_sums[n] for n in names]) / self._term_count
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                values = values.to(self.args.device)
                torch.distributed.all_reduce(values)
                values = values / torch.distributed.get_world_size()
            for n, v in zip(names, values.tolist()):
                logs[f"loss_{n}"] = round(v, 6)
            self._term_sums, self._term_count = {}, 0
        super().log(logs, *args, **kwargs)

    # -------------------------------------------------------------------------------------------- save
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        head = self.score_head
        if head is not None:
            marker = SCORE_HEAD_ATTR + "."
            if state_dict is None and not is_peft_model(self.model):
                state_dict = self.model.state_dict()
            head_state = None
            if state_dict is not None:
                head_state = {k.split(marker, 1)[1]: v for k, v in state_dict.items() if marker in k}
                state_dict = {k: v for k, v in state_dict.items() if marker not in k}
            if not head_state:
                head_state = head.state_dict()
            if self.args.should_save:
                from safetensors.torch import save_file

                os.makedirs(output_dir, exist_ok=True)
                save_file({k: v.detach().float().contiguous().cpu() for k, v in head_state.items()},
                          os.path.join(output_dir, HEAD_WEIGHTS))
        super()._save(output_dir, state_dict=state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        head = getattr(unwrap_model(model if model is not None else self.model), SCORE_HEAD_ATTR, None)
        path = os.path.join(resume_from_checkpoint, HEAD_WEIGHTS)
        if head is not None and os.path.isfile(path):
            from safetensors.torch import load_file

            head.load_state_dict(load_file(path))
