"""Reliability suite, process-level part: bad input stopping the entry points, refused output directories, a NaN
loss, and SIGKILL + resume of SFT training and of ``tsarank rerank`` (docs/reliability.md has the table).

Runs are what a user runs (``python cpt/train.py``, ``python sft/train.py``, ``tsarank rerank``), as subprocesses
whose exit codes and stderr are checked, on a tiny random Llama. A subprocess costs mostly its imports (torch,
transformers), so the independent ones are started together when the module's first test runs (the ``jobs``
fixture: only those that the selected tests need, four at a time) and each test picks up its own; checks that need
no fresh process (refusals that happen before any model is loaded) call the entry points in process. The kills
are real ``SIGKILL`` s that the process sends itself at a fixed point (a training step, a flushed chunk), so every
run is interrupted at the same place. The in-process rows (awkward input, run-file checks, ...) are in
``tests/unit/test_reliability_unit.py``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file

from conftest import DATA, build_tiny_llama, build_tiny_tokenizer

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CPT_TRAIN = ROOT / "cpt" / "train.py"
SFT_TRAIN = ROOT / "sft" / "train.py"
DL19_JSON = "trec-dl-passage/bm25_top100/retrieve_results_dl19.json"

TOPICS = [
    ("what is the capital of france", "Paris is the capital and largest city of France."),
    ("banana fruit", "Bananas are an elongated edible fruit produced by several kinds of plants."),
    ("what do mitochondria do", "The mitochondria is the powerhouse of the cell and produces energy."),
    ("how tall is mount everest", "Mount Everest is 8,849 metres above sea level."),
    ("cafe naive tokyo", "Caf\u00e9 na\u00efve \u6771\u4eac 0123456789"),
]


# ------------------------------------------------------------------------------------------------ helpers
def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        WANDB_MODE="offline", WANDB_DIR=str(tmp), WANDB_SILENT="true", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1", HF_DATASETS_CACHE=str(tmp / "hf_datasets"), PYTHONUNBUFFERED="1",
    )
    return env


def _run(cmd: list, tmp: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, env=_env(tmp), capture_output=True, text=True, timeout=timeout)


def _load_entry_point(path: Path, name: str):
    """The library module behind cpt/train.py or sft/train.py (for the in-process checks that need no fresh
    process)."""
    import importlib

    return importlib.import_module(f"tsarank.training.{path.parent.name}")


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _flags(**opts) -> list[str]:
    return [x for k, v in opts.items() for x in (f"--{k}", str(v))]


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _write_groups(path: Path) -> Path:
    """Each query's positive is its own passage; the negatives are the other topics' passages."""
    rows = []
    for i, (query, positive) in enumerate(TOPICS):
        rows.append({"query_id": f"q{i}", "query": query, "positive_passages": [{"docid": f"d{i}", "text": positive}],
                     "negative_passages": [{"docid": f"d{j}", "text": t} for j, (_, t) in enumerate(TOPICS) if j != i]})
    return _write_jsonl(path, rows)


def _sft_flags(model, train_file, out, **overrides) -> list[str]:
    opts = dict(
        model_name_or_path=model, train_file=train_file, output_dir=out, train_group_size=4, max_doc_tokens=48,
        max_query_tokens=16, temperature=1.0, score_transform="logprob", lambda_gen=1.0, lambda_dp=1.0, max_steps=4,
        learning_rate=1e-3, per_device_train_batch_size=1, logging_steps=1, save_strategy="no", report_to="none",
        seed=7, dataloader_num_workers=0, dataloader_pin_memory="false",
    )
    opts.update(overrides)
    return _flags(**opts)


def _checkpoints(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A saved tiny Llama + tokenizer, a directory with the tokenizer only (no weights), and SFT groups."""
    root = tmp_path_factory.mktemp("reliability")
    tok = build_tiny_tokenizer()
    build_tiny_llama(len(tok), seed=3).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    # A "model" that cannot be loaded (a causal-LM config, a tokenizer and a weight file of garbage): it passes the
    # up-front checks (which look at file names, not into the weights), so a data error reported from it proves no
    # model load happened.
    tok.save_pretrained(root / "tokenizer_only")
    build_tiny_llama(len(tok), seed=3).config.save_pretrained(root / "tokenizer_only")
    (root / "tokenizer_only" / "model.safetensors").write_bytes(b"not a safetensors file")
    return {"model": root / "model", "tokenizer_only": root / "tokenizer_only",
            "groups": _write_groups(root / "groups.jsonl")}



# ------------------------------------------------------------------------------------------- background runs
SFT_KILL_HARNESS = textwrap.dedent("""
    # Runs stage 2's main() with one extra callback that SIGKILLs this process at the end of step KILL_AT.
    # The Trainer saves after on_step_end, so the checkpoints due before step KILL_AT are on disk, later ones not.
    import os, signal, sys
    from transformers import TrainerCallback
    from tsarank.training import sft  # the code behind sys.argv[1] (sft/train.py)

    KILL_AT = int(sys.argv[2])

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == KILL_AT:
                os.kill(os.getpid(), signal.SIGKILL)

    sys.exit(sft.main(sys.argv[3:], extra_callbacks=[Kill()]))
""")

RERANK_KILL_HARNESS = textwrap.dedent("""
    # Runs `tsarank rerank ARGS` in this process and sends itself SIGNAL (SIGKILL, or SIGINT as Ctrl-C does) right
    # after its KILL_AFTER-th fsync (each fsync makes one scored chunk of queries durable in OUT.partial), i.e. in the
    # middle of the run.
    import os, signal, sys
    from tsarank.cli import main

    SIGNAL, KILL_AFTER, calls = getattr(signal, sys.argv[1]), int(sys.argv[2]), [0]
    # As in a terminal: a test runner started in the background (`cmd &` in a script) passes SIGINT on as ignored,
    # and Python then never raises KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _fsync = os.fsync

    def fsync(fd):
        _fsync(fd)
        if not os.readlink(f"/proc/self/fd/{fd}").endswith(".partial"):
            return  # another durable write (the run's options file), not a scored chunk
        calls[0] += 1
        if calls[0] == KILL_AFTER:
            os.kill(os.getpid(), SIGNAL)

    os.fsync = fsync
    sys.exit(main(["rerank", *sys.argv[3:]]))
""")

SFT_RESUME = dict(max_steps=8, save_strategy="steps", save_steps=2, learning_rate=5e-3)
SFT_KILL_AT = 5  # 5 groups per epoch: checkpoint-4 is on disk, the resumed run crosses into the second epoch
RERANK_KILL_AFTER = 2  # chunks of one query (8 docs each): 2 of 6 queries are in the sidecar at the kill


def _rerank_common(tiny: dict[str, Path]) -> list[str]:
    return [str(x) for x in ("--candidates", DATA / DL19_JSON, "--top-k", "8", "--max-queries", "6", "--chunk-docs",
                             "8", "--model", tiny["model"])]


def _job_cpt_malformed(tmp: Path, tiny: dict[str, Path]) -> tuple[list, dict[str, Any]]:
    pairs = _write_jsonl(tmp / "pairs.jsonl", [
        {"text": "Paris is the capital of France.", "query": "capital of france"},
        {"text": "Bananas are fruit.", "query": "banana"},
        '{"text": "The mitochondria is the powerhouse", "query": ',  # a line cut short
        {"text": "never reached", "query": "q"},
    ])
    out = tmp / "out"
    # The "model" is a directory with the tokenizer only: had the model been loaded first, loading would fail.
    return ([sys.executable, CPT_TRAIN, *_flags(model_name_or_path=tiny["tokenizer_only"], train_file=pairs,
                                                output_dir=out, report_to="none")], {"pairs": pairs, "out": out})


def _job_sft_malformed(tmp: Path, tiny: dict[str, Path]) -> tuple[list, dict[str, Any]]:
    torn = '{"query": "q2", "positive_passages": [{"text": "p"}], "negative_passages": [{"text": "n"}]'  # no "}"
    bad = _write_jsonl(tmp / "bad.jsonl", [
        {"query": "q1", "positive_passages": [{"text": "p"}], "negative_passages": [{"text": "n"}]}, "", torn,
    ])
    out = tmp / "out"
    # Two files (comma-separated): the good one is read first, the error names the bad one.
    return ([sys.executable, SFT_TRAIN, *_sft_flags(tiny["tokenizer_only"], f"{tiny['groups']},{bad}", out)],
            {"bad": bad, "torn": torn, "out": out})


def _job_nan(tmp: Path, tiny: dict[str, Path]) -> tuple[list, dict[str, Any]]:
    """lr 1e30 and no clipping: step 1 is fine, then the weights and the loss blow up; a checkpoint every step."""
    out = tmp / "out"
    return ([sys.executable, SFT_TRAIN, *_sft_flags(tiny["model"], tiny["groups"], out, learning_rate=1e30,
                                                    max_grad_norm=0.0, max_steps=6, save_strategy="steps",
                                                    save_steps=1, lambda_dp=0.0)], {"out": out})


def _job_sft_killed(tmp: Path, tiny: dict[str, Path]) -> tuple[list, dict[str, Any]]:
    out = tmp / "resumed"
    argv = _sft_flags(tiny["model"], tiny["groups"], out, **SFT_RESUME)
    harness = tmp / "killed_sft.py"
    harness.write_text(SFT_KILL_HARNESS)
    return [sys.executable, harness, SFT_TRAIN, SFT_KILL_AT, *argv], {"out": out, "argv": argv}


def _job_rerank_killed(tmp: Path, tiny: dict[str, Path], signal_name: str = "SIGKILL") -> tuple[list, dict[str, Any]]:
    out = tmp / "resumed.trec"
    harness = tmp / "killed_rerank.py"
    harness.write_text(RERANK_KILL_HARNESS)
    return [sys.executable, harness, signal_name, RERANK_KILL_AFTER, *_rerank_common(tiny), "--out", out], {"out": out}


def _job_rerank_interrupted(tmp: Path, tiny: dict[str, Path]) -> tuple[list, dict[str, Any]]:
    return _job_rerank_killed(tmp, tiny, "SIGINT")


JobSpec = Callable[[Path, dict[str, Path]], tuple[list, dict[str, Any]]]
# In the order the tests read them.
JOBS: dict[str, JobSpec] = {
    "cpt_malformed": _job_cpt_malformed, "sft_malformed": _job_sft_malformed, "nan": _job_nan,
    "sft_killed": _job_sft_killed, "rerank_killed": _job_rerank_killed, "rerank_interrupted": _job_rerank_interrupted,
}
NEEDS = {  # test -> the background runs it reads
    "test_malformed_jsonl_weak_pairs_stops_cpt_train_before_model_load": ["cpt_malformed"],
    "test_malformed_jsonl_groups_stops_sft_train_before_model_load": ["sft_malformed"],
    "test_nan_loss_stops_sft_naming_step_and_keeps_last_checkpoint": ["nan"],
    "test_nan_loss_last_good_checkpoint_has_finite_weights": ["nan"],
    "test_sigkill_during_sft_then_resume_matches_uninterrupted": ["sft_killed"],
    "test_sigkill_during_rerank_then_resume_byte_identical": ["rerank_killed"],
    "test_ctrl_c_during_rerank_says_resume_then_resume_byte_identical": ["rerank_interrupted"],
}


class Jobs:
    """Subprocesses started together in the background; ``get(name)`` waits for one and returns
    ``(CompletedProcess, context)``."""

    def __init__(self, workers: int = 4) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers)
        self.futures: dict[str, Future] = {}

    def submit(self, name: str, cmd: list, tmp: Path, context: dict[str, Any]) -> None:
        self.futures[name] = self.pool.submit(lambda: (_run(cmd, tmp), context))

    def get(self, name: str) -> tuple[subprocess.CompletedProcess, dict[str, Any]]:
        return self.futures[name].result()


@pytest.fixture()
def one_thread():
    """In-process runs that are compared with subprocess runs (OMP_NUM_THREADS=1) use one thread as well."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", autouse=True)
def jobs(request, tiny, tmp_path_factory):
    """Autouse, so the background runs start with the module's first test, whichever it is."""
    selected = {getattr(item, "originalname", item.name) for item in request.session.items
                if getattr(item, "module", None) is request.module}
    wanted = {job for test, needs in NEEDS.items() if test in selected for job in needs}
    if not DATA.is_dir():
        wanted -= {"rerank_killed", "rerank_interrupted"}  # their tests skip (shared_data fixture)
    runner = Jobs()
    for name, spec in JOBS.items():
        if name in wanted:
            tmp = tmp_path_factory.mktemp(name)
            cmd, context = spec(tmp, tiny)
            runner.submit(name, cmd, tmp, context)
    yield runner
    runner.pool.shutdown(wait=True, cancel_futures=True)


# ========================================================================================= output directories
def test_cpt_train_refuses_non_empty_output_dir_unless_overwrite(tiny, tmp_path):
    """cpt/train.py's main(), in process (its refusal is the same FileExistsError a command-line run ends with).
    First in the file: it runs while the background runs start."""
    cpt = _load_entry_point(CPT_TRAIN, "tsarank_cpt_train_reliability")
    pairs = _write_jsonl(tmp_path / "pairs.jsonl", [{"text": d, "query": q} for q, d in TOPICS])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    argv = _flags(model_name_or_path=tiny["model"], train_file=pairs, output_dir=out, report_to="none", max_steps=1,
                  per_device_train_batch_size=2, max_doc_tokens=32, save_strategy="no")
    with pytest.raises(FileExistsError) as info:
        cpt.train(argv)
    assert str(info.value) == (
        f"output_dir {out} exists and is not empty. Fix: choose a new --output_dir, pass "
        "--resume_from_checkpoint to continue it, or --overwrite_output_dir true to write into it anyway."
    )
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]

    assert cpt.main([*argv, "--overwrite_output_dir", "true"]) == 0
    assert (out / "model.safetensors").is_file() and (out / "tsarank_config.json").is_file()
    assert (out / "keep.txt").read_text() == "precious"  # written into, not wiped


# ============================================================================================ input errors
def test_malformed_jsonl_weak_pairs_stops_cpt_train_before_model_load(jobs):
    proc, ctx = jobs.get("cpt_malformed")
    assert proc.returncode == 2  # cpt/train.py reports the DataError as one 'error:' line
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {ctx['pairs']}:3: expected one JSON object on this line, got invalid JSON "
        "(Expecting value at column 57). Fix: write one complete JSON object per line (JSON Lines)"
    )
    # The model directory has no weights: had the model been loaded first, this would be a loading error.
    assert "model.safetensors" not in proc.stderr and "OSError" not in proc.stderr and "Traceback" not in proc.stderr
    assert not ctx["out"].exists() or not any(ctx["out"].iterdir())


def test_malformed_jsonl_groups_stops_sft_train_before_model_load(jobs):
    proc, ctx = jobs.get("sft_malformed")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {ctx['bad']}:3: expected one JSON object on this line, got invalid JSON (Expecting ',' delimiter at "
        f"column {len(ctx['torn']) + 1}). Fix: write one complete JSON object per line (JSON Lines)"
    )
    assert "Traceback" not in proc.stderr and "model.safetensors" not in proc.stderr
    assert not ctx["out"].exists()


# ================================================================================================= NaN guard
NAN_MESSAGE = re.compile(
    r"^error: training loss became non-finite \((nan|inf|-inf)\) at step (\d+); training was stopped and nothing was "
    r"saved from step \2 on \(the last good checkpoint is (\S+)\)\. Fix: lower the learning rate, keep max_grad_norm "
    r"> 0, prefer bf16 over fp16, and check the data; then resume with --resume_from_checkpoint\.$"
)


def test_nan_loss_stops_sft_naming_step_and_keeps_last_checkpoint(jobs):
    proc, ctx = jobs.get("nan")
    out = ctx["out"]
    assert proc.returncode == 1, proc.stderr[-4000:]
    match = NAN_MESSAGE.match(proc.stderr.strip().splitlines()[-1])
    assert match, proc.stderr[-2000:]
    step, named = int(match.group(2)), Path(match.group(3))
    # A checkpoint after every good step, none from the bad step on; the message names the newest one.
    assert step >= 2 and _checkpoints(out) == list(range(1, step))
    assert named == out / f"checkpoint-{step - 1}"
    assert json.loads((named / "trainer_state.json").read_text())["global_step"] == step - 1
    assert not (out / "model.safetensors").exists() and not (out / "README.md").exists()  # no final checkpoint


def test_nan_loss_last_good_checkpoint_has_finite_weights(jobs):
    proc, _ = jobs.get("nan")
    match = NAN_MESSAGE.match(proc.stderr.strip().splitlines()[-1])
    assert match
    weights = load_file(str(Path(match.group(3)) / "model.safetensors"))
    bad = sorted(k for k, w in weights.items() if not torch.isfinite(w).all())
    assert not bad, f"non-finite tensors in {match.group(3)}: {bad[:5]}"


# ============================================================================================ SIGKILL + resume
def _probe_scores(checkpoint: Path) -> dict[str, list[float]]:
    from tsarank import Ranker

    ranker = Ranker.from_pretrained(str(checkpoint), device="cpu", dtype="float32")
    return {f"q{i}": ranker.score(query, [t for _, t in TOPICS]) for i, (query, _) in enumerate(TOPICS)}


def _probe_metrics(scores: dict[str, list[float]]) -> dict[str, float]:
    from tsarank.evaluation import evaluate

    run = {qid: [(f"d{j}", s) for j, s in enumerate(row)] for qid, row in scores.items()}
    qrels = {f"q{i}": {f"d{i}": 1} for i in range(len(TOPICS))}
    return evaluate(run, qrels, ["nDCG@10", "RR@10"])


def test_sigkill_during_sft_then_resume_matches_uninterrupted(jobs, tiny, tmp_path, capsys, one_thread):
    # The uninterrupted reference runs in this process (same entry point, same single thread as the subprocesses)
    # while the killed run goes on in the background.
    sft = _load_entry_point(SFT_TRAIN, "tsarank_sft_train_reliability_process")
    full = tmp_path / "full"
    assert sft.main(_sft_flags(tiny["model"], tiny["groups"], full, **SFT_RESUME)) == 0, capsys.readouterr().err
    killed, ctx = jobs.get("sft_killed")
    out, argv = ctx["out"], ctx["argv"]
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert _checkpoints(out) == [2, 4] and not (out / "model.safetensors").exists()

    # Starting afresh in the killed run's directory is refused (in process: it stops before any model is loaded).
    capsys.readouterr()
    assert sft.main(argv) == 2
    assert f"error: output_dir {out} exists and is not empty" in capsys.readouterr().err
    _ok(_run([sys.executable, SFT_TRAIN, *argv, "--resume_from_checkpoint", "true"], out.parent))

    resumed_w, full_w = load_file(str(out / "model.safetensors")), load_file(str(full / "model.safetensors"))
    assert resumed_w.keys() == full_w.keys()
    for key in full_w:
        torch.testing.assert_close(resumed_w[key], full_w[key], atol=1e-6, rtol=1e-5, msg=key)
    start = load_file(str(tiny["model"] / "model.safetensors"))
    assert max((full_w[k] - start[k]).abs().max().item() for k in start) > 1e-3  # the runs did train

    resumed_s, full_s = _probe_scores(out), _probe_scores(full)
    for qid in full_s:
        assert resumed_s[qid] == pytest.approx(full_s[qid], abs=1e-5), qid
    assert _probe_metrics(resumed_s) == _probe_metrics(full_s)
    # The logged losses too: steps 1-4 come from checkpoint-4's state, 5-8 from the resumed process.
    losses = {name: [(h["step"], h["loss"]) for h in json.loads((d / "trainer_state.json").read_text())["log_history"]
                     if "loss" in h] for name, d in (("resumed", out), ("full", full))}
    steps = SFT_RESUME["max_steps"]
    assert [s for s, _ in losses["resumed"]] == [s for s, _ in losses["full"]] == list(range(1, steps + 1))
    assert [v for _, v in losses["resumed"]] == pytest.approx([v for _, v in losses["full"]], abs=1e-5)


def test_sigkill_during_rerank_then_resume_byte_identical(jobs, tiny, shared_data, tmp_path, capsys, one_thread):
    from tsarank.cli import main as tsarank_cli

    # The uninterrupted reference runs in this process (same command, same single thread as the subprocesses).
    common = _rerank_common(tiny)
    full = tmp_path / "full.trec"
    assert tsarank_cli(["rerank", *common, "--out", str(full)]) == 0, capsys.readouterr().err
    assert len(full.read_text().splitlines()) == 48
    killed, ctx = jobs.get("rerank_killed")
    out = ctx["out"]
    sidecar = Path(f"{out}.partial")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not out.exists()
    done = sidecar.read_text().splitlines(keepends=True)
    assert len(done) == 16 and "".join(done) == "".join(full.read_text().splitlines(keepends=True)[:16])
    with open(sidecar, "a") as fh:  # and a torn write: half a line, as a kill inside write() would leave
        fh.write(done[0][: len(done[0]) // 2])

    # Without --resume the sidecar is not silently discarded (in process: it stops before any model is loaded).
    capsys.readouterr()
    assert tsarank_cli(["rerank", *common, "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: found {sidecar} from an interrupted run; pass --resume to "
                                               "continue it, or delete it to start over")
    resumed = _ok(_run(["tsarank", "rerank", *common, "--out", out, "--resume"], out.parent))
    assert f"resuming: 2 of 6 queries already in {sidecar}" in resumed.stderr
    assert "2 queries resumed" in resumed.stdout and "(32 scored in" in resumed.stdout
    assert out.read_bytes() == full.read_bytes()
    assert not sidecar.exists()

    assert tsarank_cli(["rerank", *common, "--out", str(out)]) == 2  # a finished run is not overwritten
    assert capsys.readouterr().err.strip() == (f"error: refusing to overwrite existing {out}; pass --overwrite or "
                                               "choose another --out")


def test_ctrl_c_during_rerank_says_resume_then_resume_byte_identical(jobs, tiny, shared_data, tmp_path, capsys,
                                                                      one_thread):
    """Ctrl-C (SIGINT) in the middle of `tsarank rerank`: no traceback, exit 130, a line saying how many queries are
    kept and to rerun with --resume; resuming gives the uninterrupted run's bytes."""
    from tsarank.cli import main as tsarank_cli

    common = _rerank_common(tiny)
    full = tmp_path / "full.trec"
    assert tsarank_cli(["rerank", *common, "--out", str(full)]) == 0, capsys.readouterr().err
    interrupted, ctx = jobs.get("rerank_interrupted")
    out = ctx["out"]
    assert interrupted.returncode == 130, interrupted.stderr[-3000:]
    assert "Traceback" not in interrupted.stderr and "KeyboardInterrupt" not in interrupted.stderr
    assert (f"interrupted: 2 of 6 queries are kept in {out}.partial; run the same command with --resume to continue"
            in interrupted.stderr)
    assert not out.exists() and not Path(f"{out}.lock").exists()
    resumed = _ok(_run(["tsarank", "rerank", *common, "--out", out, "--resume"], out.parent))
    assert "2 queries resumed" in resumed.stdout
    assert out.read_bytes() == full.read_bytes()
    assert not Path(f"{out}.partial").exists() and not Path(f"{out}.partial.json").exists()
