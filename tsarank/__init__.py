"""tsarank: two-stage adaptation of decoder-only LLMs to passage re-ranking (TSARankLLM)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

__version__ = "0.1.0"

__all__ = ["Ranker", "score", "load_default_model", "LOSSES", "PromptTemplate", "__version__"]

#: Rankers ``score`` loaded, by model name ("default" for the embedded model), least recently used first.
_RANKERS: "OrderedDict[str, Any]" = OrderedDict()
_CACHE_SIZE = 2


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


def score(query: str, docs: Sequence[str], model: Any = None, *, show_progress_bar: bool | None = None) -> list[float]:
    """Score ``docs`` for ``query`` with ``model`` (a Ranker, a path or Hub id; ``None`` = the default model).

    A model named by path or id is loaded once and reused by later calls, like the default model (the last
    :data:`_CACHE_SIZE` models named are kept); pass a :class:`Ranker` to control loading yourself.
    """
    from .inference import Ranker, check_docs

    docs = check_docs(query, docs)  # a bare string or an empty query fails now, not after loading a model
    if isinstance(model, Ranker):
        ranker = model
    else:
        key = "default" if model is None else str(model)
        ranker = _RANKERS.pop(key, None)
        if ranker is None:
            ranker = Ranker.default() if key == "default" else Ranker.from_pretrained(key)
        _RANKERS[key] = ranker  # most recently used last
        while len(_RANKERS) > _CACHE_SIZE:
            _RANKERS.pop(next(iter(_RANKERS)))
    return ranker.score(query, docs, show_progress_bar=show_progress_bar)
