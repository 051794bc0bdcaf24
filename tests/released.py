"""The released scoring code of the published rankers, written out plainly as test references.

- :func:`rankinggpt_eval_scores`: RankingGPT's eval.py (github.com/Alibaba-NLP/RankingGPT): prompt
  ``"Document: {doc} Query:"``, the document cut by ``decode(encode(doc, max_length=512 - len(encode(prompt)) -
  len(encode(query)) - 10))``, the text ``source + query`` (no space), score = mean log-probability of the tokens after
  the first ``len(tokenize(source))`` tokens. Here one example at a time (no padding) on CPU.
- :func:`rankllama_card_scores`: castorini/rankllama-v1-7b-lora-passage's model card:
  ``tokenizer(f"query: {q}", f"document: {doc}")``, the merged sequence-classification model, ``logits[0][0]``.
"""

from __future__ import annotations

from typing import Sequence

import torch


def rankinggpt_eval_scores(model, tokenizer, pairs: Sequence[tuple[str, str]]) -> list[float]:
    prompt = "Document: {doc} Query:"
    prompt_len = len(tokenizer.encode(prompt))
    scores = []
    for q, d in pairs:
        query = q.replace("[PAD]", "PAD")
        budget = 512 - prompt_len - len(tokenizer.encode(query)) - 10
        doc = tokenizer.decode(tokenizer.encode(d, max_length=budget, truncation=True, add_special_tokens=False))
        source = prompt.format(doc=doc).replace("[PAD]", "PAD")
        ids = tokenizer(source + query, return_tensors="pt")["input_ids"][0]
        n_src = len(tokenizer(source)["input_ids"])
        with torch.no_grad():
            logp = model(input_ids=ids[None, :-1]).logits[0].float().log_softmax(-1)
        lp = logp.gather(-1, ids[1:, None])[:, 0][n_src - 1:]
        scores.append(lp.mean().item())
    return scores


def rankllama_card_scores(model, tokenizer, pairs: Sequence[tuple[str, str]]) -> list[float]:
    scores = []
    for q, d in pairs:
        inputs = tokenizer(f"query: {q}", f"document: {d}", return_tensors="pt")
        with torch.no_grad():
            scores.append(model(**inputs).logits[0][0].item())
    return scores
