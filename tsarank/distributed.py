"""Process-group helpers: rank and world size, barriers, flags agreed on by every process, and the CPU set-up that
lets ``deepspeed --num_gpus N`` run on a machine without GPUs.

Collectives take tensors on the device of the process group's backend: NCCL accepts only CUDA tensors, gloo only
CPU ones. Callers pass the device their model runs on (``TrainingArguments.device``), never a default-constructed
tensor.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["world", "barrier", "any_process", "setup_cpu_deepspeed", "tears_down_process_group"]


def tears_down_process_group(entry: Any) -> Any:
    """Decorate a command-line entry point: after it returns (or raises), the process group, if any, is destroyed
    before the interpreter exits, so that no communication thread is still running at exit (under load a CPU
    ZeRO-3 rank aborted there: 'terminate called without an active exception', exit status -6)."""
    import functools

    @functools.wraps(entry)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return entry(*args, **kwargs)
        finally:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()

    return wrapper


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when no process group is initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for all processes (no-op when not distributed)."""
    if world()[1] > 1:
        torch.distributed.barrier()


def any_process(flag: torch.Tensor) -> bool:
    """True when ``flag`` (a 0-d or 1-element tensor, nonzero = true) is true on any process.

    ``flag`` must be on the collective's device (the model's device); this is the step's one host synchronisation.
    """
    flag = flag.detach().reshape(1).to(torch.float32)
    if world()[1] > 1:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item() != 0)


def _off(value: object) -> bool:
    return value is None or value is False or (isinstance(value, str) and value.strip().lower() in ("", "none", "false"))


def deepspeed_requested(argv: list[str]) -> bool:
    """Whether the run uses DeepSpeed: the last ``--deepspeed VALUE`` on the command line wins over the ``--config``
    YAML's ``deepspeed:``; ``none`` (or ``false``, empty) turns it off, as ``TsarankTrainingArguments`` does."""
    flag = None
    for i, a in enumerate(argv):
        if a == "--deepspeed":
            flag = argv[i + 1] if i + 1 < len(argv) else ""
        elif a.startswith("--deepspeed="):
            flag = a.split("=", 1)[1]
    if flag is not None:
        return not _off(flag)
    config = None
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            config = argv[i + 1]
        elif a.startswith("--config="):
            config = a.split("=", 1)[1]
    if config and os.path.isfile(config):
        import yaml

        data = yaml.safe_load(Path(config).read_text(encoding="utf-8")) or {}
        return isinstance(data, dict) and not _off(data.get("deepspeed"))
    return False


def setup_cpu_deepspeed(argv: list[str]) -> list[str]:
    """Make ``deepspeed --num_gpus N script.py --deepspeed cfg.json`` work on a machine without GPUs.

    On CPU, ``TrainingArguments`` asks accelerate for a DeepSpeed state without a communication backend and ends up
    with one process. When the script was started by a distributed launcher (``LOCAL_RANK`` set), no CUDA device is
    present, and DeepSpeed is requested (``--deepspeed`` on the command line or ``deepspeed:`` in the ``--config``
    YAML), this initialises the process group with gloo and tells ``TrainingArguments`` to use that state. On GPU
    machines nothing changes.

    Args:
        argv: The command-line arguments of the entry point.

    Returns:
        ``argv``, plus ``--accelerator_config FILE`` when the CPU state was set up.
    """
    if torch.cuda.is_available() or os.environ.get("LOCAL_RANK") is None:
        return argv
    if not deepspeed_requested(argv):
        return argv
    if any(a.startswith("--accelerator_config") for a in argv):
        raise ValueError("--accelerator_config cannot be combined with DeepSpeed on a CPU-only machine")
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
    import atexit

    fd, path = tempfile.mkstemp(prefix="tsarank_accelerator_", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump({"use_configured_state": True}, f)
    atexit.register(lambda: Path(path).unlink(missing_ok=True))
    logger.info("CPU-only DeepSpeed run: process group initialised with gloo")
    return [*argv, "--accelerator_config", path]
