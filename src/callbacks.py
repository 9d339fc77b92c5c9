"""Lightning extensions the training run uses: checkpoint names that count epochs from 1, a checkpoint on
Ctrl-C/SIGTERM, checkpoint files that are never left half-written, every epoch's validation figures,
and the compile time. (What the run prints is src/console.py's.)"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from src.atomic import replaced_in_one_step, writing
from src.run_context import RunContext
from src.run_files import LAST_CKPT


class KerasEpochCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose file names count epochs from 1, as Keras's ModelCheckpoint fills `{epoch}` and as
    the console counts them (`Epoch 1/5`): the best of the fifth epoch is best-epoch05-... (Lightning: epoch04).
    The checkpoint's own `epoch` and metrics.csv keep Lightning's count from 0."""

    def format_checkpoint_name(self, metrics, filename=None, ver=None, prefix=None):
        if "epoch" in metrics:
            metrics = {**metrics, "epoch": metrics["epoch"] + 1}
        return super().format_checkpoint_name(metrics, filename, ver, prefix)

    @property
    def state_key(self) -> str:
        # Lightning keys a callback's state in the checkpoint by its class name: keep ModelCheckpoint's, so that
        # runs written before this class existed resume with their record of the best epoch.
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)


class CompileTime(L.Callback):
    """With model.compile, report the first training step, which compiles the network, apart from the
    steps after it in the same epoch. (Lightning's Timer callback times stages and epochs, not a step.)

    The device is synchronised only around the first step and at the end of that epoch, so that
    the times include the queued GPU work without adding a wait to every step.
    """

    def __init__(self):
        self.first_step: float | None = None  # seconds
        self.later_steps, self.later_time = 0, None  # the rest of the epoch: steps and seconds
        self._started = self._first_done = self._first_global_step = None

    @staticmethod
    def _now(pl_module) -> float:
        if pl_module.device.type in ("cuda", "mps"):
            getattr(torch, pl_module.device.type).synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._started is None:
            self._started = self._now(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.first_step is None:
            self._first_done = self._now(pl_module)
            self.first_step = self._first_done - self._started
            self._first_global_step = trainer.global_step

    def on_train_epoch_end(self, trainer, pl_module):
        if self.first_step is not None and self.later_time is None:
            self.later_time = self._now(pl_module) - self._first_done
            self.later_steps = trainer.global_step - self._first_global_step
            rank_zero_info(f"model.compile: the first step took {self.first_step:.2f} s (compiling the network), "
                           f"the next {self.later_steps} steps {self.later_time:.2f} s")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file beside it, then rename it into place.

    Lightning's own save goes through a temporary file in the system's temp folder and a
    move, which is a copy (not atomic) when that folder is on another file system; a process
    killed while saving must leave the previous last.ckpt whole. A save that fails (a full disk,
    a vanished folder) leaves it whole too, and ends the run with one line naming the file: torch.save
    would only say "unexpected pos 3904 vs 3798".
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            with replaced_in_one_step(path) as tmp, open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())

    def load_checkpoint(self, path, map_location=None, weights_only=True):
        # Checkpoints may come from anywhere: never unpickle arbitrary objects.
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


class CheckpointOnInterrupt(L.Callback):
    """On Ctrl-C or SIGTERM, save the latest state as last.ckpt and say how to resume.

    Python raises KeyboardInterrupt wherever it happens to be, possibly halfway through an
    optimizer step; the first Ctrl-C therefore only asks to stop, and training stops before
    the next batch, as Lightning does for SIGTERM. A second Ctrl-C stops at once, unsaved.
    """

    def __init__(self, dirpath: str | Path, context: RunContext):
        self.path = Path(dirpath) / LAST_CKPT
        self.context = context  # says how to resume
        self.stop_requested = self.stopped_at_once = False
        self._previous_handler = None

    def _request_stop(self, signum, frame):
        if self.stop_requested:
            self.stopped_at_once = True
            raise KeyboardInterrupt
        self.stop_requested = True
        print("\nStopping after this step (Ctrl-C again to stop at once, without saving)...", file=sys.stderr, flush=True)

    def on_fit_start(self, trainer, pl_module):
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._request_stop)

    def _stop_if_requested(self, *args):
        if self.stop_requested:
            raise KeyboardInterrupt

    on_train_batch_start = on_validation_batch_start = _stop_if_requested

    def _restore_handler(self):
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    def on_fit_end(self, trainer, pl_module):
        self._restore_handler()

    def on_exception(self, trainer, pl_module, exception):
        self._restore_handler()
        asked_to_stop = isinstance(exception, KeyboardInterrupt) and self.stop_requested and not self.stopped_at_once
        if not (asked_to_stop or isinstance(exception, SIGTERMException)) or trainer.state.fn != TrainerFn.FITTING:
            return
        trainer.save_checkpoint(self.path)
        if trainer.is_global_zero:
            print(f"\nInterrupted in epoch {trainer.current_epoch + 1} after {trainer.global_step} steps; saved {self.path}"
                  f"\nResume with: {self.context.resume_command(self.path)}", file=sys.stderr, flush=True)


class ValidationRecord(L.Callback):
    """Every epoch's val/loss and val/acc, kept in the checkpoints, so that a run that tests its best
    epoch returns that epoch's figures to a sweep, also when it was resumed after that epoch.
    (ModelCheckpoint keeps only the monitored val/acc of its best epoch.)"""

    def __init__(self):
        self.epochs: dict[int, dict[str, float]] = {}

    def on_validation_end(self, trainer, pl_module):
        # Lightning runs this before the ModelCheckpoints, which then save it with the epoch's checkpoints.
        if not trainer.sanity_checking:
            self.epochs[trainer.current_epoch] = {k: float(v) for k, v in trainer.callback_metrics.items()
                                                  if k.startswith("val/")}

    def state_dict(self) -> dict:
        return {"epochs": self.epochs}

    def load_state_dict(self, state_dict: dict) -> None:
        self.epochs = dict(state_dict["epochs"])
