"""Stage 1 of TSARankLLM: continual pre-training (CPT) of a causal LM on weakly supervised (text, query) pairs.

Run it as ``tsarank train cpt``, ``python cpt/train.py`` (the same entry point) or across GPUs with DeepSpeed::

    tsarank train cpt --config cpt/configs/smollm2_quick.yaml [--key value ...]
    deepspeed --num_gpus 8 cpt/train.py --deepspeed ds_configs/zero3.json --config cpt/configs/qwen2.5_zero3.yaml

Options are the fields of ``ModelArguments``, ``DataArguments``, ``CPTArguments``
(:mod:`tsarank.training.arguments`) and ``TrainingArguments``; ``--help`` lists them. The output directory
receives a standard HF checkpoint (or a LoRA adapter plus ``merged/`` with ``merge_lora: true``) with its
tokenizer, ``tsarank_config.json`` and ``training_args.json``; it loads with ``tsarank.Ranker.from_pretrained`` and
as stage 2's ``M_cpt``. Every intermediate ``checkpoint-N`` carries the sidecar too.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from ..distributed import tears_down_process_group

logger = logging.getLogger("tsarank.cpt")
STAGE = "cpt"


def parse_args(argv: Sequence[str] | None = None) -> tuple[Any, Any, Any, Any]:
    """Parse and cross-check the four argument groups (contradictions are errors that say what to change)."""
    from ..distributed import setup_cpu_deepspeed
    from .arguments import (
        CPTArguments,
        DataArguments,
        ModelArguments,
        OptionError,
        TsarankTrainingArguments,
        parse_stage_args,
    )

    argv = list(sys.argv[1:] if argv is None else argv)
    argv = setup_cpu_deepspeed(argv)  # CPU-only `deepspeed --num_gpus N`: gloo process group first
    model_args, data_args, cpt_args, training_args = parse_stage_args(
        (ModelArguments, DataArguments, CPTArguments, TsarankTrainingArguments), argv, prog="tsarank train cpt",
        description="Stage 1: continual pre-training (query generation) on weak (text, query) pairs. Options come "
        "from a YAML --config and flags (flags win).",
    )
    if not data_args.train_file and not data_args.dataset_name:
        raise OptionError("no training data: pass --train_file PAIRS.jsonl (build one with `tsarank data weak-pairs`) "
                          "or --dataset_name (a Hugging Face dataset)")
    from .model_setup import check_model_source

    check_model_source(model_args.model_name_or_path, "model_name_or_path")
    if training_args.eval_strategy != "no" and not data_args.validation_file:
        raise OptionError(
            f"eval_strategy={training_args.eval_strategy.value!r} needs --validation_file. Fix: pass a validation "
            "file (weak-pairs builds validation.jsonl) or set --eval_strategy no."
        )
    # Columns such as target_start are not arguments of model.forward; the collator needs them.
    training_args.remove_unused_columns = False
    return model_args, data_args, cpt_args, training_args


def save_probe_logits(trainer: Any, dataset: Any, collator: Any, path: str, n: int = 4) -> None:
    """Logits of the in-memory model on the first ``n`` training pairs (padded), saved by rank 0.

    Every process runs the forward (under ZeRO-3 the parameters are gathered layer by layer, collectively).
    """
    import torch

    batch = collator([dataset[i] for i in range(min(n, len(dataset)))])
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
        from ..atomic import atomic_path

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                        "logits": out.logits.float().cpu()}, tmp)


def train(argv: Sequence[str] | None = None, extra_callbacks: Sequence[Any] = ()) -> Path:
    """Run stage 1 end to end; return the directory to load (``output_dir``, or ``output_dir/merged`` after a LoRA
    merge). ``extra_callbacks`` are added to the Trainer (tests and benchmarks use them to interrupt or time a
    run)."""
    model_args, data_args, cpt_args, training_args = parse_args(argv)

    from transformers import set_seed

    from ..data.collate import CPTCollator, build_cpt_dataset, validate_weak_pairs
    from ..data.formats import parse_weak_pair
    from ..distributed import barrier
    from ..modeling import check_packing
    from .arguments import OptionError
    from .callbacks import attach_callbacks, standard_callbacks
    from .cards import write_run_cards
    from .checkpoints import (check_output_dir, finalize_checkpoint, output_dir_lock, resolve_resume_checkpoint,
                              sidecar_for, train_or_explain_interrupt)
    from .cpt_trainer import CausalLMTrainer
    from .model_setup import load_tokenizer, prepare_model

    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    resume = resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    check_output_dir(training_args.output_dir, training_args.overwrite_output_dir, resuming=resume is not None)
    with output_dir_lock(training_args.output_dir):  # a second run into this directory stops at once
        barrier()  # every process has checked the directory before any of them writes into it
        set_seed(training_args.seed)

        template = data_args.prompt_template()
        callbacks = standard_callbacks(data_args, template)  # reads the ranking-eval files: fails early
        # Data before the model (and before the default model's first-use conversion): a bad line fails in seconds,
        # with its file:line, not after loading 8B weights.
        data_args.use_dataset(parse_weak_pair, "weak-pairs")  # --dataset_name: rows checked, then read as a file
        for path in filter(None, (data_args.train_file, data_args.validation_file)):
            validate_weak_pairs(path)
        tokenizer = load_tokenizer(model_args.model_name_or_path)
        if cpt_args.target_eos and tokenizer.eos_token_id is None:
            raise OptionError(f"target_eos: the tokenizer of {model_args.model_name_or_path} has no EOS token. Fix: "
                              "target_eos: false (the loss then covers the query tokens only).")
        with training_args.main_process_first(desc="weak-pairs dataset"):
            train_ds = build_cpt_dataset(data_args.train_file, tokenizer, template,
                                         max_samples=data_args.max_train_samples, num_proc=cpt_args.dataset_num_proc,
                                         target_eos=cpt_args.target_eos)
            eval_ds = (build_cpt_dataset(data_args.validation_file, tokenizer, template,
                                         num_proc=cpt_args.dataset_num_proc, target_eos=cpt_args.target_eos)
                       if data_args.validation_file else None)
        model = prepare_model(model_args, tokenizer, training_args)
        if cpt_args.packing:
            try:
                check_packing(model)
            except ValueError as exc:
                raise OptionError(str(exc)) from None
        collator = CPTCollator(pad_token_id=tokenizer.pad_token_id, mask_source=cpt_args.mask_source)
        trainer = CausalLMTrainer(
            model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds, data_collator=collator,
            processing_class=tokenizer, packing=cpt_args.packing, packing_max_length=cpt_args.packing_max_length,
        )
        extra = {
            "data": {"train_file": data_args.train_file, "validation_file": data_args.validation_file,
                     "train_pairs": len(train_ds), "validation_pairs": len(eval_ds) if eval_ds is not None else 0},
            "cpt": {"mask_source": cpt_args.mask_source, "target_eos": cpt_args.target_eos, "packing": cpt_args.packing},
        }
        trainer.tsarank_sidecar = sidecar_for(template, STAGE, model_args, extra)  # also in every checkpoint-N
        attach_callbacks(trainer, [*callbacks, *extra_callbacks])
        train_or_explain_interrupt(trainer, resume)
        evaluated_now = any("eval_loss" in h and h.get("step") == trainer.state.global_step for h in trainer.state.log_history)
        if eval_ds is not None and not evaluated_now:
            trainer.evaluate()  # the final query perplexity, unless the schedule just computed it
        extra["global_step"] = trainer.state.global_step
        load_dir = finalize_checkpoint(trainer, training_args.output_dir, template, STAGE, model_args, extra)
        if cpt_args.save_reference_logits:
            save_probe_logits(trainer, train_ds, collator, cpt_args.save_reference_logits)
        if trainer.is_world_process_zero():
            objective = {"objective": "query-generation NLL (next-token loss on the query tokens given the text)"
                         if cpt_args.mask_source else "next-token loss on the whole sequence",
                         "mask_source": cpt_args.mask_source, "target_eos": cpt_args.target_eos,
                         "packing": cpt_args.packing}
            write_run_cards([training_args.output_dir, load_dir], stage=STAGE, model_args=model_args, data_args=data_args,
                            training_args=training_args, data_files=[data_args.train_file], objective=objective,
                            callbacks=callbacks, template=template)
            print(f"stage 1 checkpoint: {load_dir}")
        return Path(load_dir)


@tears_down_process_group
def main(argv: Sequence[str] | None = None, extra_callbacks: Sequence[Any] = ()) -> int:
    """``train`` for the command line: input errors become one ``error:`` line and exit status 2 (no traceback);
    the NaN guard's message exits with status 1; Ctrl-C exits with status 130 and says how to resume."""
    from ..errors import DataError
    from .arguments import OptionError
    from ..errors import ModelLoadError
    from .checkpoints import TrainingInterrupted

    try:
        train(argv, extra_callbacks)
        return 0
    except (DataError, OptionError, FileExistsError, FileNotFoundError, PermissionError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingInterrupted as exc:
        print(f"\n{exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\ninterrupted before training started; no checkpoint was written", file=sys.stderr)
        return 130
    except FloatingPointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
