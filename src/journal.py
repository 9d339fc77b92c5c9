"""The search's study journal: Optuna's journal file, to which each append adds whole records or nothing.

Optuna's JournalFileBackend appends under its lock, straight into the file: a write that fails half-way
(a full disk) leaves a torn record at the end. Optuna skips that record when reading, but the next
append, once there is room again, is glued onto it, and from then on Optuna loses that record and
refuses the journal at the next one ("Invalid log format", or a JSON error): the study no longer opens.
Imported by src/tune.py only, with Optuna (the `sweep` extra).
"""

from __future__ import annotations

import json
import os
from typing import Any

from optuna.storages.journal import JournalFileBackend
from optuna.storages.journal._file import get_lock_file  # how Optuna itself takes the journal's lock

from src.atomic import writing


class WholeRecordsJournal(JournalFileBackend):
    """JournalFileBackend whose failed append is cut off again before the lock is released, and names
    the journal in one line (CannotWrite)."""

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        # Optuna's own append, less the torn record it would leave behind.
        records = "".join(json.dumps(record, separators=(",", ":")) + "\n" for record in logs).encode()
        with writing(self._file_path), get_lock_file(self._lock):
            size = os.path.getsize(self._file_path)
            try:
                with open(self._file_path, "ab") as f:
                    f.write(records)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError:
                os.truncate(self._file_path, size)
                raise
