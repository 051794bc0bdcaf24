"""tsarank.evaluation against hand-computed values and the published DL19 BM25 number; the evaluate CLI."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
from scipy.stats import ttest_rel

from tsarank.commands import evaluate as evaluate_cmd
from tsarank.data.formats import read_qrels, read_run, write_run
from tsarank.evaluation import compare, evaluate, parse_measures, per_query, plot_deltas

DATA = (Path(__file__).resolve().parents[2] / "../shared/data").resolve()


def real(rel: str) -> Path:
    path = DATA / rel
    if not path.exists():
        pytest.skip(f"real data file {path} not found (expected ../shared/data beside the repository)")
    return path


# Judgments: q1 has d1:3, d2:0, d3:1, d4:2 (d5 unjudged); q2 has d7:1.
QRELS = {"q1": {"d1": 3, "d2": 0, "d3": 1, "d4": 2}, "q2": {"d7": 1}}
# Run: q1 ranks d3, d2, d1, d5 (d4 not retrieved); q2 is missing (counts 0); q3 is unjudged (ignored).
RUN = {
    "q1": [("d3", 0.9), ("d2", 0.8), ("d1", 0.7), ("d5", 0.6)],
    "q3": [("d1", 1.0)],
}

LOG2 = math.log2
# q1 nDCG@10, linear gains (trec_eval), discount log2(rank + 1):
#   DCG  = 1/log2(2) [d3, grade 1] + 0 [d2] + 3/log2(4) [d1, grade 3] + 0 [d5] = 1 + 1.5 = 2.5
#   IDCG = 3/log2(2) + 2/log2(3) + 1/log2(4) = 3 + 1.2618595 + 0.5 = 4.7618595
#   nDCG = 2.5 / 4.7618595 = 0.5250050
Q1_NDCG = 2.5 / (3 / LOG2(2) + 2 / LOG2(3) + 1 / LOG2(4))
# q1 RR@10 (grade >= 1): first relevant d3 at rank 1 -> 1.0; with rel=2: d1 at rank 3 -> 1/3.
Q1_RR, Q1_RR_REL2 = 1.0, 1 / 3
# q1 AP (grade >= 1; relevant d1, d3, d4, R = 3): hits at rank 1 (P=1/1) and rank 3 (P=2/3):
#   AP = (1 + 2/3) / 3 = 0.5555556;   with rel=2 (d1, d4; R = 2): hit at rank 3 (P=1/3) -> (1/3) / 2 = 1/6
Q1_AP, Q1_AP_REL2 = (1 + 2 / 3) / 3, (1 / 3) / 2
# q1 R@100 with rel=2: d1 found, d4 not -> 1/2.
Q1_R_REL2 = 0.5


def test_hand_computed_per_query_and_mean():
    assert Q1_NDCG == pytest.approx(0.5250050, abs=1e-7)
    pq = per_query(RUN, QRELS, ["nDCG@10", "RR@10", "AP"])
    assert pq["nDCG@10"] == pytest.approx({"q1": Q1_NDCG, "q2": 0.0})
    assert pq["RR@10"] == pytest.approx({"q1": Q1_RR, "q2": 0.0})
    assert pq["AP"] == pytest.approx({"q1": Q1_AP, "q2": 0.0})
    means = evaluate(RUN, QRELS, ["nDCG@10", "RR@10", "AP"])
    # q2 is judged but missing from the run: it counts as 0; q3 is unjudged: ignored.
    assert means == pytest.approx({"nDCG@10": Q1_NDCG / 2, "RR@10": Q1_RR / 2, "AP": Q1_AP / 2})


def test_rel_level_applies_to_binary_measures_only():
    measures = parse_measures(["nDCG@10", "RR@10", "AP", "R@100", "RR(rel=1)@5"], rel_level=2)
    # an explicit rel is kept (ir_measures prints the default rel=1 as plain "RR@5")
    assert [str(m) for m in measures] == ["nDCG@10", "RR(rel=2)@10", "AP(rel=2)", "R(rel=2)@100", "RR@5"]
    assert measures[4].params["rel"] == 1
    assert [str(m) for m in parse_measures(["AP"], rel_level=None)] == ["AP"]
    means = evaluate(RUN, QRELS, measures[:4])
    assert means["nDCG@10"] == pytest.approx(Q1_NDCG / 2)
    assert means["RR(rel=2)@10"] == pytest.approx(Q1_RR_REL2 / 2)
    assert means["AP(rel=2)"] == pytest.approx(Q1_AP_REL2 / 2)
    # q2 has no judgment >= 2; trec_eval/ir_measures still count it (as 0)
    assert means["R(rel=2)@100"] == pytest.approx(Q1_R_REL2 / 2)
    with pytest.raises(ValueError, match="nDCG@10"):
        parse_measures(["ndcg@10"], None)


def test_compare_paired_t_test_and_missing_queries():
    qrels = {"a": {"x": 1}, "b": {"x": 1}, "c": {"x": 1}, "d": {"x": 1}}
    base = {"a": [("x", 1.0)], "b": [("y", 2.0), ("x", 1.0)], "c": [("y", 2.0), ("z", 1.5), ("x", 1.0)]}  # d missing
    better = {q: [("x", 3.0)] for q in "abc"} | {"d": [("y", 2.0), ("x", 1.0)]}
    # RR@10 per query: base a=1, b=1/2, c=1/3, d=0 (missing); better a=b=c=1, d=1/2
    result = compare(base, better, qrels, ["RR@10"])["RR@10"]
    a, b = [1.0, 0.5, 1 / 3, 0.0], [1.0, 1.0, 1.0, 0.5]
    assert result["mean_a"] == pytest.approx(sum(a) / 4)
    assert result["mean_b"] == pytest.approx(sum(b) / 4)
    assert result["delta"] == pytest.approx((sum(b) - sum(a)) / 4)
    assert result["p_value"] == pytest.approx(ttest_rel(b, a).pvalue)
    assert (result["wins"], result["losses"], result["ties"], result["n_queries"]) == (3, 0, 1, 4)
    same = compare(base, base, qrels, ["RR@10"])["RR@10"]
    assert same["delta"] == 0 and same["p_value"] == 1.0


def test_plot_deltas_writes_png_atomically(tmp_path):
    pa = per_query(RUN, QRELS, ["nDCG@10"])
    pb = per_query({"q1": [("d1", 1.0)], "q2": [("d7", 1.0)]}, QRELS, ["nDCG@10"])
    out = plot_deltas(pa, pb, "nDCG@10", tmp_path / "delta.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["delta.png"]
    plot_deltas(pa["nDCG@10"], pb["nDCG@10"], "nDCG@10", tmp_path / "flat.png")  # {qid: value} works too
    assert (tmp_path / "flat.png").stat().st_size > 0


def test_dl19_bm25_ndcg10_matches_published():
    run = read_run(real("trec-dl-passage/bm25_top100/trec_results_dl19.txt"))
    qrels = read_qrels(real("trec-dl-passage/qrels.dl19-passage.txt"))
    scores = evaluate(run, qrels, parse_measures(["nDCG@10", "R@100"], rel_level=2))
    assert scores["nDCG@10"] == pytest.approx(0.5058, abs=1e-3)
    assert scores["R(rel=2)@100"] == pytest.approx(0.491, abs=1e-3)


def test_written_run_evaluates_like_the_original(tmp_path):
    run = read_run(real("trec-dl-passage/bm25_top100/trec_results_dl19.txt"))
    qrels = read_qrels(real("trec-dl-passage/qrels.dl19-passage.txt"))
    out = tmp_path / "copy.trec"
    write_run(out, run, tag="copy")
    assert evaluate(read_run(out), qrels, ["nDCG@10", "AP"]) == pytest.approx(evaluate(run, qrels, ["nDCG@10", "AP"]), abs=1e-9)


# --------------------------------------------------------------------------- CLI


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tsarank")
    sub = parser.add_subparsers(dest="command", required=True)
    evaluate_cmd.add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def _write_fixture_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    qrels = tmp_path / "qrels.txt"
    qrels.write_text("".join(f"{q} 0 {d} {g}\n" for q, judged in QRELS.items() for d, g in judged.items()))
    run = tmp_path / "run.trec"
    write_run(run, RUN)
    other = tmp_path / "other.trec"
    write_run(other, {"q1": [("d1", 3.0), ("d4", 2.0), ("d3", 1.0)], "q2": [("d7", 1.0)]})
    return qrels, run, other


def test_cli_table_and_json(tmp_path, capsys):
    qrels, run, other = _write_fixture_files(tmp_path)
    assert _cli(["evaluate", "--run", str(run), "--qrels", str(qrels), "--measures", "nDCG@10", "AP", "--rel-level", "2"]) == 0
    out, err = capsys.readouterr()
    assert "nDCG@10" in out and f"{Q1_NDCG / 2:.4f}" in out
    assert "AP(rel=2)" in out and f"{Q1_AP_REL2 / 2:.4f}" in out
    assert "1 of 2 judged queries have no results" in err

    plot = tmp_path / "d.png"
    rc = _cli(["evaluate", "--run", str(run), "--qrels", str(qrels), "--measures", "nDCG@10", "--compare", str(other), "--json", "--plot", str(plot)])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["measures"]["nDCG@10"] == pytest.approx(Q1_NDCG / 2)
    cmp = result["compare"]["measures"]["nDCG@10"]
    assert cmp["value"] == pytest.approx(1.0)  # other run is perfect on both queries
    assert cmp["delta"] == pytest.approx(Q1_NDCG / 2 - 1.0)
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_cli_errors(tmp_path, capsys):
    qrels, run, _ = _write_fixture_files(tmp_path)
    assert _cli(["evaluate", "--run", str(run), "--qrels", str(qrels), "--plot", str(tmp_path / "x.png")]) == 2
    assert "--compare" in capsys.readouterr().err
    assert _cli(["evaluate", "--run", str(qrels), "--qrels", str(qrels)]) == 2
    err = capsys.readouterr().err
    assert f"{qrels}:1:" in err and "6 whitespace-separated columns" in err
    assert _cli(["evaluate", "--run", str(run), "--qrels", str(qrels), "--measures", "bogus@3"]) == 2
    assert "unknown measure" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, needle",
    [("nDCG@0", "cutoff"), ("P@0", "cutoff"), ("RR@0", "cutoff"), ("nDCG@1.5", "cutoff"), ("AP(rel=1.5)", "rel="),
     ("nDCG@10000000000000000000", "cutoff"), ("RR(rel=0)", "rel="), ("Bpref(rel=0)", "rel="),
     ("nDCG(rel=1)", "unsupported params found: ['rel']"), ("ERR(rel=1)@10", "unsupported params"),
     ("RBP(p=0)", "invalid param p=0"), ("IPrec@0", "invalid param recall=0"), ("Compat(p=2)", "invalid param")],
)
def test_cli_refuses_bad_cutoffs_before_reading(tmp_path, capsys, name, needle):
    """nDCG@0 / P@0 used to abort inside pytrec_eval's C code, RR@0 gave 0; nDCG@1.5, RR(rel=0), nDCG(rel=1), RBP(p=0)
    and a cutoff beyond a C int were tracebacks from a backend after the files were read."""
    qrels, run, _ = _write_fixture_files(tmp_path)
    missing = tmp_path / "missing.trec"  # the measure is refused before any file is read
    assert _cli(["evaluate", "--run", str(missing), "--qrels", str(qrels), "--measures", name]) == 2
    err = capsys.readouterr().err
    assert needle in err and name in err and "Traceback" not in err


def test_a_measures_rel_beyond_every_grade_is_refused(tmp_path, capsys):
    """RR(rel=99) was silently 0, while --rel-level 99 was already refused."""
    qrels, run, _ = _write_fixture_files(tmp_path)
    assert _cli(["evaluate", "--run", str(run), "--qrels", str(qrels), "--measures", "RR(rel=99)"]) == 2
    assert "no judgment" in capsys.readouterr().err
