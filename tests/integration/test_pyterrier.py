"""tsarank in PyTerrier: a pt.Experiment over SciFact from DataFrames (BM25 >> text >> TsarankReRanker), whose
figures must equal tsarank's own evaluation of the same re-ranking."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration
import pyterrier as pt  # noqa: E402 - a dev dependency: a missing one fails here rather than skipping


def test_experiment_over_scifact_matches_tsarank_evaluation(shared_data, default_model_dir):
    import pandas as pd

    from tsarank import Ranker
    from tsarank.data.formats import read_corpus, read_qrels, read_queries
    from tsarank.evaluation import evaluate
    from tsarank.pyterrier import TsarankReRanker
    from tsarank.retrieval import bm25_retrieve

    scifact = shared_data / "beir" / "scifact"
    qrels = read_qrels(scifact / "qrels" / "test.tsv")
    queries = {q: t for q, t in read_queries(scifact).items() if q in qrels}
    queries = dict(list(queries.items())[:6])
    corpus = read_corpus(scifact)
    texts = {d: doc.full_text for d, doc in corpus.items()}
    first = bm25_retrieve(corpus, queries, top_k=8)

    topics = pd.DataFrame({"qid": list(queries), "query": list(queries.values())})
    qrels_df = pd.DataFrame([{"qid": q, "docno": d, "label": g} for q, judged in qrels.items() if q in queries
                             for d, g in judged.items()])
    bm25_df = pd.DataFrame([{"qid": q, "docno": d, "score": s, "rank": r}
                            for q, ranked in first.items() for r, (d, s) in enumerate(ranked)])
    bm25 = pt.Transformer.from_df(bm25_df)
    get_text = pt.apply.generic(lambda df: df.assign(text=df["docno"].map(texts)))
    ranker = Ranker.from_pretrained(str(default_model_dir), dtype="float32", template="tsarank")
    reranker = TsarankReRanker(ranker=ranker)
    from ir_measures import nDCG

    table = pt.Experiment([bm25, bm25 >> get_text >> reranker], topics, qrels_df, eval_metrics=[nDCG @ 10],
                          names=["bm25", "tsarank"], baseline=0)

    # Independent: the same model scores each query's candidates; tsarank's evaluation (trec_eval's tie order).
    reranked = {q: list(zip([d for d, _ in first[q]], ranker.score(queries[q], [texts[d] for d, _ in first[q]])))
                for q in queries}
    by_name = table.set_index("name")
    judged = {q: qrels[q] for q in queries}
    assert by_name.loc["tsarank", "nDCG@10"] == pytest.approx(evaluate(reranked, judged, ["nDCG@10"])["nDCG@10"], abs=1e-9)
    assert by_name.loc["bm25", "nDCG@10"] == pytest.approx(evaluate(first, judged, ["nDCG@10"])["nDCG@10"], abs=1e-9)
    assert "nDCG@10 p-value" in table.columns  # PyTerrier's significance test against the baseline ran

    # The transformer's own output: every input row, score from the model, rank 0 = best per query.
    out = (bm25 >> get_text >> reranker).transform(topics.head(1))
    q0 = topics["qid"].iloc[0]
    assert sorted(out["docno"]) == sorted(d for d, _ in first[q0])
    best = out.sort_values("rank").iloc[0]
    assert best["rank"] == 0 and best["score"] == max(s for _, s in reranked[q0])
    with pytest.raises(ValueError, match="missing text"):
        reranker.transform(bm25_df.assign(query="q").head(2))
    with pytest.raises(ValueError, match="have no 'text'"):  # a docno the text lookup did not know
        reranker.transform(bm25_df.assign(query="q", text=None).head(2))
