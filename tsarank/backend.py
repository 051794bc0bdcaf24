"""Device, dtype and attention-backend choice: the rules every loader in tsarank follows.

- **device**: ``None`` means CUDA when available, else CPU.
- **dtype** ``"auto"``: bf16 where the device computes it natively (CUDA compute capability 8.0 or newer:
  Ampere, Hopper, ...; a CPU with AVX512-BF16 or AMX), fp32 otherwise. ``torch.cuda.is_bf16_supported()`` also
  counts emulation, which would give V100 / T4 slow bf16; the capability is what decides here. On CPUs,
  ``scripts/bench_cpu_bf16.py`` measures the rule: on a Xeon with AMX, 2.3x the docs/s at nDCG@10 within 0.0002 of
  fp32. CPUs with AVX512-BF16 but no AMX (Cooper Lake, Zen 4) are expected to gain less and have not been measured
  yet: run the script there, and pass ``dtype="float32"`` where it shows no gain. A CPU without either emulates bf16
  slowly and keeps fp32.
- **attention** ``"auto"``: FlashAttention-2 when all of its conditions hold (the ``flash_attn`` package imports,
  a CUDA device of capability 8.0 or newer, fp16/bf16 compute), SDPA otherwise. Asking for
  ``"flash_attention_2"`` explicitly when a condition fails is an error that names the condition and the fix,
  never a silent fallback.

The device facts come from :func:`cuda_capability`, :func:`cpu_bf16_flags` and :func:`flash_attn_available` alone,
so tests can emulate any GPU or CPU by replacing those functions.
"""

from __future__ import annotations

import importlib.util

import torch

__all__ = [
    "FLASH_ATTENTION",
    "flash_attn_available",
    "cuda_capability",
    "resolve_device",
    "native_bf16",
    "cpu_bf16_flags",
    "resolve_dtype",
    "resolve_attn_implementation",
    "from_pretrained_attn",
    "check_device_available",
]

FLASH_ATTENTION = "flash_attention_2"
#: FlashAttention-2 kernels exist for these compute dtypes only.
FLASH_DTYPES = (torch.float16, torch.bfloat16)
#: FlashAttention-2 and native bf16 need an Ampere-or-newer GPU.
MIN_CAPABILITY = (8, 0)

_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def flash_attn_available() -> bool:
    """True when the ``flash_attn`` package is installed."""
    return importlib.util.find_spec("flash_attn") is not None


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """Compute capability ``(major, minor)`` of a CUDA device; ``None`` for any other device."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``None`` means CUDA when available, else CPU; anything else goes through ``torch.device``."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device; use cpu, cuda or cuda:N") from None


def check_device_available(device: torch.device | str | None) -> torch.device:
    """:func:`resolve_device`, and the device must exist here: a user's ``--device cuda`` on a CPU-only torch is a
    one-line error before any work, not an assertion inside torch after the model has loaded.

    Raises:
        ValueError: No CUDA (CPU-only torch build, or no visible GPU), or a CUDA index beyond the visible devices.
    """
    dev = resolve_device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build of torch" if torch.version.cuda is None else "no visible CUDA device"
            raise ValueError(f"device {str(device)!r} asked for, but this machine has {build}. Fix: --device cpu (or "
                             "leave it unset: CUDA when available, else CPU)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return dev


#: x86 CPU flags (``/proc/cpuinfo``) of instructions that compute bf16 in hardware: AVX512-BF16 (Cooper Lake, Zen 4
#: and newer) and AMX (Sapphire Rapids and newer).
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_bf16_flags() -> set[str]:
    """The :data:`CPU_BF16_FLAGS` this CPU reports in ``/proc/cpuinfo`` (empty where there is no such file)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split()) & set(CPU_BF16_FLAGS)
    except OSError:
        pass
    return set()


def native_bf16(device: torch.device | str | None) -> bool:
    """True when ``device`` computes bf16 natively: CUDA capability >= 8.0, or a CPU with AVX512-BF16 or AMX."""
    dev = resolve_device(device)
    if dev.type == "cpu":
        return bool(cpu_bf16_flags())
    cap = cuda_capability(dev)
    return cap is not None and cap >= MIN_CAPABILITY


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | str | None) -> torch.dtype:
    """The weights' dtype: an explicit name or ``torch.dtype`` as given; ``None``/``"auto"`` per the module rules.

    Raises:
        ValueError: An unknown name.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPE_NAMES)} or 'auto', got {dtype!r}")
    return _DTYPE_NAMES[dtype]


def resolve_attn_implementation(
    requested: str | None, device: torch.device | str | None, dtype: torch.dtype | str | None = None
) -> str:
    """The attention backend to load the model with.

    Args:
        requested: ``"auto"`` (or ``None``), ``"sdpa"``, ``"eager"``, ``"flash_attention_2"``, or any other name
            transformers knows (passed through).
        device: Where the model runs.
        dtype: The compute dtype (the weights' dtype, or the autocast dtype when training with fp32 master weights
            under ``--bf16``); ``None`` = :func:`resolve_dtype` ``"auto"``.

    Raises:
        ValueError: ``"flash_attention_2"`` requested where it cannot run; the message says why and what to do.
    """
    requested = requested or "auto"
    dev = resolve_device(device)
    compute = resolve_dtype(dtype, dev)
    cap = cuda_capability(dev)
    problems = []
    if not flash_attn_available():
        problems.append("the flash-attn package is not installed (pip install 'tsarank[gpu]' on a CUDA machine)")
    if cap is None:
        problems.append(f"it needs a CUDA device, the model runs on {dev.type}")
    elif cap < MIN_CAPABILITY:
        problems.append(f"it needs an Ampere-or-newer GPU (compute capability >= 8.0), this one is "
                        f"{cap[0]}.{cap[1]}")
    if compute not in FLASH_DTYPES:
        problems.append(f"it computes in fp16/bf16 only, the model computes in {str(compute).replace('torch.', '')} "
                        "(load with dtype='bfloat16', or train with --bf16)")
    if requested == "auto":
        return "sdpa" if problems else FLASH_ATTENTION
    if requested == FLASH_ATTENTION and problems:
        raise ValueError(
            "attn_implementation='flash_attention_2' cannot run here: " + "; ".join(problems)
            + ". Fix: attn_implementation='auto' picks SDPA where FlashAttention-2 cannot run."
        )
    return requested


def from_pretrained_attn(
    requested: str | None, device: torch.device | str | None, dtype: torch.dtype | str | None = None
) -> str | None:
    """The ``attn_implementation`` to pass to ``from_pretrained``: :func:`resolve_attn_implementation`, except that
    ``"auto"`` without FlashAttention-2 gives ``None``, transformers' own choice: SDPA where the architecture has it,
    eager where it has not (BLOOM, used by RankingGPT-bloom-560m, has no SDPA path and refuses ``"sdpa"``)."""
    chosen = resolve_attn_implementation(requested, device, dtype)
    return None if (requested or "auto") == "auto" and chosen == "sdpa" else chosen
