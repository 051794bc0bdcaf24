"""The demo's evaluation: BM25 candidates for DL19, SciFact and NFCorpus, re-ranked by each model, scored
with ir_measures and compared with BM25 by a paired t-test."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .data.formats import CandidateList, read_corpus, read_qrels, read_queries, read_rank_llm, write_run
from .evaluation import compare, evaluate, parse_measures
from .retrieval import bm25_retrieve

# Binary measures on graded qrels: TREC DL counts grade >= 2 as relevant; BEIR's graded NFCorpus uses >= 1.
REL_LEVEL = {"dl19": 2, "scifact": 1, "nfcorpus": 1}


def load_dataset_candidates(data: Path, dataset: str, top_k: int, max_queries: int | None) -> tuple[list[CandidateList], dict]:
    """BM25 top-k candidate lists and the qrels restricted to the evaluated queries.

    DL19 uses the shipped BM25 top-100 (Pyserini); the BEIR sets are retrieved here with bm25s. Queries are
    taken in sorted qid order when ``max_queries`` caps them, so a preset always evaluates the same subset.
    """
    if dataset == "dl19":
        dl = data / "trec-dl-passage"
        lists = read_rank_llm(dl / "bm25_top100" / "retrieve_results_dl19.json")
        qrels = read_qrels(dl / "qrels.dl19-passage.txt")
        lists = sorted((c for c in lists if c.qid in qrels), key=lambda c: c.qid)
    else:
        d = data / "beir" / dataset
        qrels = read_qrels(d / "qrels" / "test.tsv")
        queries = read_queries(d / "queries.jsonl")
        corpus = read_corpus(d / "corpus.jsonl")
        qids = sorted(qrels)[:max_queries] if max_queries else sorted(qrels)
        run = bm25_retrieve(corpus, {q: queries[q] for q in qids}, top_k=top_k)
        lists = [
            CandidateList(q, queries[q], [d_ for d_, _ in run[q]], [corpus[d_].full_text for d_, _ in run[q]],
                          [s for _, s in run[q]])
            for q in qids
        ]
    if max_queries:
        lists = lists[:max_queries]
    lists = [c.head(top_k) for c in lists]
    kept = {c.qid for c in lists}
    return lists, {q: rel for q, rel in qrels.items() if q in kept}


def measures_for(dataset: str, top_k: int) -> list[Any]:
    return parse_measures(["nDCG@10", "RR@10", f"R@{top_k}"], rel_level=REL_LEVEL[dataset])


def _measure_key(m: Any) -> str:
    """``RR(rel=2)@10`` -> ``RR@10``: report names stay the ir_measures short names."""
    s = str(m)
    return s.replace("(rel=2)", "").replace("(rel=1)", "")


def evaluate_systems(data: Path, runs_dir: Path, models: dict[str, str], preset: Any, desc: str = "evaluate",
                     dtype: str = "auto") -> dict:
    """Evaluate BM25 and each model on every dataset.

    Args:
        data: The data folder (``shared/data`` layout).
        runs_dir: Where the TREC runs are written (``{dataset}.{system}.trec``).
        models: ``{system: checkpoint path or "default"}``.
        preset: A demo preset (``top_k``, ``max_queries``).
        desc: Label of the progress bar.
        dtype: The models' weights: ``"auto"`` is bf16 on a GPU and on CPUs with AVX512-BF16 / AMX (2.3x the docs/s at
            the same DL19 nDCG@10 there, BENCHMARKS.md), fp32 elsewhere.

    Returns:
        ``{dataset: {system: {measure: value}}, "significance": {dataset: {system: {measure: p}}},
        "sft_vs_zero_shot": {dataset: {measure: {"delta", "p_value", "wins", "losses"}}},
        "setup": {dataset: {"queries": n, "top_k": k}, "shared_blocks": n}}`` (``shared_blocks``: decoder
        blocks run once for all models, see :mod:`tsarank.shared_trunk`).
    """
    from tqdm import tqdm

    from .default_model import default_model_path
    from .inference import Ranker
    from .shared_trunk import score_pairs_shared

    runs_dir.mkdir(parents=True, exist_ok=True)
    cands: dict[str, list[CandidateList]] = {}
    qrels: dict[str, dict] = {}
    depth = {ds: preset.top_k if ds == "dl19" else (preset.beir_top_k or preset.top_k) for ds in ("dl19", "scifact", "nfcorpus")}
    for ds in depth:
        cands[ds], qrels[ds] = load_dataset_candidates(data, ds, depth[ds], preset.max_queries.get(ds))
    runs: dict[str, dict[str, dict]] = {ds: {"bm25": {c.qid: list(zip(c.docids, c.scores)) for c in cands[ds]}} for ds in cands}

    pairs = [(c.query, t) for ds in cands for c in cands[ds] for t in c.texts]
    rankers = []
    for path in models.values():
        ranker = Ranker.from_pretrained(str(default_model_path()) if path == "default" else path, dtype=dtype)
        # Every system reads the same document budget (the one the stages train with): the default model's own
        # template allows 256 tokens, which alone moved zero-shot DL19 nDCG@10 by about 0.02 against 128-token
        # checkpoints in a measured run, an unfair comparison.
        ranker.template = dataclasses.replace(ranker.template, max_doc_tokens=preset.max_doc_tokens)
        rankers.append(ranker)
    # Checkpoints trained with train_top_layers in both stages share their bottom blocks with the zero-shot
    # model: those run once per batch for all systems (tsarank.shared_trunk); otherwise each runs in full.
    # A last-token checkpoint (its own prompt and head) cannot share the query-likelihood trunk: it runs alone.
    together = [i for i, r in enumerate(rankers) if r.head is None and r.template == rankers[0].template]
    alone = [i for i in range(len(rankers)) if i not in together]
    all_scores: list[list[float]] = [[] for _ in rankers]
    with tqdm(total=len(pairs) * (1 + len(alone)), desc=f"{desc} {'+'.join(models)}", unit="doc") as bar:
        shared_scores, shared = score_pairs_shared([rankers[i] for i in together], pairs, on_batch=bar.update)
        for i, scores in zip(together, shared_scores):
            all_scores[i] = scores
        for i in alone:
            all_scores[i] = rankers[i].score_pairs(pairs, on_batch=bar.update)
    score_dtype = str(rankers[0].model.dtype).replace("torch.", "") if rankers else None
    del rankers
    for system, scores in zip(models, all_scores):
        it = iter(scores)
        for ds in cands:
            runs[ds][system] = {c.qid: [(d, next(it)) for d in c.docids] for c in cands[ds]}

    results: dict[str, Any] = {"significance": {}, "sft_vs_zero_shot": {},
                               "setup": {"shared_blocks": shared, "dtype": score_dtype}}
    for ds in cands:
        ms = measures_for(ds, depth[ds])
        results[ds] = {}
        results["significance"][ds] = {}
        results["setup"][ds] = {"queries": len(cands[ds]), "top_k": depth[ds], "rel_level": REL_LEVEL[ds]}
        for system, run in runs[ds].items():
            write_run(runs_dir / f"{ds}.{system}.trec", run, tag=system)
            results[ds][system] = {_measure_key(k): v for k, v in evaluate(run, qrels[ds], ms).items()}
            if system != "bm25":
                cmp = compare(runs[ds]["bm25"], run, qrels[ds], ms)
                results["significance"][ds][system] = {_measure_key(k): v["p_value"] for k, v in cmp.items()}
        if "sft" in runs[ds] and "zero_shot" in runs[ds]:
            # Did training help? The same paired test, M_sft against the model both stages started from.
            cmp = compare(runs[ds]["zero_shot"], runs[ds]["sft"], qrels[ds], ms)
            results["sft_vs_zero_shot"][ds] = {
                _measure_key(k): {"delta": v["delta"], "p_value": v["p_value"], "wins": v["wins"], "losses": v["losses"]}
                for k, v in cmp.items()
            }
    return results
