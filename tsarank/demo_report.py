"""The demo's report: ``report.json``, ``report.md`` (table with paired-test markers) and ``report.png``."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from .atomic import atomic_path, atomic_write_text

DATASET_NAMES = {"dl19": "TREC DL19", "scifact": "SciFact test", "nfcorpus": "NFCorpus test"}
SYSTEM_NAMES = {"bm25": "BM25", "zero_shot": "zero-shot", "cpt": "M_cpt", "sft": "M_sft"}
ALPHA = 0.05


def training_history(checkpoint: str | Path) -> list[dict[str, Any]]:
    """The Trainer's ``log_history`` of a run (``trainer_state.json`` in the output dir or its last checkpoint)."""
    ckpt = Path(checkpoint)
    candidates = [ckpt / "trainer_state.json"] + sorted(
        ckpt.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[-1]), reverse=True
    )
    for c in candidates:
        if c.is_file():
            return json.loads(c.read_text()).get("log_history", [])
    return []


def markdown_table(results: dict[str, Any]) -> str:
    """One row per (dataset, system); ``†`` marks p < 0.05 against BM25 (two-sided paired t-test).

    Recall is reported at each dataset's candidate depth k (column ``R@k``; the depth is in the dataset cell).
    """
    datasets = [d for d in DATASET_NAMES if d in results]
    lines = ["| dataset | system | nDCG@10 | RR@10 | R@k |", "| --- | --- | --- | --- | --- |"]
    for ds in datasets:
        k = results.get("setup", {}).get(ds, {}).get("top_k")
        label = f"{DATASET_NAMES[ds]} (top-{k})" if k else DATASET_NAMES[ds]
        for system, values in results[ds].items():
            sig = results.get("significance", {}).get(ds, {}).get(system, {})
            recall = next(m for m in values if m.startswith("R@"))
            cells = []
            for m in ("nDCG@10", "RR@10", recall):
                p = sig.get(m)
                mark = "†" if p is not None and p == p and p < ALPHA else ""
                cells.append(f"{values[m]:.4f}{mark}")
            lines.append(f"| {label} | {SYSTEM_NAMES.get(system, system)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_report(path: Path, results: dict[str, Any], histories: dict[str, list[dict[str, Any]]]) -> None:
    """nDCG@10 bars per system and dataset, and every logged loss term of both stages."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = [d for d in DATASET_NAMES if d in results]
    systems = list(results[datasets[0]].keys())
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 4.8))
    width = 0.8 / len(systems)
    for i, system in enumerate(systems):
        xs = [j + i * width for j in range(len(datasets))]
        vals = [results[ds][system]["nDCG@10"] for ds in datasets]
        ax1.bar(xs, vals, width, label=SYSTEM_NAMES.get(system, system))
        for x, v in zip(xs, vals):
            ax1.text(x, v + 0.005, f"{v:.3f}", ha="center", va="bottom", fontsize=7, rotation=90)
    ax1.set_xticks([j + 0.4 - width / 2 for j in range(len(datasets))], [DATASET_NAMES[d] for d in datasets])
    top = max(results[ds][s]["nDCG@10"] for ds in datasets for s in systems)
    ax1.set_ylim(0, min(1.0, top + 0.12))  # room for the value labels
    ax1.set_ylabel("nDCG@10")
    ax1.set_title("Re-ranking BM25 candidates")
    ax1.legend(fontsize=8)
    for ax, stage in ((ax2, "cpt"), (ax3, "sft")):
        history = histories.get(stage, [])
        keys = sorted({k for h in history for k in h if k == "loss" or k.startswith("loss_")})
        for k in keys:
            pts = [(h["step"], h[k]) for h in history if k in h and "step" in h]
            if pts:
                ax.plot(*zip(*pts), label=k, marker=".")
        ax.set_title(f"{'Stage 1 (CPT)' if stage == 'cpt' else 'Stage 2 (SFT)'} training losses")
        ax.set_xlabel("step")
        if keys:
            ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _precision(score_dtype: str | None, checkpoints: dict[str, str]) -> str:
    """" Scoring in bfloat16; training with bf16 autocast (fp32 master weights)." from what was actually used."""
    bf16 = []
    for path in checkpoints.values():
        args = Path(path) / "training_args.json"
        if args.is_file():
            try:
                bf16.append(bool(json.loads(args.read_text(encoding="utf-8")).get("bf16")))
            except ValueError:
                pass
    parts = [f"scoring in {score_dtype}"] if score_dtype else []
    if bf16:
        parts.append("training with bf16 autocast (fp32 master weights)" if all(bf16) else
                     "training in fp32" if not any(bf16) else "training partly in bf16 autocast")
    return (" Precision: " + "; ".join(parts) + " (auto: bf16 where the device computes it natively).") if parts else ""


def write_report(out: Path, results: dict[str, Any], checkpoints: dict[str, str], preset: Any) -> str:
    """Write the three report files; return the markdown table (printed at the end of the demo)."""
    datasets = [d for d in DATASET_NAMES if d in results]
    report = {ds: results[ds] for ds in datasets}
    report["checkpoints"] = checkpoints
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")

    histories = {stage: training_history(path) for stage, path in checkpoints.items()}
    plot_report(out / "report.png", results, histories)

    table = markdown_table(results)
    setup = results.get("setup", {})
    margins = []
    for ds in datasets:
        r = results[ds]
        if "sft" in r:
            vs_zs = results.get("sft_vs_zero_shot", {}).get(ds, {}).get("nDCG@10")
            test = (f" (paired t-test p = {vs_zs['p_value']:.3g}; queries up / down: {vs_zs['wins']} / "
                    f"{vs_zs['losses']})" if vs_zs else "")
            margins.append(
                f"- {DATASET_NAMES[ds]}: M_sft - BM25 = {r['sft']['nDCG@10'] - r['bm25']['nDCG@10']:+.4f}; "
                f"M_sft - zero-shot = {r['sft']['nDCG@10'] - r['zero_shot']['nDCG@10']:+.4f}{test}"
            )
    setup_lines = [
        f"- {DATASET_NAMES[ds]}: {s['queries']} queries, BM25 top-{s['top_k']} re-ranked, binary measures at grade >= {s['rel_level']}"
        for ds, s in setup.items() if ds in DATASET_NAMES
    ]
    trained = lambda n: f"top {n} blocks" if n else "all blocks"  # noqa: E731
    head = getattr(preset, "sft_scoring_head", "query_likelihood")
    sft_loss = ("last-token head, score transform logprob, tau 1.0" if head == "last_token" else
                f"query-likelihood head, score transform {preset.sft_score_transform}, tau {preset.sft_temperature}")
    shared = setup.get("shared_blocks", 0)
    sharing = (f" The models share their bottom {shared} blocks, which ran once per batch for all of them."
               if shared else "")
    precision = _precision(setup.get("dtype"), checkpoints)
    md = "\n".join(
        [
            "# tsarank demo report",
            "",
            f"Preset `{preset.name}`: CPT {preset.cpt_steps} steps x {preset.cpt_batch} pairs (of {preset.weak_pairs} weak pairs), "
            f"SFT {preset.sft_steps} steps x {preset.sft_batch} groups of {preset.sft_group_size} ({sft_loss}, L_gen "
            f"span {preset.sft_gen_span}), "
            f"NFCorpus train queries mined: {preset.nfcorpus_train_queries}. Trained: CPT "
            f"{trained(preset.cpt_top_layers)}, SFT {trained(preset.sft_top_layers)}.{sharing} Machine: {platform.machine()}, "
            f"{os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}.{precision}",
            "",
            f"Evaluation (reduced depth and query counts are stated here; every model reads at most "
            f"{preset.max_doc_tokens} document tokens, the training budget):",
            *setup_lines,
            "",
            table,
            "",
            f"† p < {ALPHA} against BM25, two-sided paired t-test over queries. R@k is that of the BM25 candidate set "
            "(re-ranking cannot change it).",
            "",
            "Margins on nDCG@10:",
            *margins,
            "",
            "Checkpoints: " + ", ".join(f"{k}: `{v}`" for k, v in checkpoints.items()),
            "",
            "![report](report.png)",
            "",
        ]
    )
    atomic_write_text(out / "report.md", md)
    return table
