"""The error types of bad input and of a failed write, and the one-line form every error message takes.

The ground floor: imported by every layer above, it imports nothing of the project.
"""

from __future__ import annotations

import re
import sqlite3
import sys
from pathlib import Path
from typing import NoReturn


class UserError(Exception):
    """Bad input (or a fault of the machine while writing): reported as one line and exit status 1,
    never as a traceback."""


# Terminal escape sequences (colours, bold: PyTorch's weights_only message has them) and other
# control characters, which foreign text may carry into an error line.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]|[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def one_line(text: object) -> str:
    """Text fit for a one-line error: escape codes and control characters removed, whitespace collapsed."""
    return " ".join(_ESCAPES.sub("", str(text)).split())


def exit_with(error: object) -> NoReturn:
    """End the program as bad input ends it: `error: ...` in one line on stderr, and exit status 1."""
    print(f"error: {one_line(error)}", file=sys.stderr)
    sys.exit(1)


class CannotWrite(UserError):
    """A file could not be written: a fault of the machine, not of the settings, so a search or a
    sweep stops at it rather than trying other settings on the same full disk."""


def cannot_write(path: str | Path | None, error: BaseException) -> CannotWrite | None:
    """CannotWrite naming `path` (None: the file the system named) when `error` came from a failed write.

    Libraries wrap the system's error: torch.save's zip writer raises a RuntimeError ('unexpected pos
    ...') while handling the OSError of the full disk, MLflow an MlflowException from SQLAlchemy's from
    SQLite's 'database or disk is full'. The first failure of the chain is the cause.
    """
    failure, seen = None, set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (OSError, sqlite3.OperationalError)):
            failure = error
        error = error.__cause__ or error.__context__
    if failure is None:
        return None
    cause = (failure.strerror or type(failure).__name__) if isinstance(failure, OSError) else str(failure)
    return CannotWrite(f"cannot write {path or getattr(failure, 'filename', None) or 'a file'}: {cause}")
