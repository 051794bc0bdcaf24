"""``tsarank rerank``: re-rank first-stage candidates with a tsarank (or any causal-LM) checkpoint.

Inputs are validated completely before the model is loaded. Queries are processed in qid order, in *chunks*
of consecutive queries (about ``--chunk-docs`` documents each) so that batches span queries. After each chunk
its queries' run lines are appended to a sidecar ``OUT.partial`` (flush + fsync); ``--resume`` keeps the
sidecar's complete chunks and scores the rest. Chunk boundaries depend only on the ordered inputs, so a resumed
run scores every chunk with exactly the batches of an uninterrupted run and the final file is byte-identical.
The final run is written atomically and the sidecar removed.

On several processes (``torchrun``, the ``deepspeed`` launcher, several nodes, or ``--devices`` here), every process
plans the same chunks and scores the share :func:`tsarank.sharding.assign_chunks` gives it, appending to its own
sidecar (``OUT.partial`` for rank 0, ``OUT.partial.N`` for rank N); rank 0 merges them into ``OUT``. A chunk is
scored with the same batches on any process, so the run is byte-identical to one process's, and ``--resume`` reads
every sidecar, whatever the number of processes that wrote them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tsarank.errors import DataError

HELP = "re-rank a first-stage run (TREC run + queries + corpus, or rank_llm JSON) with an LLM"

DESCRIPTION = """\
Re-rank the first --top-k candidates of each query by query likelihood (or the
checkpoint's scoring head) and write a TREC run (ranks 1..k, ties by docid).

Candidates come either from a TREC run plus its queries and corpus
(--run/--queries/--corpus) or from a rank_llm JSON file with passage texts
(--candidates). Completed queries are flushed to OUT.partial; after a crash or
kill, the same command with --resume continues where it stopped and produces a
file byte-identical to an uninterrupted run (keep the other options the same).

examples:
  tsarank rerank --candidates retrieve_results_dl19.json --top-k 100 --out dl19.rerank.trec
  tsarank rerank --run bm25.trec --queries queries.jsonl --corpus corpus.jsonl --model my/ckpt --out rerank.trec
  # RankingGPT's released evaluation (prompt, 512-token budget), and RankLLaMA's released adapter:
  tsarank rerank --model zyznull/RankingGPT-llama2-7b --run bm25.trec --queries q.jsonl --corpus c.jsonl --out rgpt.trec
  tsarank rerank --model castorini/rankllama-v1-7b-lora-passage --run bm25.trec --queries q.jsonl --corpus c.jsonl --out rl.trec
"""

SIDECAR_SUFFIX = ".partial"
META_SUFFIX = ".partial.json"  # the options of the run that wrote the sidecar: --resume must use the same
# Options that change the scores or the batches (and so the bytes of the run): a resume must repeat them.
RUN_OPTIONS = ("model", "top_k", "tag", "dtype", "device", "attn_implementation", "max_tokens", "batch_size",
               "chunk_docs", "template", "max_doc_tokens", "max_query_tokens", "max_length", "max_queries")
# Inputs a resume must read unchanged (recorded by path, size and modification time).
INPUT_OPTIONS = ("candidates", "run", "queries", "corpus", "dataset")
# Documents per chunk (one flush to the sidecar): a few CPU batches, or one large GPU batch.
DEFAULT_CHUNK_DOCS = {"cpu": 256, "cuda": 2048}
_MISSING_SHOWN = 5
ATTENTION_CHOICES = ("auto", "sdpa", "eager", "flash_attention_2")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``rerank`` subcommand."""
    p = subparsers.add_parser("rerank", help=HELP, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="checkpoint directory, LoRA adapter directory or Hub id: tsarank's, any "
                   "causal LM, zyznull/RankingGPT-*, castorini/rankllama-* (default: the embedded default model)")
    src = p.add_argument_group("candidates (either --candidates, or --run with --queries and --corpus)")
    src.add_argument("--candidates", metavar="JSON", help="rank_llm JSON, either layout: Request JSONL {\"query\": {\"text\", "
                     "\"qid\"}, \"candidates\": [{\"docid\", \"score\", \"doc\"}]} or [{\"query\", \"hits\": [{\"qid\", \"docid\", \"content\"}]}]")
    src.add_argument("--run", metavar="RUN", help="first-stage TREC run 'qid Q0 docid rank score tag' (or irds:ID: its scoreddocs)")
    src.add_argument("--dataset", metavar="ID", help="an ir_datasets id (e.g. beir/scifact/test): its queries and documents; "
                     "the first stage is --run, else the dataset's scoreddocs, else BM25 (--k1 --b --stemmer --stopwords) "
                     "(pip install 'tsarank[irds]')")
    from tsarank.retrieval import add_bm25_arguments

    add_bm25_arguments(p.add_argument_group("BM25 first stage (with --dataset, when it has no scoreddocs and no --run)"))
    src.add_argument("--queries", metavar="Q", help="queries.jsonl or TSV 'qid<TAB>text'")
    src.add_argument("--corpus", metavar="C", help="BEIR corpus.jsonl (or its directory) or TSV 'docid<TAB>text'")
    p.add_argument("--top-k", type=int, default=100, help="re-rank (and write) the first K candidates of each query (default 100)")
    p.add_argument("--out", required=True, metavar="OUT.trec", help="output TREC run (written atomically)")
    p.add_argument("--out-format", choices=("trec", "rank_llm"), default="trec",
                   help="trec (default): a TREC run; rank_llm: rank_llm Request JSONL ({\"query\": {\"text\", \"qid\"}, "
                        "\"candidates\": [{\"docid\", \"score\", \"doc\"}]}, best first), for a rank_llm step after this one")
    p.add_argument("--batch-size", type=int, default=None, help="cap on sequences per batch (the token budget applies as well)")
    p.add_argument("--max-tokens", type=int, default=None, help="padded tokens per batch (default: 1024 on CPU, 65536 on CUDA)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available; under torchrun "
                   "or deepspeed: the GPU of each process's LOCAL_RANK)")
    p.add_argument("--devices", default=None, metavar="D1,D2,...",
                   help="score on several devices of this machine, one process each (e.g. cuda:0,cuda:1,cuda:2,cuda:3); "
                   "the run is byte-identical to one process's. For several nodes start tsarank rerank with torchrun")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or auto (default: bf16 on a supporting GPU, else fp32)")
    p.add_argument("--attn-implementation", default="auto", help="auto (FlashAttention-2 on CUDA when installed, else sdpa), sdpa, eager, flash_attention_2")
    tpl = p.add_argument_group("prompt (default: the checkpoint's own; see docs/faithfulness.md)")
    tpl.add_argument("--template", default=None, metavar="NAME",
                     help="score with a named template instead of the one the checkpoint was trained with (only for "
                     "checkpoints trained with that prompt, or without a tsarank_config.json): tsarank, "
                     "tsarank-last-token, rankinggpt (RankingGPT's released eval.py), rankllama")
    tpl.add_argument("--max-doc-tokens", type=int, default=None, metavar="N", help="document budget in tokens (default: the template's)")
    tpl.add_argument("--max-query-tokens", type=int, default=None, metavar="N", help="query budget in tokens (default: the template's)")
    tpl.add_argument("--max-length", type=int, default=None, metavar="N",
                     help="total budget, rankinggpt template only: the document gets what prompt and query leave "
                     "(RankingGPT's eval.py: 512)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a checkpoint's own modelling code (RankingGPT-qwen-7b, -baichuan2-7b); only for repositories you trust")
    p.add_argument("--tag", default="tsarank", help="run tag written in column 6 (default tsarank)")
    p.add_argument("--max-queries", type=int, default=None, metavar="N", help="only the first N queries in qid order (quick runs)")
    p.add_argument("--chunk-docs", type=int, default=None, metavar="N",
                   help="documents scored together (whole queries) before a flush to the sidecar "
                   f"(default {DEFAULT_CHUNK_DOCS['cpu']} on CPU, {DEFAULT_CHUNK_DOCS['cuda']} on CUDA)")
    p.add_argument("--strict", action="store_true", help="fail if run docids are missing from the corpus (default: report and skip them)")
    p.add_argument("--resume", action="store_true", help="continue from OUT.partial left by an interrupted run")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)
    return p


# ---------------------------------------------------------------------------------------- helpers
def qid_sort_key(qid: str) -> tuple[int, int | str]:
    """Numeric ids in numeric order, before any non-numeric ids (which sort as strings)."""
    return (0, int(qid)) if qid.isdigit() else (1, qid)


def plan_chunks(sizes: Sequence[int], chunk_docs: int) -> list[tuple[int, int]]:
    """Split consecutive queries into ``[start, end)`` chunks of at least ``chunk_docs`` documents (the last may be smaller).

    Depends only on ``sizes`` (and ``chunk_docs``), so an interrupted and a resumed run agree on every chunk.
    """
    chunks, start, total = [], 0, 0
    for i, n in enumerate(sizes):
        total += n
        if total >= chunk_docs:
            chunks.append((start, i + 1))
            start, total = i + 1, 0
    if start < len(sizes):
        chunks.append((start, len(sizes)))
    return chunks


@dataclass
class SidecarState:
    """What a sidecar holds: complete query blocks (verbatim lines) and the byte length of that prefix."""

    lines: dict[str, list[str]]
    valid_bytes: int
    dropped_lines: int


def read_sidecar(path: Path, expected: dict[str, set[str]], chunks: list[list[str]], tag: str) -> SidecarState:
    """Parse a sidecar, keep the complete chunks at its start, and check they belong to these inputs.

    Args:
        path: The ``OUT.partial`` file (or ``OUT.partial.N``, process N's).
        expected: ``{qid: docids}`` of every query of this invocation.
        chunks: The qids of each chunk, in order.
        tag: The run tag of this invocation.

    Returns:
        The lines of every query of the complete leading chunks (in any chunk order). A torn last line, or a chunk
        only partly written when the process died, is dropped (it will be scored again).

    Raises:
        ValueError: The sidecar was written for other inputs or options (stale).
    """
    raw = path.read_bytes()
    lines_by_qid: dict[str, list[str]] = {}
    order: list[str] = []
    pos = 0
    ends: list[int] = []  # byte offset after each complete line
    texts: list[str] = []
    while True:
        nl = raw.find(b"\n", pos)
        if nl < 0:
            break  # a torn last line (no newline) is ignored
        texts.append(raw[pos : nl + 1].decode("utf-8", errors="replace"))
        pos = nl + 1
        ends.append(pos)
    fix = f"delete {path} (or pass other --out) to start over, or rerun with the options of the interrupted run"
    for number, text in enumerate(texts, 1):
        cols = text.split()
        if len(cols) != 6:
            break  # garbage from a torn write: stop here, everything after is rescored
        qid, _, docid, _, _, line_tag = cols
        if qid not in expected:
            raise ValueError(f"{path}:{number}: query {qid!r} is not among this run's queries; the sidecar is stale. Fix: {fix}")
        if docid not in expected[qid]:
            raise ValueError(f"{path}:{number}: docid {docid!r} is not a candidate of query {qid!r}; the sidecar is stale. Fix: {fix}")
        if line_tag != tag:
            raise ValueError(f"{path}:{number}: run tag {line_tag!r} differs from --tag {tag!r}; the sidecar is stale. Fix: {fix}")
        if qid not in lines_by_qid:
            order.append(qid)
        lines_by_qid.setdefault(qid, []).append(text)
    # A sidecar is a sequence of whole chunks: in chunk order for one process, in its share's order for each of
    # several. Keep the complete chunks at its start; the first incomplete one (a torn write) ends it.
    chunk_at = {chunk[0]: chunk for chunk in chunks}
    keep: dict[str, list[str]] = {}
    kept_lines = 0
    pos_q = 0
    while pos_q < len(order):
        chunk = chunk_at.get(order[pos_q])
        if chunk is None:
            raise ValueError(f"{path}: query {order[pos_q]!r} starts no chunk of this run; the sidecar is stale. Fix: {fix}")
        if order[pos_q : pos_q + len(chunk)] != chunk or not all(
                len(lines_by_qid[q]) == len(expected[q]) for q in chunk):
            break
        pos_q += len(chunk)
        for q in chunk:
            keep[q] = lines_by_qid[q]
            kept_lines += len(lines_by_qid[q])
    valid_bytes = ends[kept_lines - 1] if kept_lines else 0
    return SidecarState(keep, valid_bytes, len(texts) - kept_lines)


def _fingerprint(path: str) -> str:
    """``PATH (N bytes, modified T)``: an input edited or replaced since the interrupted run shows here (for a
    directory, over the files directly in it)."""
    import datetime

    p = Path(path)
    if not p.exists():
        return path
    stats = [f.stat() for f in sorted(p.iterdir()) if f.is_file()] if p.is_dir() else [p.stat()]
    size = sum(st.st_size for st in stats)
    mtime_ns = max((st.st_mtime_ns for st in stats), default=0)
    when = datetime.datetime.fromtimestamp(mtime_ns / 1e9, datetime.timezone.utc).isoformat(timespec="microseconds")
    return f"{path} ({size} bytes, modified {when})"


def run_options(args: argparse.Namespace) -> dict[str, object]:
    """The options a resumed run must share with the interrupted one (see :data:`RUN_OPTIONS`), and the inputs it
    read, each as path, size and modification time."""
    options: dict[str, object] = {name: getattr(args, name, None) for name in RUN_OPTIONS}
    # The kind of device changes the floats; which GPU, or how many processes, does not (a run interrupted on 8
    # GPUs may resume on 1).
    try:
        options["device"] = _device_type(args.device)
    except ValueError:
        pass
    for name in INPUT_OPTIONS:
        if getattr(args, name, None):
            options[name] = _fingerprint(str(getattr(args, name)))
    if getattr(args, "dataset", None) and not args.run:  # the first stage may be BM25 with these options
        options["dataset"] += f" (BM25 if no scoreddocs: k1 {args.k1}, b {args.b}, {args.stemmer}, {args.stopwords})"
    return options


def check_resume_options(meta_path: Path, current: dict[str, object]) -> None:
    """Refuse ``--resume`` with options other than those of the run that wrote the sidecar.

    Raises:
        ValueError: Names every differing option, with both values.
    """
    import json

    if not meta_path.is_file():
        raise ValueError(f"{meta_path} is missing, so the options of the interrupted run are unknown. Fix: delete "
                         f"{meta_path.with_suffix('')} to start over")
    saved = json.loads(meta_path.read_text(encoding="utf-8"))
    # Inputs are compared when the interrupted run recorded them (older sidecars hold options only).
    keys = RUN_OPTIONS + (INPUT_OPTIONS if any(k in saved for k in INPUT_OPTIONS) else ())
    diffs = [f"--{k.replace('_', '-')} {saved.get(k)!r} then, {current.get(k)!r} now" for k in keys
             if saved.get(k) != current.get(k)]
    if diffs:
        raise ValueError(
            "--resume with other options than the interrupted run would mix two rankings in one file: "
            + "; ".join(diffs) + ". Fix: rerun with the interrupted run's options, or delete "
            f"{meta_path.with_suffix('')} to start over")


def _report_missing(missing: list[str], strict: bool) -> None:
    if not missing:
        return
    shown = ", ".join(missing[:_MISSING_SHOWN]) + (", ..." if len(missing) > _MISSING_SHOWN else "")
    if strict:
        raise ValueError(
            f"{len(missing)} docid(s) of the run are missing from the corpus (first: {shown}). "
            "Fix: pass the corpus the run was retrieved from, or drop --strict to skip them"
        )
    print(f"warning: {len(missing)} docid(s) of the run are missing from the corpus and are skipped (first: {shown})", file=sys.stderr)


def _device_type(device: str | None, flag: str = "--device") -> str:
    from tsarank.backend import check_device_available

    try:
        kind = check_device_available(device).type
    except ValueError as exc:
        message = str(exc).replace("Fix: --device cpu", "Fix: --devices cpu,cpu") if flag == "--devices" else str(exc)
        raise ValueError(f"{flag}: {message}") from None
    return "cuda" if kind == "cuda" else "cpu"


def _check_model_arg(model: str) -> None:
    """A local path that does not exist is an error now, not after reading every input."""
    if model != "default" and not Path(model).exists() and (model.startswith((".", "/", "~")) or model.count("/") > 1):
        raise ValueError(f"--model {model}: no such directory (and it does not look like a Hub id 'owner/name')")


def _check_model_options(args: argparse.Namespace) -> None:
    """Model, device, dtype and attention: checked after the output's place and before any input is read (a corpus
    can take minutes to read)."""
    _check_model_arg(args.model)
    _device_type(args.device)
    if args.model != "default":
        # What the checkpoint is, its tokenizer files and its template's budgets: small files only, before inputs.
        import logging

        from tsarank.loading import resolve_checkpoint

        quiet = logging.getLogger("tsarank.loading")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # the "no tsarank_config.json" warning is said once, when the model loads
        try:
            spec = resolve_checkpoint(args.model, args.template)
        finally:
            quiet.setLevel(level)
        chosen = spec.template.with_budgets(args.max_doc_tokens, args.max_query_tokens, args.max_length)
        if chosen.style == "rankinggpt" and chosen.max_length is not None:  # its room needs the tokenizer (fast)
            from tsarank.loading import load_tokenizer_checked
            from tsarank.prompts import check_room

            check_room(load_tokenizer_checked(spec.tokenizer_source or spec.name_or_path,
                                              trust_remote_code=args.trust_remote_code), chosen)
    else:  # the default model scores with the named "tsarank" template unless told otherwise
        from tsarank.prompts import LAST_TOKEN, PromptTemplate

        if PromptTemplate.named(args.template or "tsarank").scoring_head == LAST_TOKEN:
            raise ValueError(f"--template {args.template}: a last-token template needs a trained head, and the default "
                             "model has none. Fix: --template tsarank or rankinggpt, or a checkpoint trained with the "
                             "last-token head")
        PromptTemplate.named(args.template or "tsarank").with_budgets(args.max_doc_tokens, args.max_query_tokens, args.max_length)
    from tsarank.backend import resolve_attn_implementation, resolve_dtype

    try:
        dtype = resolve_dtype(args.dtype, args.device)
    except ValueError as exc:
        raise ValueError(f"--dtype: {exc}") from None
    if args.attn_implementation not in ATTENTION_CHOICES:
        raise ValueError(f"--attn-implementation {args.attn_implementation!r}: use one of {', '.join(ATTENTION_CHOICES)}")
    try:
        resolve_attn_implementation(args.attn_implementation, args.device, dtype)
    except ValueError as exc:
        raise ValueError(f"--attn-implementation: {exc}") from None


def _check_args(args: argparse.Namespace) -> None:
    for name in ("top_k", "batch_size", "max_tokens", "max_queries", "chunk_docs", "max_doc_tokens",
                 "max_query_tokens", "max_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not args.tag or any(ch.isspace() for ch in args.tag):
        raise ValueError(f"--tag must be a non-empty word without whitespace, got {args.tag!r}")
    if args.template is not None:
        from tsarank.prompts import PromptTemplate

        PromptTemplate.named(args.template)  # an unknown name fails now, listing the known ones
    if getattr(args, "dataset", None):
        if args.candidates or args.queries or args.corpus:
            raise ValueError(f"--dataset {args.dataset} provides the queries and documents; drop --candidates, --queries "
                             "and --corpus (a --run of your own is fine)")
        from tsarank.retrieval import bm25_options

        bm25_options(args)  # checked now, used when the dataset has no first stage
        return
    given = [n for n in ("run", "queries", "corpus") if getattr(args, n)]
    if args.candidates and given:
        raise ValueError("give either --candidates (rank_llm JSON) or --run/--queries/--corpus, not both")
    if not args.candidates and len(given) != 3:
        lacking = [f"--{n}" for n in ("run", "queries", "corpus") if n not in given]
        raise ValueError(f"missing {', '.join(lacking)}: pass --run, --queries and --corpus together, or --candidates JSON")


# ---------------------------------------------------------------------------------------- several processes
def rank_sidecar(sidecar: Path, rank: int) -> Path:
    """Process ``rank``'s sidecar: ``OUT.partial`` for rank 0 (and a single process), ``OUT.partial.N`` else."""
    return sidecar if rank == 0 else sidecar.with_name(f"{sidecar.name}.{rank}")


def sidecar_files(sidecar: Path) -> list[Path]:
    """Every sidecar of an earlier run, whatever its number of processes (``OUT.partial``, ``OUT.partial.N``)."""
    found = [sidecar] if sidecar.is_file() else []
    numbered = [f for f in sidecar.parent.glob(f"{sidecar.name}.*") if f.name[len(sidecar.name) + 1:].isdigit()]
    return found + sorted(numbered, key=lambda f: int(f.name[len(sidecar.name) + 1:]))


def _spawn_devices(args: argparse.Namespace) -> int:
    """``--devices A,B,...``: one process per device on this machine, as a launcher would start them (one rank
    each; rank 0 writes the merged run); exit status: the first non-zero one of theirs."""
    import subprocess

    from tsarank.sharding import free_port

    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    try:
        if args.device is not None:
            raise ValueError("give --device (one process) or --devices (one process per device), not both")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("--devices starts its own processes; under torchrun or deepspeed leave it out (each "
                             "process takes the GPU of its LOCAL_RANK)")
        if not devices:
            raise ValueError(f"--devices {args.devices!r}: name at least one device, e.g. cuda:0,cuda:1")
        for d in devices:
            _device_type(d, flag="--devices")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    argv = list(getattr(args, "argv", None) or sys.argv[1:])
    for k, a in enumerate(argv):
        if a == "--devices":
            del argv[k : k + 2]
            break
        if a.startswith("--devices="):
            del argv[k]
            break
    port = str(free_port())
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // len(devices)))
    procs = []
    for rank, device in enumerate(devices):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(len(devices)),
               "LOCAL_WORLD_SIZE": str(len(devices)), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "OMP_NUM_THREADS": threads}
        procs.append(subprocess.Popen([sys.executable, "-m", "tsarank.cli", *argv, "--device", device], env=env))
    try:
        codes = [proc.wait() for proc in procs]
    except KeyboardInterrupt:  # the processes got the same SIGINT; wait for their messages
        codes = [proc.wait() for proc in procs]
        return 130
    return next((c for c in codes if c != 0), 0)


# ---------------------------------------------------------------------------------------- command
def run(args: argparse.Namespace) -> int:
    """Execute ``tsarank rerank``; returns the process exit code."""
    if getattr(args, "devices", None) is not None:  # `--devices ''` too: refused there, not ignored
        return _spawn_devices(args)
    from tsarank.sharding import ScoringGroup

    try:
        group = ScoringGroup.from_env()
    except (RuntimeError, ValueError, KeyError) as exc:
        print(f"error: cannot join the scoring processes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): {exc}",
              file=sys.stderr)
        return 2
    try:
        return _run(args, group)
    finally:
        group.close()


def _run(args: argparse.Namespace, group) -> int:
    import contextlib

    from tsarank.atomic import OutputLock, check_output_file
    from tsarank.data.formats import load_candidates

    out = Path(args.out)
    sidecar = out.with_name(out.name + SIDECAR_SUFFIX)
    meta = out.with_name(out.name + META_SUFFIX)
    t_start = time.perf_counter()
    hold = contextlib.ExitStack()
    error = None
    try:
        _check_args(args)
        args.device = group.device(args.device)
        check_output_file(out, overwrite=True)  # the place: an existing, writable directory (the lock lives there)
        if group.rank == 0:  # one lock for the whole group: the other processes write only their own sidecars
            hold.enter_context(OutputLock(out, "tsarank rerank"))
        existing = sidecar_files(sidecar)
        check_output_file(out, args.overwrite,
                          note=" (the interrupted run had already finished)" if existing else "")
        if existing and not args.resume:
            raise ValueError(
                f"found {existing[0]} from an interrupted run; pass --resume to continue it, or delete it to start over"
            )
        _check_model_options(args)
        if getattr(args, "dataset", None):
            lists, missing = _dataset_candidates(args)
        elif args.candidates:
            lists, missing = load_candidates(candidates=args.candidates, top_k=args.top_k)
        else:
            lists, missing = load_candidates(run=args.run, queries=args.queries, corpus=args.corpus, top_k=args.top_k)
        if group.rank == 0:
            _report_missing(missing, args.strict)
        elif missing and args.strict:
            raise ValueError("docids of the run are missing from the corpus (see rank 0)")
        lists.sort(key=lambda c: qid_sort_key(c.qid))
        if args.max_queries is not None:
            lists = lists[: args.max_queries]
        empty = [c.qid for c in lists if len(c) == 0]
        lists = [c for c in lists if len(c) > 0]
        if not lists:
            raise ValueError("no query has any candidate left to re-rank")
        chunk_docs = args.chunk_docs or DEFAULT_CHUNK_DOCS[_device_type(args.device)]
        chunks = [[c.qid for c in lists[s:e]] for s, e in plan_chunks([len(c) for c in lists], chunk_docs)]
        expected = {c.qid: set(c.docids) for c in lists}
        resuming = bool(args.resume and existing)
        if resuming:
            check_resume_options(meta, run_options(args))
        # Every process reads every sidecar before any of them writes (the agreement below is the fence).
        state = SidecarState({}, 0, 0)
        for f in existing if resuming else []:
            st = read_sidecar(f, expected, chunks, args.tag)
            state.lines.update(st.lines)
            state.dropped_lines += st.dropped_lines
            if f == rank_sidecar(sidecar, group.rank):
                state.valid_bytes = st.valid_bytes
    except (DataError, ValueError, OSError) as exc:
        error = exc
    oks = group.oks(error is None)
    if not all(oks):
        hold.close()
        # Input errors are the same on every process: rank 0 says it once; a process that alone failed says why.
        if error is not None and (group.rank == 0 or oks[0]):
            where = f"(process {group.rank}) " if group.rank else ""
            print(f"error: {where}{error}", file=sys.stderr)
        elif group.rank == 0:
            print("error: another scoring process stopped before scoring (its message is above)", file=sys.stderr)
        return 2
    with hold:
        return _score_and_write(args, group, out, sidecar, meta, lists, chunks, state, empty, t_start, resuming)


def _score_and_write(args: argparse.Namespace, group, out: Path, sidecar: Path, meta: Path, lists: list,
                     chunks: list, state: SidecarState, empty: list[str], t_start: float, resuming: bool) -> int:
    """Score this process's share of the chunks the sidecars lack, appending each to its sidecar; then rank 0
    writes ``out`` atomically from every sidecar (under the lock)."""
    import json

    from tsarank.atomic import atomic_open, atomic_write_text
    from tsarank.data.formats import format_rank_llm_request
    from tsarank.sharding import assign_chunks, chunk_cost

    lead = group.rank == 0
    if lead and empty:
        print(f"warning: {len(empty)} queries have no candidates and get no lines (e.g. {', '.join(empty[:_MISSING_SHOWN])})", file=sys.stderr)
    if lead and args.resume and not resuming:
        print(f"note: --resume given but {sidecar} does not exist; starting from the beginning", file=sys.stderr)

    by_qid = {c.qid: c for c in lists}
    pending = [chunk for chunk in chunks if chunk[0] not in state.lines]
    doc_chars = 4 * (args.max_doc_tokens or 256)
    costs = [sum(chunk_cost(by_qid[q].query, by_qid[q].texts, doc_chars) for q in chunk) for chunk in pending]
    todo = [pending[i] for i in assign_chunks(costs, group.world)[group.rank]]
    n_docs_total = sum(len(c) for c in lists)
    n_docs_pending = sum(len(by_qid[q]) for chunk in pending for q in chunk)
    n_docs_todo = sum(len(by_qid[q]) for chunk in todo for q in chunk)
    if lead and state.lines:
        dropped = f"; {state.dropped_lines} lines of an unfinished chunk dropped" if state.dropped_lines else ""
        print(f"resuming: {len(state.lines)} of {len(lists)} queries already in {sidecar}{dropped}", file=sys.stderr)
    if lead and group.distributed:
        print(f"scoring on {group.world} processes: {n_docs_pending} documents in {len(pending)} chunks, balanced by "
              "estimated tokens", file=sys.stderr)

    ranker = _load_ranker(args, quiet=not lead) if todo else None
    if not group.all_ok(ranker is not None or not todo):
        if lead and (ranker is not None or not todo):
            print("error: another scoring process could not load the model (its message is above)", file=sys.stderr)
        return 2
    own = rank_sidecar(sidecar, group.rank)
    if lead and not resuming:  # a fresh run: record the options a --resume must repeat
        atomic_write_text(meta, json.dumps(run_options(args), indent=1) + "\n")

    elapsed_scoring = 0.0
    if todo:
        from tqdm.auto import tqdm

        # Truncate away a torn tail so that appended chunks follow the last complete one.
        with open(own, "ab") as fh:
            fh.truncate(state.valid_bytes)
        total = n_docs_total if not group.distributed else n_docs_todo
        # rate_noinv_fmt: always "docs/s", also below 1 doc/s (where tqdm's default would switch to "s/doc").
        bar = tqdm(total=total, initial=total - n_docs_todo, unit=" docs",
                   desc="rerank" if not group.distributed else f"rerank (process 0 of {group.world})",
                   dynamic_ncols=True, smoothing=0.1, file=sys.stderr, disable=not lead,
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} docs [{elapsed}<{remaining}, {rate_noinv_fmt}]")
        t0 = time.perf_counter()
        written = [len(state.lines)]  # queries whose lines are on disk in the sidecars
        try:
            _score_chunks(ranker, args, own, todo, by_qid, state, bar, written)
        except KeyboardInterrupt:
            bar.close()
            if lead:
                kept = f"{sidecar}" if not group.distributed else f"{sidecar} and {sidecar}.N"
                print(f"\ninterrupted: {written[0]} of {len(lists)} queries are kept in {kept}; run the same "
                      "command with --resume to continue (the result is identical to an uninterrupted run)",
                      file=sys.stderr)
            return 130
        finally:
            bar.close()
        elapsed_scoring = time.perf_counter() - t0
    elapsed_scoring = group.max(elapsed_scoring)
    if not group.all_ok(True):  # every process has flushed its share
        return 1
    if not lead:
        return 0

    files = sidecar_files(sidecar)
    expected = {c.qid: set(c.docids) for c in lists}
    lines: dict[str, list[str]] = {}
    for f in files:
        lines.update(read_sidecar(f, expected, chunks, args.tag).lines)
    lacking = [c.qid for c in lists if c.qid not in lines]
    if lacking:
        print(f"error: {len(lacking)} queries are in no sidecar after scoring (e.g. {lacking[:3]}); rerun with "
              "--resume", file=sys.stderr)
        return 1
    try:
        with atomic_open(out) as fh:
            for c in lists:
                if args.out_format == "rank_llm":
                    ranked = [(parts[2], float(parts[4])) for parts in (line.split() for line in lines[c.qid])]
                    fh.write(format_rank_llm_request(c.qid, c.query, ranked, dict(zip(c.docids, c.texts))))
                else:
                    fh.writelines(lines[c.qid])
    except OSError as exc:
        print(f"error: could not write {out}: {exc}; the scored queries are kept in {sidecar} (rerun with --resume)", file=sys.stderr)
        return 1
    for f in files:
        f.unlink(missing_ok=True)
    meta.unlink(missing_ok=True)
    rate = n_docs_pending / elapsed_scoring if elapsed_scoring > 0 else float("nan")
    resumed = f", {len(lists) - sum(len(c) for c in pending)} queries resumed" if len(pending) < len(chunks) else ""
    where = f" on {group.world} processes" if group.distributed else ""
    print(
        f"reranked {len(lists)} queries, {n_docs_total} docs ({n_docs_pending} scored in {elapsed_scoring:.1f} s"
        f"{where}, {rate:.1f} docs/s{resumed}; total {time.perf_counter() - t_start:.1f} s) -> {out}"
    )
    return 0


def _score_chunks(ranker, args: argparse.Namespace, sidecar: Path, todo: list[list[str]], by_qid: dict, state: SidecarState,
                  bar, written: list[int]) -> None:
    """Score each chunk and append its lines to the sidecar in one write (flush + fsync): a kill or Ctrl-C tears at
    most the chunk being written, which ``--resume`` drops and scores again."""
    from tsarank.data.formats import format_run_lines

    with open(sidecar, "a", encoding="utf-8", newline="") as fh:
        for chunk in todo:
            cands = [by_qid[q] for q in chunk]
            pairs = [(c.query, text) for c in cands for text in c.texts]
            scores = ranker.score_pairs(pairs, batch_size=args.batch_size, on_batch=bar.update)
            block: list[str] = []
            offset = 0
            for c in cands:
                ranked = list(zip(c.docids, scores[offset : offset + len(c)]))
                offset += len(c)
                lines = format_run_lines(c.qid, ranked, tag=args.tag)
                state.lines[c.qid] = lines
                block.extend(lines)
            fh.write("".join(block))
            fh.flush()
            written[0] += len(cands)  # in the file now (an interrupt inside fsync does not take it back)
            os.fsync(fh.fileno())


def _dataset_candidates(args: argparse.Namespace):
    """``--dataset ID``: its queries and documents, the first stage from ``--run``, else the dataset's scoreddocs,
    else BM25 with ``tsarank retrieve``'s options (computed identically on every process)."""
    from tsarank.data import irds
    from tsarank.data.formats import load_candidates, read_corpus, read_queries

    from tsarank.data.formats import Doc, read_run

    src = irds.PREFIX + irds.dataset_id(args.dataset)
    run = args.run or (src if irds.has_scoreddocs(src) else None)
    if run is not None:
        first = read_run(run)
        queries = read_queries(src)
        wanted = sorted({d for q, ranked in first.items() if q in queries for d, _ in ranked[: args.top_k]})
        corpus = {d: Doc(d, title, text) for d, (title, text) in irds.docs(src, wanted).items()}
        return load_candidates(run=first, queries=queries, corpus=corpus, top_k=args.top_k)
    from tsarank.retrieval import bm25_options, bm25_retrieve

    queries, corpus = read_queries(src), read_corpus(src)
    first = bm25_retrieve(corpus, queries, top_k=args.top_k, **bm25_options(args))
    return load_candidates(run=first, queries=queries, corpus=corpus, top_k=args.top_k)


def _load_ranker(args: argparse.Namespace, quiet: bool = False):
    """Load the model after all inputs are known to be good; print the error and return None on failure (``quiet``:
    no report of the model and template, which the first process prints)."""
    from tsarank.inference import Ranker

    kw = dict(device=args.device, dtype=args.dtype, attn_implementation=args.attn_implementation, max_tokens=args.max_tokens,
              template=args.template, max_doc_tokens=args.max_doc_tokens, max_query_tokens=args.max_query_tokens,
              max_length=args.max_length, trust_remote_code=args.trust_remote_code)
    try:
        ranker = Ranker.default(**kw) if args.model == "default" else Ranker.from_pretrained(args.model, **kw)
    except (OSError, ValueError, FileNotFoundError) as exc:
        print(f"error: could not load model {args.model!r}: {exc}", file=sys.stderr)
        return None
    t = ranker.template
    budget = f"document {t.max_doc_tokens}, query {t.max_query_tokens}" + (
        f", total {t.max_length}" if t.max_length is not None else "")
    # Which prompt a checkpoint is scored with decides its numbers: always say it.
    if not quiet:
        print(f"model: {args.model} ({ranker.checkpoint_kind or 'checkpoint'}; template {t.style}, {t.scoring_head} "
              f"head; token budgets: {budget})", file=sys.stderr)
    return ranker
