"""tsarank.retrieval.bm25_retrieve against a brute-force Lucene BM25, on real SciFact, and the retrieve CLI."""

from __future__ import annotations

import argparse
import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest

from tsarank.commands import retrieve as retrieve_cmd
from tsarank.data.formats import Doc, read_corpus, read_qrels, read_queries, read_run
from tsarank.evaluation import evaluate
from tsarank.retrieval import bm25_retrieve

DATA = (Path(__file__).resolve().parents[2] / "../shared/data").resolve()

DOCS = {
    "d1": Doc("d1", "", "the quick brown fox jumps over the lazy dog"),
    "d2": Doc("d2", "Fox news", "fox fox fox reporting on foxes"),
    "d3": Doc("d3", "", "a lazy afternoon with a sleepy dog and a cat"),
    "d4": Doc("d4", "", "quantum chromodynamics of quarks and gluons in a very long document about physics"),
    "d5": Doc("d5", "", "brown bears and brown dogs eat quick snacks"),
}


def tokens(text: str) -> list[str]:
    """bm25s's default tokenisation without stop words or stemming: lower-case, \\w\\w+ tokens."""
    return re.findall(r"(?u)\b\w\w+\b", text.lower())


def brute_force_bm25(docs: dict[str, Doc], query: str, k1: float, b: float) -> dict[str, float]:
    """Lucene BM25 (bm25s method="lucene"), written out term by term."""
    doc_tokens = {d: tokens(doc.full_text) for d, doc in docs.items()}
    n = len(docs)
    avgdl = sum(len(t) for t in doc_tokens.values()) / n
    df = Counter(term for toks in doc_tokens.values() for term in set(toks))
    scores = {}
    for docid, toks in doc_tokens.items():
        tf = Counter(toks)
        score = 0.0
        for term in tokens(query):  # a repeated query term counts each time
            if df[term] == 0:
                continue
            idf = math.log(1 + (n - df[term] + 0.5) / (df[term] + 0.5))
            score += idf * tf[term] / (tf[term] + k1 * (1 - b + b * len(toks) / avgdl))
        scores[docid] = score
    return scores


@pytest.mark.parametrize("k1, b", [(0.9, 0.4), (1.5, 0.75)])
@pytest.mark.parametrize("query", ["quick brown dog", "fox", "lazy dog dog", "physics quarks fox"])
def test_matches_brute_force_lucene_bm25(query, k1, b):
    got = bm25_retrieve(DOCS, {"q": query}, top_k=5, stemmer=None, stopwords=None, k1=k1, b=b)["q"]
    expected = brute_force_bm25(DOCS, query, k1, b)
    want = sorted(((d, s) for d, s in expected.items() if s > 0), key=lambda it: (-it[1], it[0]))
    assert [d for d, _ in got] == [d for d, _ in want]
    for (_, s_got), (_, s_want) in zip(got, want):
        assert s_got == pytest.approx(s_want, rel=1e-5)  # bm25s scores in float32


def test_top_k_exclude_ties_and_no_match():
    docs = dict(DOCS) | {"d0": Doc("d0", "", "the quick brown fox jumps over the lazy dog")}  # twin of d1
    run = bm25_retrieve(docs, {"q": "quick brown dog", "none": "zebra", "short": "a b c"}, top_k=2, stemmer=None, stopwords=None)
    assert [d for d, _ in run["q"]] == ["d1", "d0"]  # equal scores, docid descending (trec_eval's order)
    assert run["q"][0][1] == run["q"][1][1]
    assert run["none"] == [] and run["short"] == []  # no matching token: nothing, not arbitrary zero-score documents
    excl = bm25_retrieve(docs, {"q": "quick brown dog"}, top_k=2, stemmer=None, stopwords=None, exclude={"q": {"d0", "d5"}})
    full = bm25_retrieve(docs, {"q": "quick brown dog"}, top_k=10, stemmer=None, stopwords=None)["q"]
    assert excl["q"] == [item for item in full if item[0] not in {"d0", "d5"}][:2]
    assert [d for d, _ in full] == ["d1", "d0", "d5", "d3"]  # only documents that match at least one term


def test_stemming_and_stopwords():
    run = bm25_retrieve(DOCS, {"q": "the foxes", "stop": "the and"}, top_k=5)  # "the" is a stop word, "foxes" stems to "fox"
    assert run["q"][0][0] == "d2" and {d for d, _ in run["q"]} == {"d1", "d2"}
    assert run["stop"] == []
    with pytest.raises(ValueError, match="unknown stemmer"):
        bm25_retrieve(DOCS, {"q": "fox"}, stemmer="klingon")


def test_scifact_test_ndcg10():
    root = DATA / "beir" / "scifact"
    if not (root / "corpus.jsonl").exists():
        pytest.skip(f"SciFact not found at {root} (expected ../shared/data beside the repository)")
    qrels = read_qrels(root / "qrels" / "test.tsv")
    queries = {q: t for q, t in read_queries(root).items() if q in qrels}
    run = bm25_retrieve(read_corpus(root), queries, top_k=100)
    assert len(run) == 300
    scores = evaluate(run, qrels, ["nDCG@10", "R@100"])
    # BEIR paper (Anserini, title + text): 0.665; bm25s reports about 0.68 for SciFact.
    assert 0.64 < scores["nDCG@10"] < 0.72
    assert scores["R@100"] > 0.85


# --------------------------------------------------------------------------- CLI


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tsarank")
    sub = parser.add_subparsers(dest="command", required=True)
    retrieve_cmd.add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture()
def beir_dir(tmp_path: Path) -> Path:
    root = tmp_path / "tiny"
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "title": doc.title, "text": doc.text}) + "\n" for d, doc in DOCS.items()))
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in [("1", "brown dog"), ("2", "fox news"), ("3", "physics")]))
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n1\td5\t1\n2\td2\t1\n")
    return root


def test_cli_beir_dir_split_and_overwrite(beir_dir, tmp_path, capsys):
    out = tmp_path / "run.trec"
    assert _cli(["retrieve", "--corpus", str(beir_dir), "--qrels-split", "test", "--top-k", "3", "--out", str(out)]) == 0
    run = read_run(out)
    assert list(run) == ["1", "2"]  # only judged queries
    assert all(len(r) <= 3 for r in run.values())
    lines = out.read_text().splitlines()
    assert all(line.split()[5] == "bm25" for line in lines)
    assert "nDCG@10" in capsys.readouterr().out
    # refuses to overwrite, then does with --overwrite; --qrels SPLIT is the same as --qrels-split
    before = out.read_text()
    assert _cli(["retrieve", "--corpus", str(beir_dir), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_text() == before
    assert _cli(["retrieve", "--corpus", str(beir_dir), "--qrels", "test", "--out", str(out), "--overwrite"]) == 0
    assert out.read_text() == before
    # no qrels: all queries
    assert _cli(["retrieve", "--corpus", str(beir_dir), "--out", str(out), "--overwrite"]) == 0
    assert list(read_run(out)) == ["1", "2", "3"]


def test_cli_errors(beir_dir, tmp_path, capsys):
    out = tmp_path / "run.trec"
    assert _cli(["retrieve", "--corpus", str(beir_dir), "--qrels-split", "dev", "--out", str(out)]) == 2
    assert "splits found: test" in capsys.readouterr().err
    assert _cli(["retrieve", "--corpus", str(beir_dir / "corpus.jsonl"), "--out", str(out)]) == 2
    assert "--queries is required" in capsys.readouterr().err
    bad = tmp_path / "bad.tsv"
    bad.write_text("d1\tok\nd2 no tab\n")
    assert _cli(["retrieve", "--corpus", str(bad), "--queries", str(beir_dir / "queries.jsonl"), "--out", str(out)]) == 2
    assert f"{bad}:2:" in capsys.readouterr().err
    assert not out.exists()
