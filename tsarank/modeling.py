"""Model loading and the scoring heads, computed without ever materialising ``[batch, seq, vocab]`` logits.

The transformer body runs once; hidden states are gathered at the positions that predict a scored token and
``lm_head`` is applied to those rows only. A query is ~10-32 of ~150-512 tokens and the vocabulary 49k-256k
entries, so this removes almost all of the head's time and memory.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

HEAD_WEIGHTS = "tsarank_head.safetensors"


# ----------------------------------------------------------------------------------------------- loading
def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``None`` means CUDA when available, else CPU; anything else goes through ``torch.device``."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_attn_implementation(requested: str | None, device: torch.device | str | None) -> str:
    """Pick the attention backend.

    ``"auto"`` gives FlashAttention-2 when ``flash_attn`` is importable and the model runs on CUDA, else SDPA.
    Asking for ``"flash_attention_2"`` explicitly without it is an error rather than a silent fallback.
    """
    requested = requested or "auto"
    on_cuda = resolve_device(device).type == "cuda"
    if requested == "auto":
        return "flash_attention_2" if on_cuda and flash_attn_available() else "sdpa"
    if requested == "flash_attention_2":
        if not flash_attn_available():
            raise ValueError(
                "attn_implementation='flash_attention_2' needs the flash-attn package, which is not installed. "
                "Fix: pip install 'tsarank[gpu]' on a CUDA machine, or use attn_implementation='auto' (SDPA)."
            )
        if not on_cuda:
            raise ValueError("attn_implementation='flash_attention_2' needs a CUDA device; use 'auto' or 'sdpa' on CPU")
    return requested


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | str | None) -> torch.dtype:
    """``None``/``"auto"``: bf16 on a CUDA device that supports it, fp32 otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        on_cuda = resolve_device(device).type == "cuda"
        return torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype must be one of {sorted(names)} or 'auto', got {dtype!r}")
    return names[dtype]


def load_causal_lm(
    name_or_path: str,
    *,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = "auto",
    device: torch.device | str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Load any ``AutoModelForCausalLM`` with tsarank's dtype and attention-backend rules."""
    from transformers import AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype, device)
    attn = resolve_attn_implementation(attn_implementation, device)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype, attn_implementation=attn, **kwargs)
    if device is not None:
        model.to(device)
    return model


# ------------------------------------------------------------------------------------------- structure
def unwrap_model(model: nn.Module) -> nn.Module:
    """The underlying ``*ForCausalLM`` of a peft / DDP / DeepSpeed wrapper."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP, DeepSpeedEngine
            model = model.module
        elif type(model).__name__.startswith("Peft") and hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Split a causal LM into its transformer body (returns hidden states) and its output projection.

    Calling the submodules directly keeps peft adapters and ZeRO-3 parameter hooks working: both act at the
    module level.
    """
    lm = unwrap_model(model)
    head = lm.get_output_embeddings()
    body = lm.get_decoder() if hasattr(lm, "get_decoder") else getattr(lm, lm.base_model_prefix)
    if head is None or body is None:
        raise TypeError(f"{type(lm).__name__} has no output embeddings / decoder; is it a causal LM?")
    return body, head


def run_body(body: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kw: Any) -> torch.Tensor:
    """Hidden states of the last layer, ``[B, L, H]``."""
    out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kw)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


# -------------------------------------------------------------------------------------------- scoring
def target_rows(target_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions whose hidden state predicts a target token.

    Args:
        target_mask: ``[B, L]`` bool, True at tokens to be scored (never at position 0).

    Returns:
        ``(batch_idx, pred_pos)``, each ``[N]``: token ``(b, t)`` is predicted by the hidden state at ``(b, t-1)``.
    """
    b, t = target_mask.nonzero(as_tuple=True)
    if (t == 0).any():
        raise ValueError("a target token at position 0 has no prefix to be predicted from")
    return b, t - 1


def token_logprobs(
    hidden: torch.Tensor, head: nn.Module, input_ids: torch.Tensor, target_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of every target token, from the gathered rows only.

    Args:
        hidden: ``[B, L, H]`` last hidden states.
        head: The LM head (``[H] -> [V]``).
        input_ids: ``[B, L]``.
        target_mask: ``[B, L]`` bool.

    Returns:
        ``(logprobs [N], batch_idx [N])`` in row-major order of ``target_mask``; computed in fp32.
    """
    b, pos = target_rows(target_mask)
    logits = head(hidden[b, pos]).float()  # [N, V]
    targets = input_ids[b, pos + 1]
    lp = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    return lp, b


def segment_mean(values: torch.Tensor, segment: torch.Tensor, n: int) -> torch.Tensor:
    """Mean of ``values [N]`` per segment id in ``[0, n)``; empty segments give 0."""
    total = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, segment, values)
    count = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, segment, torch.ones_like(values))
    return total / count.clamp(min=1)


def query_likelihood_scores(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_mask: torch.Tensor
) -> torch.Tensor:
    """Full-query score ``s = (1/|q|) sum_t log p(q_t | source, q_<t)`` per row, ``[B]`` fp32."""
    body, head = body_and_head(model)
    hidden = run_body(body, input_ids, attention_mask)
    lp, b = token_logprobs(hidden, head, input_ids, target_mask)
    return segment_mean(lp, b, input_ids.shape[0])


class LastTokenHead(nn.Module):
    """RankLLaMA's scoring head: ``score = w . h_last + b`` on the hidden state of the final (EOS) token."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)

    def forward(self, hidden: torch.Tensor, last_pos: torch.Tensor) -> torch.Tensor:
        """``hidden [B, L, H]``, ``last_pos [B]`` -> scores ``[B]`` fp32."""
        rows = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_pos]
        return self.linear(rows.to(self.linear.weight.dtype)).squeeze(-1).float()

    def save(self, directory: str) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, f"{directory}/{HEAD_WEIGHTS}")

    @classmethod
    def load(cls, directory: str, hidden_size: int) -> "LastTokenHead":
        from safetensors.torch import load_file

        head = cls(hidden_size)
        head.load_state_dict(load_file(f"{directory}/{HEAD_WEIGHTS}"))
        return head


def last_token_scores(
    model: nn.Module, head: LastTokenHead, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Scores ``[B]`` from the hidden state at each row's last real token (right padding)."""
    body, _ = body_and_head(model)
    hidden = run_body(body, input_ids, attention_mask)
    last = attention_mask.sum(dim=1) - 1
    return head(hidden, last)
