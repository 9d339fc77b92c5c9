"""Training end to end: Keras parity of the update, the Hydra entry point, its outputs and errors."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import subprocess
import sys

import lightning as L
import pytest
import torch

from src.config import validated
from src.errors import UserError
from src.data import MNISTDataModule
from src.model import MNISTClassifier
from src.network import KerasRMSprop
from src.train import train
from tests.conftest import ROOT, compose_config, compose_train, logged, needs, needs_fashion

LINE = re.compile(r"^test_loss: (\d+\.\d+) test_acc: (\d+\.\d+)$", re.M)
LINE_WITH_EPOCH = re.compile(r"^test_loss: \d+\.\d+ test_acc: \d+\.\d+ (\(best epoch \d+ of \d+\))$", re.M)


def run_cli(*args: str, cwd, env_extra=None) -> subprocess.CompletedProcess:
    # A proxy that refuses connections: a missing dataset can never be downloaded by a test.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
           **(env_extra or {})}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "src.train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_init_matches_keras_dense():
    model = MNISTClassifier()
    first, last = model.net[0], model.net[2]
    assert torch.count_nonzero(first.bias) == 0 and torch.count_nonzero(last.bias) == 0
    limit = (6 / (784 + 512)) ** 0.5  # glorot-uniform bound
    assert first.weight.abs().max() <= limit and first.weight.abs().max() > 0.95 * limit


def test_steps_match_a_hand_written_loop_with_keras_rmsprop(tiny_data):
    """N optimisation steps through Lightning give the weights of a plain loop with Keras's update."""
    steps = 7
    L.seed_everything(0)
    dm = MNISTDataModule(data_dir=str(tiny_data), batch_size=32, seed=5)
    dm.prepare_data()
    dm.setup("fit")
    model = MNISTClassifier(hidden=64)
    start = {k: v.clone() for k, v in model.net.state_dict().items()}
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(0)
    batches = list(loader)[:steps]

    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(model, datamodule=dm)

    # The hand-written reference: Keras's RMSprop, w -= lr * g / sqrt(v + eps), v = rho v + (1 - rho) g^2.
    w = {k: v.clone().requires_grad_() for k, v in start.items()}
    velocity = {k: torch.zeros_like(v) for k, v in w.items()}
    lr, rho, eps = 1e-3, 0.9, 1e-7
    for x, y in batches:
        hidden = torch.relu(x @ w["0.weight"].T + w["0.bias"])
        loss = -(y * torch.log_softmax(hidden @ w["2.weight"].T + w["2.bias"], dim=1)).sum(dim=1).mean()
        grads = torch.autograd.grad(loss, list(w.values()))
        with torch.no_grad():
            for (k, p), g in zip(w.items(), grads):
                velocity[k] = rho * velocity[k] + (1 - rho) * g * g
                p -= lr * g / torch.sqrt(velocity[k] + eps)

    trained = model.net.state_dict()
    for k in start:
        assert not torch.equal(trained[k], start[k]), f"{k} did not move"
        torch.testing.assert_close(trained[k], w[k].detach(), rtol=1e-5, atol=1e-6)


class FirstWeights(L.Callback):
    def on_fit_start(self, trainer, pl_module):
        self.weights = {k: v.clone() for k, v in pl_module.net.state_dict().items()}


def test_train_through_hydra_writes_the_run_folder(tiny_data, tmp_path, capsys):
    cfg = compose_train(f"data.data_dir={tiny_data}", "trainer.max_epochs=2", "trainer.accelerator=cpu",
                        "data.batch_size=64", "seed=3")
    first = FirstWeights()
    metric = train(cfg, tmp_path / "run", callbacks=(first,))
    L.seed_everything(3)
    seeded = MNISTClassifier().net.state_dict()  # the network starts from the weights seed=3 draws
    assert all(torch.equal(first.weights[k], seeded[k]) for k in seeded)
    out = capsys.readouterr().out
    loss, acc = map(float, LINE.search(out).groups())
    assert metric == pytest.approx(acc, abs=1e-4)  # no validation split: test/acc is returned
    assert acc > 0.9, "the bar pattern is easy to learn"
    run = tmp_path / "run"
    for name in ("checkpoints/last.ckpt", "metrics.csv", "training_curves.png", "confusion_matrix.png"):
        assert (run / name).is_file(), name
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"epoch", "train/loss", "train/acc", "test/loss", "test/acc"} <= set(header)

    checkpoint = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2 * 10  # 600 images in batches of 64: 10 steps per epoch
    assert checkpoint["hyper_parameters"]["hidden"] == 512
    assert checkpoint["datamodule_hyper_parameters"]["data_dir"] == str(tiny_data)
    restored = MNISTClassifier.load_from_checkpoint(run / "checkpoints/last.ckpt", weights_only=True)
    assert restored.hparams.optimizer == "rmsprop"


class SetLearningRate(L.Callback):
    """From the start of epoch `epoch` (0-based) on, train with learning rate `lr`."""

    def __init__(self, epoch: int, lr: float):
        self.epoch, self.lr = epoch, lr

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            for group in trainer.optimizers[0].param_groups:
                group["lr"] = self.lr


def test_validation_split_is_logged_and_the_best_epoch_is_kept(tiny_data, tmp_path, capsys):
    # Two epochs of learning, then one of gradient ascent (a negative learning rate): val/acc rises,
    # then falls (0.51, 0.71, 0.09 here), so the best epoch is neither the first nor the last.
    # Early stopping with a patience longer than the run watches, and never stops it.
    cfg_args = (f"data.data_dir={tiny_data}", "trainer.max_epochs=3", "trainer.accelerator=cpu", "data.val_size=100",
                "model.hidden=32", "optimizer.lr=3e-4", "data.batch_size=64", "early_stopping.enabled=true",
                "early_stopping.patience=3")
    metric = train(compose_train(*cfg_args), tmp_path / "run", callbacks=(SetLearningRate(2, -3e-3),))
    out = capsys.readouterr().out
    assert "early stopping" not in out  # it ran all its epochs
    val_acc = logged(tmp_path / "run" / "metrics.csv", "val/acc")
    best = val_acc.index(max(val_acc))
    assert best == 1 and val_acc[0] < val_acc[1] > val_acc[2]
    assert len(val_acc) == 3 and metric == pytest.approx(val_acc[best])  # the tested, best epoch's is returned

    checkpoints = tmp_path / "run" / "checkpoints"
    # named by the epoch as the console counts it (Epoch 2/3), its "epoch" Lightning's count from 0
    assert sorted(p.name for p in checkpoints.iterdir()) == [f"best-epoch02-val_acc{val_acc[1]:.4f}.ckpt", "last.ckpt"]
    saved = torch.load(next(checkpoints.glob("best-*.ckpt")), weights_only=True)
    assert (saved["epoch"], saved["global_step"]) == (1, 2 * 8)  # 500 training images in batches of 64
    # It holds that epoch's weights: they score its val/acc on the validation split.
    dm = MNISTDataModule(data_dir=str(tiny_data), batch_size=64, val_size=100, seed=42)
    dm.setup("fit")
    x, y = dm.val_xy
    model = MNISTClassifier(hidden=32)
    model.load_state_dict(saved["state_dict"])
    with torch.no_grad():
        assert (model(x).argmax(1) == y.argmax(1)).float().mean().item() == pytest.approx(val_acc[1], abs=1e-6)
        # and they are the weights tested: their test accuracy is the one logged and printed
        x_test, y_test = dm.test_xy
        test_acc = (model(x_test).argmax(1) == y_test.argmax(1)).float().mean().item()
    assert logged(tmp_path / "run" / "metrics.csv", "test/acc") == [pytest.approx(test_acc, abs=1e-6)]
    assert LINE_WITH_EPOCH.search(out).group(1) == "(best epoch 2 of 3)" and f"test_acc: {test_acc:.4f}" in out
    # last.ckpt holds the best checkpoint's record of the same epoch: it saved first.
    states = torch.load(checkpoints / "last.ckpt", weights_only=True)["callbacks"]
    [record] = [state for key, state in states.items() if "'monitor': 'val/acc'" in key and "best_model_path" in state]
    assert record["best_model_path"] == str(next(checkpoints.glob("best-*.ckpt")))

    # Resumed in its folder after its last epoch (a job run again): it tests the same best epoch and returns that
    # epoch's val/acc, which the checkpoint's record of every epoch keeps.
    again = train(compose_train(*cfg_args, f"ckpt_path={checkpoints / 'last.ckpt'}"), tmp_path / "run")
    assert again == metric and f"test_acc: {test_acc:.4f} (best epoch 2 of 3)" in capsys.readouterr().out
    # Its metrics.csv keeps the rows of the epochs it had trained, and holds the test's row once, the new one's.
    assert logged(tmp_path / "run" / "metrics.csv", "val/acc") == val_acc
    assert logged(tmp_path / "run" / "metrics.csv", "test/acc") == [pytest.approx(test_acc, abs=1e-6)]
    # optimized_metric names what is returned instead: the tested, best epoch's val/loss
    val_loss = logged(tmp_path / "run" / "metrics.csv", "val/loss")[best]
    loss = train(compose_train(*cfg_args, f"ckpt_path={checkpoints / 'last.ckpt'}", "optimized_metric=val/loss"),
                 tmp_path / "run")
    assert loss == pytest.approx(val_loss, rel=1e-5)


@pytest.mark.parametrize("name, optimizer, keras_defaults", [
    ("adam", torch.optim.Adam, {"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-07}),
    ("sgd", torch.optim.SGD, {"lr": 0.01, "momentum": 0.0}),
])
def test_adam_and_sgd_train_with_keras_defaults(tiny_data, tmp_path, name, optimizer, keras_defaults):
    class RecordOptimizer(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.optimizer = trainer.optimizers[0]

    record = RecordOptimizer()
    train(compose_train(f"data.data_dir={tiny_data}", f"optimizer={name}", "trainer.max_epochs=3",
                        "trainer.accelerator=cpu", "model.hidden=32", "data.batch_size=32"), tmp_path / "run",
          callbacks=(record,))
    assert type(record.optimizer) is optimizer
    (group,) = record.optimizer.param_groups
    assert {key: group[key] for key in keras_defaults} == keras_defaults
    losses = logged(tmp_path / "run" / "metrics.csv", "train/loss")
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2], losses  # it learns


@pytest.mark.parametrize("overrides, optimizer, expected", [
    (("optimizer.lr=0.01", "optimizer.rho=0.8", "optimizer.eps=1e-5"), KerasRMSprop,
     {"lr": 0.01, "rho": 0.8, "eps": 1e-5}),
    (("optimizer=adam", "optimizer.lr=0.01", "optimizer.beta1=0.8", "optimizer.beta2=0.99", "optimizer.eps=1e-5"),
     torch.optim.Adam, {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-5}),
    (("optimizer=sgd", "optimizer.lr=0.1", "optimizer.momentum=0.9"), torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
])
def test_every_optimizer_setting_of_the_config_reaches_the_optimizer(overrides, optimizer, expected):
    """Settings away from Keras's defaults (which the test above sees) are not dropped on the way: a setting the
    optimizer ignored would train with its default and say nothing. And a checkpoint's model builds the same one."""
    settings = dataclasses.asdict(validated(compose_train(*overrides)).optimizer)
    model = MNISTClassifier(hidden=8, optimizer=settings.pop("name"), **settings)
    for built in (model.configure_optimizers(), MNISTClassifier(**model.hparams).configure_optimizers()):
        assert type(built) is optimizer
        (group,) = built.param_groups
        assert {key: group[key] for key in expected} == expected


@pytest.mark.slow
def test_early_stopping_ends_a_run_whose_val_acc_stopped_rising_and_tests_its_best_epoch(tiny_data, tmp_path, capsys):
    # val/acc cannot rise above 1.0, and this easy pattern reaches it within a few epochs: from there on
    # it provably stops improving, so with a patience of 2 the run ends 2 epochs later, long before 10.
    args = [f"data.data_dir={tiny_data}", "trainer.accelerator=cpu", "trainer.max_epochs=10", "data.val_size=100",
            "model.hidden=16", "optimizer.lr=0.02", "early_stopping.enabled=true", "early_stopping.patience=2"]
    train(compose_train(*args), tmp_path / "run")
    out = capsys.readouterr().out
    val_acc = logged(tmp_path / "run" / "metrics.csv", "val/acc")
    first_perfect = val_acc.index(1.0) + 1  # an epoch number, from 1
    assert len(val_acc) == first_perfect + 2 < 10
    assert ("early stopping: val/acc did not rise by more than 0.0 for 2 epochs, so training stopped after "
            f"epoch {first_perfect + 2} of 10") in out
    assert LINE_WITH_EPOCH.search(out).group(1) == f"(best epoch {first_perfect} of {first_perfect + 2})"

    # last.ckpt resumes, with the stopper's count: val/acc is still 1.0, so one more epoch ends it again.
    # (In a new folder Lightning's ModelCheckpoint starts its best anew: it is the resumed run's epoch.)
    train(compose_train(*args, f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}"), tmp_path / "resumed")
    out = capsys.readouterr().out
    assert f"training stopped after epoch {first_perfect + 3} of 10" in out
    assert LINE_WITH_EPOCH.search(out).group(1) == f"(best epoch {first_perfect + 3} of {first_perfect + 3})"


@pytest.mark.parametrize("override, key", [
    ("data.batch_size=0", "data.batch_size=0"),
    ("trainer.max_epochs=-1", "trainer.max_epochs=-1"),
    ("optimizer.lr=-1", "optimizer.lr=-1.0"),
    ("optimizer.eps=0", "optimizer.eps=0.0 is not valid: expected a number > 0"),
    ("model.hidden=0", "model.hidden=0 is not valid: expected a positive integer"),
    ("progress=bogus", "progress='bogus' is not valid: expected one of auto, bar, lines"),
    ("data.val_size=-5", "data.val_size=-5"),
    ("trainer.devices=0", "trainer.devices=0"),
    ("test_ckpt=best", "test_ckpt='best' is not valid: the best epoch is chosen on val/acc, which needs a validation split"),
    ("test_ckpt=first", "test_ckpt='first' is not valid: expected one of best, last"),
    ("early_stopping.enabled=true", "early_stopping.enabled=true is not valid: early stopping watches val/acc, which "
                                    "needs a validation split"),
    ("early_stopping.patience=0", "early_stopping.patience=0 is not valid"),
    ("trainer.rendezvous_timeout_s=0", "trainer.rendezvous_timeout_s=0 is not valid: expected a whole number of "
                                       "seconds, 1 or more"),
    ("optimized_metric=val/loss", "optimized_metric='val/loss' is not valid: a validation metric needs a validation split"),
    ("trainer.limit_test_batches=0", "trainer.limit_test_batches=0 is not valid: every run ends by testing"),
    ("trainer.limit_test_batches=0.0", "trainer.limit_test_batches=0.0 is not valid: every run ends by testing"),
    # Forced in with +, a key Hydra lets through would be dropped silently by OmegaConf.to_object, nested or not.
    ("+data.bogus=1", "data.bogus is not a known key: valid keys of data are name, data_dir, batch_size, val_size, "
                      "labels"),
    ("+early_stopping.patiense=2", "early_stopping.patiense is not a known key: valid keys of early_stopping are "
                                   "enabled, patience, min_delta"),
])
def test_bad_values_are_refused_before_anything_runs(tmp_path, override, key):
    with pytest.raises(UserError, match=re.escape(key)):
        train(compose_train(override, f"data.data_dir={tmp_path / 'never-created'}"), tmp_path / "run")
    assert not (tmp_path / "never-created").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("limit", ["0", "0.0"])
def test_validation_turned_off_with_a_validation_split_is_refused(tmp_path, limit):
    """Without validation batches a run with data.val_size has no val/acc to return, to test the best epoch of, or
    to stop early on: refused at once, not a KeyError once training and testing are done."""
    with pytest.raises(UserError, match=re.escape(f"trainer.limit_val_batches={limit} is not valid: validation is "
                                                  "what data.val_size=100 holds images out for")):
        train(compose_train("data.val_size=100", f"trainer.limit_val_batches={limit}",
                            f"data.data_dir={tmp_path / 'never-created'}"), tmp_path / "run")
    assert not (tmp_path / "never-created").exists() and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_compiled_network_trains_and_its_checkpoint_loads_everywhere(tiny_data, tmp_path, caplog, capsys):
    """model.compile=true: the first step (the compiling) is reported apart from the others, and the
    checkpoint has the uncompiled network's keys, so predict, the page and export read it unchanged."""
    needs(shutil.which(os.environ.get("CXX", "g++")) is not None, "model.compile on the CPU needs g++ (apt-get install g++)")
    cfg = compose_train(f"data.data_dir={tiny_data}", "trainer.max_epochs=1", "trainer.accelerator=cpu",
                        "data.batch_size=64", "model.hidden=32", "model.compile=true")
    with caplog.at_level(logging.INFO):
        assert train(cfg, tmp_path / "run") > 0.5
    timed = re.search(r"model\.compile: the first step took (\d+\.\d+) s \(compiling the network\), "
                      r"the next 9 steps (\d+\.\d+) s", caplog.text)
    assert timed, caplog.text[-2000:]
    assert float(timed[1]) > 2 * float(timed[2]) / 9, "compiling makes the first step far slower than the others"
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    keys = [k for k in torch.load(checkpoint, weights_only=True)["state_dict"] if k.startswith("net.")]
    assert keys == [f"net.{k}" for k in MNISTClassifier(hidden=32).net.state_dict()]

    from src.export import export
    from src.inference import load_model
    from src.predict import predict

    [result] = predict(compose_config("predict", f"ckpt_path={checkpoint}", "idx=0"), tmp_path / "predicted")
    assert int(result.probabilities.argmax()) == result.label
    page = load_model(checkpoint)  # as the page loads it
    torch.testing.assert_close(page.probabilities(result.image[None])[0], result.probabilities)
    export(compose_config("export", f"ckpt_path={checkpoint}", "format=torchscript", f"out={tmp_path / 'model.pt'}"))
    assert "same class for 200/200" in capsys.readouterr().out


def test_compiling_without_a_cpu_compiler_is_one_clear_error(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    cfg = compose_train(f"data.data_dir={tiny_data}", "trainer.accelerator=cpu", "model.compile=true")
    with pytest.raises(UserError, match=r"model\.compile=true is not valid on this machine: .*C\+\+ compiler, "
                                        r"and no-such-compiler was not found"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize("args, expected", [
    (["data.data_dir=EMPTY"], r"mnist data not found in \S*empty.*train-images-idx3-ubyte.*t10k-labels-idx1-ubyte"),
    (["data.batch_size=abc"], r"data\.batch_size=abc.*Integer"),
    (["trainer.max_epochs=-1"], r"trainer\.max_epochs=-1 is not valid"),
    (["data.bogus=1"], r"data\.bogus.*valid keys are name, data_dir, batch_size, val_size"),
    (["optimizer=nope"], r"optimizer/nope.*adam, rmsprop, sgd"),
    (["ckpt_path=missing.ckpt"], r"ckpt_path='missing.ckpt' is not valid: no such file"),
    (["data.data_dir=TINY", "model.hidden=32", "optimizer.lr=1e6"],
     r"^error: training diverged in epoch 1: train/loss reached \S+ \(optimizer\.lr=1000000\.0 is likely too large\); "
     r"no checkpoint of it was written$"),
])
def test_bad_input_gets_one_line_and_no_traceback(tmp_path, tiny_data, args, expected):
    args = [a.replace("EMPTY", str(tmp_path / "empty")).replace("TINY", str(tiny_data)) for a in args]
    result = run_cli(*args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(expected, errors[0]), result.stderr[-2000:]


@pytest.mark.slow
def test_fashion_mnist_reaches_keras_accuracy(tmp_path, capsys):
    """5 epochs with the defaults; Keras with the same model and settings reached 0.866-0.875."""
    needs_fashion()
    cfg = compose_train("data=fashion_mnist", f"data.data_dir={tmp_path / 'data'}", "trainer.accelerator=cpu")
    acc = train(cfg, tmp_path / "run")
    assert acc >= 0.86, acc
    assert LINE.search(capsys.readouterr().out)
