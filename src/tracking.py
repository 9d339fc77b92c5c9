"""Experiment tracking beside metrics.csv: Lightning's TensorBoard and MLflow loggers (`logger=...`).

The CSV logger always runs: metrics.csv feeds the plots and the sweep summary. logger=tensorboard
writes event files into the run folder's tensorboard/ (one run per job, named by its overrides);
logger=mlflow logs to an MLflow store (default: sqlite:///mlruns.db in the working directory).
Both get the whole config as hyperparameters, the per-epoch metrics (from Lightning) and, at the
end, the figures; MLflow also gets the checkpoints. tensorboard and mlflow (the `track` extra) are
imported only when chosen.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from src.config import TrainConfig
from src.errors import UserError, one_line
from src.run_context import RunContext
from src.run_files import CHECKPOINTS, FIGURES

RUN_ID_KEY = "mlflow_run_id"  # in every checkpoint of an MLflow-tracked run, so that resuming continues it


def build_loggers(config: TrainConfig, run_dir: Path, resume_from: dict | None,
                  context: RunContext) -> tuple[list[Logger], list[Callback]]:
    """The CSV logger and those chosen in config.logger, and the callbacks they need."""
    loggers: list[Logger] = [CSVLogger(save_dir=run_dir, name="", version="")]
    callbacks: list[Callback] = []
    if config.logger.tensorboard:
        # The folder below tensorboard/ is the override string, so `tensorboard --logdir multirun/DATE/TIME`
        # names each job by what it swept. default_hp_metric=False: Lightning's call at fit start then
        # writes no HParams entry; TensorBoard keeps only a run's first one, written at the end with the metrics.
        loggers.append(TensorBoardLogger(save_dir=run_dir, name="tensorboard", version=_folder_name(context.override_dirname),
                                         default_hp_metric=False))
    if config.logger.mlflow:
        mlflow_logger = _mlflow_logger(config, run_dir, resume_from, context)
        loggers.append(mlflow_logger)
        callbacks.append(RecordMLflowRun(mlflow_logger))
    return loggers, callbacks


def log_results(loggers: list[Logger], config: TrainConfig, run_dir: Path, metrics: dict[str, float], step: int) -> None:
    """At the end of a run: the config with the final metrics (TensorBoard's HParams tab), the figures,
    and for MLflow the checkpoints. Lightning has already closed the loggers, which reopen on use."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            import numpy as np
            from PIL import Image

            _tensorboard_hparams(logger, config_params(config), list(metrics), step)
            for figure in FIGURES:
                with Image.open(run_dir / figure) as image:
                    pixels = np.asarray(image.convert("RGB"))
                logger.experiment.add_image(Path(figure).stem, pixels, step, dataformats="HWC")
            logger.finalize("success")
        elif isinstance(logger, MLFlowLogger):
            for figure in FIGURES:
                logger.experiment.log_artifact(logger.run_id, str(run_dir / figure))
            # The folder as it ends up; MLFlowLogger(log_model=True) would upload the files of only one
            # ModelCheckpoint (the last to save: best-*, with a validation split), each in a folder of its own.
            logger.experiment.log_artifacts(logger.run_id, str(run_dir / CHECKPOINTS), CHECKPOINTS)
            logger.finalize("success")


def _tensorboard_hparams(logger: TensorBoardLogger, params: dict[str, Any], metric_names: list[str], step: int) -> None:
    """The HParams tab's entry: the config, and the metrics whose last values it shows beside it.

    What TensorBoardLogger.log_hyperparams(params, metrics) writes, less its logging every metric once
    more at `step`: train/ and val/ were last logged a step earlier, and would gain a false point.
    """
    from torch.utils.tensorboard.summary import hparams

    plain = {k: v if v is None or isinstance(v, (bool, int, float, str)) else str(v) for k, v in params.items()}
    writer = logger.experiment._get_file_writer()  # as TensorBoardLogger.log_hyperparams does
    for summary in hparams(plain, dict.fromkeys(metric_names, 0.0)):  # only the names are written
        writer.add_summary(summary, step)


def config_params(config: TrainConfig) -> dict[str, Any]:
    """The config flattened to the keys the command line uses: {"optimizer.lr": 0.001, ...}."""
    def flatten(node: dict, prefix: str = "") -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for key, value in node.items():
            if isinstance(value, dict):
                flat.update(flatten(value, f"{prefix}{key}."))
            else:
                flat[f"{prefix}{key}"] = value
        return flat

    return flatten(dataclasses.asdict(config))


class ConfigMLFlowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger, logging the whole config as params, and able to continue a run.

    Lightning calls log_hyperparams once, at fit start, with the model's and the data module's
    arguments; all of them are in the config (model.hidden, data.batch_size, ...), which is logged
    in their place under the keys the command line uses. MLflow refuses to change a param, so a
    resumed run logs only the keys its run lacks and records the values it changed in a tag.
    """

    def __init__(self, params: dict[str, Any], **kwargs: Any):
        super().__init__(**kwargs)
        self._params = {key: str(value)[:250] for key, value in params.items()}  # MLFlowLogger cuts at 250

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        logged = self.experiment.get_run(self.run_id).data.params
        changed = [f"{key}={value}" for key, value in self._params.items() if logged.get(key, value) != value]
        super().log_hyperparams({key: value for key, value in self._params.items() if key not in logged})
        if changed:
            self.experiment.set_tag(self.run_id, "resumed_with", " ".join(changed))


class RecordMLflowRun(Callback):
    """Write the MLflow run's id into every checkpoint (also the one Ctrl-C saves), so that a run
    resumed from it continues the same MLflow run."""

    def __init__(self, logger: MLFlowLogger):
        self.logger = logger

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if trainer.is_global_zero:
            checkpoint[RUN_ID_KEY] = self.logger.run_id


def _mlflow_logger(config: TrainConfig, run_dir: Path, resume_from: dict | None,
                   context: RunContext) -> ConfigMLFlowLogger:
    from mlflow.exceptions import MlflowException

    _quiet_mlflow()
    uri = config.logger.tracking_uri
    experiment = config.logger.experiment_name or context.entry
    run_id = (resume_from or {}).get(RUN_ID_KEY)
    if rank_zero_only.rank != 0:  # a DDP process other than the first: its logger logs nothing
        return ConfigMLFlowLogger(params={}, experiment_name=experiment, tracking_uri=uri, run_id=run_id)
    client = _open_experiment(uri, experiment)
    if run_id is not None:
        try:
            client.update_run(run_id, status="RUNNING")  # Lightning marked it FAILED when it was interrupted
            client.set_tag(run_id, "resumed_in", str(run_dir.resolve()))
        except MlflowException:
            print(f"note: MLflow run {run_id} of this checkpoint is not in {uri}; starting a new run", file=sys.stderr)
            run_id = None
    tags = {"overrides": " ".join(context.overrides), "run_dir": str(run_dir.resolve())}
    if context.sweep:  # the UI's runs table can group by it; jobs share the experiment already
        tags.update(sweep=str(context.sweep_dir), job=str(context.job_num))
    return ConfigMLFlowLogger(params=config_params(config), experiment_name=experiment, tracking_uri=uri, tags=tags,
                              run_name=" ".join(context.overrides) or str(run_dir), run_id=run_id)


def _open_experiment(uri: str, experiment: str):
    """A client of the store at `uri`, which holds `experiment`; a bad or unreachable store is one line."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    with _store_lock(uri):
        try:
            client = MlflowClient(uri)  # opens the store: a new SQLite file is created and migrated here
        except MlflowException as error:
            raise UserError(f"logger.tracking_uri={uri!r} is not valid: {one_line(error)}") from None
        try:  # here rather than in the logger, which does not expect another job to create it meanwhile
            client.create_experiment(experiment)
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise UserError(f"MLflow at logger.tracking_uri={uri} could not create experiment {experiment!r}: "
                                f"{one_line(error)}") from None
    return client


def _store_lock(uri: str):
    """A lock that the jobs of a sweep on this machine take in turn while opening a SQLite store:
    the first creates its tables, and a second job migrating them at once fails. (Kept in the
    temporary folder, so that no lock file is left beside the store.)"""
    import contextlib
    import hashlib
    import tempfile

    from filelock import FileLock

    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    database = str(Path(uri[len("sqlite:///"):]).resolve())
    name = hashlib.sha256(database.encode()).hexdigest()[:16]
    return FileLock(Path(tempfile.gettempdir()) / f"mlflow-store-{name}.lock")


def _folder_name(overrides: str) -> str:
    """Hydra's override_dirname as one folder name: a path in a value (data.data_dir=/x) must not nest."""
    return overrides.replace("/", "_")[:200]


def _quiet_mlflow() -> None:
    # Creating the SQLite store logs every schema migration (alembic) at INFO, which Hydra's root
    # logger would print; a warning or an error still shows.
    for name in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)
