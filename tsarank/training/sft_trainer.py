"""``RankingTrainer``: ``transformers.Trainer`` with the stage-2 objective of :mod:`tsarank.training.sft_loss`.

One step: the policy runs **once** over all ``B*G`` sequences through its wrapper (DDP / DeepSpeed engine, so their
hooks run), packed when the model supports it (:mod:`tsarank.packing`), then :func:`ranking_loss_terms` gathers
the rows each term needs. The reference (:mod:`tsarank.reference`) is armed before the policy forward and run
after it, once per step on every process.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
from torch import nn
from transformers import Trainer

from ..modeling import (
    HEAD_WEIGHTS,
    LastTokenHead,
    body_and_head,
    forward_hidden,
    keep_anchor,
    logit_transform,
    model_inputs,
    supports_packing,
)
from ..prompts import LAST_TOKEN
from ..reference import Reference
from ..wrappers import is_peft_model, unwrap_model
from .checkpoints import SidecarMixin
from .sft_loss import LossTerms, RankingLossConfig, ranking_loss_terms

__all__ = ["RankingTrainer", "SCORE_HEAD_ATTR", "PACK_ROW_FACTOR"]

SCORE_HEAD_ATTR = "tsarank_score_head"
#: With a dense block mask (SDPA / eager) a packed row of C positions costs C^2 attention, so rows are kept short:
#: 1.5x the longest sequence removes most of the padding while attention grows little.
PACK_ROW_FACTOR = 1.5


class RankingTrainer(SidecarMixin, Trainer):
    """``transformers.Trainer`` with the stage-2 ranking objective.

    Args:
        *args, **kwargs: As for ``Trainer`` (model, args, train_dataset, data_collator, ...). The data collator
            must be a :class:`tsarank.data.groups.GroupCollator` (or produce the same keys).
        loss_config: :class:`RankingLossConfig`.
        reference: Frozen reference (``None`` allowed only with ``lambda_dp == 0``).
        score_head: The ``last_token`` head. It becomes a submodule of the policy (attribute
            ``tsarank_score_head``) so the optimizer, DDP and DeepSpeed see its parameters; it is removed from the
            saved model weights and written to ``tsarank_head.safetensors`` instead (:meth:`LastTokenHead.load`).

    The logged ``loss`` is accompanied by ``loss_rank``, ``loss_gen`` and ``loss_dp`` (unweighted means over the
    micro-batches since the last log, averaged over processes).
    """

    def __init__(
        self,
        *args: Any,
        loss_config: RankingLossConfig,
        reference: Reference | None = None,
        score_head: LastTokenHead | None = None,
        **kwargs: Any,
    ) -> None:
        if loss_config.needs_reference() and reference is None:
            raise ValueError(
                "lambda_dp > 0 needs a frozen reference (tsarank.reference.build_reference); "
                "pass reference=..., or set lambda_dp to 0"
            )
        if loss_config.scoring_head == LAST_TOKEN and score_head is None:
            raise ValueError("scoring_head 'last_token' needs score_head=LastTokenHead(hidden_size)")
        model = kwargs.get("model", args[0] if args else None)
        if score_head is not None:
            if model is None:
                raise ValueError("RankingTrainer needs the model to attach the score head to")
            unwrap_model(model).add_module(SCORE_HEAD_ATTR, score_head)
        super().__init__(*args, **kwargs)
        self.loss_config = loss_config
        self.reference = reference
        self.loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean
        self._term_sums: dict[str, torch.Tensor] = {}
        self._term_count = 0
        self._pack: bool | None = loss_config.pack_sequences

    def _pad_id(self, model: nn.Module) -> int:
        tok = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        pad = getattr(tok, "pad_token_id", None)
        if pad is None:
            pad = getattr(unwrap_model(model).config, "pad_token_id", None)
        return int(pad) if pad is not None else 0

    # The collator's keys are not forward() arguments of the model; keep them.
    def _get_collator_with_removed_columns(self, data_collator: Callable, description: str | None = None) -> Callable:
        return data_collator

    def _prepare_inputs(self, inputs: dict[str, torch.Tensor | Any]) -> dict[str, torch.Tensor | Any]:
        # Under DeepSpeed the Trainer casts every floating input to the model's dtype; teacher scores are targets
        # of a softmax and stay fp32 (bf16 keeps ~3 significant digits).
        teacher = inputs.pop("teacher", None) if isinstance(inputs, dict) else None
        inputs = super()._prepare_inputs(inputs)
        if teacher is not None:
            inputs["teacher"] = teacher.to(device=self.args.device, dtype=torch.float32)
        return inputs

    @property
    def score_head(self) -> LastTokenHead | None:
        return getattr(unwrap_model(self.model), SCORE_HEAD_ATTR, None)

    # -------------------------------------------------------------------------------------------- loss
    def compute_terms(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> LossTerms:
        """The loss terms of one batch (``inputs`` from :class:`~tsarank.data.groups.GroupCollator`)."""
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        if self.reference is not None and self.loss_config.lambda_dp > 0:
            self.reference.prepare(model)
        if self._pack is None:
            self._pack = supports_packing(model)
        rows = model_inputs(model, input_ids, attention_mask, pack=self._pack, pad_id=self._pad_id(model),
                            capacity=int(PACK_ROW_FACTOR * input_ids.shape[1] + 0.5))
        hidden, anchor = forward_hidden(model, rows)
        _, head = body_and_head(model)
        terms = ranking_loss_terms(
            self.loss_config, head, hidden, rows, input_ids, attention_mask, inputs["query_mask"],
            teacher=inputs.get("teacher"), reference=self.reference, score_head=self.score_head,
            transform=logit_transform(model),
        )
        terms.loss = keep_anchor(terms.loss, anchor, model)
        return terms

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        terms = self.compute_terms(model, inputs)
        if model.training:
            self._accumulate(terms)
        if return_outputs:
            return terms.loss, {"scores": terms.scores.detach()}
        return terms.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            terms = self.compute_terms(model, inputs)
        if prediction_loss_only:
            return terms.loss.detach(), None, None
        return terms.loss.detach(), terms.scores.detach(), None

    # ----------------------------------------------------------------------------------------- logging
    def _accumulate(self, terms: LossTerms) -> None:
        for name in ("rank", "gen", "dp"):
            value = getattr(terms, name)
            if value is not None:
                v = value.detach().float()
                self._term_sums[name] = self._term_sums.get(name, torch.zeros_like(v)) + v
        self._term_count += 1

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._term_count:
            names = sorted(self._term_sums)
            values = torch.stack([self._term_sums[n] for n in names]) / self._term_count
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                values = values.to(self.args.device)
                torch.distributed.all_reduce(values)
                values = values / torch.distributed.get_world_size()
            for n, v in zip(names, values.tolist()):
                logs[f"loss_{n}"] = round(v, 6) + 0.0  # + 0.0: a KL of -1e-9 (rounding) logs as 0, not -0
            self._term_sums, self._term_count = {}, 0
        super().log(logs, *args, **kwargs)

    # -------------------------------------------------------------------------------------------- save
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        head = self.score_head
        if head is not None:
            marker = SCORE_HEAD_ATTR + "."
            if state_dict is None and not is_peft_model(self.model):
                state_dict = self.model.state_dict()
            head_state = None
            if state_dict is not None:
                head_state = {k.split(marker, 1)[1]: v for k, v in state_dict.items() if marker in k}
                state_dict = {k: v for k, v in state_dict.items() if marker not in k}
            if not head_state:
                head_state = head.state_dict()
            if self.args.should_save:
                os.makedirs(output_dir, exist_ok=True)
                head.save(output_dir, head_state)
        super()._save(output_dir, state_dict=state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        head = getattr(unwrap_model(model if model is not None else self.model), SCORE_HEAD_ATTR, None)
        path = os.path.join(resume_from_checkpoint, HEAD_WEIGHTS)
        if head is not None and os.path.isfile(path):
            from safetensors.torch import load_file

            head.load_state_dict(load_file(path))
