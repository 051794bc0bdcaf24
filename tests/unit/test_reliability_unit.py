"""Reliability suite, in-process part: what happens with bad or awkward input (docs/reliability.md).

Each test drives the user-facing path (``tsarank`` CLI via ``tsarank.cli.main``, ``sft/train.py``'s ``main``,
``Ranker``) with a tiny random Llama and the tiny tokenizer, and asserts the exact message (``file:line``, field)
or the exact output (scores against a plain ``transformers`` computation). No subprocess, no real model: seconds.
The subprocess / kill / resume rows are in ``tests/integration/test_reliability.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import build_tiny_llama
from tsarank.cli import main as cli
from tsarank.inference import Ranker
from tsarank.prompts import PromptTemplate

ROOT = Path(__file__).resolve().parents[2]
DL19_JSON = "trec-dl-passage/bm25_top100/retrieve_results_dl19.json"
# A real MS MARCO passage with mojibake (UTF-8 read as Latin-1: "won’t" -> "wonâ\x80\x99t"), DL19 query 130510.
MOJIBAKE_QID, MOJIBAKE_DOCID = "130510", "4528805"
NON_LATIN = {
    "zh": "\u5df4\u9ece\u662f\u6cd5\u56fd\u7684\u9996\u90fd\u548c\u6700\u5927\u7684\u57ce\u5e02\u3002",
    "ar": "\u0628\u0627\u0631\u064a\u0633 \u0647\u064a \u0639\u0627\u0635\u0645\u0629 \u0641\u0631\u0646\u0633\u0627.",
    "ru": "\u041f\u0430\u0440\u0438\u0436 \u2014 \u0441\u0442\u043e\u043b\u0438\u0446\u0430 \u0424\u0440\u0430\u043d\u0446\u0438\u0438.",
}
QUERY = "what is the capital of france"


from tsarank.training import sft  # noqa: E402  the code behind sft/train.py


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    """The same weights as conftest's ``tiny_checkpoint`` (seed 0), built once."""
    return build_tiny_llama(len(tiny_tokenizer))


@pytest.fixture(scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models are latency-bound; one thread is faster on a shared machine
    yield
    torch.set_num_threads(n)


def brute_force_score(model, tokenizer, source: str, target: str) -> float:
    """Mean log p(target tokens | prefix) of the text ``source + target``: one unpadded sequence, full [L, V]
    logits, the target located by tokenizing ``source`` on its own (the tiny tokenizer adds no special tokens)."""
    src = tokenizer(source)["input_ids"]
    ids = tokenizer(source + target)["input_ids"]
    assert ids[: len(src)] == src, "source is not a token prefix of the full text"
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
    terms = [logp[t - 1, ids[t]].item() for t in range(len(src), len(ids))]
    return sum(terms) / len(terms)


def _group(query="q", positives=("positive text",), negatives=("negative one", "negative two")) -> dict:
    return {"query": query, "positive_passages": [{"text": t} for t in positives],
            "negative_passages": [{"text": t} for t in negatives]}


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def _sft_main(argv, capsys) -> tuple[int, str]:
    rc = sft.main(argv)
    return rc, capsys.readouterr().err


def _sft_argv(model_dir, train_file, out, **extra) -> list[str]:
    opts = dict(model_name_or_path=model_dir, train_file=train_file, output_dir=out, train_group_size=3,
                max_doc_tokens=32, max_query_tokens=8, report_to="none", save_strategy="no", max_steps=1,
                per_device_train_batch_size=1, lambda_dp=0.0, dataloader_num_workers=0, logging_steps=1,
                dataloader_pin_memory="false")
    opts.update(extra)
    return [x for k, v in opts.items() for x in (f"--{k}", str(v))]


# =============================================================================================== input errors
def test_wrong_field_type_names_file_line_and_field(tmp_path, tiny_tokenizer, tiny_checkpoint, capsys):
    """A wrong type in a group file (sft/train.py) and in a weak-pairs file (CPT's dataset builder)."""
    groups = _write_jsonl(tmp_path / "groups.jsonl", [
        _group("first"),
        {**_group("second"), "positive_passages": [{"docid": "p1", "text": 7}]},
    ])
    out = tmp_path / "out"
    rc, err = _sft_main(_sft_argv(tiny_checkpoint, groups, out), capsys)
    assert rc == 2
    assert err.strip() == f"error: {groups}:2: field 'positive_passages[0].text': expected a string, got int 7"
    assert not out.exists()

    from tsarank.data.collate import build_cpt_dataset
    from tsarank.errors import DataError

    pairs = _write_jsonl(tmp_path / "pairs.jsonl", [{"text": "a passage", "query": "q"}, "",
                                                    {"text": ["a", "list"], "query": "q"}])
    with pytest.raises(DataError) as info:
        build_cpt_dataset(pairs, tiny_tokenizer, PromptTemplate(), cache_dir=str(tmp_path / "cache"))
    assert str(info.value) == f"{pairs}:3: field 'text': expected a non-empty string, got list ['a', 'list']"
    assert (info.value.line, info.value.field) == (3, "text")  # line numbers count the blank line


def test_empty_query_in_queries_file_is_reported_by_rerank(tmp_path, tiny_checkpoint, capsys):
    """An empty query in a queries file stops ``tsarank rerank`` (exit 2) before the model is loaded."""
    run = tmp_path / "run.trec"
    run.write_text("1 Q0 d1 1 10 bm25\n2 Q0 d1 1 10 bm25\n")
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", [{"_id": "d1", "title": "", "text": "Paris."}])
    tsv = tmp_path / "queries.tsv"
    tsv.write_text("1\tcapital of france\n2\t   \n")
    jsonl = _write_jsonl(tmp_path / "queries.jsonl", [{"_id": "1", "text": "capital of france"}, {"_id": "2", "text": ""}])
    out = tmp_path / "out.trec"
    for queries, message in [
        (tsv, f"{tsv}:2: field 'text': expected non-empty query text for qid '2', got '   '. Fix: fill in the query "
              "or drop the line"),
        (jsonl, f"{jsonl}:2: field 'text': expected a non-empty string, got str ''. Fix: drop the record or fill in "
                "the text"),
    ]:
        rc = cli(["rerank", "--run", str(run), "--queries", str(queries), "--corpus", str(corpus), "--out", str(out),
                  "--model", str(tiny_checkpoint)])
        err = capsys.readouterr().err
        assert rc == 2
        assert err.strip() == f"error: {message}"
        assert not out.exists()


def test_empty_query_in_ranker_score(model, tiny_tokenizer):
    ranker = Ranker(model, tiny_tokenizer)
    for query in ("", "   ", "\n\t"):
        with pytest.raises(ValueError, match=r"^query is empty; a query-likelihood score needs at least one query token$"):
            ranker.score(query, ["Paris is the capital of France."])
    with pytest.raises(ValueError, match=r"^pairs\[1\]\[0\] \(query\) is empty"):
        ranker.score_pairs([(QUERY, "a"), (" ", "b")])


def test_group_without_positive_names_file_line(tmp_path, tiny_checkpoint, capsys):
    """An empty ``positive_passages`` list, and a group without the key, both stop sft/train.py before loading."""
    groups = _write_jsonl(tmp_path / "groups.jsonl", [_group("a"), "", {**_group("b"), "positive_passages": []}])
    out = tmp_path / "out"
    rc, err = _sft_main(_sft_argv(tiny_checkpoint, groups, out), capsys)
    assert rc == 2
    assert err.strip() == (f"error: {groups}:3: field 'positive_passages': expected at least one positive passage, got "
                           "an empty list. Fix: drop the group or add its relevant passage")
    missing = _write_jsonl(tmp_path / "missing.jsonl", [{"query": "c", "negative_passages": [{"text": "n"}]}])
    rc, err = _sft_main(_sft_argv(tiny_checkpoint, missing, out), capsys)
    assert rc == 2
    assert err.strip() == (f"error: {missing}:1: field 'positive_passages': missing; the object has keys "
                           "['negative_passages', 'query']. Fix: add \"positive_passages\": [{\"docid\", \"text\"}, ...]")
    assert not out.exists()


# ==================================================================================== awkward but valid input
def test_empty_document_is_scored(model, tiny_tokenizer, one_thread):
    ranker = Ranker(model, tiny_tokenizer)
    scores = ranker.score(QUERY, ["", "Paris is the capital of France.", ""])
    assert all(math.isfinite(s) and s < 0 for s in scores)
    want = brute_force_score(model, tiny_tokenizer, "Document:  Query:", " " + QUERY)
    assert scores[0] == pytest.approx(want, abs=1e-5)
    assert scores[2] == scores[0]


def test_long_query_truncated_template_intact(model, tiny_tokenizer, one_thread):
    budget = 4
    template = PromptTemplate(max_query_tokens=budget)
    ranker = Ranker(model, tiny_tokenizer, template)
    long_query = "what is the capital of france and why is paris the largest city of france " * 20
    ids = tiny_tokenizer(long_query, add_special_tokens=False)["input_ids"]
    assert len(ids) > 50 * budget
    kept = tiny_tokenizer.decode(ids[:budget])  # the pre-truncated query, computed independently
    assert long_query.startswith(kept) and kept
    doc = "Paris is the capital of France."
    (enc,) = ranker.encode([long_query], [doc])
    # The template is intact around the cut query, and the scored span is exactly the kept query tokens.
    assert tiny_tokenizer.decode(enc.input_ids) == f"Document: {doc} Query: {kept}"
    assert tiny_tokenizer.decode(enc.input_ids[enc.target_start : enc.target_end]) == " " + kept
    assert enc.target_end - enc.target_start == len(tiny_tokenizer(" " + kept, add_special_tokens=False)["input_ids"])
    score = ranker.score(long_query, [doc])[0]
    assert score == pytest.approx(brute_force_score(model, tiny_tokenizer, f"Document: {doc} Query:", " " + kept), abs=1e-5)
    assert score == pytest.approx(ranker.score(kept, [doc])[0], abs=1e-6)


def test_very_long_document_truncated(model, tiny_tokenizer, one_thread):
    budget = 64
    ranker = Ranker(model, tiny_tokenizer, PromptTemplate(max_doc_tokens=budget))
    long_doc = " ".join(f"Paris{i} is the capital and largest city of France." for i in range(4000))  # ~200k chars
    assert len(long_doc) > 200_000
    ids = tiny_tokenizer(long_doc, add_special_tokens=False)["input_ids"]
    kept = tiny_tokenizer.decode(ids[:budget])
    assert long_doc.startswith(kept)
    (enc,) = ranker.encode([QUERY], [long_doc])
    assert tiny_tokenizer.decode(enc.input_ids) == f"Document: {kept} Query: {QUERY}"
    long_score, kept_score, longer_score = ranker.score(QUERY, [long_doc, kept, long_doc + " more text" * 1000])
    want = brute_force_score(model, tiny_tokenizer, f"Document: {kept} Query:", " " + QUERY)
    assert long_score == pytest.approx(want, abs=1e-5)
    assert long_score == pytest.approx(kept_score, abs=1e-6)
    assert longer_score == pytest.approx(long_score, abs=1e-6)  # what lies past the budget never matters


def test_mojibake_and_non_latin_score_finitely(model, tiny_tokenizer, shared_data, one_thread):
    """The real MS MARCO mojibake passage and Chinese / Arabic / Cyrillic texts, as documents and as queries,
    scored in full and cut at budgets that split multi-byte characters."""
    from tsarank.data.formats import read_rank_llm

    entry = next(c for c in read_rank_llm(shared_data / DL19_JSON) if c.qid == MOJIBAKE_QID)
    mojibake = entry.texts[entry.docids.index(MOJIBAKE_DOCID)]
    assert "won\u00e2\u0080\u0099t" in mojibake
    docs = [mojibake, *NON_LATIN.values()]
    full = Ranker(model, tiny_tokenizer, PromptTemplate(max_doc_tokens=4096, max_query_tokens=512))  # no cut
    for query in (entry.query, NON_LATIN["ru"], "\u6cd5\u56fd\u9996\u90fd"):
        scores = full.score(query, docs)
        want = [brute_force_score(model, tiny_tokenizer, f"Document: {d} Query:", " " + query) for d in docs]
        assert scores == pytest.approx(want, abs=1e-5)
    for budget in (1, 2, 3, 5, 8):
        cut = Ranker(model, tiny_tokenizer, PromptTemplate(max_doc_tokens=budget, max_query_tokens=budget))
        for enc in cut.encode([NON_LATIN["zh"]] * len(docs), docs):
            text = tiny_tokenizer.decode(enc.input_ids)
            assert "\ufffd" not in text and text.startswith("Document: ") and " Query: " in text
        assert all(math.isfinite(s) for s in cut.score(NON_LATIN["ar"], docs))


def test_mojibake_and_non_latin_round_trip_through_rerank(tmp_path, tiny_checkpoint, shared_data, capsys, one_thread):
    """Non-Latin queries, documents and docids go through ``tsarank rerank`` (UTF-8 files in, TREC run out)
    unchanged: the run's scores equal ``Ranker.score`` of the original strings, the docids come back byte for byte."""
    from tsarank.data.formats import read_rank_llm

    entry = next(c for c in read_rank_llm(shared_data / DL19_JSON) if c.qid == MOJIBAKE_QID)
    docs = {
        MOJIBAKE_DOCID: entry.texts[entry.docids.index(MOJIBAKE_DOCID)],
        "\u6587\u6863-zh": NON_LATIN["zh"],
        "\u0648\u062b\u064a\u0642\u0629-ar": NON_LATIN["ar"],
        "\u0434\u043e\u043a-ru": NON_LATIN["ru"],
        "empty": "",
    }
    queries = {"1": entry.query, "2": "\u0441\u0442\u043e\u043b\u0438\u0446\u0430 \u0424\u0440\u0430\u043d\u0446\u0438\u0438",
               "3": "\u6cd5\u56fd\u7684\u9996\u90fd"}
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", [{"_id": d, "title": "", "text": t} for d, t in docs.items()])
    qfile = tmp_path / "queries.tsv"
    qfile.write_text("".join(f"{q}\t{t}\n" for q, t in queries.items()), encoding="utf-8")
    run = tmp_path / "bm25.trec"
    run.write_text("".join(f"{q} Q0 {d} {r} {10 - r} bm25\n" for q in queries for r, d in enumerate(docs, 1)),
                   encoding="utf-8")
    out = tmp_path / "rerank.trec"
    rc = cli(["rerank", "--run", str(run), "--queries", str(qfile), "--corpus", str(corpus), "--out", str(out),
              "--model", str(tiny_checkpoint), "--dtype", "float32"])
    assert rc == 0, capsys.readouterr().err
    lines = out.read_bytes().decode("utf-8").splitlines()
    assert len(lines) == len(queries) * len(docs)
    ranker = Ranker.from_pretrained(str(tiny_checkpoint), device="cpu", dtype="float32")
    for qid, query in queries.items():
        rows = [line.split(" ") for line in lines if line.split(" ")[0] == qid]
        assert {r[2] for r in rows} == set(docs)  # non-Latin docids come back unchanged
        assert [int(r[3]) for r in rows] == list(range(1, len(docs) + 1))
        got = {r[2]: float(r[4]) for r in rows}
        want = dict(zip(docs, ranker.score(query, list(docs.values()))))
        assert all(math.isfinite(v) for v in got.values())
        for docid in docs:
            assert got[docid] == pytest.approx(want[docid], abs=1e-5), docid


# ============================================================================================= run files
def _rerank_inputs(tmp_path: Path, run_lines: list[str]) -> tuple[Path, Path, Path]:
    run = tmp_path / "run.trec"
    run.write_text("".join(line + "\n" for line in run_lines))
    queries = tmp_path / "queries.tsv"
    queries.write_text("1\tcapital of france\n2\tbanana fruit\n")
    corpus = tmp_path / "corpus.tsv"
    corpus.write_text("d1\tParis is the capital of France.\nd2\tBananas are fruit.\nd3\tThe mitochondria.\n")
    return run, queries, corpus


def test_unknown_docids_reported_before_scoring(tmp_path, tiny_checkpoint, capsys, one_thread):
    missing = [f"m{i}" for i in range(7)]
    lines = ["1 Q0 d1 1 20 bm25", "1 Q0 m0 2 19 bm25", "1 Q0 m1 3 18 bm25", "1 Q0 d2 4 17 bm25",
             *[f"2 Q0 {m} {r} {15 - r} bm25" for r, m in enumerate(missing[2:], 1)], "2 Q0 m0 6 5 bm25",
             "2 Q0 d3 7 4 bm25"]
    run, queries, corpus = _rerank_inputs(tmp_path, lines)
    out = tmp_path / "out.trec"
    base = ["rerank", "--run", str(run), "--queries", str(queries), "--corpus", str(corpus), "--out", str(out)]

    # --strict: the report is an error, before the model is loaded (only its config files are read up front).
    assert cli([*base, "--model", str(tiny_checkpoint), "--strict"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("error: 7 docid(s) of the run are missing from the corpus (first: m0, m1, m2, m3, m4, ...). "
                           "Fix: pass the corpus the run was retrieved from, or drop --strict to skip them")
    assert not out.exists()

    # Default: the same report as a warning, printed before the scoring progress bar; the rest is re-ranked.
    assert cli([*base, "--model", str(tiny_checkpoint)]) == 0
    err = capsys.readouterr().err
    warning = "warning: 7 docid(s) of the run are missing from the corpus and are skipped (first: m0, m1, m2, m3, m4, ...)"
    assert warning in err
    assert err.index(warning) < err.index("rerank:")  # tqdm's bar ("rerank: ...") starts with the scoring
    rows = [line.split() for line in out.read_text().splitlines()]
    assert sorted((r[0], r[2]) for r in rows) == [("1", "d1"), ("1", "d2"), ("2", "d3")]
    assert sorted((r[0], r[3]) for r in rows) == [("1", "1"), ("1", "2"), ("2", "1")]  # ranks close up the gaps


def test_duplicate_run_rows_name_both_lines(tmp_path, tiny_checkpoint, capsys):
    lines = ["1 Q0 d1 1 20 bm25", "1 Q0 d2 2 19 bm25", "2 Q0 d1 1 18 bm25", "", "1 Q0 d1 3 17 bm25"]
    run, queries, corpus = _rerank_inputs(tmp_path, lines)
    out = tmp_path / "out.trec"
    rc = cli(["rerank", "--run", str(run), "--queries", str(queries), "--corpus", str(corpus), "--out", str(out),
              "--model", str(tiny_checkpoint)])
    assert rc == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {run}:5: field 'docid': duplicate (qid '1', docid 'd1') on lines 1 and 5. "
        "Fix: keep one line per (query, document)"
    )
    assert not out.exists()


# ====================================================================================== output directories
def test_sft_train_refuses_non_empty_output_dir_unless_overwrite(tmp_path, tiny_checkpoint, capsys, one_thread):
    groups = _write_jsonl(tmp_path / "groups.jsonl", [_group("capital of france"), _group("banana fruit")])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    rc, err = _sft_main(_sft_argv(tiny_checkpoint, groups, out), capsys)
    assert rc == 2
    assert err.strip() == (f"error: output_dir {out} exists and is not empty. Fix: choose a new --output_dir, pass "
                           "--resume_from_checkpoint to continue it, or --overwrite_output_dir true to write into it anyway.")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]

    rc, err = _sft_main(_sft_argv(tiny_checkpoint, groups, out, overwrite_output_dir="true"), capsys)
    assert rc == 0, err
    assert (out / "model.safetensors").is_file() and (out / "tsarank_config.json").is_file()
    assert (out / "keep.txt").read_text() == "precious"  # written into, not wiped


def test_demo_refuses_non_empty_out_unless_overwrite(tmp_path, shared_data, capsys):
    from tsarank.demo import STATE, prepare_out_dir

    out = tmp_path / "demo_out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli(["demo", "--out", str(out), "--data", str(shared_data)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {out} exists and is not empty. Fix: pass --resume to continue that run, --overwrite to "
        "start over (its contents are deleted), or choose another --out.")
    # --overwrite deletes only a demo's own output directory, never an unrelated one.
    assert cli(["demo", "--out", str(out), "--data", str(shared_data), "--overwrite"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --overwrite refused: {out} is not a demo output directory (no {STATE}); remove it yourself")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    # A previous demo's directory (it has demo_state.json) is emptied by --overwrite; --resume keeps it.
    (out / STATE).write_text(json.dumps({"done": {"weak_pairs": {}}}))
    prepare_out_dir(out, resume=True, overwrite=False)
    assert sorted(p.name for p in out.iterdir()) == ["demo_state.json", "notes.txt"]
    prepare_out_dir(out, resume=False, overwrite=True)
    assert out.is_dir() and list(out.iterdir()) == []


def test_demo_resume_refuses_another_scoring_head(tmp_path, shared_data, capsys):
    from tsarank.demo import STATE

    out = tmp_path / "demo_out"
    out.mkdir()
    done = {p: {} for p in ("weak_pairs", "cpt", "groups")}
    done["sft"] = {"checkpoint": str(out / "sft"), "scoring_head": "query_likelihood"}
    (out / STATE).write_text(json.dumps({"done": done}))
    assert cli(["demo", "--out", str(out), "--data", str(shared_data), "--resume", "--scoring-head", "last_token"]) == 2
    err = capsys.readouterr().err
    assert "trained the query_likelihood head, not last_token" in err and "--overwrite" in err
    assert json.loads((out / STATE).read_text())["done"] == done  # nothing of the earlier run touched
