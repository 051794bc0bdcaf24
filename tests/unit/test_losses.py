"""Losses vs brute-force references written with python loops and ``math`` (docs/design.md, section 6)."""

from __future__ import annotations

import math

import pytest
import torch

from tsarank.losses import (
    LOSSES,
    distill_kl,
    get_loss,
    listwise_softmax_ce,
    pairwise_logistic,
    pointwise_bce,
    poly1_softmax_ce,
    ranknet_teacher,
    requires_teacher,
)

# ------------------------------------------------------------------------------------------------------------
# brute-force per-query references: plain lists of floats, only the valid candidates


def _lse(xs):
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def ref_listwise(s, y, tau, transform):
    z = [(math.exp(min(x, 80.0)) if transform == "prob" else x) / tau for x in s]
    pos = [i for i, v in enumerate(y) if v > 0]
    if not pos:
        return 0.0
    return sum(_lse(z) - z[i] for i in pos) / len(pos)


def ref_poly1(s, y, tau, eps):
    z = [x / tau for x in s]
    pos = [i for i, v in enumerate(y) if v > 0]
    if not pos:
        return 0.0
    total = 0.0
    for i in pos:
        p = math.exp(z[i]) / sum(math.exp(x) for x in z)
        total += -math.log(p) + eps * (1 - p)
    return total / len(pos)


def ref_point(s, y):
    if not s:
        return 0.0
    sig = [1 / (1 + math.exp(-x)) for x in s]
    return sum(-(t * math.log(p) + (1 - t) * math.log(1 - p)) for p, t in zip(sig, y)) / len(s)


def ref_pair(s, y):
    losses = [math.log(1 + math.exp(s[j] - s[i])) for i in range(len(s)) for j in range(len(s)) if y[i] > y[j]]
    return sum(losses) / len(losses) if losses else 0.0


def ref_kl(s, t, temp):
    if not s:
        return 0.0
    zs, zt = sum(math.exp(x / temp) for x in s), sum(math.exp(x / temp) for x in t)
    kl = 0.0
    for a, b in zip(s, t):
        p, q = math.exp(a / temp) / zs, math.exp(b / temp) / zt
        kl += q * math.log(q / p)
    return temp**2 * kl


# name -> (call(scores, mask, labels_or_teacher), ref(s_list, y_list), label kind, score kind)
CASES = {
    "softmax_logprob": (
        lambda s, m, y: listwise_softmax_ce(s, m, y, temperature=0.5),
        lambda s, y: ref_listwise(s, y, 0.5, "logprob"),
        "graded",
        "normal",
    ),
    "softmax_prob": (
        lambda s, m, y: listwise_softmax_ce(s, m, y, temperature=0.05, transform="prob"),
        lambda s, y: ref_listwise(s, y, 0.05, "prob"),
        "graded",
        "logprob",
    ),
    "poly1": (
        lambda s, m, y: poly1_softmax_ce(s, m, y, temperature=0.7, epsilon=2.0),
        lambda s, y: ref_poly1(s, y, 0.7, 2.0),
        "graded",
        "normal",
    ),
    "point_ce": (pointwise_bce, ref_point, "soft", "normal"),
    "pair": (pairwise_logistic, ref_pair, "graded", "normal"),
    "distill_kl": (
        lambda s, m, t: distill_kl(s, t, m, temperature=2.0),
        lambda s, t: ref_kl(s, t, 2.0),
        "teacher",
        "normal",
    ),
    "ranknet": (lambda s, m, t: ranknet_teacher(s, t, m), ref_pair, "teacher", "normal"),
}


def _make(kind_labels, kind_scores, B=5, G=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, G, generator=g, dtype=torch.float64) * 2
    if kind_scores == "logprob":
        scores = -scores.abs() - 0.05
    if kind_labels == "graded":
        labels = torch.randint(0, 3, (B, G), generator=g).double()
    elif kind_labels == "soft":
        labels = torch.rand(B, G, generator=g, dtype=torch.float64)
        labels[:, ::2] = labels[:, ::2].round()
    else:
        labels = torch.randn(B, G, generator=g, dtype=torch.float64) * 3
    mask = torch.rand(B, G, generator=g) > 0.3
    mask[0] = True  # a full row
    if B >= 3:
        mask[1, 3:] = False  # suffix padding
        mask[2] = False  # a single candidate
        mask[2, -1] = True
    return scores, mask, labels


def _garbage(x, mask):
    """Put NaN / inf in masked slots: masked candidates must not matter at all."""
    out = x.clone()
    out[~mask] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=x.dtype).repeat(x.numel())[
        : int((~mask).sum())
    ]
    return out


@pytest.mark.parametrize("name", CASES)
def test_batch_matches_mean_of_brute_force_on_sliced_lists(name):
    call, ref, kl, ks = CASES[name]
    scores, mask, labels = _make(kl, ks)
    expected = []
    for b in range(scores.shape[0]):
        keep = mask[b]
        expected.append(ref(scores[b][keep].tolist(), labels[b][keep].tolist()))
    expected = sum(expected) / len(expected)
    got = call(_garbage(scores, mask), mask, _garbage(labels, mask))
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("name", CASES)
def test_masked_equals_sliced_values_and_grads(name):
    call, _, kl, ks = CASES[name]
    scores, mask, labels = _make(kl, ks, B=1, G=9, seed=3)
    mask[0, [1, 4, 8]] = False
    mask[0, 0] = True
    keep = mask[0]
    s_full = _garbage(scores, mask).requires_grad_()
    s_cut = scores[:, keep].clone().requires_grad_()
    full = call(s_full, mask, _garbage(labels, mask))
    cut = call(s_cut, None, labels[:, keep])
    full.backward()
    cut.backward()
    assert full.item() == pytest.approx(cut.item(), rel=1e-12, abs=1e-12)
    assert torch.all(s_full.grad[~mask] == 0)
    torch.testing.assert_close(s_full.grad[mask], s_cut.grad[0])


@pytest.mark.parametrize("name", CASES)
def test_all_masked_gives_zero_with_finite_grads(name):
    call, _, kl, ks = CASES[name]
    scores, _, labels = _make(kl, ks, B=3, G=4)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    s = _garbage(scores, mask).requires_grad_()
    loss = call(s, mask, _garbage(labels, mask))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(s.grad).all() and torch.all(s.grad == 0)


@pytest.mark.parametrize("name", CASES)
def test_empty_batch_and_empty_group(name):
    call, *_ = CASES[name]
    for shape in [(0, 5), (2, 0)]:
        s = torch.zeros(shape, requires_grad=True)
        loss = call(s, None, torch.zeros(shape))
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name", CASES)
def test_permutation_invariance(name):
    call, _, kl, ks = CASES[name]
    scores, mask, labels = _make(kl, ks, seed=7)
    perm = torch.randperm(scores.shape[1], generator=torch.Generator().manual_seed(1))
    a = call(scores, mask, labels)
    b = call(scores[:, perm], mask[:, perm], labels[:, perm])
    assert a.item() == pytest.approx(b.item(), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_at_extreme_scores(name, dtype):
    call, _, kl, _ = CASES[name]
    _, mask, labels = _make(kl, "normal", B=4, G=6, seed=11)
    signs = torch.tensor([1.0, -1.0]).repeat(12)[:24].reshape(4, 6)
    signs[1] = -signs[1]
    s = (1e4 * signs).to(dtype).requires_grad_()
    loss = call(s, mask, labels.to(dtype))
    loss.backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_extreme_scores_values():
    s = torch.tensor([[1e4, -1e4, -1e4], [-1e4, 1e4, -1e4]])
    # row 0: positive far ahead -> 0; row 1: positive 2e4 behind -> 2e4 / tau.
    assert listwise_softmax_ce(s, temperature=1.0).item() == pytest.approx(1e4)
    assert listwise_softmax_ce(s, temperature=1e-3).item() == pytest.approx(1e7)
    assert pairwise_logistic(s).item() == pytest.approx((0 + (2e4 + math.log(2)) / 2) / 2)
    # "prob": exp(+1e4) is clamped (exp(80)), exp(-1e4) = 0.
    loss = listwise_softmax_ce(s, temperature=1e-3, transform="prob")
    assert loss.item() == pytest.approx(math.exp(80) / 1e-3 / 2, rel=1e-5)


def test_gradcheck():
    scores, mask, labels = _make("graded", "normal", B=3, G=5, seed=5)
    teacher = torch.randn(3, 5, dtype=torch.float64)
    s = scores.clone().requires_grad_()
    for fn in [
        lambda x: listwise_softmax_ce(x, mask, labels, temperature=0.3),
        lambda x: listwise_softmax_ce(-x.abs(), mask, labels, temperature=0.3, transform="prob"),
        lambda x: poly1_softmax_ce(x, mask, labels),
        lambda x: pointwise_bce(x, mask, (labels > 0).double()),
        lambda x: pairwise_logistic(x, mask, labels),
        lambda x: distill_kl(x, teacher, mask, temperature=1.5),
        lambda x: ranknet_teacher(x, teacher, mask),
    ]:
        assert torch.autograd.gradcheck(fn, (s,))


# ------------------------------------------------------------------------------------------------------------
# hand-computed values


def test_rank_loss_by_hand_prob_transform():
    # tau = 0.001, "prob": f(s) = exp(s) = 0.5, 0.499 -> /tau = 500, 499.
    # L = -log(e^500 / (e^500 + e^499)) = log(1 + e^-1) = 0.31326168751822...
    s = torch.tensor([[math.log(0.5), math.log(0.499)]], dtype=torch.float64)
    loss = listwise_softmax_ce(s, temperature=0.001, transform="prob")
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1)), rel=1e-9)
    assert loss.item() == pytest.approx(0.31326168751822, rel=1e-12)
    # Swap: positive 0.499 -> logits 499 vs 500 -> log(1 + e) = 1.31326168751822
    loss = listwise_softmax_ce(s.flip(-1), temperature=0.001, transform="prob")
    assert loss.item() == pytest.approx(1.31326168751822, rel=1e-9)


def test_rank_loss_by_hand_logprob_and_multi_positive():
    # identity, tau = 1, scores [ln 3, 0, 0]: p = [3/5, 1/5, 1/5].
    s = torch.tensor([[math.log(3), 0.0, 0.0]], dtype=torch.float64)
    assert listwise_softmax_ce(s).item() == pytest.approx(math.log(5 / 3))
    # positives {0, 1}: mean(-ln 3/5, -ln 1/5) = (ln 5/3 + ln 5) / 2
    y = torch.tensor([[1.0, 1.0, 0.0]])
    assert listwise_softmax_ce(s, labels=y).item() == pytest.approx((math.log(5 / 3) + math.log(5)) / 2)
    # bool labels work too; poly1 adds eps * mean(1 - p) = (2/5 + 4/5) / 2 = 0.6
    assert poly1_softmax_ce(s, labels=y.bool()).item() == pytest.approx((math.log(5 / 3) + math.log(5)) / 2 + 0.6)


def test_default_labels_are_candidate_zero():
    s = torch.randn(3, 4, dtype=torch.float64)
    onehot = torch.zeros(3, 4)
    onehot[:, 0] = 1
    for fn in (listwise_softmax_ce, poly1_softmax_ce, pointwise_bce, pairwise_logistic):
        assert fn(s).item() == pytest.approx(fn(s, labels=onehot).item())


def test_no_positive_query_contributes_zero():
    s = torch.randn(2, 3, dtype=torch.float64)
    y = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert listwise_softmax_ce(s, labels=y).item() == pytest.approx(ref_listwise(s[0].tolist(), [0, 1, 0], 1, "") / 2)


def test_distill_kl_by_hand_and_temperature_scaling():
    # q = softmax(ln [1, 1]) = [.5, .5], p = softmax(ln [9, 1]) = [.9, .1]
    # KL = .5 ln(.5/.9) + .5 ln(.5/.1) = .5 ln(25/9) = ln(5/3)
    t = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    s = torch.tensor([[math.log(9), 0.0]], dtype=torch.float64)
    assert distill_kl(s, t).item() == pytest.approx(math.log(5 / 3))
    # T = 2 on doubled logits: same distributions, times T^2 = 4
    assert distill_kl(2 * s, 2 * t, temperature=2.0).item() == pytest.approx(4 * math.log(5 / 3))
    assert distill_kl(s, s).item() == pytest.approx(0.0, abs=1e-15)
    # a teacher -inf at a valid slot means q = 0 there: finite loss
    t_inf = torch.tensor([[0.0, -float("inf")]], dtype=torch.float64)
    assert distill_kl(s, t_inf).item() == pytest.approx(-math.log(0.9))


def test_ranknet_ties_give_no_pairs():
    s = torch.tensor([[0.3, -1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[1.0, 1.0, 1.0]])
    loss = ranknet_teacher(s, t)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(s.grad == 0)


def test_pointwise_rejects_graded_labels():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pointwise_bce(torch.zeros(1, 3), labels=torch.tensor([[2.0, 0.0, 1.0]]))


def test_shape_and_argument_errors():
    with pytest.raises(ValueError, match="2-D"):
        listwise_softmax_ce(torch.zeros(4))
    with pytest.raises(ValueError, match="mask"):
        listwise_softmax_ce(torch.zeros(2, 3), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="transform"):
        listwise_softmax_ce(torch.zeros(2, 3), transform="probs")
    with pytest.raises(ValueError, match="temperature"):
        distill_kl(torch.zeros(2, 3), torch.zeros(2, 3), temperature=0.0)
    with pytest.raises(ValueError, match="teacher"):
        ranknet_teacher(torch.zeros(2, 3), torch.zeros(2, 2))


# ------------------------------------------------------------------------------------------------------------
# registry


def test_registry():
    assert set(LOSSES) == {"softmax", "listwise", "point_ce", "pair", "poly1", "distill_kl", "ranknet"}
    assert get_loss("listwise") is get_loss("softmax") is listwise_softmax_ce
    assert get_loss(" Poly1 ") is poly1_softmax_ce
    assert requires_teacher("distill_kl") and requires_teacher("ranknet")
    assert not any(requires_teacher(n) for n in ("softmax", "listwise", "point_ce", "pair", "poly1"))


def test_registry_unknown_name_suggests():
    with pytest.raises(ValueError, match="Did you mean 'softmax'") as err:
        get_loss("sofmax")
    assert "point_ce" in str(err.value) and "ranknet" in str(err.value)
    with pytest.raises(ValueError, match="valid names"):
        requires_teacher("zzzz")
