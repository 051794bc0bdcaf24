"""Model card content, and the save_pretrained / from_pretrained round trip of a trained tiny checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import build_tiny_llama
from tsarank.hub import CONFIG_NAME, save_tsarank_config
from tsarank.inference import Ranker, collate_pairs
from tsarank.losses import listwise_softmax_ce
from tsarank.model_card import DEFAULT_MODEL_HUB_ID, render_model_card, write_model_card
from tsarank.modeling import LastTokenHead, last_token_scores, query_likelihood_scores
from tsarank.prompts import PromptTemplate, encode_pairs

QUERY = "what is the capital of france"
DOCS = [
    "Paris is the capital and largest city of France.",
    "Bananas are an elongated edible fruit produced by several kinds of plants.",
    "The mitochondria is the powerhouse of the cell.",
]


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    end = text.index("\n---\n", 4)
    return yaml.safe_load(text[4:end])


def _sections(text: str) -> list[str]:
    return [line[3:] for line in text.splitlines() if line.startswith("## ")]


def test_card_front_matter_and_sections(tmp_path):
    data = tmp_path / "groups.jsonl"
    data.write_text('{"query": "q", "positive_passages": [{"text": "a"}]}\n\n{"query": "r", "positive_passages": [{"text": "b"}]}\n')
    template = PromptTemplate(max_doc_tokens=128, max_query_tokens=32)
    text = render_model_card(
        base_model="default", stage="sft", data_files=[str(data)],
        loss_config={"loss": "softmax", "temperature": 0.001, "score_transform": "prob", "lambda_dp": 1.0},
        eval_results={"DL19": {"nDCG@10": 0.61234, "R@100": 0.49}, "NFCorpus": {"nDCG@10": 0.3}},
        template=template, hub_model_id="me/smollm2-tsarank", hyperparameters={"learning_rate": 3e-5},
    )
    meta = _front_matter(text)
    assert meta["library_name"] == "tsarank"
    assert meta["base_model"] == DEFAULT_MODEL_HUB_ID
    assert {"text-ranking", "reranker", "tsarank"} <= set(meta["tags"])
    assert meta["license"] == "apache-2.0"
    assert _sections(text) == [
        "Method", "Usage", "Training data", "Losses and hyper-parameters", "Evaluation", "Prompt template",
    ]
    assert 'Ranker.from_pretrained("me/smollm2-tsarank")' in text
    assert f"| `{data}` | 2 |" in text  # record count (blank line not counted)
    assert "| `temperature` | 0.001 |" in text and "| `learning_rate` | 3e-05 |" in text
    # Evaluation table: one row per data set, a '-' where a measure was not computed.
    assert "| data | nDCG@10 | R@100 |" in text
    assert "| DL19 | 0.6123 | 0.49 |" in text and "| NFCorpus | 0.3 | - |" in text
    assert "`Document: {doc} Query:`" in text and "Document: <document> Query: <query>" in text
    assert "documents cut to 128 tokens and queries to 32 tokens" in text


def test_card_without_eval_and_with_local_base(tmp_path):
    text = render_model_card(
        base_model=str(tmp_path), stage="cpt", data_files=[], loss_config={}, eval_results=None,
        template=PromptTemplate.last_token(),
    )
    meta = _front_matter(text)
    assert "base_model" not in meta  # a local path is not a Hub id; the Hub would reject it
    assert meta["license"] == "other"
    assert "Evaluation" not in _sections(text)
    assert "last token" in text and "query: <query> document: <document><eos>" in text


def _trained_tiny(tokenizer, template, steps=3):
    """A tiny Llama after a few real optimisation steps of the listwise loss (so weights differ from init)."""
    model = build_tiny_llama(len(tokenizer), seed=1).train()
    head = LastTokenHead(model.config.hidden_size) if template.scoring_head == "last_token" else None
    params = list(model.parameters()) + (list(head.parameters()) if head else [])
    opt = torch.optim.AdamW(params, lr=1e-2)
    enc = encode_pairs(tokenizer, template, [QUERY] * len(DOCS), DOCS)
    batch = collate_pairs(enc, tokenizer.pad_token_id)
    losses = []
    for _ in range(steps):
        if head is None:
            scores = query_likelihood_scores(model, batch.input_ids, batch.attention_mask, batch.target_mask)
        else:
            scores = last_token_scores(model, head, batch.input_ids, batch.attention_mask)
        loss = listwise_softmax_ce(scores[None], temperature=1.0, transform="logprob")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        if head is None:
            expected = query_likelihood_scores(model, batch.input_ids, batch.attention_mask, batch.target_mask)
        else:
            expected = last_token_scores(model, head.eval(), batch.input_ids, batch.attention_mask)
    return model, head, expected.tolist()


@pytest.mark.parametrize("scoring_head", ["query_likelihood", "last_token"])
def test_round_trip_trained_checkpoint(tmp_path, tiny_tokenizer, scoring_head):
    template = PromptTemplate.last_token(max_doc_tokens=64) if scoring_head == "last_token" else PromptTemplate(max_doc_tokens=64)
    model, head, expected = _trained_tiny(tiny_tokenizer, template)
    out = tmp_path / "ckpt"
    model.save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    if head is not None:
        head.save(str(out))
    save_tsarank_config(out, template, stage="sft", base_model="default", training={"loss": "softmax"})
    card = write_model_card(
        out, base_model="default", stage="sft", data_files=[], loss_config={"loss": "softmax"},
        eval_results={"nDCG@10": 0.5},
    )
    assert card == out / "README.md" and (out / CONFIG_NAME).is_file()
    text = card.read_text()
    # The card documents the template of the sidecar, not a default.
    assert f"scoring head: `{scoring_head}`" in text
    assert f'Ranker.from_pretrained("{out}")' in text
    assert "| evaluation | 0.5 |" in text
    assert not list(out.glob(".README.md.*"))  # atomic write left no temporary file

    ranker = Ranker.from_pretrained(str(out), device="cpu", dtype="float32")
    assert ranker.template == template
    assert (ranker.head is not None) == (scoring_head == "last_token")
    got = ranker.score(QUERY, DOCS)
    assert got == pytest.approx(expected, abs=1e-5)
    json.loads((out / CONFIG_NAME).read_text())  # sidecar still valid JSON


def test_write_model_card_needs_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="save the checkpoint"):
        write_model_card(tmp_path / "nope", base_model=None, stage=None, data_files=[], loss_config={}, eval_results=None)
