"""Experiment tracking beside metrics.csv: Lightning's TensorBoard and MLflow loggers (`logger=...`).

The CSV logger always runs: metrics.csv feeds the plots and the sweep summary. logger=tensorboard
writes event files into the run folder's tensorboard/ (one run per job, named by its overrides);
logger=mlflow logs to an MLflow store (default: sqlite:///mlruns.db in the working directory).
Both get the whole config as hyperparameters, the per-epoch metrics (from Lightning) and, at the
end, the figures; MLflow also gets the checkpoints. tensorboard and mlflow (the `track` extra) are
imported only when chosen.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import sys
import threading
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch import Callback
from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from src.atomic import writing, written_whole
from src.config import TrainConfig
from src.errors import CannotWrite, UserError, one_line
from src.run_context import RunContext
from src.run_files import CHECKPOINTS, FIGURES

RUN_ID_KEY = "mlflow_run_id"  # in every checkpoint of an MLflow-tracked run, so that resuming continues it


def build_loggers(config: TrainConfig, run_dir: Path, resume_from: dict | None,
                  context: RunContext) -> tuple[list[Logger], list[Callback]]:
    """The CSV logger and those chosen in config.logger, and the callbacks they need."""
    # A run resumed in its own folder (a SLURM job started again, say) keeps metrics.csv's rows from before.
    checkpoint = Path(config.ckpt_path).resolve() if resume_from is not None and config.ckpt_path else None
    same_folder = checkpoint is not None and checkpoint.parent == (Path(run_dir) / CHECKPOINTS).resolve()
    loggers: list[Logger] = [WholeFileCSVLogger(save_dir=run_dir, name="", version="",
                                                rows_before_step=resume_from["global_step"] if same_folder else None)]
    callbacks: list[Callback] = []
    if config.logger.tensorboard:
        # The folder below tensorboard/ is the override string, so `tensorboard --logdir multirun/DATE/TIME`
        # names each job by what it swept. default_hp_metric=False: Lightning's call at fit start then
        # writes no HParams entry; TensorBoard keeps only a run's first one, written at the end with the metrics.
        loggers.append(NamedTensorBoardLogger(save_dir=run_dir, name="tensorboard",
                                              version=_folder_name(context.override_dirname), default_hp_metric=False))
    if config.logger.mlflow:
        mlflow_logger = _mlflow_logger(config, run_dir, resume_from, context)
        loggers.append(mlflow_logger)
        callbacks.append(RecordMLflowRun(mlflow_logger))
    return loggers, callbacks


def log_results(loggers: list[Logger], config: TrainConfig, run_dir: Path, metrics: dict[str, float], step: int) -> None:
    """At the end of a run: the config with the final metrics (TensorBoard's HParams tab), the figures,
    and for MLflow the checkpoints. Lightning has already closed the loggers, which reopen on use."""
    for logger in loggers:
        if isinstance(logger, NamedTensorBoardLogger):
            import numpy as np
            from PIL import Image

            with writing(logger.files):
                _tensorboard_hparams(logger, config_params(config), list(metrics), step)
                for figure in FIGURES:
                    with Image.open(run_dir / figure) as image:
                        pixels = np.asarray(image.convert("RGB"))
                    logger.experiment.add_image(Path(figure).stem, pixels, step, dataformats="HWC")
            logger.finalize("success")
        elif isinstance(logger, MLFlowLogger):
            with writing(logger.experiment.get_run(logger.run_id).info.artifact_uri.removeprefix("file://")):
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


class NamesItsFiles:
    """For a Lightning logger: a write that fails (a full disk, a vanished folder) ends the run with one
    line naming the logger's files (`files`) and the cause, instead of the library's traceback.

    Lightning calls its loggers from inside training and re-raises what they raise after its own
    clean-up, which finalizes every logger as "failed". On a full disk that finalize fails too: its
    failure is left unsaid, so that the run stops with the error that stopped it.
    """

    files: str

    @property
    def experiment(self):
        with writing(self.files):
            return super().experiment

    def log_hyperparams(self, *args, **kwargs) -> None:
        with writing(self.files):
            super().log_hyperparams(*args, **kwargs)

    def log_metrics(self, *args, **kwargs) -> None:
        with writing(self.files):
            super().log_metrics(*args, **kwargs)

    def save(self) -> None:
        with writing(self.files):
            super().save()

    def finalize(self, status: str) -> None:
        try:
            with writing(self.files):
                super().finalize(status)
        except CannotWrite:
            if status != "failed":
                raise


class WholeFileCSVLogger(NamesItsFiles, CSVLogger):
    """Lightning's CSVLogger, whose metrics.csv and hparams.yaml are each replaced whole (src/atomic.py).

    Lightning appends rows to metrics.csv and rewrites it in place whenever a column appears (val/,
    then test/): on a full disk that leaves the file cut short, the earlier epochs lost with it. And it
    deletes a metrics.csv it finds; with `rows_before_step`, the rows logged before that step are kept.
    """

    def __init__(self, *args: Any, rows_before_step: int | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.rows_before_step = rows_before_step

    @property
    def files(self) -> str:
        return self.log_dir

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            with writing(self.log_dir):
                self._fs.makedirs(self.root_dir, exist_ok=True)
                self._experiment = WholeFileWriter(log_dir=self.log_dir, rows_before_step=self.rows_before_step)
        return self._experiment


class WholeFileWriter(ExperimentWriter):
    """CSVLogger's writer: every save writes the whole metrics.csv to a temporary file and renames it."""

    def __init__(self, log_dir: str, rows_before_step: int | None = None):
        kept = _rows_before(Path(log_dir) / self.NAME_METRICS_FILE, rows_before_step)
        super().__init__(log_dir)  # which deletes metrics.csv
        self.saved: list[dict] = kept  # the rows in metrics.csv: a few per epoch
        self.metrics_keys = sorted({key for row in kept for key in row})

    def log_hparams(self, params: dict[str, Any]) -> None:
        self.hparams.update(params)
        path = Path(self.log_dir) / self.NAME_HPARAMS_FILE
        with written_whole(path) as partial:
            save_hparams_to_yaml(partial, self.hparams)

    def save(self) -> None:
        if not self.metrics:
            return
        self._record_new_keys()
        rows, path = self.saved + self.metrics, Path(self.metrics_file_path)
        with written_whole(path) as partial, open(partial, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)
        self.saved, self.metrics = rows, []


def _rows_before(metrics_csv: Path, step: int | None) -> list[dict]:
    """The rows of metrics.csv logged before `step` (None, or no file: none)."""
    if step is None or not metrics_csv.is_file():
        return []
    with open(metrics_csv, newline="") as f:
        return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f) if int(row["step"]) < step]


class NamedTensorBoardLogger(NamesItsFiles, TensorBoardLogger):
    """Lightning's TensorBoardLogger, naming its folder when its event file cannot be written.

    TensorBoard appends each event to the file from a thread of its own. On an OSError (a full disk)
    that thread keeps it, to be raised again in the training's thread at the next event or flush, where
    it is reported; then the thread ends by raising it itself, and Python would print its traceback.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        _quiet_event_writer_thread()

    @property
    def files(self) -> str:
        return str(Path(self.log_dir))


def _quiet_event_writer_thread() -> None:
    """Python's report of an exception that ends a thread, less TensorBoard's writer thread's OSError."""
    from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread

    report = threading.excepthook
    if getattr(report, "quiet_event_writer", False):
        return

    def quiet(args) -> None:
        if not (isinstance(args.thread, _AsyncWriterThread) and isinstance(args.exc_value, OSError)):
            report(args)

    quiet.quiet_event_writer = True
    threading.excepthook = quiet


class ConfigMLFlowLogger(NamesItsFiles, MLFlowLogger):
    """Lightning's MLFlowLogger, logging the whole config as params, and able to continue a run.

    Lightning calls log_hyperparams once, at fit start, with the model's and the data module's
    arguments; all of them are in the config (model.hidden, data.batch_size, ...), which is logged
    in their place under the keys the command line uses. MLflow refuses to change a param, so a
    resumed run logs only the keys its run lacks and records the values it changed in a tag.
    """

    def __init__(self, params: dict[str, Any], **kwargs: Any):
        super().__init__(**kwargs)
        self._params = {key: str(value)[:250] for key, value in params.items()}  # MLFlowLogger cuts at 250
        self.files = store_name(self._tracking_uri)

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        with writing(self.files):
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
            with writing(store_name(uri)):
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
            with writing(store_name(uri)):
                client = MlflowClient(uri)  # opens the store: a new SQLite file is created and migrated here
        except MlflowException as error:
            raise UserError(f"logger.tracking_uri={uri!r} is not valid: {one_line(error)}") from None
        try:  # here rather than in the logger, which does not expect another job to create it meanwhile
            with writing(store_name(uri)):
                client.create_experiment(experiment)
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise UserError(f"MLflow at logger.tracking_uri={uri} could not create experiment {experiment!r}: "
                                f"{one_line(error)}") from None
    return client


def store_name(uri: str) -> str:
    """The store as a failed write names it: the SQLite file, else the URI."""
    return str(Path(uri.removeprefix("sqlite:///")).resolve()) if uri.startswith("sqlite:///") else uri


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
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # The same module also logs, with its traceback, every SQLite error that MLflow then raises (a full
    # disk: "database or disk is full"); the run reports that error in one line.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
