"""End-to-end stage 2 (sft/train.py): ZeRO-3 on 2 CPU processes, LoRA, last-token head, the real default model
from a CPT checkpoint, multi-stage (--init_from), and the NaN guard.

Tiny random models wherever the behaviour does not need a real one; runs are in-process (``train(argv)``)
except the DeepSpeed one, which goes through the real ``deepspeed`` launcher.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import build_tiny_llama, build_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

TOPICS = [
    ("what is the capital of france", "Paris is the capital and largest city of France."),
    ("banana fruit", "Bananas are an elongated edible fruit produced by several kinds of plants."),
    ("what do mitochondria do", "The mitochondria is the powerhouse of the cell and produces energy."),
    ("how tall is mount everest", "Mount Everest is 8,849 metres above sea level."),
    ("cafe naive tokyo", "Caf\u00e9 na\u00efve \u6771\u4eac 0123456789"),
]


from tsarank.training import sft  # noqa: E402  the code behind sft/train.py


def _write_groups(path: Path, repeat: int = 1) -> Path:
    """Each query's positive is its own passage; the negatives are the other topics' passages."""
    with open(path, "w") as fh:
        for r in range(repeat):
            for i, (query, positive) in enumerate(TOPICS):
                negatives = [{"docid": f"d{j}", "text": text} for j, (_, text) in enumerate(TOPICS) if j != i]
                fh.write(json.dumps({"query_id": f"q{i}-{r}", "query": query,
                                     "positive_passages": [{"docid": f"d{i}", "text": positive}],
                                     "negative_passages": negatives}) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_base")
    tok = build_tiny_tokenizer()
    build_tiny_llama(len(tok), seed=3).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def groups(tmp_path_factory) -> Path:
    return _write_groups(tmp_path_factory.mktemp("groups") / "groups.jsonl")


def _args(model, train_file, out, **overrides) -> list[str]:
    opts = dict(
        model_name_or_path=str(model), train_file=str(train_file), output_dir=str(out), train_group_size=4,
        max_doc_tokens=48, max_query_tokens=16, temperature=1.0, score_transform="logprob", lambda_gen=1.0,
        lambda_dp=1.0, max_steps=4, learning_rate=1e-3, per_device_train_batch_size=1, logging_steps=1,
        save_strategy="no", report_to="none", seed=7, dataloader_num_workers=0,
        bf16="false",  # fp32 like the references (unset is bf16 autocast on CPUs with AMX / AVX512-BF16)
    )
    opts.update(overrides)
    argv = []
    for key, value in opts.items():
        argv += [f"--{key}", str(value)]
    return argv


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        if f.name.startswith("tsarank_head"):
            continue
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def _log_losses(out: Path, key: str = "loss") -> list[float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [row[key] for row in state["log_history"] if key in row and "train_loss" not in row]


def _positive_first_margin(ranker) -> float:
    """Mean over the topics of score(positive) - max score(negatives)."""
    margins = []
    for i, (query, _) in enumerate(TOPICS):
        scores = ranker.score(query, [text for _, text in TOPICS])
        margins.append(scores[i] - max(s for j, s in enumerate(scores) if j != i))
    return sum(margins) / len(margins)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ ZeRO-3
@pytest.mark.distributed
def test_zero3_two_processes_sharded_reference(tiny_dir, tmp_path):
    from tsarank import Ranker

    train_file = _write_groups(tmp_path / "repeated.jsonl", repeat=4)
    out = tmp_path / "zero3"
    cmd = [
        "deepspeed", "--num_gpus", "2", "--master_port", str(_free_port()), str(ROOT / "sft" / "train.py"),
        "--deepspeed", str(ROOT / "ds_configs" / "zero3.json"),
        *_args(tiny_dir, train_file, out, max_steps=30, learning_rate=3e-3, logging_steps=3, lambda_dp=1.0),
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    # The reference is its own frozen copy, sharded by DeepSpeed like the policy.
    assert "reference for L_dp: separate, ZeRO-3 sharded" in log, log[-4000:]

    losses, ranks = _log_losses(out), _log_losses(out, "loss_rank")
    assert len(losses) == 10
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    assert sum(ranks[-3:]) / 3 < sum(ranks[:3]) / 3, ranks
    assert _log_losses(out, "loss_dp")[-1] > 0  # the policy moved away from the reference

    # Saved weights: exactly the policy's tensors (the input checkpoint's key set), no reference copy.
    saved, base = _weights(out), _weights(tiny_dir)
    assert set(saved) == set(base)
    assert not any("ref" in k.lower() for k in saved)
    assert any(not torch.equal(saved[k].float(), base[k].float()) for k in base)

    before = _positive_first_margin(Ranker.from_pretrained(str(tiny_dir), device="cpu", dtype="float32"))
    after = _positive_first_margin(Ranker.from_pretrained(str(out), device="cpu", dtype="float32"))
    assert after > before
    assert (out / "README.md").is_file() and (out / "tsarank_config.json").is_file()


# -------------------------------------------------------------------------------------------------- LoRA
def test_lora_adapter_off_reference_adapter_and_merged_load(tiny_dir, groups, tmp_path):
    from tsarank import Ranker

    out = tmp_path / "lora"
    result = sft.train(_args(tiny_dir, groups, out, use_lora="true", merge_lora="true", lora_r=4, lora_alpha=8,
                             lora_dropout=0.0, learning_rate=5e-3, lambda_dp=1.0))
    assert result.reference.kind == "adapter_off"  # no second copy
    assert Path(result.load_dir) == out / "merged"
    # The adapter directory holds adapter weights only.
    adapter = _weights(out)
    assert adapter and all("lora_" in k for k in adapter)
    assert _log_losses(out, "loss_dp")[-1] > 0

    query, docs = TOPICS[0][0], [t for _, t in TOPICS]
    from_adapter = Ranker.from_pretrained(str(out), device="cpu", dtype="float32").score(query, docs)
    merged = Ranker.from_pretrained(str(out / "merged"), device="cpu", dtype="float32").score(query, docs)
    assert from_adapter == pytest.approx(merged, abs=1e-5)
    base = Ranker.from_pretrained(str(tiny_dir), device="cpu", dtype="float32").score(query, docs)
    assert max(abs(a - b) for a, b in zip(merged, base)) > 1e-4  # the adapter changed the scores
    assert (out / "merged" / "README.md").is_file()


# -------------------------------------------------------------------------------------------- last token
def test_last_token_head_train_save_reload(tiny_dir, groups, tmp_path):
    from tsarank import Ranker
    from tsarank.modeling import HEAD_WEIGHTS
    from tsarank.training.sft_trainer import SCORE_HEAD_ATTR
    from tsarank.wrappers import unwrap_model

    out = tmp_path / "last"
    result = sft.train(_args(tiny_dir, groups, out, scoring_head="last_token", lambda_dp=1.0, dp_span="all",
                             gen_span="all", learning_rate=5e-3, save_strategy="steps", save_steps=4))
    assert (out / HEAD_WEIGHTS).is_file()
    saved = _weights(out)
    assert not any(SCORE_HEAD_ATTR in k for k in saved)  # the head lives in its own file

    lm = unwrap_model(result.trainer.model).eval()
    head = getattr(lm, SCORE_HEAD_ATTR)
    in_memory = Ranker(lm, result.trainer.processing_class, result.template, head=head)
    reloaded = Ranker.from_pretrained(str(out), device="cpu", dtype="float32")
    assert reloaded.template.scoring_head == "last_token"
    # Trainer.push_to_hub calls create_model_card just before uploading: it must keep tsarank's card.
    result.trainer.create_model_card(model_name="x")
    card = (out / "README.md").read_text()
    assert "library_name: tsarank" in card and "scoring head: `last_token`" in card
    for query, _ in TOPICS[:2]:
        docs = [t for _, t in TOPICS]
        assert reloaded.score(query, docs) == pytest.approx(in_memory.score(query, docs), abs=1e-5)
    # The intermediate checkpoint (step 4 = the last step) loads the same way: sidecar, head and weights.
    ckpt = Ranker.from_pretrained(str(out / "checkpoint-4"), device="cpu", dtype="float32")
    assert ckpt.template == reloaded.template
    docs = [t for _, t in TOPICS]
    assert ckpt.score(TOPICS[0][0], docs) == pytest.approx(in_memory.score(TOPICS[0][0], docs), abs=1e-5)


# --------------------------------------------------------------------------------- real model, real data
def test_default_model_from_cpt_checkpoint_on_msmarco_sample(shared_data, default_model_dir, tmp_path):
    """Stage 1 for 2 steps on the weak pairs, then stage 2 for 3 steps on the MS MARCO groups from its output."""
    from tsarank import Ranker
    from tsarank.data.formats import read_groups
    from tsarank.data.groups import doc_text

    from tsarank.training import cpt

    m_cpt = tmp_path / "cpt"
    assert cpt.main([
        "--model_name_or_path", "default", "--train_file", str(shared_data / "weak-pairs" / "rankinggpt_text_pairs.json"),
        "--output_dir", str(m_cpt), "--max_steps", "2", "--per_device_train_batch_size", "2", "--learning_rate", "1e-5",
        "--max_doc_tokens", "64", "--max_query_tokens", "16", "--train_top_layers", "2", "--report_to", "none",
        "--save_strategy", "no", "--logging_steps", "1", "--bf16", "false",
    ]) == 0

    data = shared_data / "msmarco-train-sample" / "rankinggpt_msmarco.json"
    out = tmp_path / "sft"
    result = sft.train(_args(m_cpt, data, out, max_steps=3, train_group_size=4, max_doc_tokens=64, max_query_tokens=16,
                             train_top_layers=2, learning_rate=3e-5, temperature=0.001, score_transform="prob",
                             max_train_samples=6))
    # train_top_layers with the policy's own starting weights: the reference shares the frozen prefix.
    assert result.reference.kind == "shared_prefix"
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    steps = [row for row in history if "loss_rank" in row]
    assert len(steps) == 3
    for row in steps:  # each term is logged, and the total is their weighted sum (lambda = 1)
        assert row["loss"] == pytest.approx(row["loss_rank"] + row["loss_gen"] + row["loss_dp"], rel=1e-4, abs=1e-4)
    meta = json.loads((out / "tsarank_config.json").read_text())
    assert meta["stage"] == "sft" and meta["training"]["model_args"]["model_name_or_path"] == str(m_cpt)
    assert meta["training"]["loss"]["temperature"] == 0.001
    assert "base_model" not in (out / "README.md").read_text().split("---")[1]  # a local M_cpt is not a Hub id

    # The checkpoint reloads, and its scores equal the in-memory model's.
    group = read_groups(data)[0]
    docs = [doc_text(p) for p in group["positive_passages"] + group["negative_passages"][:3]]
    reloaded = Ranker.from_pretrained(str(out), device="cpu", dtype="float32")
    assert reloaded.template.max_doc_tokens == 64
    from tsarank.wrappers import unwrap_model

    in_memory = Ranker(unwrap_model(result.trainer.model), result.trainer.processing_class, result.template)
    assert reloaded.score(group["query"], docs) == pytest.approx(in_memory.score(group["query"], docs), abs=1e-4)


# -------------------------------------------------------------------------------------------- multi-stage
def test_multistage_init_from_keeps_m_cpt_as_reference(tiny_dir, groups, tmp_path):
    spec = importlib.util.spec_from_file_location("add_teacher_scores", ROOT / "scripts" / "add_teacher_scores.py")
    teacher_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(teacher_script)

    run1 = tmp_path / "run1"
    sft.train(_args(tiny_dir, groups, run1, loss="softmax", learning_rate=5e-3))

    teacher_file = tmp_path / "teacher.jsonl"
    assert teacher_script.main(["--model", str(run1), "--input", str(groups), "--output", str(teacher_file),
                                "--device", "cpu", "--dtype", "float32"]) == 0
    records = [json.loads(line) for line in teacher_file.read_text().splitlines()]
    assert all(len(r["teacher_scores"]) == 1 + len(r["negative_passages"]) for r in records)

    # Run 2 with lr 0: its weights must be run 1's exactly (init_from), while L_dp > 0 shows that the
    # reference is M_cpt (the tiny base), not run 1.
    run2 = tmp_path / "run2"
    result = sft.train(_args(tiny_dir, teacher_file, run2, init_from=str(run1), loss="distill_kl", lambda_gen=0.0,
                             learning_rate=0.0, max_steps=2))
    assert result.reference.kind == "separate"
    w1, w2 = _weights(run1), _weights(run2)
    assert set(w1) == set(w2) and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert min(_log_losses(run2, "loss_dp")) > 1e-6
    meta = json.loads((run2 / "tsarank_config.json").read_text())
    assert meta["training"]["loss"]["init_from"] == str(run1)
    assert meta["training"]["loss"]["loss"] == "distill_kl"

    # The distillation loss without teacher scores in the data is an error naming the file and line.
    out = tmp_path / "no_teacher"
    rc = sft.main(_args(tiny_dir, groups, out, init_from=str(run1), loss="distill_kl"))
    assert rc == 2 and not out.exists()


# ------------------------------------------------------------------------------------------------ NaN guard
@pytest.fixture(scope="module")
def blown_up_run(tiny_dir, groups, tmp_path_factory):
    """A run whose lr (1e30) blows the weights up: step 1 is fine, then the gradients and the loss turn NaN."""
    out = tmp_path_factory.mktemp("nan") / "run"
    argv = _args(tiny_dir, groups, out, learning_rate=1e30, max_grad_norm=0.0, max_steps=6,
                 save_strategy="steps", save_steps=1, lambda_dp=0.0)
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = sft.main(argv)
    return rc, err.getvalue(), out


def test_nan_guard_stops_names_step_and_last_checkpoint(blown_up_run):
    rc, err, out = blown_up_run
    assert rc == 1
    assert "non-finite" in err and "at step" in err
    step = int(err.split("at step", 1)[1].split(";")[0].split()[0])
    checkpoints = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert checkpoints and max(checkpoints) < step  # nothing saved from the bad step on
    assert f"checkpoint-{max(checkpoints)}" in err
    assert not (out / "model.safetensors").exists()  # no final checkpoint from the corrupted weights
    assert not (out / "README.md").exists()


def test_nan_guard_last_checkpoint_has_finite_weights(blown_up_run):
    _, _, out = blown_up_run
    checkpoints = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    last = _weights(out / f"checkpoint-{max(checkpoints)}")
    assert all(torch.isfinite(t).all() for t in last.values())


# -------------------------------------------------------------------------- last-token config, real data
def test_last_token_config_trains_on_real_data(shared_data, default_model_dir, tmp_path):
    """sft/configs/last_token.yaml as shipped (L_rank + L_gen + L_dp against the frozen starting model) on the MS
    MARCO sample: finite gradients at every step, and the loss falls over four passes of the same eight groups."""
    out = tmp_path / "last_token"
    result = sft.train(["--config", str(ROOT / "sft" / "configs" / "last_token.yaml"),
                        "--train_file", str(shared_data / "msmarco-train-sample" / "rankinggpt_msmarco.json"),
                        "--output_dir", str(out), "--max_train_samples", "8", "--max_steps", "32", "--logging_steps", "1",
                        "--max_doc_tokens", "64", "--save_strategy", "no", "--lr_scheduler_type", "constant",
                        "--warmup_steps", "0"])
    assert result.template.scoring_head == "last_token" and result.template.source.startswith("query: ")
    assert result.reference is not None  # L_dp is on, against the frozen M_cpt
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    steps = [row for row in history if "loss_rank" in row]
    assert len(steps) == 32
    assert all(torch.isfinite(torch.tensor(row["grad_norm"])) for row in steps)
    for row in steps:
        assert row["loss"] == pytest.approx(row["loss_rank"] + row["loss_gen"] + row["loss_dp"], rel=1e-4, abs=1e-4)
    first = sum(row["loss"] for row in steps[:8]) / 8  # epoch 1 over the 8 groups
    last = sum(row["loss"] for row in steps[-8:]) / 8  # epoch 4, the same groups
    first_rank = sum(row["loss_rank"] for row in steps[:8]) / 8
    last_rank = sum(row["loss_rank"] for row in steps[-8:]) / 8
    assert last < 0.8 * first and last_rank < 0.8 * first_rank, (first, last, first_rank, last_rank)
