"""Argument dataclasses for both stages, and the YAML-plus-overrides parser.

A stage entry point calls :func:`parse_stage_args` with its dataclasses. Values come from, in order of
precedence: command-line flags, the ``--config`` YAML file, the dataclass defaults. Unknown keys (in YAML or on
the command line) are errors that name the closest valid option. Each dataclass checks its own fields in
``__post_init__`` (contradictions within a group included), so every way of building one (flags, YAML, Python)
gets the same checks, with a message that says what to change; :class:`SFTArguments` delegates the loss options to
:class:`tsarank.training.sft_loss.RankingLossConfig`, where they live.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

from transformers import HfArgumentParser, TrainingArguments


class OptionError(ValueError):
    """An invalid or contradictory option; the message says what to change. Entry points print it as one
    ``error:`` line and exit with status 2."""


@dataclass
class ModelArguments:
    """Which model to train and how to load it."""

    model_name_or_path: str = field(
        default="default",
        metadata={"help": "HF id or local checkpoint; 'default' = the embedded SmolLM2-135M-Instruct"},
    )
    dtype: str = field(default="auto", metadata={"help": "weights: float32 | bfloat16 | auto (fp32 master weights; bf16 "
                                                          "under DeepSpeed with --bf16)"})
    attn_implementation: str = field(
        default="auto", metadata={"help": "auto | sdpa | eager | flash_attention_2 (auto = FA2 when installed on CUDA)"}
    )
    use_lora: bool = field(default=False, metadata={"help": "train LoRA adapters (peft) instead of full weights"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "module names LoRA wraps"},
    )
    merge_lora: bool = field(
        default=False, metadata={"help": "also write a merged full checkpoint (loadable as M_cpt / by Ranker)"}
    )
    train_top_layers: int = field(
        default=0, metadata={"help": "train only the top N decoder blocks, as released (everything else frozen); "
                             "0 = train everything"}
    )
    train_final_norm: bool = field(
        default=False, metadata={"help": "with train_top_layers: also train the final norm (the released code does not)"}
    )
    train_lm_head: bool = field(
        default=False, metadata={"help": "with train_top_layers: also train an untied LM head (refused when tied)"}
    )

    def __post_init__(self) -> None:
        from ..backend import resolve_dtype

        try:
            resolve_dtype(self.dtype, "cpu")
        except ValueError as exc:
            raise OptionError(f"--dtype: {exc}") from None
        if self.train_top_layers < 0:
            raise OptionError(f"--train_top_layers must be >= 0 (0 = train every block), got {self.train_top_layers}")
        if self.use_lora and self.train_top_layers:
            raise OptionError(
                "use_lora and train_top_layers are both set; they are alternative ways to limit the trained weights. "
                "Fix: set train_top_layers: 0 to train LoRA adapters, or use_lora: false to train the top blocks."
            )
        if (self.train_final_norm or self.train_lm_head) and not self.train_top_layers:
            raise OptionError("train_final_norm / train_lm_head add to train_top_layers (with train_top_layers: 0 every "
                              "weight trains already). Fix: set train_top_layers, or drop them.")
        if self.merge_lora and not self.use_lora:
            raise OptionError("merge_lora: true needs use_lora: true (there is no adapter to merge). Fix: drop merge_lora.")
        if self.use_lora and self.lora_r < 1:
            raise OptionError(f"--lora_r must be >= 1, got {self.lora_r}")
        if not 0 <= self.lora_dropout < 1:
            raise OptionError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")


@dataclass
class DataArguments:
    """Data files, template and token budgets."""

    train_file: str | None = field(default=None, metadata={"help": "training JSONL (weak pairs or ranking groups)"})
    dataset_name: str | None = field(
        default=None, metadata={"help": "training data from Hugging Face datasets instead of --train_file: a Hub id, "
                                "a save_to_disk directory, Parquet/JSON(L) files (gzipped too), or hf://datasets/ORG/NAME/"
                                "FILE (e.g. hf://datasets/Tevatron/msmarco-passage/train.jsonl.gz)"})
    dataset_config: str | None = field(default=None, metadata={"help": "the dataset's configuration, if it has several"})
    dataset_split: str = field(default="train", metadata={"help": "the split to train on (default train; train[:1000] "
                                                                  "for a slice)"})
    validation_file: str | None = field(default=None, metadata={"help": "validation JSONL (same format)"})
    template: str | None = field(
        default=None, metadata={"help": "a named template: tsarank | rankinggpt (the released RankingGPT construction: "
                                "no space before the query) | rankllama | tsarank-last-token; default: template_source "
                                "and template_target"})
    template_source: str = field(default="Document: {doc} Query:", metadata={"help": "text before the query"})
    template_target: str = field(default=" {query}", metadata={"help": "the scored span"})
    max_doc_tokens: int = field(default=128, metadata={"help": "document budget in tokens (cut before templating)"})
    max_query_tokens: int = field(default=32, metadata={"help": "query budget in tokens"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use only the first N training records"})
    rank_eval_candidates: str | None = field(
        default=None, metadata={"help": "rank_llm JSON of candidates re-ranked every rank_eval_steps (e.g. DL19 BM25)"}
    )
    rank_eval_qrels: str | None = field(default=None, metadata={"help": "qrels for rank_eval_candidates"})
    rank_eval_steps: int = field(default=0, metadata={"help": "re-rank and log nDCG@10 every N steps; 0 = off"})
    rank_eval_top_k: int = field(default=20, metadata={"help": "candidates per query for the ranking evaluation"})
    rank_eval_max_queries: int | None = field(default=None, metadata={"help": "cap on queries for that evaluation"})

    def __post_init__(self) -> None:
        bad = [f"--{name} must be >= 1, got {getattr(self, name)}" for name in ("max_doc_tokens", "max_query_tokens",
                                                                               "rank_eval_top_k")
               if getattr(self, name) < 1]
        for name in ("max_train_samples", "rank_eval_max_queries"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                bad.append(f"--{name} must be >= 1 (or unset for all), got {getattr(self, name)}")
        if self.dataset_config and not self.dataset_name:
            bad.append("--dataset_config needs --dataset_name")
        if self.rank_eval_steps < 0:
            bad.append(f"--rank_eval_steps must be >= 0 (0 = off), got {self.rank_eval_steps}")
        elif self.rank_eval_steps and not (self.rank_eval_candidates and self.rank_eval_qrels):
            bad.append("rank_eval_steps > 0 needs rank_eval_candidates and rank_eval_qrels. Fix: set both, or "
                       "rank_eval_steps: 0")
        if bad:
            raise OptionError("; ".join(bad))

    def use_dataset(self, parse: Any, kind: str) -> None:
        """With ``dataset_name``: validate its split row by row (errors name ``NAME[SPLIT]:ROW``) and point
        ``train_file`` at its JSON Lines copy (see :mod:`tsarank.data.hf_datasets`); without it, nothing."""
        if not self.dataset_name:
            return
        from ..data.hf_datasets import materialize

        self.train_file = str(materialize(self.dataset_name, self.dataset_config, self.dataset_split, parse, kind))

    def relabel(self, exc: Exception) -> Exception:
        """A :class:`~tsarank.errors.DataError` about the JSON Lines copy of ``dataset_name``, re-addressed to the
        dataset's own ``NAME[SPLIT]:ROW`` (the copy's line N is the split's row N); anything else unchanged."""
        from ..errors import DataError

        if self.dataset_name and isinstance(exc, DataError) and exc.path == str(self.train_file):
            where = f"{self.dataset_name}{'/' + self.dataset_config if self.dataset_config else ''}[{self.dataset_split}]"
            return DataError(where, exc.line, exc.field, exc.message, exc.fix)
        return exc

    def prompt_template(self, scoring_head: str = "query_likelihood"):
        """The :class:`tsarank.prompts.PromptTemplate` of this run (saved in the sidecar, so scoring reproduces it).

        With ``template`` a named template (``tsarank``, ``rankinggpt``, ``rankllama``...) with this run's budgets;
        otherwise ``template_source`` / ``template_target``. For the ``last_token`` head the query-likelihood default
        source (which has no ``{query}``) becomes tsarank's last-token prompt; a source of the user's own is kept.

        Raises:
            OptionError: A template that does not fit the head, or a name together with template_source/target.
        """
        from ..prompts import LAST_TOKEN, PromptTemplate

        budgets = dict(max_doc_tokens=self.max_doc_tokens, max_query_tokens=self.max_query_tokens)
        defaults = DataArguments.__dataclass_fields__
        custom = (self.template_source != defaults["template_source"].default
                  or self.template_target != defaults["template_target"].default)
        try:
            if self.template is not None:
                if custom:
                    raise ValueError("--template names a template; --template_source / --template_target write one. "
                                     "Give one or the other")
                named = PromptTemplate.named(self.template, max_length=None, **budgets)
                if named.scoring_head != scoring_head:
                    raise ValueError(f"the {self.template!r} template scores with the {named.scoring_head} head, "
                                     f"this run with {scoring_head}. Fix: --scoring_head {named.scoring_head}")
                return named
            if scoring_head == LAST_TOKEN:
                if self.template_source == defaults["template_source"].default:
                    return PromptTemplate.last_token(**budgets)
                return PromptTemplate(source=self.template_source, target="", scoring_head=LAST_TOKEN, **budgets)
            return PromptTemplate(source=self.template_source, target=self.template_target, scoring_head=scoring_head,
                                  **budgets)
        except ValueError as exc:
            raise OptionError(f"template: {exc}.") from None


@dataclass
class CPTArguments:
    """Stage 1 (continual pre-training) options."""

    mask_source: bool = field(
        default=True, metadata={"help": "loss on query tokens only (true) or on the whole sequence (false)"}
    )
    target_eos: bool = field(
        default=True, metadata={"help": "loss also on an EOS token after the query, as the released CPT (false: the "
                                "query tokens only)"}
    )
    packing: bool = field(
        default=False, metadata={"help": "pack several pairs per row (no cross-pair attention or position leakage)"}
    )
    packing_max_length: int | None = field(
        default=None,
        metadata={"help": "row capacity in tokens when packing; default = longest pair of the batch (raise it with "
                  "FlashAttention-2, where one long row costs no extra attention)"},
    )
    dataset_num_proc: int | None = field(default=None, metadata={"help": "processes for tokenizing the dataset"})
    save_reference_logits: str | None = field(
        default=None,
        metadata={"help": "after training, save the in-memory model's logits on a fixed probe batch (the first 4 "
                  "training pairs) to this .pt file, to check that the saved checkpoint reloads identically"},
    )

    def __post_init__(self) -> None:
        if self.packing_max_length is not None:
            if not self.packing:
                raise OptionError("packing_max_length is set but packing is false. Fix: set packing: true or drop "
                                 "packing_max_length.")
            if self.packing_max_length < 1:
                raise OptionError(f"--packing_max_length must be >= 1, got {self.packing_max_length}")


@dataclass
class SFTArguments:
    """Stage 2 (supervised fine-tuning) options."""

    train_group_size: int = field(default=16, metadata={"help": "G: 1 positive + G-1 negatives per query (paper: 48)"})
    loss: str = field(default="softmax", metadata={"help": "softmax | point_ce | pair | poly1 | distill_kl | ranknet"})
    temperature: float | None = field(
        default=None, metadata={"help": "tau of the listwise softmax; default 0.001 (paper) for query_likelihood, 1 for "
                                "last_token"})
    score_transform: str | None = field(
        default=None, metadata={"help": "f(s): prob = exp (paper) | logprob = identity; default prob for "
                                "query_likelihood, logprob for last_token (prob is refused there)"})
    poly_epsilon: float = field(default=1.0, metadata={"help": "epsilon of the Poly-1 loss"})
    distill_temperature: float = field(default=1.0, metadata={"help": "T of the distillation KL"})
    lambda_gen: float = field(default=1.0, metadata={"help": "weight of the generation loss L_gen"})
    gen_span: str = field(default="all", metadata={"help": "L_gen over the positive's 'all' tokens or 'query' only"})
    lambda_dp: float = field(default=1.0, metadata={"help": "weight of the differential penalty KL(p_ref || p_theta)"})
    dp_span: str = field(default="query", metadata={"help": "L_dp over 'query' tokens or 'all' non-pad tokens"})
    ref_model_name_or_path: str | None = field(
        default=None, metadata={"help": "frozen reference; default = model_name_or_path (M_cpt)"}
    )
    scoring_head: str = field(default="query_likelihood", metadata={"help": "query_likelihood | last_token"})
    init_from: str | None = field(
        default=None, metadata={"help": "start from this checkpoint (multi-stage fine-tuning); reference unchanged"}
    )
    negatives_seed_by_epoch: bool = field(default=True, metadata={"help": "re-sample negatives every epoch"})

    def __post_init__(self) -> None:
        if self.train_group_size < 2:
            raise OptionError(f"--train_group_size must be >= 2 (1 positive + at least 1 negative: a ranking loss "
                              f"needs something to rank against), got {self.train_group_size}")
        try:
            self.loss_config()  # the loss options are checked where they live, with their fix-it messages
        except ValueError as exc:
            raise OptionError(str(exc)) from None

    def loss_config(self, **overrides: Any):
        """The :class:`tsarank.training.sft_loss.RankingLossConfig` of these options."""
        from .sft_loss import RankingLossConfig

        return RankingLossConfig.from_args(self, **overrides)


@dataclass
class TsarankTrainingArguments(TrainingArguments):
    """``transformers.TrainingArguments`` plus tsarank's output-safety switch."""

    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "allow writing into a non-empty output_dir (never silently overwritten)"}
    )
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 mixed precision (fp32 master weights). Unset: on when training on a CPU with "
                          "AVX512-BF16 or AMX and no GPU (faster there, see BENCHMARKS.md), off otherwise"},
    )

    def __post_init__(self) -> None:
        if isinstance(self.deepspeed, str) and self.deepspeed.strip().lower() in ("", "none", "false"):
            # `--deepspeed none` turns off a config's `deepspeed:` (scripts/run_*.sh with DS_CONFIG=none)
            self.deepspeed = None
        self._check_ranges()
        import torch

        if self.bf16 is None:
            from ..backend import native_bf16

            # Measured on such a CPU: an SFT step of the quick config 1.33x faster under bf16 autocast. GPU runs
            # keep transformers' default (their configs say bf16 explicitly); CPU DeepSpeed runs stay fp32.
            self.bf16 = bool(not torch.cuda.is_available() and not self.deepspeed and not self.fp16
                             and native_bf16("cpu"))
        if not self.use_cpu and not self.deepspeed and not torch.cuda.is_available():
            # On a machine without CUDA, say so to accelerate: otherwise processes started by torchrun each train
            # alone (world size 1, the same data on every rank) instead of as one data-parallel job. (The CPU
            # DeepSpeed path configures its own state: tsarank.distributed.setup_cpu_deepspeed.)
            self.use_cpu = True
        try:
            super().__post_init__()
        except ValueError as exc:  # e.g. --bf16 without a GPU: a wrong option, not a crash
            message = str(exc)
            if "bf16" in message and "use_cpu" in message:
                message = ("--bf16 asked for, but this machine has no CUDA GPU. Fix: add --use_cpu true to train in "
                           "bf16 on the CPU (fast only on CPUs with AVX512-BF16 or AMX), or drop --bf16")
            raise OptionError(message) from None
        if self.dataloader_pin_memory and not torch.cuda.is_available():
            # Pinned memory only speeds up host-to-GPU copies; without a GPU torch warns once per DataLoader.
            self.dataloader_pin_memory = False


    def _check_ranges(self) -> None:
        """Values ``TrainingArguments`` accepts but cannot mean (a run of 0 steps, a batch of 0, a negative learning
        rate): refused here, before any data or model is loaded."""
        bad = []
        if self.max_steps == 0 or self.max_steps < -1:
            bad.append(f"--max_steps must be -1 (the epochs decide) or >= 1, got {self.max_steps}")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                bad.append(f"--{name} must be >= 1, got {getattr(self, name)}")
        if not self.learning_rate >= 0:
            bad.append(f"--learning_rate must be >= 0, got {self.learning_rate}")
        if self.max_steps == -1 and not self.num_train_epochs > 0:
            bad.append(f"--num_train_epochs must be > 0, got {self.num_train_epochs}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            bad.append(f"--warmup_steps, --weight_decay and --max_grad_norm must be >= 0, got {self.warmup_steps}, "
                       f"{self.weight_decay} and {self.max_grad_norm}")
        if self.dataloader_num_workers < 0:
            bad.append(f"--dataloader_num_workers must be >= 0 (0 = load in the main process), got "
                       f"{self.dataloader_num_workers}")
        if isinstance(self.logging_steps, (int, float)) and self.logging_steps <= 0:
            bad.append(f"--logging_steps must be > 0, got {self.logging_steps}")
        if isinstance(self.save_steps, (int, float)) and self.save_steps <= 0:
            bad.append(f"--save_steps must be > 0, got {self.save_steps}")
        if bad:
            raise OptionError("; ".join(bad))


def _coerce_yaml_value(path: str, key: str, value: Any, action: Any) -> Any:
    """A YAML value typed as strictly as the same flag would be (argparse does not convert defaults).

    Raises:
        OptionError: ``max_steps: 2.5``, ``learning_rate: fast``, ``bf16: maybe``...; the message names file and key.
    """
    where = f"{path}: {key}"
    if value is None:
        # `max_steps:` with nothing after it is YAML null; only an option whose own default is "none" takes it.
        if action.default is None:
            return None
        raise OptionError(f"{where}: has no value (YAML reads an empty value as null); give one, e.g. "
                          f"'{key}: {action.default}', or delete the line to keep the default")
    kind = action.type
    if kind is None or action.nargs not in (None, "?"):
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise OptionError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if kind is float:
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string; the flag would take it
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OptionError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if isinstance(value, bool) and getattr(kind, "__name__", "") in ("string_to_bool", "str2bool"):
        return value
    if isinstance(value, (dict, list)):  # e.g. report_to: [wandb, tensorboard]; transformers checks those
        return value
    try:
        converted = kind(value if isinstance(value, str) else str(value))
    except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
        raise OptionError(f"{where}: {exc}") from None
    if action.choices is not None and converted not in action.choices:
        raise OptionError(f"{where}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return converted


def _dataclass_fields(types: Sequence[type]) -> set[str]:
    return {f.name for t in types for f in fields(t) if f.init}


def unknown_key_message(key: str, valid: set[str], where: str) -> str:
    close = difflib.get_close_matches(key, sorted(valid), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"{where}: unknown option '{key}'.{hint} Run with --help for the full list."


def load_yaml(path: str, valid: set[str]) -> tuple[dict[str, Any], dict[Any, int]]:
    """Read a flat YAML mapping of option names to values and check every key exists.

    Returns:
        ``(values, line of each key)``.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise OptionError(f"--config {path}: no such file")
    raw = p.read_bytes()
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in raw[:64]:
        raise OptionError(f"{path}: expected UTF-8 text, got UTF-16. Fix: re-encode it (iconv -f utf-16 -t utf-8 "
                          f"{path} > config.utf8.yaml)")
    try:
        data = yaml.safe_load(raw.decode("utf-8")) or {}
    except UnicodeDecodeError as e:
        raise OptionError(f"{path}: not valid UTF-8 (byte {e.start}). Fix: save the config as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise OptionError(f"{where}: invalid YAML ({problem}); each line is 'option_name: value'") from None
    if not isinstance(data, dict):
        raise OptionError(f"{path}: expected a mapping of option: value, got {type(data).__name__}")
    lines = _key_lines(raw.decode("utf-8"), path)
    for key in data:
        where = f"{path}:{lines.get(key, '?')}"
        if not isinstance(key, str):  # `1: 2`, `true: x`, `null: x`
            raise OptionError(f"{where}: {key!r} is not an option name; each line is 'option_name: value'")
        if key not in valid:
            raise OptionError(unknown_key_message(key, valid, where))
    return data, lines


def _key_lines(text: str, path: str) -> dict[Any, int]:
    """1-based line of each top-level key, so errors can name ``file:line``.

    Raises:
        OptionError: A key given twice (YAML silently keeps the last one).
    """
    import yaml

    node = yaml.compose(text)
    if not isinstance(node, yaml.MappingNode):
        return {}
    lines: dict[Any, int] = {}
    for k, _ in node.value:
        if isinstance(k, yaml.ScalarNode):
            # The key as safe_load reads it (`true:` is True, `1:` is 1), so lookups by the loaded keys find it.
            try:
                key = k.value if k.tag == "tag:yaml.org,2002:str" else yaml.safe_load(k.value)
            except yaml.YAMLError:  # `<<:` (a merge key) and the like: named by their text
                key = k.value
            if key in lines:
                raise OptionError(f"{path}:{k.start_mark.line + 1}: '{k.value}' is given twice (first on line "
                                  f"{lines[key]}); keep one")
            lines[key] = k.start_mark.line + 1
    return lines


def parse_stage_args(
    types: Sequence[type], argv: Sequence[str] | None = None, *, prog: str | None = None,
    description: str | None = None,
) -> tuple[Any, ...]:
    """Parse ``--config FILE.yaml`` plus flag overrides into the given dataclasses.

    Args:
        types: Dataclass types, e.g. ``(ModelArguments, DataArguments, CPTArguments, TsarankTrainingArguments)``.
        argv: Arguments (default ``sys.argv[1:]``).
        prog: Program name in ``--help`` (e.g. ``tsarank train sft``).
        description: Text shown by ``--help`` before the options.

    Returns:
        One instance per type, in order.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(types, prog=prog, description=description)
    parser.add_argument("--config", default=None, help="YAML file of option: value (flags override it)")
    for action in parser._actions:
        # An Optional[bool] option (`bf16`, unset = decided per machine) takes a bare flag like any bool: `--bf16`.
        if getattr(action.type, "__name__", "") == "string_to_bool" and action.nargs is None:
            action.nargs, action.const = "?", True
    valid = _dataclass_fields(types)
    config_path = None
    # `--config FILE` and `--config=FILE` alike (the second used to be dropped silently, training on defaults).
    given = [i for i, a in enumerate(argv) if a == "--config" or a.startswith("--config=")]
    if len(given) > 1:
        raise OptionError("--config is given more than once; pass one YAML file (flags override its values)")
    if given:
        i = given[0]
        if argv[i].startswith("--config="):
            config_path = argv[i].split("=", 1)[1]
            del argv[i]
        else:
            if i + 1 >= len(argv):
                raise OptionError("--config needs a YAML file path")
            config_path = argv[i + 1]
            del argv[i : i + 2]
        if not config_path:
            raise OptionError("--config needs a YAML file path")
    values, lines = load_yaml(config_path, valid) if config_path else ({}, {})
    # YAML values become parser defaults, so any flag given on the command line still wins.
    for action in parser._actions:
        if action.dest in values:
            action.required = False
            where = f"{config_path}:{lines.get(action.dest, '?')}"
            action.default = _coerce_yaml_value(where, action.dest, values[action.dest], action)
    *instances, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if remaining:
        bad = remaining[0].lstrip("-").split("=")[0]
        raise OptionError(unknown_key_message(bad, valid, "command line"))
    # The parser also returns a Namespace for --config itself; keep only the dataclass instances.
    kept = tuple(i for i in instances if isinstance(i, tuple(types)))
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    # Where each YAML value came from, for messages: "c.yaml:4" unless the flag overrode it.
    origin = {k: f"{config_path}:{lines.get(k, '?')}" for k in values if f"--{k}" not in given}
    _check_finite(kept, origin)
    for obj in kept:
        if getattr(obj, "dataset_name", None) and getattr(obj, "train_file", None):
            if "--train_file" not in given and "--dataset_name" in given:
                obj.train_file = None  # a config's train_file gives way to a --dataset_name on the command line
            else:
                raise OptionError("give --train_file or --dataset_name, not both")
    return kept


def _check_finite(instances: Sequence[Any], origin: dict[str, str]) -> None:
    """No option takes NaN or infinity: `x < 0` is false for NaN, so range checks let `--lambda_gen nan` (L_gen
    silently off) or `--max_grad_norm nan` (clipping silently off) through, and `--warmup_steps nan` crashed later.
    ``origin`` maps an option set in the YAML config to its ``file:line``."""
    import math

    bad = [(f"{origin[f.name]}: " if f.name in origin else "") + f"--{f.name} must be a finite number, got "
           f"{getattr(obj, f.name)}"
           for obj in instances for f in fields(obj)
           if isinstance(getattr(obj, f.name, None), float) and not math.isfinite(getattr(obj, f.name))]
    if bad:
        raise OptionError("; ".join(bad))


