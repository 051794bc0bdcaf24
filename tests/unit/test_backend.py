"""Device, dtype and attention choice (tsarank/backend.py) on emulated GPUs: the two device facts the rules read,
``cuda_capability`` and ``flash_attn_available``, are replaced; everything else is the real code."""

from __future__ import annotations

import pytest
import torch

from tsarank import backend
from tsarank.backend import resolve_attn_implementation, resolve_dtype

GPUS = {"A100": (8, 0), "H100": (9, 0), "V100": (7, 0), "T4": (7, 5)}


@pytest.fixture()
def gpu(monkeypatch):
    """``gpu(name, flash=True)`` makes ``cuda`` devices look like that GPU, with or without flash-attn."""

    def set_gpu(name: str, flash: bool = True) -> None:
        cap = GPUS[name]
        monkeypatch.setattr(backend, "cuda_capability", lambda device: cap if device.type == "cuda" else None)
        monkeypatch.setattr(backend, "flash_attn_available", lambda: flash)
        # torch's own check counts emulation (True on V100/T4 with recent CUDA): it must not decide.
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        monkeypatch.setattr(backend, "cpu_bf16_flags", lambda: set())  # a host CPU without bf16 instructions

    return set_gpu


@pytest.mark.parametrize("name,expected", [("A100", torch.bfloat16), ("H100", torch.bfloat16),
                                           ("V100", torch.float32), ("T4", torch.float32)])
def test_auto_dtype_is_bf16_only_where_native(gpu, name, expected):
    gpu(name)
    assert resolve_dtype("auto", "cuda") == expected
    assert resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype("fp16", "cuda") == torch.float16  # explicit wins


@pytest.mark.parametrize("name,flash,dtype,expected", [
    ("A100", True, torch.bfloat16, "flash_attention_2"),
    ("H100", True, torch.float16, "flash_attention_2"),
    ("A100", True, torch.float32, "sdpa"),  # flash-attn refuses fp32
    ("A100", False, torch.bfloat16, "sdpa"),  # not installed
    ("T4", True, torch.float16, "sdpa"),  # pre-Ampere: flash-attn 2 needs sm80+
    ("V100", True, torch.float16, "sdpa"),
])
def test_auto_attention(gpu, name, flash, dtype, expected):
    gpu(name, flash)
    assert resolve_attn_implementation("auto", "cuda", dtype) == expected
    assert resolve_attn_implementation("auto", "cpu", torch.bfloat16) == "sdpa"


def test_auto_attention_follows_auto_dtype(gpu):
    gpu("A100")
    assert resolve_attn_implementation("auto", "cuda") == "flash_attention_2"  # auto dtype = bf16 there
    gpu("T4")
    assert resolve_attn_implementation("auto", "cuda") == "sdpa"


@pytest.mark.parametrize("name,flash,device,dtype,needle", [
    ("A100", False, "cuda", torch.bfloat16, "flash-attn package is not installed"),
    ("A100", True, "cpu", torch.bfloat16, "needs a CUDA device"),
    ("T4", True, "cuda", torch.float16, "Ampere-or-newer GPU (compute capability >= 8.0), this one is 7.5"),
    ("A100", True, "cuda", torch.float32, "computes in fp16/bf16 only, the model computes in float32"),
])
def test_explicit_flash_attention_says_why_not(gpu, name, flash, device, dtype, needle):
    gpu(name, flash)
    with pytest.raises(ValueError, match="cannot run here") as err:
        resolve_attn_implementation("flash_attention_2", device, dtype)
    assert needle in str(err.value) and "attn_implementation='auto'" in str(err.value)


def test_explicit_flash_attention_where_it_can_run(gpu):
    gpu("H100")
    assert resolve_attn_implementation("flash_attention_2", "cuda", torch.bfloat16) == "flash_attention_2"
    assert resolve_attn_implementation("eager", "cuda", torch.float32) == "eager"  # others pass through


def test_training_attention_uses_the_autocast_dtype(gpu):
    """fp32 master weights trained with --bf16 compute attention in bf16 (autocast): FlashAttention-2 can run."""
    from types import SimpleNamespace

    from tsarank.training.model_setup import training_compute_dtype

    gpu("A100")
    bf16_args = SimpleNamespace(bf16=True, fp16=False)
    assert training_compute_dtype(torch.float32, bf16_args) == torch.bfloat16
    assert resolve_attn_implementation("auto", "cuda", training_compute_dtype(torch.float32, bf16_args)) \
        == "flash_attention_2"
    fp32_args = SimpleNamespace(bf16=False, fp16=False)
    assert resolve_attn_implementation("auto", "cuda", training_compute_dtype(torch.float32, fp32_args)) == "sdpa"


def test_cpu_bf16_flags_read_from_proc_cpuinfo():
    """Against an independent reading of the same file: the flags line of every processor, split by hand."""
    from pathlib import Path

    info = Path("/proc/cpuinfo")
    if not info.is_file():
        assert backend.cpu_bf16_flags() == set()
        return
    flag_lines = [line for line in info.read_text().splitlines() if line.split(":")[0].strip() == "flags"]
    expected = {f for f in ("avx512_bf16", "amx_bf16") if f" {f} " in f" {flag_lines[0].split(':', 1)[1]} "}
    assert backend.cpu_bf16_flags() == expected


@pytest.mark.parametrize("flags, expected", [
    (set(), torch.float32),  # AVX2-only or AVX512 without BF16: bf16 would be emulated, slower
    ({"avx512_bf16"}, torch.bfloat16),  # Cooper Lake, Zen 4
    ({"amx_bf16"}, torch.bfloat16),  # Sapphire Rapids and newer
    ({"avx512_bf16", "amx_bf16"}, torch.bfloat16),
])
def test_auto_dtype_on_cpu_follows_its_bf16_instructions(monkeypatch, flags, expected):
    monkeypatch.setattr(backend, "cpu_bf16_flags", lambda: flags)
    assert resolve_dtype("auto", "cpu") == expected and resolve_dtype(None, torch.device("cpu")) == expected
    assert resolve_dtype("float32", "cpu") == torch.float32  # explicit wins
    assert resolve_attn_implementation("auto", "cpu") == "sdpa"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only rule")
@pytest.mark.parametrize("flags", [set(), {"amx_bf16"}])
def test_unset_bf16_trains_in_bf16_on_cpus_that_have_it(monkeypatch, tmp_path, flags):
    from tsarank.training.arguments import TsarankTrainingArguments, parse_stage_args

    monkeypatch.setattr(backend, "cpu_bf16_flags", lambda: flags)
    base = ["--output_dir", str(tmp_path / "o"), "--report_to", "none"]
    (unset,) = parse_stage_args([TsarankTrainingArguments], base)
    assert unset.bf16 is bool(flags)
    for given, value in ((["--bf16", "false"], False), (["--bf16"], True), (["--bf16", "true"], True)):
        (args,) = parse_stage_args([TsarankTrainingArguments], [*base, *given])
        assert args.bf16 is value  # an explicit choice always wins
    config = tmp_path / "c.yaml"
    config.write_text("bf16: false\n")
    (args,) = parse_stage_args([TsarankTrainingArguments], [*base, "--config", str(config)])
    assert args.bf16 is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only rule")
def test_quick_demo_spends_bf16_speed_on_deeper_beir_evaluation(monkeypatch):
    from tsarank.demo import PRESETS, for_this_machine

    quick = PRESETS["quick"]
    monkeypatch.setattr(backend, "cpu_bf16_flags", lambda: set())
    assert for_this_machine(quick) == quick  # a CPU without bf16 instructions: unchanged
    monkeypatch.setattr(backend, "cpu_bf16_flags", lambda: {"amx_bf16"})
    fast = for_this_machine(quick)
    assert fast.max_queries == {**quick.max_queries, "scifact": 30, "nfcorpus": 30} and fast.beir_top_k == 20
    # Training sizes unchanged, so models trained on either machine compare.
    assert (fast.cpt_steps, fast.sft_steps, fast.weak_pairs, fast.top_k) == \
           (quick.cpt_steps, quick.sft_steps, quick.weak_pairs, quick.top_k)
    assert for_this_machine(PRESETS["full"]) == PRESETS["full"]
