#!/usr/bin/env python
"""Stage 1 of TSARankLLM: continual pre-training (CPT) of a causal LM on weakly supervised (text, query) pairs.

Run on one machine::

    python cpt/train.py --config cpt/configs/smollm2_quick.yaml [--key value ...]

or across GPUs with DeepSpeed (ZeRO-3 saves consolidated weights)::

    deepspeed --num_gpus 8 cpt/train.py --deepspeed ds_configs/zero3.json --config cpt/configs/qwen2.5_zero3.yaml

Options are the fields of ``ModelArguments``, ``DataArguments``, ``CPTArguments`` (tsarank/config.py) and
``TrainingArguments``; ``--help`` lists them. The output directory receives a standard HF checkpoint (or a LoRA
adapter plus ``merged/`` with ``merge_lora: true``) with its tokenizer, ``tsarank_config.json`` and
``training_args.json``; it loads with ``tsarank.Ranker.from_pretrained`` and as stage 2's ``M_cpt``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Sequence

logger = logging.getLogger("tsarank.cpt")
STAGE = "cpt"


def parse_args(argv: Sequence[str] | None = None) -> tuple[Any, Any, Any, Any]:
    """Parse and cross-check the four argument groups (contradictions are errors that say what to change)."""
    from tsarank import training
    from tsarank.config import CPTArguments, DataArguments, ModelArguments, TsarankTrainingArguments, parse_stage_args

    argv = list(sys.argv[1:] if argv is None else argv)
    argv = training.setup_cpu_deepspeed(argv)  # CPU-only `deepspeed --num_gpus N`: gloo process group first
    model_args, data_args, cpt_args, training_args = parse_stage_args(
        (ModelArguments, DataArguments, CPTArguments, TsarankTrainingArguments), argv
    )
    if not data_args.train_file:
        raise ValueError("no training data: pass --train_file PAIRS.jsonl (build one with `tsarank data weak-pairs`)")
    if training_args.eval_strategy != "no" and not data_args.validation_file:
        raise ValueError(
            f"eval_strategy={training_args.eval_strategy.value!r} needs --validation_file. Fix: pass a validation "
            "file (weak-pairs builds validation.jsonl) or set --eval_strategy no."
        )
    if cpt_args.packing_max_length is not None and not cpt_args.packing:
        raise ValueError("packing_max_length is set but packing is false. Fix: set packing: true or drop packing_max_length.")
    if model_args.merge_lora and not model_args.use_lora:
        raise ValueError("merge_lora: true needs use_lora: true (there is no adapter to merge). Fix: drop merge_lora.")
    # Columns such as target_start are not arguments of model.forward; the collator needs them.
    training_args.remove_unused_columns = False
    import torch

    if not torch.cuda.is_available():
        training_args.dataloader_pin_memory = False  # pinning needs an accelerator; on CPU it only warns
    return model_args, data_args, cpt_args, training_args


def save_probe_logits(trainer: Any, dataset: Any, collator: Any, path: str, n: int = 4) -> None:
    """Logits of the in-memory model on the first ``n`` training pairs (padded, not packed), saved by rank 0.

    Every process runs the forward (under ZeRO-3 the parameters are gathered layer by layer, collectively).
    """
    import torch
    from tsarank.data.collate import CPTCollator

    plain = CPTCollator(pad_token_id=collator.pad_token_id, mask_source=collator.mask_source)
    batch = plain([dataset[i] for i in range(min(n, len(dataset)))])
    model = trainer.model_wrapped
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(
                input_ids=batch["input_ids"].to(trainer.args.device),
                attention_mask=batch["attention_mask"].to(trainer.args.device),
                use_cache=False,
            )
    finally:
        model.train(was_training)
    if trainer.is_world_process_zero():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "logits": out.logits.float().cpu()},
            path,
        )


def main(argv: Sequence[str] | None = None, extra_callbacks: Sequence[Any] = ()) -> int:
    """Run stage 1. ``extra_callbacks`` are added to the Trainer (tests use one to interrupt a run)."""
    model_args, data_args, cpt_args, training_args = parse_args(argv)

    from transformers import set_seed

    from tsarank import training
    from tsarank.config import check_output_dir
    from tsarank.cpt import CausalLMTrainer
    from tsarank.data.collate import CPTCollator, build_cpt_dataset

    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    resume = training.resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    check_output_dir(training_args.output_dir, training_args.overwrite_output_dir, resuming=resume is not None)
    training.barrier()  # every process has checked the directory before any of them writes into it
    set_seed(training_args.seed)

    template = training.template_from_args(data_args)
    callbacks = training.standard_callbacks(data_args, template)  # reads the ranking-eval files: fails early
    # Data before the model (and before the default model's first-use conversion): a bad line fails in seconds,
    # with its file:line, not after loading 8B weights.
    from tsarank.data.collate import validate_weak_pairs

    for path in filter(None, (data_args.train_file, data_args.validation_file)):
        validate_weak_pairs(path)
    tokenizer = training.load_tokenizer(model_args.model_name_or_path)
    with training_args.main_process_first(desc="weak-pairs dataset"):
        train_ds = build_cpt_dataset(data_args.train_file, tokenizer, template, max_samples=data_args.max_train_samples,
                                     num_proc=cpt_args.dataset_num_proc)
        eval_ds = (build_cpt_dataset(data_args.validation_file, tokenizer, template, num_proc=cpt_args.dataset_num_proc)
                   if data_args.validation_file else None)
    model = training.prepare_model(model_args, tokenizer, training_args)
    if cpt_args.packing:
        from tsarank.data.collate import MASKED_ATTENTION, VARLEN_ATTENTION

        attn = model.config._attn_implementation
        if attn not in MASKED_ATTENTION + VARLEN_ATTENTION:
            raise ValueError(
                f"packing needs FlashAttention-2 (varlen) or SDPA/eager (4D block mask); the model uses {attn!r}. "
                "Fix: packing: false, or attn_implementation: sdpa."
            )
    collator = CPTCollator(
        pad_token_id=tokenizer.pad_token_id, mask_source=cpt_args.mask_source, packing=cpt_args.packing,
        packing_max_length=cpt_args.packing_max_length,
    )
    trainer = CausalLMTrainer(
        model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds, data_collator=collator,
        processing_class=tokenizer,
    )
    training.attach_callbacks(trainer, [*callbacks, *extra_callbacks])
    trainer.train(resume_from_checkpoint=resume)
    evaluated_now = any("eval_loss" in h and h.get("step") == trainer.state.global_step for h in trainer.state.log_history)
    if eval_ds is not None and not evaluated_now:
        trainer.evaluate()  # the final query perplexity, unless the schedule just computed it
    extra = {
        "data": {"train_file": data_args.train_file, "validation_file": data_args.validation_file,
                 "train_pairs": len(train_ds), "validation_pairs": len(eval_ds) if eval_ds is not None else 0},
        "cpt": {"mask_source": cpt_args.mask_source, "packing": cpt_args.packing},
        "global_step": trainer.state.global_step,
    }
    load_dir = training.finalize_checkpoint(trainer, training_args.output_dir, template, STAGE, model_args, extra)
    if cpt_args.save_reference_logits:
        save_probe_logits(trainer, train_ds, collator, cpt_args.save_reference_logits)
    if trainer.is_world_process_zero():
        from tsarank.model_card import write_model_card

        objective = {"objective": "query-generation NLL (next-token loss on the query tokens given the text)"
                     if cpt_args.mask_source else "next-token loss on the whole sequence",
                     "mask_source": cpt_args.mask_source, "packing": cpt_args.packing}
        for directory in dict.fromkeys([str(training_args.output_dir), str(load_dir)]):
            write_model_card(
                directory, base_model=model_args.model_name_or_path, stage=STAGE,
                data_files=[f for f in (data_args.train_file,) if f], loss_config=objective,
                eval_results=training.last_rank_eval(callbacks, data_args), hub_model_id=training_args.hub_model_id,
                template=template, hyperparameters=training.card_hyperparameters(training_args, model_args),
            )
        print(f"stage 1 checkpoint: {load_dir}")
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    """``main`` for the command line: input errors become one ``error:`` line and exit status 2 (no traceback);
    the NaN guard's message exits with status 1."""
    from tsarank.errors import DataError

    try:
        return main(argv)
    except (DataError, FileExistsError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(cli())
