"""Sub-commands of the ``tsarank`` console script, one module per verb (see :mod:`tsarank.cli`)."""

from __future__ import annotations

import argparse
import sys
from typing import Callable


def run_locked(run: Callable[[argparse.Namespace], int], args: argparse.Namespace, out: str, command: str,
               flag: str = "--out") -> int:
    """``run(args)`` while holding the :class:`tsarank.atomic.OutputLock` of ``out``: a second command writing the
    same output stops at once with exit status 2 (the first one's work is untouched)."""
    from ..atomic import OutputBusy, OutputLock

    try:
        with OutputLock(out, command, flag):
            return run(args)
    except OutputBusy as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
