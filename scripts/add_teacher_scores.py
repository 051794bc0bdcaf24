#!/usr/bin/env python
"""Score every passage of a group file with a teacher ranker and write ``teacher_scores``.

The output is the input group file with one more key per record, ``"teacher_scores"``: one score per
passage, aligned with ``positive_passages`` followed by ``negative_passages`` (the contract of docs/design.md
section 3 that ``sft/train.py --loss distill_kl`` / ``ranknet`` reads). Every other key of the record is kept
as it was. The teacher is any model :class:`tsarank.Ranker` loads: a tsarank checkpoint directory (full,
merged, LoRA adapter or last-token head), a Hub id, or ``default`` (the embedded SmolLM2-135M-Instruct).
Passages are scored as the SFT loader shows them to the student: ``title + " " + text``.

Examples:
    python scripts/add_teacher_scores.py --model runs/sft-big-teacher \\
        --input ../shared/data/msmarco-train-sample/rankinggpt_msmarco.json --output runs/msmarco.teacher.groups.jsonl
    python scripts/add_teacher_scores.py --model default --input groups.jsonl --output groups.teacher.jsonl --dtype float32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("Examples:")[1] if "Examples:" in __doc__ else None)
    p.add_argument("--model", required=True, help="teacher: checkpoint directory, Hub id, or 'default'")
    p.add_argument("--input", required=True, help="group JSONL (query, positive_passages, negative_passages)")
    p.add_argument("--output", required=True, help="output group JSONL with teacher_scores (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | auto (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--max-tokens", type=int, default=None, help="token budget per batch (default per device)")
    p.add_argument("--max-groups", type=int, default=None, help="score only the first N groups (for a quick look)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from tsarank.atomic import atomic_open
    from tsarank.data.formats import iter_jsonl, parse_group
    from tsarank.data.groups import doc_text
    from tsarank.errors import DataError

    from tsarank.atomic import check_output_file
    from tsarank.backend import check_device_available
    from tsarank.training.model_setup import check_model_source

    out = Path(args.output)
    try:  # the output's place, the options and the model's path: before reading the input or loading anything
        check_output_file(out, args.overwrite, flag="--output")
        for name in ("max_tokens", "max_groups"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        try:
            check_device_available(args.device)
        except ValueError as exc:
            raise ValueError(f"--device: {exc}") from None
        check_model_source(args.model, "model")
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if Path(args.input).resolve() == out.resolve():
        print("error: --output must differ from --input (the input is read while the output is written)", file=sys.stderr)
        return 2

    # Validate the whole file before loading the model (errors name file:line:field).
    records: list[tuple[dict[str, Any], dict[str, Any]]] = []
    try:
        for _, pair in iter_jsonl(args.input, lambda obj, path, line: (obj, parse_group(obj, path, line))):
            records.append(pair)
            if args.max_groups is not None and len(records) >= args.max_groups:
                break
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not records:
        print(f"error: {args.input} has no groups", file=sys.stderr)
        return 2
    replaced = sum(1 for raw, _ in records if raw.get("teacher_scores") is not None)

    from tsarank.default_model import default_model_path
    from tsarank.inference import Ranker

    model = str(default_model_path()) if args.model == "default" else args.model
    t0 = time.perf_counter()
    try:
        ranker = Ranker.from_pretrained(model, device=args.device, dtype=args.dtype, max_tokens=args.max_tokens)
    except (OSError, ValueError) as exc:
        print(f"error: could not load teacher {args.model!r}: {exc}", file=sys.stderr)
        return 2
    pairs = []
    for _, group in records:
        for passage in group["positive_passages"] + group["negative_passages"]:
            pairs.append((group["query"], doc_text(passage)))
    print(f"scoring {len(pairs):,} passages of {len(records):,} groups with {args.model} on {ranker.device}", file=sys.stderr)
    try:
        from tqdm import tqdm

        bar = tqdm(total=len(pairs), unit="pair", file=sys.stderr)
        scores = ranker.score_pairs(pairs, on_batch=bar.update)
        bar.close()
    except ImportError:
        scores = ranker.score_pairs(pairs)

    try:
        with atomic_open(out) as fh:
            start = 0
            for raw, group in records:
                n = len(group["positive_passages"]) + len(group["negative_passages"])
                record = dict(raw)
                record["teacher_scores"] = [float(s) for s in scores[start : start + n]]
                start += n
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    except OSError as exc:
        print(f"error: could not write {out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - t0
    if replaced:
        print(f"note: {replaced:,} groups already had teacher_scores; they were replaced", file=sys.stderr)
    print(f"wrote {len(records):,} groups with teacher_scores to {out} ({len(pairs) / max(seconds, 1e-9):.1f} pairs/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
