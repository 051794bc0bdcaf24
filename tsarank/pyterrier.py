"""A PyTerrier re-ranker: tsarank models in ``pt.Experiment`` pipelines (``bm25 >> get_text >> TsarankReRanker()``).

PyTerrier is an optional dependency: ``pip install 'tsarank[pyterrier]'``.

    import pyterrier as pt
    from tsarank.pyterrier import TsarankReRanker

    pipeline = bm25 >> pt.text.get_text(dataset, "text") >> TsarankReRanker(model="runs/sft", batch_size=None)
    pt.Experiment([bm25, pipeline], topics, qrels, eval_metrics=["nDCG@10"], baseline=0)
"""

from __future__ import annotations

from typing import Any

try:
    import pyterrier as pt
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError("tsarank.pyterrier needs PyTerrier: pip install 'tsarank[pyterrier]' (python-terrier)") from exc

__all__ = ["TsarankReRanker"]


class TsarankReRanker(pt.Transformer):
    """Re-rank a PyTerrier result frame with a tsarank :class:`~tsarank.Ranker`.

    Input columns: ``qid``, ``query``, ``docno`` and ``text_field``; output: the same rows with ``score`` (the
    model's score) and ``rank`` (0 = best, per query, as PyTerrier numbers them).

    Args:
        model: A checkpoint directory, Hub id, or ``"default"`` (the embedded model); ignored when ``ranker`` is given.
        batch_size: Fixed batch size instead of the Ranker's token budget.
        text_field: The column holding the document text.
        ranker: An already loaded :class:`~tsarank.Ranker` (shared between pipelines without loading twice).
        show_progress_bar: See :meth:`tsarank.Ranker.score_pairs`.
        **kwargs: Passed to :meth:`tsarank.Ranker.from_pretrained` (``dtype``, ``device``, ``max_doc_tokens``...).
    """

    def __init__(self, model: str = "default", batch_size: int | None = None, text_field: str = "text",
                 ranker: Any = None, show_progress_bar: bool | None = None, **kwargs: Any) -> None:
        from .inference import Ranker, positive_int_or_none

        positive_int_or_none(batch_size, "batch_size")
        if ranker is None:
            ranker = Ranker.default(**kwargs) if model == "default" else Ranker.from_pretrained(model, **kwargs)
        self.ranker = ranker
        self.batch_size = batch_size
        self.text_field = text_field
        self.show_progress_bar = show_progress_bar

    def transform(self, inp: Any) -> Any:
        """Score every row; return the frame with ``score`` and ``rank`` replaced."""
        missing = [c for c in ("qid", "query", "docno", self.text_field) if c not in inp.columns]
        if missing:
            hint = (" (add the document text first, e.g. >> pt.text.get_text(dataset, 'text'))"
                    if self.text_field in missing else "")
            raise ValueError(f"TsarankReRanker needs the columns qid, query, docno and {self.text_field!r}; missing "
                             f"{', '.join(missing)}{hint}")
        out = inp.drop(columns=[c for c in ("score", "rank") if c in inp.columns]).copy()
        if len(out) == 0:
            out["score"] = []
            out["rank"] = []
            return out
        lacking = out[self.text_field].isna() | out["query"].isna()
        if lacking.any():  # a docno get_text did not find: scoring the string "nan" would rank it silently
            bad = out.loc[lacking, ["qid", "docno"]].head(3).to_dict("records")
            raise ValueError(f"TsarankReRanker: {int(lacking.sum())} rows have no {self.text_field!r} or query "
                             f"(e.g. {bad}); check that the text lookup knows every docno")
        pairs = list(zip(out["query"].astype(str), out[self.text_field].astype(str)))
        out["score"] = self.ranker.score_pairs(pairs, batch_size=self.batch_size,
                                               show_progress_bar=self.show_progress_bar)
        return pt.model.add_ranks(out)

    def __repr__(self) -> str:
        return f"TsarankReRanker({self.ranker.checkpoint_kind or 'model'}, text_field={self.text_field!r})"
