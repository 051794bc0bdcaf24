"""``tsarank train cpt|sft [OPTIONS]``: the two training stages, with the options of ``cpt/train.py`` and
``sft/train.py`` (which are thin launchers of the same code, for ``deepspeed``)."""

from __future__ import annotations

import argparse

STAGES = {"cpt": "stage 1: continual pre-training on weak (text, query) pairs",
          "sft": "stage 2: supervised fine-tuning on ranking groups against the frozen stage-1 model"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train stage 1 (cpt) or stage 2 (sft); `tsarank train sft --help` lists a stage's options",
        description="Run a training stage. Options are those of the stage (YAML --config plus flags); multi-GPU: "
        "deepspeed --num_gpus N cpt/train.py ... (or sft/train.py), the same entry points.",
    )
    p.add_argument("stage", choices=sorted(STAGES), help="; ".join(f"{k} = {v}" for k, v in STAGES.items()))
    p.add_argument("options", nargs=argparse.REMAINDER, help="the stage's options (see `tsarank train STAGE --help`)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.stage == "cpt":
        from ..training.cpt import main
    else:
        from ..training.sft import main
    return main(args.options)
