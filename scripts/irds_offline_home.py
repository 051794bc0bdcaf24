#!/usr/bin/env python
"""Lay out local copies of BEIR datasets where ir_datasets keeps its downloads, so ``irds:beir/...`` works offline.

ir_datasets fetches ``beir/<name>`` as one zip (``<name>/corpus.jsonl``, ``queries.jsonl``, ``qrels/*.tsv``) into
``$IR_DATASETS_HOME/beir/<name>/source.zip`` and reads everything from it; a zip already there is used as is. This
script builds that zip from a BEIR directory you have (the same files BEIR distributes), e.g. ``../shared/data``'s:

    python scripts/irds_offline_home.py --beir ../shared/data/beir/scifact --home ~/.ir_datasets
    IR_DATASETS_HOME=~/.ir_datasets tsarank evaluate --run run.trec --qrels irds:beir/scifact/test

The test suite prepares such a home from ../shared/data, so the real ir_datasets code path runs in CI.
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path


def build(beir_dir: Path, home: Path) -> Path:
    """Write ``home/beir/<name>/source.zip`` from a BEIR directory; return its path (atomically replaced)."""
    name = beir_dir.name
    files = [beir_dir / "corpus.jsonl", beir_dir / "queries.jsonl", *sorted((beir_dir / "qrels").glob("*.tsv"))]
    missing = [str(f) for f in files[:2] if not f.is_file()]
    if missing or len(files) == 2:
        raise FileNotFoundError(f"{beir_dir}: not a BEIR directory (needs corpus.jsonl, queries.jsonl, qrels/*.tsv); "
                                f"missing: {', '.join(missing) or 'qrels/*.tsv'}")
    target = home / "beir" / name / "source.zip"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".zip.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
        for f in files:
            z.write(f, f"{name}/{f.relative_to(beir_dir).as_posix()}")
    tmp.replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--beir", nargs="+", required=True, metavar="DIR", help="BEIR dataset directories")
    ap.add_argument("--home", default=str(Path("~/.ir_datasets").expanduser()), help="IR_DATASETS_HOME")
    args = ap.parse_args(argv)
    try:
        for d in args.beir:
            print(f"{build(Path(d), Path(args.home).expanduser())}")
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
