"""What a checkpoint is, and how to load it for scoring: tsarank's own, any causal LM, and the published rankers.

:func:`resolve_checkpoint` reads a directory or a Hub id (through the HF cache; ``HF_HUB_OFFLINE`` is honoured) and
decides, in this order:

1. ``tsarank_config.json`` present: tsarank's own checkpoint; its template (and last-token head) apply.
2. ``adapter_config.json`` with ``task_type: SEQ_CLS``: a **RankLLaMA**-style ranker (castorini/rankllama-*): a
   LoRA adapter over a causal-LM base, loaded as ``AutoModelForSequenceClassification(num_labels=1)``, merged;
   its ``score`` layer on the last token is the head, the ``rankllama`` template the prompt.
3. ``adapter_config.json`` otherwise: a causal-LM LoRA adapter, merged over its base.
4. ``config.json`` of a causal LM whose name says ``RankingGPT`` (zyznull/RankingGPT-bloom-560m, -llama2-7b,
   -qwen-7b, -baichuan2-7b, ...), or whose weights hold the ``init_model.*`` tensors the released sft.py saves
   (its frozen reference, attached to the model): the ``rankinggpt`` template (the released evaluation's prompt and
   budgets).
5. ``config.json`` of any other causal LM: tsarank's default template (zero-shot query likelihood), with a warning
   that a checkpoint trained with another prompt needs it named.
6. anything else (an encoder, a sequence-classification model of unknown prompt): refused, naming the options.

An explicit ``template`` (a :class:`~tsarank.prompts.PromptTemplate` or a name of
:data:`~tsarank.prompts.NAMED_TEMPLATES`) always wins over 1, 4 and 5. Checkpoints whose modelling code lives in
the repository (``auto_map``: RankingGPT-qwen-7b, -baichuan2-7b) load only with ``trust_remote_code=True``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .hub import CONFIG_NAME, load_tsarank_config
from .modeling import HEAD_WEIGHTS, LastTokenHead, load_causal_lm
from .prompts import LAST_TOKEN, NAMED_TEMPLATES, PromptTemplate

logger = logging.getLogger(__name__)

__all__ = ["CheckpointSpec", "resolve_checkpoint", "load_for_scoring", "pad_id_of", "KINDS"]

KINDS = ("tsarank", "lora", "rankllama", "rankinggpt", "causal_lm", "seq_cls")
_FETCH_ERRORS: dict[str, str] = {}  # the last reason a Hub file could not be fetched, per repository


@dataclass
class CheckpointSpec:
    """How to load a checkpoint for scoring.

    Attributes:
        name_or_path: What the user gave.
        kind: One of :data:`KINDS`.
        template: The prompt template to score with.
        base: The base model of an adapter (``None`` for full checkpoints).
        sidecar_dir: Directory holding ``tsarank_config.json`` / ``tsarank_head.safetensors``, if any.
        tokenizer_source: Where the tokenizer comes from.
        remote_code: The checkpoint's config names modelling code of its own (``auto_map``).
    """

    name_or_path: str
    kind: str
    template: PromptTemplate
    base: str | None = None
    sidecar_dir: str | None = None
    tokenizer_source: str | None = None
    remote_code: bool = False


def _fetch(name_or_path: str, filename: str) -> Path | None:
    """A file of a local directory or of a Hub repository (downloaded into / read from the HF cache); ``None`` when
    absent or unreachable."""
    local = Path(name_or_path)
    if local.is_dir():
        return local / filename if (local / filename).is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(name_or_path, filename))
    except Exception as exc:  # noqa: BLE001 - offline, missing file, no such repo: the caller decides
        logger.debug("%s: no %s (%s)", name_or_path, filename, type(exc).__name__)
        _FETCH_ERRORS[name_or_path] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        return None


def _weight_names(name_or_path: str) -> list[str]:
    """Tensor names of a checkpoint, read cheaply: a sharded checkpoint's index, or a local (or already cached)
    single ``model.safetensors``'s header. ``[]`` when neither can be read without downloading weights."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        path = _fetch(name_or_path, index)
        if path is not None:
            return list(json.loads(path.read_text(encoding="utf-8")).get("weight_map", {}))
    local = Path(name_or_path) / "model.safetensors"
    if not local.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name_or_path, "model.safetensors")
        except Exception:  # noqa: BLE001 - not a repo id: nothing cached
            cached = None
        local = Path(cached) if isinstance(cached, str) else local
    if not local.is_file():
        return []
    with open(local, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        raw = fh.read(size) if 0 < size < 100_000_000 else b"{}"
    try:
        header = json.loads(raw)
    except ValueError:
        from .errors import ModelLoadError

        raise ModelLoadError(f"{name_or_path}: its weight files cannot be read ({local.name} has a header of "
                             f"{size} bytes but holds {len(raw)}). Fix: the checkpoint is truncated or corrupt; save, "
                             "copy or download it again") from None
    return [k for k in header if k != "__metadata__"]


def _has_released_reference(name_or_path: str) -> bool:
    """RankingGPT's sft.py attaches the frozen reference model as ``model.init_model``, so checkpoints saved by it
    hold ``init_model.*`` tensors: their fingerprint when the name does not say RankingGPT."""
    return any(name.startswith("init_model.") for name in _weight_names(name_or_path))


#: Files of which a checkpoint holds at least one when it carries its tokenizer's vocabulary (``tokenizer_config.json``
#: alone is not one: transformers then asks to install sentencepiece or tiktoken, the wrong fix).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model")
#: Weight files of a full checkpoint (a sharded one has an index; a LoRA adapter its own ``adapter_model.*``).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _has_tokenizer(name_or_path: str) -> bool:
    local = Path(name_or_path)
    if local.is_dir():
        return any((local / f).is_file() for f in TOKENIZER_FILES) or any(local.glob("*.tiktoken"))
    return any(_fetch(name_or_path, f) is not None for f in TOKENIZER_FILES)


def read_json(path: str | os.PathLike) -> Any:
    """A checkpoint's JSON file, or a one-line error naming it (a bare JSONDecodeError names no file).

    Raises:
        ModelLoadError: The file is not valid JSON (a truncated copy, an edit gone wrong).
    """
    from .errors import ModelLoadError

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc}). Fix: the checkpoint is corrupt; save, copy or download "
                             "it again") from None


def check_checkpoint_files(directory: str | os.PathLike, needs_tokenizer: bool = True) -> None:
    """A local checkpoint directory has weights and, where they are read from it, a tokenizer: checked from the file
    names alone, before any input is read or model loaded.

    Raises:
        FileNotFoundError: No weight file, or no tokenizer vocabulary; the message names the directory and the fix.
    """
    d = Path(directory)
    if not d.is_dir():
        return
    # model-00001-of-00002.safetensors and the like count; tsarank_head / adapter_model files are not the model.
    if not any((d / f).is_file() for f in WEIGHT_FILES) and not any(d.glob("model*.safetensors")):
        raise FileNotFoundError(f"{d}: no weight files (none of {', '.join(WEIGHT_FILES)}). Fix: the checkpoint was not "
                                "saved completely; save or copy it again (model.save_pretrained(DIR))")
    if needs_tokenizer:
        check_tokenizer_files(d)


def check_tokenizer_files(directory: str | os.PathLike) -> None:
    """A local checkpoint directory holds a tokenizer vocabulary, and its ``tokenizer.json`` / ``tokenizer_config.json``
    parse: checked from the files, before any weights load.

    Raises:
        FileNotFoundError: No vocabulary file.
        ModelLoadError: A tokenizer JSON file that is not valid JSON (named).
    """
    d = Path(directory)
    if not d.is_dir():
        return
    if not _has_tokenizer(str(d)):
        raise FileNotFoundError(f"{d}: no tokenizer files (none of {', '.join(TOKENIZER_FILES)}) in this checkpoint "
                                "directory. Fix: copy them from the model it was trained from "
                                "(tokenizer.save_pretrained(DIR))")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (d / name).is_file():
            read_json(d / name)


def load_tokenizer_checked(source: str, **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained`` with a one-line error naming the checkpoint when its files cannot be read.

    Raises:
        ModelLoadError: A corrupt ``tokenizer.json``, a missing vocabulary, a tokenizer class this install lacks.
    """
    from transformers import AutoTokenizer

    from .errors import ModelLoadError

    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except (ValueError, OSError, TypeError, KeyError, ImportError) as exc:
        if isinstance(exc, OSError) and not Path(source).is_dir():
            raise  # a Hub id offline or mistyped: the caller's own message
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{source}: its tokenizer cannot be loaded ({type(exc).__name__}: {first[:300]}). Fix: "
                             "copy the tokenizer files of the model it was trained from (tokenizer.save_pretrained(DIR))") from None


def _offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # noqa: BLE001
        return False


def _as_template(template: PromptTemplate | str | None) -> PromptTemplate | None:
    if template is None or isinstance(template, PromptTemplate):
        return template
    return PromptTemplate.named(template)


def resolve_checkpoint(name_or_path: str, template: PromptTemplate | str | None = None) -> CheckpointSpec:
    """Decide what ``name_or_path`` is (see the module docstring). Reads only small files (configs, sidecar).

    Raises:
        FileNotFoundError: A path that looks local and does not exist, a Hub id not in the cache while offline, or a
            local checkpoint without tokenizer files.
        ValueError: A checkpoint tsarank cannot score, or an unknown template name; the message lists the options.
    """
    spec = _resolve(name_or_path, template)
    weights = spec.base if spec.kind in ("lora", "rankllama") else spec.name_or_path
    if weights and Path(weights).is_dir():
        check_checkpoint_files(weights, needs_tokenizer=False)
    if (spec.template.scoring_head == LAST_TOKEN and spec.kind not in ("rankllama", "seq_cls")
            and not (spec.sidecar_dir and (Path(spec.sidecar_dir) / HEAD_WEIGHTS).is_file())):
        # Scoring would fail only after the inputs are read and the model is loaded, and say less.
        if spec.kind == "tsarank" and template is None:  # its own sidecar says last_token: a file went missing
            raise FileNotFoundError(f"{name_or_path}: last_token checkpoint without {HEAD_WEIGHTS} (its "
                                    f"tsarank_config.json names the last-token head). Fix: copy {HEAD_WEIGHTS} from "
                                    "the training output_dir")
        raise ValueError(f"{name_or_path} has no trained last-token head ({HEAD_WEIGHTS}), so the "
                         f"{template if isinstance(template, str) else spec.template.style!r} template (last_token "
                         "head) cannot score with it. Fix: a "
                         "query-likelihood template (template='tsarank' or 'rankinggpt'), or a checkpoint trained "
                         "with the last-token head")
    if spec.kind in ("lora", "rankllama") and Path(name_or_path).is_dir() and not any(
            (Path(name_or_path) / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
        raise FileNotFoundError(f"{name_or_path}: a LoRA adapter directory without adapter_model.safetensors (or .bin). "
                                "Fix: the adapter was not saved completely; save or copy it again")
    check_tokenizer_files(spec.tokenizer_source or spec.name_or_path)
    return spec


def _resolve(name_or_path: str, template: PromptTemplate | str | None) -> CheckpointSpec:
    explicit = _as_template(template)
    local = Path(name_or_path)
    looks_local = name_or_path.startswith((".", "/", "~")) or local.exists() or name_or_path.count("/") > 1
    if looks_local and not local.is_dir():
        raise FileNotFoundError(f"{name_or_path}: no such directory (a model is a checkpoint directory or a Hub id "
                                "ORG/NAME)")
    sidecar = _fetch(name_or_path, CONFIG_NAME)
    if sidecar is not None:
        _fetch(name_or_path, HEAD_WEIGHTS)  # a Hub last-token checkpoint: bring its head beside the sidecar
    adapter_cfg = _fetch(name_or_path, "adapter_config.json")
    config = _fetch(name_or_path, "config.json")
    own = load_tsarank_config(sidecar.parent) if sidecar is not None else None
    sidecar_dir = str(sidecar.parent) if sidecar is not None else None

    if adapter_cfg is not None and config is None:
        info = read_json(adapter_cfg)
        base = info.get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{adapter_cfg} names no base_model_name_or_path; set it to the base checkpoint's path "
                             "or Hub id")
        tok = name_or_path if _has_tokenizer(name_or_path) else base
        if str(info.get("task_type", "")).upper() == "SEQ_CLS":
            chosen = explicit or (own["template"] if own else NAMED_TEMPLATES["rankllama"])
            if chosen.scoring_head != LAST_TOKEN:
                raise ValueError(f"{name_or_path} is a sequence-classification ranker (a score on the last token); "
                                 f"its template must use the last_token head, got {chosen.scoring_head}")
            return CheckpointSpec(name_or_path, "rankllama", chosen, base, sidecar_dir, tok)
        chosen = explicit or (own["template"] if own else PromptTemplate())
        return CheckpointSpec(name_or_path, "lora", chosen, base, sidecar_dir, tok)

    if config is None:
        if local.is_dir():
            where = "directory"
        else:
            why = _FETCH_ERRORS.get(name_or_path, "")
            where = ("Hub repository" + (" (offline and not in the HF cache)" if _offline() else "")
                     + (f"; the Hub said {why.split('. ')[0]}" if why else ""))
            # `runs/sft` looks like a Hub id ORG/NAME but is more likely a local path typed wrong (or run elsewhere).
            where += f"; nor is there a local directory {local.resolve()}"
        raise FileNotFoundError(f"{name_or_path}: no config.json in this {where}. A model is a checkpoint directory "
                                "(config.json + weights), a LoRA adapter directory (adapter_config.json) or a Hub id")
    cfg = read_json(config)
    archs = cfg.get("architectures") or []
    remote = bool(cfg.get("auto_map"))
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or (not archs and remote)
    if own is not None:
        return CheckpointSpec(name_or_path, "tsarank", explicit or own["template"], None, sidecar_dir, name_or_path,
                              remote)
    if causal:
        if explicit is not None:
            return CheckpointSpec(name_or_path, "causal_lm", explicit, None, None, name_or_path, remote)
        if "rankinggpt" in name_or_path.lower() or _has_released_reference(name_or_path):
            return CheckpointSpec(name_or_path, "rankinggpt", NAMED_TEMPLATES["rankinggpt"], None, None, name_or_path,
                                  remote)
        logger.warning(
            "%s has no tsarank_config.json: scoring with tsarank's default template (zero-shot query likelihood, "
            "'Document: {doc} Query: {query}'). A checkpoint trained with another prompt needs it named: "
            "template='rankinggpt' (--template rankinggpt) for a renamed RankingGPT checkpoint.", name_or_path)
        return CheckpointSpec(name_or_path, "causal_lm", PromptTemplate(), None, None, name_or_path, remote)
    if any(a.endswith("ForSequenceClassification") for a in archs):
        if explicit is not None and explicit.scoring_head == LAST_TOKEN:
            return CheckpointSpec(name_or_path, "seq_cls", explicit, None, None, name_or_path, remote)
        raise ValueError(
            f"{name_or_path} is a sequence-classification model ({', '.join(archs)}) with no tsarank_config.json, so "
            "its prompt is unknown. Fix: pass a last-token template, e.g. template='rankllama' (--template rankllama) "
            "for a merged RankLLaMA."
        )
    raise ValueError(
        f"{name_or_path} is a {', '.join(archs) or cfg.get('model_type', 'model')} checkpoint, which tsarank cannot "
        "score. Supported: a causal LM (query likelihood: tsarank, RankingGPT), a tsarank checkpoint, a RankLLaMA-style "
        "LoRA sequence-classification adapter, or a sequence-classification model with template='rankllama'."
    )


def load_for_scoring(
    spec: CheckpointSpec, *, dtype: torch.dtype, attn_implementation: str, device: torch.device,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, Any, LastTokenHead | None]:
    """``(model, tokenizer, last-token head or None)`` for :class:`tsarank.Ranker`.

    Raises:
        ValueError: A checkpoint with its own modelling code and ``trust_remote_code`` false.
    """
    if spec.remote_code and not trust_remote_code:
        raise ValueError(
            f"{spec.name_or_path} ships its own modelling code (config.json auto_map, e.g. Qwen-7B or Baichuan2 "
            "RankingGPT). Fix: pass trust_remote_code=True (--trust-remote-code) if you trust that repository's code."
        )
    kw: dict[str, Any] = dict(dtype=dtype, attn_implementation=attn_implementation, device=device)
    if trust_remote_code:
        kw["trust_remote_code"] = True
    head = None
    if spec.kind == "rankllama":
        model = _load_seq_cls_adapter(spec, kw)
    elif spec.kind == "seq_cls":
        model = _load_seq_cls(spec.name_or_path, kw)
    elif spec.kind == "lora":
        from peft import PeftModel

        base = load_causal_lm(spec.base, **kw)
        model = PeftModel.from_pretrained(base, spec.name_or_path).merge_and_unload()
    else:
        model = load_causal_lm(spec.name_or_path, **kw)
    tokenizer = load_tokenizer_checked(spec.tokenizer_source or spec.name_or_path, trust_remote_code=trust_remote_code)
    if spec.kind in ("rankllama", "seq_cls"):
        head = LastTokenHead.from_linear(model.score)
        if model.config.pad_token_id is None:  # batched forward of a *ForSequenceClassification needs one
            model.config.pad_token_id = pad_id_of(tokenizer)
    elif spec.template.scoring_head == LAST_TOKEN:
        if spec.sidecar_dir is None or not (Path(spec.sidecar_dir) / HEAD_WEIGHTS).is_file():
            raise FileNotFoundError(f"{spec.name_or_path}: last_token checkpoint without {HEAD_WEIGHTS}")
        head = LastTokenHead.load(spec.sidecar_dir, model.config.hidden_size)
    return model, tokenizer, head


def _load_seq_cls(path: str, kw: dict[str, Any]) -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    from .backend import from_pretrained_attn

    device = kw.pop("device")
    kw["attn_implementation"] = from_pretrained_attn(kw["attn_implementation"], device, kw["dtype"])
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kw)
    return model.to(device)


def _load_seq_cls_adapter(spec: CheckpointSpec, kw: dict[str, Any]) -> nn.Module:
    """RankLLaMA's released loading: the base as ``AutoModelForSequenceClassification(num_labels=1)``, the LoRA
    adapter (with its ``score`` layer) on top, merged."""
    from peft import PeftModel

    base = _load_seq_cls(spec.base, dict(kw))
    return PeftModel.from_pretrained(base, spec.name_or_path).merge_and_unload()


def pad_id_of(tokenizer: Any) -> int:
    """The id that pads scoring batches: the tokenizer's pad token, else EOS (Qwen: ``eod_id``), else unk, else 0."""
    for name in ("pad_token_id", "eos_token_id", "eod_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0

