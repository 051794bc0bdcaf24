"""Training from Hugging Face ``datasets`` (--dataset_name / --dataset_config / --dataset_split), offline: a
DatasetDict saved to disk and a Parquet file, with the real ``datasets`` library. A dataset trains exactly like the
same rows given as --train_file; bad rows are named by dataset, split and row before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tsarank.training import cpt, sft

pytestmark = pytest.mark.usefixtures("one_thread")

GROUPS = [{"query_id": str(i), "query": f"query number {i}",
           "positive_passages": [{"docid": f"p{i}", "title": "", "text": f"positive passage {i} about topic {i}"}],
           "negative_passages": [{"docid": f"n{i}{j}", "title": "t", "text": f"negative {i}-{j}"} for j in range(3)]}
          for i in range(4)]
PAIRS = [{"text": f"a passage about subject {i} and more words", "query": f"subject {i}"} for i in range(6)]


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TSARANK_HOME", str(tmp_path / "home"))  # the JSON Lines copies go here


def _common(model, out) -> list[str]:
    return ["--model_name_or_path", str(model), "--output_dir", str(out), "--max_steps", "2", "--logging_steps", "1",
            "--save_strategy", "no", "--report_to", "none", "--bf16", "false", "--seed", "3",
            "--per_device_train_batch_size", "2", "--max_doc_tokens", "24", "--max_query_tokens", "8",
            "--dataloader_num_workers", "0"]


def _losses(out: Path) -> list[float]:
    rows = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [r["loss"] for r in rows if "loss" in r and "train_loss" not in r]


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sft_from_a_saved_dataset_trains_like_the_same_rows_as_a_file(tmp_path, tiny_checkpoint):
    import datasets

    saved = tmp_path / "groups_ds"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(GROUPS),
                          "dev": datasets.Dataset.from_list(GROUPS[:1])}).save_to_disk(str(saved))
    extra = ["--train_group_size", "3", "--lambda_dp", "0"]
    assert sft.main([*_common(tiny_checkpoint, tmp_path / "a"), *extra, "--dataset_name", str(saved)]) == 0
    assert sft.main([*_common(tiny_checkpoint, tmp_path / "b"), *extra,
                     "--train_file", str(_jsonl(tmp_path / "g.jsonl", GROUPS))]) == 0
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b") and len(_losses(tmp_path / "a")) == 2


def test_cpt_from_parquet_trains_like_the_same_rows_as_a_file(tmp_path, tiny_checkpoint):
    import datasets

    parquet = tmp_path / "pairs.parquet"
    datasets.Dataset.from_list(PAIRS).to_parquet(str(parquet))
    assert cpt.main([*_common(tiny_checkpoint, tmp_path / "a"), "--dataset_name", str(parquet)]) == 0
    assert cpt.main([*_common(tiny_checkpoint, tmp_path / "b"), "--train_file",
                     str(_jsonl(tmp_path / "p.jsonl", PAIRS))]) == 0
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")


def test_bad_rows_and_options_are_named_before_loading(tmp_path, tiny_checkpoint, capsys):
    import datasets

    rows = [dict(g) for g in GROUPS]
    rows[2] = {**rows[2], "query": ""}
    saved = tmp_path / "bad_ds"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(saved))
    base = [*_common(tiny_checkpoint, tmp_path / "o"), "--train_group_size", "3"]
    assert sft.main([*base, "--dataset_name", str(saved)]) == 2
    err = capsys.readouterr().err
    assert f"{saved}[train]:3: field 'query'" in err and "Traceback" not in err, err
    # A check of this run (negatives for the group size) on a valid row is named the same way.
    no_negs = [{**g, "negative_passages": []} for g in GROUPS]
    saved2 = tmp_path / "no_negs"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(no_negs)}).save_to_disk(str(saved2))
    assert sft.main([*base, "--dataset_name", str(saved2)]) == 2
    assert f"{saved2}[train]:1: field 'negative_passages'" in capsys.readouterr().err
    for extra, message in (
        (["--dataset_name", str(saved), "--train_file", "x.jsonl"], "give --train_file or --dataset_name, not both"),
        (["--dataset_config", "x", "--train_file", "x.jsonl"], "--dataset_config needs --dataset_name"),
        (["--dataset_name", str(tmp_path / "nowhere" / "ds")], "no such file or directory"),
        (["--dataset_name", str(saved), "--dataset_split", "test"], "no split 'test'; it has train"),
    ):
        assert sft.main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_a_config_train_file_gives_way_to_dataset_name_on_the_command_line(tmp_path):
    from tsarank.training.arguments import DataArguments, OptionError, parse_stage_args

    config = tmp_path / "c.yaml"
    config.write_text("train_file: groups.jsonl\n")
    (args,) = parse_stage_args([DataArguments], ["--config", str(config), "--dataset_name", "x.parquet"])
    assert args.train_file is None and args.dataset_name == "x.parquet"
    with pytest.raises(OptionError, match="not both"):
        parse_stage_args([DataArguments], ["--train_file", "a.jsonl", "--dataset_name", "x.parquet"])
    config.write_text("dataset_name: x.parquet\n")
    with pytest.raises(OptionError, match="not both"):  # the file is named on the command line: ambiguous
        parse_stage_args([DataArguments], ["--config", str(config), "--train_file", "a.jsonl"])


def test_gzipped_jsonl_as_tevatron_ships_it_and_split_slices(tmp_path, tiny_checkpoint):
    """Tevatron distributes train.jsonl.gz; a save_to_disk directory takes train[a:b] slices like load_dataset."""
    import gzip

    import datasets

    from tsarank.data.hf_datasets import load_split

    gz = tmp_path / "train.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.writelines(json.dumps(g) + "\n" for g in GROUPS)
    assert [r["query"] for r in load_split(str(gz), None, "train")] == [g["query"] for g in GROUPS]
    assert len(load_split(str(gz), None, "train[:2]")) == 2
    saved = tmp_path / "ds"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(GROUPS)}).save_to_disk(str(saved))
    assert [r["query"] for r in load_split(str(saved), None, "train[1:3]")] == [g["query"] for g in GROUPS[1:3]]
    extra = ["--train_group_size", "3", "--lambda_dp", "0"]
    assert sft.main([*_common(tiny_checkpoint, tmp_path / "a"), *extra, "--dataset_name", str(gz)]) == 0
    assert sft.main([*_common(tiny_checkpoint, tmp_path / "b"), *extra,
                     "--train_file", str(_jsonl(tmp_path / "g.jsonl", GROUPS))]) == 0
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
