"""The frozen reference model of the differential penalty ``L_dp = KL(p_ref || p_theta)``.

Three kinds, all computing the LM head on the requested rows only and never holding a gradient:

- :class:`AdapterOffReference`: with LoRA the reference is the policy itself with its adapters disabled
  (``with model.disable_adapter():``), so there is no second copy of the weights.
- :class:`SeparateReference`: a second frozen copy loaded from ``ref_model_name_or_path`` (default: the
  policy's starting checkpoint ``M_cpt``). Under DeepSpeed ZeRO-3 it is sharded like the policy
  (:func:`deepspeed_reference_config` + ``deepspeed.initialize``), as TRL's ``prepare_deepspeed`` does.
- :class:`SharedPrefixReference`: with ``train_top_layers = N`` the bottom ``L - N`` blocks are frozen, hence
  identical in policy and reference. The policy's forward already computes them; a forward pre-hook on the
  first trainable block captures the hidden state (and the block's keyword arguments: mask, rotary
  embeddings, ...) and the reference runs only frozen copies of the top ``N`` blocks, the final norm and the
  head on it. The reference then costs ``N / L`` of a forward instead of a full one.

A reference is a plain Python object, never a submodule of the policy, so it is never part of a saved
checkpoint or of the optimizer.

Protocol (all under ``torch.no_grad()``; rows are sequence coordinates ``(seq [N], pos [N])`` as from
:func:`tsarank.row_head.target_rows`, and ``inputs`` the :class:`tsarank.packing.ModelInputs` the policy ran):

- ``prepare(policy)``: called right before the policy forward of a step (arms the shared-prefix capture);
- ``hidden_at(inputs, seq, pos) -> [N, H]``: reference final hidden states at those rows;
- ``head_weights()``: a context yielding the reference head's ``(weight, bias)`` as full tensors (gathered under
  ZeRO-3, a collective), or ``None`` when it is the policy's own head; :func:`tsarank.row_head.row_logprobs`
  enters it once in its forward and once in its backward;
- ``logits_at(inputs, seq, pos) -> [N, V]``: reference logits at those rows (tests, diagnostics).

Every process calls ``hidden_at`` once per step (with or without rows): under ZeRO-3 each reference forward
gathers the sharded weights collectively.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any, Iterator

import torch
from torch import nn

from .layers import final_norm, find_decoder_layers
from .modeling import body_and_head, forward_hidden, load_causal_lm, logit_transform
from .packing import ModelInputs
from .row_head import RefWeights, is_plain_linear
from .wrappers import gathered, is_deepspeed_engine, is_peft_model, unwrap_model, unwrap_parallel, zero3_enabled

logger = logging.getLogger(__name__)

__all__ = [
    "Reference",
    "AdapterOffReference",
    "SeparateReference",
    "SharedPrefixReference",
    "build_reference",
    "deepspeed_reference_config",
    "block_inputs",
    "REFERENCE_KINDS",
]

REFERENCE_KINDS = ("auto", "adapter_off", "separate", "shared_prefix")

def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Temporarily put ``model`` in eval mode (dropout off), restoring every submodule's own flag."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


class Reference:
    """Base class of the frozen references (see the module docstring for the protocol)."""

    kind: str = "base"

    def prepare(self, policy: nn.Module) -> None:  # noqa: B027 - optional hook
        """Called before each policy forward; only the shared-prefix reference needs it."""

    def hidden_at(self, inputs: ModelInputs, seq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Reference final hidden states ``[N, H]`` at sequence rows ``(seq, pos)`` of ``inputs``."""
        raise NotImplementedError

    def _head_module(self) -> nn.Module:
        """The linear layer whose weights are the reference head."""
        raise NotImplementedError

    @contextlib.contextmanager
    def head_weights(self) -> Iterator[RefWeights | None]:
        """``(weight, bias)`` of the reference head for the block (gathered under ZeRO-3)."""
        head = self._head_module()
        with gathered([head.weight, head.bias]):
            yield head.weight, head.bias

    @torch.no_grad()
    def logits_at(self, inputs: ModelInputs, seq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Reference logits ``[N, V]`` (fp32) at sequence rows ``(seq, pos)``: diagnostics and tests."""
        hidden = self.hidden_at(inputs, seq, pos)
        head = self._head_module()
        with gathered([head.weight, head.bias]):
            z = nn.functional.linear(hidden.float(), head.weight.float(),
                                     head.bias.float() if head.bias is not None else None)
        return self._transform.apply(z)[0]

    def cost_fraction(self) -> float:
        """Reference forward cost relative to a full forward of the policy body (1.0 = a full forward)."""
        return 1.0


# ----------------------------------------------------------------------------------------------- LoRA
class AdapterOffReference(Reference):
    """The policy with its LoRA adapters disabled: the base weights are the frozen reference.

    Args:
        peft_model: The (possibly DDP/DeepSpeed-wrapped) ``PeftModel`` being trained.
    """

    kind = "adapter_off"

    def __init__(self, peft_model: nn.Module) -> None:
        if not is_peft_model(peft_model):
            raise ValueError(
                f"AdapterOffReference needs a peft model (LoRA), got {type(peft_model).__name__}; "
                "use a separate reference (ref_model_name_or_path) for full fine-tuning"
            )
        self.peft_model = peft_model
        self._transform = logit_transform(peft_model)

    def _peft(self) -> nn.Module:
        return unwrap_parallel(self.peft_model)

    @torch.no_grad()
    def hidden_at(self, inputs: ModelInputs, seq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        peft = self._peft()
        with peft.disable_adapter(), _eval_mode(peft):
            hidden, _ = forward_hidden(peft, inputs)
        return inputs.gather(hidden, seq, pos)

    def _head_module(self) -> nn.Module:
        _, head = body_and_head(self._peft())
        return getattr(head, "base_layer", head)  # an adapter on lm_head itself: its frozen base layer

    @contextlib.contextmanager
    def head_weights(self) -> Iterator[RefWeights | None]:
        _, head = body_and_head(self._peft())
        if is_plain_linear(head):
            yield None  # no adapter on the head: the reference head is the policy's own
            return
        with super().head_weights() as weights:
            yield weights


# ------------------------------------------------------------------------------------------- separate
class SeparateReference(Reference):
    """A second, frozen copy of the starting model (optionally a DeepSpeed ZeRO-3 engine).

    Args:
        model: A causal LM, or the ``DeepSpeedEngine`` wrapping it (see :meth:`from_pretrained`). It is put in
            eval mode with ``requires_grad = False``; it is moved lazily to the device of the inputs unless it
            is a DeepSpeed engine (which owns its placement).
    """

    kind = "separate"

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.is_deepspeed = is_deepspeed_engine(model)
        self._transform = logit_transform(model)
        _freeze(model)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        training_args: Any = None,
        dtype: str | torch.dtype | None = None,
        attn_implementation: str | None = "auto",
    ) -> "SeparateReference":
        """Load the reference; under ZeRO-3 (``training_args.deepspeed``) shard it with ``deepspeed.initialize``.

        Under ZeRO-3, ``training_args`` must be the trainer's (so ``from_pretrained`` partitions the weights at
        load time through ``zero.Init`` and the distributed group exists). Other DeepSpeed stages keep a full
        replica per process, as TRL's ``prepare_deepspeed`` does (stage 0).
        """
        device = training_args.device if training_args is not None else None  # also initialises distributed
        stage3 = zero3_enabled(training_args)
        model = load_causal_lm(path, dtype=dtype, attn_implementation=attn_implementation)
        _freeze(model)
        if stage3:
            import deepspeed

            config = deepspeed_reference_config(training_args, model)
            engine, *_ = deepspeed.initialize(model=model, config=config)
            engine.eval()
            return cls(engine)
        if device is not None:
            model.to(device)
        return cls(model)

    def _ensure_device(self, device: torch.device) -> None:
        if self.is_deepspeed:
            return
        p = next(self.model.parameters(), None)
        if p is not None and p.device != device:
            self.model.to(device)

    @torch.no_grad()
    def hidden_at(self, inputs: ModelInputs, seq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        self._ensure_device(inputs.input_ids.device)
        hidden, _ = forward_hidden(self.model, inputs)
        return inputs.gather(hidden, seq, pos)

    def _head_module(self) -> nn.Module:
        return body_and_head(self.model)[1]


def _drop_auto(obj: Any) -> Any:
    """Remove every key whose value is still ``"auto"`` (DeepSpeed would reject it)."""
    if isinstance(obj, dict):
        return {k: _drop_auto(v) for k, v in obj.items() if v != "auto"}
    return obj


def deepspeed_reference_config(training_args: Any, model: nn.Module) -> dict[str, Any]:
    """DeepSpeed config for an inference-only reference sharded like the trained model.

    A deep copy of the trainer's config (the ``HfTrainerDeepSpeedConfig`` already filled from the training
    arguments) with: ``train_micro_batch_size_per_gpu`` = the per-device batch, no optimizer / scheduler (the
    reference is never stepped), the ZeRO stage kept (3), bucket sizes still set to ``"auto"`` resolved from the
    hidden size as TRL does, and any other ``"auto"`` left removed.
    """
    cfg = copy.deepcopy(training_args.hf_deepspeed_config.config)
    for key in ("optimizer", "scheduler", "train_batch_size", "gradient_accumulation_steps"):
        cfg.pop(key, None)
    cfg["train_micro_batch_size_per_gpu"] = training_args.per_device_train_batch_size
    zero = cfg.setdefault("zero_optimization", {})
    hidden = getattr(getattr(unwrap_model(model), "config", None), "hidden_size", None)
    if hidden is not None and zero.get("stage") == 3:
        defaults = {
            "reduce_bucket_size": hidden * hidden,
            "stage3_param_persistence_threshold": 10 * hidden,
            "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        }
        for key, value in defaults.items():
            if zero.get(key, "auto") == "auto":
                zero[key] = value
    for prec, flag in (("bf16", training_args.bf16), ("fp16", training_args.fp16)):
        if isinstance(cfg.get(prec), dict) and cfg[prec].get("enabled") == "auto":
            cfg[prec]["enabled"] = bool(flag)
    return _drop_auto(cfg)


# ------------------------------------------------------------------------------------- shared prefix
class _StopForward(Exception):
    """Raised by the capture hook to skip the policy's top blocks when only the prefix is needed."""


def block_inputs(model: nn.Module, block: nn.Module, inputs: ModelInputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The positional and keyword inputs ``block`` receives for these inputs, running the body only up to it.

    The body's own forward computes them (hidden states, the prepared mask, rotary position embeddings), so this
    follows whatever the model class does; the blocks from ``block`` on never run.
    """
    body, _ = body_and_head(model)
    captured: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append((args, dict(kwargs)))
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        body(**inputs.model_kwargs(), use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"the capture hook did not fire: {type(body).__name__} never called the block; is its "
                           "block list intact?")
    return captured[0]


class SharedPrefixReference(Reference):
    """Reference that shares the policy's frozen bottom blocks and owns frozen copies of the top ``N``.

    Build it from the policy *after* freezing (``freeze_all_but_top``) and before DeepSpeed wraps the model:
    the copies are taken from the current (starting) weights. The final norm is copied; the LM head is shared
    when the policy keeps it frozen (tied to frozen input embeddings) and copied otherwise.

    Args:
        policy: The trained causal LM (not LoRA; not ZeRO-3 partitioned).
        n_top: ``train_top_layers``.

    Raises:
        ValueError: ``n_top`` out of range, or a parameter below the top blocks is trainable (the prefix would
            then not be shared).
    """

    kind = "shared_prefix"

    def __init__(self, policy: nn.Module, n_top: int) -> None:
        lm = unwrap_model(policy)
        layers = find_decoder_layers(lm)
        self.n_layers = len(layers)
        if not 0 < n_top < self.n_layers:
            raise ValueError(
                f"a shared-prefix reference needs 0 < train_top_layers < {self.n_layers} (the number of blocks), "
                f"got {n_top}; use a separate reference when every block is trained"
            )
        self.n_top = n_top
        body, head = body_and_head(lm)
        norm = final_norm(body, layers)
        top = list(layers)[self.n_layers - n_top :]
        top_ids = {id(p) for m in top for p in m.parameters()}
        after_ids = {id(p) for p in norm.parameters()} if norm is not None else set()
        head_ids = {id(p) for p in head.parameters()}
        bad = [n for n, p in lm.named_parameters()
               if p.requires_grad and id(p) not in top_ids | after_ids | head_ids]
        if bad:
            raise ValueError(
                f"the shared-prefix reference needs the bottom {self.n_layers - n_top} blocks and the embeddings "
                f"frozen, but {len(bad)} of their parameters are trainable (e.g. {bad[0]}); call "
                "freeze_all_but_top(model, train_top_layers) before build_reference"
            )
        self._policy = lm
        self._transform = logit_transform(lm)
        self._first_top = top[0]
        self.blocks = nn.ModuleList([_freeze(copy.deepcopy(b)) for b in top])
        for b in self.blocks.modules():
            if hasattr(b, "gradient_checkpointing"):
                b.gradient_checkpointing = False
        self.norm = _freeze(copy.deepcopy(norm)) if norm is not None else None
        self.head_shared = not any(p.requires_grad for p in head.parameters())
        self.head = head if self.head_shared else _freeze(copy.deepcopy(head))
        self._armed = False
        self._captured: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        self._handle = self._first_top.register_forward_pre_hook(self._capture, with_kwargs=True)

    # The policy's forward goes through this hook; it stores references only (no copy, no extra memory).
    def _capture(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._armed:
            self._captured = (args, dict(kwargs))
            self._armed = False

    def prepare(self, policy: nn.Module) -> None:
        """Arm the capture for the next policy forward."""
        self._armed = True
        self._captured = None

    def remove(self) -> None:
        """Detach the hook from the policy (the reference is unusable afterwards)."""
        self._handle.remove()

    def cost_fraction(self) -> float:
        return self.n_top / self.n_layers

    def _ensure_placement(self, device: torch.device) -> None:
        """Follow the policy's device and dtype (the Trainer / DeepSpeed may move or cast it after we copied)."""
        dtype = next(self._first_top.parameters()).dtype
        p = next(self.blocks.parameters())
        if p.device != device or p.dtype != dtype:
            self.blocks.to(device=device, dtype=dtype)
            if self.norm is not None:
                self.norm.to(device=device, dtype=dtype)
            if not self.head_shared:
                self.head.to(device=device, dtype=dtype)

    def _prefix(self, inputs: ModelInputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
        cap = self._captured
        if cap is not None and cap[0][0].shape[:2] == inputs.input_ids.shape:
            return cap
        # No capture from a policy forward over these inputs: run the policy's (frozen) bottom blocks only.
        with _eval_mode(self._policy):
            return block_inputs(self._policy, self._first_top, inputs)

    @torch.no_grad()
    def hidden_at(self, inputs: ModelInputs, seq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if self.head_shared and any(p.requires_grad for p in self.head.parameters()):
            raise RuntimeError("the LM head became trainable after the shared-prefix reference was built; "
                               "build the reference after freezing the model")
        args, kwargs = self._prefix(inputs)
        self._captured = None  # release the policy's activations as soon as they are used
        hidden = args[0].detach()
        self._ensure_placement(hidden.device)
        rest = args[1:]
        for block in self.blocks:
            out = block(hidden, *rest, **kwargs)
            hidden = out[0] if isinstance(out, (tuple, list)) else out
        hidden = inputs.gather(hidden, seq, pos)
        # Norms act per position, so applying the final norm to the gathered rows is exact and cheaper.
        return self.norm(hidden) if self.norm is not None else hidden

    def _head_module(self) -> nn.Module:
        return self.head

    @contextlib.contextmanager
    def head_weights(self) -> Iterator[RefWeights | None]:
        if self.head_shared:
            yield None  # the policy's frozen head is the reference head
            return
        with super().head_weights() as weights:
            yield weights


# ---------------------------------------------------------------------------------------------- factory
def build_reference(
    policy: nn.Module,
    *,
    kind: str | None = None,
    ref_path: str | None = None,
    train_top_layers: int = 0,
    training_args: Any = None,
    lambda_dp: float = 1.0,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = "auto",
) -> Reference | None:
    """Choose and build the frozen reference for ``L_dp``.

    ``kind`` ``None``/``"auto"``: LoRA -> ``adapter_off``; ``train_top_layers > 0`` with the reference being the
    policy's own starting weights (``ref_path`` None or equal to the policy's ``name_or_path``) and no ZeRO-3 ->
    ``shared_prefix``; otherwise ``separate`` (loaded from ``ref_path``, default the policy's ``name_or_path``).
    Call it after freezing / wrapping with LoRA and before creating the trainer.

    Returns:
        ``None`` when ``lambda_dp == 0`` (no reference is needed).

    Raises:
        ValueError: unknown kind, a kind that does not fit the model, or ``lambda_dp > 0`` with no possible
            reference (no LoRA, no ``ref_path`` and a policy that was not loaded from a checkpoint).
    """
    if lambda_dp == 0:
        return None
    kind = (kind or "auto").lower()
    if kind not in REFERENCE_KINDS:
        raise ValueError(f"reference kind must be one of {REFERENCE_KINDS}, got {kind!r}")
    lm = unwrap_model(policy)
    own_path = getattr(getattr(lm, "config", None), "name_or_path", None) or getattr(
        getattr(lm, "config", None), "_name_or_path", None) or None
    same_weights = ref_path is None or (own_path is not None and str(ref_path) == str(own_path))
    zero3 = zero3_enabled(training_args)
    if kind == "auto":
        if is_peft_model(policy):
            kind = "adapter_off"
        elif train_top_layers and same_weights and not zero3 and train_top_layers < len(find_decoder_layers(lm)):
            kind = "shared_prefix"
        else:
            kind = "separate"
            if train_top_layers and zero3:
                logger.info("shared-prefix reference is not available under ZeRO-3; using a sharded separate reference")
    if kind == "adapter_off":
        return AdapterOffReference(policy)
    if kind == "shared_prefix":
        if zero3:
            raise ValueError("the shared-prefix reference cannot run under ZeRO-3 (partitioned blocks); "
                             "use reference kind 'separate' (sharded) or ZeRO-2")
        if not same_weights:
            raise ValueError(f"the shared-prefix reference is the policy's starting weights, but ref_model_name_or_path "
                             f"{ref_path!r} differs from the policy's {own_path!r}; use reference kind 'separate'")
        ref = SharedPrefixReference(policy, train_top_layers)
        logger.info("reference: shared frozen prefix, %d of %d blocks re-run (%.0f%% of a forward)",
                    ref.n_top, ref.n_layers, 100 * ref.cost_fraction())
        return ref
    path = ref_path or own_path
    if not path:
        raise ValueError(
            "lambda_dp > 0 needs a frozen reference model, but there is none: the policy is not a LoRA model and "
            "no ref_model_name_or_path was given (and the policy was not loaded from a checkpoint). "
            "Fix: pass --ref_model_name_or_path M_cpt, train with LoRA (--use_lora), or set --lambda_dp 0."
        )
    if dtype is None and not zero3:
        dtype = next(lm.parameters()).dtype
    return SeparateReference.from_pretrained(
        str(path), training_args=training_args, dtype=dtype, attn_implementation=attn_implementation
    )
