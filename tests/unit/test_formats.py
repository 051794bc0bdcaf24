"""Readers/writers of tsarank.data.formats on good and malformed inputs (small files in tmp_path) and on the real data."""

from __future__ import annotations

import gzip
import json
import pickle
from pathlib import Path

import pytest

from tsarank.data.formats import (
    CandidateList,
    Doc,
    format_run_lines,
    load_candidates,
    parse_group,
    parse_weak_pair,
    read_corpus,
    read_groups,
    read_qrels,
    read_queries,
    read_rank_llm,
    read_run,
    read_weak_pairs,
    validate_jsonl,
    write_run,
)
from tsarank.errors import DataError

DATA = (Path(__file__).resolve().parents[2] / "../shared/data").resolve()


def real(rel: str) -> Path:
    path = DATA / rel
    if not path.exists():
        pytest.skip(f"real data file {path} not found (expected ../shared/data beside the repository)")
    return path


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_bytes(text.encode("utf-8"))
    return path


def jsonl(*objs) -> str:
    return "".join(json.dumps(o) + "\n" for o in objs)


def raises_at(path: Path, line: int | None, field: str | None):
    """Context manager: DataError whose message names path:line and the field."""

    class _Ctx:
        def __enter__(self):
            self.ctx = pytest.raises(DataError)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            if handled:
                err = self.info.value
                msg = str(err)
                where = f"{path}:{line}" if line is not None else str(path)
                assert msg.startswith(where + ":"), msg
                assert err.path == str(path) and err.line == line
                if field is not None:
                    assert f"field '{field}'" in msg, msg
                    assert err.field == field
            return handled

    return _Ctx()


# --------------------------------------------------------------------------- DataError


def test_data_error_message_and_attributes():
    err = DataError("data/x.jsonl", 17, "query", "expected a non-empty string, got int 5", fix="write the query text")
    assert str(err) == "data/x.jsonl:17: field 'query': expected a non-empty string, got int 5. Fix: write the query text"
    assert (err.path, err.line, err.field) == ("data/x.jsonl", 17, "query")
    assert isinstance(err, ValueError)
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.line == 17
    assert str(DataError("f.tsv", None, None, "file not found")) == "f.tsv: file not found"


# --------------------------------------------------------------------------- corpus


def test_corpus_jsonl_crlf_bom_blank_lines_int_ids(tmp_path):
    text = "\ufeff" + jsonl(
        {"_id": "d1", "title": "Title One", "text": "Body one.", "metadata": {}},
        {"_id": 2, "text": "Body two."},
        {"_id": "d3", "title": None, "text": "Body\tthree\r inner"},
    ).replace("\n", "\r\n") + "\r\n\n  \n"
    path = write(tmp_path, "corpus.jsonl", text)
    corpus = read_corpus(path)
    assert list(corpus) == ["d1", "2", "d3"]
    assert corpus["d1"] == Doc("d1", "Title One", "Body one.")
    assert corpus["d1"].full_text == "Title One Body one."
    assert corpus["2"].title == "" and corpus["2"].full_text == "Body two."
    assert corpus["d3"].text == "Body\tthree\r inner"  # lone \r inside a record is text, not a line break
    # BEIR directory and gzip
    assert read_corpus(tmp_path) == corpus
    gz = tmp_path / "gz" / "corpus.jsonl.gz"
    gz.parent.mkdir()
    gz.write_bytes(gzip.compress(text.encode()))
    assert read_corpus(gz.parent) == corpus


def test_doc_full_text_strips_only_with_title():
    assert Doc("a", "T", "  x ").full_text == "T   x"
    assert Doc("a", "", "  x ").full_text == "  x "
    assert Doc("a", "T", "").full_text == "T"


def test_corpus_tsv_splits_on_first_tab(tmp_path):
    path = write(tmp_path, "c.tsv", "d1\thello world\r\nd2\tcol a\tcol b\n\n")
    corpus = read_corpus(path)
    assert corpus == {"d1": Doc("d1", "", "hello world"), "d2": Doc("d2", "", "col a\tcol b")}


@pytest.mark.parametrize(
    "lines, line, field, words",
    [
        ([{"_id": "a", "text": "x"}, {"_id": "b", "text": 5}], 2, "text", ["expected a string", "int 5"]),
        ([{"_id": "a", "text": "x"}, {"text": "y"}], 2, "_id", ["missing"]),
        ([{"_id": "a b", "text": "x"}], 1, "_id", ["without whitespace"]),
        ([{"_id": True, "text": "x"}], 1, "_id", ["bool"]),
        ([{"_id": "a", "title": 3, "text": "x"}], 1, "title", ["expected a string"]),
    ],
)
def test_corpus_jsonl_field_errors(tmp_path, lines, line, field, words):
    path = write(tmp_path, "corpus.jsonl", jsonl(*lines))
    with raises_at(path, line, field) as info:
        read_corpus(path)
    for word in words:
        assert word in str(info.value)


def test_corpus_bad_json_line(tmp_path):
    path = write(tmp_path, "corpus.jsonl", jsonl({"_id": "a", "text": "x"}) + '{"_id": "b", "text": \n')
    with raises_at(path, 2, None) as info:
        read_corpus(path)
    assert "invalid JSON" in str(info.value)


def test_corpus_duplicate_docid_names_both_lines(tmp_path):
    path = write(tmp_path, "corpus.jsonl", jsonl({"_id": "a", "text": "x"}, {"_id": "b", "text": "y"}, {"_id": "a", "text": "z"}))
    with raises_at(path, 3, "_id") as info:
        read_corpus(path)
    assert "lines 1 and 3" in str(info.value) and "'a'" in str(info.value)
    tsv = write(tmp_path, "c.tsv", "x\tone\n\ny\ttwo\nx\tthree\n")
    with raises_at(tsv, 4, "docid") as info:
        read_corpus(tsv)
    assert "lines 1 and 4" in str(info.value)


def test_corpus_tsv_line_without_tab(tmp_path):
    path = write(tmp_path, "c.tsv", "d1\tok\nd2 no tab here\n")
    with raises_at(path, 2, "docid") as info:
        read_corpus(path)
    assert "docid<TAB>text" in str(info.value) and "Fix:" in str(info.value)


def test_corpus_file_level_errors(tmp_path):
    with raises_at(tmp_path / "nope.jsonl", None, None):
        read_corpus(tmp_path / "nope.jsonl")
    empty_dir = tmp_path / "emptydir"
    empty_dir.mkdir()
    with raises_at(empty_dir, None, None) as info:
        read_corpus(empty_dir)
    assert "corpus.jsonl" in str(info.value)
    empty = write(tmp_path, "empty.jsonl", "\n\n")
    with raises_at(empty, None, None):
        read_corpus(empty)
    latin1 = write(tmp_path, "l1.tsv", "d1\tok\nd2\tcaf\xe9\n".encode("latin-1"))
    with raises_at(latin1, 2, None) as info:
        read_corpus(latin1)
    assert "UTF-8" in str(info.value)
    array = write(tmp_path, "array.jsonl", json.dumps([{"_id": "a", "text": "x"}]))
    with pytest.raises(DataError, match="JSON array"):
        read_queries(array)


# --------------------------------------------------------------------------- queries


def test_queries_jsonl_and_tsv(tmp_path):
    path = write(tmp_path, "queries.jsonl", jsonl({"_id": 1, "text": "what is x", "metadata": {"url": "u"}}, {"_id": "q2", "text": "y?"}))
    assert read_queries(path) == {"1": "what is x", "q2": "y?"}
    assert read_queries(tmp_path) == {"1": "what is x", "q2": "y?"}
    tsv = write(tmp_path, "topics.tsv", "101\tdo goldfish grow\r\n102\ttab\tinside\r\n")
    assert read_queries(tsv) == {"101": "do goldfish grow", "102": "tab\tinside"}


def test_queries_empty_text_names_line(tmp_path):
    path = write(tmp_path, "queries.jsonl", jsonl({"_id": "1", "text": "ok"}, {"_id": "2", "text": "   "}))
    with raises_at(path, 2, "text") as info:
        read_queries(path)
    assert "non-empty" in str(info.value)
    tsv = write(tmp_path, "t.tsv", "1\tok\n2\t\n")
    with raises_at(tsv, 2, "text"):
        read_queries(tsv)
    typed = write(tmp_path, "typed.jsonl", jsonl({"_id": "1", "text": 5}))
    with raises_at(typed, 1, "text") as info:
        read_queries(typed)
    assert "got int 5" in str(info.value)


def test_queries_duplicate(tmp_path):
    tsv = write(tmp_path, "t.tsv", "1\ta\n2\tb\n1\tc\n")
    with raises_at(tsv, 3, "qid") as info:
        read_queries(tsv)
    assert "lines 1 and 3" in str(info.value)


# --------------------------------------------------------------------------- qrels


def test_qrels_trec_and_beir(tmp_path):
    trec = write(tmp_path, "q.txt", "1 0 d1 2\r\n1 Q0 d2 0\n2 0 d1 1\n\n")
    assert read_qrels(trec) == {"1": {"d1": 2, "d2": 0}, "2": {"d1": 1}}
    beir = write(tmp_path, "test.tsv", "query-id\tcorpus-id\tscore\r\n1\td1\t1\r\n1\td2\t2.0\r\n")
    assert read_qrels(beir) == {"1": {"d1": 1, "d2": 2}}
    dup_same = write(tmp_path, "dup.txt", "1 0 d1 2\n1 0 d1 2\n")
    assert read_qrels(dup_same) == {"1": {"d1": 2}}


def test_qrels_errors(tmp_path):
    bad_cols = write(tmp_path, "a.txt", "1 0 d1 2\n1 0 d2\n")
    with raises_at(bad_cols, 2, None) as info:
        read_qrels(bad_cols)
    assert "expected 4 columns" in str(info.value)
    run_like = write(tmp_path, "b.txt", "1 Q0 d1 1 3.5 tag\n")
    with raises_at(run_like, 1, None) as info:
        read_qrels(run_like)
    assert "6 columns" in str(info.value)
    bad_grade = write(tmp_path, "c.txt", "1 0 d1 2\n1 0 d2 high\n")
    with raises_at(bad_grade, 2, "grade") as info:
        read_qrels(bad_grade)
    assert "'high'" in str(info.value)
    conflict = write(tmp_path, "d.txt", "1 0 d1 2\n1 0 d2 0\n1 0 d1 1\n")
    with raises_at(conflict, 3, "grade") as info:
        read_qrels(conflict)
    assert "lines 1 and 3" in str(info.value)


# --------------------------------------------------------------------------- runs


def test_read_run_sorts_by_score_then_rank(tmp_path):
    path = write(tmp_path, "r.trec", "q1 Q0 a 3 1.0 t\r\nq1 Q0 b 1 2.0 t\nq2 Q0 x 1 -inf t\nq1 Q0 c 2 1.0 t\n\n")
    assert read_run(path) == {"q1": [("b", 2.0), ("c", 1.0), ("a", 1.0)], "q2": [("x", float("-inf"))]}


def test_read_run_errors(tmp_path):
    dup = write(tmp_path, "dup.trec", "q1 Q0 a 1 2 t\nq2 Q0 a 1 2 t\n\nq1 Q0 a 2 1 t\n")
    with raises_at(dup, 4, "docid") as info:
        read_run(dup)
    assert "lines 1 and 4" in str(info.value)
    nan = write(tmp_path, "nan.trec", "q1 Q0 a 1 nan t\n")
    with raises_at(nan, 1, "score"):
        read_run(nan)
    bad = write(tmp_path, "bad.trec", "q1 Q0 a 1 2 t\nq1 Q0 b x 1 t\n")
    with raises_at(bad, 2, "rank"):
        read_run(bad)
    qrels_like = write(tmp_path, "q.txt", "q1 0 a 1\n")
    with raises_at(qrels_like, 1, None) as info:
        read_run(qrels_like)
    assert "qrels" in str(info.value)


def test_write_run_order_ties_topk_and_round_trip(tmp_path):
    run = {"q2": [("b", 1.0), ("a", 1.0), ("c", 3.25)], "q1": [("z", 0.5), ("y", 0.123456789012)]}
    out = tmp_path / "run.trec"
    write_run(out, run, tag="mytag", top_k=2)
    lines = out.read_text().splitlines()
    assert lines == [
        "q2 Q0 c 1 3.25 mytag",
        "q2 Q0 b 2 1 mytag",  # tie at 1.0 broken by docid descending, as trec_eval orders it
        "q1 Q0 z 1 0.5 mytag",
        "q1 Q0 y 2 0.12345679 mytag",  # format(score, '.8g')
    ]
    back = read_run(out)
    assert [d for d, _ in back["q2"]] == ["c", "b"]
    assert [p.name for p in tmp_path.iterdir()] == ["run.trec"]  # no temp file left


def test_write_run_is_atomic_on_failure(tmp_path):
    out = tmp_path / "run.trec"
    out.write_text("old content\n")
    with pytest.raises(ValueError, match="NaN"):
        write_run(out, {"q1": [("a", 1.0)], "q2": [("b", float("nan"))]})
    assert out.read_text() == "old content\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.trec"]


def test_format_run_lines():
    lines = format_run_lines("q", [("d2", 2.0), ("d1", 2.0), ("d3", 5)], tag="x")
    assert lines == ["q Q0 d3 1 5 x\n", "q Q0 d2 2 2 x\n", "q Q0 d1 3 2 x\n"]  # tie: docid descending
    assert format_run_lines("q", [("d", 1.0)], top_k=0) == []
    with pytest.raises(ValueError, match="whitespace"):
        format_run_lines("q", [("a b", 1.0)])
    with pytest.raises(ValueError, match="twice"):
        format_run_lines("q", [("a", 1.0), ("a", 2.0)])


# --------------------------------------------------------------------------- rank_llm JSON


RANK_LLM = [
    {"query": "first query", "hits": [
        {"content": "text a", "qid": 7, "docid": "a", "rank": 1, "score": 9.5},
        {"content": "text b", "qid": 7, "docid": 2, "rank": 2, "score": 8.0},
    ]},
    {"query": "second query", "hits": [
        {"content": "text c", "qid": "8", "docid": "c"},
        {"content": "text d", "qid": "8", "docid": "d"},
    ]},
]


def test_read_rank_llm_good(tmp_path):
    path = write(tmp_path, "r.json", json.dumps(RANK_LLM, indent=2))
    lists = read_rank_llm(path)
    assert lists[0] == CandidateList("7", "first query", ["a", "2"], ["text a", "text b"], [9.5, 8.0])
    assert lists[1] == CandidateList("8", "second query", ["c", "d"], ["text c", "text d"], [-1.0, -2.0])
    lines = write(tmp_path, "r.jsonl", jsonl(*RANK_LLM))
    assert read_rank_llm(lines) == lists
    empty = write(tmp_path, "e.json", json.dumps([{"query": "q", "qid": 3, "hits": []}]))
    assert read_rank_llm(empty) == [CandidateList("3", "q", [], [], [])]


def _entry_line(text: str, index: int) -> int:
    """Line on which the index-th top-level entry of a json.dumps(..., indent=2) array starts."""
    starts = [i + 1 for i, line in enumerate(text.splitlines()) if line == "  {"]
    return starts[index]


@pytest.mark.parametrize(
    "mutate, field, words",
    [
        (lambda e: e[1]["hits"][1].__setitem__("content", None), "hits[1].content", ["expected a string", "null"]),
        (lambda e: e[1]["hits"][1].__setitem__("qid", "9"), "hits[1].qid", ["'8'", "'9'"]),
        (lambda e: e[1]["hits"][1].__setitem__("docid", "c"), "hits[1].docid", ["duplicate", "hits[0]"]),
        (lambda e: e[1].__setitem__("query", ""), "query", ["non-empty"]),
        (lambda e: e[1].__setitem__("hits", {"a": 1}), "hits", ["expected a list"]),
        (lambda e: e[1]["hits"][0].__setitem__("score", "high"), "hits[0].score", ["expected a number"]),
        (lambda e: e[1]["hits"][0].pop("docid"), "hits[0].docid", ["missing"]),
        (lambda e: e[1].__setitem__("hits", []), "qid", ["no hits"]),
        (lambda e: [h.__setitem__("qid", 7) for h in e[1]["hits"]], "qid", ["duplicate qid '7'"]),
    ],
)
def test_read_rank_llm_errors_name_entry_line_and_field(tmp_path, mutate, field, words):
    entries = json.loads(json.dumps(RANK_LLM))
    mutate(entries)
    text = json.dumps(entries, indent=2)
    path = write(tmp_path, "r.json", text)
    with raises_at(path, _entry_line(text, 1), field) as info:
        read_rank_llm(path)
    for word in words:
        assert word in str(info.value)


def test_read_rank_llm_malformed_json(tmp_path):
    path = write(tmp_path, "r.json", '[\n{"query": "q", "qid": 1, "hits": []}\n{"query": "r"}\n]')
    with raises_at(path, 3, None):
        read_rank_llm(path)
    truncated = write(tmp_path, "t.json", '[\n{"query": "q", "qid": 1, "hits": []},\n')
    with pytest.raises(DataError, match="t.json"):
        read_rank_llm(truncated)
    not_obj = write(tmp_path, "n.json", "[1]")
    with raises_at(not_obj, 1, None):
        read_rank_llm(not_obj)


def test_read_rank_llm_real_dl19_matches_trec_run():
    lists = read_rank_llm(real("trec-dl-passage/bm25_top100/retrieve_results_dl19.json"))
    run = read_run(real("trec-dl-passage/bm25_top100/trec_results_dl19.txt"))
    topics = read_queries(real("trec-dl-passage/topics.dl19-passage.txt"))
    assert len(lists) == 43 and all(len(c) == 100 for c in lists)
    for c in lists:
        assert c.docids == [d for d, _ in run[c.qid]]
        assert c.query == topics[c.qid]
        assert all(c.texts)


# --------------------------------------------------------------------------- load_candidates


def test_load_candidates_from_run(tmp_path):
    corpus = write(tmp_path, "c.tsv", "a\ttext a\nb\ttext b\nc\ttext c\n")
    queries = write(tmp_path, "q.tsv", "1\tquery one\n2\tquery two\n")
    run = write(tmp_path, "r.trec", "2 Q0 c 1 3 t\n2 Q0 x 2 2 t\n2 Q0 a 3 1 t\n1 Q0 y 1 5 t\n1 Q0 b 2 4 t\n")
    lists, missing = load_candidates(run=run, queries=queries, corpus=corpus)
    assert [c.qid for c in lists] == ["2", "1"]
    assert lists[0] == CandidateList("2", "query two", ["c", "a"], ["text c", "text a"], [3.0, 1.0])
    assert lists[1].docids == ["b"]
    assert missing == ["x", "y"]
    # top_k applies to the first-stage ranking, before missing documents are dropped
    lists, missing = load_candidates(run=run, queries=queries, corpus=corpus, top_k=2)
    assert lists[0].docids == ["c"] and missing == ["x", "y"]
    # already-loaded objects work too
    lists2, _ = load_candidates(run=read_run(run), queries=read_queries(queries), corpus=read_corpus(corpus))
    assert lists2[0] == load_candidates(run=run, queries=queries, corpus=corpus)[0][0]


def test_load_candidates_missing_query_text(tmp_path):
    corpus = write(tmp_path, "c.tsv", "a\ttext a\n")
    queries = write(tmp_path, "q.tsv", "1\tquery one\n")
    run = write(tmp_path, "r.trec", "1 Q0 a 1 3 t\n\n9 Q0 a 1 3 t\n")
    with raises_at(run, 3, "qid") as info:
        load_candidates(run=run, queries=queries, corpus=corpus)
    assert "'9'" in str(info.value) and "1 of 2" in str(info.value)


def test_load_candidates_rank_llm_and_argument_errors(tmp_path):
    path = write(tmp_path, "r.json", json.dumps(RANK_LLM))
    lists, missing = load_candidates(candidates=path, top_k=1)
    assert [c.docids for c in lists] == [["a"], ["c"]] and missing == []
    with pytest.raises(ValueError, match="not both"):
        load_candidates(run="r", queries="q", corpus="c", candidates=path)
    with pytest.raises(ValueError, match="queries"):
        load_candidates(run="r", corpus="c")
    with pytest.raises(ValueError, match="top_k"):
        load_candidates(candidates=path, top_k=0)


# --------------------------------------------------------------------------- weak pairs / groups


def test_weak_pairs_both_formats(tmp_path):
    path = write(tmp_path, "p.jsonl", jsonl(
        {"text": "a body", "query": "a title"},
        {"query": "Document: The name aardvark is Afrikaans. Query:", "response": " is aardvark afrikaans? "},
    ) + "\n")
    assert list(read_weak_pairs(path)) == [(1, "a body", "a title"), (2, "The name aardvark is Afrikaans.", "is aardvark afrikaans?")]
    assert validate_jsonl(path, parse_weak_pair) == 2


@pytest.mark.parametrize(
    "obj, field, words",
    [
        ({"query": "Doc: x Query:", "response": "q"}, "query", ["RankingGPT prompt"]),
        ({"query": "Document: x Query:", "response": 3}, "response", ["got int 3"]),
        ({"text": "x", "query": ""}, "query", ["non-empty"]),
        ({"text": ["x"], "query": "q"}, "text", ["list"]),
        ({"body": "x", "title": "q"}, None, ["got keys"]),
        ({"query": "Document:  Query:", "response": "q"}, "query", ["text between"]),
    ],
)
def test_weak_pair_errors(tmp_path, obj, field, words):
    path = write(tmp_path, "p.jsonl", jsonl({"text": "ok", "query": "ok"}, obj))
    with raises_at(path, 2, field) as info:
        validate_jsonl(path, parse_weak_pair)
    for word in words:
        assert word in str(info.value)
    with raises_at(path, 2, field):
        list(read_weak_pairs(path))


def test_weak_pairs_real_sample():
    pairs = list(read_weak_pairs(real("weak-pairs/rankinggpt_text_pairs.json")))
    assert len(pairs) == 10
    for _, text, query in pairs:
        assert text and query and not text.startswith("Document:") and not text.endswith("Query:")


GOOD_GROUP = {
    "query_id": 12,
    "query": "what is x",
    "positive_passages": [{"docid": 1, "title": "X", "text": "x is y"}],
    "negative_passages": [{"text": "other"}, {"docid": "n2", "text": "another"}],
    "teacher_scores": [3, 1.5, -2.0],
}


def test_read_groups_good(tmp_path):
    path = write(tmp_path, "g.jsonl", jsonl(GOOD_GROUP, {"query": "q2", "positive_passages": [{"text": "p"}]}))
    groups = read_groups(path)
    assert groups[0] == {
        "query_id": "12",
        "query": "what is x",
        "positive_passages": [{"docid": "1", "title": "X", "text": "x is y"}],
        "negative_passages": [{"docid": None, "title": "", "text": "other"}, {"docid": "n2", "title": "", "text": "another"}],
        "teacher_scores": [3.0, 1.5, -2.0],
    }
    assert groups[1]["query_id"] is None and groups[1]["negative_passages"] == [] and groups[1]["teacher_scores"] is None
    assert validate_jsonl(path, parse_group) == 2


def _group(**changes):
    group = json.loads(json.dumps(GOOD_GROUP))
    for key, value in changes.items():
        if value is None:
            group.pop(key)
        else:
            group[key] = value
    return group


@pytest.mark.parametrize(
    "group, field, words",
    [
        (_group(positive_passages=[]), "positive_passages", ["at least one positive"]),
        (_group(positive_passages=None), "positive_passages", ["missing"]),
        (_group(teacher_scores=[1.0, 2.0]), "teacher_scores", ["expected 3 scores", "got 2"]),
        (_group(teacher_scores=[1.0, "a", 2.0]), "teacher_scores[1]", ["expected a number"]),
        (_group(positive_passages=[{"text": 5}]), "positive_passages[0].text", ["got int 5"]),
        (_group(negative_passages=[{"text": "ok"}, "raw"]), "negative_passages[1]", ["expected an object"]),
        (_group(negative_passages=[{"text": " ", "title": ""}]), "negative_passages[0].text", ["empty"]),
        (_group(query=7), "query", ["got int 7"]),
        (_group(query_id=[1]), "query_id", ["expected a string or integer id"]),
    ],
)
def test_read_groups_errors(tmp_path, group, field, words):
    path = write(tmp_path, "g.jsonl", jsonl(GOOD_GROUP) + "\n" + jsonl(group))
    with raises_at(path, 3, field) as info:
        read_groups(path)
    for word in words:
        assert word in str(info.value)


def test_read_groups_real_msmarco_sample():
    groups = read_groups(real("msmarco-train-sample/rankinggpt_msmarco.json"))
    assert len(groups) == 100
    assert sum(len(g["negative_passages"]) for g in groups) == 4729
    assert sum(len(g["positive_passages"]) for g in groups) == 110
    assert all(isinstance(g["query_id"], str) for g in groups)


def test_real_beir_and_trec_files():
    corpus = read_corpus(real("beir/scifact"))
    queries = read_queries(real("beir/scifact"))
    qrels = read_qrels(real("beir/scifact/qrels/test.tsv"))
    assert (len(corpus), len(queries), len(qrels)) == (5183, 1109, 300)
    assert all(q in queries for q in qrels)
    assert all(d in corpus for judged in qrels.values() for d in judged)
    dl19 = read_qrels(real("trec-dl-passage/qrels.dl19-passage.txt"))
    assert sum(len(v) for v in dl19.values()) == 9260 and len(dl19) == 43


def test_readers_writers_and_ir_measures_agree_on_tie_order(tmp_path):
    """A run with ties, whose rank column says otherwise: read_run, write_run and ir_measures rank it alike."""
    import ir_measures
    from ir_measures import Qrel

    run_path = tmp_path / "ties.trec"
    run_path.write_text("q Q0 a 1 2.0 t\nq Q0 c 2 2.0 t\nq Q0 b 3 2.0 t\nq Q0 z 4 1.0 t\n")
    order = [d for d, _ in read_run(run_path)["q"]]
    assert order == ["c", "b", "a", "z"]  # score, then docid descending; the rank column is not consulted
    # ir_measures: relevant document at each position in turn; RR reveals the rank it was evaluated at.
    for position, docid in enumerate(order, 1):
        rr = ir_measures.calc_aggregate([ir_measures.RR], [Qrel("q", docid, 1)], ir_measures.read_trec_run(str(run_path)))
        assert rr[ir_measures.RR] == pytest.approx(1 / position)
    out = tmp_path / "written.trec"
    write_run(out, {"q": [("a", 2.0), ("b", 2.0), ("z", 1.0), ("c", 2.0)]}, top_k=2)
    assert [line.split()[2] for line in out.read_text().splitlines()] == ["c", "b"]


@pytest.mark.parametrize("measure", ["RR", "RR@10", "P@1", "nDCG@10", "AP", "R@2"])
def test_evaluate_breaks_ties_in_trec_eval_order_for_every_measure(measure):
    """ir_measures' backends disagree on ties (its RR@10 backend kept input order); tsarank's evaluate gives
    each measure the value it has on the run ranked in trec_eval's order, worked here by hand."""
    from tsarank.evaluation import evaluate

    # Input order a, b, c (all tied); trec_eval ranks them c, b, a, so the relevant 'a' is third.
    run = {"q": [("a", 1.0), ("b", 1.0), ("c", 1.0)]}
    qrels = {"q": {"a": 1, "b": 0}}
    by_hand = {"RR": 1 / 3, "RR@10": 1 / 3, "P@1": 0.0, "nDCG@10": 0.5, "AP": 1 / 3, "R@2": 0.0}
    assert evaluate(run, qrels, [measure])[measure] == pytest.approx(by_hand[measure])
