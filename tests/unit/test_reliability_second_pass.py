"""Reliability, second pass (docs/reliability.md, "Second pass"): the cases found wrong, one test each, in process.

Resume and concurrent writers, output places checked before the work, options typed and ranged before any data or
model is read, the Python API checked like the CLI, what is a model, groups that repeat negatives, UTF-16 files.
Ctrl-C during `tsarank rerank` is in tests/integration/test_reliability.py (a real SIGINT in a subprocess).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from conftest import DATA, build_tiny_llama
from tsarank.cli import main as cli
from tsarank.inference import Ranker
from tsarank.training import cpt, sft

pytestmark = pytest.mark.usefixtures("one_thread")

DOCS = ["Paris is the capital and largest city of France.", "Bananas are an elongated edible fruit."]


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return build_tiny_llama(len(tiny_tokenizer))


@pytest.fixture()
def candidates(tmp_path) -> Path:
    """rank_llm JSON: two queries of three candidates each."""
    entries = []
    for qid, query in (("1", "capital of france"), ("2", "banana fruit")):
        hits = [{"qid": qid, "docid": f"d{qid}-{i}", "score": 3.0 - i, "content": text}
                for i, text in enumerate(DOCS + ["The mitochondria is the powerhouse of the cell."])]
        entries.append({"query": query, "hits": hits})
    path = tmp_path / "cands.json"
    path.write_text(json.dumps(entries))
    return path


def _groups(path: Path, negatives: int = 2) -> Path:
    rows = [{"query": f"query {i}", "positive_passages": [{"text": f"positive passage {i}"}],
             "negative_passages": [{"text": f"negative {i}-{j}"} for j in range(negatives)]} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sft_argv(model_dir, train_file, out, **extra) -> list[str]:
    opts = dict(model_name_or_path=model_dir, train_file=train_file, output_dir=out, train_group_size=3,
                max_doc_tokens=32, max_query_tokens=8, report_to="none", save_strategy="no", max_steps=1,
                per_device_train_batch_size=1, lambda_dp=0.0, dataloader_num_workers=0, logging_steps=1)
    opts.update(extra)
    return [x for k, v in opts.items() for x in (f"--{k}", str(v))]


# ------------------------------------------------------------------------------ 1. resume, concurrent writers
def test_resume_with_another_model_is_refused(candidates, tiny_checkpoint, tmp_path, capsys):
    from tsarank.cli import build_parser
    from tsarank.commands.rerank import run_options

    out = tmp_path / "run.trec"
    interrupted = ["rerank", "--candidates", str(candidates), "--model", str(tiny_checkpoint), "--chunk-docs", "3",
                   "--out", str(out)]
    Path(f"{out}.partial").write_text("")  # an interrupted run that had written nothing yet
    Path(f"{out}.partial.json").write_text(json.dumps(run_options(build_parser().parse_args(interrupted))))
    other = tmp_path / "other-model"
    other.mkdir()
    assert cli([*interrupted[:4], str(other), *interrupted[5:], "--resume", "--max-doc-tokens", "16"]) == 2
    err = capsys.readouterr().err
    assert "--resume with other options than the interrupted run" in err
    assert f"--model {str(tiny_checkpoint)!r} then, {str(other)!r} now" in err and "--max-doc-tokens None then" in err
    assert not out.exists() and Path(f"{out}.partial").exists()  # nothing of the interrupted run lost


def test_second_writer_of_the_same_out_stops_at_once(candidates, tiny_checkpoint, tmp_path, capsys):
    from tsarank.commands.rerank import OutputLock

    out = tmp_path / "run.trec"
    with OutputLock(out):  # a first `tsarank rerank --out run.trec`, still running
        assert cli(["rerank", "--candidates", str(candidates), "--model", str(tiny_checkpoint), "--out", str(out)]) == 2
        err = capsys.readouterr().err
    assert err.startswith("error: another tsarank rerank (pid ") and f"is writing {out}" in err
    assert not out.exists() and not Path(f"{out}.partial").exists() and not Path(f"{out}.lock").exists()
    assert cli(["rerank", "--candidates", str(candidates), "--model", str(tiny_checkpoint), "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 6 and not Path(f"{out}.lock").exists()


# ------------------------------------------------------------------------------ 2. output places, before the work
def test_unwritable_or_wrong_output_places_fail_before_the_work(candidates, tmp_path, capsys, tiny_checkpoint):
    scifact = DATA / "beir" / "scifact"
    # /sys refuses new files even to root; no model is loaded and no corpus read before the refusal.
    assert cli(["rerank", "--candidates", str(candidates), "--model", "./no/model/here", "--out", "/sys/run.trec"]) == 2
    assert capsys.readouterr().err.strip() == "error: --out: cannot write in /sys (Permission denied); choose another place"
    assert cli(["retrieve", "--corpus", str(scifact), "--out", "/sys/bm25.trec"]) == 2
    assert "cannot write in /sys" in capsys.readouterr().err
    assert cli(["rerank", "--candidates", str(candidates), "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path} is a directory" in capsys.readouterr().err
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    rc = sft.main(_sft_argv(tiny_checkpoint, _groups(tmp_path / "g.jsonl"), a_file))
    assert rc == 2 and f"--output_dir {a_file} is a file" in capsys.readouterr().err
    assert a_file.read_text() == "mine"
    rc = sft.main(_sft_argv(tiny_checkpoint, _groups(tmp_path / "g.jsonl"), "/sys/sft-run"))
    assert rc == 2 and "--output_dir: cannot write in /sys" in capsys.readouterr().err


# ------------------------------------------------------------------------------ 3. options, typed and ranged
@pytest.mark.parametrize("yaml_line, message", [
    ("max_steps: 2.5", "max_steps: expected an integer, got float 2.5"),
    ("learning_rate: fast", "learning_rate: expected a number, got str 'fast'"),
    ("per_device_train_batch_size: true", "per_device_train_batch_size: expected an integer, got bool True"),
    ("lr_scheduler_type: cosine_typo", "lr_scheduler_type:"),
])
def test_yaml_values_are_typed_strictly(yaml_line, message, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml_line + "\n")
    # The model path does not exist: an option error must come first, before any model or data is touched.
    rc = sft.main(["--config", str(config), "--model_name_or_path", "./no/model", "--train_file",
                   str(tmp_path / "missing.jsonl"), "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and f"{config}: {message}" in err, err


@pytest.mark.parametrize("flag, value, message", [
    ("--max_steps", "0", "--max_steps must be -1 (the epochs decide) or >= 1, got 0"),
    ("--per_device_train_batch_size", "0", "--per_device_train_batch_size must be >= 1, got 0"),
    ("--learning_rate", "-1e-4", "--learning_rate must be >= 0, got -0.0001"),
    ("--gradient_accumulation_steps", "0", "--gradient_accumulation_steps must be >= 1, got 0"),
])
def test_training_ranges_checked_before_loading(flag, value, message, tmp_path, capsys):
    for stage in (sft, cpt):
        rc = stage.main(["--model_name_or_path", "./no/model", "--train_file", str(tmp_path / "missing.jsonl"),
                         "--output_dir", str(tmp_path / "o"), f"{flag}={value}", "--report_to", "none"])
        err = capsys.readouterr().err
        assert rc == 2 and message in err, (stage.__name__, err)
        assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_device_cuda_without_cuda_is_one_line(candidates, tmp_path, capsys):
    assert cli(["rerank", "--candidates", str(candidates), "--device", "cuda", "--out", str(tmp_path / "r.trec")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --device: device 'cuda' asked for, but this machine has") and "\n" not in err
    with pytest.raises(ValueError, match="--device cpu"):
        Ranker.from_pretrained("default", device="cuda")


def test_unknown_stemmer_before_reading_the_corpus(tmp_path, capsys):
    assert cli(["retrieve", "--corpus", str(tmp_path / "no-such-corpus"), "--queries", str(tmp_path / "q.tsv"),
                "--stemmer", "klingon", "--out", str(tmp_path / "r.trec")]) == 2
    assert "unknown stemmer 'klingon'" in capsys.readouterr().err


# ------------------------------------------------------------------------------ 4. the Python API, as the CLI
def test_api_checks_like_the_cli(model, tiny_tokenizer):
    ranker = Ranker(model, tiny_tokenizer)
    with pytest.raises(TypeError, match="single string; pass \\[doc\\]"):
        ranker.score("capital of france", "Paris is the capital of France.")
    with pytest.raises(ValueError, match="top_k must be an int >= 1 or None, got -1"):
        ranker.rerank("capital of france", DOCS, top_k=-1)
    with pytest.raises(ValueError, match="top_k must be an int >= 1 or None, got 0"):
        ranker.rerank("capital of france", DOCS, top_k=0)
    with pytest.raises(TypeError, match=r"pairs\[1\] must be a \(query, doc\) pair, got str"):
        ranker.score_pairs([("q", "d"), "not a pair"])
    with pytest.raises(TypeError, match=r"pairs\[0\] must be a \(query, doc\) pair, got tuple"):
        ranker.score_pairs([("q", "d", "extra")])
    with pytest.raises(TypeError, match="single string"):
        ranker.score_pairs("q")
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        ranker.score_pairs([("q", "d")], batch_size=0)
    assert [i for i, _ in ranker.rerank("capital of france", DOCS, top_k=1)] == [ranker.rerank("capital of france",
                                                                                                 DOCS)[0][0]]


# ------------------------------------------------------------------------------ 5. what is a model
def test_what_is_a_model(tmp_path, tiny_checkpoint, capsys):
    with pytest.raises(FileNotFoundError, match="./no/such/checkpoint: no such directory"):
        Ranker.from_pretrained("./no/such/checkpoint")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json in this directory"):
        Ranker.from_pretrained(str(empty))
    encoder = tmp_path / "encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    with pytest.raises(ValueError, match="BertModel checkpoint, which tsarank cannot score. Supported: a causal LM"):
        Ranker.from_pretrained(str(encoder))
    groups = _groups(tmp_path / "g.jsonl")
    for path, message in ((empty, "no config.json in this directory"), (encoder, "BertModel checkpoint; both stages"),
                          (tmp_path / "typo", "no such directory")):
        rc = sft.main(_sft_argv(path, groups, tmp_path / "o"))
        err = capsys.readouterr().err
        assert rc == 2 and f"--model_name_or_path {path}" in err and message in err, err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ 6. groups that repeat negatives
def test_groups_with_too_few_negatives_are_reported_with_counts(tmp_path, caplog):
    path = _groups(tmp_path / "g.jsonl", negatives=1)
    with caplog.at_level(logging.WARNING, logger="tsarank.sft"):
        records, _ = sft.load_group_files([str(path)], group_size=8, loss="softmax")
    assert len(records) == 4
    assert ("4 of 4 groups have fewer than 7 distinct negatives (fewest: 1, median: 1); their groups of 8 repeat "
            "negatives") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tsarank.sft"):
        sft.load_group_files([str(path)], group_size=2, loss="softmax")
    assert "distinct negatives" not in caplog.text


# ------------------------------------------------------------------------------ 7. encodings
@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le"])
def test_utf16_files_get_the_utf16_fix(encoding, tmp_path, candidates, capsys):
    queries = tmp_path / "queries.tsv"
    queries.write_bytes("1\tcapital of france\n2\tbanana fruit\n".encode(encoding))  # utf-16 writes a BOM
    run, corpus = tmp_path / "bm25.trec", tmp_path / "corpus.tsv"
    run.write_text("1 Q0 d1 1 3.0 bm25\n")
    corpus.write_text("d1\tParis is the capital of France.\n")
    assert cli(["rerank", "--run", str(run), "--queries", str(queries), "--corpus", str(corpus), "--out",
                str(tmp_path / "r.trec")]) == 2
    err = capsys.readouterr().err
    assert "queries.tsv:1: expected UTF-8 text, got UTF-16" in err and "iconv -f utf-16 -t utf-8 queries.tsv" in err
    cands = tmp_path / "cands16.json"
    cands.write_bytes(candidates.read_text().encode(encoding))
    assert cli(["rerank", "--candidates", str(cands), "--out", str(tmp_path / "r.trec")]) == 2
    assert "cands16.json:1: expected UTF-8 text, got UTF-16" in capsys.readouterr().err


# ------------------------------------------------------------------------------ beyond the listed cases
class _RecordingTokenizer:
    """The real tokenizer, recording the longest text it is asked to tokenize."""

    def __init__(self, tokenizer):
        self._tok, self.longest = tokenizer, 0

    def __call__(self, text, *args, **kwargs):
        texts = [text] if isinstance(text, str) else list(text)
        pairs = args[0] if args and not isinstance(args[0], str) and args[0] is not None else []
        self.longest = max([self.longest, *map(len, texts), *map(len, pairs)])
        return self._tok(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


@pytest.mark.parametrize("style", ["tsarank", "rankinggpt"])
def test_one_document_costs_its_budget_not_its_length(style, model, tiny_tokenizer):
    from tsarank.prompts import PromptTemplate

    huge = "Paris is the capital and largest city of France. " * 200_000  # 10 million characters
    template = PromptTemplate.named(style, max_doc_tokens=32, max_query_tokens=16, max_length=None)
    recording = _RecordingTokenizer(tiny_tokenizer)
    got = Ranker(model, recording, template).score("capital of france", [huge])
    assert recording.longest <= 4096 + 200  # the tokenizer never saw more than the head of the text
    assert got == pytest.approx(Ranker(model, tiny_tokenizer, template).score("capital of france", [huge[:5000]]),
                                abs=1e-6)


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    """PyYAML reads `learning_rate: 1e-4` as the string '1e-4'; it is the number the flag would give."""
    config = tmp_path / "c.yaml"
    config.write_text("learning_rate: 1e-4\nmax_steps: 3\n")
    _, _, _, training_args = sft.parse_args(["--config", str(config), "--output_dir", str(tmp_path / "o"),
                                              "--model_name_or_path", "default", "--train_file", "x.jsonl"])
    assert training_args.learning_rate == 1e-4 and training_args.max_steps == 3
