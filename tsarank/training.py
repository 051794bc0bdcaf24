"""Training plumbing shared by both stages: model/tokenizer preparation, checkpoint finalisation and callbacks.

Stage 1 (``cpt/train.py``) and stage 2 (``sft/train.py``) both build their model with :func:`prepare_model`, write
their result with :func:`finalize_checkpoint` and attach the same callbacks with :func:`attach_callbacks`:

* :class:`NanGuardCallback` stops at the first non-finite training loss, saves nothing after it and raises
  :class:`FloatingPointError`, so the last checkpoint on disk is the last good one;
* :class:`ThroughputCallback` adds ``tokens_per_second`` (non-padding tokens, all processes) to each training log;
* :class:`RankingEvalCallback` re-ranks a small candidate set every N steps with the current weights and logs
  ``rank_eval/nDCG@10``.

DeepSpeed on a CPU-only machine (tests, first tries) needs one extra step before the arguments are parsed, see
:func:`setup_cpu_deepspeed`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from transformers import TrainerCallback

from .hub import atomic_write_text, save_tsarank_config
from .modeling import body_and_head, load_causal_lm, resolve_dtype, unwrap_model
from .prompts import PromptTemplate

logger = logging.getLogger(__name__)

PAD_TOKEN = "<|pad|>"
MERGED_DIRNAME = "merged"
TRAINING_ARGS_JSON = "training_args.json"


# ------------------------------------------------------------------------------------------ model + tokenizer
def resolve_model_path(name: str) -> str:
    """``"default"`` -> the local checkpoint of the embedded default model; anything else unchanged."""
    if name == "default":
        from .default_model import default_model_path

        return str(default_model_path())
    return name


def load_tokenizer(name_or_path: str) -> Any:
    """The fast tokenizer of a model (``"default"`` allowed), padding on the right.

    Raises:
        TypeError: when only a slow tokenizer exists (the query span is located with character offsets).
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path), use_fast=True)
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"{name_or_path}: tsarank needs a fast (Rust) tokenizer; none could be loaded")
    # Collators pad on the right; scoring and the loss gather rows by position, so left padding would be harmless
    # but right padding keeps position ids equal to token indices.
    tokenizer.padding_side = "right"
    return tokenizer


def is_zero3() -> bool:
    """True when the current ``TrainingArguments`` asked for DeepSpeed ZeRO stage 3 (parameters are partitioned)."""
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover - very old transformers
        return False
    return bool(is_deepspeed_zero3_enabled())


@contextlib.contextmanager
def gathered(params: Sequence[nn.Parameter], modifier_rank: int | None = None):
    """Under ZeRO-3, gather ``params`` for the duration of the block (writes from ``modifier_rank`` are kept);
    without ZeRO-3 a no-op."""
    if is_zero3():
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params), modifier_rank=modifier_rank):
            yield
    else:
        yield


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
    rows = (emb.weight.ds_shape if hasattr(emb.weight, "ds_shape") else emb.weight.shape)[0]  # ZeRO-3: full shape
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
        model_args: A :class:`tsarank.config.ModelArguments`.
        tokenizer: The model's tokenizer (may gain a pad token).
        training_args: ``TrainingArguments`` (``activation_checkpointing``, ``deepspeed``, ``bf16``) or ``None``.

    Returns:
        The model (a ``PeftModel`` with LoRA), on CPU; the Trainer places it.
    """
    if model_args.use_lora and model_args.train_top_layers:
        raise ValueError(
            "use_lora and train_top_layers are both set; they are alternative ways to limit the trained weights. "
            "Fix: set train_top_layers: 0 to train LoRA adapters, or use_lora: false to train the top blocks."
        )
    if model_args.merge_lora and not model_args.use_lora:
        raise ValueError("merge_lora: true needs use_lora: true (there is no adapter to merge). Fix: drop merge_lora.")
    path = resolve_model_path(model_args.model_name_or_path)
    dtype = training_dtype(model_args, training_args)
    model = load_causal_lm(path, dtype=dtype, attn_implementation=model_args.attn_implementation)
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
        from .layers import freeze_all_but_top

        freeze_all_but_top(model, model_args.train_top_layers)
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


def template_from_args(data_args: Any, scoring_head: str = "query_likelihood") -> PromptTemplate:
    """The :class:`PromptTemplate` described by ``DataArguments``."""
    return PromptTemplate(
        source=data_args.template_source,
        target=data_args.template_target,
        max_doc_tokens=data_args.max_doc_tokens,
        max_query_tokens=data_args.max_query_tokens,
        scoring_head=scoring_head,
    )


# ------------------------------------------------------------------------------------------ forward helper
def forward_hidden(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Last hidden states ``[B, L, H]`` of a causal LM, computed through the model's own top-level forward.

    Going through the top-level module (the DeepSpeed engine, the peft wrapper) rather than calling the decoder
    directly keeps every wrapper's bookkeeping intact: DeepSpeed ZeRO-3 resets its parameter-prefetch trace in a
    hook on the root module, and peft routes through its own forward. The decoder's output is captured with a
    forward hook, and ``logits_to_keep=1`` limits the LM head inside that forward to one position per row, so no
    ``[B, L, V]`` tensor is built; callers apply the head to the rows they need.

    Args:
        model: The model as the Trainer passes it (engine, DDP, peft or plain ``*ForCausalLM``).
        input_ids: ``[B, L]``.
        attention_mask: ``[B, L]`` padding mask, a 4D mask ``[B, 1, L, L]``, or ``None`` (packed rows on FA2).
        position_ids: ``[B, L]`` or ``None``.
    """
    body, _ = body_and_head(model)
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = body.register_forward_hook(hook)
    kwargs: dict[str, Any] = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    lm = unwrap_model(model)
    try:
        if getattr(lm, "_tsarank_no_logits_to_keep", False):
            model(**kwargs)
        else:
            try:
                model(**kwargs, logits_to_keep=1)
            except TypeError as e:  # an architecture whose forward predates logits_to_keep
                if "logits_to_keep" not in str(e) or captured:
                    raise
                logger.warning("%s.forward has no logits_to_keep; its full logits are computed and dropped",
                               type(lm).__name__)
                lm._tsarank_no_logits_to_keep = True
                model(**kwargs)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected the decoder to run once per forward, it ran {len(captured)} times")
    return captured[0]


# ------------------------------------------------------------------------------------------ checkpoints
def _save_sidecars(
    directory: Path, tokenizer: Any, template: PromptTemplate, stage: str, base_model: str,
    training_info: dict[str, Any], args_json: str | None,
) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    save_tsarank_config(directory, template, stage=stage, base_model=base_model, training=training_info)
    if args_json is not None:
        atomic_write_text(directory / TRAINING_ARGS_JSON, args_json)


def merge_lora_checkpoint(
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    tokenizer: Any = None,
    template: PromptTemplate | None = None,
    stage: str | None = None,
    training_info: dict[str, Any] | None = None,
    args_json: str | None = None,
) -> Path:
    """Load base + adapter from disk, merge, and save a full checkpoint to ``out_dir`` atomically.

    Working from the saved adapter (not the in-memory, possibly ZeRO-3-partitioned model) means the merged weights are
    exactly what ``Ranker.from_pretrained(adapter_dir)`` computes, on any number of processes.
    """
    from peft import PeftModel

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    base = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = load_causal_lm(base, dtype=dtype, attn_implementation="auto", device="cpu")
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        _save_sidecars(tmp, tokenizer, template or PromptTemplate(), stage or "", base, training_info or {}, args_json)
        os.chmod(tmp, 0o755)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    return obj


def finalize_checkpoint(
    trainer: Any,
    output_dir: str | os.PathLike,
    template: PromptTemplate,
    stage: str,
    model_args: Any,
    extra_training_info: dict[str, Any] | None = None,
) -> Path:
    """Write the final checkpoint of a run: weights (or LoRA adapter), tokenizer, sidecar, training arguments.

    Every process must call it (under ZeRO-3 ``trainer.save_model`` gathers the partitioned weights into consolidated
    16-bit-or-fp32 tensors; ``stage3_gather_16bit_weights_on_model_save`` must be true). Only the world process zero
    writes. With ``use_lora`` and ``merge_lora`` a merged full checkpoint is also written to ``output_dir/merged``
    (with tokenizer and sidecar): that is the directory ``Ranker.from_pretrained`` and stage 2 load as ``M_cpt``.

    Args:
        trainer: The ``Trainer`` after ``train()``.
        output_dir: Where to write.
        template: The prompt template the model was trained with (saved in ``tsarank_config.json``).
        stage: ``"cpt"`` or ``"sft"``.
        model_args: The run's ``ModelArguments``.
        extra_training_info: More JSON-able facts for the sidecar's ``training`` field (data, losses...).

    Returns:
        The directory a downstream user should load: ``output_dir/merged`` when a merge was written, else
        ``output_dir``.
    """
    output_dir = Path(output_dir)
    # Training turned the KV cache off; the published checkpoint should generate normally.
    unwrap_model(trainer.model).config.use_cache = True
    trainer.save_model(str(output_dir))
    base_model = resolve_model_path(model_args.model_name_or_path)
    info = {"model_args": _jsonable(model_args), **(extra_training_info or {})}
    args_json = trainer.args.to_json_string()
    tokenizer = getattr(trainer, "processing_class", None)
    merged_dir = output_dir / MERGED_DIRNAME
    if trainer.is_world_process_zero():
        trainer.save_state()  # trainer_state.json: the log history of the run
        _save_sidecars(output_dir, tokenizer, template, stage, base_model, info, args_json)
        if model_args.use_lora and model_args.merge_lora:
            dtype = training_dtype(model_args, trainer.args)
            merge_lora_checkpoint(
                output_dir, merged_dir, dtype=dtype, tokenizer=tokenizer, template=template, stage=stage,
                training_info={**info, "merged_from_adapter": str(output_dir)}, args_json=args_json,
            )
            logger.info("merged LoRA checkpoint written to %s", merged_dir)
    trainer.accelerator.wait_for_everyone()
    return merged_dir if (model_args.use_lora and model_args.merge_lora) else output_dir


def resolve_resume_checkpoint(value: str | bool | None, output_dir: str) -> str | None:
    """``--resume_from_checkpoint``: a checkpoint path, or ``true``/``last`` for the newest ``checkpoint-*`` of
    ``output_dir``; ``None``/``false`` for a fresh run."""
    from transformers.trainer_utils import get_last_checkpoint

    if value in (None, False, "", "false", "False", "no"):
        return None
    if value in (True, "true", "True", "last", "yes"):
        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if last is None:
            raise FileNotFoundError(
                f"--resume_from_checkpoint {value}: no checkpoint-* directory in {output_dir}. Fix: pass the "
                "checkpoint path, or start a fresh run without --resume_from_checkpoint."
            )
        return last
    if not os.path.isdir(str(value)):
        raise FileNotFoundError(f"--resume_from_checkpoint {value}: no such checkpoint directory")
    return str(value)


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
    wants_ds = any(a == "--deepspeed" or a.startswith("--deepspeed=") for a in argv)
    if not wants_ds and "--config" in argv:
        i = argv.index("--config")
        if i + 1 < len(argv) and os.path.isfile(argv[i + 1]):
            import yaml

            data = yaml.safe_load(Path(argv[i + 1]).read_text(encoding="utf-8")) or {}
            wants_ds = isinstance(data, dict) and bool(data.get("deepspeed"))
    if not wants_ds:
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


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for all processes (no-op when not distributed)."""
    if _world()[1] > 1:
        torch.distributed.barrier()


# ------------------------------------------------------------------------------------------ callbacks
class _BoundCallback(TrainerCallback):
    """A callback that needs its Trainer (to read the loss or to call ``trainer.log``)."""

    trainer: Any = None

    def bind(self, trainer: Any) -> "_BoundCallback":
        self.trainer = trainer
        return self

    def _require_trainer(self) -> Any:
        if self.trainer is None:
            raise RuntimeError(f"{type(self).__name__} is not bound to its Trainer; add it with attach_callbacks()")
        return self.trainer


class NanGuardCallback(_BoundCallback):
    """Stop training at the first non-finite loss, keep the last good checkpoint, then raise ``FloatingPointError``.

    After every optimizer step (before the Trainer logs, evaluates or saves) it checks the loss accumulated since the
    last log on every process (one all-reduce of a flag). On a NaN/inf it sets ``should_training_stop`` and clears
    ``should_save``/``should_evaluate``, so no checkpoint is written from the corrupted weights; the newest
    ``checkpoint-*`` is therefore from before the bad step. When ``trainer.train()`` ends it raises
    :class:`FloatingPointError` naming the step (other callbacks' ``on_train_end``, e.g. wandb's, run first when this
    callback is attached last, as :func:`attach_callbacks` does).

    The Trainer's ``logging_nan_inf_filter`` (which would hide the NaN) is switched off when the callback is bound.
    """

    def __init__(self) -> None:
        self.bad_step: int | None = None
        self.bad_value: float | None = None

    def bind(self, trainer: Any) -> "NanGuardCallback":
        super().bind(trainer)
        if getattr(trainer.args, "logging_nan_inf_filter", False):
            trainer.args.logging_nan_inf_filter = False
        return self

    def _loss_is_finite(self) -> tuple[bool, float]:
        loss = getattr(self._require_trainer(), "_tr_loss", None)
        if not isinstance(loss, torch.Tensor):
            return True, 0.0
        bad = (~torch.isfinite(loss.detach())).to(torch.float32).reshape(1)
        if _world()[1] > 1:
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        return bool(bad.item() == 0), float(loss.detach().float().item())

    def _stop(self, state: Any, control: Any, value: float) -> None:
        if self.bad_step is None:
            self.bad_step, self.bad_value = state.global_step, value
            logger.error("non-finite training loss (%s) at step %d: stopping without saving", value, state.global_step)
        control.should_training_stop = True
        control.should_save = False
        control.should_evaluate = False

    def _weights_are_finite(self) -> bool:
        """True when every trainable parameter (this process's ZeRO-3 shard, if sharded) is finite.

        A step can keep a finite loss while a NaN/inf gradient corrupts the weights it updates; the loss only
        turns non-finite one step later, after a checkpoint of the bad weights may have been saved.
        """
        model = self._require_trainer().model
        bad = torch.zeros(1)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    t = getattr(p, "ds_tensor", p)  # ZeRO-3 keeps the local shard in ds_tensor
                    if t.numel() and not bool(torch.isfinite(t).all()):
                        bad.fill_(1.0)
                        break
        if _world()[1] > 1:
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        return bool(bad.item() == 0)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        finite, value = self._loss_is_finite()
        if finite and not self._weights_are_finite():
            finite, value = False, float("nan")
            logger.error("non-finite weights after the update of step %d (NaN/inf gradients)", state.global_step)
        if not finite:
            self._stop(state, control, value)
        return control

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> Any:
        loss = (logs or {}).get("loss")
        if isinstance(loss, (int, float)) and not math.isfinite(loss):
            self._stop(state, control, float(loss))
        return control

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.bad_step is not None:
            control.should_save = False
            control.should_evaluate = False
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.bad_step is None:
            return control
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been saved before it"
        raise FloatingPointError(
            f"training loss became non-finite ({self.bad_value}) at step {self.bad_step}; training was stopped and "
            f"nothing was saved from step {self.bad_step} on ({kept}). Fix: lower the learning rate, keep "
            "max_grad_norm > 0, prefer bf16 over fp16, and check the data; then resume with "
            "--resume_from_checkpoint."
        )


class ThroughputCallback(_BoundCallback):
    """Add ``tokens_per_second`` to every training log: non-padding tokens (sum of the attention masks over all
    processes) processed since the previous training log, divided by the time spent inside those optimizer steps
    (``on_step_begin`` to ``on_step_end``), so evaluation, ranking evaluation and checkpointing between steps do not
    count. The Trainer's own ``train_tokens_per_second`` is the wall-clock average since the start.

    Counting relies on the Trainer's ``include_num_input_tokens_seen="non_padding"``, which binding switches on. The
    callback must run before the reporting callbacks (wandb) so that they see the added key, and before other
    callbacks' ``on_step_end`` work (ranking evaluation); :func:`attach_callbacks` puts it first.
    """

    def __init__(self) -> None:
        self._step_start: float | None = None
        self._busy = 0.0
        self._last_tokens = 0

    def bind(self, trainer: Any) -> "ThroughputCallback":
        super().bind(trainer)
        if getattr(trainer.args, "include_num_input_tokens_seen", "no") in ("no", False):
            trainer.args.include_num_input_tokens_seen = "non_padding"
        return self

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self._busy = 0.0
        self._last_tokens = int(state.num_input_tokens_seen or 0)
        return control

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self._step_start = time.perf_counter()
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self._step_start is not None:
            self._busy += time.perf_counter() - self._step_start
            self._step_start = None
        return control

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> Any:
        if logs is None or "loss" not in logs:
            return control
        tokens = int(state.num_input_tokens_seen or 0)
        if self._busy > 0 and tokens > self._last_tokens:
            added = {"tokens_per_second": (tokens - self._last_tokens) / self._busy}
            logs.update(added)
            # The Trainer stored a copy of these logs before calling us; keep its history complete too.
            if state.log_history and state.log_history[-1].get("step") == state.global_step and "loss" in state.log_history[-1]:
                state.log_history[-1].update(added)
        self._busy, self._last_tokens = 0.0, tokens
        return control


class RankingEvalCallback(_BoundCallback):
    """Every ``every_n_steps`` re-rank a small candidate set with the current weights and log nDCG@10.

    Candidates (rank_llm JSON, e.g. DL19 BM25 top-100) and qrels are read when the callback is built, so bad files
    fail before training. Scoring uses :class:`tsarank.inference.Ranker` on the unwrapped model in eval mode (the
    train/eval mode is restored afterwards). Under ZeRO-3 every process scores the same pairs (the parameters are
    gathered layer by layer by DeepSpeed's hooks, which are collective); otherwise only the world process zero scores.
    The metric is logged with ``trainer.log`` as ``rank_eval/nDCG@10`` (wandb shows it as
    ``train/rank_eval/nDCG@10``).

    Args:
        candidates_path: rank_llm JSON of queries with candidate passages.
        qrels_path: Relevance judgments for those queries.
        template: Prompt template (the one being trained).
        every_n_steps: Evaluation period in optimizer steps (0 = never).
        top_k: First-stage candidates re-ranked per query.
        max_queries: Use only the first N queries (``None`` = all).
        measure: ir_measures measure name.
        eval_on_start: Also evaluate before the first step (the starting model's score).
        max_tokens: Token budget per scoring batch (default: the Ranker's per-device default); lower it when the
            training run leaves little free memory.
    """

    def __init__(
        self,
        candidates_path: str | os.PathLike,
        qrels_path: str | os.PathLike,
        template: PromptTemplate,
        every_n_steps: int,
        top_k: int = 20,
        max_queries: int | None = None,
        measure: str = "nDCG@10",
        eval_on_start: bool = False,
        max_tokens: int | None = None,
    ) -> None:
        from .data.formats import load_candidates, read_qrels

        lists, _ = load_candidates(candidates=str(candidates_path), top_k=top_k)
        if max_queries is not None:
            lists = lists[:max_queries]
        qrels = read_qrels(qrels_path)
        self.lists = [c for c in lists if c.qid in qrels]
        if not self.lists:
            raise ValueError(
                f"none of the {len(lists)} queries of {candidates_path} is judged in {qrels_path}. "
                "Fix: pass the qrels file that belongs to these candidates."
            )
        self.qrels = {c.qid: qrels[c.qid] for c in self.lists}
        self.template = template
        self.every_n_steps = every_n_steps
        self.measure = measure
        self.eval_on_start = eval_on_start
        self.max_tokens = max_tokens
        self.key = f"rank_eval/{measure}"
        self.history: list[tuple[int, float]] = []
        self._encoded: list[Any] | None = None

    def evaluate(self, model: nn.Module | None = None) -> float | None:
        """Score the candidates with ``model`` (default: the bound trainer's model) and return the measure.

        Returns ``None`` on processes that do not score (non-zero ranks without ZeRO-3).
        """
        from .evaluation import evaluate
        from .inference import Ranker

        trainer = self._require_trainer()
        root = model if model is not None else trainer.model
        rank, world = _world()
        if world > 1 and not is_zero3() and rank != 0:
            return None
        lm = unwrap_model(root)
        was_training = root.training
        tokenizer = trainer.processing_class
        try:
            ranker = Ranker(lm, tokenizer, self.template, max_tokens=self.max_tokens)  # puts the model in eval mode
            if self._encoded is None:
                self._encoded = [ranker.encode([c.query] * len(c.texts), c.texts) for c in self.lists]
            run = {}
            for c, enc in zip(self.lists, self._encoded):
                scores = ranker.score_encoded(enc)
                run[c.qid] = list(zip(c.docids, scores))
        finally:
            root.train(was_training)
        return evaluate(run, self.qrels, [self.measure])[self.measure]

    def _run(self, state: Any) -> None:
        trainer = self._require_trainer()
        start = time.perf_counter()
        value = self.evaluate()
        if value is not None and trainer.is_world_process_zero():
            self.history.append((state.global_step, value))
            # Trainer.log clears control.should_log; restore it, or this process would skip the step's own loss log
            # (whose all-gather the other processes still enter: a deadlock under DeepSpeed/DDP).
            keep = trainer.control.should_log
            trainer.log({self.key: value, "rank_eval/seconds": time.perf_counter() - start})
            trainer.control.should_log = keep

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.eval_on_start and state.global_step == 0:
            self._run(state)
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.every_n_steps > 0 and state.global_step % self.every_n_steps == 0:
            self._run(state)
        return control


def attach_callbacks(trainer: Any, callbacks: Iterable[TrainerCallback] = ()) -> list[TrainerCallback]:
    """Bind tsarank callbacks to ``trainer`` and insert them where they work.

    :class:`ThroughputCallback` goes first (its key must reach the reporting callbacks), :class:`NanGuardCallback`
    last (its ``on_step_end`` must come after the default flow decided to save, and its ``on_train_end`` raises);
    others are appended.
    """
    added = []
    for cb in callbacks:
        if isinstance(cb, _BoundCallback):
            cb.bind(trainer)
        if isinstance(cb, ThroughputCallback):
            trainer.callback_handler.callbacks.insert(0, cb)
        else:
            trainer.callback_handler.callbacks.append(cb)
        added.append(cb)
    # Keep the NaN guard last even when other callbacks are added after it.
    guards = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, NanGuardCallback)]
    for g in guards:
        trainer.callback_handler.callbacks.remove(g)
        trainer.callback_handler.callbacks.append(g)
    return added


def standard_callbacks(data_args: Any, template: PromptTemplate) -> list[TrainerCallback]:
    """Throughput + NaN guard, plus the ranking evaluation when ``data_args.rank_eval_steps`` and files are set."""
    cbs: list[TrainerCallback] = [ThroughputCallback(), NanGuardCallback()]
    steps = getattr(data_args, "rank_eval_steps", 0)
    cand, qrels = getattr(data_args, "rank_eval_candidates", None), getattr(data_args, "rank_eval_qrels", None)
    if steps and (cand is None or qrels is None):
        raise ValueError("rank_eval_steps > 0 needs rank_eval_candidates and rank_eval_qrels. Fix: set both, or rank_eval_steps: 0")
    if steps:
        cbs.append(
            RankingEvalCallback(cand, qrels, template, steps, top_k=data_args.rank_eval_top_k,
                                max_queries=data_args.rank_eval_max_queries)
        )
    return cbs


# ------------------------------------------------------------------------------------------ model cards
def card_hyperparameters(training_args: Any, model_args: Any) -> dict[str, Any]:
    """The training settings shown in a model card's hyper-parameter table."""
    keys = ("learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "num_train_epochs", "max_steps",
            "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "bf16")
    hp = {k: getattr(training_args, k) for k in keys}
    hp["lr_scheduler_type"] = str(getattr(hp["lr_scheduler_type"], "value", hp["lr_scheduler_type"]))
    hp["world_size"] = training_args.world_size
    hp["deepspeed"] = training_args.deepspeed if isinstance(training_args.deepspeed, str) else bool(training_args.deepspeed)
    hp["train_top_layers"] = model_args.train_top_layers
    hp["use_lora"] = model_args.use_lora
    if model_args.use_lora:
        hp["lora_r"], hp["lora_alpha"] = model_args.lora_r, model_args.lora_alpha
    return hp


def last_rank_eval(callbacks: Sequence[Any], data_args: Any) -> dict[str, Any] | None:
    """The last ranking evaluation of the run, for the model card."""
    for cb in callbacks:
        history = getattr(cb, "history", None)
        if history:
            name = Path(data_args.rank_eval_candidates or "evaluation").name
            step, value = history[-1]
            return {name: {getattr(cb, "measure", "nDCG@10"): value, "step": step}}
    return None
