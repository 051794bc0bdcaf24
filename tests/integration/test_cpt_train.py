"""Stage 1 end to end: cpt/train.py as users run it (subprocesses), with real DeepSpeed ZeRO-3 on 2 CPU processes,
real wandb (offline), a real SIGKILL, and the real default model with LoRA."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "cpt" / "train.py"
DL19 = "trec-dl-passage/bm25_top100/retrieve_results_dl19.json"
DL19_QRELS = "trec-dl-passage/qrels.dl19-passage.txt"

PAIRS = [
    ("capital of france", "Paris is the capital and largest city of France."),
    ("banana fruit", "Bananas are an elongated edible fruit produced by several kinds of plants."),
    ("what do mitochondria do", "The mitochondria is the powerhouse of the cell and produces energy."),
    ("how tall is mount everest", "Mount Everest is 8,849 metres above sea level."),
    ("cafe naive", "Caf\u00e9 na\u00efve \u00e2\u0080\u0099 \u00c2\u00b0 0123456789"),
    ("document query", "Document: a document about queries. Query: a query"),
    ("largest city", "The largest city of France is Paris."),
    ("energy of the cell", "Cells produce energy in their mitochondria."),
]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A saved tiny Llama + tokenizer, and a small repeated weak-pairs set (train 32 lines, validation 4)."""
    from conftest import build_tiny_llama, build_tiny_tokenizer

    root = tmp_path_factory.mktemp("cpt_tiny")
    tok = build_tiny_tokenizer()
    build_tiny_llama(len(tok), seed=0).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    with open(root / "train.jsonl", "w") as f:
        for _ in range(4):
            for q, d in PAIRS:
                f.write(json.dumps({"text": d, "query": q}) + "\n")
    with open(root / "validation.jsonl", "w") as f:
        for q, d in PAIRS[:4]:
            f.write(json.dumps({"query": f"Document: {d} Query:", "response": q}) + "\n")  # RankingGPT schema
    return root


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        WANDB_MODE="offline", WANDB_DIR=str(tmp), WANDB_SILENT="true", HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", HF_DATASETS_CACHE=str(tmp / "hf_datasets"),
        PYTHONUNBUFFERED="1",
    )
    return env


def _run(cmd: list[str], tmp: Path, timeout: int = 420, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(tmp), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_args(setup: Path, out: Path, shared: Path, **overrides) -> list[str]:
    args = {
        "model_name_or_path": setup / "model", "train_file": setup / "train.jsonl",
        "validation_file": setup / "validation.jsonl", "output_dir": out, "max_doc_tokens": 48,
        "max_query_tokens": 16, "per_device_train_batch_size": 4, "learning_rate": 5e-3, "logging_steps": 2,
        "save_steps": 4, "seed": 7, "report_to": "none",
        "rank_eval_candidates": shared / DL19, "rank_eval_qrels": shared / DL19_QRELS,
        "rank_eval_top_k": 5, "rank_eval_max_queries": 2,
    }
    args.update(overrides)
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def _history(out: Path) -> list[dict]:
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


# ------------------------------------------------------------------------------------------- ZeRO-3, 2 processes
@pytest.mark.integration
@pytest.mark.distributed
def test_zero3_two_processes_loss_falls_and_checkpoint_reloads_identically(tiny_setup, shared_data, tmp_path):
    launcher = shutil.which("deepspeed")
    if launcher is None:
        pytest.skip("the deepspeed launcher is not on PATH")
    out, ref = tmp_path / "out", tmp_path / "reference_logits.pt"
    # Note: the first DeepSpeed run on a machine JIT-compiles its CPU shared-memory comm op (cached afterwards).
    cmd = [
        launcher, "--num_gpus", "2", "--master_port", str(_free_port()), str(TRAIN),
        "--deepspeed", str(ROOT / "ds_configs" / "zero3.json"),
        *_tiny_args(tiny_setup, out, shared_data, per_device_train_batch_size=2, max_steps=24, save_steps=1000,
                    logging_steps=4, rank_eval_steps=12, packing="true", save_reference_logits=ref,
                    learning_rate=1e-2, lr_scheduler_type="constant"),
    ]
    _run(cmd, tmp_path)
    hist = _history(out)
    losses = [h["loss"] for h in hist if "loss" in h]
    assert len(losses) == 6
    assert losses[-1] < 0.7 * losses[0], losses  # memorising 8 repeated pairs
    assert all(h["tokens_per_second"] > 0 for h in hist if "loss" in h)
    assert [h["step"] for h in hist if "rank_eval/nDCG@10" in h] == [12, 24]  # ranking eval ran under ZeRO-3
    final_eval = [h for h in hist if "eval_query_ppl" in h][-1]
    assert final_eval["eval_query_tokens"] > 0 and final_eval["eval_query_ppl"] > 1

    # The consolidated ZeRO-3 checkpoint reloads to exactly the in-memory model's logits.
    from transformers import AutoModelForCausalLM

    probe = torch.load(ref)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    mask = probe["attention_mask"].bool()
    torch.testing.assert_close(logits[mask], probe["logits"][mask], atol=1e-6, rtol=0)
    start = AutoModelForCausalLM.from_pretrained(tiny_setup / "model", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (start(input_ids=probe["input_ids"]).logits - probe["logits"]).abs().max() > 0.1  # it did train

    from tsarank import Ranker
    from tsarank.hub import load_tsarank_config

    assert load_tsarank_config(out)["template"].max_doc_tokens == 48
    ranker = Ranker.from_pretrained(str(out), device="cpu", dtype="float32")
    assert ranker.template.max_doc_tokens == 48
    scores = ranker.score("capital of france", [PAIRS[0][1], PAIRS[1][1]])
    assert scores[0] > scores[1]


# ------------------------------------------------------------------------------------------- resume + wandb
RESUME_STEPS = 12
KILL_AT_STEP = 6  # checkpoint-4 exists, checkpoint-8 does not yet


@pytest.fixture(scope="module")
def uninterrupted(tiny_setup, shared_data, tmp_path_factory):
    """The reference run: same seed, never interrupted, logging to wandb (offline)."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    out = tmp / "out"
    _run([sys.executable, str(TRAIN), *_tiny_args(tiny_setup, out, shared_data, max_steps=RESUME_STEPS, eval_strategy="steps",
                                                 eval_steps=6, rank_eval_steps=6, report_to="wandb",
                                                 run_name="tsarank-cpt-test")], tmp)
    return tmp, out


@pytest.mark.integration
def test_sigkill_and_resume_ends_with_the_same_weights(uninterrupted, tiny_setup, shared_data, tmp_path):
    out = tmp_path / "out"
    args = _tiny_args(tiny_setup, out, shared_data, max_steps=RESUME_STEPS, eval_strategy="steps", eval_steps=6,
                      rank_eval_steps=6)
    # The interrupted run: a callback SIGKILLs the process in the middle of the run (after checkpoint-4).
    harness = tmp_path / "killed_run.py"
    harness.write_text(textwrap.dedent(f"""
        import os, signal, sys
        from transformers import TrainerCallback
        from tsarank.training import cpt as cpt_train  # the code behind cpt/train.py
        class Kill(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step == {KILL_AT_STEP}:
                    os.kill(os.getpid(), signal.SIGKILL)
        sys.exit(cpt_train.main(sys.argv[1:], extra_callbacks=[Kill()]))
    """))
    killed = _run([sys.executable, str(harness), *args], tmp_path, check=False)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    assert not (out / "model.safetensors").exists()
    # Resuming into the same (non-empty) output dir is allowed (a fresh start there is refused: unit-tested).
    _run([sys.executable, str(TRAIN), *args, "--resume_from_checkpoint", "true"], tmp_path)

    _, ref_out = uninterrupted
    resumed, reference = load_file(str(out / "model.safetensors")), load_file(str(ref_out / "model.safetensors"))
    assert resumed.keys() == reference.keys()
    for k in reference:
        torch.testing.assert_close(resumed[k], reference[k], atol=1e-6, rtol=1e-5, msg=k)
    start = load_file(str(tiny_setup / "model" / "model.safetensors"))
    assert max((reference[k] - start[k]).abs().max().item() for k in start) > 1e-3  # the runs did train
    assert _history(out)[-1]["step"] == _history(ref_out)[-1]["step"] == RESUME_STEPS


def _read_wandb_records(path: Path) -> list:
    """The records of a ``run-*.wandb`` transaction log, parsed with wandb's own protobuf ``Record``.

    wandb >= 0.30 writes no ``wandb-summary.json`` in offline mode; everything logged is in this file: a 7-byte header
    (``:W&B``, magic 0xBEE1, version) then 32 KiB blocks of LevelDB-log records (crc32 u32, length u16, type u8:
    1 full, 2 first, 3 middle, 4 last), each record payload a serialized ``Record``.
    """
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    block, pos, buf, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


@pytest.mark.integration
def test_wandb_offline_run_has_logged_keys(uninterrupted):
    tmp, _ = uninterrupted
    runs = sorted((tmp / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp / "wandb").iterdir()) if (tmp / "wandb").exists() else "no wandb dir"
    records = _read_wandb_records(next(runs[0].glob("run-*.wandb")))
    kinds = [r.WhichOneof("record_type") for r in records]
    assert "exit" in kinds  # the run was finished, not cut off
    last: dict[str, float] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            for item in r.history.item:
                last[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    for key in ("train/loss", "train/learning_rate", "train/tokens_per_second", "eval/query_ppl", "eval/loss",
                "train/rank_eval/nDCG@10"):
        assert key in last, (key, sorted(last))
    assert last["train/global_step"] == RESUME_STEPS
    assert last["eval/query_ppl"] > 1 and last["train/tokens_per_second"] > 0
    assert 0 <= last["train/rank_eval/nDCG@10"] <= 1


# ------------------------------------------------------------------------------------------- LoRA on the real model
@pytest.mark.integration
def test_lora_merge_on_default_model_scores_in_ranker(shared_data, default_ranker, tmp_path):
    from tsarank import Ranker
    from tsarank.data.formats import read_rank_llm

    out = tmp_path / "lora"
    _run([
        sys.executable, str(TRAIN), "--model_name_or_path", "default", "--dtype", "float32",
        "--train_file", str(shared_data / "weak-pairs" / "rankinggpt_text_pairs.json"), "--output_dir", str(out),
        "--use_lora", "true", "--lora_r", "8", "--merge_lora", "true", "--max_steps", "3",
        "--per_device_train_batch_size", "2", "--learning_rate", "2e-3", "--max_doc_tokens", "96",
        "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
    ], tmp_path)
    assert (out / "adapter_config.json").is_file() and (out / "merged" / "config.json").is_file()
    assert (out / "merged" / "tsarank_config.json").is_file() and (out / "merged" / "tokenizer.json").is_file()
    for card in (out / "README.md", out / "merged" / "README.md"):  # stage 1 writes its model card too
        text = card.read_text()
        assert "base_model: \"HuggingFaceTB/SmolLM2-135M-Instruct\"" in text and "stage 1, continual pre-training" in text
        assert "rankinggpt_text_pairs.json" in text and "| `use_lora` | True |" in text
    losses = [h["loss"] for h in _history(out) if "loss" in h]
    assert len(losses) == 3 and all(0 < x < 20 for x in losses)

    entry = read_rank_llm(shared_data / DL19)[0]
    docs = entry.texts[:6]
    merged = Ranker.from_pretrained(str(out / "merged"), device="cpu", dtype="float32")
    adapter = Ranker.from_pretrained(str(out), device="cpu", dtype="float32")
    s_merged, s_adapter = merged.score(entry.query, docs), adapter.score(entry.query, docs)
    s_base = default_ranker.score(entry.query, docs)
    assert all(map(lambda x: x == x and x < 0, s_merged))  # finite log-probabilities
    assert max(abs(a - b) for a, b in zip(s_merged, s_adapter)) < 1e-4
    assert max(abs(a - b) for a, b in zip(s_merged, s_base)) > 1e-3  # the adapter changed the model
