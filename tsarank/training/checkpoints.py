"""Checkpoints of a training run: every directory the Trainer writes is loadable by ``Ranker``.

- :class:`SidecarMixin` makes both stage trainers write ``tsarank_config.json`` (template, scoring head, budgets,
  stage) into every directory they save the model to: the final output and each intermediate ``checkpoint-N``;
- :func:`finalize_checkpoint` writes the run's result (weights or LoRA adapter, tokenizer, sidecar, training
  arguments) and, with ``merge_lora``, a merged full checkpoint beside it;
- :func:`check_output_dir` and :func:`resolve_resume_checkpoint` decide, before any work, where a run writes and
  whether it continues an earlier one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_directory, atomic_write_text
from ..hub import save_tsarank_config
from ..modeling import load_causal_lm
from ..prompts import PromptTemplate
from ..wrappers import unwrap_model
from .model_setup import resolve_model_path, training_dtype

logger = logging.getLogger(__name__)

__all__ = [
    "MERGED_DIRNAME",
    "TRAINING_ARGS_JSON",
    "SidecarMixin",
    "check_output_dir",
    "output_dir_lock",
    "resolve_resume_checkpoint",
    "merge_lora_checkpoint",
    "finalize_checkpoint",
]

MERGED_DIRNAME = "merged"
TRAINING_ARGS_JSON = "training_args.json"


class SidecarMixin:
    """Mixed into a ``Trainer``: every model save also writes ``tsarank_config.json``.

    ``Trainer._save`` is what both the final ``save_model`` and each intermediate ``checkpoint-N`` go through (on
    the process that writes; under ZeRO-3 after the weights were consolidated), so no checkpoint directory lacks
    the template it was trained with. Set :attr:`tsarank_sidecar` before training.
    """

    #: ``{"template": PromptTemplate, "stage": str, "base_model": str, "training": dict}``
    tsarank_sidecar: dict[str, Any] | None = None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict=state_dict)  # type: ignore[misc]
        side = self.tsarank_sidecar
        # Under ZeRO-3 every process enters _save (for the collective gathers); only the writer writes.
        if side is not None and self.args.should_save:  # type: ignore[attr-defined]
            directory = output_dir if output_dir is not None else self.args.output_dir  # type: ignore[attr-defined]
            save_tsarank_config(directory, side["template"], stage=side.get("stage"),
                                base_model=side.get("base_model"), training=side.get("training"))


def check_output_dir(output_dir: str, overwrite: bool, resuming: bool) -> None:
    """Refuse to write into a non-empty ``output_dir`` unless asked (``--overwrite_output_dir``) or resuming."""
    p = Path(output_dir)
    if p.exists() and not p.is_dir():
        raise FileExistsError(f"--output_dir {output_dir} is a file, not a directory. Fix: choose a directory path")
    from ..atomic import check_writable_dir, nearest_existing

    existing = nearest_existing(p)  # the directory that the run will create in
    if not existing.is_dir():
        raise FileExistsError(f"--output_dir {output_dir}: {existing} is a file, so the directory cannot be created")
    check_writable_dir(existing, "--output_dir")
    if p.exists() and any(p.iterdir()) and not (overwrite or resuming):
        raise FileExistsError(
            f"output_dir {output_dir} exists and is not empty. Fix: choose a new --output_dir, pass "
            f"--resume_from_checkpoint to continue it, or --overwrite_output_dir true to write into it anyway."
        )


def output_dir_lock(output_dir: str) -> Any:
    """The :class:`tsarank.atomic.OutputLock` of ``output_dir`` (``OUTPUT_DIR.lock`` beside it), taken by the global
    rank 0 only: a second training run into the same directory stops before loading anything."""
    import contextlib

    from ..atomic import OutputLock

    if int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    return OutputLock(output_dir, "training run", flag="--output_dir")


class TrainingInterrupted(Exception):
    """Ctrl-C (SIGINT) during training; the message says what was kept and how to continue."""


def train_or_explain_interrupt(trainer: Any, resume: str | None) -> None:
    """``trainer.train(resume_from_checkpoint=resume)``; a Ctrl-C becomes :class:`TrainingInterrupted` naming the
    newest checkpoint of the output directory and the flag that continues from it (no KeyboardInterrupt traceback).
    """
    try:
        trainer.train(resume_from_checkpoint=resume)
    except KeyboardInterrupt:
        from transformers.trainer_utils import get_last_checkpoint

        output_dir = str(trainer.args.output_dir)
        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if last is not None:
            raise TrainingInterrupted(
                f"interrupted at step {trainer.state.global_step}: the newest checkpoint is {last}; run the same "
                "command with --resume_from_checkpoint true to continue from it") from None
        raise TrainingInterrupted(
            f"interrupted at step {trainer.state.global_step}, before the first checkpoint (see --save_steps): nothing "
            f"to resume from in {output_dir}; run the command again (with --overwrite_output_dir true if that "
            "directory is not empty)") from None


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
    with atomic_directory(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        _save_sidecars(tmp, tokenizer, template or PromptTemplate(), stage or "", base, training_info or {}, args_json)
    return out_dir


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    return obj


def sidecar_for(template: PromptTemplate, stage: str, model_args: Any, extra: dict[str, Any] | None = None
                ) -> dict[str, Any]:
    """The :attr:`SidecarMixin.tsarank_sidecar` of a run."""
    return {"template": template, "stage": stage, "base_model": resolve_model_path(model_args.model_name_or_path),
            "training": {"model_args": _jsonable(model_args), **(extra or {})}}


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

    Returns:
        The directory a downstream user should load: ``output_dir/merged`` when a merge was written, else
        ``output_dir``.
    """
    output_dir = Path(output_dir)
    # Training turned the KV cache off; the published checkpoint should generate normally.
    unwrap_model(trainer.model).config.use_cache = True
    sidecar = sidecar_for(template, stage, model_args, extra_training_info)
    trainer.tsarank_sidecar = sidecar
    trainer.save_model(str(output_dir))
    args_json = trainer.args.to_json_string()
    tokenizer = getattr(trainer, "processing_class", None)
    merged_dir = output_dir / MERGED_DIRNAME
    if trainer.is_world_process_zero():
        trainer.save_state()  # trainer_state.json: the log history of the run
        _save_sidecars(output_dir, tokenizer, template, stage, sidecar["base_model"], sidecar["training"], args_json)
        if model_args.use_lora and model_args.merge_lora:
            merge_lora_checkpoint(
                output_dir, merged_dir, dtype=training_dtype(model_args, trainer.args), tokenizer=tokenizer,
                template=template, stage=stage,
                training_info={**sidecar["training"], "merged_from_adapter": str(output_dir)}, args_json=args_json,
            )
            logger.info("merged LoRA checkpoint written to %s", merged_dir)
    trainer.accelerator.wait_for_everyone()
    return merged_dir if (model_args.use_lora and model_args.merge_lora) else output_dir
