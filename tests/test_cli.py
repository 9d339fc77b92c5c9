"""The command-line layer (src/cli.py, src/run_context.py): one-line errors with the valid keys of any
schema, and the command an interrupted run prints, run as printed, continues that run."""

from __future__ import annotations

import csv
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import entry_env, needs_extra, run_reporting_imports, start_paused, wait_for


def run(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=entry_env(), capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("module, key, schema, valid", [
    ("src.tune", "hparams_search.bogus", "SearchConfig", "study_name, n_trials, seed, pruner, params, storage"),
    ("src.tune", "hparams_search.pruner.bogus", "PrunerConfig", "n_startup_trials, n_warmup_steps"),
    ("src.train", "data.bogus", "DataConfig", "name, data_dir, batch_size, val_size, labels"),
])
@pytest.mark.slow
def test_an_unknown_key_gets_the_valid_keys_of_its_schema(tmp_path, module, key, schema, valid):
    result = run(module, f"{key}=1", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.splitlines() == [f"error: Could not override '{key}'.; Key 'bogus' not in '{schema}'; "
                                          f"valid keys are {valid}"]


@pytest.mark.parametrize("module, arg, expected", [
    ("src.train", "trainer.max_epochs=-1", "trainer.max_epochs=-1 is not valid"),
    ("src.train", "ckpt_path=missing.ckpt", "ckpt_path='missing.ckpt' is not valid: no such file"),
    ("src.tune", "hparams_search.n_trials=0", "hparams_search.n_trials=0 is not valid"),
    ("src.predict", "idx=abc", "idx='abc' is not valid"),
    ("src.predict", "ckpt_path=missing.ckpt", "ckpt_path='missing.ckpt' is not valid: no such file"),
    ("src.evaluate", "split=nope", "split='nope' is not valid"),
    ("src.export", "format=keras", "format='keras' is not valid"),
    ("src.app", "port=http", "Error merging override port=http"),
])
def test_bad_input_is_refused_before_torch_is_imported(tmp_path, module, arg, expected):
    """Every entry point checks its config and the checkpoint's path first: bad input fails in a fraction of a
    second, without importing torch, Lightning or torchvision (seconds each)."""
    result = run_reporting_imports(module, arg, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
                                   watched=("torch", "lightning", "torchvision"))
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: {expected}") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stdout.splitlines()[-1] == "imported: []", result.stdout


def test_the_console_says_warning_before_a_warning_and_nothing_before_a_message():
    import logging

    from src.cli import ConsoleFormatter

    def line(level: int, message: str) -> str:
        return ConsoleFormatter().format(logging.LogRecord("src.tune", level, __file__, 1, message, None, None))

    assert line(logging.INFO, "trial 0: model.hidden=64") == "trial 0: model.hidden=64"
    assert line(logging.WARNING, "trial 2 failed: training diverged") == "warning: trial 2 failed: training diverged"
    assert line(logging.ERROR, "no such file") == "error: no such file"


def test_a_launcher_forced_in_with_plus_plus_is_checked_for_its_extra_too(monkeypatch):
    from src.cli import check_launcher
    from src.errors import UserError

    monkeypatch.setitem(sys.modules, "hydra_plugins.hydra_joblib_launcher", None)  # as if not installed
    with pytest.raises(UserError, match=r"^hydra/launcher=joblib needs the 'sweep' extra"):
        check_launcher(["model.hidden=8,16", "++hydra/launcher=joblib"])


# Put on the path of a `python -m src.X` process, Python's site imports this first: its handler at exit, the
# first registered, runs last and tells what the garbage collector was left to do, and how long torch's threads
# were set to spin while they wait.
AT_EXIT = """import atexit, gc, os, sys
atexit.register(lambda: print("at exit:", gc.get_freeze_count(), gc.get_threshold()[0],
                              os.environ.get("GOMP_SPINCOUNT", "unset"), file=sys.stderr))
"""


@pytest.mark.slow
@pytest.mark.parametrize("command, status, objects", [
    (("-m", "src.train", "data.data_dir={data}", "data.batch_size=64", "model.hidden=16", "trainer.max_epochs=1",
      "hydra.run.dir=run"), 0, 100_000),  # torch's objects alone are more
    (("-m", "src.predict", "idx=oops"), 1, 30_000),  # refused before torch is imported: Hydra's and OmegaConf's
    (("-c", "import src.train"), 0, 0),
])
def test_a_python_m_process_collects_garbage_less_often_and_not_at_exit_spins_less_and_keeps_what_it_wrote(
        tiny_data, tmp_path, command, status, objects):
    """The collector's full walks over torch's, Lightning's and Hydra's objects, while importing and at exit,
    took about 1.3 s of a whole run (bench/speed.py --mode process): `python -m src.X` skips them, at a normal
    end and after an error; and torch's waiting threads spin 1,000 times, not 300,000, before they sleep, which
    cut the CPU a training took beside busy processes to a third (src/__init__.py). Importing the package elsewhere (a
    notebook, the tests) changes nothing."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(AT_EXIT)
    env = entry_env("GOMP_SPINCOUNT")  # as if the user had not set it
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "site"), env["PYTHONPATH"]])
    result = subprocess.run([sys.executable, *[part.format(data=tiny_data) for part in command]], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == status, result.stderr[-3000:]
    frozen, threshold, spins = result.stderr.splitlines()[-1].removeprefix("at exit: ").split()
    if command[0] == "-c":
        assert (frozen, threshold, spins) == ("0", "700", "unset")  # Python's and libgomp's own settings
        return
    assert int(frozen) > objects and threshold == "7000"  # every object there was is left be
    assert spins == "1000"
    if status == 0:  # what the run wrote and printed is all there
        assert result.stdout.splitlines()[-1].startswith("test_loss: ")
        rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
        assert [(row["epoch"], bool(row["train/acc"]), bool(row["test/acc"])) for row in rows] == [
            ("0", True, False), ("1", False, True)]  # the test row: logged after epoch 1 ended
        assert all((tmp_path / "run" / name).stat().st_size > 0 for name in ("training_curves.png",
                                                                            "confusion_matrix.png"))
    else:
        assert result.stderr.splitlines()[-2].startswith("error: idx=")


def test_the_resume_command_of_a_resumed_run_names_only_the_new_checkpoint():
    from src.run_context import RunContext

    resumed = RunContext(overrides=("model.hidden=16", "ckpt_path=run/checkpoints/last.ckpt", "seed=3"))
    assert resumed.resume_command(Path("again/checkpoints/last.ckpt")) == (
        "python -m src.train model.hidden=16 seed=3 ckpt_path=again/checkpoints/last.ckpt")


def interrupt_when(process: subprocess.Popen, ready: Path) -> tuple[str, str]:
    """Ctrl-C to `process` once it has written `ready`; its output."""
    wait_for(ready, process)
    process.send_signal(signal.SIGINT)
    return process.communicate(timeout=120)


def printed_command(err: str) -> list[str]:
    [line] = [line for line in err.splitlines() if line.startswith("Resume with: ")]
    words = shlex.split(line.removeprefix("Resume with: "))
    assert words[:2] == ["python", "-m"], line
    return words[2:]


# 600 tiny images in batches of 60: 10 steps an epoch. The run is stopped right after the first epoch's checkpoint.
RUN = ("data.batch_size=60", "model.hidden=16", "trainer.max_epochs=3", "trainer.enable_progress_bar=False")  # as a sweep job spells it


@pytest.mark.slow
@pytest.mark.parametrize("sweep", [False, True], ids=["run", "sweep job"])
def test_an_interrupted_run_or_sweep_job_resumes_with_the_printed_command(tiny_data, tmp_path, sweep):
    folder = ["-m", f"hydra.sweep.dir={tmp_path / 'sweep'}"] if sweep else [f"hydra.run.dir={tmp_path / 'run'}"]
    checkpoint = tmp_path / ("sweep/0" if sweep else "run") / "checkpoints" / "last.ckpt"
    process, paused = start_paused(["-m", "src.train", *folder, f"data.data_dir={tiny_data}", *RUN], tmp_path,
                                   after="last.ckpt")
    _, err = interrupt_when(process, paused)
    assert process.returncode == 1
    saved = torch.load(checkpoint, weights_only=True)["global_step"]
    assert saved == 10  # stopped where the signal came: after the first epoch, before the next step
    command = printed_command(err)
    assert command == ["src.train", f"data.data_dir={tiny_data}", *RUN, f"ckpt_path={checkpoint}"]

    resumed = run(*command, cwd=tmp_path)  # as printed, from the same folder
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Restoring states from the checkpoint path at {checkpoint}" in resumed.stdout + resumed.stderr
    [folder] = (tmp_path / "outputs").glob("*/*")
    assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 30
    with open(folder / "metrics.csv", newline="") as f:
        trained = {int(row["epoch"]) for row in csv.DictReader(f) if row["train/loss"]}
    assert trained == {1, 2}  # the epochs after the one it had finished


@pytest.mark.slow
def test_an_interrupted_trial_prints_the_search_command_which_continues_the_study(tiny_data, tmp_path):
    needs_extra("sweep", "optuna", "optuna_integration")
    import optuna

    study_dir = tmp_path / "study"
    args = [f"data.data_dir={tiny_data}", "data.val_size=100", *RUN, "hparams_search.n_trials=2",
            "hparams_search.params.data.batch_size.choices=[60]",
            "hparams_search.params.optimizer.lr.high=1e-3", f"hydra.run.dir={study_dir}"]
    process, paused = start_paused(["-m", "src.tune", *args], tmp_path, after="last.ckpt")
    _, err = interrupt_when(process, paused)
    assert torch.load(study_dir / "trial_0" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 9
    assert process.returncode == 1
    command = printed_command(err)
    # Not src.train with the search's keys and without the trial's sampled values: the search itself.
    assert command == ["src.tune", *args[:-1], f"hydra.run.dir={study_dir}"]

    again = run(*command, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming study 'mnist-mlp'" in again.stdout + again.stderr
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(study_dir / "journal.log")))
    trials = optuna.load_study(study_name="mnist-mlp", storage=storage).trials
    assert [(t.number, t.state.name) for t in trials] == [(0, "FAIL"), (1, "COMPLETE")]
    assert (study_dir / "trial_1" / "checkpoints" / "last.ckpt").is_file()
