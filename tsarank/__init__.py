"""tsarank: two-stage adaptation of decoder-only LLMs to passage re-ranking (TSARankLLM)."""

from __future__ import annotations

from typing import Any, Sequence

__version__ = "0.1.0"

__all__ = ["Ranker", "score", "load_default_model", "LOSSES", "PromptTemplate", "__version__"]

_DEFAULT_RANKER = None


def __getattr__(name: str) -> Any:
    # Lazy imports keep `import tsarank` (and the CLI's --help) fast: torch/transformers load on first use.
    if name == "Ranker":
        from .inference import Ranker

        return Ranker
    if name == "load_default_model":
        from .inference import Ranker

        return Ranker.default
    if name == "LOSSES":
        from .losses import LOSSES

        return LOSSES
    if name == "PromptTemplate":
        from .prompts import PromptTemplate

        return PromptTemplate
    raise AttributeError(f"module 'tsarank' has no attribute {name!r}")


def score(query: str, docs: Sequence[str], model: Any = None) -> list[float]:
    """Score ``docs`` for ``query`` with ``model`` (a Ranker, a path or Hub id; ``None`` = the default model).

    The default model is loaded once per process and reused.
    """
    global _DEFAULT_RANKER
    from .inference import Ranker, check_docs

    docs = check_docs(query, docs)  # a bare string or an empty query fails now, not after loading a model

    if model is None:
        if _DEFAULT_RANKER is None:
            _DEFAULT_RANKER = Ranker.default()
        ranker = _DEFAULT_RANKER
    elif isinstance(model, Ranker):
        ranker = model
    else:
        ranker = Ranker.from_pretrained(str(model))
    return ranker.score(query, docs)
