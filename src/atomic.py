"""Files put in place in one step, and failed writes told in one line.

A checkpoint, an exported model, a figure or a table is written to a temporary file beside it and
renamed into place, so it is never seen half-written. A write that fails (a full disk, a folder that
vanished or is a file) ends as one CannotWrite naming the file and the cause. Free of Lightning.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from src.errors import UserError, cannot_write


@contextlib.contextmanager
def replaced_in_one_step(target: Path, suffix: str = ".tmp"):
    """A temporary file beside `target` for the block to write, renamed onto `target` when the block
    ends well and removed when it does not: a process killed or failing meanwhile leaves any earlier
    file at `target` whole. Raises OSError when the folder cannot hold the temporary file."""
    handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix)
    os.close(handle)
    partial = Path(name)
    try:
        umask = os.umask(0)
        os.umask(umask)
        partial.chmod(0o666 & ~umask)  # mkstemp creates 0600; the file gets a new file's usual permissions
        yield partial
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


@contextlib.contextmanager
def written_whole(path: str | Path):
    """replaced_in_one_step(path) inside writing(path): the temporary file for the block to write, put in
    place whole, and a failed write told in one line naming `path`."""
    path = Path(path)
    with writing(path), replaced_in_one_step(path) as partial:
        yield partial


@contextlib.contextmanager
def writing(path: str | Path):
    """Whatever fails in the block because a write failed becomes CannotWrite: 'cannot write PATH: CAUSE'.

    The boundary of every writer, the project's own and the libraries' (Lightning's loggers, MLflow,
    Optuna): the line names the file the user knows, not a temporary one, and the system's words for
    the cause. Other errors pass through unchanged.
    """
    try:
        yield
    except UserError:
        raise  # already one line (a CannotWrite of a file inside `path`, say)
    except Exception as error:
        failed = cannot_write(path, error)
        if failed is None:
            raise
        raise failed from error
