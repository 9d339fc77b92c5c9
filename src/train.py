"""Train, test and save the Keras MNIST model: `python -m src.train [key=value ...]`.

Everything the run writes goes into its Hydra run folder: .hydra/ (the composed config),
checkpoints/last.ckpt, metrics.csv, training_curves.png and confusion_matrix.png (and with
logger=tensorboard, tensorboard/; logger=mlflow logs to MLflow's store: src/tracking.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

from omegaconf import DictConfig

from src import run_files, slurm_job
from src.checkpoint import check_architecture, check_optimizer, load_checkpoint
from src.cli import entry_point
from src.config import TrainConfig, sweep_metric, tested_checkpoint, validated
from src.errors import UserError
from src.extras import require
from src.run_context import RunContext


def train(cfg: DictConfig, run_dir: str | Path, callbacks: tuple = (), context: RunContext | None = None) -> float:
    """Fit and test as configured, plus any extra Lightning `callbacks`; return the metric a sweep optimises.

    `context` is where the run stands (a job of a sweep, a trial of the search); None: a plain run.
    """
    config: TrainConfig = validated(cfg)  # checks every key and value before anything starts
    context = context or RunContext()
    _refuse_ddp_in_a_local_sweep(config, context)
    _require_loggers(config)
    run_dir = Path(run_dir)
    restarted = slurm_job.going_on(config, run_dir, context)  # a SLURM job started again: from its last.ckpt
    going_on, config = restarted is not config, restarted
    resume_from = load_checkpoint(config.ckpt_path) if config.ckpt_path is not None else None
    if resume_from is not None:
        check_optimizer(resume_from, config.ckpt_path, config.optimizer.name)

    # Imported after the checks above, so that bad input fails in a fraction of a second.
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from src import plots, tracking
    from src.callbacks import AtomicCheckpointIO, CheckpointOnInterrupt, CompileTime, KerasEpochCheckpoint, ValidationRecord
    from src.console import EpochLines, RunHeader, progress_callback
    from src.data import MNISTDataModule
    from src.idx import DATASET_CLASSES
    from src.model import MNISTClassifier

    _quiet_lightning()
    slurm_job.say_where()
    if going_on:
        slurm_job.record_going_on(run_dir, resume_from, first_process=os.environ.get("SLURM_PROCID", "0") == "0")
    L.seed_everything(config.seed, verbose=False)
    has_val = config.data.val_size > 0
    datamodule = MNISTDataModule(seed=config.seed, **dataclasses.asdict(config.data))
    optimizer = dataclasses.asdict(config.optimizer)
    model = MNISTClassifier(hidden=config.model.hidden, optimizer=optimizer.pop("name"), **optimizer)
    if resume_from is not None:
        check_architecture(resume_from, config.ckpt_path, model)

    checkpoint_dir = run_files.checkpoint_dir(run_dir)
    # last.ckpt after every epoch. (save_last=True would only refresh it when a top-k checkpoint is saved.)
    # With a validation split the best checkpoint comes first: it saves first, so that last.ckpt holds its
    # record of the same epoch (not the epoch before), which a run resumed in the same folder goes on from.
    last = ModelCheckpoint(dirpath=checkpoint_dir, filename=run_files.LAST, enable_version_counter=False)
    best = KerasEpochCheckpoint(dirpath=checkpoint_dir, monitor="val/acc", mode="max",
                           filename=run_files.BEST, auto_insert_metric_name=False)
    checkpoints = [best, last] if has_val else [last]
    record = ValidationRecord()
    early_stopping = config.early_stopping
    stopper = EarlyStopping(monitor="val/acc", mode="max", patience=early_stopping.patience,
                            min_delta=early_stopping.min_delta) if early_stopping.enabled else None
    loggers, logger_callbacks = tracking.build_loggers(config, run_dir, resume_from, context)  # metrics.csv, logger=...
    # A bar, or one line per epoch (whose figures come to it as to the loggers); nothing with enable_progress_bar=false.
    progress = progress_callback(config.progress) if config.trainer.enable_progress_bar else None
    if isinstance(progress, EpochLines):
        loggers.append(progress.figures)
    trainer_args = config.trainer.lightning_arguments()
    if trainer_args["strategy"] == "ddp":  # Lightning's DDPStrategy, whose processes meet within the bound
        from src.rendezvous import BoundedRendezvousDDP

        trainer_args["strategy"] = BoundedRendezvousDDP(config.trainer.rendezvous_timeout_s)
    limit_val_batches = trainer_args.pop("limit_val_batches", 1.0) if has_val else 0
    trainer = L.Trainer(
        **trainer_args,
        default_root_dir=run_dir,
        logger=loggers,
        callbacks=[RunHeader(config.trainer.accelerator), *checkpoints, record, *([stopper] if stopper else []),
                   CheckpointOnInterrupt(checkpoint_dir, context), *logger_callbacks, *callbacks]
        + ([CompileTime()] if config.model.compile else [])
        + ([progress] if progress else []),
        enable_model_summary=False,  # RunHeader prints the layers as Keras's model.summary() does
        plugins=[AtomicCheckpointIO()],
        limit_val_batches=limit_val_batches,
        num_sanity_val_steps=0,
    )
    if config.model.compile:
        _compile_in_place(model.net, trainer.strategy.root_device)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=config.ckpt_path, weights_only=True)
    except SIGTERMException:
        sys.exit(1)  # CheckpointOnInterrupt saved the state and said how to resume, as for Ctrl-C
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}  # test() replaces them
    # Read before test(), which gives the callbacks the state they had in the checkpoint it loads.
    stopped = stopper is not None and stopper.stopped_epoch + 1 == trainer.current_epoch < config.trainer.max_epochs
    waited = stopper.wait_count if stopper is not None else 0
    # What ckpt_path="best" resolves to, named here: with two ModelCheckpoints Lightning would warn.
    # None (the weights in memory) without a validation split, or when no epoch was validated (fast_dev_run).
    tested = best.best_model_path if tested_checkpoint(config) == "best" and best.best_model_path else None
    test = trainer.test(model, datamodule=datamodule, ckpt_path=tested, weights_only=True, verbose=False)[0]
    metrics.update(test)
    if not trainer.is_global_zero:
        return float("nan")

    note = ""
    if tested is not None:
        best_epoch = load_checkpoint(tested)["epoch"]
        metrics.update(record.epochs.get(best_epoch, {}))  # the validation figures of the weights tested
        note = f" (best epoch {best_epoch + 1} of {trainer.current_epoch})"
    if stopped:
        print(f"early stopping: val/acc did not rise by more than {early_stopping.min_delta} for {waited} "
              f"epoch{'s' * (waited != 1)}, so training stopped after epoch {trainer.current_epoch} "
              f"of {config.trainer.max_epochs}")
    print(f"test_loss: {test['test/loss']:.4f} test_acc: {test['test/acc']:.4f}{note}")
    plots.training_curves(run_dir / run_files.METRICS, run_dir / run_files.TRAINING_CURVES)
    plots.confusion_matrix(model.test_confusion, DATASET_CLASSES[config.data.name].classes,
                           run_dir / run_files.CONFUSION_MATRIX)
    tracking.log_results(trainer.loggers, config, run_dir, metrics, trainer.global_step)
    return metrics[sweep_metric(config)]


def _compile_in_place(net, device) -> None:
    """model.compile=true. nn.Module.compile() compiles in place, so the state dict keeps its keys and
    predict, the page and export load the checkpoint unchanged (torch.compile(net) assigned back would
    put `_orig_mod.` into every key)."""
    if device.type == "cpu":
        compiler = os.environ.get("CXX", "g++")  # the compiler torch's inductor builds CPU kernels with
        if shutil.which(compiler) is None:
            raise UserError(f"model.compile=true is not valid on this machine: compiling for the CPU needs a C++ "
                            f"compiler, and {compiler} was not found; install g++ (or set CXX), or leave model.compile "
                            "out")
    # dynamic=True: one graph for every batch size (the last, shorter batch of an epoch, the test's)
    # instead of a recompile at the first batch of another size.
    net.compile(dynamic=True)


def _require_loggers(config: TrainConfig) -> None:
    """logger=tensorboard or logger=mlflow without the package: one line naming the extra."""
    for name in ("tensorboard", "mlflow"):
        if getattr(config.logger, name):
            require("track", f"logger={name}", name)


def _refuse_ddp_in_a_local_sweep(config: TrainConfig, context: RunContext) -> None:
    """Lightning starts DDP's other processes by running the command line again: inside a
    local -m sweep that would start the whole sweep again. SLURM starts them itself."""
    if context.sweep and config.trainer.strategy.startswith("ddp") and config.trainer.devices != 1 \
            and "SLURM_NTASKS" not in os.environ:
        raise UserError(f"trainer.strategy={config.trainer.strategy} with several devices is not valid in a -m sweep "
                        "on this machine: use hydra/launcher=slurm, or run it without -m")


# Lightning's lines that the console says otherwise (src/console.py's device line), or that say nothing:
# advertising, the normal end of training, and that a validation split is validated whole.
_UNSAID = ("💡 Tip", "GPU available: ", "TPU available: ", "`Trainer.fit` stopped: `max_epochs=",
           "`Trainer(limit_val_batches=1.0)` was configured")


def _quiet_lightning() -> None:
    # Lightning adds its own console handler; under Hydra the root logger already prints (and
    # writes train.log), so without this every Lightning message would appear twice.
    logging.getLogger("lightning").handlers.clear()
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not str(record.msg).startswith(_UNSAID))
    # On every machine where SLURM is installed: said once, where it matters, by src/console.py.
    warnings.filterwarnings("ignore", message="The `srun` command is available on your system but is not used")
    # Lightning's summary sizes mixed precision's weights; RunHeader's summary counts their bytes itself.
    warnings.filterwarnings("ignore", message="Precision .* is not supported by the model summary")
    # The run folder already holds .hydra/ and train.log; the CSV logger only replaces its own metrics.csv.
    warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
    # The training batches resume mid-epoch from the step count (src/data.py), without loader state.
    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable")
    # Metrics are logged once per epoch, never per step, so the logging interval does not matter.
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)")


@entry_point("train")
def main(cfg: DictConfig, context: RunContext) -> float:
    return train(cfg, context.output_dir, context=context)


if __name__ == "__main__":
    main()
