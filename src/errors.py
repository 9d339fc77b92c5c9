"""The one error type of bad input, and the one-line form every error message takes.

The ground floor: imported by every layer above, it imports nothing of the project.
"""

from __future__ import annotations

import re


class UserError(Exception):
    """Bad input (or a fault of the machine while writing): reported as one line and exit status 1,
    never as a traceback."""


# Terminal escape sequences (colours, bold: PyTorch's weights_only message has them) and other
# control characters, which foreign text may carry into an error line.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]|[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def one_line(text: object) -> str:
    """Text fit for a one-line error: escape codes and control characters removed, whitespace collapsed."""
    return " ".join(_ESCAPES.sub("", str(text)).split())
