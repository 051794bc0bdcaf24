"""The one sequence packer (tsarank/packing.py) against brute force: every packed sequence gets exactly the values it
has alone, for every attention implementation the packer claims, including the inputs FlashAttention-2 receives
(emulated kernels behind transformers' real dispatch, tests/flash_emulation.py)."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_llama
from flash_emulation import emulated_flash_attention, use_flash_attention
from tsarank.modeling import body_and_head, forward_hidden, model_inputs
from tsarank.packing import block_causal_mask, can_pack, pack_sequences, padded_inputs, plan_rows
from tsarank.row_head import row_logprobs, target_rows

pytestmark = pytest.mark.usefixtures("one_thread")

ATTENTION = ["sdpa", "eager", "flash_attention_2"]


def _padded_batch(vocab: int, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), 2, dtype=torch.long)
    att = torch.zeros((len(lengths), width), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, vocab, (n,), generator=g)
        att[i, :n] = 1
    return ids, att


def _alone_logprobs(model, ids, att) -> list[torch.Tensor]:
    """Brute force: each sequence run alone (no padding, no packing), full logits, log p of each next token."""
    out = []
    for i in range(ids.shape[0]):
        n = int(att[i].sum())
        with torch.no_grad():
            logits = model(input_ids=ids[i : i + 1, :n], use_cache=False).logits[0].double()
        out.append(torch.log_softmax(logits[:-1], -1).gather(-1, ids[i, 1:n, None]).squeeze(-1))
    return out


def test_plan_rows_first_fit_decreasing():
    lengths = [5, 3, 7, 2, 4, 6]
    rows = plan_rows(lengths, capacity=9)
    # FFD by hand: 7 -> r0; 6 -> r1; 5 -> r2; 4 -> r2 (9); 3 -> r1 (9); 2 -> r0 (9).
    assert rows == [[2, 3], [1, 5], [0, 4]]
    assert plan_rows([10, 2], capacity=4) == [[0], [1]]  # an over-long sequence gets a row of its own


def test_block_mask_matches_definition():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1]])
    real = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])  # the last segment is a padding tail
    mask = block_causal_mask(pos, real)[0, 0]
    seg = [0, 0, 0, 1, 1, 2, 2]
    for i in range(7):
        for j in range(7):
            assert bool(mask[i, j]) == (seg[i] == seg[j] and j <= i and (real[0, j] == 1 or i == j)), (i, j)
    additive = block_causal_mask(pos, real, torch.float32)[0, 0]
    assert torch.equal(additive == 0, mask)
    assert (additive[~mask] == torch.finfo(torch.float32).min).all()


def test_layouts_by_hand():
    ids, att = _padded_batch(50, [5, 3, 4])
    # SDPA: rows of capacity 8, first-fit decreasing: [0 (5) + 1 (3)], [2 (4) + tail of 4].
    p = pack_sequences(ids, att, pad_id=2, attn_implementation="sdpa", capacity=8)
    assert p.input_ids.shape == (2, 8)
    assert p.seq_row.tolist() == [0, 0, 1] and p.seq_offset.tolist() == [0, 5, 0]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2, 3]]
    assert p.input_ids[1, 4:].tolist() == [2, 2, 2, 2] and p.attention_mask.shape == (2, 1, 8, 8)
    assert p.attention_mask.dtype == torch.bool and not p.flash_kwargs
    # Varlen FlashAttention: ONE row, no mask, explicit cumulative lengths.
    f = pack_sequences(ids, att, pad_id=2, attn_implementation="flash_attention_2")
    assert f.input_ids.shape == (1, 12) and f.attention_mask is None
    assert f.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]]
    assert f.flash_kwargs["cu_seq_lens_q"].tolist() == [0, 5, 8, 12]
    assert f.flash_kwargs["max_length_q"] == 5
    for q in range(3):  # every token lands where locate() says
        n = int(att[q].sum())
        for layout in (p, f):
            r, c = layout.locate(torch.full((n,), q), torch.arange(n))
            assert torch.equal(layout.input_ids[r, c], ids[q, :n])
    assert pack_sequences(ids, att, pad_id=2, attn_implementation="eager", capacity=8).attention_mask.dtype == torch.float32


def test_unknown_backend_refused():
    ids, att = _padded_batch(50, [5, 3])
    assert not can_pack("flex_attention")
    with pytest.raises(ValueError, match="no packed layout keeps sequences apart"):
        pack_sequences(ids, att, pad_id=2, attn_implementation="flex_attention")


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_rows_give_each_sequence_its_values_alone(tiny_tokenizer, monkeypatch, attn, arch):
    """Log-probs of every next token through model_inputs(pack=True) + forward_hidden + the row head equal each
    sequence run alone, with several packed rows and padding tails for SDPA/eager."""
    vocab = len(tiny_tokenizer)
    if arch == "llama":
        model = build_tiny_llama(vocab, seed=5)
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        torch.manual_seed(5)
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2)).eval()
    model.config._attn_implementation = attn
    lengths = [17, 5, 11, 9, 3, 14]
    ids, att = _padded_batch(vocab, lengths, seed=1)
    with emulated_flash_attention(monkeypatch) as log:
        if attn == "flash_attention_2":
            use_flash_attention(model)
        inputs = model_inputs(model, ids, att, pack=True, pad_id=2, capacity=int(1.5 * ids.shape[1]))
        assert inputs.packed
        if attn == "flash_attention_2":
            assert inputs.input_ids.shape[0] == 1
        else:
            assert 1 < inputs.input_ids.shape[0] < len(lengths)  # several rows, fewer than sequences
            assert (inputs.input_ids == 2).any()  # and a padding tail was exercised
        mask = att.clone().bool()
        mask[:, 0] = False
        seq, pos = target_rows(mask)
        with torch.no_grad():
            hidden, _ = forward_hidden(model, inputs)
            _, head = body_and_head(model)
            lp, _ = row_logprobs(head, inputs.gather(hidden, seq, pos), ids[seq, pos + 1])
        if attn == "flash_attention_2":
            # transformers ran the varlen kernel once per layer, over exactly the packed sequences, never the dense one.
            assert log.dense == 0 and len(log.varlen) == model.config.num_hidden_layers
            assert log.varlen[0] == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    alone = torch.cat(_alone_logprobs(model, ids, att))
    torch.testing.assert_close(lp.double(), alone, atol=2e-5, rtol=0)


def test_flash_attention_rows_without_varlen_arguments_leak(tiny_tokenizer, monkeypatch):
    """Why FlashAttention gets one row with varlen arguments: the same sequences packed into several rows with
    ``attention_mask=None`` (what transformers receives from a packer that builds rows for SDPA) take the dense
    kernel, and the sequences of a row attend to each other."""
    model = build_tiny_llama(len(tiny_tokenizer), seed=5)
    lengths = [9, 7, 8, 6]
    ids, att = _padded_batch(len(tiny_tokenizer), lengths, seed=2)
    rows = pack_sequences(ids, att, pad_id=2, attn_implementation="sdpa", capacity=16)
    assert rows.input_ids.shape[0] == 2
    with emulated_flash_attention(monkeypatch) as log:
        use_flash_attention(model)
        with torch.no_grad():
            out = model(input_ids=rows.input_ids, position_ids=rows.position_ids, use_cache=False).logits
    assert log.dense > 0 and not log.varlen
    alone = _alone_logprobs(model, ids, att)
    second = next(i for i in range(len(lengths)) if rows.seq_offset[i] > 0)  # preceded by another sequence
    r, o, n = int(rows.seq_row[second]), int(rows.seq_offset[second]), lengths[second]
    leaked = torch.log_softmax(out[r, o : o + n - 1].double(), -1).gather(-1, ids[second, 1:n, None]).squeeze(-1)
    assert (leaked - alone[second]).abs().max() > 1e-2


def test_padded_inputs_are_identity(tiny_tokenizer):
    model = build_tiny_llama(len(tiny_tokenizer), seed=5)
    ids, att = _padded_batch(len(tiny_tokenizer), [6, 4])
    with torch.no_grad():
        hidden, _ = forward_hidden(model, padded_inputs(ids, att))
        body, _ = body_and_head(model)
        expected = body(input_ids=ids, attention_mask=att).last_hidden_state
    torch.testing.assert_close(hidden, expected)
    # Nothing to gain (no padding): model_inputs keeps the padded rows.
    full = torch.ones_like(att)
    assert not model_inputs(model, ids, full, pack=True, pad_id=2).packed
