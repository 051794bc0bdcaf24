"""Reliability, second pass (docs/reliability.md, "Second pass"): the cases found wrong, one test each, in process.

Resume and concurrent writers, output places checked before the work, options typed and ranged before any data or
model is read, the Python API checked like the CLI, what is a model, groups that repeat negatives, UTF-16 files.
Ctrl-C during `tsarank rerank` is in tests/integration/test_reliability.py (a real SIGINT in a subprocess).
"""

from __future__ import annotations

import json
import logging
import os
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
    import shutil

    other = tmp_path / "other-model"
    shutil.copytree(tiny_checkpoint, other)
    assert cli([*interrupted[:4], str(other), *interrupted[5:], "--resume", "--max-doc-tokens", "16"]) == 2
    err = capsys.readouterr().err
    assert "--resume with other options than the interrupted run" in err
    assert f"--model {str(tiny_checkpoint)!r} then, {str(other)!r} now" in err and "--max-doc-tokens None then" in err
    assert not out.exists() and Path(f"{out}.partial").exists()  # nothing of the interrupted run lost


def test_second_writer_of_the_same_out_stops_at_once(candidates, tiny_checkpoint, tmp_path, capsys):
    from tsarank.atomic import OutputLock

    out = tmp_path / "run.trec"
    with OutputLock(out, "tsarank rerank"):  # a first `tsarank rerank --out run.trec`, still running
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
    ("max_steps:", "max_steps: has no value"),  # YAML null used to reach the trainer: a TypeError traceback
    ("learning_rate:", "learning_rate: has no value"),
])
def test_yaml_values_are_typed_strictly(yaml_line, message, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml_line + "\n")
    # The model path does not exist: an option error must come first, before any model or data is touched.
    rc = sft.main(["--config", str(config), "--model_name_or_path", "./no/model", "--train_file",
                   str(tmp_path / "missing.jsonl"), "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and f"{config}:1: {message}" in err and "Traceback" not in err, err


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
    # ... before a line of the corpus is read (its second line is broken).
    inputs = _rerank_inputs_with_a_broken_corpus(tmp_path)
    assert cli(["rerank", *inputs, "--device", "cuda", "--out", str(tmp_path / "r.trec")]) == 2
    err = capsys.readouterr().err
    assert "--device: device 'cuda' asked for" in err and "corpus.tsv" not in err, err
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


def test_yaml_empty_value_is_none_only_where_the_default_is_none(tmp_path, capsys):
    """`validation_file:` (null) keeps meaning "none"; a key on a later line is named with its own line."""
    config = tmp_path / "c.yaml"
    config.write_text("# comment\nvalidation_file:\n\nmax_steps:\n")
    rc = sft.main(["--config", str(config), "--model_name_or_path", "./no/model", "--train_file",
                   str(tmp_path / "missing.jsonl"), "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and f"{config}:4: max_steps: has no value" in err and "validation_file" not in err, err


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    """PyYAML reads `learning_rate: 1e-4` as the string '1e-4'; it is the number the flag would give."""
    config = tmp_path / "c.yaml"
    config.write_text("learning_rate: 1e-4\nmax_steps: 3\n")
    _, _, _, training_args = sft.parse_args(["--config", str(config), "--output_dir", str(tmp_path / "o"),
                                              "--model_name_or_path", "default", "--train_file", "x.jsonl"])
    assert training_args.learning_rate == 1e-4 and training_args.max_steps == 3


# ------------------------------------------------------------------------------ the same classes, further cases
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_bf16_without_gpu_trains_on_cpu_and_negative_workers_are_option_errors(tmp_path, capsys):
    from tsarank.training.arguments import TsarankTrainingArguments

    # --bf16 on a machine without CUDA: bf16 autocast on the CPU (was a transformers ValueError traceback).
    args = TsarankTrainingArguments(output_dir=str(tmp_path / "o"), bf16=True, report_to="none")
    assert args.use_cpu and args.bf16 and args.device.type == "cpu"
    for stage in (sft, cpt):
        rc = stage.main(["--model_name_or_path", "./no/model", "--train_file", str(tmp_path / "missing.jsonl"),
                         "--output_dir", str(tmp_path / "o"), "--report_to", "none", "--dataloader_num_workers", "-1"])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: --dataloader_num_workers must be >= 0"), err
    assert not (tmp_path / "o").exists()


def test_weak_pairs_checks_its_place_first_and_leaves_nothing_when_it_fails(tmp_path, capsys):
    scifact = DATA / "beir" / "scifact"
    # /sys refuses new files: refused before the (5,183-document) corpus is read.
    assert cli(["data", "weak-pairs", "--corpus", str(scifact), "--out", "/sys/wp"]) == 2
    assert "--out: cannot write in /sys" in capsys.readouterr().err
    # A groups file that fails on its third line, after the directories were made: none of them is left behind.
    bad = tmp_path / "groups.jsonl"
    good = {"query": "q", "positive_passages": [{"text": "a long enough positive passage"}]}
    bad.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n" + '{"query": 3}\n')
    out = tmp_path / "new" / "wp"
    assert cli(["data", "weak-pairs", "--groups", str(bad), "--out", str(out)]) == 2
    assert f"{bad}:3" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_evaluate_plot_place_is_checked_before_reading_runs(tmp_path, capsys):
    missing_run = tmp_path / "no-such-run.trec"
    assert cli(["evaluate", "--run", str(missing_run), "--qrels", str(missing_run), "--compare", str(missing_run),
                "--plot", "/sys/deltas.png"]) == 2
    assert capsys.readouterr().err.strip() == "error: --plot: cannot write in /sys (Permission denied); choose another place"
    plot = tmp_path / "deltas.png"
    plot.write_bytes(b"mine")
    assert cli(["evaluate", "--run", str(missing_run), "--qrels", str(missing_run), "--compare", str(missing_run),
                "--plot", str(plot)]) == 2
    assert "refusing to overwrite existing" in capsys.readouterr().err and plot.read_bytes() == b"mine"


def test_groups_stemmer_is_checked_before_reading_the_corpus(tmp_path, capsys):
    assert cli(["data", "groups", "--corpus", str(tmp_path / "no-such-corpus"), "--queries", str(tmp_path / "q.tsv"),
                "--qrels", str(tmp_path / "qrels.txt"), "--stemmer", "klingon", "--out", str(tmp_path / "g.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "unknown stemmer 'klingon'" in err and "no-such-corpus" not in err


@pytest.mark.parametrize("argv, command", [
    (["retrieve", "--corpus", "C", "--out", "OUT"], "tsarank retrieve"),
    (["data", "groups", "--corpus", "C", "--qrels", "Q", "--out", "OUT"], "tsarank data groups"),
    (["data", "weak-pairs", "--corpus", "C", "--out", "OUT"], "tsarank data weak-pairs"),
])
def test_second_writer_stops_at_once_for_every_command(argv, command, tmp_path, capsys):
    from tsarank.atomic import OutputLock

    out = tmp_path / "out"
    argv = [str(out) if a == "OUT" else str(tmp_path / a) if a in ("C", "Q") else a for a in argv]
    with OutputLock(out, command):
        assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: another {command} (pid ") and f"is writing {out}" in err, err
    assert not Path(f"{out}.lock").exists() and not out.exists()


def test_second_training_run_into_one_output_dir_stops_before_loading(tmp_path, tiny_checkpoint, capsys):
    from tsarank.atomic import OutputLock

    out = tmp_path / "run"
    with OutputLock(out, "training run", flag="--output_dir"):
        rc = sft.main(_sft_argv(tiny_checkpoint, _groups(tmp_path / "g.jsonl"), out))
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: another training run (pid ") and "choose another --output_dir" in err
    assert not out.exists()


class _CtrlCAtStep:
    """Raise KeyboardInterrupt at the end of a given step: where a SIGINT lands in a long training loop."""

    def __init__(self, step: int) -> None:
        self.step = step

    def __getattr__(self, name):  # every other TrainerCallback event: nothing
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_ctrl_c_during_training_says_how_to_resume_and_resume_finishes(tmp_path, tiny_checkpoint, capsys):
    groups = _groups(tmp_path / "g.jsonl")
    out = tmp_path / "run"
    argv = _sft_argv(tiny_checkpoint, groups, out, max_steps=3, save_strategy="steps", save_steps=1)
    assert sft.main(argv, extra_callbacks=[_CtrlCAtStep(2)]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # The SIGINT landed after step 2's update, before its save: checkpoint-1 is the newest one on disk.
    assert (f"interrupted at step 2: the newest checkpoint is {out / 'checkpoint-1'}; run the same command with "
            "--resume_from_checkpoint true to continue from it") in err, err
    assert not Path(f"{out}.lock").exists()
    assert sft.main([*argv, "--resume_from_checkpoint", "true"]) == 0
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3
    # Interrupted before the first checkpoint: nothing to resume, and it says so.
    out2 = tmp_path / "run2"
    assert sft.main(_sft_argv(tiny_checkpoint, groups, out2, max_steps=3, save_strategy="steps", save_steps=2),
                    extra_callbacks=[_CtrlCAtStep(1)]) == 130
    assert "interrupted at step 1, before the first checkpoint (see --save_steps)" in capsys.readouterr().err


def test_ctrl_c_in_other_commands_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    import tsarank.retrieval

    def interrupted(*args, **kwargs):  # SIGINT arriving while BM25 runs
        raise KeyboardInterrupt

    monkeypatch.setattr(tsarank.retrieval, "bm25_retrieve", interrupted)
    out = tmp_path / "bm25.trec"
    assert cli(["retrieve", "--corpus", str(DATA / "beir" / "scifact"), "--qrels-split", "test", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "interrupted: tsarank retrieve stopped; no output was written" in err and "Traceback" not in err
    assert not out.exists() and not Path(f"{out}.lock").exists()


def test_api_takes_numpy_integers_and_checks_before_loading(model, tiny_tokenizer, tmp_path):
    import numpy as np

    import tsarank

    ranker = Ranker(model, tiny_tokenizer)
    assert ranker.rerank("capital of france", DOCS, top_k=np.int64(1)) == ranker.rerank("capital of france", DOCS)[:1]
    assert ranker.score("capital of france", DOCS, batch_size=np.int32(1)) == ranker.score("capital of france", DOCS)
    with pytest.raises(ValueError, match="top_k must be an int >= 1 or None, got 1.0"):
        ranker.rerank("capital of france", DOCS, top_k=1.0)
    # The bare string is refused before the (nonexistent) model would be looked for.
    with pytest.raises(TypeError, match="single string"):
        tsarank.score("capital of france", "one doc", model=str(tmp_path / "no-such-model"))


def test_resume_with_an_input_changed_since_is_refused(candidates, tiny_checkpoint, tmp_path, capsys):
    import os

    from tsarank.cli import build_parser
    from tsarank.commands.rerank import run_options

    out = tmp_path / "run.trec"
    argv = ["rerank", "--candidates", str(candidates), "--model", str(tiny_checkpoint), "--out", str(out)]
    Path(f"{out}.partial").write_text("")
    Path(f"{out}.partial.json").write_text(json.dumps(run_options(build_parser().parse_args(argv))))
    stat = candidates.stat()
    os.utime(candidates, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # edited since (same size even)
    assert cli([*argv, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--resume with other options than the interrupted run" in err and f"--candidates '{candidates} (" in err
    os.utime(candidates, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as it was: the resume goes on
    assert cli([*argv, "--resume"]) == 0 and len(out.read_text().splitlines()) == 6


def test_repeated_negatives_count_once(tmp_path, caplog):
    rows = [{"query": "q", "positive_passages": [{"text": "the positive"}],
             "negative_passages": [{"text": "the same negative"}] * 7}]
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n")
    with caplog.at_level(logging.WARNING, logger="tsarank.sft"):
        sft.load_group_files([str(path)], group_size=8, loss="softmax")
    assert "1 of 1 groups have fewer than 7 distinct negatives (fewest: 1, median: 1)" in caplog.text


def test_output_lock_follows_the_file_its_holder_replaced(tmp_path):
    """A waiter that opened OUT.lock just before the holder unlinked it must not think it holds the lock."""
    import fcntl

    from tsarank.atomic import OutputBusy, OutputLock

    out = tmp_path / "run.trec"
    stale = open(f"{out}.lock", "a+")  # opened, then the file is unlinked and replaced, as a finishing holder does
    Path(f"{out}.lock").unlink()
    with OutputLock(out, "tsarank rerank") as first:  # locks the new file at the path
        fcntl.flock(stale, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the stale inode is free: locking it proves nothing
        with pytest.raises(OutputBusy):
            OutputLock(out, "tsarank rerank").__enter__()
        assert first.fh is not None
    stale.close()


def test_init_from_an_encoder_and_a_hub_looking_typo(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    encoder = tmp_path / "encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    rc = sft.main(_sft_argv(tiny_checkpoint, _groups(tmp_path / "g.jsonl"), tmp_path / "o", init_from=encoder))
    err = capsys.readouterr().err
    assert rc == 2 and f"--init_from {encoder}" in err and "BertModel checkpoint; both stages" in err, err
    # `runs/sft` (run from another directory) looks like a Hub id ORG/NAME; offline, the message says both.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=f"nor is there a local directory {tmp_path / 'runs' / 'sft'}"):
        Ranker.from_pretrained("runs/sft")


def test_truncated_weights_are_one_line_naming_the_checkpoint(tmp_path, tiny_checkpoint, capsys):
    import shutil

    from tsarank.errors import ModelLoadError

    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # an interrupted copy
    with pytest.raises(ModelLoadError, match=f"{broken}: its weight files cannot be read .* truncated or corrupt"):
        Ranker.from_pretrained(str(broken))
    rc = sft.main(_sft_argv(broken, _groups(tmp_path / "g.jsonl"), tmp_path / "o"))
    err = capsys.readouterr().err
    assert rc == 2 and "its weight files cannot be read" in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_config_equals_form_is_read_and_retrieve_options_before_the_corpus(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("max_steps: 2.5\n")
    for argv in (["--config", str(config)], [f"--config={config}"]):  # `=` used to drop the whole config
        rc = sft.main([*argv, "--report_to", "none"])
        assert rc == 2 and f"{config}:1: max_steps: expected an integer, got float 2.5" in capsys.readouterr().err
    for flags, message in ((["--tag", "my run"], "--tag must be a non-empty word"),
                           (["--stopwords", "klingon"], "--stopwords 'klingon': not a bm25s stop-word list")):
        assert cli(["retrieve", "--corpus", str(tmp_path / "no-such-corpus"), "--queries", str(tmp_path / "q.tsv"),
                    *flags, "--out", str(tmp_path / "r.trec")]) == 2
        err = capsys.readouterr().err
        assert message in err and "no-such-corpus" not in err, err


@pytest.mark.parametrize("flags, message", [
    (["--model", "./tiyn"], "--model ./tiyn: no such directory"),
    (["--dtype", "fp64"], "--dtype: "),
    (["--attn-implementation", "sdpa2"], "--attn-implementation 'sdpa2': use one of auto, sdpa, eager, flash_attention_2"),
    (["--attn-implementation", "flash_attention_2", "--device", "cpu"], "--attn-implementation: attn_implementation="
                                                                          "'flash_attention_2' cannot run here"),
])
def test_rerank_model_options_are_checked_before_the_corpus_is_read(flags, message, tmp_path, capsys):
    """The corpus's last line is broken: an option error must come first, before a line of it is read."""
    corpus = tmp_path / "corpus.tsv"
    corpus.write_text("d1\tfine text\nd2 no tab here\n")
    (tmp_path / "q.tsv").write_text("1\tquery\n")
    (tmp_path / "run.trec").write_text("1 Q0 d1 1 1.0 bm25\n")
    assert cli(["rerank", "--run", str(tmp_path / "run.trec"), "--queries", str(tmp_path / "q.tsv"), "--corpus",
                str(corpus), *flags, "--out", str(tmp_path / "out.trec")]) == 2
    err = capsys.readouterr().err
    assert message in err and "corpus.tsv" not in err, err


def test_demo_output_lock_and_places(tmp_path, capsys):
    from tsarank.atomic import OutputLock

    out = tmp_path / "demo"
    with OutputLock(out.resolve(), "tsarank demo"):  # a first demo, still running
        assert cli(["demo", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: another tsarank demo (pid ") and "choose another --out" in err, err
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    assert cli(["demo", "--out", str(a_file)]) == 2
    assert f"--out {a_file} is a file" in capsys.readouterr().err and a_file.read_text() == "mine"
    assert cli(["demo", "--out", "/sys/demo"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: --out: cannot write in /sys (Permission denied); choose another place", err


@pytest.mark.parametrize("flag, value, message", [
    ("--max_train_samples", "0", "--max_train_samples must be >= 1 (or unset for all), got 0"),
    ("--max_doc_tokens", "0", "--max_doc_tokens must be >= 1, got 0"),
    ("--rank_eval_steps", "5", "rank_eval_steps > 0 needs rank_eval_candidates and rank_eval_qrels"),
    ("--rank_eval_steps", "-1", "--rank_eval_steps must be >= 0 (0 = off), got -1"),
    ("--lora_dropout", "1.5", "--lora_dropout must be in [0, 1), got 1.5"),
    ("--eval_strategy", "steps", "eval_strategy='steps' needs --validation_file"),
])
def test_more_training_ranges_before_loading(flag, value, message, tmp_path, capsys, tiny_checkpoint):
    for stage in (sft, cpt):
        rc = stage.main(["--model_name_or_path", str(tiny_checkpoint), "--train_file", str(_groups(tmp_path / "g.jsonl")),
                         "--output_dir", str(tmp_path / "o"), "--report_to", "none", flag, value])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and "Traceback" not in err, (stage.__name__, err)
    assert not (tmp_path / "o").exists()
    rc = sft.main(["--model_name_or_path", "./m", "--train_group_size", "1", "--report_to", "none"])
    assert rc == 2 and "--train_group_size must be >= 2" in capsys.readouterr().err


def test_utf16_yaml_config_gets_the_utf16_fix(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("max_steps: 2\n", encoding="utf-16")
    assert sft.main(["--config", str(config)]) == 2
    assert f"{config}: expected UTF-8 text, got UTF-16" in capsys.readouterr().err


def test_api_budgets_and_the_shared_trunk_are_checked_like_the_cli(model, tiny_tokenizer, tiny_checkpoint):
    from tsarank.shared_trunk import score_pairs_shared

    for kw, message in (({"max_doc_tokens": 0}, "max_doc_tokens must be an int >= 1"),
                        ({"max_doc_tokens": 2.5}, "max_doc_tokens must be an int >= 1"),
                        ({"max_tokens": 0}, "max_tokens must be an int >= 1")):
        with pytest.raises(ValueError, match=message):
            Ranker.from_pretrained(str(tiny_checkpoint), **kw)
    with pytest.raises(ValueError, match="max_tokens must be an int >= 1"):
        Ranker(model, tiny_tokenizer, max_tokens=-5)
    ranker = Ranker(model, tiny_tokenizer)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        score_pairs_shared([ranker], [("q", "d")], batch_size=0)
    with pytest.raises(TypeError, match="single string"):
        score_pairs_shared([ranker], "q")
    with pytest.raises(ValueError, match="query"):
        score_pairs_shared([ranker], [("", "d")])
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        ranker.score_encoded(ranker.encode(["q"], ["d"]), batch_size=0)
    assert score_pairs_shared([ranker], [("q", "d")])[0][0][0] == pytest.approx(ranker.score("q", ["d"])[0], abs=1e-5)


def test_evaluate_plot_format_and_rel_level_before_the_work(tmp_path, capsys):
    qrels = DATA / "trec-dl-passage" / "qrels.dl19-passage.txt"
    run = tmp_path / "r.trec"
    run.write_text("19335 Q0 1017759 1 1.0 t\n")
    assert cli(["evaluate", "--run", str(run), "--qrels", str(qrels), "--compare", str(run), "--plot",
                str(tmp_path / "p.txt")]) == 2
    assert "--plot" in (err := capsys.readouterr().err) and ".txt is not an image format" in err and ".png" in err
    assert not (tmp_path / "p.txt").exists()
    for level, message in (("0", "--rel-level must be >= 1"), ("99", "--rel-level 99: no judgment in")):
        assert cli(["evaluate", "--run", str(run), "--qrels", str(qrels), "--rel-level", level]) == 2
        assert message in capsys.readouterr().err
    assert cli(["evaluate", "--run", str(run), "--qrels", str(qrels), "--rel-level", "3"]) == 0


def test_unwritable_tsarank_home_is_one_line(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for home in ("/sys/tsarank-home", str(a_file / "home")):
        monkeypatch.setenv("TSARANK_HOME", home)
        assert cli(["default-model"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: cannot build the default model in TSARANK_HOME={home}") and "\n" == err[-1]
        assert err.count("\n") == 1, err


@pytest.mark.parametrize("flags, message", [
    (["--output", "/sys/t.jsonl"], "--output: cannot write in /sys"),
    (["--max-groups", "0"], "--max-groups must be >= 1, got 0"),
    (["--max-tokens", "0"], "--max-tokens must be >= 1, got 0"),
    (["--model", "./typo"], "--model ./typo: no such directory"),
])
def test_add_teacher_scores_checks_before_reading_or_loading(flags, message, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("add_teacher_scores", Path(__file__).parents[2] / "scripts" / "add_teacher_scores.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    bad_input = tmp_path / "g.jsonl"
    bad_input.write_text("not json\n")  # would be the error if the input were read first
    argv = {"--model": str(tmp_path / "no-model"), "--input": str(bad_input), "--output": str(tmp_path / "o.jsonl")}
    for k in range(0, len(flags), 2):
        argv[flags[k]] = flags[k + 1]
    if "--model" not in flags:
        argv["--model"] = "default"
    assert script.main([x for kv in argv.items() for x in kv]) == 2
    err = capsys.readouterr().err
    assert message in err and "g.jsonl" not in err, err


def test_rankinggpt_max_length_that_leaves_no_document_is_refused(model, tiny_tokenizer, tmp_path, capsys):
    from tsarank.prompts import PromptTemplate

    with pytest.raises(ValueError, match="max_length 3 leaves no room for the document"):
        Ranker(model, tiny_tokenizer, PromptTemplate.named("rankinggpt", max_length=3))  # before any scoring
    # A named template's budgets are checked with the other options, before any input is read.
    assert cli(["rerank", "--candidates", str(tmp_path / "missing.json"), "--template", "tsarank", "--max-length",
                "512", "--out", str(tmp_path / "o.trec")]) == 2
    err = capsys.readouterr().err
    assert "max_length" in err and "missing.json" not in err, err


# ------------------------------------------------------------------------------ the last review's cases
def _rerank_inputs_with_a_broken_corpus(tmp_path: Path) -> list[str]:
    corpus = tmp_path / "corpus.tsv"
    corpus.write_text("d1\tfine text\nd2 no tab here\n")
    (tmp_path / "q.tsv").write_text("1\tquery\n")
    (tmp_path / "run.trec").write_text("1 Q0 d1 1 1.0 bm25\n")
    return ["--run", str(tmp_path / "run.trec"), "--queries", str(tmp_path / "q.tsv"), "--corpus", str(corpus)]


def test_checkpoint_template_budgets_and_tokenizer_checked_before_inputs(tmp_path, tiny_checkpoint, capsys):
    """A checkpoint's own template (its sidecar says rankinggpt) meets --max-length before the corpus is read; a
    checkpoint without tokenizer files is one line naming it, in rerank, the API and both training stages."""
    import shutil

    from tsarank.hub import save_tsarank_config
    from tsarank.prompts import PromptTemplate

    own = tmp_path / "own"
    shutil.copytree(tiny_checkpoint, own)
    save_tsarank_config(own, PromptTemplate.named("rankinggpt"))
    inputs = _rerank_inputs_with_a_broken_corpus(tmp_path)
    assert cli(["rerank", *inputs, "--model", str(own), "--max-length", "3", "--out", str(tmp_path / "o.trec")]) == 2
    err = capsys.readouterr().err
    assert "max_length 3" in err and "corpus.tsv" not in err and "Traceback" not in err, err

    bare = tmp_path / "bare"
    shutil.copytree(tiny_checkpoint, bare)
    for f in bare.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            f.unlink()
    assert cli(["rerank", *inputs, "--model", str(bare), "--out", str(tmp_path / "o.trec")]) == 2
    err = capsys.readouterr().err
    assert f"{bare}: no tokenizer files" in err and "corpus.tsv" not in err and "Traceback" not in err, err
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        Ranker.from_pretrained(str(bare))
    rc = sft.main(_sft_argv(bare, _groups(tmp_path / "g.jsonl"), tmp_path / "o-sft"))
    err = capsys.readouterr().err
    assert rc == 2 and f"--model_name_or_path {bare}: no tokenizer files" in err and "Traceback" not in err, err
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"text": "some passage text", "query": "a query"}\n')
    rc = cpt.main(["--model_name_or_path", str(bare), "--train_file", str(pairs), "--output_dir",
                   str(tmp_path / "o-cpt"), "--report_to", "none", "--max_steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "no tokenizer files" in err and "Traceback" not in err, err
    assert not (tmp_path / "o-sft").exists() and not (tmp_path / "o-cpt").exists()
    # The frozen reference needs no tokenizer of its own (the policy's is used).
    from tsarank.training.model_setup import check_model_source

    check_model_source(str(bare), "ref_model_name_or_path", needs_tokenizer=False)


@pytest.mark.parametrize("flag", ["--min-chars", "--min-text-tokens", "--min-query-chars"])
def test_weak_pairs_length_filters_are_range_checked(flag, tmp_path, capsys):
    groups = _groups(tmp_path / "g.jsonl")
    out = tmp_path / "pairs"
    assert cli(["data", "weak-pairs", "--groups", str(groups), "--out", str(out), flag, "-1"]) == 2
    err = capsys.readouterr().err
    assert f"{flag} must be a whole number >= 0, got -1" in err, err
    assert not out.exists()


def test_two_config_flags_are_refused(tmp_path, capsys):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("max_steps: 1\n")
    b.write_text("max_steps: 2\n")
    for stage in (sft, cpt):
        for argv in (["--config", str(a), "--config", str(b)], [f"--config={a}", "--config", str(b)]):
            assert stage.main([*argv, "--report_to", "none"]) == 2
            assert "--config is given more than once" in capsys.readouterr().err


class _DtypeProbe(_CtrlCAtStep):
    """Record the dtype the first decoder layer's MLP computes in during training (bf16 under CPU autocast)."""

    def __init__(self) -> None:
        super().__init__(step=-1)
        self.dtypes: set[torch.dtype] = set()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        layer = next(m for name, m in model.named_modules() if name.endswith("layers.0.mlp"))
        layer.register_forward_hook(lambda mod, inp, out: self.dtypes.add(out.dtype))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
@pytest.mark.parametrize("bf16, expected", [("true", torch.bfloat16), ("false", torch.float32)])
def test_bf16_on_cpu_really_computes_in_bf16_with_fp32_weights(bf16, expected, tmp_path, tiny_checkpoint):
    probe = _DtypeProbe()
    argv = _sft_argv(tiny_checkpoint, _groups(tmp_path / "g.jsonl"), tmp_path / "o", bf16=bf16)
    assert sft.main(argv, extra_callbacks=[probe]) == 0
    assert probe.dtypes == {expected}
    # The master weights stay fp32 (autocast, not a bf16 model).
    from safetensors import safe_open

    with safe_open(str(tmp_path / "o" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


def test_ctrl_c_stops_the_running_demo_phase_and_resume_skips_finished_ones(tmp_path, capsys, monkeypatch):
    import signal
    import threading

    from tsarank import demo

    # 1. A SIGINT while a phase's subprocess runs: the child is stopped, not left writing behind the prompt.
    pid_file = tmp_path / "child.pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    main = threading.get_ident()

    def interrupt_when_child_started():
        for _ in range(600):
            if pid_file.is_file() and pid_file.read_text():
                break
            threading.Event().wait(0.05)
        signal.pthread_kill(main, signal.SIGINT)

    # Python's own SIGINT handler, as in a terminal (a library imported by an earlier test may have replaced it).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=interrupt_when_child_started, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            demo._run_logged([demo.sys.executable, "-c", child], tmp_path / "logs" / "x.log", 5, "x")
    finally:
        signal.signal(signal.SIGINT, previous)
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)

    # 2. Ctrl-C in the demo's second phase: exit 130, the first phase (run for real) is kept and --resume skips it.
    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo.Demo, "phase_cpt", interrupted)
    out = tmp_path / "demo"
    argv = ["demo", "--data", str(DATA), "--out", str(out)]
    assert cli(argv) == 130
    captured = capsys.readouterr()
    assert f"interrupted: the finished phases are kept in {out}; run the same command with --resume" in captured.err
    assert "Traceback" not in captured.err and (out / "data" / "weak_pairs" / "train.jsonl").is_file()
    assert cli([*argv, "--resume"]) == 130
    assert "[demo] weak_pairs: done earlier, skipped (--resume)" in capsys.readouterr().out


# ------------------------------------------------------------------------------ the third review's cases
def test_checkpoints_missing_or_corrupt_files_are_one_line_naming_them(tmp_path, tiny_checkpoint, capsys):
    """Only tokenizer_config.json left, no weights, a corrupt config.json or tokenizer.json: one line naming the
    file, before the corpus is read (rerank) or anything loads (training, API)."""
    import shutil

    def variant(name, drop=(), corrupt=None):
        d = tmp_path / name
        shutil.copytree(tiny_checkpoint, d)
        for f in list(d.iterdir()):
            if f.name in drop or (drop == "tokenizer" and f.name != "tokenizer_config.json"
                                  and f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges"))):
                f.unlink()
        if corrupt:
            (d / corrupt).write_text('{"vocab_size": 384, oops')
        return d

    inputs = _rerank_inputs_with_a_broken_corpus(tmp_path)
    cases = [
        (variant("config-only-tokenizer", drop="tokenizer"), "no tokenizer files"),
        (variant("no-weights", drop=("model.safetensors",)), "no weight files"),
        (variant("bad-config", corrupt="config.json"), "config.json: not valid JSON"),
    ]
    for model, message in cases:
        assert cli(["rerank", *inputs, "--model", str(model), "--out", str(tmp_path / "o.trec")]) == 2
        err = capsys.readouterr().err
        assert message in err and "corpus.tsv" not in err and "Traceback" not in err, (model, err)
        rc = sft.main(_sft_argv(model, _groups(tmp_path / "g.jsonl"), tmp_path / "o-sft"))
        err = capsys.readouterr().err
        assert rc == 2 and message in err and "Traceback" not in err, (model, err)
        with pytest.raises(OSError, match=message.split(":")[-1].strip()):
            Ranker.from_pretrained(str(model))
    # A corrupt tokenizer.json: named before the corpus is read or any weights load, in every entry point.
    bad_tok = variant("bad-tokenizer", corrupt="tokenizer.json")
    for template in ([], ["--template", "rankinggpt"]):
        assert cli(["rerank", *inputs, "--model", str(bad_tok), *template, "--out", str(tmp_path / "o.trec")]) == 2
        err = capsys.readouterr().err
        assert f"{bad_tok / 'tokenizer.json'}: not valid JSON" in err and "corpus.tsv" not in err, err
    rc = sft.main(_sft_argv(bad_tok, _groups(tmp_path / "g.jsonl"), tmp_path / "o-sft"))
    err = capsys.readouterr().err
    assert rc == 2 and "tokenizer.json: not valid JSON" in err and "Traceback" not in err, err
    with pytest.raises(OSError, match="tokenizer.json: not valid JSON"):
        Ranker.from_pretrained(str(bad_tok))
    # Only a last-token head left (no model weights): the head file is not the model.
    head_only = variant("head-only", drop=("model.safetensors",))
    (head_only / "tsarank_head.safetensors").write_bytes((tiny_checkpoint / "model.safetensors").read_bytes()[:64])
    rc = sft.main(_sft_argv(head_only, _groups(tmp_path / "g.jsonl"), tmp_path / "o-sft"))
    err = capsys.readouterr().err
    assert rc == 2 and "no weight files" in err and "Traceback" not in err, err
    # A LoRA adapter directory without its weights.
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_checkpoint),
                                                             "peft_type": "LORA", "task_type": "CAUSAL_LM"}))
    assert cli(["rerank", *inputs, "--model", str(adapter), "--out", str(tmp_path / "o.trec")]) == 2
    err = capsys.readouterr().err
    assert "without adapter_model.safetensors" in err and "corpus.tsv" not in err, err
    # The default model has no last-token head either.
    assert cli(["rerank", *inputs, "--template", "rankllama", "--out", str(tmp_path / "o.trec")]) == 2
    err = capsys.readouterr().err
    assert "the default model has none" in err and "corpus.tsv" not in err, err
    # A last-token template on a checkpoint with no trained head: refused before the corpus is read.
    assert cli(["rerank", *inputs, "--model", str(tiny_checkpoint), "--template", "rankllama", "--out",
                str(tmp_path / "o.trec")]) == 2
    err = capsys.readouterr().err
    assert "has no trained last-token head" in err and "corpus.tsv" not in err, err


@pytest.mark.parametrize("flag, value", [("--lambda_gen", "nan"), ("--max_grad_norm", "nan"),
                                         ("--warmup_steps", "nan"), ("--learning_rate", "inf"),
                                         ("--weight_decay", "nan"), ("--temperature", "inf")])
def test_nan_and_inf_options_are_refused_before_loading(flag, value, tmp_path, capsys):
    """`x < 0` is false for NaN: --lambda_gen nan trained with L_gen silently off, --max_grad_norm nan without
    clipping, --warmup_steps nan crashed after the model loaded."""
    rc = sft.main(["--model_name_or_path", "./no/model", "--train_file", str(tmp_path / "missing.jsonl"),
                   "--output_dir", str(tmp_path / "o"), "--report_to", "none", flag, value])
    err = capsys.readouterr().err
    assert rc == 2 and f"{flag} must be a finite number, got {value}" in err and "Traceback" not in err, err
    config = tmp_path / "c.yaml"
    config.write_text(f"{flag[2:]}: .{value}\n")  # YAML's .nan / .inf
    rc = sft.main(["--config", str(config), "--model_name_or_path", "./no/model", "--train_file",
                   str(tmp_path / "missing.jsonl"), "--output_dir", str(tmp_path / "o"), "--report_to", "none"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{config}:1: {flag} must be a finite number" in err, err


@pytest.mark.parametrize("text, message", [
    ("max_steps: 1\n1: 2\n", ":2: 1 is not an option name"),
    ("true: 3\n", ":1: True is not an option name"),
    ("max_steps: 1\nmax_steps: 2\n", ":2: 'max_steps' is given twice (first on line 1)"),
    ("max_steps: 1\n  bad: [\n", ":2: invalid YAML (mapping values are not allowed here)"),
])
def test_odd_yaml_keys_are_one_line_with_file_and_line(text, message, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    assert sft.main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{config}{message}" in err and "Traceback" not in err and err.count("\n") == 1, err


def test_yaml_merge_keys_work_as_yaml_says(tmp_path):
    """`<<: {learning_rate: 3}` merges (a traceback for a moment during the third review's fixes)."""
    from tsarank.training.arguments import TsarankTrainingArguments, parse_stage_args

    config = tmp_path / "c.yaml"
    config.write_text("max_steps: 1\n<<: {learning_rate: 3}\n")
    (args,) = parse_stage_args([TsarankTrainingArguments], ["--config", str(config), "--output_dir", str(tmp_path)])
    assert args.learning_rate == 3.0 and args.max_steps == 1


def test_api_refuses_a_dict_of_documents(model, tiny_tokenizer):
    """Iterating a dict gives its keys: `score(q, {"d1": "Paris..."})` scored the id "d1"."""
    from tsarank.prompts import PromptTemplate

    ranker = Ranker(model, tiny_tokenizer, PromptTemplate())
    with pytest.raises(TypeError, match="got a dict; pass list"):
        ranker.score("capital of france", {"d1": DOCS[0]})
    with pytest.raises(TypeError, match="got a dict"):
        ranker.rerank("capital of france", {"d1": DOCS[0]})
    with pytest.raises(TypeError, match="got a dict"):
        ranker.score_pairs({"capital of france": DOCS[0]})
    import pandas as pd

    with pytest.raises(TypeError, match="got a DataFrame"):  # iterating it gives the column names
        ranker.score("capital of france", pd.DataFrame({"text": DOCS}))
    with pytest.raises(TypeError, match="got a set"):
        ranker.score("capital of france", set(DOCS))
    assert ranker.score("capital of france", pd.Series(DOCS)) == ranker.score("capital of france", DOCS)


def test_retrieve_k1_inf_and_empty_devices_are_refused(tmp_path, capsys):
    assert cli(["retrieve", "--corpus", str(tmp_path / "no-such-corpus"), "--queries", str(tmp_path / "q.tsv"),
                "--k1", "inf", "--out", str(tmp_path / "bm25.trec")]) == 2
    err = capsys.readouterr().err
    assert "--k1 must be a finite number > 0" in err and "no-such-corpus" not in err, err
    for devices, message in (("", "--devices '': name at least one device"),
                             ("cuda:0", "--devices: device 'cuda:0' asked for")):
        assert cli(["rerank", "--candidates", str(tmp_path / "c.json"), "--devices", devices, "--out",
                    str(tmp_path / "r.trec")]) == 2
        err = capsys.readouterr().err
        assert message in err, err
