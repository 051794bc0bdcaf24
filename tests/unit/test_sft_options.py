"""Stage 2 (tsarank train sft) option and data checks that run before any model is loaded (seconds, no model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tsarank.errors import DataError
from tsarank.prompts import PromptTemplate
from tsarank.training import sft

ROOT = Path(__file__).resolve().parents[2]


def _group(query="q", negatives=2, teacher=False):
    rec = {"query": query, "positive_passages": [{"docid": "p", "text": "positive text"}],
           "negative_passages": [{"docid": f"n{i}", "text": f"negative {i}"} for i in range(negatives)]}
    if teacher:
        rec["teacher_scores"] = [1.0] + [0.0] * negatives
    return rec


def _write(path: Path, records, blank_after_first=False) -> Path:
    lines = [json.dumps(r) for r in records]
    if blank_after_first:
        lines.insert(1, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_several_train_files_and_counts(tmp_path):
    a = _write(tmp_path / "a.jsonl", [_group("a1"), _group("a2")])
    b = _write(tmp_path / "b.jsonl", [_group("b1", teacher=True)])
    records, counts = sft.load_group_files([str(a), str(b)], group_size=3, loss="softmax")
    assert [r["query"] for r in records] == ["a1", "a2", "b1"]
    assert counts == {str(a): 2, str(b): 1}
    assert records[2]["teacher_scores"] is None  # dropped: the softmax loss does not use them
    # max_train_samples stops across files.
    records, _ = sft.load_group_files([str(a), str(b)], group_size=3, loss="softmax", max_train_samples=2)
    assert len(records) == 2


def test_train_file_comma_list():
    args = sft.DataArguments(train_file=" a.jsonl , b.jsonl")
    assert sft.train_files(args) == ["a.jsonl", "b.jsonl"]
    with pytest.raises(sft.OptionError, match="empty entry"):
        sft.train_files(sft.DataArguments(train_file="a.jsonl,,b.jsonl"))
    with pytest.raises(sft.OptionError, match="--train_file"):
        sft.train_files(sft.DataArguments(train_file=None))


def test_distill_without_teacher_names_file_and_line(tmp_path):
    path = _write(tmp_path / "g.jsonl", [_group("x", teacher=True), _group("y")], blank_after_first=True)
    with pytest.raises(DataError) as info:
        sft.load_group_files([str(path)], group_size=3, loss="distill_kl")
    assert (info.value.path, info.value.line, info.value.field) == (str(path), 3, "teacher_scores")
    assert "add_teacher_scores.py" in str(info.value)


def test_missing_negatives_names_file_and_line(tmp_path):
    path = _write(tmp_path / "g.jsonl", [_group("x"), _group("y", negatives=0)])
    with pytest.raises(DataError) as info:
        sft.load_group_files([str(path)], group_size=4, loss="softmax")
    assert (info.value.line, info.value.field) == (2, "negative_passages")
    # Group size 1 needs no negatives.
    assert len(sft.load_group_files([str(path)], group_size=1, loss="softmax")[0]) == 2


def _main_err(argv, capsys) -> tuple[int, str]:
    rc = sft.main(argv)
    return rc, capsys.readouterr().err


@pytest.fixture()
def gfile(tmp_path):
    return _write(tmp_path / "groups.jsonl", [_group("x")])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dp_span", "tokens"], "dp_span must be one of ('all', 'query'), got 'tokens'"),
        (["--score_transform", "sigmoid"], "score_transform must be 'prob'"),
        (["--loss", "softmaxx"], "softmax"),
        (["--use_lora", "true", "--train_top_layers", "2"], "use_lora and train_top_layers are both set"),
        (["--train_group_size", "0"], "train_group_size must be >= 2"),
        (["--temperature", "0"], "temperature and distill_temperature must be > 0"),
        (["--scoring_head", "last_token", "--score_transform", "prob"], "exp(score)/tau explodes"),
        (["--no_such_option", "1"], "unknown option 'no_such_option'"),
        (["--ref_model_name_or_path", "./nowhere/model"], "no such directory"),
    ],
)
def test_contradictory_options_fail_before_loading(gfile, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    rc, err = _main_err(["--model_name_or_path", "default", "--train_file", str(gfile), "--output_dir", str(out),
                         "--report_to", "none", *extra], capsys)
    assert rc == 2
    assert message in err
    assert not out.exists()


def test_init_from_lora_adapter_dir_points_to_merged(gfile, tmp_path, capsys):
    adapter = tmp_path / "run1"
    (adapter / "merged").mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "merged" / "config.json").write_text("{}")
    rc, err = _main_err(["--train_file", str(gfile), "--output_dir", str(tmp_path / "o"), "--init_from", str(adapter),
                         "--report_to", "none"], capsys)
    assert rc == 2 and "LoRA adapter directory" in err and str(adapter / "merged") in err


def test_non_empty_output_dir_is_refused(gfile, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    rc, err = _main_err(["--train_file", str(gfile), "--output_dir", str(out), "--report_to", "none"], capsys)
    assert rc == 2 and "--overwrite_output_dir" in err


def test_templates():
    data = sft.DataArguments(max_doc_tokens=100, max_query_tokens=20)
    assert data.prompt_template("last_token") == PromptTemplate.last_token(max_doc_tokens=100, max_query_tokens=20)
    assert data.prompt_template() == PromptTemplate(max_doc_tokens=100, max_query_tokens=20)
    with pytest.raises(sft.OptionError, match="template"):
        sft.DataArguments(template_source="no placeholder").prompt_template()
    # Named templates get the run's budgets (and no evaluation-time total budget).
    named = sft.DataArguments(template="rankinggpt", max_doc_tokens=128, max_query_tokens=32).prompt_template()
    assert named == PromptTemplate.named("rankinggpt", max_doc_tokens=128, max_query_tokens=32, max_length=None)
    with pytest.raises(sft.OptionError, match="--scoring_head last_token"):
        sft.DataArguments(template="rankllama").prompt_template()
    with pytest.raises(sft.OptionError, match="one or the other"):
        sft.DataArguments(template="rankinggpt", template_source="Passage: {doc} Q:").prompt_template()


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "sft" / "configs").glob("*.yaml")))
def test_example_configs_parse_and_validate(config, tmp_path):
    """Every example config uses only known options, and they are consistent with each other."""
    import dataclasses

    model_args, data_args, sft_args, training_args = sft.parse_args(
        # bf16 is refused by TrainingArguments on a CPU-only machine; the GPU configs are checked without it.
        ["--config", str(ROOT / "sft" / "configs" / config), "--output_dir", str(tmp_path / "o"), "--bf16", "false",
         "--tf32", "false", "--deepspeed", ""]
    )
    # The configs name checkpoints that only exist after earlier runs; the option checks do not need them.
    model_args = dataclasses.replace(model_args, model_name_or_path="default")
    sft_args = dataclasses.replace(sft_args, init_from=None)
    loss_config, template = sft.validate_options(model_args, data_args, sft_args, training_args)
    assert training_args.remove_unused_columns is False
    assert loss_config.group_size == sft_args.train_group_size
    if config == "paper_recipe.yaml":
        assert (sft_args.train_group_size, sft_args.temperature, training_args.learning_rate) == (48, 0.001, 3e-5)
        assert str(getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)) == "cosine"
        assert training_args.warmup_steps == 0.03 and training_args.get_warmup_steps(1000) == 30
        assert (template.max_query_tokens, template.max_doc_tokens) == (32, 128)
        assert model_args.train_top_layers > 0
