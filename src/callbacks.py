"""Lightning extensions the training run uses: a Keras-like progress bar, a checkpoint on
Ctrl-C/SIGTERM, and checkpoint files that are never left half-written."""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException


class KerasProgressBar(TQDMProgressBar):
    """One bar per epoch showing the epoch's running loss and accuracy, as Keras's fit() does.

    The running means are read from the model's metrics only when the bar refreshes, so the
    training step itself never waits for a device-to-host copy.
    """

    def __init__(self, refresh_rate: int = 20):
        super().__init__(refresh_rate=refresh_rate, leave=True)

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        if trainer.training:
            metrics.update({k: f"{v:.4f}" for k, v in pl_module.running_metrics("train").items()})
        return metrics


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file beside it, then rename it into place.

    Lightning's own save goes through a temporary file in the system's temp folder and a
    move, which is a copy (not atomic) when that folder is on another file system; a process
    killed while saving must leave the previous last.ckpt whole.
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a checkpoint gets the usual permissions
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path, map_location=None, weights_only=True):
        # Checkpoints may come from anywhere: never unpickle arbitrary objects.
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


class CheckpointOnInterrupt(L.Callback):
    """On Ctrl-C or SIGTERM, save the latest state as last.ckpt and say how to resume."""

    def __init__(self, dirpath: str | Path):
        self.path = Path(dirpath) / "last.ckpt"

    def on_exception(self, trainer, pl_module, exception):
        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)) or not trainer.training:
            return
        trainer.save_checkpoint(self.path)
        if trainer.is_global_zero:
            resume = shlex.join([sys.executable, "-m", "src.train", *sys.argv[1:], f"ckpt_path={self.path}"])
            print(f"\nInterrupted in epoch {trainer.current_epoch}; saved {self.path}\nResume with: {resume}",
                  file=sys.stderr, flush=True)
