"""The ``tsarank_config.json`` sidecar every checkpoint carries, so ``score()`` reproduces training exactly.

Layout::

    {"tsarank_version": "0.1.0", "template": {PromptTemplate fields}, "stage": "cpt"|"sft"|null,
     "base_model": str|null, "training": {free-form: losses, data, ...}}
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text
from .prompts import PromptTemplate

CONFIG_NAME = "tsarank_config.json"


def save_tsarank_config(
    directory: str | os.PathLike,
    template: PromptTemplate,
    *,
    stage: str | None = None,
    base_model: str | None = None,
    training: dict[str, Any] | None = None,
) -> Path:
    """Write the sidecar next to a checkpoint."""
    from . import __version__

    data = {
        "tsarank_version": __version__,
        "template": template.to_dict(),
        "stage": stage,
        "base_model": base_model,
        "training": training or {},
    }
    path = Path(directory) / CONFIG_NAME
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")
    return path


def load_tsarank_config(directory: str | os.PathLike) -> dict[str, Any] | None:
    """Read the sidecar of a local checkpoint directory; ``None`` when absent."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); restore it from the checkpoint or delete it") from e
    data["template"] = PromptTemplate.from_dict(data.get("template", {}))
    return data
