"""End to end with the real default model and real DL19 data: relevance sanity, `tsarank rerank` (both input
paths) + `tsarank evaluate` against ir_measures computed here, and kill / --resume byte-identity."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

SANITY = [
    # (query, relevant passage, irrelevant passage)
    (
        "what is the capital of france",
        "Paris is the capital and most populous city of France, on the river Seine.",
        "Bananas are elongated, edible fruits produced by several kinds of large herbaceous plants.",
    ),
    (
        "how tall is mount everest",
        "Mount Everest is Earth's highest mountain above sea level; its elevation is 8,849 metres.",
        "To bake bread, mix flour, water, yeast and salt, knead the dough and let it rise before baking.",
    ),
    (
        "what do mitochondria do",
        "Mitochondria are organelles that generate most of the chemical energy (ATP) needed by the cell.",
        "The stock market fell sharply on Monday as investors worried about rising interest rates.",
    ),
    (
        "who wrote romeo and juliet",
        "Romeo and Juliet is a tragedy written by William Shakespeare early in his career.",
        "Volcanoes form where magma from the Earth's mantle rises through the crust to the surface.",
    ),
]


def tsarank(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real console script (as a user would), capturing its output."""
    return subprocess.run(["tsarank", *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def dl19(shared_data) -> dict[str, Path]:
    base = shared_data / "trec-dl-passage"
    return {"json": base / "bm25_top100" / "retrieve_results_dl19.json", "qrels": base / "qrels.dl19-passage.txt"}


def read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def test_relevance_sanity(default_ranker):
    for query, relevant, irrelevant in SANITY:
        ranked = default_ranker.rerank(query, [irrelevant, relevant])
        assert ranked[0][0] == 1, f"{query!r}: {ranked}"
    # All candidates of one query in one call: the relevant passage of each query wins against the other texts.
    query, relevant, _ = SANITY[0]
    docs = [irr for _, _, irr in SANITY] + [relevant]
    assert default_ranker.rerank(query, docs)[0][0] == len(docs) - 1


def test_rerank_two_queries_then_evaluate_equals_ir_measures(dl19, tmp_path):
    import ir_measures
    from ir_measures import AP, RR, nDCG

    entries = json.loads(dl19["json"].read_text(encoding="utf-8"))
    qids = sorted({str(e["hits"][0]["qid"]) for e in entries}, key=int)[:2]  # --max-queries 2 takes these
    chosen = [e for e in entries if str(e["hits"][0]["qid"]) in qids]

    # Path 1: rank_llm JSON.
    out_json = tmp_path / "from_json.trec"
    res = tsarank("rerank", "--candidates", str(dl19["json"]), "--top-k", "20", "--max-queries", "2", "--out", str(out_json))
    assert res.returncode == 0, res.stderr
    assert "reranked 2 queries, 40 docs" in res.stdout
    assert not Path(str(out_json) + ".partial").exists()

    # Path 2: the same candidates as a TREC run + queries TSV + corpus TSV, plus one docid the corpus lacks.
    run, queries, corpus = tmp_path / "bm25.trec", tmp_path / "queries.tsv", tmp_path / "corpus.tsv"
    with open(run, "w") as r, open(queries, "w") as q, open(corpus, "w") as c:
        for e in chosen:
            qid = str(e["hits"][0]["qid"])
            q.write(f"{qid}\t{e['query']}\n")
            for rank, hit in enumerate(e["hits"][:20], 1):
                assert "\n" not in hit["content"]
                r.write(f"{qid} Q0 {hit['docid']} {rank} {hit['score']} bm25\n")
                c.write(f"{hit['docid']}\t{hit['content']}\n")
        r.write(f"{qids[0]} Q0 no-such-doc 21 -1000 bm25\n")
    out_run = tmp_path / "from_run.trec"
    strict = tsarank("rerank", "--run", str(run), "--queries", str(queries), "--corpus", str(corpus), "--top-k", "21",
                     "--out", str(out_run), "--strict")
    assert strict.returncode == 2 and "1 docid(s)" in strict.stderr and "no-such-doc" in strict.stderr
    assert not out_run.exists()
    res = tsarank("rerank", "--run", str(run), "--queries", str(queries), "--corpus", str(corpus), "--top-k", "21",
                  "--out", str(out_run))
    assert res.returncode == 0, res.stderr
    assert "1 docid(s) of the run are missing from the corpus" in res.stderr and "no-such-doc" in res.stderr
    # Same texts, same order, same batches: the two paths give the same bytes.
    assert out_run.read_bytes() == out_json.read_bytes()

    # The output is a valid TREC run: 20 lines per query, ranks 1..20, scores non-increasing, one tag.
    lines = [line.split() for line in read_lines(out_json)]
    assert len(lines) == 40
    for qid in qids:
        rows = [row for row in lines if row[0] == qid]
        assert [int(row[3]) for row in rows] == list(range(1, 21))
        scores = [float(row[4]) for row in rows]
        assert scores == sorted(scores, reverse=True)
        assert {row[2] for row in rows} == {h["docid"] for e in chosen if str(e["hits"][0]["qid"]) == qid for h in e["hits"][:20]}
    assert {row[5] for row in lines} == {"tsarank"} and {row[1] for row in lines} == {"Q0"}

    # Evaluate with the CLI, and independently with ir_measures on the two judged queries.
    qrels_2 = tmp_path / "qrels.txt"
    qrels_2.write_text("".join(line + "\n" for line in read_lines(dl19["qrels"]) if line.split()[0] in qids))
    res = tsarank("evaluate", "--run", str(out_json), "--qrels", str(qrels_2), "--measures", "nDCG@10", "RR@10", "AP",
                  "--rel-level", "2", "--json")
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)["measures"]
    run_dict: dict[str, dict[str, float]] = {}
    for qid, _, docid, _, score, _ in lines:
        run_dict.setdefault(qid, {})[docid] = float(score)
    qrels_dict: dict[str, dict[str, int]] = {}
    for line in read_lines(qrels_2):
        qid, _, docid, grade = line.split()
        qrels_dict.setdefault(qid, {})[docid] = int(grade)
    want = ir_measures.calc_aggregate([nDCG @ 10, RR(rel=2) @ 10, AP(rel=2)], qrels_dict, run_dict)
    assert set(got) == {str(m) for m in want}
    for measure, value in want.items():
        assert got[str(measure)] == pytest.approx(value, abs=1e-12)


def test_kill_and_resume_is_byte_identical(dl19, tmp_path):
    common = ["--candidates", str(dl19["json"]), "--top-k", "10", "--max-queries", "6", "--chunk-docs", "10"]
    full = tmp_path / "full.trec"
    res = tsarank("rerank", *common, "--out", str(full))
    assert res.returncode == 0, res.stderr

    out = tmp_path / "resumed.trec"
    sidecar = Path(str(out) + ".partial")
    proc = subprocess.Popen(["tsarank", "rerank", *common, "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        # 10 lines = one finished query (one query per chunk here).
        if sidecar.exists() and sidecar.read_bytes().count(b"\n") >= 10:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not out.exists()
    done = sidecar.read_text().splitlines(keepends=True)
    assert 10 <= len(done) < 60
    # A torn write: half a line at the end of the sidecar must be ignored.
    with open(sidecar, "a") as fh:
        fh.write(done[0][: len(done[0]) // 2])

    refused = tsarank("rerank", *common, "--out", str(out))
    assert refused.returncode == 2 and "--resume" in refused.stderr

    res = tsarank("rerank", *common, "--out", str(out), "--resume")
    assert res.returncode == 0, res.stderr
    assert "resuming:" in res.stderr and "queries resumed" in res.stdout
    assert out.read_bytes() == full.read_bytes()
    assert not sidecar.exists()

    again = tsarank("rerank", *common, "--out", str(out))
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_rerank_template_rankinggpt_reproduces_released_eval(dl19, default_model_dir, tmp_path):
    """`tsarank rerank --template rankinggpt` scores as RankingGPT's eval.py does (tests/released.py), with the real
    model and DL19 candidates: the same scores, hence the same ranking."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.released import rankinggpt_eval_scores

    entry = min(json.loads(dl19["json"].read_text(encoding="utf-8")), key=lambda e: int(e["hits"][0]["qid"]))
    hits = entry["hits"][:12]
    out = tmp_path / "rankinggpt.trec"
    res = tsarank("rerank", "--candidates", str(dl19["json"]), "--top-k", "12", "--max-queries", "1", "--template",
                  "rankinggpt", "--device", "cpu", "--dtype", "float32", "--out", str(out))
    assert res.returncode == 0, res.stderr
    got = {row.split()[2]: float(row.split()[4]) for row in read_lines(out)}
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    want = rankinggpt_eval_scores(model, tokenizer, [(entry["query"], h["content"]) for h in hits])
    assert set(got) == {h["docid"] for h in hits}
    for hit, score in zip(hits, want):
        assert got[hit["docid"]] == pytest.approx(score, abs=1e-4)
    # and not tsarank's own template, which scores differently
    default = tmp_path / "tsarank.trec"
    res = tsarank("rerank", "--candidates", str(dl19["json"]), "--top-k", "12", "--max-queries", "1", "--device", "cpu",
                  "--dtype", "float32", "--out", str(default))
    assert res.returncode == 0, res.stderr
    other = {row.split()[2]: float(row.split()[4]) for row in read_lines(default)}
    assert max(abs(other[d] - got[d]) for d in got) > 1e-2


def test_rerank_refuses_bad_template_options_before_loading(dl19, tmp_path):
    out = tmp_path / "x.trec"
    res = tsarank("rerank", "--candidates", str(dl19["json"]), "--template", "rankgpt", "--out", str(out))
    assert res.returncode == 2 and "unknown template 'rankgpt'" in res.stderr and "rankinggpt" in res.stderr
    res = tsarank("rerank", "--candidates", str(dl19["json"]), "--max-length", "512", "--out", str(out))
    assert res.returncode == 2 and "max_length" in res.stderr and "rankinggpt style only" in res.stderr
    res = tsarank("rerank", "--candidates", str(dl19["json"]), "--max-doc-tokens", "0", "--out", str(out))
    assert res.returncode == 2 and "--max-doc-tokens must be >= 1" in res.stderr
    assert not out.exists()
