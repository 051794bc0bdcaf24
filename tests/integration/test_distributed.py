"""Correct at scale, checked without a GPU.

- Both stages under DeepSpeed ZeRO-3 on 2 CPU processes with the **real default model** (49,152-token vocabulary,
  so the head runs in several chunks) and per-rank work that differs (short queries on one rank, long ones on the
  other; packed CPT rows of different lengths), under a timeout: the losses and the updated weights equal one
  process without DeepSpeed that sees the same batches (gradient accumulation 2, sequential sampling). SFT trains
  every weight (the tied LM head's gradient goes through ZeRO-3) with activation checkpointing; CPT the top blocks.
- The same comparison on a tiny model for the last-token head and for LoRA (adapter-off reference).
- Teacher scores stay fp32 under DeepSpeed bf16.
- The NaN guard's collective uses a tensor on the model's device and synchronises the host once per step (2 gloo
  processes; the default device is set elsewhere, as a GPU run's CPU default is not the model's CUDA device).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.distributed]

COMMON = dict(
    model_name_or_path="default", dtype="float32", train_top_layers=2, max_doc_tokens=64, max_query_tokens=32,
    learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, max_steps=2, logging_steps=1,
    save_strategy="no", report_to="none", seed=7, train_sampling_strategy="sequential", dataloader_num_workers=0,
    bf16="false",  # both sides fp32 (unset would be bf16 autocast for the one process on CPUs with AMX)
)


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(WANDB_MODE="offline", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               HF_DATASETS_CACHE=str(tmp / "hf_datasets"), PYTHONUNBUFFERED="1")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flags(**opts) -> list[str]:
    return [x for k, v in opts.items() for x in (f"--{k}", str(v))]


def _run(cmd: list[str], tmp: Path, timeout: int = 600) -> str:
    """Run under a timeout: a rank waiting for a collective its peer never makes ends the test instead of hanging."""
    try:
        proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=_env(tmp), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"timed out after {timeout}s (a collective mismatch hangs): {cmd}\n"
                             f"{(exc.stdout or b'')[-3000:]!r}\n{(exc.stderr or b'')[-3000:]!r}") from None
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{log[-8000:]}"
    return log


def _zero3(script: str, tmp: Path, opts: dict) -> str:
    return _run(["deepspeed", "--num_gpus", "2", "--master_port", _free_port(), ROOT / script,
                 "--deepspeed", ROOT / "ds_configs" / "zero3.json", *_flags(**opts)], tmp)


def _single(stage: str, tmp: Path, opts: dict) -> str:
    return _run([sys.executable, "-m", "tsarank.cli", "train", stage, *_flags(**opts, gradient_accumulation_steps=2)],
                tmp)


def _history(out: Path) -> list[dict]:
    rows = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [r for r in rows if "loss" in r and "train_loss" not in r]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k).float() for k in f.keys()}


def _assert_same_losses(zero3_out: Path, single_out: Path, keys: tuple[str, ...], steps: int = 2) -> None:
    h3, h1 = _history(zero3_out), _history(single_out)
    assert len(h3) == len(h1) == steps
    for a, b in zip(h3, h1):
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=2e-4, abs=2e-6), (key, h3, h1)


def _assert_same_training(zero3_out: Path, single_out: Path, start: Path, lr: float, keys: tuple[str, ...],
                          first_trained_block: int) -> None:
    """Same logged losses, and the same update of every trained tensor (relative to the update's own size)."""
    _assert_same_losses(zero3_out, single_out, keys)
    w3, w1, w0 = _weights(zero3_out), _weights(single_out), _weights(start)
    trained = [k for k in w1 if not torch.equal(w1[k], w0[k])]
    assert any(f".layers.{first_trained_block}." in k for k in trained) and ".layers.29.mlp.up_proj.weight" in str(trained)
    assert not any(f".layers.{first_trained_block - 1}." in k for k in trained)
    for k in w1:
        d3, d1 = w3[k] - w0[k], w1[k] - w0[k]
        # Adam moves a trained element by up to about lr (measured: 1e-6 .. 3e-6 apart at lr 1e-4, where a gradient
        # close to 0 lets Adam amplify rounding); a rank computing with wrong weights moves many by ~lr.
        assert (d3 - d1).abs().max().item() <= 0.1 * lr, k
        if k in trained:
            assert (d3 - d1).norm() <= 1e-3 * d1.norm(), k  # measured: 2e-5 .. 6e-5


def _groups_with_uneven_queries(shared_data: Path, path: Path) -> Path:
    """Four MS MARCO groups in the order short, long, short, long query: with one group per rank and sequential
    sampling, rank 0 always gets the short queries (few head rows) and rank 1 the long ones (several chunks)."""
    from tsarank.data.formats import read_groups

    groups = sorted(read_groups(shared_data / "msmarco-train-sample" / "rankinggpt_msmarco.json"),
                    key=lambda g: len(g["query"]))
    order = [groups[0], groups[-1], groups[1], groups[-2]]
    with open(path, "w") as f:
        for g in order:
            f.write(json.dumps({k: g[k] for k in ("query_id", "query", "positive_passages", "negative_passages")}) + "\n")
    return path


def test_sft_zero3_two_processes_equal_one_process(shared_data, default_model_dir, tmp_path):
    """Every weight trained (the tied embedding / LM head included: the fused head's weight gradient goes back to its
    ZeRO-3 partition), with activation checkpointing, a sharded reference, and uneven head rows per rank."""
    groups = _groups_with_uneven_queries(shared_data, tmp_path / "groups.jsonl")
    opts = dict(COMMON, train_file=groups, train_group_size=8, per_device_train_batch_size=1, train_top_layers=0,
                activation_checkpointing="true", score_transform="logprob", temperature=1.0, lambda_gen=1.0,
                gen_span="all", lambda_dp=1.0, dp_span="all")
    log = _zero3("sft/train.py", tmp_path, dict(opts, output_dir=tmp_path / "zero3"))
    assert "reference for L_dp: separate, ZeRO-3 sharded" in log
    _single("sft", tmp_path, dict(opts, output_dir=tmp_path / "single"))
    _assert_same_training(tmp_path / "zero3", tmp_path / "single", default_model_dir, 1e-4,
                          ("loss", "loss_rank", "loss_gen", "loss_dp"), first_trained_block=0)
    w1, w0 = _weights(tmp_path / "single"), _weights(default_model_dir)
    assert not torch.equal(w1["model.embed_tokens.weight"], w0["model.embed_tokens.weight"])  # the head trained
    assert _history(tmp_path / "single")[1]["loss_dp"] > 0  # the reference really was compared with


def test_cpt_zero3_two_processes_equal_one_process(shared_data, default_model_dir, tmp_path):
    pairs = shared_data / "weak-pairs" / "rankinggpt_text_pairs.json"
    opts = dict(COMMON, train_file=pairs, max_train_samples=8, per_device_train_batch_size=2, packing="true",
                packing_max_length=256, eval_strategy="no")
    _zero3("cpt/train.py", tmp_path, dict(opts, output_dir=tmp_path / "zero3"))
    _single("cpt", tmp_path, dict(opts, output_dir=tmp_path / "single"))
    _assert_same_training(tmp_path / "zero3", tmp_path / "single", default_model_dir, 1e-4, ("loss",),
                          first_trained_block=28)


TOPICS = [
    ("what is the capital of france", "Paris is the capital and largest city of France."),
    ("banana fruit", "Bananas are an elongated edible fruit produced by several kinds of plants."),
    ("what do mitochondria do and why are they called the powerhouse", "The mitochondria is the powerhouse of the cell."),
    ("everest", "Mount Everest is 8,849 metres above sea level."),
]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory) -> tuple[Path, Path]:
    """A saved tiny Llama and 4 groups (short and long queries alternate, so the two ranks differ)."""
    from conftest import build_tiny_llama, build_tiny_tokenizer

    root = tmp_path_factory.mktemp("tiny_zero3")
    tok = build_tiny_tokenizer()
    build_tiny_llama(len(tok), seed=3, tie_word_embeddings=False).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    with open(root / "groups.jsonl", "w") as f:
        for i, (query, positive) in enumerate(TOPICS):
            negatives = [{"text": text} for j, (_, text) in enumerate(TOPICS) if j != i]
            f.write(json.dumps({"query": query, "positive_passages": [{"text": positive}],
                                "negative_passages": negatives}) + "\n")
    return root / "model", root / "groups.jsonl"


@pytest.mark.parametrize("variant", ["last_token", "lora"])
def test_sft_zero3_head_and_lora_variants_equal_one_process(tiny_setup, tmp_path, variant):
    """The last-token head (its Linear gathered by ZeRO-3 when called) and LoRA (the reference is the policy with its
    adapters off, run inside the engine's partitioned modules) train under ZeRO-3 as in one process."""
    model, groups = tiny_setup
    opts = dict(COMMON, model_name_or_path=model, train_file=groups, train_group_size=4, train_top_layers=0,
                per_device_train_batch_size=1, max_doc_tokens=48, max_query_tokens=16, learning_rate=1e-3,
                score_transform="logprob", temperature=1.0, lambda_gen=1.0, gen_span="all", lambda_dp=1.0,
                dp_span="all")
    if variant == "last_token":
        opts.update(scoring_head="last_token")
    else:
        opts.update(use_lora="true", lora_r=4, lora_alpha=8, lora_dropout=0.0)
    _zero3("sft/train.py", tmp_path, dict(opts, output_dir=tmp_path / "zero3"))
    _single("sft", tmp_path, dict(opts, output_dir=tmp_path / "single"))
    _assert_same_losses(tmp_path / "zero3", tmp_path / "single", ("loss", "loss_rank", "loss_gen", "loss_dp"))
    files = ["tsarank_head.safetensors"] if variant == "last_token" else ["adapter_model.safetensors"]
    for name in files:
        with safe_open(str(tmp_path / "zero3" / name), "pt") as f3, safe_open(str(tmp_path / "single" / name), "pt") as f1:
            assert set(f3.keys()) == set(f1.keys()) and f1.keys()
            for k in f1.keys():
                torch.testing.assert_close(f3.get_tensor(k).float(), f1.get_tensor(k).float(), atol=1e-4, rtol=1e-3)


TEACHER_SCRIPT = textwrap.dedent('''
    import json, sys, torch
    from tsarank.distributed import setup_cpu_deepspeed
    from tsarank.training.arguments import TsarankTrainingArguments
    from tsarank.training.sft_loss import RankingLossConfig
    from tsarank.training.sft_trainer import RankingTrainer
    from transformers import LlamaConfig, LlamaForCausalLM

    config, out = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    argv = setup_cpu_deepspeed(["--deepspeed", config])
    args = TsarankTrainingArguments(output_dir=out, bf16=True, use_cpu=True, report_to=[], deepspeed=config,
                                    accelerator_config=argv[-1])
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    trainer = RankingTrainer(model=model, args=args, loss_config=RankingLossConfig(group_size=3, loss="distill_kl",
                             lambda_dp=0.0))
    teacher = torch.tensor([[3.14159265, -1.00048828, 0.333333333]])
    batch = trainer._prepare_inputs({"input_ids": torch.ones(3, 4, dtype=torch.long), "teacher": teacher.clone()})
    print(json.dumps({"dtype": str(batch["teacher"].dtype), "equal": bool(torch.equal(batch["teacher"].cpu(), teacher)),
                      "deepspeed": trainer.is_deepspeed_enabled}))
''')


def test_teacher_scores_stay_fp32_under_deepspeed_bf16(tmp_path):
    """The Trainer casts every floating input to the DeepSpeed dtype (bf16 keeps ~3 digits); distillation targets
    must reach the loss as given."""
    script = tmp_path / "teacher.py"
    script.write_text(TEACHER_SCRIPT)
    log = _run(["deepspeed", "--num_gpus", "1", "--master_port", _free_port(), script,
                ROOT / "ds_configs" / "zero3.json", tmp_path / "out"], tmp_path, timeout=300)
    result = json.loads(next(line for line in log.splitlines() if line.startswith('{"dtype"')))
    assert result == {"dtype": "torch.float32", "equal": True, "deepspeed": True}


GUARD_SCRIPT = textwrap.dedent('''
    import json, os, sys, torch
    import torch.distributed as dist
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerControl, TrainerState
    from tsarank.training.arguments import TsarankTrainingArguments
    from tsarank.training.callbacks import NanGuardCallback
    from tsarank.training.cpt_trainer import CausalLMTrainer

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                         num_attention_heads=2, num_key_value_heads=1))
    args = TsarankTrainingArguments(output_dir=sys.argv[1], report_to=[], use_cpu=True)
    trainer = CausalLMTrainer(model=model, args=args)
    trainer._tr_loss = torch.tensor(1.5)
    if rank == 1 and sys.argv[2] == "nan":
        with torch.no_grad():
            model.model.layers[3].mlp.up_proj.weight[0, 0] = float("nan")  # one bad weight on one rank only
    guard = NanGuardCallback().bind(trainer)
    devices, real_all_reduce = [], dist.all_reduce

    def all_reduce(tensor, *a, **k):  # NCCL's rule: the tensor is on the model's device
        devices.append(tensor.device.type)
        return real_all_reduce(tensor, *a, **k)

    class Syncs(TorchDispatchMode):  # host synchronisations: .item(), bool(), ...
        n = 0
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "_local_scalar_dense" in str(func) or "is_nonzero" in str(func):
                Syncs.n += 1
            return func(*args, **(kwargs or {}))

    dist.all_reduce = all_reduce
    torch.set_default_device("meta")  # not the model's device, as CPU is not a GPU run's model device
    try:
        with Syncs():
            control = guard.on_step_end(args, TrainerState(global_step=5), TrainerControl())
    finally:
        torch.set_default_device("cpu")
    # one file per rank: two ranks printing to one pipe can interleave their lines
    with open(os.path.join(sys.argv[3], f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "devices": devices, "model": args.device.type, "syncs": Syncs.n,
                   "stop": control.should_training_stop, "params": sum(1 for _ in model.parameters())}, f)
    # Leave together: a rank exiting while its peer still holds the gloo pair can abort the peer at shutdown
    # ("terminate called without an active exception", exit -6).
    dist.all_reduce = real_all_reduce
    dist.barrier()
    dist.destroy_process_group()
''')


@pytest.mark.parametrize("weights", ["finite", "nan"])
def test_nan_guard_collective_on_model_device_one_sync(tmp_path, weights):
    script = tmp_path / "guard.py"
    script.write_text(GUARD_SCRIPT)
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
          _free_port(), script, tmp_path / "out", weights, tmp_path], tmp_path, timeout=300)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert r["devices"] == [r["model"]]  # exactly one collective, on the model's device
        assert r["syncs"] <= 1 and r["params"] > 20  # not one per parameter
        assert r["stop"] is (weights == "nan")  # a NaN on one rank stops both
