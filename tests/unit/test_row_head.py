"""The selected-row head (tsarank/row_head.py) against a brute-force fp64 computation on full logits: values and
gradients, every path (fused, autograd through a wrapped head), the fp32 guarantee for bf16 weights and under
autocast, and the call counts that ZeRO-3's collectives follow."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from tsarank.row_head import LogitTransform, chunk_rows_for, row_logprobs


class FixedReference:
    """A reference head given by its weights; counts how often its weights are asked for (a ZeRO-3 gather each)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias, self.entries = weight, bias, 0

    @contextlib.contextmanager
    def head_weights(self):
        self.entries += 1
        yield self.weight, self.bias


class Wrapped(nn.Module):
    """A head that is not an nn.Linear (as a LoRA-wrapped lm_head): row_logprobs must use its forward."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.base_layer = linear

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x)


def brute(h, w, b, targets, ref_h, rw, rb, transform):
    """fp64 full logits: log p(target) and KL(p_ref || p) on the first rows."""
    def z(x, weight, bias):
        raw = x.double() @ weight.double().t() + (bias.double() if bias is not None else 0.0)
        raw = raw * transform.scale
        return torch.tanh(raw / transform.softcap) * transform.softcap if transform.softcap else raw

    logp = torch.log_softmax(z(h, w, b), -1)
    lp = logp.gather(-1, targets[:, None]).squeeze(-1)
    if ref_h is None:
        return lp, None
    p_ref = torch.softmax(z(ref_h, rw, rb), -1)
    kl = (p_ref * (torch.log(p_ref) - logp[: ref_h.shape[0]])).sum(-1)
    return lp, kl


def _setup(bias: bool, seed: int = 0, v: int = 61, hdim: int = 12, n: int = 23, m: int = 9):
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(hdim, v, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, hdim, generator=g))
        if bias:
            head.bias.copy_(torch.randn(v, generator=g))
    ref = FixedReference(torch.randn(v, hdim, generator=g), torch.randn(v, generator=g) if bias else None)
    h = torch.randn(n, hdim, generator=g).requires_grad_()
    rh = torch.randn(m, hdim, generator=g)
    t = torch.randint(0, v, (n,), generator=g)
    return head, ref, h, rh, t


@pytest.mark.parametrize("path", ["fused", "autograd"])
@pytest.mark.parametrize("transform", [LogitTransform(), LogitTransform(scale=0.7, softcap=4.0)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [4, 1000])
def test_values_and_gradients_equal_full_logits(path, transform, bias, chunk):
    head, ref, h, rh, t = _setup(bias)
    module = head if path == "fused" else Wrapped(head)
    lp, kl = row_logprobs(module, h, t, reference=ref, ref_hidden=rh, transform=transform, chunk_rows=chunk)
    assert lp.dtype == kl.dtype == torch.float32 and lp.shape == (23,) and kl.shape == (9,)
    # an arbitrary weighting of the outputs, so every row's gradient matters
    g = torch.Generator().manual_seed(1)
    a, c = torch.randn(23, generator=g), torch.randn(9, generator=g)
    ((lp * a).sum() + (kl * c).sum()).backward()
    got = (h.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone() if bias else None)
    h.grad = None
    head.zero_grad()
    lp2, kl2 = brute(h, head.weight, head.bias, t, rh, ref.weight, ref.bias, transform)
    ((lp2 * a.double()).sum() + (kl2 * c.double()).sum()).backward()
    torch.testing.assert_close(lp.double(), lp2.detach(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(kl.double(), kl2.detach(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got[0], h.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], head.weight.grad, atol=1e-4, rtol=1e-4)
    if bias:
        torch.testing.assert_close(got[2], head.bias.grad, atol=1e-4, rtol=1e-4)


def test_reference_none_means_the_policy_head():
    head, ref, h, rh, t = _setup(False)

    class Own:
        @contextlib.contextmanager
        def head_weights(self):
            yield None

    lp, kl = row_logprobs(head, h, t, reference=Own(), ref_hidden=rh)
    _, kl2 = brute(h, head.weight, None, t, rh, head.weight, None, LogitTransform())
    torch.testing.assert_close(kl.double(), kl2.detach(), atol=2e-5, rtol=1e-5)
    # KL of the policy to itself on its own rows is 0
    _, self_kl = row_logprobs(head, h, t, reference=Own(), ref_hidden=h[:5].detach())
    assert self_kl.abs().max() < 1e-5


def test_frozen_head_gets_no_weight_gradient_and_zero_rows_are_fine():
    head, ref, h, rh, t = _setup(False)
    head.weight.requires_grad_(False)
    lp, kl = row_logprobs(head, h, t, reference=ref, ref_hidden=rh, chunk_rows=5)
    (lp.sum() + kl.sum()).backward()
    assert head.weight.grad is None and h.grad is not None
    empty = torch.zeros(0, 12, requires_grad=True)
    lp0, kl0 = row_logprobs(head, empty, torch.zeros(0, dtype=torch.long), reference=ref, ref_hidden=empty[:0].detach())
    assert lp0.shape == (0,) and kl0.shape == (0,)
    (lp0.sum() + kl0.sum()).backward()
    assert empty.grad.shape == (0, 12)


@pytest.mark.parametrize("n_rows,n_kl", [(0, 0), (1, 0), (3, 3), (200, 50)])
def test_one_head_call_and_one_reference_gather_each_way_whatever_the_rows(n_rows, n_kl):
    """ZeRO-3 gathers a partitioned head in its module hooks and a sharded reference head in head_weights(): a
    process's collective count must not depend on how many rows it has (different query lengths per rank), nor on
    how many chunks they make."""
    head, ref, _, _, _ = _setup(False, v=97)
    calls = []
    head.register_forward_pre_hook(lambda *a: calls.append("pre"))
    head.register_forward_hook(lambda *a: calls.append("post"))
    g = torch.Generator().manual_seed(n_rows)
    h = torch.randn(n_rows, 12, generator=g).requires_grad_()
    rh = torch.randn(n_kl, 12, generator=g)
    t = torch.randint(0, 97, (n_rows,), generator=g)
    lp, kl = row_logprobs(head, h, t, reference=ref, ref_hidden=rh, chunk_rows=16)
    assert calls == ["pre", "post"] and ref.entries == 1
    (lp.sum() + kl.sum()).backward()
    assert calls == ["pre", "post"] and ref.entries == 2  # the backward gathers the reference head once more


def test_bf16_weights_give_fp32_logits():
    """Scores and the listwise softmax need fp32 log-probs: with bf16 weights the row head computes the logits in
    fp32 from the bf16 values. Rounding the logits to bf16 instead (a bf16 matmul) moves a log-prob by ~1e-2 at a
    49k vocabulary, which exp(s) / 0.001 turns into a different ranking loss."""
    g = torch.Generator().manual_seed(0)
    v, hdim, n = 49152, 576, 32
    head = nn.Linear(hdim, v, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        head.weight.copy_((torch.randn(v, hdim, generator=g) * 0.08).to(torch.bfloat16))
    h = (torch.randn(n, hdim, generator=g) * 3).to(torch.bfloat16)
    t = torch.randint(0, v, (n,), generator=g)
    with torch.no_grad():
        lp, _ = row_logprobs(head, h, t)
        exact, _ = brute(h, head.weight, None, t, None, None, None, LogitTransform())
        bf16_logits = torch.log_softmax(head(h).double(), -1).gather(-1, t[:, None]).squeeze(-1)
    assert (lp.double() - exact).abs().max() < 1e-4
    assert (bf16_logits - exact).abs().max() > 1e-2  # what a bf16 head would have given
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast does not lower it either
        lp_autocast, _ = row_logprobs(head.float(), h.float(), t)
    assert (lp_autocast.double() - exact).abs().max() < 1e-4


def test_finite_at_extreme_logits():
    """Logits of +-1e4 (and a reference that puts all its mass where the policy puts none): finite values and
    gradients, KL = the log-probability gap, computed without overflow."""
    head = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(3))
    h = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4]], requires_grad=True)
    ref = FixedReference(torch.eye(3), None)
    rh = torch.tensor([[-1e4, 1e4, 0.0], [1e4, -1e4, 0.0]])
    lp, kl = row_logprobs(head, h, torch.tensor([1, 0]), reference=ref, ref_hidden=rh)
    (lp.sum() + kl.sum()).backward()
    assert torch.isfinite(lp).all() and torch.isfinite(kl).all() and torch.isfinite(h.grad).all()
    assert lp[0].item() == pytest.approx(-2e4, rel=1e-6) and kl[0].item() == pytest.approx(2e4, rel=1e-6)


def test_chunk_rows_for():
    assert chunk_rows_for(49152) == 42
    assert chunk_rows_for(10**7) == 16  # never fewer than 16 rows
