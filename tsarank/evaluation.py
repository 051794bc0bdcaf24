"""Thin wrapper over ir_measures: aggregate scores, per-query scores, paired comparison, delta plots.

Measure names are ir_measures' own (``nDCG@10``, ``RR@10``, ``AP``, ``R@100``,
``P@10``, ``AP(rel=2)``...); results are keyed by ``str(measure)``.

Which queries count: those in the qrels. A judged query that a run does not
contain scores 0 (ir_measures' default with its pytrec_eval backend, as
``trec_eval -c``); run queries without judgments are ignored. Ties in score
are ordered as ``trec_eval`` orders them (score descending, then docid
descending; the rank column of a run file is not used) for every measure:
ir_measures' backends disagree on ties (its ``RR@10`` backend kept input
order), so the run handed to them has its ties already broken.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ir_measures

from tsarank.atomic import atomic_path
from tsarank.data.formats import trec_order

__all__ = ["DEFAULT_MEASURES", "parse_measures", "evaluate", "per_query", "compare", "plot_deltas"]

#: Measures reported when none are asked for.
DEFAULT_MEASURES = ("nDCG@10", "RR@10", "AP", "R@100")

Run = Mapping[str, Iterable[tuple[str, float]]]
Qrels = Mapping[str, Mapping[str, int]]
MeasureLike = str | Any  # an ir_measures Measure or its name


def parse_measures(names: Sequence[MeasureLike], rel_level: int | None = None) -> list[Any]:
    """Parse measure names into ir_measures measures.

    Args:
        names: Names such as ``"nDCG@10"``, ``"RR@10"``, ``"AP"``, ``"R@100"``
            (ir_measures syntax) or measure objects.
        rel_level: Minimum grade that counts as relevant for binary measures
            (AP, RR, R, P, Success, Rprec...), e.g. 2 for TREC DL passage.
            Applied only to measures that take ``rel`` and do not set it
            already; graded measures such as nDCG never get it.

    Returns:
        The ir_measures measure objects, in order.

    Raises:
        ValueError: An unknown or malformed measure name.
    """
    if rel_level is not None and (isinstance(rel_level, bool) or not isinstance(rel_level, int) or rel_level < 1):
        raise ValueError(f"rel_level must be a whole number >= 1 (grade 0 means judged non-relevant), got {rel_level!r}")
    measures = []
    for name in names:
        if isinstance(name, str):
            try:
                measure = ir_measures.parse_measure(name)
            except (NameError, ValueError, SyntaxError) as exc:
                raise ValueError(
                    f"unknown measure {name!r} ({exc}); use ir_measures names such as nDCG@10, RR@10, AP, R@100, P@10"
                ) from None
        else:
            measure = name
        _check_params(measure, name if isinstance(name, str) else type(measure).__name__)
        if rel_level is not None and "rel" in measure.SUPPORTED_PARAMS and "rel" not in measure.params:
            measure = measure(rel=rel_level)
        measures.append(measure)
    return measures


def _check_params(measure: Any, label: str) -> None:
    """Refuse a measure the backends would mishandle, before any file is read: ``nDCG@0`` aborted inside pytrec_eval's
    C code, ``RR@0`` was silently 0, ``nDCG@1.5`` and ``RR(rel=0)`` were tracebacks deep in a backend.

    Raises:
        ValueError: A cutoff that is not a whole number in [1, 2**31 - 1], ``rel`` below 1 (grade 0 is judged
            non-relevant), a parameter the measure does not take or a value it refuses (ir_measures' own
            ``validate_params``), or any other failure on a one-query trial computation.
    """
    params = getattr(measure, "params", {}) or {}
    cutoff = params.get("cutoff")
    if cutoff is not None and (isinstance(cutoff, bool) or not isinstance(cutoff, int) or not 1 <= cutoff < 2**31):
        raise ValueError(f"measure {label}: the cutoff after '@' must be a whole number from 1 to {2**31 - 1}, got "
                         f"{cutoff!r}")
    rel = params.get("rel")
    if rel is not None and (isinstance(rel, bool) or not isinstance(rel, int) or rel < 1):
        raise ValueError(f"measure {label}: rel= must be a whole number >= 1 (grade 0 means judged non-relevant), "
                         f"got {rel!r}")
    try:
        measure.validate_params()
        ir_measures.calc_aggregate([measure], {"q": {"d": 1}}, {"q": {"d": 1.0}})  # anything a backend still refuses
    except Exception as exc:  # noqa: BLE001 - AssertionError, TypeError, KeyError... from the backends
        detail = str(exc).strip() or type(exc).__name__
        supported = ", ".join(getattr(measure, "SUPPORTED_PARAMS", {}))
        raise ValueError(f"measure {label} cannot be computed: {detail}"
                         + (f" (it takes: {supported})" if supported else "")) from None


def _to_ir_run(run: Run) -> dict[str, dict[str, float]]:
    """The run with each query's ties broken in trec_eval's order and scores replaced by descending ranks
    (n, n-1, ..., 1), so that every ir_measures backend sees one order, whatever its own tie rule."""
    out: dict[str, dict[str, float]] = {}
    for qid, ranked in run.items():
        ordered = trec_order((docid, float(score)) for docid, score in ranked)
        n = len(ordered)
        out[qid] = {docid: float(n - i) for i, (docid, _) in enumerate(ordered)}
    return out


def _to_ir_qrels(qrels: Qrels) -> dict[str, dict[str, int]]:
    return {qid: {docid: int(grade) for docid, grade in judged.items()} for qid, judged in qrels.items()}


def _measures(measures: Sequence[MeasureLike]) -> list[Any]:
    return parse_measures(measures, rel_level=None)


def per_query(run: Run, qrels: Qrels, measures: Sequence[MeasureLike]) -> dict[str, dict[str, float]]:
    """Per-query values.

    Args:
        run: ``{qid: [(docid, score), ...]}`` (e.g. from :func:`~tsarank.data.formats.read_run`).
        qrels: ``{qid: {docid: grade}}``.
        measures: Measure names or objects (see :func:`parse_measures`).

    Returns:
        ``{measure_name: {qid: value}}`` over the judged queries (a judged
        query absent from the run gets 0).
    """
    parsed = _measures(measures)
    ir_qrels = _to_ir_qrels(qrels)
    out: dict[str, dict[str, float]] = {str(m): {} for m in parsed}
    for metric in ir_measures.iter_calc(parsed, ir_qrels, _to_ir_run(run)):
        out[str(metric.measure)][metric.query_id] = float(metric.value)
    for values in out.values():  # judged queries the backend left out count as 0
        for qid in ir_qrels:
            values.setdefault(qid, 0.0)
    return out


def evaluate(run: Run, qrels: Qrels, measures: Sequence[MeasureLike]) -> dict[str, float]:
    """Aggregate (mean over judged queries) value of each measure.

    Args:
        run: ``{qid: [(docid, score), ...]}``.
        qrels: ``{qid: {docid: grade}}``.
        measures: Measure names or objects.

    Returns:
        ``{measure_name: mean}`` in the order asked.
    """
    parsed = _measures(measures)
    result = ir_measures.calc_aggregate(parsed, _to_ir_qrels(qrels), _to_ir_run(run))
    return {str(m): float(result.get(m, 0.0)) for m in parsed}


def _paired_p_value(a: Sequence[float], b: Sequence[float]) -> float:
    if len(a) < 2:
        return math.nan
    if all(x == y for x, y in zip(a, b)):
        return 1.0
    from scipy.stats import ttest_rel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(ttest_rel(b, a).pvalue)


def compare(run_a: Run, run_b: Run, qrels: Qrels, measures: Sequence[MeasureLike]) -> dict[str, dict[str, float]]:
    """Compare two runs on the judged queries with a paired t-test.

    Every query of ``qrels`` takes part; a query missing from a run counts as
    0 for that run (so a run that drops queries is penalised, not flattered).

    Args:
        run_a: Baseline run.
        run_b: Run compared against the baseline.
        qrels: ``{qid: {docid: grade}}``.
        measures: Measure names or objects.

    Returns:
        ``{measure_name: {"mean_a", "mean_b", "delta" (= mean_b - mean_a),
        "p_value" (two-sided paired t-test, ``scipy.stats.ttest_rel``; 1.0 when
        every query ties, NaN with fewer than 2 queries), "n_queries", "wins"
        (queries where b > a), "losses", "ties"}}``.
    """
    qids = list(qrels)
    per_a = per_query(run_a, qrels, measures)
    per_b = per_query(run_b, qrels, measures)
    out: dict[str, dict[str, float]] = {}
    for name in per_a:
        a = [per_a[name].get(q, 0.0) for q in qids]
        b = [per_b[name].get(q, 0.0) for q in qids]
        n = len(qids)
        mean_a = sum(a) / n if n else math.nan
        mean_b = sum(b) / n if n else math.nan
        out[name] = {
            "mean_a": mean_a,
            "mean_b": mean_b,
            "delta": mean_b - mean_a,
            "p_value": _paired_p_value(a, b),
            "n_queries": n,
            "wins": sum(y > x for x, y in zip(a, b)),
            "losses": sum(y < x for x, y in zip(a, b)),
            "ties": sum(y == x for x, y in zip(a, b)),
        }
    return out


def _values_for(per_q: Mapping[str, Any], measure: str) -> Mapping[str, float]:
    inner = per_q.get(measure)
    if isinstance(inner, Mapping):
        return inner
    if per_q and all(isinstance(v, Mapping) for v in per_q.values()):
        raise KeyError(f"measure {measure!r} not in the per-query results (have {sorted(per_q)})")
    return per_q  # already {qid: value}


def plot_deltas(
    per_query_a: Mapping[str, Any],
    per_query_b: Mapping[str, Any],
    measure: str,
    path: str | os.PathLike,
    label_a: str = "A",
    label_b: str = "B",
) -> Path:
    """Bar chart of per-query deltas (b - a), sorted from largest gain to largest loss.

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend change)
    and writes the image atomically; the format follows the file suffix
    (``.png`` when there is none).

    Args:
        per_query_a: :func:`per_query` output (``{measure: {qid: value}}``) or
            ``{qid: value}`` for the baseline.
        per_query_b: The same for the compared run.
        measure: Measure name, e.g. ``"nDCG@10"``.
        path: Output image file.
        label_a: Name of the baseline in the title.
        label_b: Name of the compared run in the title.

    Returns:
        The written path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values_a = _values_for(per_query_a, measure)
    values_b = _values_for(per_query_b, measure)
    qids = list(dict.fromkeys([*values_a, *values_b]))
    deltas = sorted((values_b.get(q, 0.0) - values_a.get(q, 0.0) for q in qids), reverse=True)
    wins = sum(d > 0 for d in deltas)
    losses = sum(d < 0 for d in deltas)
    mean = sum(deltas) / len(deltas) if deltas else 0.0

    fig = Figure(figsize=(max(6.0, min(16.0, 0.06 * len(deltas) + 4)), 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colors = ["tab:green" if d > 0 else "tab:red" if d < 0 else "tab:gray" for d in deltas]
    ax.bar(range(len(deltas)), deltas, width=1.0 if len(deltas) > 50 else 0.8, color=colors)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xlim(-0.5, max(len(deltas), 1) - 0.5)
    ax.set_xlabel(f"queries, sorted by delta (n = {len(deltas)})")
    ax.set_ylabel(f"delta {measure}")
    ax.set_title(
        f"{measure} per query: {label_b} - {label_a}\n"
        f"mean {mean:+.4f}; {wins} better, {losses} worse, {len(deltas) - wins - losses} tied",
        fontsize=10,
    )
    fig.tight_layout()

    path = Path(path)
    fmt = path.suffix[1:].lower() or "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt)
    return path
