"""Files put in place in one step: a checkpoint or an exported model is never seen half-written.

Used by the training's checkpoint writer and by export; free of Lightning.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


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
