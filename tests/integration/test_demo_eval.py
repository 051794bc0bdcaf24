"""The demo's evaluation and report on real data, with tiny checkpoints standing in for the three models: every
system's run must hold the scores that model gives on its own, the metrics must be ir_measures' on those runs,
and the shared-trunk pass must have shared exactly the blocks the checkpoints have in common."""

from __future__ import annotations

import copy
import dataclasses
import json

import ir_measures
import pytest
import torch

from conftest import build_tiny_llama
from tsarank.data.formats import read_run
from tsarank.demo import Preset
from tsarank.demo_eval import evaluate_systems, load_dataset_candidates
from tsarank.demo_report import write_report
from tsarank.inference import Ranker
from tsarank.layers import find_decoder_layers

pytestmark = pytest.mark.integration

PRESET = Preset(
    name="test", weak_pairs=0, cpt_steps=0, cpt_batch=1, nfcorpus_train_queries=0, sft_steps=0, sft_group_size=2,
    sft_batch=1, top_k=5, max_queries={"dl19": 3, "scifact": 2, "nfcorpus": 2}, beir_top_k=4, cpt_top_layers=1,
    sft_top_layers=1, max_doc_tokens=32,
)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_tokenizer):
    """zero-shot, 'M_cpt' and 'M_sft': the same tiny Llama (3 blocks) with the top block changed in the latter two."""
    root = tmp_path_factory.mktemp("demo_models")
    base = build_tiny_llama(len(tiny_tokenizer))
    paths = {}
    for i, system in enumerate(("zero_shot", "cpt", "sft")):
        model = copy.deepcopy(base)
        if i:
            g = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for p in find_decoder_layers(model)[-1].parameters():
                    p.add_(0.1 * torch.randn(p.shape, generator=g))
        paths[system] = root / system
        model.save_pretrained(paths[system])
        tiny_tokenizer.save_pretrained(paths[system])
    return {k: str(v) for k, v in paths.items()}


def test_demo_evaluation_and_report(checkpoints, shared_data, tmp_path):
    runs_dir = tmp_path / "runs"
    results = evaluate_systems(shared_data, runs_dir, checkpoints, PRESET, dtype="float32")  # as the references
    assert results["setup"]["shared_blocks"] == 2  # embeddings + 2 of 3 blocks are common to all three

    for ds, depth in (("dl19", 5), ("scifact", 4), ("nfcorpus", 4)):
        cands, qrels = load_dataset_candidates(shared_data, ds, depth, PRESET.max_queries[ds])
        # BM25 returns only matching documents: NFCorpus's 'deafness' matches one.
        assert len(cands) == PRESET.max_queries[ds] and all(0 < len(c.docids) <= depth for c in cands)
        rel = 2 if ds == "dl19" else 1
        measures = [ir_measures.nDCG @ 10, ir_measures.RR(rel=rel) @ 10]
        for system, path in {"bm25": None, **checkpoints}.items():
            run = read_run(runs_dir / f"{ds}.{system}.trec")
            if path is not None:
                # Reference: this checkpoint alone, through the public Ranker, at the demo's document budget.
                ranker = Ranker.from_pretrained(path, dtype="float32")
                ranker.template = dataclasses.replace(ranker.template, max_doc_tokens=PRESET.max_doc_tokens)
                for c in cands:
                    got = dict(run[c.qid])
                    ref = ranker.score(c.query, c.texts)
                    assert [got[d] for d in c.docids] == pytest.approx(ref, abs=1e-4)
            ir_run = [ir_measures.ScoredDoc(q, d, s) for q, hits in run.items() for d, s in hits]
            ir_qrels = [ir_measures.Qrel(q, d, g) for q, docs in qrels.items() for d, g in docs.items()]
            ref_m = ir_measures.calc_aggregate(measures, ir_qrels, ir_run)
            assert results[ds][system]["nDCG@10"] == pytest.approx(ref_m[measures[0]], abs=1e-9)
            assert results[ds][system]["RR@10"] == pytest.approx(ref_m[measures[1]], abs=1e-9)

    for ds in ("dl19", "scifact", "nfcorpus"):
        vs = results["sft_vs_zero_shot"][ds]["nDCG@10"]
        assert vs["delta"] == pytest.approx(results[ds]["sft"]["nDCG@10"] - results[ds]["zero_shot"]["nDCG@10"], abs=1e-9)
    # The tiny models are different rankers, so the runs differ (a mix-up of heads would make them equal).
    assert read_run(runs_dir / "dl19.cpt.trec") != read_run(runs_dir / "dl19.sft.trec")

    out = tmp_path / "demo"
    out.mkdir()
    table = write_report(out, results, {"cpt": checkpoints["cpt"], "sft": checkpoints["sft"]}, PRESET)
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"dl19", "scifact", "nfcorpus", "checkpoints"}
    for ds in ("dl19", "scifact", "nfcorpus"):
        assert set(report[ds]) == {"bm25", "zero_shot", "cpt", "sft"}
        assert report[ds]["sft"]["nDCG@10"] == results[ds]["sft"]["nDCG@10"]
    md = (out / "report.md").read_text()
    assert table in md and "share their bottom 2 blocks" in md and "CPT top 1 blocks" in md
    assert md.count("paired t-test p =") == 3  # M_sft against zero-shot, once per dataset
    assert (out / "report.png").stat().st_size > 0


def test_demo_evaluation_with_last_token_sft(checkpoints, shared_data, tmp_path):
    """`tsarank demo --scoring-head last_token`: M_sft has its own prompt and head, so it runs alone while the
    zero-shot model and M_cpt still share their trunk; its run holds the scores it gives on its own."""
    from tsarank.hub import save_tsarank_config
    from tsarank.modeling import LastTokenHead
    from tsarank.prompts import PromptTemplate

    sft_dir = tmp_path / "sft_last_token"
    model = Ranker.from_pretrained(checkpoints["sft"], dtype="float32")
    model.model.save_pretrained(sft_dir)
    model.tokenizer.save_pretrained(sft_dir)
    torch.manual_seed(5)
    LastTokenHead(model.model.config.hidden_size).save(str(sft_dir))
    save_tsarank_config(sft_dir, PromptTemplate.last_token(max_doc_tokens=64), stage="sft")
    systems = {"zero_shot": checkpoints["zero_shot"], "cpt": checkpoints["cpt"], "sft": str(sft_dir)}
    preset = dataclasses.replace(PRESET, max_queries={"dl19": 2, "scifact": 1, "nfcorpus": 1},
                                 sft_scoring_head="last_token")
    results = evaluate_systems(shared_data, tmp_path / "runs", systems, preset, dtype="float32")
    assert results["setup"]["shared_blocks"] == 2  # zero-shot and M_cpt still share theirs

    ranker = Ranker.from_pretrained(str(sft_dir), dtype="float32")
    assert ranker.head is not None
    ranker.template = dataclasses.replace(ranker.template, max_doc_tokens=preset.max_doc_tokens)
    cands, _ = load_dataset_candidates(shared_data, "dl19", preset.top_k, 2)
    run = read_run(tmp_path / "runs" / "dl19.sft.trec")
    for c in cands:
        got = dict(run[c.qid])
        assert [got[d] for d in c.docids] == pytest.approx(ranker.score(c.query, c.texts), abs=1e-4)
    out = tmp_path / "demo"
    out.mkdir()
    write_report(out, results, {"cpt": checkpoints["cpt"], "sft": str(sft_dir)}, preset)
    assert "last-token head, score transform logprob, tau 1.0" in (out / "report.md").read_text()
