"""What a training run prints, as Keras's fit() prints it: the device and a summary of the layers before
the first epoch, then epochs counted from 1, as a bar on a terminal or one line per epoch elsewhere.

    device: cpu (trainer.accelerator=auto; found: no CUDA or MPS device)
    Model: "MNISTClassifier"
    ...
    Epoch 1/5 - 469/469 - 2.1s - loss: 0.2563 - acc: 0.9259

`progress=auto` (the default) draws Lightning's bar when stdout is a terminal and prints one line per
epoch when it is not (a SLURM job's log, CI, nohup, a pipe into tee), where a bar would be one line of
carriage returns a few thousand characters long. Lightning offers no such mode (its bar "won't fix" it:
Lightning-AI/pytorch-lightning#6647), and Keras leaves the choice to the user (verbose=2), so it is
written here. Only the first process prints, under DDP too.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.model_summary import summarize

LINE_EVERY_S = 60.0  # in the line mode, an epoch that runs longer says how far it got this often
# The epoch's figures in the order and under the names Keras prints them (metrics.csv's names on the left).
FIGURES = {"train/loss": "loss", "train/acc": "acc", "val/loss": "val_loss", "val/acc": "val_acc"}


def progress_callback(mode: str, stdout=None) -> ProgressBar:
    """The bar (`bar`, or `auto` on a terminal) or the epoch lines (`lines`, or `auto` elsewhere)."""
    stdout = stdout or sys.stdout
    if mode == "bar" or (mode == "auto" and stdout.isatty()):
        return KerasProgressBar()
    return EpochLines()


def epoch_of(trainer) -> str:
    """The epoch under way as Keras counts it: `3/5`."""
    return f"{trainer.current_epoch + 1}/{trainer.max_epochs}"


class KerasProgressBar(TQDMProgressBar):
    """One bar per epoch, `Epoch 1/5`, with the epoch's running loss and accuracy, as Keras's fit() shows it.

    The running means are read from the model's metrics only when the bar refreshes (every 20 steps), so
    the training step itself never waits for a device-to-host copy.
    """

    def __init__(self, refresh_rate: int = 20):
        super().__init__(refresh_rate=refresh_rate, leave=True)
        self._unused = False

    def on_train_start(self, *args) -> None:
        super().on_train_start(*args)
        self._unused = True  # the bar just drawn, which the first epoch takes

    def on_train_epoch_start(self, trainer, *args) -> None:
        # TQDMProgressBar's, but for the description it would first draw as `Epoch 0`, and for the first epoch,
        # which goes on the bar drawn at the start (Lightning's left a bar `Training: 0/?` standing above it)
        if self._leave and not self._unused:
            self.train_progress_bar = self.init_train_tqdm()
        self._unused = False
        self.train_progress_bar.reset(total=convert_inf(self.total_train_batches))
        self.train_progress_bar.initial = 0
        self.train_progress_bar.set_description(f"Epoch {epoch_of(trainer)}")

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        if trainer.training:
            metrics.update({k: f"{v:.4f}" for k, v in pl_module.running_metrics("train").items()})
        return metrics


class EpochLines(ProgressBar):
    """Keras's fit(verbose=2): one line per epoch with its steps, seconds and figures, and nothing for
    validation and testing. An epoch that runs longer than `every_s` also prints how far it got, about that
    often, so that `tail -f` on a job's log shows it alive; that line reads no device value.

    The figures are the ones the loggers get at the epoch's end (averaged over the processes under DDP),
    so they are metrics.csv's: `self.figures`, a Logger that train() adds beside the others, receives them.
    """

    def __init__(self, every_s: float = LINE_EVERY_S, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.every_s, self.clock = every_s, clock
        self.figures = _EpochFigures(self)
        self._enabled = True  # ProgressBar.setup() disables it on every process but the first
        self._started = self._said = 0.0
        self._val: dict[str, float] = {}

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    @property
    def is_disabled(self) -> bool:
        return not self.is_enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer, pl_module) -> None:
        # A run resumed in the middle of an epoch goes on with it without on_train_epoch_start.
        self._started = self._said = self.clock()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._started = self._said = self.clock()
        self._val = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = self.clock()
        if self.is_enabled and now - self._said >= self.every_s:
            self._said = now
            done, total = self._steps(trainer)
            left = (now - self._started) / max(batch_idx + 1, 1) * (total - done)
            self._print(f"Epoch {epoch_of(trainer)} - {done}/{total} - {now - self._started:.0f}s - ETA: {left:.0f}s")

    def _steps(self, trainer) -> tuple[int, int]:
        """Steps of this epoch done, and in all (a resumed epoch counts the steps trained before it stopped)."""
        total = trainer.num_training_batches
        return trainer.global_step - trainer.current_epoch * total, total

    def epoch_ended(self, metrics: dict[str, float]) -> None:
        """The loggers got the epoch's figures: validation's first, then, once the epoch is done, training's."""
        if not any(key in metrics for key in FIGURES):
            return
        if "train/loss" not in metrics:  # validation comes before the training figures of its epoch
            self._val = metrics
            return
        if self._trainer is None or not self.is_enabled:
            return
        done, total = self._steps(self.trainer)
        figures = {**metrics, **self._val}
        said = " - ".join(f"{name}: {figures[key]:.4f}" for key, name in FIGURES.items() if key in figures)
        self._print(f"Epoch {epoch_of(self.trainer)} - {done}/{total} - {self.clock() - self._started:.1f}s - {said}")

    @staticmethod
    def _print(line: str) -> None:
        print(line, flush=True)  # flushed: a job's log shows each line as it comes


class _EpochFigures(Logger):
    """The epoch's figures as the loggers get them (on the first process only), for EpochLines."""

    def __init__(self, lines: EpochLines):
        super().__init__()
        self._lines = lines

    @property
    def name(self) -> str:
        return "console"

    @property
    def version(self) -> str:
        return ""

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._lines.epoch_ended(metrics)

    def log_hyperparams(self, params: Any, *args, **kwargs) -> None:
        pass


class RunHeader(L.Callback):
    """Before the first epoch, on the first process: the device the run uses, and the network's layers with
    their output shapes and parameter counts, as Keras's model.summary() lists them.

    Lightning's own model summary lists every submodule, the metric objects among them, and its FLOPs
    column is zeros without an example input; the layers and the totals come from it (with the module's
    example_input_array, which gives the real output shapes and FLOPs), the table is Keras's.
    """

    def __init__(self, accelerator: str):
        self.accelerator = accelerator  # as configured: auto, cpu, gpu, ...

    def on_fit_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        print(device_line(trainer, self.accelerator))
        if srun_note := _srun_note(trainer):
            print(srun_note)
        # The summary runs the example input through the network; a compiled one runs it as written, so
        # that the first training step is the one that compiles.
        with torch.compiler.set_stance("force_eager"):
            print(model_summary(pl_module), flush=True)


def device_line(trainer, accelerator: str) -> str:
    """What trainer.accelerator picked and what this machine has: `device: cuda:0, NVIDIA H200 (...)`."""
    device = trainer.strategy.root_device
    name = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    found = [f"{cuda} CUDA device{'s' * (cuda != 1)}"] * bool(cuda) + ["MPS"] * torch.backends.mps.is_available()
    unused = ", not used" if found and device.type == "cpu" else ""
    where = f"device: {device.type if device.type == 'mps' else device}{name}"
    if trainer.world_size > 1:
        nodes = f"{trainer.num_nodes} node{'s' * (trainer.num_nodes != 1)}"
        where = f"devices: {trainer.world_size} processes on {device.type}{name}, {nodes} x {trainer.num_devices}"
    return f"{where} (trainer.accelerator={accelerator}; found: {', '.join(found) or 'no CUDA or MPS device'}{unused})"


def _srun_note(trainer) -> str | None:
    """Lightning warns on every run, on any machine where SLURM is installed, that srun "is available but
    not used"; that warning is silenced (src/train.py) and said here once, only where it matters: a run of
    several processes that SLURM did not start, which runs them on this machine alone."""
    import os
    import shutil

    if trainer.world_size == 1 or "SLURM_NTASKS" in os.environ or shutil.which("srun") is None:
        return None
    return (f"note: SLURM is installed here, but these {trainer.world_size} processes were started on this machine, "
            "not by SLURM; to train on the cluster's nodes, use hydra/launcher=slurm")


def model_summary(pl_module) -> str:
    """The network's layers (not the metric objects), their output shapes and parameter counts, as Keras's
    model.summary() prints them, and the forward FLOPs of one image where an example input measured them."""
    summary = summarize(pl_module, max_depth=-1)
    modules = dict(pl_module.named_modules())
    rows = [(name, kind, out, params) for name, kind, out, params in
            zip(summary.layer_names, summary.layer_types, summary.out_sizes, summary.param_nums)
            if name.startswith("net.") and not list(modules[name].children())]
    params = sum(p.numel() for p in pl_module.net.parameters())
    trainable = sum(p.numel() for p in pl_module.net.parameters() if p.requires_grad)
    size = sum(p.numel() * p.element_size() for p in pl_module.net.parameters())
    width, rule = (29, 26, 12), "_" * 67

    def shape(out) -> str:
        return "(None, " + ", ".join(map(str, out[1:])) + ")" if isinstance(out, list) else "?"

    lines = [f'Model: "{type(pl_module).__name__}"', rule,
             " " + "Layer (type)".ljust(width[0]) + "Output Shape".ljust(width[1]) + "Param #".rjust(width[2]), "=" * 67]
    lines += [" " + f"{name} ({kind})".ljust(width[0]) + shape(out).ljust(width[1]) + f"{n:,}".rjust(width[2])
              for name, kind, out, n in rows]
    lines += ["=" * 67, f"Total params: {params:,} ({size / 2**20:.2f} MiB)", f"Trainable params: {trainable:,}",
              f"Non-trainable params: {params - trainable:,}"]
    if summary.total_flops:
        batch = pl_module.example_input_array.shape[0]
        lines.append(f"Forward FLOPs per image: {summary.total_flops // batch:,}")
    return "\n".join([*lines, rule])
