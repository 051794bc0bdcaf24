"""Model and tokenizer set-up for training: what both stages do between parsing options and building a Trainer.

:func:`prepare_model` loads the causal LM with tsarank's device / dtype / attention rules, adds a pad token when the
tokenizer has none, enables gradient checkpointing, and limits what is trained (LoRA adapters or the top blocks).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..modeling import load_causal_lm
from ..backend import resolve_dtype
from ..wrappers import full_shape, gathered

logger = logging.getLogger(__name__)

__all__ = [
    "PAD_TOKEN",
    "resolve_model_path",
    "load_tokenizer",
    "training_dtype",
    "training_compute_dtype",
    "add_pad_token",
    "prepare_model",
    "count_parameters",
]

PAD_TOKEN = "<|pad|>"


def resolve_model_path(name: str) -> str:
    """``"default"`` -> the local checkpoint of the embedded default model; anything else unchanged."""
    if name == "default":
        from ..default_model import default_model_path

        return str(default_model_path())
    return name


def looks_like_hub_id(value: str) -> bool:
    """``ORG/NAME``: two non-empty parts, not a relative or absolute path."""
    parts = value.split("/")
    return len(parts) == 2 and all(parts) and not value.startswith((".", "/", "~"))


def check_model_source(value: str | None, flag: str, needs_tokenizer: bool = True) -> None:
    """Before anything loads: a model option names ``default``, a Hub id ``ORG/NAME``, or a directory holding a
    causal LM (``config.json`` with a ``*ForCausalLM`` / ``*LMHeadModel`` architecture).

    Args:
        value: The option's value.
        flag: The option's name, for messages.
        needs_tokenizer: The tokenizer is read from this model too (the policy, not the frozen reference).

    Raises:
        OptionError: A missing path, a file, a directory without ``config.json`` (a LoRA adapter is named as such),
            another kind of model, or no tokenizer files where one is needed; the message names the option.
    """
    from pathlib import Path

    from ..errors import ModelLoadError
    from ..loading import check_checkpoint_files, read_json
    from .arguments import OptionError

    if not value or value == "default":
        return
    p = Path(value)
    if not p.exists():
        if looks_like_hub_id(value):
            return  # from_pretrained resolves it
        raise OptionError(f"--{flag} {value}: no such directory (and not a Hub id ORG/NAME)")
    if not p.is_dir():
        raise OptionError(f"--{flag} {value} is a file; pass a checkpoint directory (config.json + weights)")
    if not (p / "config.json").is_file():
        if (p / "adapter_config.json").is_file():
            raise OptionError(f"--{flag} {value} is a LoRA adapter directory; pass its merged checkpoint "
                              f"({p / 'merged'} when trained with merge_lora) or the base model")
        raise OptionError(f"--{flag} {value}: no config.json in this directory; pass a checkpoint directory "
                          "(config.json + weights) or a Hub id")
    try:
        archs = read_json(p / "config.json").get("architectures") or []
    except ModelLoadError as exc:
        raise OptionError(f"--{flag} {value}: {exc}") from None
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise OptionError(f"--{flag} {value} is a {', '.join(archs)} checkpoint; both stages train a causal LM "
                          "(a *ForCausalLM architecture)")
    try:
        check_checkpoint_files(p, needs_tokenizer=needs_tokenizer)
    except (FileNotFoundError, ModelLoadError) as exc:
        raise OptionError(f"--{flag} {exc}") from None


def load_tokenizer(name_or_path: str) -> Any:
    """The fast tokenizer of a model (``"default"`` allowed), padding on the right.

    Raises:
        TypeError: when only a slow tokenizer exists (the query span is located with character offsets).
    """
    from ..loading import load_tokenizer_checked

    tokenizer = load_tokenizer_checked(resolve_model_path(name_or_path), use_fast=True)
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"{name_or_path}: tsarank needs a fast (Rust) tokenizer; none could be loaded")
    # Collators pad on the right; scoring and the loss gather rows by position, so left padding would be harmless
    # but right padding keeps position ids equal to token indices.
    tokenizer.padding_side = "right"
    return tokenizer


def training_dtype(model_args: Any, training_args: Any | None) -> torch.dtype:
    """Dtype to load the weights in for training.

    ``"auto"``: bf16 weights only under DeepSpeed with ``bf16`` (DeepSpeed keeps fp32 master weights); otherwise fp32
    weights, and ``--bf16`` then means autocast mixed precision. An explicit ``dtype`` is honoured.
    """
    requested = getattr(model_args, "dtype", "auto")
    if requested not in (None, "auto"):
        dtype = resolve_dtype(requested, None)
        if dtype != torch.float32 and not getattr(training_args, "deepspeed", None):
            logger.warning(
                "training with %s weights and no DeepSpeed: the optimizer updates low-precision weights directly "
                "(no fp32 master copy). For mixed precision use dtype: auto with --bf16 true.", dtype
            )
        return dtype
    if training_args is not None and getattr(training_args, "deepspeed", None) and getattr(training_args, "bf16", False):
        return torch.bfloat16
    return torch.float32


def training_compute_dtype(weights: torch.dtype, training_args: Any | None) -> torch.dtype:
    """The dtype the model computes in: the autocast dtype under ``--bf16`` / ``--fp16``, else the weights'."""
    if training_args is not None and getattr(training_args, "bf16", False):
        return torch.bfloat16
    if training_args is not None and getattr(training_args, "fp16", False):
        return torch.float16
    return weights


def add_pad_token(model: nn.Module, tokenizer: Any, token: str = PAD_TOKEN) -> int:
    """Add a pad token to ``tokenizer`` and initialise its embedding (and untied output row) to the mean embedding.

    The mean is taken over the rows of the tokens that existed before (not over spare rows of a padded matrix),
    so the new token starts as an "average token" instead of a random vector (Hewitt, 2021).

    Returns:
        The pad token id.
    """
    n_before = len(tokenizer)
    tokenizer.add_special_tokens({"pad_token": token})
    pad_id = int(tokenizer.pad_token_id)
    emb = model.get_input_embeddings()
    rows = full_shape(emb.weight)[0]  # under ZeRO-3 the local shape is a placeholder
    n_before = min(n_before, rows)
    if len(tokenizer) > rows:
        # mean_resizing=False: the row is set below to the exact mean (transformers would sample around it).
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        emb = model.get_input_embeddings()
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is emb.weight
    params = [emb.weight] + ([] if out is None or tied else [out.weight])
    with gathered(params, modifier_rank=0):
        with torch.no_grad():
            emb.weight[pad_id] = emb.weight[:n_before].float().mean(0).to(emb.weight.dtype)
            if out is not None and not tied:
                out.weight[pad_id] = out.weight[:n_before].float().mean(0).to(out.weight.dtype)
    model.config.pad_token_id = pad_id
    logger.warning("the tokenizer had no pad token; added %r (id %d) with the mean embedding", token, pad_id)
    return pad_id


def _linear_module_names(model: nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def prepare_model(model_args: Any, tokenizer: Any, training_args: Any | None = None) -> nn.Module:
    """Load the causal LM to train and apply the model options of ``ModelArguments``.

    In order: load with tsarank's dtype/attention rules (under ZeRO-3 transformers loads straight into partitioned
    parameters), add a pad token when missing, turn the KV cache off, enable non-reentrant gradient checkpointing when
    ``training_args.activation_checkpointing`` (v5's name; ``gradient_checkpointing`` is its alias), then wrap with
    LoRA (``use_lora``) or freeze all but the top ``train_top_layers`` blocks.

    With LoRA a missing pad token is not added (the adapter could not carry the resized embedding); the EOS token
    pads instead, which is harmless because padded positions are never attended to nor scored.

    Args:
        model_args: A :class:`tsarank.training.arguments.ModelArguments`.
        tokenizer: The model's tokenizer (may gain a pad token).
        training_args: ``TrainingArguments`` (``activation_checkpointing``, ``deepspeed``, ``bf16``) or ``None``.

    Returns:
        The model (a ``PeftModel`` with LoRA), on CPU; the Trainer places it.
    """
    path = resolve_model_path(model_args.model_name_or_path)
    dtype = training_dtype(model_args, training_args)
    model = load_causal_lm(path, dtype=dtype, attn_implementation=model_args.attn_implementation,
                           compute_dtype=training_compute_dtype(dtype, training_args))
    model.config.use_cache = False  # training never reuses a KV cache; keeping it on only costs memory

    if tokenizer.pad_token_id is None:
        if model_args.use_lora:
            if tokenizer.eos_token is None:
                raise ValueError(f"{path}: the tokenizer has neither a pad nor an EOS token; add a pad token first")
            tokenizer.pad_token = tokenizer.eos_token
            logger.warning("no pad token; with LoRA the EOS token %r pads (padded positions are masked)", tokenizer.eos_token)
        else:
            add_pad_token(model, tokenizer)

    # transformers v5 calls it activation_checkpointing (gradient_checkpointing is its deprecated alias).
    ckpt_flag, ckpt_kwargs = (
        ("activation_checkpointing", "activation_checkpointing_kwargs")
        if training_args is not None and hasattr(training_args, "activation_checkpointing")
        else ("gradient_checkpointing", "gradient_checkpointing_kwargs")
    )
    if training_args is not None and getattr(training_args, ckpt_flag, False):
        kwargs = dict(getattr(training_args, ckpt_kwargs, None) or {})
        kwargs.setdefault("use_reentrant", False)  # reentrant checkpointing breaks with frozen inputs (LoRA, top-N)
        setattr(training_args, ckpt_kwargs, kwargs)
        if hasattr(training_args, "gradient_checkpointing_kwargs"):
            training_args.gradient_checkpointing_kwargs = kwargs
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    if model_args.use_lora:
        from peft import LoraConfig, get_peft_model

        targets = list(model_args.lora_target_modules)
        available = _linear_module_names(model)
        missing = [t for t in targets if t not in available]
        if len(missing) == len(targets):
            raise ValueError(
                f"lora_target_modules {targets} match no Linear module of {type(model).__name__}. "
                f"Fix: choose among {sorted(available)}"
            )
        if missing:
            logger.warning("lora_target_modules %s are not in this model and are ignored", missing)
        config = LoraConfig(
            task_type="CAUSAL_LM",
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            target_modules=[t for t in targets if t in available],
        )
        model = get_peft_model(model, config)
    elif model_args.train_top_layers:
        from ..layers import freeze_all_but_top

        freeze_all_but_top(model, model_args.train_top_layers, train_final_norm=model_args.train_final_norm,
                           train_lm_head=model_args.train_lm_head)
    trainable, total = count_parameters(model)
    logger.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; correct under ZeRO-3 (uses the full shapes) and tied weights."""
    trainable = total = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
