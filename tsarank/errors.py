"""Errors raised by tsarank's data readers.

A :class:`DataError` always says where (file and line), which field, what was
expected, what came instead and, where possible, how to fix it::

    data/x.jsonl:17: field 'query': expected a non-empty string, got int 5. Fix: ...
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["DataError", "ModelLoadError", "describe"]


def describe(value: Any, limit: int = 60) -> str:
    """Short "type value" description of a bad value for error messages.

    Args:
        value: The offending value.
        limit: Maximum number of characters of ``repr(value)`` to show.

    Returns:
        For example ``"int 5"``, ``"str ''"``, ``"null"`` or ``"list [1, 2, ...]"``.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"bool {value}"
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(value).__name__} {text}"


class DataError(ValueError):
    """A malformed input file, located by file, line and field.

    Args:
        path: The file (or directory) the problem is in.
        line: 1-based line number, or ``None`` when the problem is not tied to one line.
        field: Name of the offending field (``None`` for whole-line problems).
        message: What was expected and what came, e.g.
            ``"expected a non-empty string, got int 5"``.
        fix: Optional advice on how to fix the input.

    Attributes:
        path: ``str`` of the path.
        line: Line number or ``None``.
        field: Field name or ``None``.
        message: The bare message (without location or fix).
        fix: The fix-it advice or ``None``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        line: int | None,
        field: str | None,
        message: str,
        fix: str | None = None,
    ) -> None:
        self.path = str(path)
        self.line = line
        self.field = field
        self.message = message
        self.fix = fix
        location = self.path if line is None else f"{self.path}:{line}"
        text = f"{location}: "
        if field:
            text += f"field '{field}': "
        text += message.rstrip()
        if fix:
            if not text.endswith((".", "!", "?")):
                text += "."
            text += f" Fix: {fix}"
        super().__init__(text)

    def __reduce__(self):  # keep picklable (multiprocessing data loaders)
        return (type(self), (self.path, self.line, self.field, self.message, self.fix))


class ModelLoadError(OSError):
    """A checkpoint whose files cannot be read (truncated or corrupt weights, a half-finished download)."""
