"""The language-model core: loading, the one forward, and the scoring heads.

Everything that runs a causal LM in tsarank (``Ranker`` scoring, stage-1 CPT, stage-2 SFT, the frozen
references, shared-trunk evaluation) goes through these functions:

- :func:`load_causal_lm` loads with the device, dtype and attention rules of :mod:`tsarank.backend`;
- :func:`model_inputs` decides padded or packed rows (:mod:`tsarank.packing`);
- :func:`forward_hidden` runs the model once and returns its final hidden states (never ``[B, L, V]`` logits);
- :func:`tsarank.row_head.row_logprobs` turns the rows that predict a scored token into log-probabilities.

``query_likelihood_scores`` and ``last_token_scores`` are the two scoring heads built on them.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch
from torch import nn

from .backend import from_pretrained_attn, resolve_device, resolve_dtype
from .packing import ModelInputs, can_pack, pack_sequences, padded_inputs
from .row_head import LogitTransform, row_logprobs, segment_mean, target_rows
from .wrappers import call_as_forward, unwrap_model

logger = logging.getLogger(__name__)

__all__ = [
    "HEAD_WEIGHTS",
    "load_causal_lm",
    "body_and_head",
    "logit_transform",
    "supports_packing",
    "check_packing",
    "model_inputs",
    "forward_hidden",
    "keep_anchor",
    "query_likelihood_scores",
    "LastTokenHead",
    "last_token_scores",
]

HEAD_WEIGHTS = "tsarank_head.safetensors"


# ----------------------------------------------------------------------------------------------- loading
def load_causal_lm(
    name_or_path: str,
    *,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = "auto",
    device: torch.device | str | None = None,
    compute_dtype: torch.dtype | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Load any ``AutoModelForCausalLM`` with tsarank's dtype and attention-backend rules.

    Args:
        name_or_path: Local checkpoint or Hub id.
        dtype: Weights' dtype (``"auto"``: :func:`tsarank.backend.resolve_dtype`).
        attn_implementation: ``"auto"`` or an explicit backend (:func:`tsarank.backend.resolve_attn_implementation`).
        device: Where to put the model (``None``: leave it where ``from_pretrained`` put it, the CPU; the attention
            choice then assumes CUDA when available, as the Trainer will move it there).
        compute_dtype: The dtype attention computes in when it differs from the weights' (fp32 weights under bf16
            autocast); default the weights' dtype.
        **kwargs: Passed to ``from_pretrained``.
    """
    from transformers import AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype, device)
    attn = from_pretrained_attn(attn_implementation, device, compute_dtype or torch_dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype, attn_implementation=attn,
                                                     **kwargs)
    except Exception as exc:
        # safetensors' and torch's own errors for a truncated or corrupt weight file are tracebacks without a path.
        if type(exc).__name__ == "SafetensorError" or "Unable to load weights" in str(exc) or \
                isinstance(exc, EOFError) or "PytorchStreamReader" in str(exc):
            from .errors import ModelLoadError

            raise ModelLoadError(f"{name_or_path}: its weight files cannot be read ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''}). Fix: the checkpoint is truncated "
                                 "or corrupt; save, copy or download it again") from exc
        raise
    if device is not None:
        model.to(resolve_device(device))
    return model


# ------------------------------------------------------------------------------------------- structure
def body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Split a causal LM into its transformer body (returns hidden states) and its output projection.

    The submodules themselves are returned, so peft adapters and ZeRO-3 parameter hooks (module-level) keep
    working when they are called.
    """
    lm = unwrap_model(model)
    # A *ForSequenceClassification ranker (RankLLaMA) has no LM head: its `score` layer is the head.
    head = lm.get_output_embeddings()
    if head is None:
        head = getattr(lm, "score", None)
    body = lm.get_decoder() if hasattr(lm, "get_decoder") else getattr(lm, lm.base_model_prefix, None)
    if head is None or body is None:
        raise TypeError(f"{type(lm).__name__} has no output embeddings / decoder; is it a causal LM?")
    return body, head


def logit_transform(model: nn.Module) -> LogitTransform:
    """The architecture's logit scale / soft cap, applied by the row head as the model's own forward does."""
    return LogitTransform.of(unwrap_model(model).config)


def supports_packing(model: nn.Module) -> bool:
    """True when packed rows stay apart in this model: an attention implementation :mod:`tsarank.packing` handles,
    and a model that builds its masks with ``transformers.masking_utils`` (so it takes a 4D block mask as is and
    passes varlen arguments to FlashAttention): Llama, Qwen2, Mistral, Gemma, ... in transformers v5."""
    lm = unwrap_model(model)
    body, _ = body_and_head(lm)
    mods = {sys.modules.get(type(m).__module__) for m in (lm, body)}
    uses_masking_utils = any(m is not None and hasattr(m, "create_causal_mask") for m in mods)
    return uses_masking_utils and can_pack(getattr(lm.config, "_attn_implementation", None))


def check_packing(model: nn.Module) -> None:
    """Raise when :func:`supports_packing` says no, saying what to change.

    Raises:
        ValueError: Packing was asked for a model whose attention cannot keep packed sequences apart.
    """
    if not supports_packing(model):
        lm = unwrap_model(model)
        raise ValueError(
            f"packing needs FlashAttention-2 (varlen) or SDPA/eager (4D block mask) on a model that builds its masks "
            f"with transformers.masking_utils; this one is {type(lm).__name__} with attn_implementation="
            f"{getattr(lm.config, '_attn_implementation', None)!r}. Fix: turn packing off, or load the model with "
            "attn_implementation 'sdpa' (or 'flash_attention_2' on CUDA)."
        )


def model_inputs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    pack: bool,
    pad_id: int,
    capacity: int | None = None,
) -> ModelInputs:
    """The rows to run for a right-padded batch: packed when ``pack`` and it saves rows, else padded.

    Raises:
        ValueError: ``pack`` for a model whose attention cannot keep packed sequences apart.
    """
    if not pack or bool(attention_mask.all()):
        return padded_inputs(input_ids, attention_mask)
    check_packing(model)
    lm = unwrap_model(model)
    packed = pack_sequences(
        input_ids, attention_mask, pad_id=pad_id, attn_implementation=lm.config._attn_implementation,
        capacity=capacity, mask_dtype=lm.get_input_embeddings().weight.dtype,
    )
    if packed.input_ids.shape[0] >= input_ids.shape[0] and packed.attention_mask is not None:
        return padded_inputs(input_ids, attention_mask)  # nothing saved: keep the plain padded forward
    return packed


# ------------------------------------------------------------------------------------------ the forward
def forward_hidden(model: nn.Module, inputs: ModelInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states ``[P, C, H]`` (after the final norm) of one forward through the model's top-level call.

    Going through the outermost module (DDP, DeepSpeed engine, peft wrapper) keeps every wrapper's logic: DDP's
    reducer preparation, DeepSpeed's start/end-of-forward hooks and its backward prologue (hooked on the
    engine's output), peft's routing. A forward hook on the decoder body captures its output, and
    ``logits_to_keep=1`` limits the model's own head to one row per sequence (an architecture whose forward
    predates ``logits_to_keep`` computes its full logits once, with a warning, and they are dropped).

    Args:
        model: The model as the Trainer passes it (engine, DDP, peft or plain ``*ForCausalLM``).
        inputs: Padded or packed rows (:func:`model_inputs`).

    Returns:
        ``(hidden, anchor)``: ``anchor`` is the wrapper's output logits; a caller under DeepSpeed keeps it in its
        loss with weight 0, so the engine's backward hooks fire.
    """
    body, _ = body_and_head(model)
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, (tuple, list)) else output.last_hidden_state)

    handle = body.register_forward_hook(hook)
    kwargs = dict(inputs.model_kwargs(), use_cache=False)
    lm = unwrap_model(model)
    try:
        # A sequence-classification ranker has no LM head to limit (and no logits_to_keep argument).
        if getattr(lm, "_tsarank_no_logits_to_keep", False) or lm.get_output_embeddings() is None:
            out = model(**kwargs)
        else:
            try:
                out = model(**kwargs, logits_to_keep=1)
            except TypeError as e:  # an architecture whose forward predates logits_to_keep
                if "logits_to_keep" not in str(e) or captured:
                    raise
                logger.warning("%s.forward has no logits_to_keep; its full logits are computed and dropped",
                               type(lm).__name__)
                lm._tsarank_no_logits_to_keep = True
                out = model(**kwargs)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected the decoder body to run once per forward, it ran {len(captured)} times")
    anchor = out["logits"] if isinstance(out, dict) else (out.logits if hasattr(out, "logits") else out[0])
    return captured[0], anchor


def keep_anchor(loss: torch.Tensor, anchor: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """``loss`` plus ``0 * anchor`` under a DeepSpeed engine (value and gradients unchanged).

    DeepSpeed runs its backward prologue from hooks on the engine's forward output; a loss computed from the
    captured hidden states alone would bypass them. Elsewhere this would only cost a zero ``[V, H]`` gradient, so
    ``loss`` is returned as is.
    """
    from .wrappers import is_deepspeed_engine

    if anchor.requires_grad and is_deepspeed_engine(model):
        return loss + 0.0 * anchor.float().sum()
    return loss


# -------------------------------------------------------------------------------------------- scoring
def query_likelihood_scores(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_mask: torch.Tensor
) -> torch.Tensor:
    """Full-query score ``s = (1/|q|) sum_t log p(q_t | source, q_<t)`` per row of a right-padded batch.

    Args:
        model: A causal LM.
        input_ids: ``[B, L]``.
        attention_mask: ``[B, L]``.
        target_mask: ``[B, L]`` bool, the query tokens.

    Returns:
        ``[B]`` fp32.
    """
    inputs = padded_inputs(input_ids, attention_mask)
    hidden, _ = forward_hidden(model, inputs)
    seq, pos = target_rows(target_mask)
    _, head = body_and_head(model)
    lp, _ = row_logprobs(head, inputs.gather(hidden, seq, pos), input_ids[seq, pos + 1],
                         transform=logit_transform(model))
    return segment_mean(lp, seq, input_ids.shape[0])


class LastTokenHead(nn.Module):
    """RankLLaMA's scoring head: ``score = w . h_last (+ b)`` on the hidden state of the final token."""

    def __init__(self, hidden_size: int, bias: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1, bias=bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "LastTokenHead":
        """Wrap an existing ``[1, H]`` layer (a sequence-classification model's ``score``), sharing its weights."""
        head = cls.__new__(cls)
        nn.Module.__init__(head)
        head.linear = linear
        return head

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows [B, H]`` (the last tokens' hidden states) -> scores ``[B]``, computed in fp32.

        The linear layer is called as a module (with an fp32 forward), so ZeRO-3 gathers its weights for the call.
        """
        linear = self.linear

        def fp32_linear(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device_type=x.device.type, enabled=False):
                bias = linear.bias.float() if linear.bias is not None else None
                return nn.functional.linear(x.float(), linear.weight.float(), bias)

        return call_as_forward(linear, fp32_linear, rows).squeeze(-1)

    def save(self, directory: str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write ``tsarank_head.safetensors`` (fp32) into ``directory``, atomically.

        Args:
            directory: A checkpoint directory.
            state_dict: The head's tensors (``linear.weight``, ``linear.bias``) when they come from elsewhere (a
                consolidated ZeRO-3 state dict); default this module's own.
        """
        from safetensors.torch import save_file

        from .atomic import atomic_path

        tensors = state_dict if state_dict is not None else self.state_dict()
        with atomic_path(f"{directory}/{HEAD_WEIGHTS}") as tmp:
            save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(tmp))

    @classmethod
    def load(cls, directory: str, hidden_size: int) -> "LastTokenHead":
        from safetensors.torch import load_file

        state = load_file(f"{directory}/{HEAD_WEIGHTS}")
        head = cls(hidden_size, bias="linear.bias" in state)
        head.load_state_dict(state)
        return head


def last_token_scores(
    model: nn.Module, head: LastTokenHead, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Scores ``[B]`` from the hidden state at each row's last real token (right padding)."""
    inputs = padded_inputs(input_ids, attention_mask)
    hidden, _ = forward_hidden(model, inputs)
    seq = torch.arange(input_ids.shape[0], device=input_ids.device)
    return head(inputs.gather(hidden, seq, attention_mask.sum(dim=1) - 1))
