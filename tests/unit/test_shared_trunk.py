"""Shared-trunk scoring of several checkpoints against brute force (each model alone, full logits, one pair at a
time), and the weight comparison that decides how many blocks are shared."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import build_tiny_llama
from tsarank.inference import Ranker
from tsarank.layers import find_decoder_layers
from tsarank.prompts import PromptTemplate, encode_pairs
from tsarank.shared_trunk import score_pairs_shared, shared_prefix_blocks

PAIRS = [
    ("what is the capital of france", "Paris is the capital and largest city of France."),
    ("banana fruit", "Bananas are an elongated edible fruit produced by several kinds of plants."),
    ("empty document", ""),
    ("what do mitochondria do", "The mitochondria is the powerhouse of the cell and produces energy. " * 5),
    ("caf\u00e9 \u6771\u4eac", "Caf\u00e9 na\u00efve \u00e2\u0080\u0099 \u00c2\u00b0 \u6771\u4eac \u041f\u0440\u0438\u0432\u0435\u0442"),
]


def _perturb_from(model, first_block: int, seed: int):
    """A copy of ``model`` with every block from ``first_block`` on (and the final norm) changed."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in list(find_decoder_layers(out))[first_block:]:
            for p in block.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        out.model.norm.weight.mul_(1.5)
    return out


def brute_force(model, tokenizer, template, pairs):
    """Mean log p(query | doc) from the plain transformers forward, unpadded, full [L, V] logits, float64."""
    res = []
    for enc in encode_pairs(tokenizer, template, [q for q, _ in pairs], [d for _, d in pairs]):
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([enc.input_ids])).logits[0].double(), -1)
        terms = [logp[t - 1, enc.input_ids[t]].item() for t in range(enc.target_start, enc.target_end)]
        res.append(sum(terms) / len(terms))
    return res


@pytest.fixture(scope="module")
def family(tiny_tokenizer):
    base = build_tiny_llama(len(tiny_tokenizer), num_hidden_layers=4)
    return [base, _perturb_from(base, 2, seed=1), _perturb_from(base, 3, seed=2)]


def test_shared_prefix_counts_identical_leading_blocks(family, tiny_tokenizer):
    base, two, three = family
    assert shared_prefix_blocks([base, three]) == 3
    assert shared_prefix_blocks([base, two, three]) == 2  # the least shared member decides
    assert shared_prefix_blocks([base, copy.deepcopy(base)]) == 3  # at most L - 1: the last block runs per model
    other = build_tiny_llama(len(tiny_tokenizer), seed=5, num_hidden_layers=4)
    assert shared_prefix_blocks([base, other]) == 0  # other embeddings: nothing shared
    emb = copy.deepcopy(base)
    with torch.no_grad():
        emb.model.embed_tokens.weight[7, 0] += 1e-3  # one changed embedding value is enough to share nothing
    assert shared_prefix_blocks([base, emb]) == 0
    deeper = build_tiny_llama(len(tiny_tokenizer), num_hidden_layers=5)
    assert shared_prefix_blocks([base, deeper]) == 0  # another config


@pytest.mark.parametrize("max_tokens", [64, 4096])  # many small batches (padding differs per batch) and one batch
def test_scores_match_each_model_alone(family, tiny_tokenizer, max_tokens):
    template = PromptTemplate(max_doc_tokens=24, max_query_tokens=8)
    rankers = [Ranker(m, tiny_tokenizer, template, max_tokens=max_tokens) for m in family]
    seen = []
    scores, shared = score_pairs_shared(rankers, PAIRS, on_batch=seen.append)
    assert shared == 2 and sum(seen) == len(PAIRS)
    for model, got in zip(family, scores):
        ref = brute_force(model, tiny_tokenizer, template, PAIRS)
        assert got == pytest.approx(ref, abs=2e-5)
    # The three models really score differently: a mix-up of tops/heads would not pass the line above.
    assert max(abs(a - b) for a, b in zip(scores[0], scores[2])) > 1e-3


def test_unrelated_models_fall_back_to_full_forwards(family, tiny_tokenizer):
    template = PromptTemplate(max_doc_tokens=24, max_query_tokens=8)
    other = build_tiny_llama(len(tiny_tokenizer), seed=5, num_hidden_layers=4)
    rankers = [Ranker(m, tiny_tokenizer, template) for m in (family[0], other)]
    scores, shared = score_pairs_shared(rankers, PAIRS)
    assert shared == 0
    assert scores[1] == pytest.approx(brute_force(other, tiny_tokenizer, template, PAIRS), abs=2e-5)


def test_mismatched_templates_are_refused(family, tiny_tokenizer):
    a = Ranker(family[0], tiny_tokenizer, PromptTemplate(max_doc_tokens=24))
    b = Ranker(family[1], tiny_tokenizer, PromptTemplate(max_doc_tokens=32))
    with pytest.raises(ValueError, match="template"):
        score_pairs_shared([a, b], PAIRS)
