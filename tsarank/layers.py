"""Model-agnostic access to the decoder block list, and freezing all but the top N blocks.

The paper's released code trains only the top transformer blocks (``train_top_layers``) and is BLOOM-only;
here the block list is found structurally: the longest ``nn.ModuleList`` inside the decoder body. As released, only
the blocks train; the final norm and an untied head join only when asked (``train_final_norm``, ``train_lm_head``).
"""

from __future__ import annotations

from torch import nn

from .modeling import body_and_head


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's list of transformer blocks (``model.layers`` for Llama/Qwen2/Mistral, ``h`` for BLOOM/GPT-2).

    Raises:
        TypeError: when the body holds no ``nn.ModuleList``.
    """
    body, _ = body_and_head(model)
    best: nn.ModuleList | None = None
    for module in body.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (best is None or len(module) > len(best)):
            best = module
    if best is None:
        raise TypeError(f"could not find the decoder block list of {type(body).__name__}")
    return best


def freeze_all_but_top(
    model: nn.Module, n: int, *, train_final_norm: bool = False, train_lm_head: bool = False
) -> list[str]:
    """Freeze every parameter except the top ``n`` transformer blocks, as the released RankingGPT code does
    (``model.transformer.h[-top:]`` trainable, everything else frozen).

    Args:
        model: The causal LM (possibly wrapped).
        n: Number of top blocks to train.
        train_final_norm: Also train the final norm after the blocks (the released code keeps it frozen).
        train_lm_head: Also train the LM head; refused when it is tied to the input embeddings (training it would
            train the embeddings of every token).

    Returns:
        Names of the parameters left trainable.

    Raises:
        ValueError: ``n`` out of range, or ``train_lm_head`` with a tied head.
    """
    layers = find_decoder_layers(model)
    if not 0 < n <= len(layers):
        raise ValueError(f"train_top_layers must be in 1..{len(layers)} for this model, got {n}")
    body, head = body_and_head(model)
    keep: set[int] = set()
    for block in list(layers)[len(layers) - n :]:
        keep.update(id(p) for p in block.parameters())
    if train_final_norm:
        norm = final_norm(body, layers)
        if norm is None:
            raise ValueError(f"train_final_norm: {type(body).__name__} has no final norm after its blocks")
        keep.update(id(p) for p in norm.parameters())
    if train_lm_head:
        embed_ids = {id(p) for p in body.get_input_embeddings().parameters()}
        if any(id(p) in embed_ids for p in head.parameters()):
            raise ValueError("train_lm_head: the LM head of this model is tied to its input embeddings, so training it "
                             "would train every token's embedding. Fix: drop train_lm_head (the tied head stays frozen).")
        keep.update(id(p) for p in head.parameters())
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(id(p) in keep)
        if p.requires_grad:
            trainable.append(name)
    return trainable


def final_norm(body: nn.Module, layers: nn.ModuleList) -> nn.Module | None:
    """The module applied to the last block's output: a child registered after the block list whose class
    name says it is a norm (``norm`` in Llama/Qwen2/Mistral/Gemma, ``ln_f`` in BLOOM/GPT-2, ...)."""
    children = list(body.named_children())
    idx = next((i for i, (_, m) in enumerate(children) if m is layers), None)
    if idx is None:
        raise TypeError(f"the decoder block list is not a direct child of {type(body).__name__}")
    norms = [(n, m) for n, m in children[idx + 1 :] if "norm" in type(m).__name__.lower()]
    if len(norms) > 1:
        raise TypeError(f"several candidate final norms after the block list: {[n for n, _ in norms]}")
    return norms[0][1] if norms else None
