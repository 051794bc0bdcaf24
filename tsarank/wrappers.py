"""What wraps a model, and whether its parameters are ZeRO-3 partitioned: the one place that knows.

A model reaches tsarank's code as a plain ``*ForCausalLM``, a peft ``PeftModel`` (LoRA), a DDP module or a
DeepSpeed engine, possibly nested (engine -> peft -> causal LM). Under DeepSpeed ZeRO-3 each parameter holds only
this process's shard; its full tensor exists between a gather and the matching release.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator

from torch import nn

__all__ = [
    "unwrap_model",
    "unwrap_parallel",
    "is_peft_model",
    "is_deepspeed_engine",
    "is_zero3_param",
    "zero3_enabled",
    "gathered",
    "full_shape",
    "call_as_forward",
]


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """Strip DDP / DeepSpeed engine wrappers (``.module``), keeping a peft wrapper."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def is_peft_model(model: nn.Module) -> bool:
    """True for a peft ``PeftModel`` (possibly inside DDP / DeepSpeed)."""
    m = unwrap_parallel(model)
    return type(m).__name__.startswith("Peft") and hasattr(m, "disable_adapter")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The underlying ``*ForCausalLM`` of a peft / DDP / DeepSpeed wrapper."""
    while True:
        model = unwrap_parallel(model)
        if type(model).__name__.startswith("Peft") and hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def is_deepspeed_engine(model: Any) -> bool:
    return type(model).__name__ == "DeepSpeedEngine"


def is_zero3_param(param: Any) -> bool:
    """True for a parameter managed by ZeRO-3 (partitioned; gathered only around its module's use)."""
    return hasattr(param, "ds_id")


def zero3_enabled(training_args: Any = None) -> bool:
    """Whether ZeRO stage 3 is on: from ``training_args`` when given, else from transformers' global DeepSpeed
    config (set while ``TrainingArguments`` with a ZeRO-3 config is alive)."""
    if training_args is not None:
        if not getattr(training_args, "deepspeed", None):
            return False
        hf_ds = getattr(training_args, "hf_deepspeed_config", None)
        return bool(hf_ds is not None and hf_ds.is_zero3())
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover - transformers without the integration
        return False
    return bool(is_deepspeed_zero3_enabled())


def full_shape(param: Any) -> tuple[int, ...]:
    """The parameter's full shape (ZeRO-3 keeps it in ``ds_shape`` while ``shape`` is the local placeholder)."""
    return tuple(param.ds_shape) if hasattr(param, "ds_shape") else tuple(param.shape)


@contextlib.contextmanager
def gathered(params: Iterable[Any], modifier_rank: int | None = None) -> Iterator[None]:
    """Gather the ZeRO-3 partitioned ``params`` for the block (a collective: every process must enter it the same
    number of times); writes made by ``modifier_rank`` are kept. Other parameters pass through untouched."""
    zero3 = [p for p in params if p is not None and is_zero3_param(p)]
    if not zero3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(zero3, modifier_rank=modifier_rank):
        yield


def call_as_forward(module: nn.Module, fn: Callable[..., Any], *args: Any) -> Any:
    """Call ``module(*args)`` with ``fn`` standing in for its forward.

    The module's hooks wrap the call as any other: under ZeRO-3 they gather the module's partitioned parameters before
    ``fn`` runs and again before its backward, and hand the gradients back to the partitions; accelerate's offload
    hooks move the weights in. ``fn`` reads the parameters from ``module`` (``module.weight``), which only hold their
    full values inside such a call.
    """
    had = "forward" in module.__dict__
    old = module.__dict__.get("forward")
    module.forward = fn  # an instance attribute shadows the class's forward
    try:
        return module(*args)
    finally:
        if had:
            module.forward = old
        else:
            del module.forward
