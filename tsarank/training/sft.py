"""Stage 2 of TSARankLLM: supervised fine-tuning on ranking groups against the frozen stage-1 model.

    L = L_rank + lambda_gen * L_gen + lambda_dp * L_dp        (docs/design.md, section 1)

Launch (YAML config plus command-line overrides; unknown options are errors):

    tsarank train sft --config sft/configs/smollm2_quick.yaml [--key value ...]     # or: python sft/train.py ...
    deepspeed --num_gpus N sft/train.py --config sft/configs/qwen2.5_zero3.yaml --deepspeed ds_configs/zero3.json
    NUM_GPUS=N MODEL=... DATA=... OUT=... bash scripts/run_sft.sh

Inputs:
- ``--model_name_or_path``: the stage-1 checkpoint ``M_cpt`` (or ``default``). It is the starting point of the
  policy and, frozen, the reference of ``L_dp`` (``--ref_model_name_or_path`` overrides the reference).
- ``--init_from DIR``: start the policy from another checkpoint instead (multi-stage fine-tuning: a
  contrastive run, then a distillation run from its output); the reference stays as above.
- ``--train_file``: group JSONL (docs/design.md, section 3); several files comma-separated. Every file is validated
  before any model is loaded, errors name ``file:line`` and the field.

Output (``--output_dir``): an HF checkpoint (or a LoRA adapter directory, plus ``merged/`` with
``--merge_lora``), ``tsarank_config.json`` (template, scoring head, budgets, loss settings), the last-token head
(``tsarank_head.safetensors``) for ``--scoring_head last_token``, and a README.md model card.
``--push_to_hub --hub_model_id ORG/NAME`` uploads that directory through the Trainer at the end. Every
intermediate ``checkpoint-N`` carries the sidecar (and the last-token head) too, so it loads with ``Ranker``.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from ..data.formats import iter_jsonl, parse_group
from ..distributed import tears_down_process_group
from ..errors import DataError
from ..losses import requires_teacher
from ..prompts import LAST_TOKEN, PromptTemplate
from .arguments import DataArguments, ModelArguments, OptionError, SFTArguments, TsarankTrainingArguments
from .arguments import parse_stage_args

logger = logging.getLogger("tsarank.sft")

STAGE = "sft"
ARG_TYPES = (ModelArguments, DataArguments, SFTArguments, TsarankTrainingArguments)


# ----------------------------------------------------------------------------------------------- options
def train_files(data_args: DataArguments) -> list[str]:
    """The training files: ``train_file`` split on commas (YAML lists are not accepted by the parser)."""
    raw = data_args.train_file
    if not raw or not str(raw).strip():
        raise OptionError("no training data: pass --train_file GROUPS.jsonl (several files: comma-separated) or "
                          "--dataset_name (a Hugging Face dataset); build groups with `tsarank data groups`")
    files = [part.strip() for part in str(raw).split(",")]
    if any(not f for f in files):
        raise OptionError(f"--train_file {raw!r} has an empty entry; separate files with single commas")
    return files


def validate_options(model_args: ModelArguments, data_args: DataArguments, sft_args: SFTArguments,
                     training_args: TsarankTrainingArguments):
    """Check what the argument groups cannot check alone, before any file or model is read.

    Each group checked its own fields when it was built (the loss options in
    :class:`~tsarank.training.sft_loss.RankingLossConfig`); this adds the template, the paths and the checkpoint
    layouts.

    Returns:
        ``(loss_config, template)``.

    Raises:
        OptionError: With what to change.
    """
    from .model_setup import check_model_source, looks_like_hub_id

    loss_config = sft_args.loss_config()
    template = data_args.prompt_template(sft_args.scoring_head)
    if training_args.eval_strategy != "no" and not data_args.validation_file:
        raise OptionError(
            f"eval_strategy={training_args.eval_strategy.value!r} needs --validation_file (ranking groups). Fix: pass "
            "one, or set --eval_strategy no.")
    if sft_args.init_from:
        init = Path(sft_args.init_from)
        if init.exists():
            if (init / "adapter_config.json").is_file() and not (init / "config.json").is_file():
                merged = init / "merged"
                hint = f" (use {merged})" if (merged / "config.json").is_file() else " (re-run it with --merge_lora)"
                raise OptionError(f"--init_from {init} is a LoRA adapter directory; start from a full or merged "
                                  f"checkpoint{hint}")
            if not (init / "config.json").is_file():
                raise OptionError(f"--init_from {init} has no config.json; pass a checkpoint directory "
                                  "(the output_dir of an earlier run)")
    for flag, value in (("model_name_or_path", model_args.model_name_or_path),
                        ("ref_model_name_or_path", sft_args.ref_model_name_or_path),
                        ("init_from", sft_args.init_from)):
        if flag != "init_from" or (value and Path(value).exists()):  # a missing init_from: its own advice above
            # The tokenizer comes from --init_from when given, else from the base model.
            tokenizer_here = flag == ("init_from" if sft_args.init_from else "model_name_or_path")
            check_model_source(value, flag, needs_tokenizer=tokenizer_here)
        elif value and not Path(value).exists() and not looks_like_hub_id(value):
            raise OptionError(f"--{flag} {value}: no such directory (and not a Hub id ORG/NAME)")
    if sft_args.lambda_dp == 0 and sft_args.ref_model_name_or_path:
        logger.warning("--ref_model_name_or_path %s is unused: the reference only serves L_dp and lambda_dp is 0",
                       sft_args.ref_model_name_or_path)
    if training_args.remove_unused_columns:
        # The group collator's keys are not forward() arguments; the Trainer must not drop them.
        training_args.remove_unused_columns = False
    return loss_config, template


# -------------------------------------------------------------------------------------------------- data
def load_group_files(files: Sequence[str], group_size: int, loss: str,
                     max_train_samples: int | None = None) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Read and validate every group file up front.

    Beyond the per-record checks of :func:`tsarank.data.formats.parse_group`, checks what this run needs:
    negatives when ``group_size > 1``, and ``teacher_scores`` on every group for a teacher loss. Errors name
    ``file:line`` and the field. Teacher scores are dropped for losses that do not use them.

    Returns:
        ``(records, {file: number of records})``.

    Raises:
        DataError: The first bad record.
    """
    needs_teacher = requires_teacher(loss)
    records: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    for path in files:
        n = 0
        for line, group in iter_jsonl(path, parse_group):
            if group_size > 1 and not group["negative_passages"]:
                raise DataError(
                    path, line, "negative_passages",
                    f"expected negatives for train_group_size {group_size}, got none",
                    fix="mine hard negatives (`tsarank data groups` / scripts/mine_negatives.py) or drop the group",
                )
            if needs_teacher:
                if group["teacher_scores"] is None:
                    raise DataError(
                        path, line, "teacher_scores",
                        f"loss {loss!r} distils a teacher, but this group has no teacher_scores",
                        fix="add them with scripts/add_teacher_scores.py --model TEACHER, or train with a loss "
                        "that needs no teacher (--loss softmax)",
                    )
            else:
                group["teacher_scores"] = None
            records.append(group)
            n += 1
            if max_train_samples is not None and len(records) >= max_train_samples:
                break
        if n == 0 and not (max_train_samples is not None and len(records) >= max_train_samples):
            raise DataError(path, None, None, "expected at least one group, got none (the file is empty)",
                            fix="check that the file was written completely")
        counts[path] = n
        if max_train_samples is not None and len(records) >= max_train_samples:
            break
    _warn_short_groups(records, group_size)
    return records, counts


def _warn_short_groups(records: Sequence[dict[str, Any]], group_size: int) -> None:
    """Say, with counts, how many groups have fewer distinct negatives than ``train_group_size - 1``: their groups
    repeat negatives (sampled with replacement), which teaches less than the group size suggests."""
    need = group_size - 1
    # Distinct by content: a negative listed twice teaches once.
    distinct = (len({(n["title"], n["text"]) for n in r["negative_passages"]}) for r in records)
    short = [n for n in distinct if 0 < n < need]
    if short:
        logger.warning(
            "%d of %d groups have fewer than %d distinct negatives (fewest: %d, median: %d); their groups of %d repeat "
            "negatives. Mine deeper (`tsarank data groups --negatives %d`) or lower --train_group_size.",
            len(short), len(records), need, min(short), sorted(short)[len(short) // 2], group_size, need)


# ------------------------------------------------------------------------------------------------- model
def _same_path(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    if a == b:
        return True
    return Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve()


def _score_head(model, init_dir: str | None):
    """A fresh last-token head, or the one saved with ``init_dir`` (multi-stage from a last-token run)."""
    from ..modeling import HEAD_WEIGHTS, LastTokenHead
    from ..wrappers import unwrap_model

    hidden = unwrap_model(model).config.hidden_size
    if init_dir and (Path(init_dir) / HEAD_WEIGHTS).is_file():
        logger.info("last-token head initialised from %s", init_dir)
        return LastTokenHead.load(str(init_dir), hidden)
    return LastTokenHead(hidden)


def _check_init_template(init_dir: str | None, template: PromptTemplate) -> None:
    if not init_dir:
        return
    from ..hub import load_tsarank_config

    meta = load_tsarank_config(init_dir)
    if meta and meta["template"] != template:
        logger.warning("the template of --init_from %s differs from this run's (%s vs %s); this run trains and "
                       "saves its own", init_dir, meta["template"], template)


def _loss_settings(loss_config, sft_args: SFTArguments, model_args: ModelArguments, reference) -> dict[str, Any]:
    settings = dataclasses.asdict(loss_config)
    settings.pop("logit_chunk_rows", None)
    settings["ref_model"] = sft_args.ref_model_name_or_path or model_args.model_name_or_path
    settings["reference"] = getattr(reference, "kind", None)
    settings["init_from"] = sft_args.init_from
    return settings


# -------------------------------------------------------------------------------------------------- main
@dataclasses.dataclass
class SFTResult:
    """What :func:`train` leaves behind (the trainer stays usable for in-process checks).

    Attributes:
        trainer: The :class:`tsarank.training.sft_trainer.RankingTrainer` after training.
        output_dir: The run's output directory (checkpoint or LoRA adapter, sidecar, card).
        load_dir: The directory to load for inference (``output_dir/merged`` after a LoRA merge).
        template: The prompt template trained (and saved).
        reference: The frozen reference (``None`` with ``lambda_dp == 0``).
    """

    trainer: Any
    output_dir: str
    load_dir: str
    template: PromptTemplate
    reference: Any


def parse_args(argv: Sequence[str] | None = None):
    """``(model_args, data_args, sft_args, training_args)`` from ``--config`` YAML plus flags."""
    from ..distributed import setup_cpu_deepspeed

    argv = list(sys.argv[1:] if argv is None else argv)
    argv = setup_cpu_deepspeed(argv)  # CPU-only `deepspeed --num_gpus N`: gloo process group first
    return parse_stage_args(
        ARG_TYPES, argv, prog="tsarank train sft",
        description="Stage 2: supervised fine-tuning on ranking groups, L = L_rank + lambda_gen L_gen + lambda_dp "
        "L_dp against the frozen stage-1 model. Options come from a YAML --config and flags (flags win).",
    )


def train(argv: Sequence[str] | None = None, extra_callbacks: Sequence[Any] = ()) -> SFTResult:
    """Run stage 2 end to end (see the module docstring). ``extra_callbacks`` are added to the Trainer (tests and
    benchmarks use them to interrupt or time a run)."""
    model_args, data_args, sft_args, training_args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if training_args.should_log else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

    # 1. Everything that can be checked without a model comes first, so mistakes cost seconds, not a model load.
    loss_config, template = validate_options(model_args, data_args, sft_args, training_args)
    data_args.use_dataset(parse_group, "groups")  # --dataset_name: its rows checked now, then read as a file
    files = train_files(data_args)
    try:
        records, counts = load_group_files(files, sft_args.train_group_size, sft_args.loss, data_args.max_train_samples)
    except DataError as exc:
        raise data_args.relabel(exc) from None
    eval_records = None
    if data_args.validation_file:
        eval_records, _ = load_group_files([data_args.validation_file], sft_args.train_group_size, sft_args.loss)

    from transformers import set_seed

    from ..data.groups import EpochCallback, GroupCollator, GroupDataset
    from ..distributed import barrier
    from ..reference import build_reference
    from .callbacks import attach_callbacks, standard_callbacks
    from .cards import write_run_cards
    from .checkpoints import (check_output_dir, finalize_checkpoint, output_dir_lock, resolve_resume_checkpoint,
                              sidecar_for, train_or_explain_interrupt)
    from .model_setup import load_tokenizer, prepare_model, resolve_model_path, training_dtype
    from .sft_trainer import RankingTrainer

    resume = resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    check_output_dir(training_args.output_dir, training_args.overwrite_output_dir, bool(resume))
    with output_dir_lock(training_args.output_dir):  # a second run into this directory stops at once
        barrier()  # every process has checked the directory before any of them writes into it
        set_seed(training_args.seed)  # LoRA and last-token head initialisation
        callbacks = standard_callbacks(data_args, template)  # reads the ranking-eval files: fails early too
        logger.info("%d groups from %s", len(records), ", ".join(f"{f} ({n})" for f, n in counts.items()))

        # 2. Policy (from init_from when given) and tokenizer.
        base_path = resolve_model_path(model_args.model_name_or_path)
        init_path = resolve_model_path(sft_args.init_from) if sft_args.init_from else None
        policy_args = dataclasses.replace(model_args, model_name_or_path=init_path or base_path)
        _check_init_template(init_path, template)
        tokenizer = load_tokenizer(policy_args.model_name_or_path)
        model = prepare_model(policy_args, tokenizer, training_args)
        score_head = _score_head(model, init_path) if template.scoring_head == LAST_TOKEN else None

        # 3. The frozen reference: M_cpt (or ref_model_name_or_path), never the init_from weights.
        ref_path = resolve_model_path(sft_args.ref_model_name_or_path) if sft_args.ref_model_name_or_path else base_path
        kind = "auto"
        if not _same_path(policy_args.model_name_or_path, ref_path):
            # "Adapter off" (LoRA) and a shared frozen prefix would both be the policy's starting weights, which are
            # not the reference here: load the reference as its own (frozen, ZeRO-3-sharded when enabled) model.
            kind = "separate"
        reference = build_reference(
            model, kind=kind, ref_path=ref_path, train_top_layers=model_args.train_top_layers,
            training_args=training_args, lambda_dp=sft_args.lambda_dp,
            dtype=training_dtype(model_args, training_args), attn_implementation=model_args.attn_implementation,
        )
        if reference is not None:
            logger.info("reference for L_dp: %s%s (%s); it costs %.0f%% of a policy forward per step", reference.kind,
                        ", ZeRO-3 sharded" if getattr(reference, "is_deepspeed", False) else "",
                        "the policy with its adapters off" if reference.kind == "adapter_off" else ref_path,
                        100 * reference.cost_fraction())

        # 4. Data, trainer, callbacks.
        train_dataset = GroupDataset(records, sft_args.train_group_size, seed=training_args.seed, source=",".join(files))
        eval_dataset = (GroupDataset(eval_records, sft_args.train_group_size, seed=training_args.seed,
                                     source=data_args.validation_file) if eval_records else None)
        collator = GroupCollator(tokenizer, template, sft_args.train_group_size)
        trainer = RankingTrainer(
            model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
            data_collator=collator, processing_class=tokenizer, callbacks=[EpochCallback(train_dataset)],
            loss_config=loss_config, reference=reference, score_head=score_head,
        )
        extra = {
            "loss": _loss_settings(loss_config, sft_args, model_args, reference),
            "data": {"train_files": files, "groups": len(records), "train_group_size": sft_args.train_group_size},
        }
        trainer.tsarank_sidecar = sidecar_for(template, STAGE, model_args, extra)  # also in every checkpoint-N
        attach_callbacks(trainer, [*callbacks, *extra_callbacks])

        # 5. Train; save the checkpoint with its sidecar, head and card; push.
        train_or_explain_interrupt(trainer, resume)
        output_dir = str(training_args.output_dir)
        extra["global_step"] = trainer.state.global_step
        load_dir = str(finalize_checkpoint(trainer, output_dir, template, STAGE, model_args, extra))

        def write_cards(*_: Any, **__: Any) -> None:
            write_run_cards([output_dir, load_dir], stage=STAGE, model_args=model_args, data_args=data_args,
                            training_args=training_args, data_files=files, objective=extra["loss"], callbacks=callbacks,
                            template=template)

        if trainer.is_world_process_zero():
            _copy_head(output_dir, load_dir)
            write_cards()
        # Trainer.push_to_hub regenerates README.md with its generic card right before uploading; keep tsarank's.
        trainer.create_model_card = write_cards
        trainer.accelerator.wait_for_everyone()
        if training_args.push_to_hub:
            # The card and the sidecar are in output_dir, so the Trainer's upload carries them.
            trainer.push_to_hub(commit_message="tsarank stage-2 (SFT) checkpoint")
        return SFTResult(trainer=trainer, output_dir=output_dir, load_dir=load_dir, template=template, reference=reference)


def _copy_head(output_dir: str, load_dir: str) -> None:
    """The merged directory of a LoRA run needs the last-token head too (the merge writes weights only)."""
    import shutil

    from ..modeling import HEAD_WEIGHTS

    src = Path(output_dir) / HEAD_WEIGHTS
    if load_dir != output_dir and src.is_file():
        shutil.copy2(src, Path(load_dir) / HEAD_WEIGHTS)


@tears_down_process_group
def main(argv: Sequence[str] | None = None, extra_callbacks: Sequence[Any] = ()) -> int:
    """``train`` for the command line: input errors become one ``error:`` line and exit status 2 (no traceback);
    the NaN guard's message exits with status 1; Ctrl-C exits with status 130 and says how to resume."""
    from ..errors import ModelLoadError
    from .checkpoints import TrainingInterrupted

    try:
        result = train(argv, extra_callbacks)
    except (OptionError, DataError, FileExistsError, FileNotFoundError, PermissionError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingInterrupted as exc:
        print(f"\n{exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\ninterrupted before training started; no checkpoint was written", file=sys.stderr)
        return 130
    except FloatingPointError as exc:  # the NaN guard: the message names the step and the last good checkpoint
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if result.trainer.is_world_process_zero():
        print(f"saved {result.load_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
