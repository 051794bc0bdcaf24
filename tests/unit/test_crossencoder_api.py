"""The CrossEncoder-shaped Ranker API (rank, predict, show_progress_bar) and tsarank.score's model cache, against
the Ranker's own score / score_pairs (themselves checked against brute force in test_inference.py)."""

from __future__ import annotations

import numpy as np
import pytest

import tsarank
from conftest import build_tiny_llama
from tsarank.inference import Ranker
from tsarank.prompts import PromptTemplate

pytestmark = pytest.mark.usefixtures("one_thread")

QUERY = "capital of france"
DOCS = ["Paris is the capital and largest city of France.", "Bananas are an elongated edible fruit.",
        "The mitochondria is the powerhouse of the cell.", "France borders Spain."]


@pytest.fixture(scope="module")
def ranker(tiny_tokenizer):
    return Ranker(build_tiny_llama(len(tiny_tokenizer)), tiny_tokenizer, PromptTemplate())


def test_rank_is_score_sorted_with_ids_and_texts(ranker):
    scores = ranker.score(QUERY, DOCS)
    want = sorted(range(len(DOCS)), key=lambda i: (-scores[i], i))
    got = ranker.rank(QUERY, DOCS)
    assert [r["corpus_id"] for r in got] == want and [r["score"] for r in got] == [scores[i] for i in want]
    assert all(set(r) == {"corpus_id", "score"} for r in got)
    top = ranker.rank(QUERY, DOCS, top_k=2, return_documents=True)
    assert [(r["corpus_id"], r["text"]) for r in top] == [(i, DOCS[i]) for i in want[:2]]
    with pytest.raises(TypeError, match="single string"):
        ranker.rank(QUERY, "one document")
    with pytest.raises(ValueError, match="top_k"):
        ranker.rank(QUERY, DOCS, top_k=0)


def test_predict_scores_pairs_like_score_pairs(ranker):
    pairs = [(QUERY, d) for d in DOCS] + [["banana", DOCS[1]]]
    got = ranker.predict(pairs)
    assert isinstance(got, np.ndarray) and got.shape == (5,)
    assert got.tolist() == ranker.score_pairs([tuple(p) for p in pairs])
    assert ranker.predict(pairs, convert_to_numpy=False) == got.tolist()
    for bad, message in (("q", "single string"), (("q", "d"), r"got one pair; wrap it in a list"),
                         ([("q",)], r"pairs\[0\] must be a \(query, doc\) pair"),
                         ([("q", "d", "e")], "pair"), ({"q": "d"}, "got a dict")):
        with pytest.raises(TypeError, match=message):
            ranker.predict(bad)


def test_progress_bar_on_request_and_quiet_for_short_calls(ranker, capsys):
    ranker.score(QUERY, DOCS, show_progress_bar=True)
    err = capsys.readouterr().err
    assert "score: 100%" in err and f"{len(DOCS)}/{len(DOCS)}" in err and "doc/s" in err
    ranker.score(QUERY, DOCS)  # short: no bar unless asked
    ranker.score(QUERY, DOCS, show_progress_bar=False)
    assert capsys.readouterr().err == ""
    ranker.rank(QUERY, DOCS, show_progress_bar=True)
    assert "score: 100%" in capsys.readouterr().err


def test_score_with_a_named_model_loads_it_once(tiny_checkpoint, monkeypatch):
    loads = []
    real = Ranker.from_pretrained.__func__

    def counting(cls, name, **kwargs):  # the real loader, counted
        loads.append(name)
        return real(cls, name, **kwargs)

    monkeypatch.setattr(Ranker, "from_pretrained", classmethod(counting))
    monkeypatch.setattr(tsarank, "_RANKERS", type(tsarank._RANKERS)())
    first = tsarank.score(QUERY, DOCS, model=str(tiny_checkpoint))
    second = tsarank.score(QUERY, DOCS[:2], model=tiny_checkpoint)  # a Path names the same model
    assert loads == [str(tiny_checkpoint)] and second == first[:2]


def test_cuda_oom_backs_off_in_halves_also_among_several_scoring_processes(ranker, monkeypatch):
    """A CPU proxy of the GPU path: the device reads as CUDA and forwards of more than 2 sequences raise CUDA's OOM
    (the process may be one of several scoring processes: sharded rerank). Scores must equal plain scoring; only ZeRO-3
    partitioned weights (every process gathers them at each forward) may not retry alone."""
    import torch

    from tsarank import inference

    pairs = [(QUERY, d) for d in DOCS * 3]
    want = ranker.score_pairs(pairs)
    real_forward, real_collate = Ranker._forward, inference.collate_pairs
    sizes = []

    def tight_forward(self, batch):
        sizes.append(batch.input_ids.shape[0])
        if sizes[-1] > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(self, batch)

    proxy = Ranker(ranker.model, ranker.tokenizer, ranker.template, max_tokens=4096)
    monkeypatch.setattr(Ranker, "_forward", tight_forward)
    monkeypatch.setattr(Ranker, "device", property(lambda self: torch.device("cuda")))
    monkeypatch.setattr(inference, "collate_pairs", lambda enc, pad, device: real_collate(enc, pad, torch.device("cpu")))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    got = proxy.score_pairs(pairs)
    assert got == pytest.approx(want, abs=1e-5) and max(sizes) > 2  # it could only finish by halving
    # ZeRO-3 partitions: no local retry.
    monkeypatch.setattr(next(proxy.model.parameters()), "ds_id", 0, raising=False)
    proxy.max_tokens = 4096
    with pytest.raises(RuntimeError, match="out of memory"):
        proxy.score_pairs(pairs)
