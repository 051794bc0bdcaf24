"""A wheel built from the repository carries both training stages: installed into a new environment and run from a
directory outside the repository, `tsarank train cpt|sft` work (2 steps each on a tiny model), also as DeepSpeed
ZeRO-3 on 2 processes through `deepspeed --module tsarank.cli`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list, cwd: Path, env: dict | None = None, timeout: int = 600) -> str:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                               "TOKENIZERS_PARALLELISM": "false", **(env or {})})
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory) -> Path:
    """A virtual environment with the wheel installed (its dependencies, torch included, come from the machine's
    site-packages: nothing is downloaded)."""
    tmp = tmp_path_factory.mktemp("wheel")
    # A copy of what the wheel is built from keeps build/ and *.egg-info out of the checkout; --no-build-isolation
    # builds with the installed setuptools (no download).
    src = tmp / "src"
    shutil.copytree(ROOT / "tsarank", src / "tsarank", ignore=shutil.ignore_patterns("__pycache__"))
    for rel in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / rel, src / rel)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", src], tmp)
    wheel = next((tmp / "dist").glob("tsarank-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("tsarank/training/cpt.py", "tsarank/training/sft.py", "tsarank/row_head.py", "tsarank/packing.py"):
        assert module in names, module
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", venv], tmp)
    _run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], tmp)
    return venv


def test_wheel_runs_both_stages_outside_the_repository(wheel_env, tmp_path):
    from conftest import build_tiny_llama, build_tiny_tokenizer

    work = tmp_path / "elsewhere"
    work.mkdir()
    python, tsarank = wheel_env / "bin" / "python", wheel_env / "bin" / "tsarank"
    where = _run([python, "-c", "import tsarank, tsarank.training.sft; print(tsarank.__file__)"], work).strip()
    assert where.startswith(str(wheel_env)) and str(ROOT) not in where, where  # the wheel, not the checkout
    assert "--train_group_size" in _run([tsarank, "train", "sft", "--help"], work)

    tok = build_tiny_tokenizer()
    build_tiny_llama(len(tok)).save_pretrained(work / "base")
    tok.save_pretrained(work / "base")
    topics = [("capital of france", "Paris is the capital and largest city of France."),
              ("banana fruit", "Bananas are an elongated edible fruit."),
              ("mitochondria", "The mitochondria is the powerhouse of the cell.")]
    (work / "pairs.jsonl").write_text("".join(json.dumps({"text": d, "query": q}) + "\n" for q, d in topics * 2))
    (work / "groups.jsonl").write_text("".join(
        json.dumps({"query": q, "positive_passages": [{"text": d}],
                    "negative_passages": [{"text": x} for _, x in topics if x != d]}) + "\n" for q, d in topics))
    base = ["--max_steps", "2", "--report_to", "none", "--max_doc_tokens", "32", "--max_query_tokens", "8",
            "--per_device_train_batch_size", "2", "--logging_steps", "1"]
    common = [*base, "--use_cpu", "true"]
    _run([tsarank, "train", "cpt", "--model_name_or_path", work / "base", "--train_file", "pairs.jsonl",
          "--output_dir", "cpt", "--eval_strategy", "no", *common], work)
    _run([tsarank, "train", "sft", "--model_name_or_path", work / "cpt", "--train_file", "groups.jsonl",
          "--output_dir", "sft", "--train_group_size", "3", *common, "--per_device_train_batch_size", "1"], work)
    # Several GPUs from the wheel: the deepspeed launcher runs `python -u -m tsarank.cli --local_rank=N train ...`.
    _run([python, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", _free_port(), "--module",
          "tsarank.cli", "train", "cpt", "--model_name_or_path", work / "base", "--train_file", "pairs.jsonl",
          "--output_dir", "cpt_zero3", "--eval_strategy", "no", "--deepspeed", ROOT / "ds_configs" / "zero3.json",
          *base], work)
    for stage in ("cpt", "sft", "cpt_zero3"):
        state = json.loads((work / stage / "trainer_state.json").read_text())
        assert state["global_step"] == 2
        assert (work / stage / "tsarank_config.json").is_file() and (work / stage / "model.safetensors").is_file()
