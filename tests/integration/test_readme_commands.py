"""Every command of the README's bash blocks, run as written and in the order a reader runs them, each output
feeding the next (retrieve -> rerank -> evaluate; weak pairs -> stage 1 -> stage 2; DL19 re-rank -> evaluate).

To keep CI short, limits are appended that shrink the work but not what the commands are (argparse takes the last
value): two queries for re-ranking, two training steps, fewer weak pairs and groups. Not run here: the set-up block
(it is `.ci/run` itself and the demo), and the launch lines for several GPUs (`deepspeed ...`, `NUM_GPUS=8 ...`).
The commands run in a scratch directory laid out like the repository's root (configs linked, `../shared` beside it),
so nothing is written into the repository.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

# Appended to a command by its first words: the same command on less work.
LIMITS = {
    "tsarank rerank": ["--max-queries", "2", "--top-k", "5"],
    "IR_DATASETS_HOME=irds_home tsarank rerank": ["--max-queries", "2", "--top-k", "5"],
    "tsarank data weak-pairs": ["--max-pairs", "40"],
    "tsarank data groups": ["--max-queries", "6"],
    "tsarank train": ["--max_steps", "2", "--save_strategy", "no", "--report_to", "none", "--logging_steps", "1"],
}
# The set-up block, and launch lines for several GPUs or nodes (their commands are checked against stub launchers
# in tests/unit/test_launchers.py).
SKIP = ("bash scripts/install.sh", "deepspeed ", "NUM_GPUS=", "MODEL=", "CUDA_VISIBLE_DEVICES=", "HOSTFILE=",
        "DS_CONFIG=")


def readme_commands() -> list[str]:
    """The README's bash commands in order: comments dropped, continuation lines joined."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def _limited(command: str) -> str:
    for prefix, extra in LIMITS.items():
        if command.startswith(prefix):
            return command + " " + " ".join(extra)
    return command


def test_readme_commands_run_as_written_in_order(shared_data, tmp_path):
    commands = readme_commands()
    runnable = [c for c in commands if not c.startswith(SKIP)]
    assert len(runnable) >= 10, runnable  # the README's commands were found
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("cpt", "sft", "ds_configs", "scripts"):
        (work / name).symlink_to(ROOT / name)
    (tmp_path / "shared").symlink_to(shared_data.parent)
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false")
    script = "set -euo pipefail\n" + "\n".join(
        f"echo '>>> {c.replace(chr(39), '')}' >&2\n{_limited(c)}" for c in runnable) + "\n"
    proc = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-5000:]
    # Each step left what the next one reads.
    for produced in ("scifact.bm25.trec", "scifact.rerank.trec", "deltas.png", "weak/train.jsonl",
                     "weak/validation.jsonl", "groups.jsonl", "out/cpt/config.json", "out/sft/tsarank_config.json",
                     "dl19.top20.trec"):
        assert (work / produced).is_file(), produced
    assert "nDCG@10" in proc.stdout
    for produced in ("scifact.irds.trec", "dl19.rank_llm.jsonl", "groups.parquet", "out/sft-parquet/config.json"):
        assert (work / produced).is_file(), produced

    # The Python snippets of "Use it with...", in order, in the same place (they read what the commands wrote).
    snippets = readme_snippets("Use it with")
    assert len(snippets) >= 2, snippets
    outputs = []
    for code in snippets:
        run = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True,
                             timeout=600)
        assert run.returncode == 0, code + "\n" + run.stderr[-4000:]
        outputs.append(run.stdout)
    assert "'corpus_id': 0" in outputs[0] and "nDCG@10" in outputs[1] and "tsarank" in outputs[1], outputs


def readme_snippets(section: str) -> list[str]:
    """The ```python blocks of one README section (``## {section}...`` up to the next ``## ``)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 3)
    return re.findall(r"```python\n(.*?)```", text[start:end if end > 0 else None], flags=re.S)
