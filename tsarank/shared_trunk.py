"""Score the same pairs with several checkpoints that share their bottom transformer blocks, running the shared
part once.

A two-stage run trained with ``train_top_layers = N`` in both stages leaves the embeddings and the bottom
``L - N`` blocks of the zero-shot model, ``M_cpt`` and ``M_sft`` bit-identical. Comparing them (the demo, an
ablation table) would otherwise run those blocks once per checkpoint. Here the trunk runs once per batch and only
each checkpoint's own top blocks, final norm and LM head run per checkpoint: with 3 checkpoints sharing 22 of 30
blocks the work is ``22/30 + 3 * 8/30 = 1.53`` model passes instead of 3 (``scripts/bench_shared_trunk.py``).

Sharing is established from the weights, never assumed: the longest prefix of blocks whose parameters are equal
(``torch.equal``) across all checkpoints, with equal embeddings and equal model configs. Without any shared
prefix every checkpoint simply runs its own full forward. Scores are the same computation as
:meth:`tsarank.Ranker.score_pairs` (mean log p of the query tokens), so they agree with it to float rounding.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .inference import Ranker, check_pairs, collate_pairs, plan_batches, positive_int_or_none
from .layers import final_norm, find_decoder_layers
from .modeling import body_and_head, logit_transform, query_likelihood_scores
from .packing import padded_inputs
from .reference import block_inputs
from .row_head import row_logprobs, segment_mean, target_rows

__all__ = ["shared_prefix_blocks", "score_pairs_shared"]

# Config fields that describe where a checkpoint came from, not what it computes.
_CONFIG_METADATA = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures", "use_cache"}


def _config_key(model: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in model.config.to_dict().items() if k not in _CONFIG_METADATA}


def _same_params(modules: Sequence[nn.Module]) -> bool:
    first = list(modules[0].state_dict().items())
    for other in modules[1:]:
        rest = other.state_dict()
        if len(rest) != len(first):
            return False
        for name, tensor in first:
            o = rest.get(name)
            if o is None or o.shape != tensor.shape or not torch.equal(o.to(tensor.device), tensor):
                return False
    return True


def shared_prefix_blocks(models: Sequence[nn.Module]) -> int:
    """Number of leading decoder blocks whose weights are identical in every model.

    Returns 0 when the models differ in class, config or input embeddings (then nothing can be shared), and at
    most ``L - 1``: the last block always runs per model, so every model keeps a block list of its own to run.
    """
    lms = [body_and_head(m)[0] for m in models]
    if len({type(m) for m in models}) != 1 or any(_config_key(m) != _config_key(models[0]) for m in models[1:]):
        return 0
    if not _same_params([b.get_input_embeddings() for b in lms]):
        return 0
    blocks = [find_decoder_layers(m) for m in models]
    n = min(len(b) for b in blocks)
    k = 0
    while k < n - 1 and _same_params([b[k] for b in blocks]):
        k += 1
    return k


class _Top:
    """What one model runs on top of the shared trunk: its blocks ``k ..``, then (per gathered row) its final
    norm and LM head."""

    def __init__(self, model: nn.Module, k: int) -> None:
        body, self.head = body_and_head(model)
        blocks = find_decoder_layers(model)
        self.blocks = list(blocks)[k:]
        self.norm = final_norm(body, blocks)
        self.transform = logit_transform(model)

    def scores(self, trunk: tuple[tuple[Any, ...], dict[str, Any]], batch: Any) -> torch.Tensor:
        """``[B]`` mean log p of the query tokens, from the inputs of block ``k``."""
        args, kwargs = trunk
        hidden = args[0]
        for block in self.blocks:
            out = block(hidden, *args[1:], **kwargs)
            hidden = out[0] if isinstance(out, (tuple, list)) else out
        seq, pos = target_rows(batch.target_mask)
        rows = hidden[seq, pos]
        # Norms act per position: normalising the gathered query rows only is exact and cheaper.
        rows = self.norm(rows) if self.norm is not None else rows
        lp, _ = row_logprobs(self.head, rows, batch.input_ids[seq, pos + 1], transform=self.transform)
        return segment_mean(lp, seq, batch.input_ids.shape[0])


def _check_compatible(rankers: Sequence[Ranker]) -> None:
    r0 = rankers[0]
    for i, r in enumerate(rankers[1:], start=1):
        if r.head is not None or r0.head is not None:
            raise ValueError("shared-trunk scoring covers query-likelihood checkpoints; a last_token head was given")
        if r.template != r0.template:
            raise ValueError(f"rankers[{i}] has another prompt template or token budget than rankers[0]; the pairs "
                             "would be encoded differently. Fix: give every ranker the same template.")
        if r.pad_id != r0.pad_id or r.device != r0.device or r.tokenizer.get_vocab() != r0.tokenizer.get_vocab():
            raise ValueError(f"rankers[{i}] has another tokenizer, pad token or device than rankers[0]")


def score_pairs_shared(
    rankers: Sequence[Ranker],
    pairs: Iterable[tuple[str, str]],
    *,
    batch_size: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[list[list[float]], int]:
    """Score ``pairs`` with every ranker, running their shared bottom blocks once per batch.

    Args:
        rankers: Query-likelihood rankers with the same template, tokenizer and device.
        pairs: ``(query, doc)`` pairs.
        batch_size: Optional cap on sequences per batch (the first ranker's token budget applies as well).
        on_batch: Called with the number of pairs after each batch (progress bars).

    Returns:
        ``(scores, shared)``: ``scores[m][i]`` is ranker ``m``'s score of pair ``i`` (input order), and ``shared``
        the number of blocks run once for all rankers (0: each ran its full model).
    """
    rankers = list(rankers)
    if not rankers:
        raise ValueError("score_pairs_shared needs at least one ranker")
    _check_compatible(rankers)
    positive_int_or_none(batch_size, "batch_size")
    pairs = check_pairs(pairs)  # the checks of Ranker.score_pairs
    if not pairs:
        return [[] for _ in rankers], 0
    r0 = rankers[0]
    models = [r.model for r in rankers]
    k = shared_prefix_blocks(models) if len(models) > 1 else 0
    tops = [_Top(m, k) for m in models] if k else []
    first_top = find_decoder_layers(models[0])[k] if k else None
    encoded = r0.encode([q for q, _ in pairs], [d for _, d in pairs])
    scores = [[0.0] * len(encoded) for _ in rankers]
    with torch.inference_mode():
        for idx in plan_batches([len(e.input_ids) for e in encoded], r0.max_tokens, batch_size):
            batch = collate_pairs([encoded[i] for i in idx], r0.pad_id, r0.device)
            if k:
                trunk = block_inputs(models[0], first_top, padded_inputs(batch.input_ids, batch.attention_mask))
                outs = [top.scores(trunk, batch) for top in tops]
            else:
                outs = [query_likelihood_scores(m, batch.input_ids, batch.attention_mask, batch.target_mask)
                        for m in models]
            for row, out in zip(scores, outs):
                for i, s in zip(idx, out.tolist()):
                    row[i] = s
            if on_batch is not None:
                on_batch(len(idx))
    return scores, k
