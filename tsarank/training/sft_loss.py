"""The stage-2 objective ``L = L_rank + lambda_gen * L_gen + lambda_dp * L_dp`` from the policy's hidden states.

One step sees ``B`` groups of ``G`` sequences (``[B*G, L]``, row ``b*G + j``, ``j = 0`` the positive). Given the
policy's final hidden states (padded or packed rows, :class:`tsarank.packing.ModelInputs`), the rows each term
needs are gathered -- a row ``(r, p)`` is the hidden state at position ``p`` that predicts token ``p + 1``:

- scores: the query tokens of every sequence (``query_likelihood``) or the last token (``last_token``);
- ``L_gen``: the positive's tokens 1.. (span ``all``) or its query tokens (span ``query``; for ``last_token``
  the query inside its prompt);
- ``L_dp``: the query tokens of every sequence (span ``query``) or every non-pad token 1.. (span ``all``);

and :func:`tsarank.row_head.row_logprobs` computes their log-probabilities (and the KL to the frozen reference on
the ``L_dp`` rows) in fp32, without ``[B*G, L, V]`` logits. Definitions, exactly those of the full-logits
formulation with padding masked:

- ``s_j = mean_t log p(q_t | ...)`` over the query tokens of sequence ``j``; ``L_rank = loss(s [B, G])``;
- ``L_gen = -(1/|T|) sum_{(b,t) in T} log p(x_{b,t} | x_{b,<t})`` pooled over the positives' target tokens;
- ``L_dp = (1/|D|) sum_{(b,p) in D} KL(p_ref(.|b,p) || p_theta(.|b,p))`` pooled over the selected positions.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from ..losses import TRANSFORMS, get_loss, requires_teacher
from ..modeling import LastTokenHead
from ..packing import ModelInputs
from ..prompts import LAST_TOKEN, QUERY_LIKELIHOOD, SCORING_HEADS
from ..reference import Reference
from ..row_head import IDENTITY, LogitTransform, row_logprobs, segment_mean

__all__ = ["SPANS", "RankingLossConfig", "LossTerms", "group_loss", "ranking_loss_terms"]

SPANS = ("all", "query")


@dataclass
class RankingLossConfig:
    """Settings of the stage-2 loss (see the module docstring for the formulas); every check of them lives here.

    Attributes:
        group_size: ``G`` (rows per group in the batch).
        loss: Group loss name in :data:`tsarank.losses.LOSSES`.
        temperature: ``tau`` of the listwise / Poly-1 softmax; ``None`` = the head's default: 0.001 (paper) for
            ``query_likelihood``, 1 for ``last_token``.
        score_transform: ``"prob"`` (``exp``, paper) or ``"logprob"``, listwise softmax only; ``None`` = the head's
            default: ``prob`` for ``query_likelihood`` (scores are mean log-probabilities), ``logprob`` for
            ``last_token`` (an unbounded linear score, whose ``exp`` would overflow).
        poly_epsilon: ``epsilon`` of Poly-1.
        distill_temperature: ``T`` of the distillation KL.
        lambda_gen: Weight of ``L_gen`` (0 = off).
        gen_span: ``"all"`` (positive's whole sequence, paper code) or ``"query"``.
        lambda_dp: Weight of ``L_dp`` (0 = off, no reference needed).
        dp_span: ``"query"`` (default) or ``"all"`` non-pad positions.
        scoring_head: ``"query_likelihood"`` or ``"last_token"``.
        logit_chunk_rows: Rows per ``lm_head`` chunk; ``None`` = about 8 MiB of fp32 logits per chunk.
        pack_sequences: Run the ``B*G`` sequences packed (:mod:`tsarank.packing`) instead of padded; ``None`` = when
            the model supports it. Same values, less padding compute.
    """

    group_size: int = 16
    loss: str = "softmax"
    temperature: float | None = None
    score_transform: str | None = None
    poly_epsilon: float = 1.0
    distill_temperature: float = 1.0
    lambda_gen: float = 1.0
    gen_span: str = "all"
    lambda_dp: float = 1.0
    dp_span: str = "query"
    scoring_head: str = QUERY_LIKELIHOOD
    logit_chunk_rows: int | None = None
    pack_sequences: bool | None = None

    def __post_init__(self) -> None:
        get_loss(self.loss)  # unknown names fail here, with the list of valid ones
        if self.scoring_head not in SCORING_HEADS:
            raise ValueError(f"scoring_head must be one of {SCORING_HEADS}, got {self.scoring_head!r}")
        last_token = self.scoring_head == LAST_TOKEN
        if self.score_transform is None:
            self.score_transform = "logprob" if last_token else "prob"
        if self.temperature is None:
            self.temperature = 1.0 if last_token else 0.001
        if last_token and self.score_transform == "prob":
            raise ValueError(
                "score_transform 'prob' (exp of the score) is for the query-likelihood head, whose scores are mean "
                "log-probabilities <= 0; the last_token head's linear score is unbounded and exp(score)/tau "
                "explodes. Fix: drop score_transform (the last_token default is 'logprob', temperature 1)."
            )
        if self.group_size < 1:
            raise ValueError(f"train_group_size must be >= 1 (1 positive + G-1 negatives), got {self.group_size}")
        for name in ("gen_span", "dp_span"):
            if getattr(self, name) not in SPANS:
                raise ValueError(f"{name} must be one of {SPANS}, got {getattr(self, name)!r}")
        if self.score_transform not in TRANSFORMS:
            raise ValueError(f"score_transform must be 'prob' (exp, the paper's) or 'logprob', got "
                             f"{self.score_transform!r}")
        if not self.temperature > 0 or not self.distill_temperature > 0:
            raise ValueError(f"temperature and distill_temperature must be > 0, got {self.temperature} and "
                             f"{self.distill_temperature}")
        if self.lambda_gen < 0 or self.lambda_dp < 0:
            raise ValueError(f"lambda_gen and lambda_dp must be >= 0 (0 turns the term off), got {self.lambda_gen} "
                             f"and {self.lambda_dp}")
        if self.group_size == 1 and self.lambda_gen == 0 and self.lambda_dp == 0:
            raise ValueError("train_group_size 1 has no negatives, so the ranking loss has nothing to compare; use a "
                             "group size >= 2")
        if self.logit_chunk_rows is not None and self.logit_chunk_rows < 1:
            raise ValueError(f"logit_chunk_rows must be >= 1 or None, got {self.logit_chunk_rows}")

    @classmethod
    def from_args(cls, sft_args: Any, **overrides: Any) -> "RankingLossConfig":
        """Build from :class:`tsarank.training.arguments.SFTArguments` (``train_group_size`` -> ``group_size``)."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            src = "train_group_size" if f.name == "group_size" else f.name
            if hasattr(sft_args, src):
                values[f.name] = getattr(sft_args, src)
        values.update(overrides)
        return cls(**values)

    def needs_reference(self) -> bool:
        return self.lambda_dp > 0

    def needs_teacher(self) -> bool:
        return requires_teacher(self.loss)


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


def _pooled_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean that is 0 (with a zero gradient) for no values, instead of NaN."""
    return values.sum() / max(values.numel(), 1)


def ranking_loss_terms(
    config: RankingLossConfig,
    head: torch.nn.Module,
    hidden: torch.Tensor,
    inputs: ModelInputs,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    query_mask: torch.Tensor,
    *,
    teacher: torch.Tensor | None = None,
    reference: Reference | None = None,
    score_head: LastTokenHead | None = None,
    transform: LogitTransform = IDENTITY,
) -> LossTerms:
    """All stage-2 loss terms from the policy's final hidden states (pure given its inputs; no full logits).

    The calls it makes to the reference and to the head are decided by ``config`` alone, never by the data: every
    process makes the same collectives under ZeRO-3 whatever its sequences' lengths.

    Args:
        config: Loss settings.
        head: The policy's LM head.
        hidden: ``[P, C, H]`` final hidden states of the policy over ``inputs``' rows.
        inputs: The rows the policy ran (padded or packed); maps sequence positions to them.
        input_ids: ``[B*G, L]`` right-padded sequences.
        attention_mask: ``[B*G, L]`` (1 = real token).
        query_mask: ``[B*G, L]`` bool, the scored query tokens (never position 0).
        teacher: ``[B, G]`` teacher scores (fp32) for distillation losses.
        reference: Frozen reference (required when ``config.lambda_dp > 0``); its ``prepare`` must have been
            called before the policy forward that produced ``hidden``.
        score_head: The ``last_token`` head (required for that scoring head).
        transform: The architecture's logit transform (:func:`tsarank.modeling.logit_transform`).

    Returns:
        :class:`LossTerms`.
    """
    n_seq, length = input_ids.shape
    g = config.group_size
    if n_seq % g:
        raise ValueError(f"batch has {n_seq} sequences, not a multiple of group_size {g}")
    if config.lambda_dp > 0 and reference is None:
        raise ValueError("lambda_dp > 0 needs a reference model; build one with tsarank.reference.build_reference")
    last_token = config.scoring_head == LAST_TOKEN
    if last_token and score_head is None:
        raise ValueError("scoring_head 'last_token' needs a LastTokenHead (score_head=...)")
    device = input_ids.device
    real = attention_mask.bool()
    query_mask = query_mask.bool() & real
    tokens_after_first = real.clone()
    tokens_after_first[:, 0] = False
    is_pos = torch.zeros(n_seq, dtype=torch.bool, device=device)
    is_pos[::g] = True
    none = torch.zeros_like(real)
    score_tokens = none if last_token else query_mask
    gen_tokens = ((tokens_after_first if config.gen_span == "all" else query_mask) & is_pos[:, None]
                  if config.lambda_gen > 0 else none)
    dp_tokens = (tokens_after_first if config.dp_span == "all" else query_mask) if config.lambda_dp > 0 else none
    # A token mask [.., 1:] is a prediction-row mask [.., :-1]: row p predicts token p + 1.
    score_r, gen_r, dp_r = score_tokens[:, 1:], gen_tokens[:, 1:], dp_tokens[:, 1:]

    # KL rows first (they also give their log-probs), then the rows that need a log-prob only.
    ra, pa = dp_r.nonzero(as_tuple=True)
    rb, pb = ((score_r | gen_r) & ~dp_r).nonzero(as_tuple=True)
    lp_grid = torch.zeros(n_seq, length - 1, dtype=torch.float32, device=device)
    dp_value = None
    anchor = hidden.new_zeros((), dtype=torch.float32)
    if not last_token or config.lambda_gen > 0 or config.lambda_dp > 0:
        ref_h = reference.hidden_at(inputs, ra, pa) if config.lambda_dp > 0 else None
        rows_r, rows_p = torch.cat([ra, rb]), torch.cat([pa, pb])
        lp, kl = row_logprobs(
            head, inputs.gather(hidden, rows_r, rows_p), input_ids[rows_r, rows_p + 1],
            reference=reference if config.lambda_dp > 0 else None, ref_hidden=ref_h, transform=transform,
            chunk_rows=config.logit_chunk_rows,
        )
        lp_grid = lp_grid.index_put((rows_r, rows_p), lp)
        if config.lambda_dp > 0:
            dp_value = _pooled_mean(kl)
        # Zero-weight terms keep the head's outputs in the graph on every process, so its backward (a ZeRO-3
        # gather) runs everywhere even where a batch happens to have no rows of some kind.
        anchor = 0.0 * (lp.sum() + kl.sum())

    if last_token:
        seq = torch.arange(n_seq, device=device)
        scores = score_head(inputs.gather(hidden, seq, attention_mask.sum(dim=1) - 1))
    else:
        rs, ps = score_r.nonzero(as_tuple=True)
        scores = segment_mean(lp_grid[rs, ps], rs, n_seq)
    scores = scores.view(n_seq // g, g)
    rank = group_loss(config, scores, teacher.float() if teacher is not None else None)

    gen_value = -_pooled_mean(lp_grid[gen_r]) if config.lambda_gen > 0 else None
    total = rank + anchor
    if gen_value is not None:
        total = total + config.lambda_gen * gen_value
    if dp_value is not None:
        total = total + config.lambda_dp * dp_value
    return LossTerms(loss=total, rank=rank, gen=gen_value, dp=dp_value, scores=scores)
