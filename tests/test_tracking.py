"""logger=tensorboard and logger=mlflow: what a run logs, read back with TensorBoard's and MLflow's own readers.

Every value is compared with metrics.csv, which the CSV logger writes in every run, and with the config.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import lightning as L
import pytest

from src.errors import UserError
from src.tracking import RUN_ID_KEY
from src.train import train
from tests.conftest import compose_train, entry_env, free_port, needs_extra, write_dataset
from tests.test_extras import run_without
from tests.test_reliability import interrupt_at_step

SETTINGS = ("trainer.max_epochs=2", "data.batch_size=64", "model.hidden=32", "trainer.accelerator=cpu", "seed=3")


def expected_params(data: Path, store: Path) -> dict:
    """The tracked run's whole config under the command line's keys, as tracked_run(data, store,
    "data.val_size=100") composes it: its settings, and the defaults of conf/ for the rest."""
    return {
        "data.name": "mnist", "data.data_dir": str(data), "data.batch_size": 64, "data.val_size": 100,
        "data.labels": "one_hot", "model.hidden": 32, "model.compile": False,
        "optimizer.name": "rmsprop", "optimizer.lr": 0.001, "optimizer.rho": 0.9, "optimizer.eps": 1e-07,
        "optimizer.momentum": 0.0, "optimizer.beta1": 0.9, "optimizer.beta2": 0.999,
        "trainer.accelerator": "cpu", "trainer.devices": 1, "trainer.strategy": "auto", "trainer.num_nodes": 1,
        "trainer.max_epochs": 2, "trainer.precision": None, "trainer.limit_train_batches": None,
        "trainer.limit_val_batches": None, "trainer.limit_test_batches": None, "trainer.fast_dev_run": False,
        "trainer.deterministic": None, "trainer.enable_progress_bar": True, "trainer.rendezvous_timeout_s": 300,
        "logger.tensorboard": True, "logger.mlflow": True, "logger.tracking_uri": f"sqlite:///{store}",
        "logger.experiment_name": None,
        "early_stopping.enabled": False, "early_stopping.patience": 3, "early_stopping.min_delta": 0.0,
        "seed": 3, "ckpt_path": None, "optimized_metric": None, "test_ckpt": None, "progress": "auto",
    }


def tracked_run(data: Path, store: Path, *extra: str):
    return compose_train(f"data.data_dir={data}", *SETTINGS, "logger=[tensorboard,mlflow]",
                         f"logger.tracking_uri=sqlite:///{store}", *extra)


def csv_series(metrics_csv: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.csv as {metric: [(step, value), ...]}, the form both trackers keep."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key not in ("epoch", "step") and value:
                    series.setdefault(key, []).append((int(row["step"]), float(value)))
    return series


def mlflow_series(client, run_id: str, keys) -> dict[str, list[tuple[int, float]]]:
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in keys}


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One 2-epoch run with a validation split, logged to TensorBoard and MLflow (its store in its own folder)."""
    needs_extra("track", "mlflow", "tensorboard")
    folder = tmp_path_factory.mktemp("tracked")
    data = write_dataset(folder / "data")
    cfg = tracked_run(data, folder / "mlruns.db", "data.val_size=100")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)  # the SQLite store keeps artifacts in ./mlruns, beside it
        train(cfg, folder / "run")
    return folder, expected_params(data, folder / "mlruns.db")


def test_tensorboard_holds_the_metrics_the_config_and_the_figures(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    folder, params = tracked
    run = folder / "run"
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    expected = csv_series(run / "metrics.csv")
    assert set(expected) == {"train/loss", "train/acc", "val/loss", "val/acc", "test/loss", "test/acc"}
    for key, points in expected.items():
        assert [(e.step, e.value) for e in events.Scalars(key)] == points, key  # float32, as logged
    assert {"training_curves", "confusion_matrix"} <= set(events.Tags()["images"])
    for tag in ("training_curves", "confusion_matrix"):
        assert events.Images(tag)[0].encoded_image_string.startswith(b"\x89PNG")

    # The HParams tab: the flattened config, and the metrics shown beside it.
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    logged = {key: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
              for key, value in start.hparams.items()}
    # TensorBoard has no null, and holds numbers and booleans as floats.
    assert logged == {k: (float(v) if isinstance(v, (bool, int, float)) else v) for k, v in params.items() if v is not None}
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} == set(expected)


def test_mlflow_holds_the_metrics_the_config_and_the_files(tracked):
    from mlflow import MlflowClient

    folder, params = tracked
    run_dir = folder / "run"
    client = MlflowClient(f"sqlite:///{folder / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("train")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params == {key: str(value) for key, value in params.items()}  # MLflow holds strings: 'None', '1e-07'

    expected = csv_series(run_dir / "metrics.csv")
    assert mlflow_series(client, run.info.run_id, expected) == expected

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"training_curves.png", "confusion_matrix.png", "checkpoints"} <= artifacts
    checkpoints = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert "last.ckpt" in checkpoints and any(name.startswith("best-") for name in checkpoints)
    local = Path(client.download_artifacts(run.info.run_id, "checkpoints/last.ckpt", str(folder / "download")))
    assert local.read_bytes() == (run_dir / "checkpoints" / "last.ckpt").read_bytes()
    assert (folder / "mlruns").is_dir()  # artifacts beside the store, in the working directory


def test_logger_experiment_name_names_the_mlflow_experiment(tracked, tmp_path):
    import shutil

    from src.config import validated
    from src.run_context import RunContext
    from src.tracking import _mlflow_logger

    folder, _ = tracked
    shutil.copy(folder / "mlruns.db", tmp_path / "mlruns.db")  # a store whose tables exist: it opens at once
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    config = validated(compose_train("logger=mlflow", f"logger.tracking_uri={uri}", "logger.experiment_name=digits"))
    logger = _mlflow_logger(config, tmp_path / "run", None, RunContext())
    assert logger.experiment.get_experiment(logger.experiment_id).name == "digits"
    logger.finalize("success")


@pytest.mark.slow
def test_a_resumed_run_continues_its_mlflow_run(tmp_path, monkeypatch, capsys):
    needs_extra("track", "mlflow", "tensorboard")
    import torch
    from mlflow import MlflowClient

    # A data folder whose path is longer than the 250 characters MLFlowLogger keeps of a param: unchanged on resume.
    data, store = write_dataset(tmp_path / ("d" * 120) / ("a" * 120) / "data"), tmp_path / "mlruns.db"
    assert len(str(data)) > 250
    monkeypatch.chdir(tmp_path)
    with monkeypatch.context() as patch:
        interrupt_at_step(patch, 14)  # Ctrl-C in the middle of the second epoch (10 steps each)
        with pytest.raises(SystemExit):
            train(tracked_run(data, store, "trainer.max_epochs=3"), tmp_path / "broken")
    checkpoint = tmp_path / "broken" / "checkpoints" / "last.ckpt"
    assert f"ckpt_path={checkpoint}" in capsys.readouterr().err
    client = MlflowClient(f"sqlite:///{store}")
    (interrupted,) = client.search_runs([client.get_experiment_by_name("train").experiment_id])
    assert interrupted.info.status == "FAILED"  # as Lightning marks a run that stopped early
    assert torch.load(checkpoint, weights_only=True)[RUN_ID_KEY] == interrupted.info.run_id

    class StatusAtStart(L.Callback):  # what the MLflow UI shows while the resumed run trains
        def on_train_start(self, trainer, pl_module):
            self.status = client.get_run(interrupted.info.run_id).info.status

    seen = StatusAtStart()
    train(tracked_run(data, store, "trainer.max_epochs=3", f"ckpt_path={checkpoint}"), tmp_path / "resumed",
          callbacks=(seen,))
    assert seen.status == "RUNNING"  # no longer FAILED
    (run,) = client.search_runs([client.get_experiment_by_name("train").experiment_id])
    assert run.info.run_id == interrupted.info.run_id and run.info.status == "FINISHED"
    # The history is the interrupted part followed by the resumed part, as the two metrics.csv files hold them.
    expected = csv_series(tmp_path / "broken" / "metrics.csv")
    for key, points in csv_series(tmp_path / "resumed" / "metrics.csv").items():
        expected[key] = expected.get(key, []) + points
    steps = [step for step, _ in expected["train/loss"]]
    assert len(steps) == 3 and steps == sorted(steps)  # epoch 1 before the stop, epochs 2 and 3 after it
    assert mlflow_series(client, run.info.run_id, expected) == expected
    # Params keep the first run's values (MLflow never changes one); what the resume changed is a tag.
    assert run.data.params["ckpt_path"] == "None"
    assert run.data.tags["resumed_with"] == f"ckpt_path={checkpoint}"
    assert {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "checkpoints")} == {"last.ckpt"}

    # Resumed into a store that lacks the checkpoint's run: a new run there, and a note saying so.
    resumed = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    assert torch.load(resumed, weights_only=True)[RUN_ID_KEY] == run.info.run_id
    capsys.readouterr()
    train(tracked_run(data, tmp_path / "other.db", "trainer.max_epochs=4", f"ckpt_path={resumed}"), tmp_path / "other")
    assert f"note: MLflow run {run.info.run_id} of this checkpoint is not in sqlite:///{tmp_path / 'other.db'}" \
        in capsys.readouterr().err
    other = MlflowClient(f"sqlite:///{tmp_path / 'other.db'}")
    (new,) = other.search_runs([other.get_experiment_by_name("train").experiment_id])
    assert new.info.run_id != run.info.run_id and new.info.status == "FINISHED"


def test_tensorboard_names_a_run_by_its_overrides_in_one_folder(tmp_path):
    needs_extra("track", "tensorboard")
    from src.config import validated
    from src.run_context import RunContext
    from src.tracking import build_loggers

    config = validated(compose_train("logger=tensorboard"))
    context = RunContext(override_dirname="data.data_dir=/data/mnist,model.hidden=16")
    csv_logger, tensorboard = build_loggers(config, tmp_path, None, context)[0]
    assert Path(csv_logger.log_dir) == tmp_path  # metrics.csv in the run's folder itself
    assert Path(tensorboard.log_dir) == tmp_path / "tensorboard" / "data.data_dir=_data_mnist,model.hidden=16"


def test_a_store_mlflow_cannot_open_is_one_line_before_training(tmp_path, monkeypatch):
    needs_extra("track", "mlflow")
    monkeypatch.chdir(tmp_path)
    cfg = compose_train(f"data.data_dir={write_dataset(tmp_path / 'data')}", *SETTINGS, "logger=mlflow",
                        "logger.tracking_uri=foo://host")
    with pytest.raises(UserError, match=r"^logger.tracking_uri='foo://host' is not valid: .*unsupported URI"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_sweep_names_each_job_in_tensorboard_and_puts_them_in_one_mlflow_experiment(tmp_path):
    needs_extra("track", "mlflow", "tensorboard")
    needs_extra("sweep", "hydra_plugins.hydra_joblib_launcher")
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = write_dataset(tmp_path / "data")
    sweep_dir = tmp_path / "sweep"
    env = entry_env("MLFLOW_TRACKING_URI")
    result = subprocess.run(
        [sys.executable, "-m", "src.train", "-m", f"data.data_dir={data}", "trainer.max_epochs=2", "data.batch_size=64",
         "model.hidden=16,32", "logger=[tensorboard,mlflow]", f"hydra.sweep.dir={sweep_dir}",
         "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",  # both jobs open the new store at once
         "hydra.job.config.override_dirname.exclude_keys=[data.data_dir]"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "mlruns.db").is_file()  # the default store, in the working directory

    for job, hidden in (("0", 16), ("1", 32)):
        (log_dir,) = (sweep_dir / job / "tensorboard").iterdir()
        # What `tensorboard --logdir SWEEP` calls the run: Hydra's override_dirname, less the excluded keys.
        assert log_dir.name == f"data.batch_size=64,logger=[tensorboard,mlflow],model.hidden={hidden},trainer.max_epochs=2"
        events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0}).Reload()
        assert [(e.step, e.value) for e in events.Scalars("test/acc")] == csv_series(sweep_dir / job / "metrics.csv")["test/acc"]

    client = MlflowClient("sqlite:///" + str(tmp_path / "mlruns.db"))
    experiment = client.get_experiment_by_name("train")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2
    assert {run.info.run_name for run in runs} == {f"data.data_dir={data} trainer.max_epochs=2 data.batch_size=64 "
                                                   f"model.hidden={h} logger=[tensorboard,mlflow]" for h in (16, 32)}
    assert {run.data.tags["sweep"] for run in runs} == {str(sweep_dir)}
    assert {(run.data.tags["job"], run.data.tags["overrides"]) for run in runs} == {
        (str(job), f"data.data_dir={data} trainer.max_epochs=2 data.batch_size=64 model.hidden={h} logger=[tensorboard,mlflow]")
        for job, h in ((0, 16), (1, 32))}  # which job ran which settings, searchable in the UI
    assert {run.data.params["model.hidden"] for run in runs} == {"16", "32"}


@pytest.mark.slow
def test_mlflow_ui_lists_the_runs_of_the_store(tracked):
    folder, _ = tracked
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen([str(mlflow), "ui", "--backend-store-uri", f"sqlite:///{folder / 'mlruns.db'}",
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)  # its own process group: the workers stop with it
    try:
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow"
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/experiments/get-by-name?experiment_name=train", timeout=5) as reply:
                    experiment = json.load(reply)["experiment"]
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "mlflow ui did not start"
                time.sleep(0.5)
        query = json.dumps({"experiment_ids": [experiment["experiment_id"]]}).encode()
        request = urllib.request.Request(f"{url}/runs/search", data=query, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as reply:
            runs = json.load(reply)["runs"]
        assert len(runs) == 1 and runs[0]["info"]["status"] == "FINISHED"
        params = {p["key"]: p["value"] for p in runs[0]["data"]["params"]}
        assert params["model.hidden"] == "32"
        artifacts = f"{url}/artifacts/list?run_id={runs[0]['info']['run_id']}"
        with urllib.request.urlopen(artifacts, timeout=10) as reply:
            assert "confusion_matrix.png" in {f["path"] for f in json.load(reply)["files"]}
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server, its worker and MLflow's job consumers
        server.wait(timeout=30)
    assert stopped(server.pid), "a process of mlflow ui outlived SIGTERM"


def stopped(group: int, wait: float = 15) -> bool:
    """Whether every process of a group has exited (killed if not, after `wait` seconds)."""
    deadline = time.time() + wait
    while time.time() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    os.killpg(group, signal.SIGKILL)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("logger", ["mlflow", "tensorboard"])
def test_a_logger_without_the_track_extra_names_the_extra(tmp_path, logger):
    result = run_without([logger], "src.train", f"logger={logger}", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: logger={logger} needs the 'track' extra, which is not installed "
                                     f"(no module named {logger}): pip install -e \".[track]\"")
    assert not (tmp_path / "mlruns.db").exists()


DEFAULT_RUN = """
import atexit, runpy, sys
atexit.register(lambda: print("imported:", sorted(m for m in ("mlflow", "tensorboard", "torch.utils.tensorboard")
                                                   if m in sys.modules)))
sys.argv = ["src.train", *{args!r}]
runpy.run_module("src.train", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_a_default_run_neither_imports_nor_writes_a_tracker(tmp_path):
    data = write_dataset(tmp_path / "data")
    env = entry_env()
    args = [f"data.data_dir={data}", "trainer.max_epochs=1", "model.hidden=16", f"hydra.run.dir={tmp_path / 'run'}"]
    result = subprocess.run([sys.executable, "-c", DEFAULT_RUN.format(args=args)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "imported: []" in result.stdout
    written = {str(p.relative_to(tmp_path / "run")) for p in (tmp_path / "run").rglob("*")}
    assert written == {".hydra", ".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "checkpoints",
                       "checkpoints/last.ckpt", "metrics.csv", "hparams.yaml", "training_curves.png",
                       "confusion_matrix.png", "train.log"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "run"]
