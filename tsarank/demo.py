"""``tsarank demo``: the whole two-stage pipeline on the embedded default model and real data, with a report.

Phases (each resumable; ``--resume`` skips the finished ones):

1. ``weak_pairs``  (title -> text) pairs from the SciFact and NFCorpus corpora, every evaluation query and
   judged document excluded;
2. ``cpt``         stage 1 on those pairs -> ``M_cpt``;
3. ``groups``      SFT groups: the MS MARCO training sample plus NFCorpus train with BM25 hard negatives;
4. ``sft``         stage 2 (L_rank + L_gen + L_dp against the frozen ``M_cpt``) -> ``M_sft``;
5. ``evaluate``    BM25, the zero-shot default model, ``M_cpt`` and ``M_sft`` on DL19, SciFact test, NFCorpus test;
6. ``report``      ``report.md``, ``report.json``, ``report.png``.

The training stages run as subprocesses of their own entry points (``tsarank train cpt|sft``), exactly
as a user would launch them, so the demo exercises the real code paths and its memory is returned between
phases.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from .atomic import atomic_write_text

REPO_ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("dl19", "scifact", "nfcorpus")
SYSTEMS = ("bm25", "zero_shot", "cpt", "sft")
MEASURES_BASE = ("nDCG@10", "RR@10")
STATE = "demo_state.json"


@dataclass(frozen=True)
class Preset:
    """Sizes of one demo run. Every reduction is written into the report."""

    name: str
    weak_pairs: int  # CPT training pairs
    cpt_steps: int
    cpt_batch: int
    nfcorpus_train_queries: int  # NFCorpus train queries mined into SFT groups
    sft_steps: int
    sft_group_size: int
    sft_batch: int
    top_k: int  # BM25 candidates re-ranked per query
    max_queries: dict[str, int | None] = field(default_factory=dict)  # per dataset; None = all
    beir_top_k: int | None = None  # depth for SciFact/NFCorpus when it differs from top_k (their documents are longer)
    cpt_top_layers: int = 0  # CPT trains only the top N blocks (0 = all); with SFT's N the models share the rest
    sft_top_layers: int = 0  # SFT trains only the top N blocks (0 = all); the reference then shares the bottom
    max_doc_tokens: int = 128
    # SFT ranking loss (sft/configs/smollm2_quick.yaml otherwise): the paper's prob transform at tau 0.001 suits
    # large batches of a large model; see the quick preset for why it is overridden there.
    sft_score_transform: str = "prob"
    sft_temperature: float = 0.001
    sft_gen_span: str = "all"
    # "last_token": SFT trains a last-token head (sft/configs/last_token.yaml: logprob transform, tau 1) instead.
    sft_scoring_head: str = "query_likelihood"
    learning_rate_cpt: float = 5e-5
    learning_rate_sft: float = 2e-5
    estimates_s: dict[str, int] = field(default_factory=dict)  # rough phase durations on the target machine


PRESETS = {
    "quick": Preset(
        # For 2 CPU cores, where scoring dominates. Both stages train only the top 8 of 30 blocks, so the zero-shot
        # model, M_cpt and M_sft share 22 blocks and the evaluation runs them once for all three
        # (tsarank.shared_trunk). The SFT data is mostly MS MARCO (the domain of DL19). CPT takes small steps: 80
        # scientific title -> abstract pairs cannot teach much (at 5e-5 on all blocks, DL19 nDCG@10 0.540 against
        # 0.5405 zero-shot at the same 128-token budget in a measured run). SFT: with one group per step the
        # ranking loss is spiky (grad norms in the hundreds, clipped to 1), so 1e-4 barely moved the ranking
        # (DL19 0.544 against M_cpt's 0.545); 3e-4 with L_gen on the query tokens (the score itself) reached
        # 0.558 from the same M_cpt in a measured run, against 0.5405 zero-shot.
        name="quick", weak_pairs=2000, cpt_steps=20, cpt_batch=4, nfcorpus_train_queries=50, sft_steps=64,
        sft_group_size=8, sft_batch=1, top_k=20, max_queries={"dl19": None, "scifact": 10, "nfcorpus": 10},
        beir_top_k=10, cpt_top_layers=8, sft_top_layers=8, learning_rate_cpt=1e-5, learning_rate_sft=3e-4,
        sft_gen_span="query",
        estimates_s={"weak_pairs": 5, "cpt": 100, "groups": 5, "sft": 360, "evaluate": 460, "report": 5},
    ),
    "full": Preset(
        name="full", weak_pairs=50000, cpt_steps=1000, cpt_batch=32, nfcorpus_train_queries=2590, sft_steps=1000,
        sft_group_size=16, sft_batch=4, top_k=100, max_queries={"dl19": None, "scifact": None, "nfcorpus": None},
        max_doc_tokens=128, learning_rate_sft=3e-5,
        estimates_s={"weak_pairs": 60, "cpt": 1200, "groups": 120, "sft": 1800, "evaluate": 900, "report": 5},
    ),
}


def for_this_machine(preset: Preset) -> Preset:
    """The preset as run here. The quick preset on a machine without a GPU whose CPU computes bf16 natively
    (AVX512-BF16 or AMX): scoring there is 2.3x and an SFT step 1.33x faster in bf16 (``dtype`` auto and ``--bf16``
    unset both pick it; scripts/bench_cpu_bf16.py, BENCHMARKS.md), and the time gained evaluates SciFact and NFCorpus
    on 3x the queries at twice the depth (30 queries x BM25 top-20 each, against 10 x top-10), within the same
    15 minutes. Training sizes stay as they are, so models trained anywhere compare."""
    import torch

    from .backend import native_bf16

    if preset.name != "quick" or torch.cuda.is_available() or not native_bf16("cpu"):
        return preset
    return replace(preset, max_queries={**preset.max_queries, "scifact": 30, "nfcorpus": 30}, beir_top_k=20,
                   estimates_s={**preset.estimates_s, "cpt": 75, "sft": 270, "evaluate": 400})


# ------------------------------------------------------------------------------------------ data location
def resolve_data_dir(explicit: str | None) -> Path:
    """``--data``, else ``$TSARANK_DATA``, else ``../shared/data`` beside the repository (or the working dir)."""
    candidates = [explicit] if explicit else []
    if not explicit and os.environ.get("TSARANK_DATA"):
        candidates.append(os.environ["TSARANK_DATA"])
    if not explicit:
        candidates += [str(REPO_ROOT / ".." / "shared" / "data"), str(Path.cwd() / ".." / "shared" / "data")]
    for c in candidates:
        p = Path(c).expanduser().resolve()
        if (p / "trec-dl-passage").is_dir() and (p / "beir").is_dir():
            return p
    raise FileNotFoundError(
        "demo data not found (looked in: " + ", ".join(candidates) + "). Pass --data DIR or set TSARANK_DATA to a "
        "folder laid out like shared/data:\n"
        "  trec-dl-passage/{topics.dl19-passage.txt, qrels.dl19-passage.txt, bm25_top100/retrieve_results_dl19.json}\n"
        "  beir/scifact/{corpus.jsonl, queries.jsonl, qrels/test.tsv}, beir/nfcorpus/{..., qrels/train.tsv, test.tsv}\n"
        "  msmarco-train-sample/rankinggpt_msmarco.json (Tevatron-style groups)\n"
        "The same files can be obtained with ir_datasets: 'msmarco-passage/trec-dl-2019/judged' (queries, qrels; "
        "BM25 top-100 with Pyserini or `tsarank retrieve`), 'beir/scifact/test', 'beir/nfcorpus/train' and "
        "'beir/nfcorpus/test' (docs, queries, qrels), and 'msmarco-passage/train' for training groups."
    )


# ------------------------------------------------------------------------------------------ state
class DemoState:
    """Which phases finished, persisted atomically in ``OUT/demo_state.json``."""

    def __init__(self, out: Path) -> None:
        self.path = out / STATE
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {"done": {}}

    def done(self, phase: str) -> bool:
        return phase in self.data["done"]

    def mark(self, phase: str, info: dict[str, Any]) -> None:
        self.data["done"][phase] = info
        atomic_write_text(self.path, json.dumps(self.data, indent=2))

    def info(self, phase: str) -> dict[str, Any]:
        return self.data["done"].get(phase, {})


def _run_logged(cmd: list[str], log: Path, estimate_s: int, desc: str, steps: int | None = None) -> None:
    """Run ``cmd`` with output to ``log`` and a progress bar; raise with the log's tail on error.

    A training phase (``steps`` given) reports each step through a progress file
    (:data:`tsarank.training.callbacks.PROGRESS_FILE_ENV`): the bar shows steps done, the last logged loss, steps
    per second and the time left. Other phases show elapsed seconds against ``estimate_s``.
    """
    from tqdm import tqdm

    from .training.callbacks import PROGRESS_FILE_ENV

    env = dict(os.environ)
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    log.parent.mkdir(parents=True, exist_ok=True)
    progress = log.with_suffix(".progress.json")
    progress.unlink(missing_ok=True)
    if steps:
        env[PROGRESS_FILE_ENV] = str(progress)
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
        start = time.time()
        try:
            if steps:
                bar_cm = tqdm(total=steps, desc=desc, unit="step", dynamic_ncols=True)
            else:
                bar_cm = tqdm(total=estimate_s, desc=desc, unit="s", bar_format="{desc}: {bar} {n:.0f}/~{total}s est.")
            with bar_cm as bar:
                while proc.poll() is None:
                    time.sleep(1.0)
                    if steps:
                        _show_steps(bar, progress)
                    else:
                        bar.n = min(time.time() - start, bar.total)
                        bar.refresh()
                if steps:
                    _show_steps(bar, progress)
        except BaseException:
            # Ctrl-C (or any error) here must not leave the phase running behind the prompt, still writing.
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
    if proc.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{desc} failed (exit {proc.returncode}); full log: {log}\n--- last lines ---\n{tail}")


def _show_steps(bar: Any, progress: Path) -> None:
    """Move a step bar to what the training process last reported (a missing or half-written file: no change)."""
    try:
        info = json.loads(progress.read_text())
    except (OSError, ValueError):
        return
    if info.get("max_steps"):
        bar.total = info["max_steps"]
    bar.update(max(0, int(info.get("step", 0)) - bar.n))
    if info.get("loss") is not None:
        bar.set_postfix(loss=f"{info['loss']:.3f}", refresh=False)
    bar.refresh()


# ------------------------------------------------------------------------------------------ phases
class Demo:
    """One demo run in ``out`` with ``preset`` over the data in ``data``."""

    def __init__(self, out: Path, preset: Preset, data: Path, log: Callable[[str], None] = print) -> None:
        self.out, self.preset, self.data, self.log = out, preset, data, log
        self.state = DemoState(out)
        self.py = sys.executable

    # paths
    def p(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    def beir(self, name: str) -> Path:
        return self.data / "beir" / name

    def tsarank_cmd(self, *args: str) -> list[str]:
        return [self.py, "-m", "tsarank.cli", *args]

    def phase_weak_pairs(self) -> dict[str, Any]:
        out = self.p("data", "weak_pairs")
        shutil.rmtree(out, ignore_errors=True)  # our own intermediate output from an interrupted attempt
        cmd = self.tsarank_cmd(
            "data", "weak-pairs", "--corpus", str(self.beir("scifact")), "--corpus", str(self.beir("nfcorpus")),
            "--exclude-qrels", str(self.beir("scifact") / "qrels" / "test.tsv"),
            str(self.beir("nfcorpus") / "qrels" / "test.tsv"), str(self.beir("nfcorpus") / "qrels" / "dev.tsv"),
            "--max-pairs", str(self.preset.weak_pairs), "--seed", "13", "--out", str(out),
        )
        _run_logged(cmd, self.p("logs", "weak_pairs.log"), self.preset.estimates_s["weak_pairs"], "1/6 weak pairs")
        return {"train_file": str(out / "train.jsonl"), "validation_file": str(out / "validation.jsonl")}

    def phase_cpt(self) -> dict[str, Any]:
        wp = self.state.info("weak_pairs")
        out = self.p("cpt")
        pr = self.preset
        cmd = [
            *self.tsarank_cmd("train", "cpt"), "--config", str(REPO_ROOT / "cpt" / "configs" / "smollm2_quick.yaml"),
            "--model_name_or_path", "default", "--train_file", wp["train_file"], "--validation_file", wp["validation_file"],
            "--output_dir", str(out), "--max_steps", str(pr.cpt_steps), "--per_device_train_batch_size", str(pr.cpt_batch),
            "--learning_rate", str(pr.learning_rate_cpt), "--max_doc_tokens", str(pr.max_doc_tokens),
            "--train_top_layers", str(pr.cpt_top_layers), "--train_final_norm", "true",
            "--overwrite_output_dir", "true", "--report_to", "none", "--save_strategy", "no", "--logging_steps", "5",
            "--eval_strategy", "no", "--rank_eval_steps", "0",  # the demo evaluates once, at the end
        ]
        _run_logged(cmd, self.p("logs", "cpt.log"), pr.estimates_s["cpt"], "2/6 CPT", steps=pr.cpt_steps)
        return {"checkpoint": str(out)}

    def phase_groups(self) -> dict[str, Any]:
        out = self.p("data", "nfcorpus_groups.jsonl")
        out.unlink(missing_ok=True)
        cmd = self.tsarank_cmd(
            "data", "groups", "--corpus", str(self.beir("nfcorpus")), "--qrels", "train",
            "--max-queries", str(self.preset.nfcorpus_train_queries), "--negatives", "15", "--max-positives", "4",
            "--seed", "13", "--out", str(out),
        )
        _run_logged(cmd, self.p("logs", "groups.log"), self.preset.estimates_s["groups"], "3/6 SFT groups")
        msmarco = self.data / "msmarco-train-sample" / "rankinggpt_msmarco.json"
        return {"train_files": [str(msmarco), str(out)]}

    def phase_sft(self) -> dict[str, Any]:
        groups = self.state.info("groups")["train_files"]
        cpt = self.state.info("cpt")["checkpoint"]
        out = self.p("sft")
        pr = self.preset
        last_token = pr.sft_scoring_head == "last_token"
        config = "last_token.yaml" if last_token else "smollm2_quick.yaml"
        # The last-token score is an unbounded linear value: its head's own loss settings, not the preset's prob/tau.
        transform, temperature = ("logprob", 1.0) if last_token else (pr.sft_score_transform, pr.sft_temperature)
        cmd = [
            *self.tsarank_cmd("train", "sft"), "--config", str(REPO_ROOT / "sft" / "configs" / config),
            "--model_name_or_path", cpt, "--train_file", ",".join(groups), "--output_dir", str(out),
            "--max_steps", str(pr.sft_steps), "--per_device_train_batch_size", str(pr.sft_batch),
            "--train_group_size", str(pr.sft_group_size), "--learning_rate", str(pr.learning_rate_sft),
            "--max_doc_tokens", str(pr.max_doc_tokens), "--overwrite_output_dir", "true", "--report_to", "none",
            "--save_strategy", "no", "--logging_steps", "5", "--train_top_layers", str(pr.sft_top_layers),
            "--train_final_norm", "true",
            "--score_transform", transform, "--temperature", str(temperature),
            "--gen_span", pr.sft_gen_span,
        ]
        _run_logged(cmd, self.p("logs", "sft.log"), pr.estimates_s["sft"], "4/6 SFT", steps=pr.sft_steps)
        return {"checkpoint": str(out), "scoring_head": pr.sft_scoring_head}

    def phase_evaluate(self) -> dict[str, Any]:
        from .demo_eval import evaluate_systems

        models = {
            "zero_shot": "default",
            "cpt": self.state.info("cpt")["checkpoint"],
            "sft": self.state.info("sft")["checkpoint"],
        }
        results = evaluate_systems(self.data, self.p("runs"), models, self.preset, desc="5/6 evaluate")
        atomic_write_text(self.p("results.json"), json.dumps(results, indent=2))
        return {"results": str(self.p("results.json"))}

    def phase_report(self) -> dict[str, Any]:
        from .demo_report import write_report

        results = json.loads(Path(self.state.info("evaluate")["results"]).read_text())
        checkpoints = {"cpt": self.state.info("cpt")["checkpoint"], "sft": self.state.info("sft")["checkpoint"]}
        table = write_report(self.out, results, checkpoints, self.preset)
        self.log(table)
        return {"report": str(self.p("report.md"))}

    PHASES = ("weak_pairs", "cpt", "groups", "sft", "evaluate", "report")

    def run(self) -> None:
        t0 = time.time()
        earlier = self.state.info("sft").get("scoring_head", "query_likelihood") if self.state.done("sft") else None
        if earlier is not None and earlier != self.preset.sft_scoring_head:
            raise ValueError(f"--resume: this demo's SFT trained the {earlier} head, not {self.preset.sft_scoring_head}; "
                             "resume with the same --scoring-head, or start over with --overwrite")
        for phase in self.PHASES:
            if self.state.done(phase):
                self.log(f"[demo] {phase}: done earlier, skipped (--resume)")
                continue
            start = time.time()
            info = getattr(self, f"phase_{phase}")()
            info["seconds"] = round(time.time() - start, 1)
            self.state.mark(phase, info)
        self.log(f"[demo] finished in {time.time() - t0:.0f} s; report: {self.p('report.md')}")


def prepare_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a non-empty output directory unless resuming it or explicitly overwriting it."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a directory. Fix: choose a directory path")
    from .atomic import check_writable_dir, nearest_existing

    check_writable_dir(nearest_existing(out), "--out")  # before any phase, not when the first one saves
    if out.exists() and any(out.iterdir()):
        if resume:
            if not (out / STATE).is_file():
                raise FileExistsError(f"--resume: {out} holds no {STATE}; it is not a demo output directory")
            return
        if not overwrite:
            raise FileExistsError(
                f"{out} exists and is not empty. Fix: pass --resume to continue that run, --overwrite to start over "
                f"(its contents are deleted), or choose another --out."
            )
        if not (out / STATE).is_file():
            raise FileExistsError(f"--overwrite refused: {out} is not a demo output directory (no {STATE}); remove it yourself")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
