"""Stage 1 (continual pre-training) loss and Trainer.

The loss is next-token NLL on the labelled tokens (the query span, or the whole sequence with ``mask_source: false``)
computed without ``[B, L, V]`` logits: the body runs once (on packed rows with ``packing``, :mod:`tsarank.packing`),
the hidden states of the rows whose *next* token has a label are gathered, and the row head
(:func:`tsarank.row_head.row_logprobs`) gives their log-probabilities in fp32::

    L = (1/N) * sum_{(b,t): labels[b, t+1] != -100} -log softmax(W h[b, t])[labels[b, t+1]]

``N`` is the number of labelled tokens of the micro-batch (the Trainer averages micro-batches under gradient
accumulation, and DeepSpeed/DDP average processes).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import EvalLoopOutput

from ..data.collate import IGNORE_INDEX
from ..modeling import body_and_head, forward_hidden, keep_anchor, logit_transform, model_inputs
from ..row_head import row_logprobs
from .checkpoints import SidecarMixin


def selected_rows(
    batch: dict[str, torch.Tensor], span: str = "labels"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows ``(b, t)`` whose hidden state predicts a selected token, and those tokens.

    Args:
        batch: Collated batch (``input_ids``, ``labels``, ``target_mask``).
        span: ``"labels"`` (tokens with a label, i.e. the training loss) or ``"query"`` (the query tokens).

    Returns:
        ``(batch_idx [N], pred_pos [N], targets [N])``; token ``(b, t+1)`` is predicted from ``(b, t)``.
    """
    if span == "labels":
        labels = batch["labels"]
        sel = labels[:, 1:] != IGNORE_INDEX
        b, t = sel.nonzero(as_tuple=True)
        return b, t, labels[b, t + 1]
    if span == "query":
        sel = batch["target_mask"][:, 1:]
        b, t = sel.nonzero(as_tuple=True)
        return b, t, batch["input_ids"][b, t + 1]
    raise ValueError(f"span must be 'labels' or 'query', got {span!r}")


def causal_lm_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    span: str = "labels",
    *,
    packing: bool = False,
    capacity: int | None = None,
    pad_id: int = 0,
) -> tuple[torch.Tensor, int]:
    """Mean next-token NLL over the selected tokens of a right-padded batch, and their number.

    Args:
        model: The model as the Trainer passes it (DeepSpeed engine, DDP, peft or plain causal LM).
        batch: A :class:`tsarank.data.collate.CPTCollator` batch on the model's device.
        span: ``"labels"`` or ``"query"`` (see :func:`selected_rows`).
        packing: Run the body on packed rows (each pair attends only to itself; same values).
        capacity: Packed row length for SDPA/eager (default: the batch's padded length).
        pad_id: Fill value of packed rows' tails.

    Returns:
        ``(loss, n_tokens)``; the loss is an fp32 scalar (0 with a zero gradient when nothing is selected). The head
        runs once per call whatever the number of tokens, so every process makes the same collectives.
    """
    rows = model_inputs(model, batch["input_ids"], batch["attention_mask"], pack=packing, pad_id=pad_id,
                        capacity=capacity)
    hidden, anchor = forward_hidden(model, rows)
    seq, pos, targets = selected_rows(batch, span)
    _, head = body_and_head(model)
    lp, _ = row_logprobs(head, rows.gather(hidden, seq, pos), targets, transform=logit_transform(model))
    loss = -lp.sum() / max(lp.numel(), 1)
    return keep_anchor(loss, anchor, model), int(lp.numel())


class CausalLMTrainer(SidecarMixin, Trainer):
    """``Trainer`` whose loss is :func:`causal_lm_loss` and whose evaluation reports the query perplexity.

    ``evaluate()`` returns ``eval_loss`` (mean NLL per query token on the validation split, whatever
    ``mask_source`` is) and ``eval_query_ppl = exp(eval_loss)``, summed over tokens and processes before dividing.

    Args:
        *args, **kwargs: As for ``Trainer``.
        packing: Pack each batch's pairs into fewer rows (:mod:`tsarank.packing`).
        packing_max_length: Packed row length for SDPA/eager (default: the longest pair of the batch).
    """

    # compute_loss returns a per-micro-batch mean: let the Trainer divide by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, packing: bool = False, packing_max_length: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.packing = packing
        self.packing_max_length = packing_max_length

    def _loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], span: str) -> tuple[torch.Tensor, int]:
        pad = getattr(self.processing_class, "pad_token_id", None)
        return causal_lm_loss(model, inputs, span, packing=self.packing, capacity=self.packing_max_length,
                              pad_id=int(pad) if pad is not None else 0)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        loss, _ = self._loss(model, inputs, "labels")
        return (loss, None) if return_outputs else loss

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> EvalLoopOutput:
        # Model preparation as in Trainer.evaluation_loop (needed when evaluate() runs before train()).
        if self.is_deepspeed_enabled and self.deepspeed is None:
            from transformers.integrations.deepspeed import deepspeed_init

            deepspeed_init(self, num_training_steps=0, inference=True)
        model = self._wrap_model(self.model, training=False)
        if len(self.accelerator._models) == 0 and model is self.model:
            model = self.accelerator.prepare(model) if self.is_deepspeed_enabled else self.accelerator.prepare_model(model, evaluation_mode=True)
            if model is not self.model:
                self.model_wrapped = model
            if self.is_deepspeed_enabled:
                self.deepspeed = self.model_wrapped
        was_training = model.training
        model.eval()
        device = self.args.device
        dataset = dataloader.dataset
        rank, world = self.args.process_index, self.args.world_size
        bs = self.args.per_device_eval_batch_size
        # Shard without the duplicated samples a padded distributed sampler adds (they would bias the perplexity);
        # processes with fewer batches run a zero-weight repeat so that every process makes the same number of
        # forward calls (ZeRO-3 gathers parameters collectively inside each forward).
        mine = list(range(rank, len(dataset), world))
        batches = [mine[i : i + bs] for i in range(0, len(mine), bs)]
        n_batches = torch.tensor(len(batches), device=device)
        if world > 1:
            torch.distributed.all_reduce(n_batches, op=torch.distributed.ReduceOp.MAX)
        nll = torch.zeros((), dtype=torch.float64, device=device)
        count = torch.zeros((), dtype=torch.float64, device=device)
        start = time.perf_counter()
        try:
            with torch.no_grad():
                for k in range(int(n_batches.item())):
                    real = k < len(batches)
                    feats = [dataset[i] for i in (batches[k] if real else [0])]
                    inputs = self._prepare_inputs(self.data_collator(feats))
                    loss, n = self._loss(model, inputs, "query")
                    if real:
                        nll += loss.double() * n
                        count += n
        finally:
            model.train(was_training)
        if world > 1:
            torch.distributed.all_reduce(nll)
            torch.distributed.all_reduce(count)
        mean = (nll / count.clamp(min=1)).item()
        metrics = {
            f"{metric_key_prefix}_loss": mean,
            f"{metric_key_prefix}_query_ppl": math.exp(min(mean, 700.0)),
            f"{metric_key_prefix}_query_tokens": int(count.item()),
            f"{metric_key_prefix}_seconds": time.perf_counter() - start,
        }
        return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics, num_samples=len(dataset))
