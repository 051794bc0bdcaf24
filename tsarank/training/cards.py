"""Model cards of training runs: the facts a run knows (hyper-parameters, last ranking evaluation) put into
:func:`tsarank.model_card.write_model_card` for every directory a user loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..model_card import write_model_card
from ..prompts import PromptTemplate

__all__ = ["card_hyperparameters", "last_rank_eval", "write_run_cards"]


def card_hyperparameters(training_args: Any, model_args: Any) -> dict[str, Any]:
    """The training settings shown in a model card's hyper-parameter table."""
    keys = ("learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "num_train_epochs", "max_steps",
            "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "bf16")
    hp = {k: getattr(training_args, k) for k in keys}
    hp["lr_scheduler_type"] = str(getattr(hp["lr_scheduler_type"], "value", hp["lr_scheduler_type"]))
    hp["world_size"] = training_args.world_size
    hp["deepspeed"] = training_args.deepspeed if isinstance(training_args.deepspeed, str) else bool(training_args.deepspeed)
    hp["train_top_layers"] = model_args.train_top_layers
    if model_args.train_top_layers:
        hp["train_final_norm"], hp["train_lm_head"] = model_args.train_final_norm, model_args.train_lm_head
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


def write_run_cards(
    directories: Sequence[str | Path],
    *,
    stage: str,
    model_args: Any,
    data_args: Any,
    training_args: Any,
    data_files: Sequence[str],
    objective: dict[str, Any],
    callbacks: Sequence[Any],
    template: PromptTemplate,
) -> None:
    """Write the run's README.md model card into each directory (once per distinct directory)."""
    for directory in dict.fromkeys(str(d) for d in directories):
        write_model_card(
            directory, base_model=model_args.model_name_or_path, stage=stage, data_files=list(data_files),
            loss_config=objective, eval_results=last_rank_eval(callbacks, data_args),
            hub_model_id=training_args.hub_model_id, template=template,
            hyperparameters=card_hyperparameters(training_args, model_args),
        )
