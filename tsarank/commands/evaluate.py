"""``tsarank evaluate``: score a TREC run against qrels, optionally compare with another run."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from tsarank.errors import DataError

HELP = "evaluate a TREC run against qrels (ir_measures); compare two runs with a paired t-test"

DESCRIPTION = """\
Evaluate a TREC run with ir_measures. Every judged query counts; a judged query
missing from the run scores 0. With --compare OTHER, delta = RUN - OTHER and the
p-value is a two-sided paired t-test over the judged queries.

examples:
  tsarank evaluate --run rerank.trec --qrels qrels.dl19-passage.txt --rel-level 2
  tsarank evaluate --run rerank.trec --qrels qrels.txt --compare bm25.trec --plot delta.png
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``evaluate`` subcommand."""
    from tsarank.evaluation import DEFAULT_MEASURES

    parser = subparsers.add_parser(
        "evaluate", help=HELP, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True, help="TREC run file 'qid Q0 docid rank score tag'")
    parser.add_argument("--qrels", required=True, help="TREC qrels 'qid 0 docid grade', BEIR qrels/*.tsv, or irds:ID (an ir_datasets dataset)")
    parser.add_argument(
        "--measures", nargs="+", default=list(DEFAULT_MEASURES), metavar="MEASURE",
        help=f"ir_measures names (default: {' '.join(DEFAULT_MEASURES)})",
    )
    parser.add_argument(
        "--rel-level", type=int, default=None, metavar="GRADE",
        help="minimum grade counted relevant by binary measures (AP, RR, R, P); e.g. 2 for TREC DL. nDCG is graded and ignores it",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--compare", metavar="OTHER_RUN", help="baseline run to compare against (delta = RUN - OTHER_RUN)")
    parser.add_argument("--plot", metavar="IMAGE", help="with --compare: write a bar chart of per-query deltas of the first measure")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --plot image")
    parser.set_defaults(func=run)
    return parser


def _fmt(value: float, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def _fmt_p(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    return f"{p:.1e}" if p < 1e-3 else f"{p:.4f}"


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    return obj


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _short(path: str, limit: int = 24) -> str:
    name = Path(path).name
    return name if len(name) <= limit else name[: limit - 3] + "..."


def _check_image_format(path: str) -> None:
    """The suffix of ``--plot`` must be a format matplotlib writes (else it fails after the evaluation)."""
    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    suffix = Path(path).suffix.lstrip(".").lower()
    if suffix not in formats:
        raise ValueError(f"--plot {path}: {'.' + suffix if suffix else 'no suffix'} is not an image format matplotlib "
                         f"writes; use one of {', '.join('.' + f for f in sorted(formats))}")


def run(args: argparse.Namespace) -> int:
    """Execute ``tsarank evaluate``; returns the process exit code."""
    from tsarank.data.formats import read_qrels, read_run
    from tsarank.atomic import check_output_file
    from tsarank.evaluation import compare, evaluate, parse_measures, per_query, plot_deltas

    if args.plot and not args.compare:
        print("error: --plot needs --compare OTHER_RUN (it plots per-query deltas between two runs)", file=sys.stderr)
        return 2
    try:
        if args.plot:  # the image's place and format, before reading any run
            check_output_file(args.plot, args.overwrite, flag="--plot")
            _check_image_format(args.plot)
        if args.rel_level is not None and args.rel_level < 1:
            raise ValueError(f"--rel-level must be >= 1 (grade 0 means judged non-relevant), got {args.rel_level}")
        measures = parse_measures(args.measures, rel_level=args.rel_level)
        qrels = read_qrels(args.qrels)
        top = max((g for judged in qrels.values() for g in judged.values()), default=0)
        if args.rel_level is not None and args.rel_level > top:
            raise ValueError(f"--rel-level {args.rel_level}: no judgment in {args.qrels} reaches it (highest grade "
                             f"{top}), so every binary measure would be 0")
        for name, m in zip(args.measures, measures):  # RR(rel=99): the same mistake, written in the measure
            rel = (getattr(m, "params", None) or {}).get("rel")
            if isinstance(rel, int) and rel > top:
                raise ValueError(f"measure {name}: no judgment in {args.qrels} reaches rel={rel} (highest grade "
                                 f"{top}), so it would be 0")
        main_run = read_run(args.run)
        other_run = read_run(args.compare) if args.compare else None
    except (DataError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    for path, r in ((args.run, main_run), (args.compare, other_run)):
        if r is None:
            continue
        missing = [q for q in qrels if q not in r]
        if len(missing) == len(qrels):
            print(f"warning: {path} has results for none of the {len(qrels)} judged queries; are run and qrels from the same collection?", file=sys.stderr)
        elif missing:
            print(f"warning: {len(missing)} of {len(qrels)} judged queries have no results in {path}; they count as 0", file=sys.stderr)

    names = [str(m) for m in measures]
    values = evaluate(main_run, qrels, measures)
    result: dict[str, Any] = {"run": args.run, "qrels": args.qrels, "n_queries": len(qrels), "measures": values}
    comparison = None
    if other_run is not None:
        comparison = compare(other_run, main_run, qrels, measures)
        result["compare"] = {
            "run": args.compare,
            "measures": {
                n: {
                    "value": c["mean_a"], "delta": c["delta"], "p_value": c["p_value"],
                    "wins": c["wins"], "losses": c["losses"], "ties": c["ties"],
                }
                for n, c in comparison.items()
            },
        }
        if args.plot:
            plot_deltas(
                per_query(other_run, qrels, measures[:1]), per_query(main_run, qrels, measures[:1]),
                names[0], args.plot, label_a=_short(args.compare), label_b=_short(args.run),
            )
            result["plot"] = args.plot

    if args.json:
        print(json.dumps(_json_safe(result), indent=2))
        return 0
    if comparison is None:
        rows = [["measure", _short(args.run)]] + [[n, _fmt(values[n])] for n in names]
    else:
        rows = [["measure", _short(args.run), _short(args.compare), "delta", "p-value", "+/-"]]
        for n in names:
            c = comparison[n]
            p = _fmt_p(c["p_value"])
            rows.append([n, _fmt(values[n]), _fmt(c["mean_a"]), _fmt(c["delta"], signed=True), p, f"{c['wins']}/{c['losses']}"])
    print(_table(rows))
    print(f"({len(qrels)} judged queries; missing queries count as 0" + ("; delta = run - compare, paired t-test)" if comparison else ")"))
    if args.plot:
        print(f"wrote {args.plot}")
    return 0
