"""Sweeps and scale-out: Hydra multirun with its summary, the submitit launcher, DDP on CPU, Optuna.

Most tests run the real command lines in subprocesses on the tiny IDX data; the autouse
no-download fixture does not reach them, so each points data.data_dir at the tiny data.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import compose_config, compose_train, entry_env, logged, needs_extra
from tests.test_console import check_epoch_lines


def run(module: str, *args: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env or entry_env(), capture_output=True,
                          text=True, timeout=timeout)


def read_summary(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def completed_jobs(sweep_dir: Path, swept: list[str]) -> list[dict]:
    """The summary's rows, checked: one per value in `swept`, each completed, with its own job's test/acc."""
    rows = read_summary(sweep_dir)
    assert sorted(row["overrides"].split()[-1] for row in rows) == sorted(swept)
    for row in rows:
        assert row["status"] == "completed"
        assert [float(row["test/acc"])] == logged(sweep_dir / row["job"] / "metrics.csv", "test/acc")
    return rows


@pytest.mark.slow
def test_grid_sweep_summarises_every_job_and_reports_the_failed_one(tiny_data, tmp_path):
    sweep_dir = tmp_path / "sweep"
    # 2 x 2 grid; data.val_size=${model.hidden} with hidden=600 holds out all 600 tiny training
    # images, so exactly that one job fails.
    result = run("src.train", "-m", "+sweep=grid", f"data.data_dir={tiny_data}", "optimizer.lr=1e-4",
                 "trainer.max_epochs=1", "model.hidden=50,600", "data.val_size=100,${model.hidden}",
                 f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)

    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: 1 of 4 jobs failed; their errors are in {sweep_dir / 'summary.csv'}"
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0", "1", "2", "3"]
    rows = read_summary(sweep_dir)
    assert sorted(int(row["job"]) for row in rows) == [0, 1, 2, 3]

    failed = [row for row in rows if row["status"] == "failed"]
    assert len(failed) == 1
    assert "model.hidden=600" in failed[0]["overrides"] and "data.val_size=600 is not valid" in failed[0]["error"]
    assert failed[0]["val/acc"] == "" and rows[-1] is failed[0]  # ranked last

    completed = [row for row in rows if row["status"] == "completed"]
    for row in completed:  # each row holds its own job's numbers
        job_dir = sweep_dir / row["job"]
        assert [float(row["val/acc"])] == logged(job_dir / "metrics.csv", "val/acc")  # one epoch: one of each
        assert [float(row["test/acc"])] == logged(job_dir / "metrics.csv", "test/acc")
        assert int(row["epochs"]) == len(logged(job_dir / "metrics.csv", "train/loss")) == 1
        assert Path(row["checkpoint"]) == job_dir / "checkpoints" / "last.ckpt" and Path(row["checkpoint"]).is_file()
        assert row["tested"] == "best"  # a validation split: the best epoch was tested
        assert float(row["wall_s"]) > 0
    values = [float(row["val/acc"]) for row in completed]
    assert values == sorted(values, reverse=True)  # best val/acc first
    assert "Sweep summary, best val/acc first" in result.stdout
    for row in rows:
        assert any(line.split()[:2] == [row["job"], row["status"]] for line in result.stdout.splitlines())
    assert (sweep_dir / "summary.png").stat().st_size > 0


def write_job(folder: Path, job: int, overrides: list[str], val_acc: list[float], test_acc: float) -> None:
    """A job's folder as a sweep leaves it: its result.json, and its metrics.csv as Lightning's CSVLogger writes one
    (per epoch a validation row and a training row, then the test row), which tested its best epoch."""
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps({
        "job": job, "overrides": overrides, "status": "completed", "metric": "val/acc", "tested": "best",
        "value": max(val_acc), "wall_s": 12.34, "error": ""}))
    lines = ["epoch,step,test/acc,test/loss,train/acc,train/loss,val/acc,val/loss"]
    for epoch, value in enumerate(val_acc):
        lines += [f"{epoch},{4 * epoch + 3},,,,,{value},0.5", f"{epoch},{4 * epoch + 3},,,0.5,1.0,,"]
    lines.append(f"{len(val_acc)},{4 * len(val_acc)},{test_acc},0.4,,,,")
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_the_summary_holds_the_tested_epochs_val_acc_and_prints_what_varied(tmp_path):
    from src.sweep import collect, format_table

    sweep_dir = tmp_path / "sweep"
    # val/acc rises then falls in job 0: the best epoch (the 2nd) was tested, and its val/acc is the job's
    write_job(sweep_dir / "0", 0, ["model.hidden=16", "data.data_dir=/data"], [0.8, 0.91234, 0.7], 0.85)
    write_job(sweep_dir / "1", 1, ["model.hidden=32", "data.data_dir=/data"], [0.6, 0.65, 0.75], 0.7)
    rows = collect(sweep_dir)
    assert [(row["job"], row["val/acc"], row["test/acc"], row["epochs"]) for row in rows] == [
        (0, 0.91234, 0.85, 3), (1, 0.75, 0.7, 3)]
    # the swept key alone (data.data_dir is the same in both), every figure to 4 decimals
    assert format_table(rows, "val/acc").splitlines() == [
        "job  status     val/acc  test/acc  tested  epochs  wall_s  swept values",
        "0    completed  0.9123   0.8500    best    3       12.3    model.hidden=16",
        "1    completed  0.7500   0.7000    best    3       12.3    model.hidden=32"]


@pytest.mark.slow
def test_jobs_of_one_process_read_the_data_once(tiny_data, tmp_path, monkeypatch):
    import logging

    from hydra.core.global_hydra import GlobalHydra

    import runpy

    from src.idx import load_split

    sweep_dir = tmp_path / "sweep"
    monkeypatch.setattr(sys, "argv", ["train", "-m", f"data.data_dir={tiny_data}", "trainer.max_epochs=1",
                                      "trainer.limit_train_batches=1", "model.hidden=8,16",
                                      f"hydra.sweep.dir={sweep_dir}"])
    monkeypatch.delitem(sys.modules, "src.train", raising=False)  # run_module executes it afresh as __main__
    handlers = logging.getLogger().handlers[:]
    load_split.cache_clear()
    try:
        runpy.run_module("src.train", run_name="__main__")  # as `python -m src.train -m ...` does
    finally:
        GlobalHydra.instance().clear()
        logging.getLogger().handlers[:] = handlers
    assert [row["status"] for row in read_summary(sweep_dir)] == ["completed", "completed"]
    info = load_split.cache_info()
    assert (info.misses, info.hits) == (2, 2)  # train and test split parsed by the first job, reused by the second


@pytest.mark.slow
def test_submitit_local_sweep(tiny_data, tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run("src.train", "-m", "hydra/launcher=submitit_local", f"data.data_dir={tiny_data}",
                 "trainer.max_epochs=1", "model.hidden=8,16", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)

    assert result.returncode == 0, result.stderr[-3000:]
    assert "Submitit 'local' sweep" in result.stdout + result.stderr
    rows = completed_jobs(sweep_dir, ["model.hidden=16", "model.hidden=8"])
    assert [row["tested"] for row in rows] == ["last", "last"]  # no validation split: the final weights
    assert len(list((sweep_dir / ".submitit").glob("*/*_result.pkl"))) == 2  # ran as submitit jobs
    assert "note: ranked on the test set" in result.stdout  # no validation split: the summary says so


# `python -m src.train`, with each process saving the images of every batch it trained on, per epoch, into
# $BATCHES_DIR/rank<R>.pt, R being torch.distributed's rank. Run as a module (python -m record_batches), so that
# Lightning starts the second DDP process with the same command.
RECORD_BATCHES = """
import os, runpy, torch
import torch.distributed as dist
from src.model import MNISTClassifier

seen = {}
training_step = MNISTClassifier.training_step


def recording_step(self, batch, batch_idx):
    seen.setdefault(self.current_epoch, []).append(batch[0].clone())
    return training_step(self, batch, batch_idx)


def save(self):
    images = {epoch: torch.cat(batches) for epoch, batches in seen.items()}
    torch.save(images, os.path.join(os.environ["BATCHES_DIR"], f"rank{dist.get_rank()}.pt"))


MNISTClassifier.training_step, MNISTClassifier.on_train_end = recording_step, save
if __name__ == "__main__":  # src/train.py as `python -m src.train` runs it; sys.modules["__main__"] stays this module
    runpy.run_module("src.train", run_name="__main__")
"""


@pytest.mark.slow
def test_ddp_cpu_trains_on_two_processes_on_halves_of_each_epoch_and_reduces_metrics(tiny_data, tmp_path):
    import torch

    from src.idx import load_split, prepare_files
    from src.model import MNISTClassifier

    (tmp_path / "record_batches.py").write_text(RECORD_BATCHES)
    env = entry_env(BATCHES_DIR=str(tmp_path))
    env["PYTHONPATH"] += f"{os.pathsep}{tmp_path}"
    run_dir, batch_size, epochs, world_size = tmp_path / "run", 32, 2, 2
    result = run("record_batches", "trainer=ddp_cpu", f"data.data_dir={tiny_data}", f"data.batch_size={batch_size}",
                 f"trainer.max_epochs={epochs}", "optimizer.lr=1e-5", f"hydra.run.dir={run_dir}", cwd=tmp_path, env=env)

    assert result.returncode == 0, result.stderr[-3000:]
    assert "Starting with 2 processes" in result.stdout + result.stderr
    metric_lines = [line for line in result.stdout.splitlines() if line.startswith("test_loss:")]
    assert len(metric_lines) == 1
    # The first process alone prints an epoch's line, with the figures averaged over both, as metrics.csv has them
    check_epoch_lines(result.stdout, run_dir / "metrics.csv", epochs=epochs, steps=math.ceil(300 / batch_size), val=False)
    assert result.stdout.count('Model: "MNISTClassifier"') == 1
    assert re.search(r"^devices: 2 processes on cpu, 1 node x 2 \(trainer\.accelerator=cpu; ", result.stdout, re.M)
    if shutil.which("srun"):  # on a machine with SLURM, a run of several processes that it did not start says so
        assert result.stdout.count("note: SLURM is installed here, but these 2 processes were started on this "
                                   "machine, not by SLURM") == 1
    assert [p.relative_to(run_dir) for p in run_dir.rglob("*.ckpt")] == [Path("checkpoints/last.ckpt")]
    assert not (tmp_path / "outputs").exists()  # the second process wrote into the same run folder

    x_train, _ = load_split("mnist", str(prepare_files("mnist", tiny_data)), train=True)
    x_test, y_test = load_split("mnist", str(prepare_files("mnist", tiny_data)), train=False)
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    per_process = math.ceil(len(x_train) / world_size)  # each process takes every other image
    assert checkpoint["global_step"] == epochs * math.ceil(per_process / batch_size)  # batch_size is per process

    # Each epoch, the two processes trained on two halves of the training set, and the halves change.
    index = {image.numpy().tobytes(): i for i, image in enumerate(x_train)}
    assert len(index) == len(x_train) == 600
    trained_on = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(world_size)]
    halves = [[[index[image.numpy().tobytes()] for image in seen[epoch]] for seen in trained_on] for epoch in range(epochs)]
    for first, second in halves:
        assert len(first) == len(set(first)) == len(second) == len(set(second)) == 300
        assert set(first).isdisjoint(second) and set(first) | set(second) == set(range(600))
    assert set(halves[0][0]) != set(halves[1][0])  # reshuffled: not the same half every epoch

    model = MNISTClassifier.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt", map_location="cpu")
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test.argmax(1)).float().mean().item()
    printed = float(metric_lines[0].split("test_acc:")[1])
    assert printed == pytest.approx(accuracy, abs=1e-4)  # over the whole test set, not one process's half


@pytest.mark.slow
def test_optuna_search_prunes_fails_and_resumes(tiny_data, tmp_path):
    needs_extra("sweep", "optuna", "optuna_integration")
    import optuna
    from optuna.trial import TrialState

    study_dir, epochs = tmp_path / "study", 3
    # The lr range reaches 10, where training diverges; the study's first trial is put there (enqueued, as a
    # user would try a known point), so that a failed trial does not depend on where TPE happens to look.
    args = [f"data.data_dir={tiny_data}", "data.val_size=100", f"trainer.max_epochs={epochs}",
            "hparams_search.pruner.n_startup_trials=1", "hparams_search.pruner.n_warmup_steps=0",
            "hparams_search.params.optimizer.lr.low=1e-7", "hparams_search.params.optimizer.lr.high=10",
            f"hydra.run.dir={study_dir}"]
    study_dir.mkdir()
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(study_dir / "journal.log")))
    optuna.create_study(study_name="mnist-mlp", storage=storage, direction="maximize").enqueue_trial(
        {"optimizer.lr": 10.0, "model.hidden": 512, "data.batch_size": 64})
    first = run("src.tune", *args, "hparams_search.n_trials=4", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    study = optuna.load_study(study_name="mnist-mlp", storage=storage)
    states = [t.state for t in study.trials]
    assert len(states) == 4 and TrialState.PRUNED in states
    assert states[0] == TrialState.FAIL and study.trials[0].params["optimizer.lr"] == 10.0
    assert "trial 0 failed: training diverged in epoch 1" in first.stdout + first.stderr
    assert not list((study_dir / "trial_0").rglob("*.ckpt"))
    assert TrialState.COMPLETE in states[1:]  # the search went on after the failure
    for trial in study.trials:
        if trial.state == TrialState.PRUNED:  # stopped before its last epoch
            assert len(logged(study_dir / f"trial_{trial.number}" / "metrics.csv", "train/loss")) < epochs

    again = run("src.tune", *args, "hparams_search.n_trials=6", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming study 'mnist-mlp'" in again.stdout + again.stderr
    assert len(optuna.get_all_study_names(storage)) == 1
    study = optuna.load_study(study_name="mnist-mlp", storage=storage)
    assert [t.number for t in study.trials] == list(range(6))
    assert len({json.dumps(t.params, sort_keys=True) for t in study.trials}) == 6  # the resumed run drew new points
    assert sorted(p.name for p in study_dir.glob("trial_*")) == [f"trial_{n}" for n in range(6)]
    assert f"best trial {study.best_trial.number}:" in again.stdout


# val/acc after each epoch of the stand-in trainings below, by trial number; None: the trial fails (a UserError).
CURVES = {0: [0.5, 0.6, 0.7], 1: [0.6, 0.7, 0.8], 2: None, 3: [0.1, 0.1, 0.1], 4: [0.9, 0.95, 0.99], 5: [0.7, 0.8, 0.9]}


def test_the_search_counts_prunes_fails_names_and_reports_its_trials(tmp_path, monkeypatch, caplog, capsys):
    """The search's own bookkeeping, each trial's training replaced by a stand-in that reports CURVES[trial]
    through the search's pruning callback, as Lightning's validation would: fast, and exact."""
    needs_extra("sweep", "optuna", "optuna_integration")
    import logging
    from types import SimpleNamespace

    import optuna
    import torch

    from src.errors import UserError
    from src.run_context import RunContext
    from src.tune import open_storage, tune

    study_dir, folders = tmp_path / "study", []

    def stand_in(cfg, run_dir, callbacks=(), context=None):
        (pruning,) = callbacks
        folders.append(run_dir.relative_to(tmp_path).as_posix())
        curve = CURVES[pruning._trial.number]
        if curve is None:
            raise UserError("training diverged in epoch 1")
        for epoch, value in enumerate(curve):  # only the optimised metric is logged: the callback must watch it
            pruning.on_validation_end(SimpleNamespace(sanity_checking=False, callback_metrics={
                cfg.optimized_metric: torch.tensor(value)}), SimpleNamespace(current_epoch=epoch))
        return curve[-1]

    monkeypatch.setattr("src.train.train", stand_in)
    caplog.set_level(logging.INFO, logger="src.tune")
    args = ["hparams_search.study_name=digits", "hparams_search.pruner.n_startup_trials=2",
            "hparams_search.pruner.n_warmup_steps=1"]
    tune(compose_config("hparams_search/optuna", *args, "hparams_search.n_trials=5"), RunContext(output_dir=study_dir))
    study = optuna.load_study(study_name="digits", storage=open_storage(None, study_dir))
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "FAIL", "PRUNED", "COMPLETE"]
    # Trial 3 trails the median of the 2 completed trials from its first epoch on, and is pruned at the first
    # epoch after the warm-up of 1 (epochs counted from 0, as Optuna's steps).
    assert study.trials[3].intermediate_values == {0: pytest.approx(0.1), 1: pytest.approx(0.1)}
    assert folders == [f"study/trial_{n}" for n in range(5)]
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "study 'digits': 3 complete, 1 pruned, 1 failed"
    assert out[1].startswith("best trial 4: val/acc 0.9900 with optimizer.lr=")
    assert "trial 2 failed: training diverged in epoch 1" in caplog.text

    tune(compose_config("hparams_search/optuna", *args, "hparams_search.n_trials=6"), RunContext(output_dir=study_dir))
    assert f"resuming study 'digits' in {study_dir}: 5 of 6 trials done" in caplog.text
    study = optuna.load_study(study_name="digits", storage=open_storage(None, study_dir))
    assert len(study.trials) == 6 and folders[5:] == ["study/trial_5"]  # one more, to 6 in all
    assert len({json.dumps(t.params, sort_keys=True) for t in study.trials}) == 6  # each trial a point of its own

    lowest = tmp_path / "lowest"  # a loss is minimised
    monkeypatch.setitem(CURVES, 0, [0.3])
    tune(compose_config("hparams_search/optuna", "optimized_metric=val/loss", "hparams_search.n_trials=1"),
         RunContext(output_dir=lowest))
    study = optuna.load_study(study_name="mnist-mlp", storage=open_storage(None, lowest))
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    assert study.trials[0].intermediate_values == {0: pytest.approx(0.3)}  # the pruner watched val/loss


def test_the_search_schema_stays_out_of_training_configs():
    import src.tune  # noqa: F401 - registers the search's schema in this process
    from omegaconf import OmegaConf

    search = compose_config("hparams_search/optuna", "data=fashion_mnist")
    train = compose_train("data=fashion_mnist")
    assert OmegaConf.get_type(search).__name__ == "TuneConfig" and search.data.val_size == 10000
    assert OmegaConf.get_type(train).__name__ == "TrainConfig" and "hparams_search" not in train


P = "hparams_search.params"


@pytest.mark.parametrize("overrides, message", [
    ([f"{P}.optimizer.lr.low=0"], f"{P}.optimizer.lr.low=0 is not valid: a log scale needs low > 0"),
    ([f"{P}.optimizer.lr.low=1"], f"{P}.optimizer.lr.low=1 is not valid: expected low < high, and high=0.1"),
    ([f"{P}.optimizer.lr.high=abc"], f"{P}.optimizer.lr.high='abc' is not valid: expected a number (expected "
                                     "{low: A, high: B}, with log: true for a log scale, or {choices: [A, B, ...]})"),
    ([f"{P}.optimizer.lr.log=maybe"], f"{P}.optimizer.lr.log='maybe' is not valid: expected true or false"),
    ([f"+{P}.optimizer.lr.step=2"], f"{P}.optimizer.lr={{low: 1e-05, high: 0.1, log: true, step: 2}} is not valid: "
                                   "expected {low: A, high: B}, with log: true for a log scale, or {choices: [A, B, ...]}"),
    ([f"{P}.model.hidden.low=32.5"], f"{P}.model.hidden={{low: 32.5, high: 1024, log: true}} is not valid: "
                                     "model.hidden takes whole numbers, so low and high must be whole numbers"),
    ([f"{P}.data.batch_size.choices=[]"], f"{P}.data.batch_size.choices=[] is not valid: expected a list of one or "
                                          "more values, e.g. [32, 64, 128]"),
    ([f"{P}.data.batch_size.choices=[0,64]"], f"{P}.data.batch_size is not valid: a trial could get data.batch_size=0, "
                                              "which training refuses: data.batch_size=0 is not valid: expected a "
                                              "positive integer"),
    ([f"+{P}.optimizer.rho={{low: 0.5, high: 1.0}}"],
     f"{P}.optimizer.rho is not valid: a trial could get optimizer.rho=1.0, which training refuses: "
     "optimizer.rho=1.0 is not valid: expected 0 <= rho < 1"),
    ([f"+{P}.model.width={{low: 1, high: 2}}"], f"{P}.model.width is not valid: model.width is not a key of the "
                                               "training config"),
    (["hparams_search.pruner.n_warmup_steps=-1"], "hparams_search.pruner.n_warmup_steps=-1 is not valid: expected 0 "
                                                  "or more"),
    (["hparams_search.pruner.n_startup_trials=-2"], "hparams_search.pruner.n_startup_trials=-2 is not valid: expected "
                                                    "0 or more"),
    (["hparams_search.study_name=''"], "hparams_search.study_name='' is not valid: expected a name"),
    (["hparams_search.n_trials=0"], "hparams_search.n_trials=0 is not valid: expected 1 or more"),
    (["hparams_search.storage=study.db"], "hparams_search.storage='study.db' is not valid: expected a database URL "
                                          "(postgresql://USER@HOST/DB, mysql://...), or null for journal.log in the "
                                          "study folder"),
    (["optimized_metric=test/acc"], "optimized_metric=test/acc is not valid: the search optimises a validation metric"),
])
def test_every_setting_of_the_search_is_checked_before_the_study_opens(tmp_path, overrides, message):
    needs_extra("sweep", "optuna", "optuna_integration")
    from src.errors import UserError
    from src.run_context import RunContext
    from src.tune import tune

    with pytest.raises(UserError) as refused:
        tune(compose_config("hparams_search/optuna", *overrides), RunContext(output_dir=tmp_path / "study"))
    assert str(refused.value) == message
    assert not (tmp_path / "study").exists()


def test_optuna_search_refuses_to_tune_on_the_test_set(tmp_path):
    result = run("src.tune", "data.val_size=0", f"hydra.run.dir={tmp_path / 'study'}", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: data.val_size=0 is not valid: the search needs a validation split (> 0)"]


@pytest.mark.slow
def test_ddp_in_a_local_sweep_is_refused_instead_of_restarting_the_sweep(tiny_data, tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run("src.train", "-m", "trainer=ddp_cpu", f"data.data_dir={tiny_data}", f"hydra.sweep.dir={sweep_dir}",
                 cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stdout.count("Launching 1 jobs") + result.stderr.count("Launching 1 jobs") == 1
    (row,) = read_summary(sweep_dir)
    assert row["status"] == "failed" and row["error"] == (
        "UserError: trainer.strategy=ddp with several devices is not valid in a -m sweep on this machine: "
        "use hydra/launcher=slurm, or run it without -m")


def sweep_job_config(output_dir: Path, mode=None, num: int = 0):
    """What SweepSummary.on_job_end reads of a job's config."""
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    return OmegaConf.create({"optimized_metric": None, "test_ckpt": None, "data": {"val_size": 100}, "hydra": {
        "mode": mode or RunMode.MULTIRUN, "job": {"num": num}, "overrides": {"task": ["model.hidden=600"]},
        "runtime": {"output_dir": str(output_dir)}}})


def test_a_failed_job_is_recorded_as_its_row_and_handed_on_as_done_by_the_first_task_of_a_sweep_only(
        tmp_path, monkeypatch):
    from hydra.core.utils import JobReturn, JobStatus
    from hydra.types import RunMode

    from src.errors import UserError
    from src.sweep import SweepSummary

    def failed() -> JobReturn:
        return JobReturn(status=JobStatus.FAILED, _return_value=UserError("data.val_size=600 is not valid: expected "
                                                                          "less than the 600 training images"))

    job = tmp_path / "sweep" / "0"
    job.mkdir(parents=True)
    ended, summary = failed(), SweepSummary()
    summary.on_job_start(sweep_job_config(job))
    summary.on_job_end(sweep_job_config(job), ended)
    result = json.loads((job / "result.json").read_text())
    assert isinstance(result["wall_s"], float) and 0 <= result["wall_s"] < 60  # from the job's start
    assert (result["job"], result["overrides"], result["status"], result["value"], result["metric"]) == (
        0, ["model.hidden=600"], "failed", None, "val/acc")
    assert result["error"] == "UserError: data.val_size=600 is not valid: expected less than the 600 training images"
    # Done, as far as Hydra's sweeper knows: it would re-raise the first failure and skip the summary.
    assert ended.status == JobStatus.COMPLETED and math.isnan(ended.return_value)

    other_task = tmp_path / "other_task"
    other_task.mkdir()
    monkeypatch.setenv("SLURM_PROCID", "1")  # the second DDP process of a SLURM job: the first speaks for the job
    SweepSummary().on_job_end(sweep_job_config(other_task), failed())
    monkeypatch.delenv("SLURM_PROCID")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ended = failed()  # a run of its own (no -m): its failure stays one, for its exit status
    SweepSummary().on_job_end(sweep_job_config(run_dir, mode=RunMode.RUN), ended)
    assert ended.status == JobStatus.FAILED
    assert list(other_task.iterdir()) == list(run_dir.iterdir()) == []


def test_the_summary_ranks_a_loss_lowest_first_and_failed_jobs_last_and_a_failure_exits_1(tmp_path, capsys):
    from omegaconf import OmegaConf

    from src.sweep import SweepSummary

    sweep_dir = tmp_path / "sweep"
    for job, value, error in ((0, 0.4, ""), (1, None, "UserError: diverged"), (2, 0.2, ""), (3, 0.3, "")):
        (sweep_dir / str(job)).mkdir(parents=True)
        (sweep_dir / str(job) / "result.json").write_text(json.dumps({
            "job": job, "overrides": ["trainer.max_epochs=1"], "status": "failed" if error else "completed",
            "metric": "val/loss", "tested": "best", "value": value, "wall_s": 1.0, "error": error}))
    with pytest.raises(SystemExit) as stopped:
        SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}}))
    assert stopped.value.code == 1
    assert [(row["job"], row["status"], row["error"]) for row in read_summary(sweep_dir)] == [
        ("2", "completed", ""), ("3", "completed", ""), ("0", "completed", ""), ("1", "failed", "UserError: diverged")]
    printed = capsys.readouterr()
    assert "Sweep summary, best val/loss first" in printed.out and "note: ranked on the test set" not in printed.out
    assert printed.err.strip().splitlines()[-1] == (
        f"error: 1 of 4 jobs failed; their errors are in {sweep_dir / 'summary.csv'}")

    for job in (1, 2):  # ranked on the test set: said, and nothing failed, so no exit
        (sweep_dir / str(job) / "result.json").write_text(json.dumps({
            "job": job, "overrides": [], "status": "completed", "metric": "test/acc", "tested": "last",
            "value": job / 10, "wall_s": 1.0, "error": ""}))
    for job in (0, 3):
        (sweep_dir / str(job) / "result.json").unlink()
    SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}}))
    assert [row["job"] for row in read_summary(sweep_dir)] == ["2", "1"]
    assert "note: ranked on the test set; choose hyperparameters on a validation split" in capsys.readouterr().out
