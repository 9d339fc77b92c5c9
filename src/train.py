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

import hydra
from omegaconf import DictConfig

from src.checkpoint import check_architecture, load_checkpoint
from src.config import TrainConfig, UserError, exit_on_user_error, run_hydra, sweep_metric, validated
from src.extras import require


def train(cfg: DictConfig, run_dir: str | Path, callbacks: tuple = ()) -> float:
    """Fit and test as configured, plus any extra Lightning `callbacks`; return the metric a sweep optimises."""
    config: TrainConfig = validated(cfg)  # checks every key and value before anything starts
    _refuse_ddp_in_a_local_sweep(config)
    _require_loggers(config)
    resume_from = load_checkpoint(config.ckpt_path) if config.ckpt_path is not None else None

    # Imported after the checks above, so that bad input fails in a fraction of a second.
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from src import plots, tracking
    from src.callbacks import AtomicCheckpointIO, CheckpointOnInterrupt, CompileTime, KerasProgressBar
    from src.data import MNISTDataModule
    from src.idx import DATASET_CLASSES
    from src.model import MNISTClassifier

    _quiet_lightning()
    run_dir = Path(run_dir)
    L.seed_everything(config.seed, verbose=False)
    has_val = config.data.val_size > 0
    datamodule = MNISTDataModule(seed=config.seed, **dataclasses.asdict(config.data))
    optimizer = dataclasses.asdict(config.optimizer)
    model = MNISTClassifier(hidden=config.model.hidden, optimizer=optimizer.pop("name"), **optimizer)
    if resume_from is not None:
        check_architecture(resume_from, config.ckpt_path, model)

    checkpoint_dir = run_dir / "checkpoints"
    # last.ckpt after every epoch. (save_last=True would only refresh it when a top-k checkpoint is saved.)
    checkpoints = [ModelCheckpoint(dirpath=checkpoint_dir, filename="last", enable_version_counter=False)]
    if has_val:
        checkpoints.append(ModelCheckpoint(dirpath=checkpoint_dir, monitor="val/acc", mode="max",
                                           filename="best-epoch{epoch:02d}-val_acc{val/acc:.4f}",
                                           auto_insert_metric_name=False))
    loggers, logger_callbacks = tracking.build_loggers(config, run_dir, resume_from)  # metrics.csv, and logger=...
    trainer_args = {k: v for k, v in dataclasses.asdict(config.trainer).items() if v is not None}
    limit_val_batches = trainer_args.pop("limit_val_batches", 1.0) if has_val else 0
    trainer = L.Trainer(
        **trainer_args,
        default_root_dir=run_dir,
        logger=loggers,
        callbacks=[*checkpoints, CheckpointOnInterrupt(checkpoint_dir), *logger_callbacks, *callbacks]
        + ([CompileTime()] if config.model.compile else [])
        + ([KerasProgressBar()] if config.trainer.enable_progress_bar else []),
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
    test = trainer.test(model, datamodule=datamodule, verbose=False)[0]
    metrics.update(test)
    if not trainer.is_global_zero:
        return float("nan")

    print(f"test_loss: {test['test/loss']:.4f} test_acc: {test['test/acc']:.4f}")
    plots.training_curves(run_dir / "metrics.csv", run_dir / "training_curves.png")
    plots.confusion_matrix(model.test_confusion, DATASET_CLASSES[config.data.name].classes,
                           run_dir / "confusion_matrix.png")
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


def _refuse_ddp_in_a_local_sweep(config: TrainConfig) -> None:
    """Lightning starts DDP's other processes by running the command line again: inside a
    local -m sweep that would start the whole sweep again. SLURM starts them itself."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if multirun and config.trainer.strategy.startswith("ddp") and config.trainer.devices != 1 \
            and "SLURM_NTASKS" not in os.environ:
        raise UserError(f"trainer.strategy={config.trainer.strategy} with several devices is not valid in a -m sweep "
                        "on this machine: use hydra/launcher=slurm, or run it without -m")


def _quiet_lightning() -> None:
    # Lightning adds its own console handler; under Hydra the root logger already prints (and
    # writes train.log), so without this every Lightning message would appear twice.
    logging.getLogger("lightning").handlers.clear()
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not str(record.msg).startswith("💡 Tip"))  # advertising, not information
    # The run folder already holds .hydra/ and train.log; the CSV logger only replaces its own metrics.csv.
    warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
    # The training batches resume mid-epoch from the step count (src/data.py), without loader state.
    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable")
    # Metrics are logged once per epoch, never per step, so the logging interval does not matter.
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)")


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    return train(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    run_hydra(main)
