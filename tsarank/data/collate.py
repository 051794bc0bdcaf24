"""Stage-1 (CPT) datasets and collation: weak pairs -> Arrow dataset of token ids -> right-padded batches.

Dataset: the weak-pairs file is validated in one streaming pass (errors name ``file:line``), then its normalised
``(text, query)`` records are written to an Arrow table by ``datasets`` (memory-mapped, cached, never a Python list of
the whole file) and tokenized in batches by :func:`tsarank.prompts.encode_pairs`, the same code inference uses.

Batches: :class:`CPTCollator` pads on the right. Packing (several pairs per row, each attending only to itself) happens
on the device, in the loss (:func:`tsarank.training.cpt_trainer.causal_lm_loss` with :mod:`tsarank.packing`), so the
same batch can run padded or packed.

Labels: ``-100`` everywhere except the tokens the loss covers: the query span (``mask_source=True``) or every real
token but the first of each pair (``mask_source=False``; the first token has no prefix to be predicted from).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..prompts import PromptTemplate, encode_pairs

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


# ------------------------------------------------------------------------------------------- dataset
def _weak_pair_records(path: str, stamp: str) -> Iterator[dict[str, str]]:
    """Normalised ``{"text", "query"}`` records of a weak-pairs file (``stamp`` only keys the ``datasets`` cache)."""
    from .formats import read_weak_pairs

    for _line, text, query in read_weak_pairs(path):
        yield {"text": text, "query": query}


def validate_weak_pairs(path: str | os.PathLike) -> int:
    """Stream the whole file through :func:`tsarank.data.formats.read_weak_pairs`; return the number of pairs.

    Raises:
        DataError: the first malformed line (``file:line: field ...``) or an empty file.
    """
    from .formats import read_weak_pairs

    n = 0
    for _ in read_weak_pairs(path):
        n += 1
    return n


def build_cpt_dataset(
    path: str | os.PathLike,
    tokenizer: Any,
    template: PromptTemplate,
    *,
    max_samples: int | None = None,
    num_proc: int | None = None,
    cache_dir: str | None = None,
    validate: bool = True,
    target_eos: bool = True,
) -> Any:
    """Validate, load and tokenize a weak-pairs JSONL file into a ``datasets.Dataset``.

    Columns: ``input_ids`` (list of int), ``target_start``, ``target_end`` (the query span), ``label_end`` (one past
    the last token the loss covers: the query, plus the EOS token with ``target_eos``) and ``length``.

    Args:
        path: Weak pairs, ``{"text", "query"}`` or RankingGPT ``{"query": "Document: ... Query:", "response"}`` lines.
        tokenizer: Fast tokenizer of the model.
        template: Prompt template and token budgets.
        max_samples: Keep only the first N pairs.
        num_proc: Processes for tokenization (``datasets.map``).
        cache_dir: ``datasets`` cache directory (default: the HF datasets cache).
        validate: Run the up-front validation pass (set False only for a file already validated).
        target_eos: Put the tokenizer's EOS token right after the query and make it a target, as the released CPT
            does (``target = response + eos_token``): the model learns where a query ends.

    Returns:
        A tokenized, Arrow-backed ``datasets.Dataset``.
    """
    import datasets

    path = str(path)
    if validate:
        n = validate_weak_pairs(path)
        logger.info("%s: %d valid weak pairs", path, n)
    st = os.stat(path)
    # The cache key includes size and mtime: an edited file is re-read, an unchanged one is not.
    stamp = f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"
    features = datasets.Features({"text": datasets.Value("string"), "query": datasets.Value("string")})
    ds = datasets.Dataset.from_generator(
        _weak_pair_records, gen_kwargs={"path": path, "stamp": stamp}, features=features, cache_dir=cache_dir
    )
    if max_samples is not None:
        ds = ds.select(range(min(max_samples, len(ds))))

    eos = tokenizer.eos_token_id
    if target_eos and eos is None:
        raise ValueError("target_eos needs an EOS token, and this tokenizer has none. Fix: target_eos: false "
                         "(the loss then covers the query tokens only).")

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[Any]]:
        enc = encode_pairs(tokenizer, template, batch["query"], batch["text"])
        ids, ends = [], []
        for e in enc:
            seq = list(e.input_ids)
            if target_eos:
                if e.target_end >= len(seq) or seq[e.target_end] != eos:  # unless the tokenizer put one there
                    seq.insert(e.target_end, eos)
                ends.append(e.target_end + 1)
            else:
                ends.append(e.target_end)
            ids.append(seq)
        return {
            "input_ids": ids,
            "target_start": [e.target_start for e in enc],
            "target_end": [e.target_end for e in enc],
            "label_end": ends,
            "length": [len(x) for x in ids],
        }

    return ds.map(
        tokenize, batched=True, batch_size=1000, remove_columns=["text", "query"], num_proc=num_proc,
        desc=f"tokenizing {Path(path).name}",
    )


# ------------------------------------------------------------------------------------------- labels
def pair_labels(input_ids: Sequence[int], target_start: int, target_end: int, mask_source: bool) -> list[int]:
    """Labels of one unpadded pair.

    Args:
        input_ids: The pair's token ids.
        target_start: First query token.
        target_end: One past the last labelled target token (the query's last token, or the EOS after it).
        mask_source: True: only ``[target_start, target_end)`` is labelled; False: every token except the first.

    Returns:
        ``len(input_ids)`` labels, ``-100`` where there is no loss.
    """
    n = len(input_ids)
    if not 0 < target_start < target_end <= n:
        raise ValueError(f"bad query span [{target_start}, {target_end}) for a sequence of {n} tokens")
    if mask_source:
        return [IGNORE_INDEX] * target_start + list(input_ids[target_start:target_end]) + [IGNORE_INDEX] * (n - target_end)
    return [IGNORE_INDEX] + list(input_ids[1:])


@dataclass
class CPTCollator:
    """Turn tokenized pairs into a right-padded CPT batch.

    Output (all ``[B, L]``): ``input_ids`` (padded with ``pad_token_id``), ``attention_mask`` (1 on real tokens; also
    what the Trainer counts as tokens seen), ``labels`` (see module docstring) and ``target_mask`` (bool, the query
    tokens, used for the validation query perplexity whatever ``mask_source`` is).

    Args:
        pad_token_id: Padding id.
        mask_source: Loss on query tokens only (True) or on every token but each pair's first (False).
        pad_to_multiple_of: Round the length up to a multiple of this (tensor cores).
    """

    pad_token_id: int
    mask_source: bool = True
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("CPTCollator got an empty batch")
        seqs = [list(f["input_ids"]) for f in features]
        width = max(len(s) for s in seqs)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        n = len(seqs)
        ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        att = torch.zeros((n, width), dtype=torch.long)
        lab = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        tgt = torch.zeros((n, width), dtype=torch.bool)
        for i, (seq, f) in enumerate(zip(seqs, features)):
            start, end = int(f["target_start"]), int(f["target_end"])
            label_end = int(f.get("label_end", end))
            k = len(seq)
            ids[i, :k] = torch.tensor(seq)
            att[i, :k] = 1
            lab[i, :k] = torch.tensor(pair_labels(seq, start, label_end, self.mask_source))
            tgt[i, start:end] = True  # the query tokens (validation perplexity), without the EOS
        return {"input_ids": ids, "attention_mask": att, "labels": lab, "target_mask": tgt}
