"""Group sampling (determinism per (seed, epoch), re-sampling, with-replacement) and the group collator."""

from __future__ import annotations

import pytest
import torch

from tsarank.data.groups import EpochCallback, GroupCollator, GroupDataset, doc_text
from tsarank.errors import DataError
from tsarank.prompts import PromptTemplate, encode_pairs


def _record(n_pos: int, n_neg: int, teacher: bool = False, query: str = "capital of france") -> dict:
    rec = {
        "query_id": None,
        "query": query,
        "positive_passages": [{"docid": f"p{i}", "title": f"T{i}", "text": f"positive {i}"} for i in range(n_pos)],
        "negative_passages": [{"docid": f"n{i}", "title": "", "text": f"negative {i}"} for i in range(n_neg)],
        "teacher_scores": None,
    }
    if teacher:
        rec["teacher_scores"] = [100.0 + i for i in range(n_pos)] + [float(-i) for i in range(n_neg)]
    return rec


def test_doc_text_joins_title():
    assert doc_text({"title": "Paris", "text": "is big"}) == "Paris is big"
    assert doc_text({"title": "", "text": "is big"}) == "is big"
    assert doc_text({"title": "Only", "text": ""}) == "Only"


def test_positive_first_and_distinct_negatives_when_enough():
    ds = GroupDataset([_record(1, 20)], group_size=8, seed=1)
    ex = ds[0]
    assert ex["docs"][0] == "T0 positive 0"
    negs = ex["docs"][1:]
    assert len(negs) == 7 and len(set(negs)) == 7  # without replacement
    assert all(d.startswith("negative ") for d in negs)
    assert ex["teacher"] is None


def test_deterministic_per_seed_epoch_and_index():
    recs = [_record(3, 30, query=f"q{i}") for i in range(4)]
    a, b = GroupDataset(recs, 6, seed=7), GroupDataset(recs, 6, seed=7)
    for epoch in (0, 3):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        assert [a[i] for i in range(4)] == [b[i] for i in range(4)]
    # The sample of (epoch, i) does not depend on what was drawn before (random access order).
    a.set_epoch(2)
    forward = [a[i]["docs"] for i in range(4)]
    backward = [a[i]["docs"] for i in reversed(range(4))][::-1]
    assert forward == backward
    # A different seed gives different groups.
    c = GroupDataset(recs, 6, seed=8)
    c.set_epoch(2)
    assert [c[i]["docs"] for i in range(4)] != forward


def test_resampled_across_epochs():
    ds = GroupDataset([_record(1, 40)], group_size=5, seed=0)
    seen = []
    for epoch in range(6):
        ds.set_epoch(epoch)
        seen.append(tuple(ds[0]["docs"][1:]))
    assert len(set(seen)) == 6  # 40 choose 4 ordered: a repeat would be a bug in practice
    # Over epochs many different negatives are used.
    assert len({d for s in seen for d in s}) > 12


def test_positive_chosen_among_positives():
    ds = GroupDataset([_record(3, 10)], group_size=2, seed=0)
    chosen = set()
    for epoch in range(30):
        ds.set_epoch(epoch)
        chosen.add(ds[0]["docs"][0])
    assert chosen == {"T0 positive 0", "T1 positive 1", "T2 positive 2"}


def test_with_replacement_when_few_negatives():
    ds = GroupDataset([_record(1, 3)], group_size=8, seed=0)
    for epoch in range(5):
        ds.set_epoch(epoch)
        negs = ds[0]["docs"][1:]
        assert len(negs) == 7
        # every negative appears at least once, the rest are repeats of existing negatives
        assert set(negs) == {"negative 0", "negative 1", "negative 2"}


def test_single_negative_fills_group():
    ds = GroupDataset([_record(1, 1)], group_size=4)
    assert ds[0]["docs"][1:] == ["negative 0"] * 3


def test_no_negatives_is_a_data_error_naming_the_record():
    recs = [_record(1, 3), _record(1, 0, query="lonely query")]
    with pytest.raises(DataError) as e:
        GroupDataset(recs, group_size=4, source="groups.jsonl")
    msg = str(e.value)
    assert "groups.jsonl:2" in msg and "negative_passages" in msg and "lonely query" in msg and "Fix:" in msg
    # G == 1 needs no negatives.
    assert GroupDataset(recs, group_size=1)[1]["docs"] == ["T0 positive 0"]


def test_bad_group_size():
    with pytest.raises(ValueError, match="train_group_size"):
        GroupDataset([_record(1, 3)], group_size=0)


def test_teacher_aligned_with_chosen_docs():
    ds = GroupDataset([_record(2, 9, teacher=True)], group_size=5, seed=3)
    for epoch in range(4):
        ds.set_epoch(epoch)
        ex = ds[0]
        pos_i = int(ex["docs"][0].split()[-1])
        assert ex["teacher"][0] == 100.0 + pos_i
        for doc, t in zip(ex["docs"][1:], ex["teacher"][1:]):
            assert t == -float(doc.split()[-1])


def test_mixed_teacher_presence_is_an_error():
    with pytest.raises(DataError, match="teacher_scores"):
        GroupDataset([_record(1, 3, teacher=True), _record(1, 3)], group_size=2)


def test_epoch_callback_sets_epoch():
    class State:
        epoch = 2.0

    ds = GroupDataset([_record(1, 10)], group_size=3)
    EpochCallback(ds).on_epoch_begin(None, State(), None)
    assert ds.epoch == 2
    State.epoch = 2.9999999
    EpochCallback(ds).on_epoch_begin(None, State(), None)
    assert ds.epoch == 3


def test_negatives_change_per_epoch_in_a_real_trainer(tiny_tokenizer, tmp_path):
    """Two epochs of a real Trainer: the callback moves the dataset to epoch 1 and the sampled docs change."""
    from transformers import Trainer, TrainingArguments

    import conftest

    seen: list[tuple[int, tuple[str, ...]]] = []

    class Recording(GroupDataset):
        def __getitem__(self, i):
            ex = super().__getitem__(i)
            seen.append((self.epoch, tuple(ex["docs"])))
            return ex

    class TinyLoss(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.mean()

        def _get_collator_with_removed_columns(self, data_collator, description=None):
            return data_collator

    ds = Recording([_record(1, 30)], group_size=3, seed=0)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, num_train_epochs=2,
                             per_device_train_batch_size=1, save_strategy="no", learning_rate=0.0)
    trainer = TinyLoss(model=conftest.build_tiny_llama(len(tiny_tokenizer)), args=args, train_dataset=ds,
                       data_collator=GroupCollator(tiny_tokenizer, PromptTemplate(max_doc_tokens=8), 3),
                       callbacks=[EpochCallback(ds)])
    trainer.train()
    assert [e for e, _ in seen] == [0, 1]
    assert seen[0][1] != seen[1][1] and seen[0][1][0] == seen[1][1][0]  # same positive, new negatives


# ------------------------------------------------------------------------------------------- collator
def test_collator_layout_and_masks(tiny_tokenizer):
    template = PromptTemplate(max_doc_tokens=16, max_query_tokens=8)
    examples = [
        {"query": "capital of france", "docs": ["Paris is the capital of France.", "Bananas", "x"], "teacher": None},
        {"query": "banana fruit", "docs": ["Bananas are an elongated edible fruit", "y", "mitochondria"],
         "teacher": None},
    ]
    batch = GroupCollator(tiny_tokenizer, template, group_size=3)(examples)
    assert set(batch) == {"input_ids", "attention_mask", "query_mask"}
    # Hand-written expectation: encode each pair alone, right-pad with the pad id, mark [start, end).
    pairs = [(ex["query"], d) for ex in examples for d in ex["docs"]]
    enc = encode_pairs(tiny_tokenizer, template, [q for q, _ in pairs], [d for _, d in pairs])
    length = max(len(e.input_ids) for e in enc)
    assert batch["input_ids"].shape == (6, length)
    pad = tiny_tokenizer.pad_token_id
    for r, e in enumerate(enc):
        n = len(e.input_ids)
        assert batch["input_ids"][r].tolist() == e.input_ids + [pad] * (length - n)
        assert batch["attention_mask"][r].tolist() == [1] * n + [0] * (length - n)
        expected_q = [e.target_start <= t < e.target_end for t in range(length)]
        assert batch["query_mask"][r].tolist() == expected_q
        # The query mask covers exactly the tokens of " {query}" at the end of the real tokens.
        q_text = tiny_tokenizer.decode(batch["input_ids"][r][batch["query_mask"][r]])
        assert q_text.strip() == pairs[r][0]
    assert batch["query_mask"].dtype == torch.bool and not batch["query_mask"][:, 0].any()


def test_collator_teacher_and_last_token(tiny_tokenizer):
    template = PromptTemplate.last_token(max_doc_tokens=16, max_query_tokens=8)
    examples = [{"query": "q one", "docs": ["doc a", "doc bb"], "teacher": [1.0, 0.5]},
                {"query": "q two", "docs": ["doc c", "doc d"], "teacher": [0.0, 2.0]}]
    batch = GroupCollator(tiny_tokenizer, template, group_size=2)(examples)
    assert batch["teacher"].tolist() == [[1.0, 0.5], [0.0, 2.0]]
    last = batch["attention_mask"].sum(1) - 1
    # last_token: the last real token (the EOS the template appends) is scored; the query mask covers the query
    # inside the prompt ("query: {query} document: ..."), which the 'query' spans of L_gen / L_dp use.
    assert (batch["input_ids"][torch.arange(4), last] == tiny_tokenizer.eos_token_id).all()
    for r, query in enumerate(["q one", "q one", "q two", "q two"]):
        assert tiny_tokenizer.decode(batch["input_ids"][r][batch["query_mask"][r]]).strip() == query
        assert not batch["query_mask"][r, last[r]]


def test_collator_checks(tiny_tokenizer):
    col = GroupCollator(tiny_tokenizer, PromptTemplate(), group_size=3)
    with pytest.raises(ValueError, match="expected 3 docs"):
        col([{"query": "q", "docs": ["a", "b"], "teacher": None}])
