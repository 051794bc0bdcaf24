"""ir_datasets as a source, offline, with the real ir_datasets code path: an ir_datasets home is laid out from
../shared/data (the same SciFact and NFCorpus files, zipped where ir_datasets keeps its download) and every command
given ``--dataset ID`` / ``irds:ID`` must produce exactly what it produces from the files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
import ir_datasets  # noqa: E402,F401 - a dev dependency: a missing one fails here rather than skipping


@pytest.fixture(scope="module")
def irds_home(tmp_path_factory, shared_data):
    sys.path.insert(0, str(ROOT / "scripts"))
    from irds_offline_home import build

    home = tmp_path_factory.mktemp("irds_home")
    for name in ("scifact", "nfcorpus"):
        build(shared_data / "beir" / name, home)
    return home


def _tsarank(home: Path, *argv: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "IR_DATASETS_HOME": str(home), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "tsarank.cli", *map(str, argv)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return proc


def test_readers_give_the_files_contents(irds_home, shared_data):
    code = f"""
import json
from tsarank.data.formats import read_corpus, read_qrels, read_queries
d = {str(shared_data / "beir" / "scifact")!r}
same = [read_qrels("irds:beir/scifact/test") == read_qrels(d + "/qrels/test.tsv"),
        read_queries("irds:beir/scifact/test") == {{q: t for q, t in read_queries(d).items()
                                                    if q in read_qrels(d + "/qrels/test.tsv")}},
        {{k: v.full_text for k, v in read_corpus("irds:beir/scifact").items()}}
        == {{k: v.full_text for k, v in read_corpus(d).items()}}]
print(json.dumps(same))
"""
    env = {**os.environ, "IR_DATASETS_HOME": str(irds_home)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [True, True, True]


def test_retrieve_rerank_evaluate_and_groups_match_the_files(irds_home, shared_data, tiny_checkpoint, tmp_path):
    scifact = shared_data / "beir" / "scifact"
    # retrieve: --dataset against the BEIR directory and split.
    _tsarank(irds_home, "retrieve", "--dataset", "beir/scifact/test", "--top-k", "10", "--out", tmp_path / "a.trec")
    _tsarank(irds_home, "retrieve", "--corpus", scifact, "--qrels-split", "test", "--top-k", "10",
             "--out", tmp_path / "b.trec")
    assert (tmp_path / "a.trec").read_bytes() == (tmp_path / "b.trec").read_bytes()
    # evaluate: irds qrels against the qrels file.
    a = _tsarank(irds_home, "evaluate", "--run", tmp_path / "a.trec", "--qrels", "irds:beir/scifact/test", "--json")
    b = _tsarank(irds_home, "evaluate", "--run", tmp_path / "a.trec", "--qrels", scifact / "qrels" / "test.tsv",
                 "--json")
    assert json.loads(a.stdout)["measures"] == json.loads(b.stdout)["measures"]
    # rerank: --dataset (BM25 first stage inside) against the run file with the corpus and queries files.
    common = ["--model", tiny_checkpoint, "--dtype", "float32", "--top-k", "4", "--max-queries", "3"]
    _tsarank(irds_home, "rerank", "--dataset", "beir/scifact/test", *common, "--out", tmp_path / "r1.trec")
    _tsarank(irds_home, "rerank", "--run", tmp_path / "b.trec", "--queries", scifact / "queries.jsonl", "--corpus",
             scifact, *common, "--out", tmp_path / "r2.trec")
    assert (tmp_path / "r1.trec").read_bytes() == (tmp_path / "r2.trec").read_bytes()
    assert len((tmp_path / "r1.trec").read_text().splitlines()) == 12
    # data groups: --dataset against the files.
    nf = shared_data / "beir" / "nfcorpus"
    g = ["--max-queries", "5", "--negatives", "3", "--depth-end", "30", "--seed", "1"]
    _tsarank(irds_home, "data", "groups", "--dataset", "beir/nfcorpus/train", *g, "--out", tmp_path / "g1.jsonl")
    _tsarank(irds_home, "data", "groups", "--corpus", nf, "--qrels", "train", *g, "--out", tmp_path / "g2.jsonl")
    assert (tmp_path / "g1.jsonl").read_bytes() == (tmp_path / "g2.jsonl").read_bytes()


def test_unknown_ids_and_clashing_options_are_one_line(irds_home, tmp_path):
    p = _tsarank(irds_home, "retrieve", "--dataset", "beir/scifact/tset", "--out", tmp_path / "x.trec", ok=False)
    assert p.returncode == 2 and "no such ir_datasets dataset; did you mean beir/scifact/test" in p.stderr, p.stderr
    p = _tsarank(irds_home, "rerank", "--dataset", "beir/scifact/test", "--corpus", "x", "--out", tmp_path / "y.trec",
                 ok=False)
    assert p.returncode == 2 and "provides the queries and documents; drop" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


REGISTER = """
import sys
import ir_datasets
from ir_datasets.datasets.base import Dataset
from ir_datasets.formats import TrecQrels, TrecScoredDocs, TsvDocs, TsvQueries
from ir_datasets.util import LocalDownload

d = sys.argv[1]
ir_datasets.registry.register("tsarank-test/tiny", Dataset(
    TsvDocs(LocalDownload(d + "/docs.tsv")), TsvQueries(LocalDownload(d + "/queries.tsv")),
    TrecScoredDocs(LocalDownload(d + "/run.trec")), TrecQrels(LocalDownload(d + "/qrels.txt"), {1: "relevant"})))
from tsarank.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_rerank_takes_the_first_stage_from_a_datasets_scoreddocs(irds_home, tiny_checkpoint, tmp_path):
    """A dataset with scoreddocs (as msmarco-passage/trec-dl-2019 has): rerank --dataset re-ranks them, reading only
    the documents it needs from the dataset's document store, exactly as from the same files."""
    d = tmp_path / "tiny"
    d.mkdir()
    docs = {f"d{i}": f"passage {i} about {'france and paris' if i % 3 == 0 else 'bananas'} number {i}" for i in range(30)}
    (d / "docs.tsv").write_text("".join(f"{k}\t{v}\n" for k, v in docs.items()))
    (d / "queries.tsv").write_text("q1\tcapital of france\nq2\tbanana fruit\n")
    (d / "run.trec").write_text("".join(f"{q} Q0 d{i} {r} {20 - r} bm25\n" for q, ids in (("q1", range(0, 12)),
                                         ("q2", range(10, 20))) for r, i in enumerate(ids, 1)))
    (d / "qrels.txt").write_text("q1 0 d3 1\nq2 0 d11 1\n")
    env = {**os.environ, "IR_DATASETS_HOME": str(irds_home), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    common = ["--model", str(tiny_checkpoint), "--dtype", "float32", "--top-k", "8"]
    a = subprocess.run([sys.executable, "-c", REGISTER, str(d), "rerank", "--dataset", "tsarank-test/tiny", *common,
                        "--out", str(tmp_path / "a.trec")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert a.returncode == 0, a.stderr[-3000:]
    _tsarank(irds_home, "rerank", "--run", d / "run.trec", "--queries", d / "queries.tsv", "--corpus", d / "docs.tsv",
             *common, "--out", tmp_path / "b.trec")
    assert (tmp_path / "a.trec").read_bytes() == (tmp_path / "b.trec").read_bytes()
    assert len((tmp_path / "a.trec").read_text().splitlines()) == 16
