"""Training data from Hugging Face ``datasets``: a Hub id, a directory saved with ``save_to_disk``, or Parquet / JSON
files, named as Tevatron names them (``--dataset_name``, ``--dataset_config``, ``--dataset_split``).

The split is validated row by row with the very checks the JSONL readers apply (:func:`tsarank.data.formats.
parse_group`, :func:`~tsarank.data.formats.parse_weak_pair`), so an error names the dataset, the split and the row
(``Tevatron/msmarco-passage[train]:17: field 'positive_passages' ...``, 17 the 1-based row), before any model is
loaded. The
validated rows are then written once as JSON Lines under ``$TSARANK_HOME/datasets/`` (keyed by the dataset's
fingerprint; written atomically, so processes of one job agree) and train exactly as a ``--train_file`` would.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from ..errors import DataError

__all__ = ["load_split", "materialize"]

#: What a ``dataset_name`` that is a local file is read as, by suffix.
_FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv", ".arrow": "arrow"}


def load_split(name: str, config: str | None, split: str) -> Any:
    """The ``datasets.Dataset`` of one split.

    Args:
        name: A Hub id of a dataset stored as data files, a directory written by ``Dataset.save_to_disk`` /
            ``DatasetDict.save_to_disk``, or Parquet / JSON(L) / CSV files, compressed or not, local, a glob, or
            ``hf://datasets/ORG/NAME/FILE`` (e.g. ``hf://datasets/Tevatron/msmarco-passage/train.jsonl.gz``: that
            repository is built by a loading script, which datasets >= 4 no longer runs, so its files are named).
        config: The dataset configuration (Hub datasets with several), or ``None``.
        split: The split, e.g. ``train`` (slicing such as ``train[:1000]`` works for Hub and file datasets).

    Raises:
        FileNotFoundError: A local-looking name that does not exist, or a split the dataset lacks (the message lists
            its splits).
    """
    import datasets

    path = Path(name).expanduser()
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        base, _, cut = split.partition("[")  # train[:1000]: a slice, as load_dataset reads it
        if isinstance(loaded, datasets.DatasetDict):
            if base not in loaded:
                raise FileNotFoundError(f"--dataset_name {name}: no split {base!r}; it has {', '.join(loaded)}")
            loaded = loaded[base]
        if cut:
            start, _, stop = cut.rstrip("]").partition(":")
            try:
                loaded = loaded.select(range(len(loaded))[slice(int(start) if start else None, int(stop) if stop else None)])
            except ValueError:
                raise FileNotFoundError(f"--dataset_split {split!r}: write a slice as train[:1000] or train[100:200]") from None
        return loaded
    suffixes = [x.lower() for x in Path(name).suffixes]
    if suffixes[-1:] in ([".gz"], [".bz2"], [".zst"], [".xz"]):  # train.jsonl.gz, as Tevatron distributes its data
        suffixes = suffixes[:-1]
    builder = _FILE_BUILDERS.get(suffixes[-1] if suffixes else "")
    remote = name.startswith(("hf://", "https://", "http://"))
    if builder and (remote or path.is_file() or any(ch in name for ch in "*?[")):
        # Files given this way form one split, "train" (slices such as train[:1000] work).
        return datasets.load_dataset(builder, data_files=name if remote else str(path), split=split)
    if not path.exists() and not remote and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise FileNotFoundError(f"--dataset_name {name}: no such file or directory (and not a Hub id ORG/NAME)")
    try:
        return datasets.load_dataset(name, config, split=split)
    except ValueError as exc:  # an unknown split names the known ones in datasets' message
        raise FileNotFoundError(f"--dataset_name {name}: {str(exc).splitlines()[0]}") from None
    except RuntimeError as exc:  # datasets >= 4 no longer runs a repository's loading script
        if "script" not in str(exc).lower():
            raise
        raise DataError(name, None, None, "this Hub dataset is built by a loading script, which datasets >= 4 no "
                        "longer runs", fix=f"name its data files instead, e.g. --dataset_name hf://datasets/{name}/"
                        "train.jsonl.gz (Tevatron/msmarco-passage's layout)") from None


def materialize(name: str, config: str | None, split: str, parse: Callable[[dict[str, Any], Any, int], Any],
                kind: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Validate every row of a split and write it as JSON Lines; return that file.

    Args:
        name: See :func:`load_split`.
        config: See :func:`load_split`.
        split: See :func:`load_split`.
        parse: The row check of the JSONL reader (``parse(row, where, row_number)``, raising :class:`DataError`).
        kind: ``"groups"`` or ``"weak-pairs"`` (names the cached file).
        cache_dir: Where to write (default ``$TSARANK_HOME/datasets``).

    Raises:
        DataError: A malformed row, named ``NAME[SPLIT] row N`` (1-based) with its field; an empty split.
    """
    from ..atomic import atomic_open
    from ..default_model import tsarank_home

    import hashlib

    ds = load_split(name, config, split)
    where = f"{name}{'/' + config if config else ''}[{split}]"
    # The dataset's own fingerprint; else one from its identity (stable across processes, unlike hash()).
    fingerprint = getattr(ds, "_fingerprint", None) or hashlib.sha1(f"{name}|{config}|{split}|{len(ds)}".encode()).hexdigest()[:16]
    out_dir = Path(cache_dir) if cache_dir is not None else tsarank_home() / "datasets"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{kind}-{fingerprint}.jsonl"
    if out.is_file():  # written by an earlier run, after every row passed these checks
        return out
    n = 0
    with atomic_open(out) as fh:  # one pass: each row checked, then written; a bad row leaves no file
        for n, row in enumerate(ds, 1):
            parse(row, where, n)  # raises DataError: "NAME[split]:N: field ..." where N is the 1-based row
            fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        if n == 0:
            raise DataError(where, None, None, "expected at least one row, got an empty split")
    return out
