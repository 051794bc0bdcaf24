"""Atomic writes: a reader (or a crash) never sees half a file or half a checkpoint directory.

Every file tsarank writes itself goes through this module (model weights are written by transformers / DeepSpeed):

- :func:`atomic_path` yields a temporary file name beside the target and moves it into place on success (for
  writers that want a path, e.g. ``matplotlib.savefig``);
- :func:`atomic_open` opens that temporary file for you;
- :func:`atomic_write_text` writes a string in one call;
- :func:`atomic_directory` builds a whole directory (a merged checkpoint, the default model's cache) beside the
  target and renames it into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

PathLike = str | os.PathLike

__all__ = ["OutputBusy", "OutputLock", "check_output_file", "check_writable_dir", "new_directory", "atomic_path", "atomic_open", "atomic_write_text", "atomic_directory"]


def check_output_file(path: PathLike, overwrite: bool, *, flag: str = "--out", note: str = "") -> Path:
    """Check an output file's place before any work: its directory exists, and an existing file is replaced only
    when asked.

    Args:
        path: The output file.
        overwrite: Replacing an existing file was asked for (``--overwrite``).
        flag: The option that named the file, for the message.
        note: Added after the file name when it exists (why it may exist).

    Raises:
        FileNotFoundError: The directory does not exist.
        FileExistsError: The file exists and ``overwrite`` is false.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output directory {path.parent} does not exist; create it first")
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path} is a directory; name a file inside it")
    if path.exists() and not overwrite:
        raise FileExistsError(f"refusing to overwrite existing {path}{note}; pass --overwrite or choose another {flag}")
    check_writable_dir(path.parent, flag)
    return path


def check_writable_dir(directory: PathLike, flag: str) -> None:
    """Create and delete a file in ``directory`` now, so that a read-only place fails before any work, not after.

    Raises:
        PermissionError: The directory cannot be written; the message names the option.
    """
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(prefix=".tsarank-write-check-", dir=directory)
    except OSError as exc:
        raise PermissionError(f"{flag}: cannot write in {directory} ({exc.strerror or exc}); choose another place") from None
    os.close(fd)
    os.unlink(probe)


def nearest_existing(path: PathLike) -> Path:
    """``path`` itself or its closest ancestor that exists (where ``mkdir -p path`` would start creating)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


@contextmanager
def new_directory(path: PathLike) -> Iterator[Path]:
    """``mkdir -p path`` for the duration of a job: on an exception (Ctrl-C included) the directories this call
    created are removed again when they are empty, so a failed run leaves no empty output directory behind.

    Yields:
        ``path``, existing.
    """
    path = Path(path)
    created = []
    p = path
    while not p.exists() and p != p.parent:
        created.append(p)  # deepest first
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        for d in created:
            try:
                d.rmdir()  # only when empty: a file someone else put there meanwhile stays
            except OSError:
                break
        raise


class OutputBusy(FileExistsError):
    """Another process holds the :class:`OutputLock` of an output."""


class OutputLock:
    """An exclusive ``flock`` on ``OUT.lock`` (beside ``OUT``) while a command writes ``OUT``: a second tsarank
    command with the same output stops at once instead of interleaving its writes with the first's or replacing
    its result. The lock dies with its process (no stale lock after a crash); the file is removed on release.

    Args:
        out: The output file or directory.
        command: The command, for the message (``tsarank rerank``, ``training``...).
        flag: The option that named the output.
    """

    def __init__(self, out: PathLike, command: str, flag: str = "--out") -> None:
        out = Path(out)
        self.out, self.command, self.flag = out, command, flag
        self.path = out.with_name(out.name + ".lock")
        self.fh: IO[str] | None = None

    def __enter__(self) -> "OutputLock":
        import errno
        import fcntl
        import logging

        while True:
            try:
                fh = open(self.path, "a+", encoding="utf-8")
            except OSError:
                return self  # no such or no writable directory: the command's own check of its output says so
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    # A file system without locks (some network mounts): go on unprotected, but say so.
                    logging.getLogger(__name__).warning("cannot lock %s (%s); concurrent writers are not detected",
                                                        self.path, exc.strerror or exc)
                    fh.close()
                    return self
                fh.seek(0)
                holder = fh.read().strip()
                fh.close()
                who = f"pid {holder}" if holder else "another process"
                raise OutputBusy(f"another {self.command} ({who}) is writing {self.out}; wait for it, or choose "
                                      f"another {self.flag}") from None
            # The holder before us unlinks the file while still locking it; a lock on that unlinked file protects
            # nothing, so lock the file that is at the path now.
            try:
                same = os.fstat(fh.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            fh.close()
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self.fh = fh
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fh is not None:
            self.path.unlink(missing_ok=True)  # while still holding the lock: no one else owns this file yet
            self.fh.close()
            self.fh = None


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable where the file system supports it."""
    try:
        fd = os.open(directory if str(directory) else ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and move it onto ``path``.

    On an exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextmanager
def atomic_open(path: PathLike, mode: str = "w", encoding: str = "utf-8") -> Iterator[IO[Any]]:
    """Open ``path`` for writing atomically (see :func:`atomic_path`).

    Args:
        path: Final file name.
        mode: ``"w"`` (text, no newline translation) or ``"wb"``.
        encoding: Text encoding.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp:
        fh = open(tmp, "xb") if mode == "wb" else open(tmp, "x", encoding=encoding, newline="")
        with fh:
            yield fh


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path) as fh:
        fh.write(text)


@contextmanager
def atomic_directory(final: PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``final``; on success it becomes ``final``.

    Args:
        final: The directory to create.
        replace: An existing ``final`` is replaced (moved aside first, then deleted). With ``False`` an existing
            ``final`` wins: the new directory is discarded (for caches that several processes may build at once).

    Yields:
        The temporary directory to fill. On an exception it is deleted and ``final`` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; checkpoints and caches are meant to be shared
        if final.exists() and replace:
            stale = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, final)  # atomic; fails when another process put a directory there meanwhile
        except OSError:
            if replace or not final.exists():
                raise
        _fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
