"""Callbacks both stages attach to their Trainer (:func:`attach_callbacks` puts each where it works):

* :class:`NanGuardCallback` stops at the first non-finite training loss or weight, saves nothing after it and
  raises :class:`FloatingPointError`, so the last checkpoint on disk is the last good one;
* :class:`ThroughputCallback` adds ``tokens_per_second`` (non-padding tokens, all processes) to each training log;
* :class:`RankingEvalCallback` re-ranks a small candidate set every N steps with the current weights and logs
  ``rank_eval/nDCG@10``.

Collectives issued here use tensors on ``TrainingArguments.device`` (NCCL takes CUDA tensors only), one per step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn
from transformers import TrainerCallback

from ..distributed import world
from ..prompts import PromptTemplate
from ..wrappers import unwrap_model, zero3_enabled

logger = logging.getLogger(__name__)

__all__ = [
    "NanGuardCallback",
    "ThroughputCallback",
    "RankingEvalCallback",
    "attach_callbacks",
    "standard_callbacks",
]


class _BoundCallback(TrainerCallback):
    """A callback that needs its Trainer (to read the loss or to call ``trainer.log``)."""

    trainer: Any = None

    def bind(self, trainer: Any) -> "_BoundCallback":
        self.trainer = trainer
        return self

    def _require_trainer(self) -> Any:
        if self.trainer is None:
            raise RuntimeError(f"{type(self).__name__} is not bound to its Trainer; add it with attach_callbacks()")
        return self.trainer


class NanGuardCallback(_BoundCallback):
    """Stop training at the first non-finite loss, keep the last good checkpoint, then raise ``FloatingPointError``.

    After every optimizer step (before the Trainer logs, evaluates or saves) it checks the loss accumulated since the
    last log on every process (one all-reduce of a flag). On a NaN/inf it sets ``should_training_stop`` and clears
    ``should_save``/``should_evaluate``, so no checkpoint is written from the corrupted weights; the newest
    ``checkpoint-*`` is therefore from before the bad step. When ``trainer.train()`` ends it raises
    :class:`FloatingPointError` naming the step (other callbacks' ``on_train_end``, e.g. wandb's, run first when this
    callback is attached last, as :func:`attach_callbacks` does).

    The Trainer's ``logging_nan_inf_filter`` (which would hide the NaN) is switched off when the callback is bound.
    """

    def __init__(self) -> None:
        self.bad_step: int | None = None
        self.bad_value: float | None = None

    def bind(self, trainer: Any) -> "NanGuardCallback":
        super().bind(trainer)
        if getattr(trainer.args, "logging_nan_inf_filter", False):
            trainer.args.logging_nan_inf_filter = False
        return self

    def _local_flags(self) -> torch.Tensor:
        """``[loss_bad, weights_bad]`` of this process as a float tensor on the collective device, computed without
        a host synchronisation.

        The weights check covers every trainable parameter (this process's ZeRO-3 shard, if sharded): a step can
        keep a finite loss while a NaN/inf gradient corrupts the weights it updates, and the loss only turns
        non-finite one step later, after a checkpoint of the bad weights may have been saved. The infinity norm
        of each group of same-device, same-dtype tensors (one fused kernel per group) is NaN/inf iff a value is.
        """
        trainer = self._require_trainer()
        device = trainer.args.device
        loss = getattr(trainer, "_tr_loss", None)
        loss_bad = (~torch.isfinite(loss.detach().float())).any().to(device) if isinstance(loss, torch.Tensor) \
            else torch.zeros((), dtype=torch.bool, device=device)
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for p in trainer.model.parameters():
            if p.requires_grad:
                t = getattr(p, "ds_tensor", p)  # ZeRO-3 keeps the local shard in ds_tensor
                if t.numel():
                    groups.setdefault((t.device, t.dtype), []).append(t.detach())
        weights_bad = torch.zeros((), dtype=torch.bool, device=device)
        for tensors in groups.values():
            norms = torch._foreach_norm(tensors, ord=float("inf"))
            weights_bad = weights_bad | (~torch.isfinite(torch.stack(norms))).any().to(device)
        return torch.stack([loss_bad, weights_bad]).to(torch.float32)

    def _stop(self, state: Any, control: Any, value: float) -> None:
        if self.bad_step is None:
            self.bad_step, self.bad_value = state.global_step, value
            logger.error("non-finite training loss (%s) at step %d: stopping without saving", value, state.global_step)
        control.should_training_stop = True
        control.should_save = False
        control.should_evaluate = False

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        flags = self._local_flags()
        if world()[1] > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        loss_bad, weights_bad = flags.tolist()  # the step's one host synchronisation
        if loss_bad:
            loss = getattr(self._require_trainer(), "_tr_loss", None)
            value = float(loss.detach().float().sum().item()) if isinstance(loss, torch.Tensor) else float("nan")
            self._stop(state, control, value if not math.isfinite(value) else float("nan"))
        elif weights_bad:
            logger.error("non-finite weights after the update of step %d (NaN/inf gradients)", state.global_step)
            self._stop(state, control, float("nan"))
        return control

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> Any:
        loss = (logs or {}).get("loss")
        if isinstance(loss, (int, float)) and not math.isfinite(loss):
            self._stop(state, control, float(loss))
        return control

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.bad_step is not None:
            control.should_save = False
            control.should_evaluate = False
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.bad_step is None:
            return control
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been saved before it"
        raise FloatingPointError(
            f"training loss became non-finite ({self.bad_value}) at step {self.bad_step}; training was stopped and "
            f"nothing was saved from step {self.bad_step} on ({kept}). Fix: lower the learning rate, keep "
            "max_grad_norm > 0, prefer bf16 over fp16, and check the data; then resume with "
            "--resume_from_checkpoint."
        )


class ThroughputCallback(_BoundCallback):
    """Add ``tokens_per_second`` to every training log: non-padding tokens (sum of the attention masks over all
    processes) processed since the previous training log, divided by the time spent inside those optimizer steps
    (``on_step_begin`` to ``on_step_end``), so evaluation, ranking evaluation and checkpointing between steps do not
    count. The Trainer's own ``train_tokens_per_second`` is the wall-clock average since the start.

    Counting relies on the Trainer's ``include_num_input_tokens_seen="non_padding"``, which binding switches on. The
    callback must run before the reporting callbacks (wandb) so that they see the added key, and before other
    callbacks' ``on_step_end`` work (ranking evaluation); :func:`attach_callbacks` puts it first.
    """

    def __init__(self) -> None:
        self._step_start: float | None = None
        self._busy = 0.0
        self._last_tokens = 0

    def bind(self, trainer: Any) -> "ThroughputCallback":
        super().bind(trainer)
        if getattr(trainer.args, "include_num_input_tokens_seen", "no") in ("no", False):
            trainer.args.include_num_input_tokens_seen = "non_padding"
        return self

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self._busy = 0.0
        self._last_tokens = int(state.num_input_tokens_seen or 0)
        return control

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self._step_start = time.perf_counter()
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self._step_start is not None:
            self._busy += time.perf_counter() - self._step_start
            self._step_start = None
        return control

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> Any:
        if logs is None or "loss" not in logs:
            return control
        tokens = int(state.num_input_tokens_seen or 0)
        if self._busy > 0 and tokens > self._last_tokens:
            added = {"tokens_per_second": (tokens - self._last_tokens) / self._busy}
            logs.update(added)
            # The Trainer stored a copy of these logs before calling us; keep its history complete too.
            if state.log_history and state.log_history[-1].get("step") == state.global_step and "loss" in state.log_history[-1]:
                state.log_history[-1].update(added)
        self._busy, self._last_tokens = 0.0, tokens
        return control


class RankingEvalCallback(_BoundCallback):
    """Every ``every_n_steps`` re-rank a small candidate set with the current weights and log nDCG@10.

    Candidates (rank_llm JSON, e.g. DL19 BM25 top-100) and qrels are read when the callback is built, so bad files
    fail before training. Scoring uses :class:`tsarank.inference.Ranker` on the unwrapped model in eval mode (the
    train/eval mode is restored afterwards). Under ZeRO-3 every process scores the same pairs (the parameters are
    gathered layer by layer by DeepSpeed's hooks, which are collective); otherwise only the world process zero scores.
    The metric is logged with ``trainer.log`` as ``rank_eval/nDCG@10`` (wandb shows it as
    ``train/rank_eval/nDCG@10``).

    Args:
        candidates_path: rank_llm JSON of queries with candidate passages.
        qrels_path: Relevance judgments for those queries.
        template: Prompt template (the one being trained).
        every_n_steps: Evaluation period in optimizer steps (0 = never).
        top_k: First-stage candidates re-ranked per query.
        max_queries: Use only the first N queries (``None`` = all).
        measure: ir_measures measure name.
        eval_on_start: Also evaluate before the first step (the starting model's score).
        max_tokens: Token budget per scoring batch (default: the Ranker's per-device default); lower it when the
            training run leaves little free memory.
    """

    def __init__(
        self,
        candidates_path: str | os.PathLike,
        qrels_path: str | os.PathLike,
        template: PromptTemplate,
        every_n_steps: int,
        top_k: int = 20,
        max_queries: int | None = None,
        measure: str = "nDCG@10",
        eval_on_start: bool = False,
        max_tokens: int | None = None,
    ) -> None:
        from ..data.formats import load_candidates, read_qrels

        lists, _ = load_candidates(candidates=str(candidates_path), top_k=top_k)
        if max_queries is not None:
            lists = lists[:max_queries]
        qrels = read_qrels(qrels_path)
        self.lists = [c for c in lists if c.qid in qrels]
        if not self.lists:
            raise ValueError(
                f"none of the {len(lists)} queries of {candidates_path} is judged in {qrels_path}. "
                "Fix: pass the qrels file that belongs to these candidates."
            )
        self.qrels = {c.qid: qrels[c.qid] for c in self.lists}
        self.template = template
        self.every_n_steps = every_n_steps
        self.measure = measure
        self.eval_on_start = eval_on_start
        self.max_tokens = max_tokens
        self.key = f"rank_eval/{measure}"
        self.history: list[tuple[int, float]] = []
        self._encoded: list[Any] | None = None

    def evaluate(self, model: nn.Module | None = None) -> float | None:
        """Score the candidates with ``model`` (default: the bound trainer's model) and return the measure.

        Returns ``None`` on processes that do not score (non-zero ranks without ZeRO-3).
        """
        from ..evaluation import evaluate
        from ..inference import Ranker

        trainer = self._require_trainer()
        root = model if model is not None else trainer.model
        rank, n_proc = world()
        if n_proc > 1 and not zero3_enabled() and rank != 0:
            return None
        lm = unwrap_model(root)
        was_training = root.training
        tokenizer = trainer.processing_class
        try:
            ranker = Ranker(lm, tokenizer, self.template, max_tokens=self.max_tokens)  # puts the model in eval mode
            if self._encoded is None:
                self._encoded = [ranker.encode([c.query] * len(c.texts), c.texts) for c in self.lists]
            run = {}
            for c, enc in zip(self.lists, self._encoded):
                scores = ranker.score_encoded(enc)
                run[c.qid] = list(zip(c.docids, scores))
        finally:
            root.train(was_training)
        return evaluate(run, self.qrels, [self.measure])[self.measure]

    def _run(self, state: Any) -> None:
        trainer = self._require_trainer()
        start = time.perf_counter()
        value = self.evaluate()
        if value is not None and trainer.is_world_process_zero():
            self.history.append((state.global_step, value))
            # Trainer.log clears control.should_log; restore it, or this process would skip the step's own loss log
            # (whose all-gather the other processes still enter: a deadlock under DeepSpeed/DDP).
            keep = trainer.control.should_log
            trainer.log({self.key: value, "rank_eval/seconds": time.perf_counter() - start})
            trainer.control.should_log = keep

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.eval_on_start and state.global_step == 0:
            self._run(state)
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.every_n_steps > 0 and state.global_step % self.every_n_steps == 0:
            self._run(state)
        return control


#: Environment variable naming a file a training run reports its progress to (what ``tsarank demo`` shows).
PROGRESS_FILE_ENV = "TSARANK_PROGRESS_FILE"


class ProgressFileCallback(TrainerCallback):
    """Write ``{"step", "max_steps", "loss", "seconds"}`` to a file after every step (process zero only, replaced
    atomically), so a parent process can show steps, loss, rate and time left without parsing logs."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.loss: float | None = None
        self.start = time.time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.loss = float(logs["loss"])
            self._write(state)  # the loss is logged after the step ends

    def on_step_end(self, args, state, control, **kwargs):
        self._write(state)

    def _write(self, state) -> None:
        if state.is_world_process_zero:
            from ..atomic import atomic_write_text

            atomic_write_text(self.path, json.dumps({"step": state.global_step, "max_steps": state.max_steps,
                                                     "loss": self.loss, "seconds": round(time.time() - self.start, 2)}))


def attach_callbacks(trainer: Any, callbacks: Iterable[TrainerCallback] = ()) -> list[TrainerCallback]:
    """Bind tsarank callbacks to ``trainer`` and insert them where they work.

    :class:`ThroughputCallback` goes first (its key must reach the reporting callbacks), :class:`NanGuardCallback`
    last (its ``on_step_end`` must come after the default flow decided to save, and its ``on_train_end`` raises);
    others are appended.
    """
    added = []
    for cb in callbacks:
        if isinstance(cb, _BoundCallback):
            cb.bind(trainer)
        if isinstance(cb, ThroughputCallback):
            trainer.callback_handler.callbacks.insert(0, cb)
        else:
            trainer.callback_handler.callbacks.append(cb)
        added.append(cb)
    # Keep the NaN guard last even when other callbacks are added after it.
    guards = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, NanGuardCallback)]
    for g in guards:
        trainer.callback_handler.callbacks.remove(g)
        trainer.callback_handler.callbacks.append(g)
    return added


def standard_callbacks(data_args: Any, template: PromptTemplate) -> list[TrainerCallback]:
    """Throughput + NaN guard, plus the ranking evaluation when ``data_args.rank_eval_steps`` and files are set."""
    cbs: list[TrainerCallback] = [ThroughputCallback(), NanGuardCallback()]
    if os.environ.get(PROGRESS_FILE_ENV):
        cbs.append(ProgressFileCallback(os.environ[PROGRESS_FILE_ENV]))
    steps = getattr(data_args, "rank_eval_steps", 0)
    cand, qrels = getattr(data_args, "rank_eval_candidates", None), getattr(data_args, "rank_eval_qrels", None)
    if steps and (cand is None or qrels is None):
        raise ValueError("rank_eval_steps > 0 needs rank_eval_candidates and rank_eval_qrels. Fix: set both, or rank_eval_steps: 0")
    if steps:
        cbs.append(
            RankingEvalCallback(cand, qrels, template, steps, top_k=data_args.rank_eval_top_k,
                                max_queries=data_args.rank_eval_max_queries)
        )
    return cbs
