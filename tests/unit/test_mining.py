"""Group building with hard negatives (tsarank/data/mining.py) on a tiny hand-made BEIR dataset.

The expected windows are computed independently: a brute-force BM25 ranking from ``bm25_retrieve`` called
directly (no exclusion), sliced by hand, minus the judged-relevant documents.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pytest

from tsarank.data.formats import read_corpus, read_groups, read_qrels, read_queries, write_run
from tsarank.commands.groups import add_groups_arguments, run_groups
from tsarank.data.mining import groups_from_run, mine_bm25_groups, select_negatives, write_groups
from tsarank.errors import DataError
from tsarank.retrieval import bm25_retrieve

# 30 documents about apples / pears / other, so BM25 gives long, distinct rankings.
_FRUITS = ["apple", "pear", "plum", "cherry", "grape", "lemon"]
_WORDS = ["orchard", "tree", "harvest", "juice", "pie", "market", "season", "farm", "sweet", "sour"]


def _doc_text(i: int) -> str:
    rng = random.Random(i)
    words = [rng.choice(_FRUITS) for _ in range(1 + i % 4)] + [rng.choice(_WORDS) for _ in range(6)]
    return " ".join(words)


@pytest.fixture()
def beir_dir(tmp_path: Path) -> Path:
    root = tmp_path / "tinybeir"
    (root / "qrels").mkdir(parents=True)
    with open(root / "corpus.jsonl", "w") as fh:
        for i in range(30):
            fh.write(json.dumps({"_id": f"d{i}", "title": f"Title {i}" if i % 3 else "", "text": _doc_text(i)}) + "\n")
    queries = {
        "q1": "apple orchard harvest",
        "q2": "pear juice sweet",
        "q3": "cherry pie market",
        "q4": "lemon sour season",
        "q5": "zzz unmatched",  # no BM25 hit at all: skipped, counted
    }
    with open(root / "queries.jsonl", "w") as fh:
        for qid, text in queries.items():
            fh.write(json.dumps({"_id": qid, "text": text}) + "\n")
    qrels = [("q1", "d0", 1), ("q1", "d5", 1), ("q2", "d1", 1), ("q2", "d7", 1), ("q2", "d11", 1),
             ("q3", "d2", 1), ("q4", "d3", 1), ("q5", "d4", 1), ("q1", "d9", 0)]
    with open(root / "qrels" / "train.tsv", "w") as fh:
        fh.write("query-id\tcorpus-id\tscore\n")
        for q, d, g in qrels:
            fh.write(f"{q}\t{d}\t{g}\n")
    return root


def _load(root: Path):
    return read_corpus(root), read_queries(root), read_qrels(root / "qrels" / "train.tsv")


def test_window_and_exclusion_match_brute_force(beir_dir):
    corpus, queries, qrels = _load(beir_dir)
    start, end = 3, 12
    groups, stats = mine_bm25_groups(corpus, queries, qrels, negatives=None, depth_start=start, depth_end=end, seed=0)
    brute = bm25_retrieve(corpus, {q: queries[q] for q in qrels}, top_k=len(corpus))
    assert {g["query_id"] for g in groups} == {"q1", "q2", "q3", "q4"}
    for group in groups:
        qid = group["query_id"]
        relevant = {d for d, grade in qrels[qid].items() if grade > 0}
        ranked = [d for d, _ in brute[qid]]
        expected = [d for d in ranked[start - 1 : end] if d not in relevant]
        got = [p["docid"] for p in group["negative_passages"]]
        assert got == expected, qid
        assert not set(got) & relevant
        assert sorted(p["docid"] for p in group["positive_passages"]) == sorted(relevant)
        # Passages carry title and text from the corpus.
        for p in group["positive_passages"] + group["negative_passages"]:
            assert (p["title"], p["text"]) == (corpus[p["docid"]].title, corpus[p["docid"]].text)
    by_q = {g["query_id"]: [p["docid"] for p in g["negative_passages"]] for g in groups}
    # The hand-made data puts judged-relevant documents inside the window (q2: d7 at rank 4, d11 at rank 7),
    # so exclusion is exercised: the window has 10 ranks, q2 keeps 8.
    assert len(by_q["q2"]) == end - start + 1 - 2
    # d9 is judged non-relevant (grade 0) for q1 and sits at rank 5: a legitimate negative.
    assert "d9" in by_q["q1"]
    assert stats.no_negatives == 1 and stats.examples["no_negatives"] == ["q5"]
    assert stats.groups == 4 and stats.negatives == sum(len(g["negative_passages"]) for g in groups)


def test_sampled_negatives_subset_of_window_and_seeded(beir_dir):
    corpus, queries, qrels = _load(beir_dir)
    kw = dict(negatives=4, depth_start=2, depth_end=20)
    a, _ = mine_bm25_groups(corpus, queries, qrels, seed=7, **kw)
    b, _ = mine_bm25_groups(corpus, queries, qrels, seed=7, **kw)
    c, _ = mine_bm25_groups(corpus, queries, qrels, seed=8, **kw)
    full, _ = mine_bm25_groups(corpus, queries, qrels, negatives=None, depth_start=2, depth_end=20)
    window = {g["query_id"]: [p["docid"] for p in g["negative_passages"]] for g in full}
    assert a == b
    assert a != c
    for group in a:
        got = [p["docid"] for p in group["negative_passages"]]
        assert len(got) == min(4, len(window[group["query_id"]]))
        # A subset of the window, kept in rank order.
        positions = [window[group["query_id"]].index(d) for d in got]
        assert positions == sorted(positions)


def test_one_querys_draw_does_not_depend_on_the_others(beir_dir):
    corpus, queries, qrels = _load(beir_dir)
    kw = dict(negatives=3, depth_start=1, depth_end=25, seed=3)
    everything, _ = mine_bm25_groups(corpus, queries, qrels, **kw)
    alone, _ = mine_bm25_groups(corpus, queries, {"q2": qrels["q2"]}, **kw)
    assert alone == [g for g in everything if g["query_id"] == "q2"]


def test_max_queries_is_a_seeded_subset(beir_dir):
    corpus, queries, qrels = _load(beir_dir)
    groups, stats = mine_bm25_groups(corpus, queries, qrels, negatives=2, depth_start=1, depth_end=20, max_queries=2, seed=1)
    again, _ = mine_bm25_groups(corpus, queries, qrels, negatives=2, depth_start=1, depth_end=20, max_queries=2, seed=1)
    assert groups == again and stats.selected == 2 and len(groups) <= 2
    order = list(qrels)
    ids = [g["query_id"] for g in groups]
    assert ids == sorted(ids, key=order.index)


def test_max_positives(beir_dir):
    corpus, queries, qrels = _load(beir_dir)
    groups, _ = mine_bm25_groups(corpus, queries, qrels, negatives=None, depth_start=1, depth_end=30, max_positives=1)
    q2 = next(g for g in groups if g["query_id"] == "q2")
    assert len(q2["positive_passages"]) == 1
    # The dropped positives are still never negatives.
    assert not {p["docid"] for p in q2["negative_passages"]} & {"d1", "d7", "d11"}


def test_run_source_equals_bm25_source(beir_dir, tmp_path):
    """A TREC run of the same BM25 ranking gives byte-identical groups (ranks are run positions)."""
    corpus, queries, qrels = _load(beir_dir)
    run = bm25_retrieve(corpus, {q: queries[q] for q in qrels}, top_k=15)
    write_run(tmp_path / "run.trec", run)
    from tsarank.data.formats import read_run

    kw = dict(negatives=3, depth_start=2, depth_end=15, seed=5)
    from_run, _ = groups_from_run(read_run(tmp_path / "run.trec"), corpus, queries, qrels, **kw)
    from_bm25, _ = mine_bm25_groups(corpus, queries, qrels, **kw)
    assert from_run == from_bm25


def test_run_source_skips_missing_docs_keeping_ranks():
    from tsarank.data.formats import Doc

    corpus = {d: Doc(d, "", f"text {d}") for d in ["p", "a", "b", "c", "e"]}
    run = {"q": [("p", 9.0), ("a", 8.0), ("ghost", 7.0), ("b", 6.0), ("c", 5.0), ("e", 4.0)]}
    qrels = {"q": {"p": 1, "c": 2}}
    groups, stats = groups_from_run(run, corpus, {"q": "query"}, qrels, negatives=None, depth_start=2, depth_end=5)
    # Ranks 2..5 are a, ghost, b, c; ghost is not in the corpus and c is relevant.
    assert [p["docid"] for p in groups[0]["negative_passages"]] == ["a", "b"]
    assert stats.missing_docs == 1


def test_select_negatives_pure():
    ranking = [f"d{i}" for i in range(1, 21)]
    got = select_negatives(ranking, {"d5", "d6"}, depth_start=4, depth_end=8, negatives=None, rng=random.Random(0))
    assert got == ["d4", "d7", "d8"]
    with pytest.raises(ValueError, match="depth_end"):
        select_negatives(ranking, (), depth_start=5, depth_end=4, negatives=1, rng=random.Random(0))


def _cli(argv):
    parser = add_groups_arguments(argparse.ArgumentParser())
    return run_groups(parser.parse_args(argv))


def test_cli_writes_valid_groups_and_refuses_overwrite(beir_dir, tmp_path, capsys):
    out = tmp_path / "groups.jsonl"
    argv = ["--corpus", str(beir_dir), "--qrels", "train", "--out", str(out), "--negatives", "3", "--depth-start", "1", "--depth-end", "20"]
    assert _cli(argv) == 0
    groups = read_groups(out)
    assert len(groups) == 4
    captured = capsys.readouterr()
    assert "wrote 4 groups" in captured.out and "skipped 1 queries" in captured.err
    before = out.read_bytes()
    assert _cli(argv + ["--seed", "9"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert _cli(argv + ["--seed", "9", "--overwrite"]) == 0


def test_malformed_qrels_names_file_and_line(beir_dir, tmp_path, capsys):
    bad = tmp_path / "bad_qrels.tsv"
    bad.write_text("query-id\tcorpus-id\tscore\nq1\td0\t1\nq2\td1\n")
    out = tmp_path / "groups.jsonl"
    assert _cli(["--corpus", str(beir_dir), "--qrels", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:3" in err
    assert not out.exists()
    with pytest.raises(DataError) as info:
        read_qrels(bad)
    assert info.value.line == 3


def test_no_group_is_an_error(beir_dir, tmp_path, capsys):
    out = tmp_path / "groups.jsonl"
    # A window beyond every ranking: nothing to sample from.
    assert _cli(["--corpus", str(beir_dir), "--qrels", "train", "--out", str(out), "--depth-start", "500", "--depth-end", "600"]) == 2
    assert "no group could be built" in capsys.readouterr().err
    assert not out.exists()


def test_write_groups_refuses_overwrite(tmp_path):
    out = tmp_path / "g.jsonl"
    write_groups(out, [{"query": "q", "positive_passages": [{"text": "x"}]}])
    with pytest.raises(FileExistsError):
        write_groups(out, [])
    assert write_groups(out, [], overwrite=True) == 0
