"""CPT data path: labels against hand-written expectations, the packed CPT loss against a brute-force per-pair
computation (every attention implementation the packer claims), and the weak-pairs readers on malformed input."""

from __future__ import annotations

import json

import pytest
import torch

from flash_emulation import emulated_flash_attention, use_flash_attention
from tsarank.data.collate import IGNORE_INDEX, CPTCollator, build_cpt_dataset, pair_labels
from tsarank.errors import DataError
from tsarank.prompts import PromptTemplate, encode_pairs
from tsarank.training.cpt_trainer import causal_lm_loss

pytestmark = pytest.mark.usefixtures("one_thread")


TEMPLATE = PromptTemplate(max_doc_tokens=64, max_query_tokens=16)
PAIRS = [
    ("capital of france", "Paris is the capital and largest city of France."),
    ("banana fruit", "Bananas are an elongated edible fruit."),
    ("what do mitochondria do", "The mitochondria is the powerhouse of the cell and produces energy for it."),
    ("everest", "Mount Everest is 8,849 metres above sea level."),
]


def _features(tok, pairs=PAIRS):
    enc = encode_pairs(tok, TEMPLATE, [q for q, _ in pairs], [d for _, d in pairs])
    return [{"input_ids": e.input_ids, "target_start": e.target_start, "target_end": e.target_end} for e in enc]


def _hand_ids(tok, query, doc):
    """Source and target tokenized separately: the byte-level pre-tokenizer splits at the space before the query,
    so the full sequence is their concatenation (an independent route to the expected labels)."""
    src = tok(TEMPLATE.source.format(doc=doc), add_special_tokens=False)["input_ids"]
    tgt = tok(TEMPLATE.target.format(query=query), add_special_tokens=False)["input_ids"]
    return src, tgt


def test_labels_mask_source_hand_written(tiny_tokenizer):
    tok = tiny_tokenizer
    feats = _features(tok, PAIRS[:2])
    batch = CPTCollator(pad_token_id=tok.pad_token_id, mask_source=True)(feats)
    width = batch["input_ids"].shape[1]
    for row, (q, d) in enumerate(PAIRS[:2]):
        src, tgt = _hand_ids(tok, q, d)
        n = len(src) + len(tgt)
        expected_ids = src + tgt + [tok.pad_token_id] * (width - n)
        expected_labels = [IGNORE_INDEX] * len(src) + tgt + [IGNORE_INDEX] * (width - n)
        assert batch["input_ids"][row].tolist() == expected_ids
        assert batch["labels"][row].tolist() == expected_labels  # source masked, query kept, padding ignored
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert batch["target_mask"][row].tolist() == [False] * len(src) + [True] * len(tgt) + [False] * (width - n)
    # The shorter row really is padded, so "padding ignored" was exercised.
    assert (batch["attention_mask"] == 0).any()


def test_labels_whole_sequence_hand_written(tiny_tokenizer):
    tok = tiny_tokenizer
    feats = _features(tok, PAIRS[:2])
    batch = CPTCollator(pad_token_id=tok.pad_token_id, mask_source=False)(feats)
    width = batch["input_ids"].shape[1]
    for row, (q, d) in enumerate(PAIRS[:2]):
        src, tgt = _hand_ids(tok, q, d)
        ids = src + tgt
        # Every real token is a target except the first (nothing precedes it); padding never is.
        assert batch["labels"][row].tolist() == [IGNORE_INDEX] + ids[1:] + [IGNORE_INDEX] * (width - len(ids))


def test_pair_labels_rejects_bad_span():
    with pytest.raises(ValueError, match="bad query span"):
        pair_labels([1, 2, 3], 0, 2, True)


def _per_pair_logprobs(model, feats, span_labels):
    """Brute force: run every pair alone (no padding, no packing), full logits, log p of each labelled token."""
    out = []
    for f in feats:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([f["input_ids"]]), use_cache=False).logits[0].double()
        lp = torch.log_softmax(logits, -1)
        labels = span_labels(f)
        out += [lp[t - 1, labels[t]].item() for t in range(1, len(labels)) if labels[t] != IGNORE_INDEX]
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("attn", ["sdpa", "eager", "flash_attention_2"])
@pytest.mark.parametrize("mask_source", [True, False])
def test_packed_cpt_loss_equals_pairs_alone(tiny_tokenizer, monkeypatch, attn, mask_source):
    """The CPT loss of a packed batch is the mean NLL of each pair's labelled tokens computed alone, whatever the
    attention implementation (FlashAttention-2: transformers' real dispatch with emulated kernels), and equals the
    padded batch's loss. Before the one packer, FlashAttention-2 rows let the pairs of a row attend to each other."""
    from conftest import build_tiny_llama

    tok = tiny_tokenizer
    model = build_tiny_llama(len(tok), seed=3)
    model.config._attn_implementation = attn if attn != "flash_attention_2" else "sdpa"  # for the brute force
    feats = _features(tok) * 2  # 8 pairs: several packed rows for SDPA/eager
    labels_of = lambda f: pair_labels(f["input_ids"], f["target_start"], f["target_end"], mask_source)  # noqa: E731
    brute = _per_pair_logprobs(model, feats, labels_of)
    batch = CPTCollator(pad_token_id=tok.pad_token_id, mask_source=mask_source)(feats)
    with emulated_flash_attention(monkeypatch) as log:
        if attn == "flash_attention_2":
            use_flash_attention(model)
        with torch.no_grad():
            packed, n = causal_lm_loss(model, batch, packing=True, pad_id=tok.pad_token_id)
            padded, n_padded = causal_lm_loss(model, batch, packing=False, pad_id=tok.pad_token_id) \
                if attn != "flash_attention_2" else (packed, n)
    if attn == "flash_attention_2":
        assert log.varlen and not log.dense  # one packed row, varlen kernel only
    assert n == n_padded == brute.numel()
    assert abs(packed.item() - (-brute.mean().item())) < 1e-5
    assert abs(padded.item() - packed.item()) < 1e-5


# ------------------------------------------------------------------------------------------- readers / dataset
def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "lines, line_no, needle",
    [
        (['{"text": "a doc", "query": "q"}', '{"text": "b doc"}'], 2, "query"),
        (['{"text": "a doc", "query": "q"}', "", '{"text": "a", "query": 5}'], 3, "query"),
        (['{"text": "a doc", "query": "q"}', '{"text": "a", "query": "q"'], 2, "invalid JSON"),
        (['{"query": "Some text without the prefix", "response": "q"}'], 1, "RankingGPT prompt"),
        (['{"title": "x", "body": "y"}'], 1, "expected a weak pair"),
        (['{"text": "   ", "query": "q"}'], 1, "non-empty"),
    ],
)
def test_malformed_weak_pairs_name_file_and_line(tmp_path, tiny_tokenizer, lines, line_no, needle):
    path = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as err:
        build_cpt_dataset(path, tiny_tokenizer, TEMPLATE, cache_dir=str(tmp_path / "cache"))
    assert f"{path}:{line_no}" in str(err.value)
    assert needle in str(err.value)


def test_empty_weak_pairs_file(tmp_path, tiny_tokenizer):
    path = _write(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match="expected at least one pair"):
        build_cpt_dataset(path, tiny_tokenizer, TEMPLATE, cache_dir=str(tmp_path / "cache"))


def test_dataset_both_schemas_tokenized_like_inference(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    lines = [
        json.dumps({"text": PAIRS[0][1], "query": PAIRS[0][0], "extra": 1}),
        json.dumps({"query": f"Document: {PAIRS[1][1]} Query:", "response": PAIRS[1][0]}),
        json.dumps({"text": PAIRS[2][1], "query": PAIRS[2][0]}),
    ]
    path = _write(tmp_path / "pairs.jsonl", lines)
    expected = encode_pairs(tok, TEMPLATE, [q for q, _ in PAIRS[:3]], [d for _, d in PAIRS[:3]])
    # Without target_eos: exactly what scoring sees.
    ds = build_cpt_dataset(path, tok, TEMPLATE, cache_dir=str(tmp_path / "cache"), target_eos=False)
    assert len(ds) == 3
    for row, e in zip(ds, expected):
        assert row["input_ids"] == e.input_ids
        assert (row["target_start"], row["target_end"], row["label_end"], row["length"]) == (
            e.target_start, e.target_end, e.target_end, len(e.input_ids))
    # As released (the default): the same ids with EOS right after the query, and the EOS labelled.
    ds = build_cpt_dataset(path, tok, TEMPLATE, cache_dir=str(tmp_path / "cache"))
    for row, e in zip(ds, expected):
        assert row["input_ids"] == e.input_ids[: e.target_end] + [tok.eos_token_id] + e.input_ids[e.target_end :]
        assert (row["target_start"], row["target_end"], row["label_end"]) == (e.target_start, e.target_end,
                                                                            e.target_end + 1)
    batch = CPTCollator(pad_token_id=tok.pad_token_id, mask_source=True)([ds[0]])
    labelled = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    assert labelled == ds[0]["input_ids"][ds[0]["target_start"] : ds[0]["label_end"]]
    assert labelled[-1] == tok.eos_token_id  # the model learns where a query ends
    assert batch["target_mask"][0].sum().item() == ds[0]["target_end"] - ds[0]["target_start"]  # EOS not in ppl
    assert len(build_cpt_dataset(path, tok, TEMPLATE, max_samples=2, cache_dir=str(tmp_path / "cache"))) == 2
    # An edited file is re-read, not served from the cache.
    _write(path, lines[:1])
    assert len(build_cpt_dataset(path, tok, TEMPLATE, cache_dir=str(tmp_path / "cache"))) == 1


def test_real_rankinggpt_sample(shared_data, tiny_tokenizer, tmp_path):
    path = shared_data / "weak-pairs" / "rankinggpt_text_pairs.json"
    template = PromptTemplate(max_doc_tokens=64, max_query_tokens=64)
    ds = build_cpt_dataset(path, tiny_tokenizer, template, cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 10
    first = tiny_tokenizer.decode(ds[0]["input_ids"])
    assert first.startswith("Document: The name") and first.count("Document:") == 1
    assert first.endswith("is aardvark derived from afrikaans?" + tiny_tokenizer.eos_token)


def test_rankinggpt_template_cpt_equals_released_pretrain(shared_data, tiny_tokenizer, tmp_path):
    """With the rankinggpt template, CPT on RankingGPT's own weak pairs trains on exactly pretrain.py's example:
    ids of ``source + response + eos_token`` as one string, labels after ``len(tokenize(source))`` (mask_input),
    for documents within the budget (pretrain.py cuts only the whole sequence, at 512 tokens)."""
    path = shared_data / "weak-pairs" / "rankinggpt_text_pairs.json"
    tok = tiny_tokenizer
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records = [r for r in records if len(tok(r["query"])["input_ids"]) < 500][:4]
    small = tmp_path / "pairs.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in records))
    template = PromptTemplate.named("rankinggpt", max_doc_tokens=512, max_query_tokens=64, max_length=None)
    ds = build_cpt_dataset(small, tok, template, cache_dir=str(tmp_path / "cache"))
    batch = CPTCollator(pad_token_id=tok.pad_token_id, mask_source=True)([ds[i] for i in range(len(ds))])
    for i, r in enumerate(records):
        source = r["query"].strip()  # "Document: <text> Query:"
        released = tok(source + r["response"].strip() + tok.eos_token)["input_ids"]
        n_source = len(tok(source)["input_ids"])
        assert ds[i]["input_ids"] == released
        labels = batch["labels"][i]
        assert labels[labels != IGNORE_INDEX].tolist() == released[n_source:]


# ------------------------------------------------------------------------------------------- weak-pairs builder
def _mini_beir(root):
    """A hand-made BEIR directory: one test query judging d3; documents exercising every filter."""
    root.mkdir()
    docs = [
        {"_id": "d1", "title": "Paris", "text": "Paris is the capital and largest city of France."},
        {"_id": "d2", "title": "", "text": "A document without a title cannot give a title pair."},
        {"_id": "d3", "title": "Everest", "text": "Mount Everest is 8,849 metres above sea level."},  # judged
        {"_id": "d4", "title": "paris", "text": "Paris is the capital and  largest city of France."},  # dup of d1
        {"_id": "d5", "title": "Short", "text": "Too short."},
        {"_id": "d6", "title": "Copy", "text": "mount everest is 8,849 metres above sea level."},  # judged text
        {"_id": "d7", "title": "What is the height of Everest", "text": "A title that is a test query, verbatim."},
        {"_id": "d8", "title": "Bananas", "text": "Bananas are an elongated edible fruit of several plants."},
    ]
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "what is the height of  everest"}) + "\n")
    (root / "qrels").mkdir()
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td3\t1\n")
    return root


def _groups_file(path):
    groups = [
        {"query_id": "q1", "query": "everest height", "positive_passages": [{"docid": "x1", "text": "Some long enough passage text."}]},
        {"query_id": "g2", "query": "everest", "positive_passages": [{"docid": "d3", "text": "Another long enough passage."}]},
        {"query_id": "g3", "query": "banana fruit", "positive_passages": [
            {"docid": "p1", "title": "Bananas", "text": "Bananas are an elongated edible fruit."},
            {"text": "A second positive without docid, long enough."}]},
    ]
    path.write_text("".join(json.dumps(g) + "\n" for g in groups))
    return path


def test_weak_pairs_builder_filters_by_hand(tmp_path):
    from tsarank.data.formats import read_weak_pairs
    from tsarank.data.weak_pairs import build_weak_pairs

    beir = _mini_beir(tmp_path / "mini")
    groups = _groups_file(tmp_path / "groups.jsonl")
    out = tmp_path / "wp"
    stats = build_weak_pairs(out, corpora=[beir], groups=[groups], exclude_qrels=[beir / "qrels" / "test.tsv"],
                             val_fraction=0.5, seed=1)
    corpus_counts = stats["sources"][str(beir)]
    assert corpus_counts == {"read": 8, "kept": 2, "no_title": 1, "excluded_doc_id": 1, "duplicate": 1,
                             "text_too_short": 1, "excluded_doc_text": 1, "excluded_query_text": 1}
    assert stats["sources"][str(groups)] == {"read": 4, "kept": 2, "excluded_query_id": 1, "excluded_doc_id": 1}
    pairs = {(q, t) for f in ("train.jsonl", "validation.jsonl") for _, t, q in read_weak_pairs(out / f)}
    assert pairs == {
        ("Paris", "Paris is the capital and largest city of France."),
        ("Bananas", "Bananas are an elongated edible fruit of several plants."),
        ("banana fruit", "Bananas Bananas are an elongated edible fruit."),
        ("banana fruit", "A second positive without docid, long enough."),
    }
    assert stats["train"] + stats["validation"] == 4 and stats["train"] > 0 and stats["validation"] > 0
    # The split is a function of the text alone: same seed, different order of sources -> same sides.
    out2 = tmp_path / "wp2"
    build_weak_pairs(out2, corpora=[beir], groups=[groups], exclude_qrels=[beir / "qrels" / "test.tsv"],
                     val_fraction=0.5, seed=1)
    assert (out / "validation.jsonl").read_text() == (out2 / "validation.jsonl").read_text()
    first = json.loads((out / "train.jsonl").read_text().splitlines()[0])
    assert set(first) == {"text", "query", "source", "id"}
    saved = json.loads((out / "stats.json").read_text())
    assert saved["exclusions"]["files"][0]["query_texts"] == 1


def test_weak_pairs_builder_refuses_and_samples(tmp_path):
    from tsarank.data.weak_pairs import build_weak_pairs

    beir = _mini_beir(tmp_path / "mini")
    out = tmp_path / "wp"
    build_weak_pairs(out, corpora=[beir], val_fraction=0.0)
    with pytest.raises(ValueError, match="not empty"):
        build_weak_pairs(out, corpora=[beir])
    stats = build_weak_pairs(out, corpora=[beir], max_pairs=2, val_fraction=0.0, overwrite=True)
    assert stats["kept_before_max_pairs"] == 5 and stats["train"] == 2  # nothing excluded without --exclude-qrels
    assert len((out / "train.jsonl").read_text().splitlines()) == 2
    with pytest.raises(ValueError, match="no sources"):
        build_weak_pairs(tmp_path / "none")


def test_weak_pairs_malformed_corpus_names_line(tmp_path):
    from tsarank.data.weak_pairs import build_weak_pairs

    beir = tmp_path / "bad"
    beir.mkdir()
    (beir / "corpus.jsonl").write_text('{"_id": "a", "title": "t", "text": "long enough text here"}\n{"_id": "b", "title": 3, "text": "x"}\n')
    with pytest.raises(DataError) as err:
        build_weak_pairs(tmp_path / "out", corpora=[beir])
    assert f"{beir / 'corpus.jsonl'}:2" in str(err.value) and "title" in str(err.value)


def test_weak_pairs_cli(tmp_path, capsys):
    from tsarank.cli import main

    beir = _mini_beir(tmp_path / "mini")
    rc = main(["data", "weak-pairs", "--corpus", str(beir), "--exclude-qrels", str(beir / "qrels" / "test.tsv"),
               "--out", str(tmp_path / "wp"), "--val-fraction", "0"])
    assert rc == 0
    assert "wrote 2 train and 0 validation pairs" in capsys.readouterr().out
    assert main(["data", "weak-pairs", "--corpus", str(beir), "--out", str(tmp_path / "wp")]) == 2
    assert "not empty" in capsys.readouterr().err
