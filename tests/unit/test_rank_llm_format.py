"""rank_llm's two JSON layouts read alike, and ``tsarank rerank --out-format rank_llm`` writes Requests that read back
as the run it wrote in TREC form."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tsarank.cli import main as cli
from tsarank.data.formats import read_rank_llm, read_run
from tsarank.errors import DataError

pytestmark = pytest.mark.usefixtures("one_thread")

DOCS = {"d1": ("Paris", "Paris is the capital and largest city of France."),
        "d2": ("", "Bananas are an elongated edible fruit."),
        "d3": ("Cells", "The mitochondria is the powerhouse of the cell.")}


def _legacy(path: Path) -> Path:
    hits = [{"qid": "q1", "docid": d, "score": 3.0 - i, "content": f"{t} {x}".strip()}
            for i, (d, (t, x)) in enumerate(DOCS.items())]
    path.write_text(json.dumps([{"query": "capital of france", "hits": hits}]))
    return path


def _requests(path: Path) -> Path:
    """rank_llm's Request JSONL, with the doc shapes it writes: {"title", "text"}, {"contents"} and a bare string."""
    cands = [{"docid": "d1", "score": 3.0, "doc": {"title": "Paris", "text": DOCS["d1"][1]}},
             {"docid": "d2", "score": 2.0, "doc": {"passage": DOCS["d2"][1]}},
             {"docid": "d3", "score": 1.0, "doc": "Cells " + DOCS["d3"][1]}]
    path.write_text(json.dumps({"query": {"text": "capital of france", "qid": "q1"}, "candidates": cands}) + "\n")
    return path


def test_both_layouts_read_alike(tmp_path):
    old, new = read_rank_llm(_legacy(tmp_path / "old.json")), read_rank_llm(_requests(tmp_path / "new.jsonl"))
    assert [(c.qid, c.query, c.docids, c.texts, c.scores) for c in old] == \
           [(c.qid, c.query, c.docids, c.texts, c.scores) for c in new]


@pytest.mark.parametrize("entry, field", [
    ({"query": {"qid": "q1"}, "candidates": []}, "query.text"),
    ({"query": {"text": "q"}, "candidates": []}, "query.qid"),
    ({"query": {"text": "q", "qid": "1"}, "candidates": {}}, "candidates"),
    ({"query": {"text": "q", "qid": "1"}, "candidates": [{"docid": "a", "doc": {"url": "x"}}]}, "candidates[0].doc"),
    ({"query": {"text": "q", "qid": "1"}, "candidates": [{"docid": "a", "doc": "t", "score": "high"}]},
     "candidates[0].score"),
])
def test_request_layout_errors_name_line_and_field(tmp_path, entry, field):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"query": {"text": "ok", "qid": "0"}, "candidates": []}) + "\n" + json.dumps(entry) + "\n")
    with pytest.raises(DataError) as err:
        read_rank_llm(path)
    assert f"{path}:2: field '{field}'" in str(err.value)


def test_rerank_reads_requests_and_writes_them(tmp_path, tiny_checkpoint, capsys):
    base = ["rerank", "--model", str(tiny_checkpoint), "--dtype", "float32", "--tag", "t"]
    assert cli([*base, "--candidates", str(_legacy(tmp_path / "old.json")), "--out", str(tmp_path / "a.trec")]) == 0
    assert cli([*base, "--candidates", str(_requests(tmp_path / "new.jsonl")), "--out", str(tmp_path / "b.trec")]) == 0
    assert (tmp_path / "a.trec").read_bytes() == (tmp_path / "b.trec").read_bytes()  # same input, either layout
    out = tmp_path / "c.jsonl"
    assert cli([*base, "--candidates", str(_requests(tmp_path / "new.jsonl")), "--out-format", "rank_llm",
                "--out", str(out)]) == 0
    capsys.readouterr()
    written = [json.loads(line) for line in out.read_text().splitlines()]
    trec = read_run(tmp_path / "a.trec")["q1"]
    assert [(c["docid"], c["score"]) for c in written[0]["candidates"]] == trec  # same order and scores, best first
    assert written[0]["query"] == {"text": "capital of france", "qid": "q1"}
    # ... and it reads back (a tsarank step after a tsarank step, or rank_llm after tsarank).
    again = read_rank_llm(out)[0]
    assert again.docids == [d for d, _ in trec] and again.scores == [s for _, s in trec]
    assert dict(zip(again.docids, again.texts)) == dict(zip(*(lambda c: (c.docids, c.texts))(read_rank_llm(
        tmp_path / "new.jsonl")[0])))


def test_an_ir_datasets_id_without_the_prefix_gets_the_hint(tmp_path, capsys):
    """The issue's first symptom: `--qrels msmarco-passage/trec-dl-2019/judged` was a bare "file not found"."""
    run = tmp_path / "r.trec"
    run.write_text("1 Q0 d 1 1.0 t\n")
    assert cli(["evaluate", "--run", str(run), "--qrels", "msmarco-passage/trec-dl-2019/judged"]) == 2
    assert "write irds:msmarco-passage/trec-dl-2019/judged" in capsys.readouterr().err
