"""The files of a training run's folder, named once for the code that writes them and the code that reads them.

    outputs/DATE/TIME/ (or multirun/DATE/TIME/N/)
        checkpoints/last.ckpt, checkpoints/best-*.ckpt
        metrics.csv, training_curves.png, confusion_matrix.png
        resumed.json (a SLURM job started again, gone on from last.ckpt)
"""

from __future__ import annotations

from pathlib import Path

RUN_FOLDERS = ("outputs", "multirun")  # where src.train's runs and sweeps go, relative to the working directory
CHECKPOINTS = "checkpoints"
LAST = "last"  # ModelCheckpoint's filename for last.ckpt
LAST_CKPT = f"{LAST}.ckpt"
BEST = "best-epoch{epoch:02d}-val_acc{val/acc:.4f}"  # ModelCheckpoint's filename pattern for the best epoch
METRICS = "metrics.csv"  # Lightning's CSVLogger, one row per logged step
TRAINING_CURVES = "training_curves.png"
CONFUSION_MATRIX = "confusion_matrix.png"
RESUMED = "resumed.json"  # a job of a sweep that SLURM started again: where it went on from (src/slurm_job.py)
FIGURES = (TRAINING_CURVES, CONFUSION_MATRIX)


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def last_checkpoint(run_dir: str | Path) -> Path:
    return checkpoint_dir(run_dir) / LAST_CKPT
