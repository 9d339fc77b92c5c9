"""Faults of the machine while writing: a full disk, a folder that cannot be made.

Every writer fails for real: on a small tmpfs filled up at the chosen moment, or under a regular file.
Each failure must be one line naming the file and the cause (in-process: the CannotWrite's message;
a real process: its last line on stderr and exit status 1, no traceback), and leave the last good
file whole and usable. Mounting needs root; where it is refused the test is skipped (failed under CI).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from src.errors import CannotWrite
from src.train import train
from tests.conftest import (compose_config, compose_train, entry_env, needs, needs_extra, start_paused,
                            wait_for)
from tests.test_reliability import interrupt_at_step

FULL = "No space left on device"
TINY = ("trainer.max_epochs=2", "data.batch_size=64", "model.hidden=16", "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false", "seed=3")  # 600 images: 10 steps an epoch


@contextlib.contextmanager
def mounted(folder: Path):
    """A 16 MB tmpfs on `folder` (an existing, empty folder), unmounted when the block ends."""
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)], capture_output=True,
                            text=True)
    needs(result.returncode == 0, f"cannot mount a tmpfs (as root it works): {result.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)  # lazy: a logger may still hold a file open


@pytest.fixture
def disk(tmp_path) -> Path:
    """An empty small disk of its own."""
    folder = tmp_path / "disk"
    folder.mkdir()
    with mounted(folder):
        yield folder


def fill(disk: Path) -> None:
    """Take every free block of the tmpfs."""
    assert os.path.ismount(disk), f"{disk} is not the small disk"  # never fill a real one
    with open(disk / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(bytes(1 << 16))
        except OSError as error:
            assert error.errno == errno.ENOSPC


def empty(disk: Path) -> None:
    (disk / "filler").unlink()


class FillAtEpoch(L.Callback):
    """Fills the disk as epoch `epoch` (from 0) starts, after the previous epoch's files were written, and
    keeps last.ckpt's bytes as they were then."""

    def __init__(self, disk: Path, checkpoint: Path, epoch: int = 1):
        self.disk, self.checkpoint, self.epoch, self.kept = disk, checkpoint, epoch, None

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            self.kept = self.checkpoint.read_bytes() if self.checkpoint.exists() else None
            fill(self.disk)


@pytest.mark.slow
def test_full_disk_at_a_checkpoint_keeps_the_last_good_one_which_resumes(tiny_data, tmp_path, disk):
    last = disk / "run" / "checkpoints" / "last.ckpt"
    filler = FillAtEpoch(disk, last)
    with pytest.raises(CannotWrite) as failed:
        train(compose_train(f"data.data_dir={tiny_data}", *TINY), disk / "run", callbacks=(filler,))
    assert str(failed.value) == f"cannot write {last}: {FULL}"
    assert last.read_bytes() == filler.kept  # epoch 1's, whole
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # no temporary file left
    train(compose_train(f"data.data_dir={tiny_data}", *TINY, f"ckpt_path={last}"), tmp_path / "resumed")
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert (resumed["epoch"], resumed["global_step"]) == (1, 20)  # epoch 2 trained on top of epoch 1


def test_full_disk_at_the_interrupt_save_keeps_the_last_good_checkpoint(tiny_data, disk, monkeypatch, capsys):
    last = disk / "run" / "checkpoints" / "last.ckpt"
    filler = FillAtEpoch(disk, last)
    interrupt_at_step(monkeypatch, 14)  # Ctrl-C in epoch 2, after the disk filled up
    with pytest.raises(CannotWrite) as failed:
        train(compose_train(f"data.data_dir={tiny_data}", *TINY), disk / "run", callbacks=(filler,))
    assert str(failed.value) == f"cannot write {last}: {FULL}"
    assert "saved" not in capsys.readouterr().err  # no claim of a checkpoint that is not there
    assert last.read_bytes() == filler.kept
    assert torch.load(last, weights_only=True)["global_step"] == 10


class FillBeforeTheBestSave(L.Callback):
    """Fills the disk as epoch `epoch`'s validation ends: just before the ModelCheckpoints save, which
    Lightning calls after every other callback. Keeps the best checkpoint of the epochs before, and its bytes."""

    def __init__(self, disk: Path, checkpoints: Path, epoch: int = 1):
        self.disk, self.checkpoints, self.epoch = disk, checkpoints, epoch
        self.earlier = self.kept = self.val_acc = None

    def on_validation_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            (self.earlier,) = self.checkpoints.glob("best-*.ckpt")
            self.kept, self.val_acc = self.earlier.read_bytes(), float(trainer.callback_metrics["val/acc"])
            fill(self.disk)


def test_full_disk_at_a_new_best_checkpoint_keeps_the_earlier_best(tiny_data, disk):
    checkpoints = disk / "run" / "checkpoints"
    filler = FillBeforeTheBestSave(disk, checkpoints)
    with pytest.raises(CannotWrite) as failed:
        train(compose_train(f"data.data_dir={tiny_data}", "data.val_size=100", *TINY), disk / "run",
              callbacks=(filler,))
    assert filler.earlier.name.startswith("best-epoch01-")  # epochs counted from 1, as Keras's {epoch}
    new_best = checkpoints / f"best-epoch02-val_acc{filler.val_acc:.4f}.ckpt"  # val/acc rose in epoch 2
    assert str(failed.value) == f"cannot write {new_best}: {FULL}"
    assert filler.earlier.read_bytes() == filler.kept  # whole: Lightning removes it only after the new one is saved
    assert sorted(p.name for p in checkpoints.iterdir()) == [filler.earlier.name, "last.ckpt"]  # no temporary file
    assert torch.load(filler.earlier, weights_only=True)["epoch"] == 0


def train_process(tmp_path: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "src.train", *overrides], cwd=tmp_path, env=entry_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_real_runs_on_a_disk_that_fills_up_or_in_a_folder_that_cannot_be_made_end_with_one_line(
        tiny_data, tmp_path, disk):
    """`python -m src.train` in a folder on the tmpfs, filled up while the first epoch is done and the second not
    begun (the run pauses after writing the first epoch's metrics.csv, the last file of that epoch's end); and one
    whose folder would be under a regular file (both at once: most of their time is importing)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    unmade = train_process(tmp_path, f"hydra.run.dir={blocker / 'run'}")
    filled, paused = start_paused(["-m", "src.train", f"data.data_dir={tiny_data}", "data.batch_size=16",
                                   "model.hidden=16", "trainer.max_epochs=3", "trainer.accelerator=cpu",
                                   "trainer.enable_progress_bar=false", f"hydra.run.dir={disk / 'run'}"], tmp_path,
                                  after="metrics.csv")
    last = disk / "run" / "checkpoints" / "last.ckpt"
    try:
        wait_for(paused, filled)
        fill(disk)
        Path(f"{paused}.go").touch()  # the next write is the second epoch's last.ckpt
        for process, line in ((unmade, f"error: cannot write {blocker / 'run'}: Not a directory"),
                              (filled, f"error: cannot write {last}: {FULL}")):
            err = process.communicate(timeout=120)[1]
            assert process.returncode == 1, err[-3000:]
            assert "Traceback" not in err and "Logging error" not in err, err[-3000:]
            assert err.strip().splitlines()[-1] == line
    finally:
        for process in (unmade, filled):
            if process.poll() is None:
                process.kill()
                process.wait()
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]
    state = torch.load(last, weights_only=True)  # the first epoch's, whole: 38 steps
    assert (state["epoch"], state["global_step"]) == (0, 38)


def test_metrics_csv_is_replaced_whole_or_kept(disk):
    from src.tracking import WholeFileCSVLogger

    logger = WholeFileCSVLogger(save_dir=disk / "run", name="", version="")
    metrics = disk / "run" / "metrics.csv"
    step = 0
    # Rows up to just under one block of the tmpfs, so that the file with two more columns needs a second one.
    while not metrics.exists() or metrics.stat().st_size + step + 40 < 4096:
        logger.log_metrics({"train/loss": 1 / (step + 3), "train/acc": step / 100}, step=step)
        logger.save()
        step += 1
    assert metrics.stat().st_size < 4096
    kept = metrics.read_bytes()
    fill(disk)
    # New columns: Lightning would rewrite the file in place, and the disk cut it short.
    logger.log_metrics({"test/acc": 0.5, "test/loss": 0.25}, step=step)
    with pytest.raises(CannotWrite) as failed:
        logger.save()
    assert str(failed.value) == f"cannot write {metrics}: {FULL}"
    assert metrics.read_bytes() == kept
    logger.finalize("failed")  # Lightning's clean-up after the failure: it must not hide the failure
    with pytest.raises(CannotWrite):
        logger.finalize("success")
    empty(disk)
    logger.finalize("success")
    rows = list(csv.DictReader(open(metrics)))
    assert len(rows) == step + 1 and rows[-1]["test/acc"] == "0.5"


def test_a_figure_is_replaced_whole_or_kept(tmp_path, disk):
    from src.plots import training_curves

    metrics = tmp_path / "metrics.csv"
    metrics.write_text("epoch,step,train/loss,train/acc\n0,9,0.9,0.6\n1,19,0.5,0.8\n2,29,0.3,0.9\n")
    figure = disk / "training_curves.png"
    figure.write_bytes(b"the earlier figure")
    fill(disk)
    with pytest.raises(CannotWrite) as failed:
        training_curves(metrics, figure)
    assert str(failed.value) == f"cannot write {figure}: {FULL}"
    assert figure.read_bytes() == b"the earlier figure" and sorted(p.name for p in disk.iterdir()) == [
        "filler", "training_curves.png"]


def test_an_error_that_is_not_a_failed_write_passes_unchanged_and_leaves_nothing(tmp_path):
    from src.atomic import written_whole

    with pytest.raises(ValueError, match="^a bug in the block$"):  # a bug is not reported as "cannot write"
        with written_whole(tmp_path / "table.csv") as partial:
            partial.write_text("half")
            raise ValueError("a bug in the block")
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary one


def test_the_gallery_of_mistakes_is_replaced_whole_or_kept(disk):
    from src.plots import mistakes

    figure = disk / "mistakes.png"
    figure.write_bytes(b"the earlier gallery")
    fill(disk)
    with pytest.raises(CannotWrite) as failed:
        mistakes(torch.zeros(1, 784), ["test[0]"], [1], [2], [0.9], [str(k) for k in range(10)], figure, "one mistake")
    assert str(failed.value) == f"cannot write {figure}: {FULL}"
    assert figure.read_bytes() == b"the earlier gallery" and sorted(p.name for p in disk.iterdir()) == [
        "filler", "mistakes.png"]


def test_the_sweep_summary_is_replaced_whole_or_kept_and_stops_the_sweep(tmp_path, disk, capsys):
    from hydra.core.utils import JobReturn, JobStatus
    from hydra.types import RunMode

    from src.sweep import SweepSummary

    sweep = disk / "sweep"
    for job, hidden in enumerate((16, 32)):  # each row over 2 kB: the table needs a second block of the tmpfs
        (sweep / str(job)).mkdir(parents=True)
        (sweep / str(job) / "result.json").write_text(json.dumps(
            {"job": job, "overrides": [f"model.hidden={hidden}", f"data.data_dir=/data/{'x' * 2100}"],
             "status": "completed", "metric": "test/acc", "value": 0.5 + job / 10, "wall_s": 1.0, "error": ""}))
    summary = sweep / "summary.csv"
    summary.write_text("job,overrides\n")
    fill(disk)
    with pytest.raises(SystemExit) as stopped:  # Hydra would make an exception of its callback a warning
        SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    assert stopped.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [f"error: cannot write {summary}: {FULL}"]
    assert summary.read_text() == "job,overrides\n"

    blocker = tmp_path / "a-file"  # a job whose folder is not there to hold result.json
    blocker.write_text("")
    config = OmegaConf.create({"optimized_metric": None, "test_ckpt": None, "data": {"val_size": 0}, "hydra": {
        "mode": RunMode.MULTIRUN, "job": {"num": 0}, "overrides": {"task": []},
        "runtime": {"output_dir": str(blocker / "0")}}})
    with pytest.raises(SystemExit) as stopped:
        SweepSummary().on_job_end(config, JobReturn(status=JobStatus.COMPLETED, _return_value=0.5))
    assert stopped.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: cannot write {blocker / '0' / 'result.json'}: Not a directory"]


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # TensorBoard's own thread
def test_full_disk_under_tensorboard_keeps_its_earlier_events(tiny_data, tmp_path):
    needs_extra("track", "tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = tmp_path / "run" / "tensorboard"
    events.mkdir(parents=True)
    with mounted(events):  # only TensorBoard's files are on the small disk
        with pytest.raises(CannotWrite) as failed:
            train(compose_train(f"data.data_dir={tiny_data}", *TINY, "logger=tensorboard"), tmp_path / "run",
                  callbacks=(FillAtEpoch(events, tmp_path / "run" / "checkpoints" / "last.ckpt"),))
        assert str(failed.value) == f"cannot write {events}: {FULL}"
        (written,) = [p for p in events.glob("events.out.tfevents.*") if p.stat().st_size > 0]
        reader = EventAccumulator(str(written))
        reader.Reload()
        assert [event.step for event in reader.Scalars("train/loss")] == [9, 19]  # both epochs, read back


def test_full_disk_at_a_tensorboard_save_is_one_line(disk):
    """Lightning saves each logger after logging (TensorBoard: its events flushed, hparams.yaml written)."""
    needs_extra("track", "tensorboard")
    from src.tracking import NamedTensorBoardLogger

    logger = NamedTensorBoardLogger(save_dir=disk, name="tensorboard", version="run", default_hp_metric=False)
    logger.experiment  # its folder and event file, made while there is room
    fill(disk)
    with pytest.raises(CannotWrite) as failed:
        logger.save()
    assert str(failed.value) == f"cannot write {disk / 'tensorboard' / 'run'}: {FULL}"
    empty(disk)
    logger.finalize("success")


@pytest.mark.slow
def test_full_disk_under_mlflow_keeps_the_store_and_its_earlier_run(tiny_data, tmp_path, disk, monkeypatch, capsys):
    needs_extra("track", "mlflow")
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)  # MLflow's artifacts (./mlruns) stay off the small disk
    store = f"sqlite:///{disk / 'mlruns.db'}"
    with pytest.raises(CannotWrite) as failed:
        train(compose_train(f"data.data_dir={tiny_data}", *TINY, "logger=mlflow", f"logger.tracking_uri={store}"),
              tmp_path / "run", callbacks=(FillAtEpoch(disk, tmp_path / "run" / "checkpoints" / "last.ckpt"),))
    assert str(failed.value) == f"cannot write {disk / 'mlruns.db'}: database or disk is full"
    assert "Traceback" not in capsys.readouterr().err  # MLflow logs none of its own
    empty(disk)
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("train").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [9]  # epoch 1's
    assert run.data.params["model.hidden"] == "16"


def fill_as_the_run_logs_its_results(monkeypatch, disk: Path) -> None:
    """Fill the disk once training and test are over, and Lightning has flushed and closed the loggers: as
    the run logs its figures (and MLflow's checkpoints) to them. No hook of Lightning's runs that late."""
    from src import tracking

    log_results = tracking.log_results

    def on_a_full_disk(*args, **kwargs):
        fill(disk)
        log_results(*args, **kwargs)

    monkeypatch.setattr(tracking, "log_results", on_a_full_disk)


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # TensorBoard's own thread
def test_full_disk_as_tensorboard_takes_the_figures_keeps_its_earlier_events(tiny_data, tmp_path, monkeypatch):
    needs_extra("track", "tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = tmp_path / "run" / "tensorboard"
    events.mkdir(parents=True)
    with mounted(events):  # only TensorBoard's files are on the small disk
        fill_as_the_run_logs_its_results(monkeypatch, events)
        with pytest.raises(CannotWrite) as failed:
            train(compose_train(f"data.data_dir={tiny_data}", *TINY, "logger=tensorboard"), tmp_path / "run")
        assert str(failed.value) == f"cannot write {events}: {FULL}"
        reader = EventAccumulator(str(events))  # every event file, as TensorBoard reads the folder: fit's, test's
        reader.Reload()
        assert [event.step for event in reader.Scalars("train/loss")] == [9, 19]  # both epochs, read back
        assert [event.step for event in reader.Scalars("test/acc")] == [20]
        assert reader.Tags()["images"] == []  # the figures are what the full disk refused


@pytest.mark.slow
def test_full_disk_as_mlflow_takes_the_artifacts_keeps_the_run_and_its_metrics(tiny_data, tmp_path, monkeypatch,
                                                                               capsys):
    needs_extra("track", "mlflow")
    from mlflow import MlflowClient

    artifacts = tmp_path / "work" / "mlruns"  # MLflow's artifacts, ./mlruns, alone on the small disk
    artifacts.mkdir(parents=True)
    monkeypatch.chdir(artifacts.parent)
    store = f"sqlite:///{tmp_path / 'mlruns.db'}"
    with mounted(artifacts):
        fill_as_the_run_logs_its_results(monkeypatch, artifacts)
        with pytest.raises(CannotWrite) as failed:
            train(compose_train(f"data.data_dir={tiny_data}", *TINY, "logger=mlflow", f"logger.tracking_uri={store}"),
                  tmp_path / "run")
        client = MlflowClient(store)
        (run,) = client.search_runs([client.get_experiment_by_name("train").experiment_id])
        folder = Path(run.info.artifact_uri.removeprefix("file://"))  # a path, or a file: URI
        assert folder.is_relative_to(artifacts)
        assert str(failed.value) == f"cannot write {folder}: {FULL}"
    assert "Traceback" not in capsys.readouterr().err
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [9, 19]
    assert run.data.metrics["test/acc"] > 0.5 and run.data.params["model.hidden"] == "16"


def test_full_disk_under_the_search_journal_keeps_every_trial_and_the_journal_usable(disk):
    needs_extra("sweep", "optuna", "optuna_integration")
    import optuna

    from src.run_context import RunContext
    from src.tune import open_storage, tune

    study_dir = disk / "study"
    study_dir.mkdir()
    study = optuna.create_study(study_name="mnist-mlp", direction="maximize", storage=open_storage(None, study_dir))
    study.optimize(lambda trial: trial.suggest_float("optimizer.lr", 1e-5, 1e-1, log=True), n_trials=2)
    journal = study_dir / "journal.log"
    # Leave 10 bytes in the journal's last block, so that the search's next record is torn by the full disk.
    study.set_user_attr("pad", "")
    record = journal.stat().st_size
    study.set_user_attr("pad", "")
    record = journal.stat().st_size - record
    study.set_user_attr("pad", "x" * ((4096 - 10 - journal.stat().st_size % 4096 - record) % 4096))
    assert journal.stat().st_size % 4096 == 4096 - 10
    kept = journal.read_bytes()
    fill(disk)
    with pytest.raises(CannotWrite) as failed:
        tune(compose_config("hparams_search/optuna", "hparams_search.n_trials=3"), RunContext(output_dir=study_dir))
    assert str(failed.value) == f"cannot write {journal}: {FULL}"
    assert journal.read_bytes() == kept  # the torn record was cut off

    empty(disk)
    plain = optuna.storages.journal.JournalFileBackend(str(journal))  # Optuna's own reader and writer
    study = optuna.load_study(study_name="mnist-mlp", storage=optuna.storages.JournalStorage(plain))
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    study.set_user_attr("after", 1)
    study.set_user_attr("again", 2)
    reopened = optuna.load_study(study_name="mnist-mlp", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal))))
    assert (reopened.user_attrs["after"], reopened.user_attrs["again"], len(reopened.trials)) == (1, 2, 2)


def test_full_disk_under_the_search_database_keeps_every_trial_and_the_database_usable(
        tiny_data, tmp_path, disk, monkeypatch, capsys):
    """hparams_search.storage=sqlite:///...: the disk fills up once a trial is asked for, and its first report
    to the study fails in the middle of its training."""
    needs_extra("sweep", "optuna", "optuna_integration")
    import optuna

    import src.train
    from src.run_context import RunContext
    from src.tune import tune

    database = disk / "study.db"
    url = f"sqlite:///{database}"
    study = optuna.create_study(study_name="mnist-mlp", direction="maximize", storage=url)
    study.optimize(lambda trial: trial.suggest_float("optimizer.lr", 1e-5, 1e-1, log=True), n_trials=2)
    trained = src.train.train

    def train_on_a_full_disk(*args, **kwargs):
        fill(disk)
        return trained(*args, **kwargs)

    monkeypatch.setattr(src.train, "train", train_on_a_full_disk)
    with pytest.raises(CannotWrite) as failed:
        tune(compose_config("hparams_search/optuna", f"data.data_dir={tiny_data}", "data.val_size=100", *TINY,
                            "hparams_search.n_trials=3", f"hparams_search.storage={url}"),
             RunContext(output_dir=tmp_path / "study"))
    assert str(failed.value) == f"cannot write {database}: database or disk is full"
    assert "Traceback" not in capsys.readouterr().err

    empty(disk)
    study = optuna.load_study(study_name="mnist-mlp", storage=url)  # Optuna's own, on the same URL
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "RUNNING"]  # the third's end unrecorded
    study.tell(study.ask(), 0.5)
    reopened = optuna.load_study(study_name="mnist-mlp", storage=url)
    assert [t.state.name for t in reopened.trials] == ["COMPLETE", "COMPLETE", "RUNNING", "COMPLETE"]


def test_a_search_database_under_a_regular_file_is_one_line(tmp_path):
    from src.run_context import RunContext
    from src.tune import tune

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(CannotWrite) as failed:
        tune(compose_config("hparams_search/optuna", f"hparams_search.storage=sqlite:///{blocker / 'study.db'}"),
             RunContext(output_dir=tmp_path / "study"))
    assert str(failed.value) == f"cannot write {blocker / 'study.db'}: unable to open database file"


def test_a_search_database_locked_by_another_worker_is_not_called_a_write_failure(tmp_path):
    """SQLite's lock, held by another worker's write, is no fault of the disk: SQLAlchemy's error is left to Optuna,
    which retries (the creation of a trial), instead of a CannotWrite that would stop the search."""
    needs_extra("sweep", "optuna")
    import sqlite3

    import optuna

    from src.tune import database

    storage = database(f"sqlite:///{tmp_path / 'study.db'}?timeout=0.1")  # SQLite waits 0.1 s for the lock
    study_id = storage.create_new_study([optuna.study.StudyDirection.MAXIMIZE], "mnist-mlp")
    other_worker = sqlite3.connect(tmp_path / "study.db")
    other_worker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(optuna.exceptions.StorageInternalError) as failed:
            storage.set_study_user_attr(study_id, "note", 1)
    finally:
        other_worker.close()
    assert not isinstance(failed.value, CannotWrite) and "is locked" in str(failed.value.__cause__)
    storage.set_study_user_attr(study_id, "note", 1)  # the lock gone, the same write goes through
    assert storage.get_study_user_attrs(study_id) == {"note": 1}


def test_a_trial_that_cannot_write_stops_the_search(tiny_data, tmp_path):
    needs_extra("sweep", "optuna", "optuna_integration")
    import optuna

    from src.run_context import RunContext
    from src.tune import open_storage, tune

    study_dir = tmp_path / "study"
    (study_dir / "trial_0").mkdir(parents=True)
    with mounted(study_dir / "trial_0"):
        fill(study_dir / "trial_0")
        with pytest.raises(CannotWrite) as failed:
            tune(compose_config("hparams_search/optuna", f"data.data_dir={tiny_data}", "data.val_size=100", *TINY,
                                "hparams_search.n_trials=2"), RunContext(output_dir=study_dir))
        assert str(failed.value) == f"cannot write {study_dir / 'trial_0' / 'hparams.yaml'}: {FULL}"
    study = optuna.load_study(study_name="mnist-mlp", storage=open_storage(None, study_dir))
    assert [t.state.name for t in study.trials] == ["FAIL"]  # recorded, and no second trial on the full disk


@pytest.mark.parametrize("fmt", ["torchscript", pytest.param("onnx", marks=pytest.mark.slow)])
def test_an_export_on_a_full_disk_keeps_the_earlier_model(tiny_data, tmp_path, disk, fmt):
    from src.export import FILE_NAMES, export

    if fmt == "onnx":
        needs_extra("export", "onnx", "onnxruntime", "onnxscript")
    train(compose_train(f"data.data_dir={tiny_data}", *TINY, "trainer.max_epochs=1"), tmp_path / "run")
    model = disk / FILE_NAMES[fmt]
    model.write_bytes(b"the earlier model")
    fill(disk)
    with pytest.raises(CannotWrite) as failed:
        export(compose_config("export", f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}",
                              f"format={fmt}", f"out={model}"))
    assert str(failed.value) == f"cannot write {model}: {FULL}"
    assert model.read_bytes() == b"the earlier model" and sorted(p.name for p in disk.iterdir()) == [
        "filler", model.name]
