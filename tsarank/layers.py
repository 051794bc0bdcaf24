"""Model-agnostic access to the decoder block list, and freezing all but the top N blocks.

The paper's released code trains only the top transformer blocks (``train_top_layers``) and is BLOOM-only;
here the block list is found structurally: the longest ``nn.ModuleList`` inside the decoder body.
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


def freeze_all_but_top(model: nn.Module, n: int) -> list[str]:
    """Freeze every parameter except the top ``n`` blocks and what follows them (final norm; the LM head
    only when it is not tied to the input embeddings).

    Returns:
        Names of the parameters left trainable.
    """
    layers = find_decoder_layers(model)
    if not 0 < n <= len(layers):
        raise ValueError(f"train_top_layers must be in 1..{len(layers)} for this model, got {n}")
    body, head = body_and_head(model)
    keep: set[int] = set()
    for block in list(layers)[len(layers) - n :]:
        keep.update(id(p) for p in block.parameters())
    # Modules of the body registered after the block list (final norm) act on the top blocks' output.
    children = [m for _, m in body.named_children()]
    if any(m is layers for m in children):
        for m in children[next(i for i, m in enumerate(children) if m is layers) + 1 :]:
            keep.update(id(p) for p in m.parameters())
    embed_ids = {id(p) for p in body.get_input_embeddings().parameters()}
    keep.update(id(p) for p in head.parameters() if id(p) not in embed_ids)
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
