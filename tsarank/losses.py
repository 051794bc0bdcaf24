"""Ranking losses over group scores (``L_rank``); the token-level terms (``L_gen``, ``L_dp``) are computed on gathered
rows by :func:`tsarank.row_head.row_logprobs`.

Group losses take ``scores`` of shape ``[B, G]``: one row per query, one column per candidate. By default
candidate 0 is the positive; ``labels`` (``[B, G]``, float or bool, ``> 0`` = positive, larger = more
relevant) overrides that. ``mask`` (``BoolTensor[B, G]``, True = real candidate) removes candidates: a masked
candidate behaves exactly as if it had been sliced out of its list, whatever its score, label or teacher
value (NaN included), and receives a zero gradient.

Every group loss returns a scalar: the mean over the ``B`` queries of a per-query loss. A query without
anything to learn from (no valid positive, no valid pair, no valid candidate) contributes 0 to that mean, so
an all-masked batch gives 0.0 with finite (zero) gradients. Inputs in float16 / bfloat16 are computed in
float32; float64 stays float64. All losses are computed with log-sum-exp / softplus forms that stay finite
at scores of +-1e4, and are invariant to permuting candidates together with their labels, mask and teacher.

Teacher-based losses (``distill_kl``, ``ranknet``) take ``(scores, teacher, mask=None, ...)``; the others take
``(scores, mask=None, labels=None, ...)``. Use :func:`requires_teacher` to tell them apart.
"""

from __future__ import annotations

import difflib
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "listwise_softmax_ce",
    "pointwise_bce",
    "pairwise_logistic",
    "poly1_softmax_ce",
    "distill_kl",
    "ranknet_teacher",
    "LOSSES",
    "get_loss",
    "requires_teacher",
]

TRANSFORMS = ("prob", "logprob")
_PROB_CLAMP = 80.0  # exp(80) ~ 5.5e34: far below float32 max, and far above any real probability.


# --------------------------------------------------------------------------------------------------------------
# helpers


def _to_float(x: Tensor) -> Tensor:
    """Upcast to float32 unless already float32/float64."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _check_like(x: Tensor, scores: Tensor, name: str) -> None:
    if tuple(x.shape) != tuple(scores.shape):
        raise ValueError(
            f"{name} must have the same shape as scores {tuple(scores.shape)} ([B, G]), got {tuple(x.shape)}; "
            f"pass one {name} value per candidate, aligned with scores."
        )


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}; the paper uses 0.001 with 'prob'.")


def _prepare(
    scores: Tensor, mask: Optional[Tensor], labels: Optional[Tensor] = None, labels_name: str = "labels"
) -> tuple[Tensor, Tensor, Tensor]:
    """Validate and sanitise group inputs.

    Returns float scores, a bool mask and float labels, all ``[B, G]``. Masked scores and labels are replaced
    by 0 so that garbage (NaN/inf) in padded slots can reach neither the value nor the gradient. Default
    labels are one-hot on candidate 0.
    """
    if scores.dim() != 2:
        raise ValueError(
            f"scores must be 2-D [B, G] (one row per query), got shape {tuple(scores.shape)}; "
            "for a single query use scores.unsqueeze(0)."
        )
    scores = _to_float(scores)
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    else:
        _check_like(mask, scores, "mask")
        mask = mask.to(device=scores.device, dtype=torch.bool)
    if labels is None:
        labels = torch.zeros_like(scores)
        if scores.shape[1] > 0:
            labels[:, 0] = 1.0
    else:
        _check_like(labels, scores, labels_name)
        labels = _to_float(labels.to(scores.device))
    scores = scores.masked_fill(~mask, 0.0)
    labels = labels.masked_fill(~mask, 0.0)
    return scores, mask, labels


def _masked_log_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    """``log_softmax`` over the valid entries of each row; masked entries (and all-masked rows) give 0."""
    row_has_any = mask.any(dim=-1, keepdim=True)
    logits = logits.masked_fill(~mask, float("-inf")).masked_fill(~row_has_any, 0.0)
    return logits.log_softmax(dim=-1).masked_fill(~mask, 0.0)


def _mean_over_queries(per_query: Tensor) -> Tensor:
    """Mean over ``B`` queries; 0.0 for ``B == 0``."""
    return per_query.sum() / max(per_query.shape[0], 1)


def _listwise_log_probs(scores: Tensor, mask: Tensor, temperature: float, transform: str) -> Tensor:
    _check_temperature(temperature)
    if transform == "prob":
        values = scores.clamp(max=_PROB_CLAMP).exp()
    elif transform == "logprob":
        values = scores
    else:
        raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}.")
    return _masked_log_softmax(values / temperature, mask)


def _pairwise(scores: Tensor, mask: Tensor, prefs: Tensor) -> Tensor:
    """Per-query mean over valid pairs with ``prefs_i > prefs_j`` of ``softplus(s_j - s_i)``; shape ``[B]``."""
    valid = mask.unsqueeze(-1) & mask.unsqueeze(-2)  # [B, G_i, G_j]
    pairs = valid & (prefs.unsqueeze(-1) > prefs.unsqueeze(-2))
    diff = scores.unsqueeze(-2) - scores.unsqueeze(-1)  # diff[b, i, j] = s_j - s_i
    losses = F.softplus(diff).masked_fill(~pairs, 0.0)
    return losses.sum(dim=(-2, -1)) / pairs.sum(dim=(-2, -1)).clamp(min=1)


# --------------------------------------------------------------------------------------------------------------
# group losses


def listwise_softmax_ce(
    scores: Tensor,
    mask: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    temperature: float = 1.0,
    transform: str = "logprob",
) -> Tensor:
    """Listwise softmax cross-entropy (TSARankLLM ``L_rank``; RankT5 "Softmax").

    For one query with valid candidates ``V`` and positives ``P ⊆ V``::

        z_j = f(s_j) / tau                      f = exp ("prob") or identity ("logprob")
        L   = (1/|P|) * sum_{p in P} -log( exp(z_p) / sum_{j in V} exp(z_j) )

    With several positives the loss is the mean over positives of ``-log softmax(z)_p`` over the full valid
    list (the other positives stay in the denominator). A query with no valid positive contributes 0.

    ``"prob"`` is the paper's default: scores are mean log-probabilities (<= 0), so ``exp(s)`` lies in (0, 1].
    Scores are clamped to ``<= 80`` before ``exp`` so that a stray large score cannot overflow (its gradient
    is then 0); this never touches real log-probabilities.

    Args:
        scores: ``[B, G]`` candidate scores.
        mask: ``BoolTensor[B, G]``, True = real candidate; None = all valid.
        labels: ``[B, G]`` float/bool, ``> 0`` = positive; None = candidate 0 is the positive.
        temperature: ``tau > 0``.
        transform: ``"prob"`` or ``"logprob"``.

    Returns:
        Scalar tensor: mean of the per-query losses over the ``B`` queries.
    """
    scores, mask, labels = _prepare(scores, mask, labels)
    log_probs = _listwise_log_probs(scores, mask, temperature, transform)
    positives = (labels > 0).to(log_probs.dtype)
    per_query = -(log_probs * positives).sum(-1) / positives.sum(-1).clamp(min=1)
    return _mean_over_queries(per_query)


def poly1_softmax_ce(
    scores: Tensor,
    mask: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    temperature: float = 1.0,
    epsilon: float = 1.0,
) -> Tensor:
    """Poly-1 softmax cross-entropy (RankT5 "Poly1", Leng et al. 2022).

    For one query with softmax ``p = softmax(s / tau)`` over valid candidates and positives ``P``::

        L = (1/|P|) * sum_{p in P} [ -log p_p + epsilon * (1 - p_p) ]

    i.e. :func:`listwise_softmax_ce` (``"logprob"`` transform) plus ``epsilon`` times the mean over positives
    of ``1 - p_pos``. A query with no valid positive contributes 0.

    Args:
        scores: ``[B, G]`` candidate scores.
        mask: ``BoolTensor[B, G]``, True = real candidate; None = all valid.
        labels: ``[B, G]`` float/bool, ``> 0`` = positive; None = candidate 0 is the positive.
        temperature: ``tau > 0``.
        epsilon: weight of the polynomial term (RankT5 uses 1).

    Returns:
        Scalar tensor: mean of the per-query losses over the ``B`` queries.
    """
    scores, mask, labels = _prepare(scores, mask, labels)
    log_probs = _listwise_log_probs(scores, mask, temperature, "logprob")
    positives = (labels > 0).to(log_probs.dtype)
    per_positive = -log_probs + epsilon * (1.0 - log_probs.exp())
    per_query = (per_positive * positives).sum(-1) / positives.sum(-1).clamp(min=1)
    return _mean_over_queries(per_query)


def pointwise_bce(scores: Tensor, mask: Optional[Tensor] = None, labels: Optional[Tensor] = None) -> Tensor:
    """Pointwise sigmoid cross-entropy (RankT5 "PointCE").

    For one query with valid candidates ``V`` and targets ``y_j in [0, 1]``::

        L = (1/|V|) * sum_{j in V} -[ y_j log sigmoid(s_j) + (1 - y_j) log sigmoid(-s_j) ]

    Labels are used as (possibly soft) targets and must lie in [0, 1] at valid positions; by default
    ``y_0 = 1`` and ``y_j = 0`` otherwise. A query with no valid candidate contributes 0.

    Args:
        scores: ``[B, G]`` logits.
        mask: ``BoolTensor[B, G]``, True = real candidate; None = all valid.
        labels: ``[B, G]`` float/bool targets in [0, 1]; None = candidate 0 is the positive.

    Returns:
        Scalar tensor: mean of the per-query losses over the ``B`` queries.
    """
    scores, mask, labels = _prepare(scores, mask, labels)
    if bool(((labels < 0) | (labels > 1)).any()):
        raise ValueError(
            "pointwise_bce needs labels in [0, 1] (BCE targets), got values outside it; "
            "binarise graded labels first, e.g. labels = (grades > 0).float()."
        )
    bce = F.binary_cross_entropy_with_logits(scores, labels.to(scores.dtype), reduction="none")
    per_query = bce.masked_fill(~mask, 0.0).sum(-1) / mask.sum(-1).clamp(min=1)
    return _mean_over_queries(per_query)


def pairwise_logistic(scores: Tensor, mask: Optional[Tensor] = None, labels: Optional[Tensor] = None) -> Tensor:
    """Pairwise logistic loss (RankT5 "Pair", RankNet).

    For one query, over valid pairs ``Pairs = {(i, j) : label_i > label_j}``::

        L = (1/|Pairs|) * sum_{(i, j) in Pairs} log(1 + exp(s_j - s_i))

    A query with no such pair contributes 0. Memory is ``O(B * G^2)``.

    Args:
        scores: ``[B, G]`` candidate scores.
        mask: ``BoolTensor[B, G]``, True = real candidate; None = all valid.
        labels: ``[B, G]`` graded relevance (float/bool); None = candidate 0 is the positive.

    Returns:
        Scalar tensor: mean of the per-query losses over the ``B`` queries.
    """
    scores, mask, labels = _prepare(scores, mask, labels)
    return _mean_over_queries(_pairwise(scores, mask, labels))


def ranknet_teacher(scores: Tensor, teacher: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """RankNet on the teacher's order (Rank-DistiLLM).

    For one query, over valid pairs ``Pairs = {(i, j) : t_i > t_j}`` (ties give no pair)::

        L = (1/|Pairs|) * sum_{(i, j) in Pairs} log(1 + exp(s_j - s_i))

    Teacher values are "higher = better"; pass ``-rank`` for teacher ranks. A query with no pair contributes 0.

    Args:
        scores: ``[B, G]`` student scores.
        teacher: ``[B, G]`` teacher scores.
        mask: ``BoolTensor[B, G]``, True = real candidate; None = all valid.

    Returns:
        Scalar tensor: mean of the per-query losses over the ``B`` queries.
    """
    scores, mask, teacher = _prepare(scores, mask, teacher.detach(), "teacher")
    return _mean_over_queries(_pairwise(scores, mask, teacher))


def distill_kl(scores: Tensor, teacher: Tensor, mask: Optional[Tensor] = None, temperature: float = 1.0) -> Tensor:
    """Listwise distillation: KL from the teacher's to the student's softmax (Rank-DistiLLM).

    For one query with valid candidates ``V``, ``q = softmax(t / T)`` and ``p = softmax(s / T)`` over ``V``::

        L = T^2 * KL(q || p) = T^2 * sum_{j in V} q_j (log q_j - log p_j)

    The ``T^2`` factor (Hinton et al., 2015) keeps gradient magnitudes comparable across temperatures.
    The teacher is a constant (detached); teacher values are "higher = better" (pass ``-rank`` for ranks).
    A query with no valid candidate contributes 0.

    Args:
        scores: ``[B, G]`` student scores.
        teacher: ``[B, G]`` teacher scores (``-inf`` allowed at valid positions: probability 0).
        mask: ``BoolTensor[B, G]``, True = real candidate; None = all valid.
        temperature: ``T > 0``.

    Returns:
        Scalar tensor: mean of the per-query losses over the ``B`` queries.
    """
    _check_temperature(temperature)
    scores, mask, teacher = _prepare(scores, mask, teacher.detach(), "teacher")
    log_p = _masked_log_softmax(scores / temperature, mask)
    log_q = _masked_log_softmax(teacher / temperature, mask).to(log_p.dtype)
    q = log_q.exp().masked_fill(~mask, 0.0)
    terms = torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q))
    return _mean_over_queries(terms.sum(-1)) * temperature**2


# --------------------------------------------------------------------------------------------------------------
# registry

LOSSES: dict[str, Callable[..., Tensor]] = {
    "softmax": listwise_softmax_ce,
    "listwise": listwise_softmax_ce,
    "point_ce": pointwise_bce,
    "pair": pairwise_logistic,
    "poly1": poly1_softmax_ce,
    "distill_kl": distill_kl,
    "ranknet": ranknet_teacher,
}

_TEACHER_LOSSES = (distill_kl, ranknet_teacher)


def get_loss(name: str) -> Callable[..., Tensor]:
    """Return the group loss registered as ``name`` (case-insensitive).

    Raises:
        ValueError: unknown name; the message lists valid names and the closest match.
    """
    key = name.strip().lower()
    if key in LOSSES:
        return LOSSES[key]
    close = difflib.get_close_matches(key, list(LOSSES), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unknown loss {name!r}; valid names: {', '.join(sorted(LOSSES))}.{hint}")


def requires_teacher(name: str) -> bool:
    """True if the loss registered as ``name`` takes teacher scores (``loss(scores, teacher, mask, ...)``)."""
    return get_loss(name) in _TEACHER_LOSSES
