"""SFT ranking groups: per-epoch deterministic negative sampling and the group collator.

A training example is one query with ``G`` documents: a positive at index 0 and ``G - 1`` negatives. Which
positive and which negatives are drawn depends only on ``(seed, epoch, index)``, so a run is reproducible,
every epoch sees fresh negatives, and different data-loader workers / processes agree without coordination.

Sampling rules (per record, per epoch):

- positive: one of the record's positives, uniformly;
- negatives: ``G - 1`` distinct negatives when the record has at least that many; otherwise every negative
  once plus the remainder drawn uniformly *with replacement* (so each negative appears at least once);
- a record with no negative at all cannot form a group when ``G > 1``: :class:`GroupDataset` raises a
  :class:`~tsarank.errors.DataError` naming the record at construction (before any model is loaded), with the
  fix (mine negatives with ``tsarank data groups``). ``G == 1`` needs no negatives.
"""

from __future__ import annotations

import hashlib
import math
import random
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset
from transformers import TrainerCallback

from tsarank.errors import DataError
from tsarank.prompts import LAST_TOKEN, PromptTemplate, encode_pairs

__all__ = ["GroupDataset", "EpochCallback", "GroupCollator", "doc_text"]


def doc_text(passage: dict[str, Any]) -> str:
    """The document text the model sees: ``title + " " + text`` when a title is present, else ``text``."""
    title = (passage.get("title") or "").strip()
    text = passage.get("text") or ""
    if title and text:
        return f"{title} {text}"
    return title or text


def _rng(seed: int, epoch: int, index: int) -> random.Random:
    """An RNG that depends only on ``(seed, epoch, index)`` (stable across processes and Python versions)."""
    digest = hashlib.sha256(f"tsarank-groups:{seed}:{epoch}:{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


class GroupDataset(Dataset):
    """Ranking groups over validated records (from :func:`tsarank.data.formats.read_groups`).

    Args:
        records: Normalised groups: ``{"query", "positive_passages", "negative_passages", "teacher_scores"?}``.
        group_size: ``G`` = 1 positive + ``G - 1`` negatives.
        seed: Sampling seed; the sample of record ``i`` in epoch ``e`` depends only on ``(seed, e, i)``.
        source: File the records came from, used to name a bad record in errors (``file:line`` assumes one
            record per line, as written by ``tsarank data groups``).

    Raises:
        ValueError: ``group_size < 1``.
        DataError: A record without positives, or without negatives when ``group_size > 1``.
    """

    def __init__(
        self, records: Sequence[dict[str, Any]], group_size: int, seed: int = 42, source: str | None = None
    ) -> None:
        if group_size < 1:
            raise ValueError(f"train_group_size must be >= 1 (1 positive + G-1 negatives), got {group_size}")
        self.records = list(records)
        self.group_size = int(group_size)
        self.seed = int(seed)
        self.epoch = 0
        where = source or "<records>"
        for i, rec in enumerate(self.records):
            if not rec.get("positive_passages"):
                raise DataError(where, i + 1, "positive_passages", "expected at least one positive passage, got none",
                                fix="drop the group or add its relevant passage")
            if self.group_size > 1 and not rec.get("negative_passages"):
                raise DataError(
                    where, i + 1, "negative_passages",
                    f"expected at least one negative passage for train_group_size {self.group_size}, got none "
                    f"(query {rec.get('query', '')[:60]!r})",
                    fix="mine hard negatives first (`tsarank data groups` / scripts/mine_negatives.py), drop the "
                    "group, or use train_group_size 1",
                )
        self.has_teacher = any(rec.get("teacher_scores") is not None for rec in self.records)
        if self.has_teacher and not all(rec.get("teacher_scores") is not None for rec in self.records):
            missing = next(i for i, r in enumerate(self.records) if r.get("teacher_scores") is None)
            raise DataError(where, missing + 1, "teacher_scores",
                            "some groups have teacher_scores and this one has none",
                            fix="give every group teacher_scores, or none")

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Select the negatives of epoch ``epoch`` (called by :class:`EpochCallback`)."""
        self.epoch = int(epoch)

    def sample_indices(self, index: int, epoch: int | None = None) -> tuple[int, list[int]]:
        """``(positive index, negative indices)`` of record ``index`` in ``epoch`` (default: current epoch)."""
        rec = self.records[index]
        rng = _rng(self.seed, self.epoch if epoch is None else epoch, index)
        pos = rng.randrange(len(rec["positive_passages"]))
        n_neg = len(rec["negative_passages"])
        k = self.group_size - 1
        if k == 0:
            return pos, []
        if n_neg >= k:
            negs = rng.sample(range(n_neg), k)
        else:
            # Too few: use each once, fill the rest with replacement, shuffle so order carries no signal.
            negs = list(range(n_neg)) + [rng.randrange(n_neg) for _ in range(k - n_neg)]
            rng.shuffle(negs)
        return pos, negs

    def __getitem__(self, index: int) -> dict[str, Any]:
        """``{"query": str, "docs": [positive, G-1 negatives], "teacher": [G] floats | None}``."""
        rec = self.records[index]
        pos, negs = self.sample_indices(index)
        docs = [doc_text(rec["positive_passages"][pos])] + [doc_text(rec["negative_passages"][j]) for j in negs]
        teacher = rec.get("teacher_scores")
        if teacher is not None:
            n_pos = len(rec["positive_passages"])
            teacher = [float(teacher[pos])] + [float(teacher[n_pos + j]) for j in negs]
        return {"query": rec["query"], "docs": docs, "teacher": teacher}


class EpochCallback(TrainerCallback):
    """Re-sample negatives every epoch: calls ``dataset.set_epoch(epoch)`` at each epoch start.

    With ``dataloader_num_workers > 0`` keep ``dataloader_persistent_workers`` off (the default): workers hold
    a copy of the dataset and only see the new epoch when they are re-created for it.
    """

    def __init__(self, dataset: GroupDataset) -> None:
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):  # noqa: D401 - TrainerCallback hook
        # state.epoch is the number of finished epochs as a float: at a boundary it may be 0.9999999 (accumulated
        # 1/steps_per_epoch), and when resuming mid-epoch it is e.g. 1.5. Floor with a tolerance gives the
        # current epoch's index in both cases (rounding would jump to the next epoch's negatives on resume).
        self.dataset.set_epoch(int(math.floor((state.epoch or 0) + 1e-4)))
        return control


class GroupCollator:
    """Tokenize ``B`` groups of ``G`` (query, doc) pairs into one right-padded batch of ``B * G`` rows.

    Rows are ordered group by group (row ``b * G + j`` = document ``j`` of group ``b``; ``j = 0`` positive).
    The L_gen / L_dp masks are derived from ``attention_mask`` and ``query_mask`` by the loss
    (:mod:`tsarank.training.sft_loss`), so the collator only emits what cannot be derived.

    Args:
        tokenizer: A fast tokenizer with a pad token.
        template: The prompt template (its ``scoring_head`` decides the text layout).
        group_size: ``G``; every example must carry exactly ``G`` docs.

    Returns (``__call__``):
        ``input_ids [B*G, L]`` long, ``attention_mask [B*G, L]`` long, ``query_mask [B*G, L]`` bool (the query
        tokens from :func:`~tsarank.prompts.encode_pairs`: the scored span of the query-likelihood head, the query
        inside the prompt of the ``last_token`` head, which scores the last token),
        and ``teacher [B, G]`` float when the examples carry teacher scores.
    """

    def __init__(self, tokenizer: Any, template: PromptTemplate, group_size: int) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token")
        self.tokenizer = tokenizer
        self.template = template
        self.group_size = int(group_size)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        g = self.group_size
        queries, docs = [], []
        for ex in examples:
            if len(ex["docs"]) != g:
                raise ValueError(f"expected {g} docs per group (train_group_size), got {len(ex['docs'])}")
            queries.extend([ex["query"]] * g)
            docs.extend(ex["docs"])
        enc = encode_pairs(self.tokenizer, self.template, queries, docs)
        n, length = len(enc), max(len(e.input_ids) for e in enc)
        input_ids = torch.full((n, length), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, length), dtype=torch.long)
        query_mask = torch.zeros((n, length), dtype=torch.bool)
        for i, e in enumerate(enc):
            input_ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids, dtype=torch.long)
            attention_mask[i, : len(e.input_ids)] = 1
            query_mask[i, e.query_start : e.query_end] = True
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "query_mask": query_mask}
        teachers = [ex.get("teacher") for ex in examples]
        if any(t is not None for t in teachers):
            if any(t is None for t in teachers):
                raise ValueError("some groups in the batch have teacher scores and some do not")
            batch["teacher"] = torch.tensor(teachers, dtype=torch.float32)
        return batch

    @property
    def is_last_token(self) -> bool:
        return self.template.scoring_head == LAST_TOKEN
