"""The book's three editions as presets: experiment=dlwp1 (the default), dlwp2, dlwp3."""

from __future__ import annotations

import re
import subprocess
import sys

import lightning as L
import pytest
import torch

from src.config import validated
from src.errors import UserError
from src.data import MNISTDataModule
from src.model import MNISTClassifier
from src.train import train
from tests.conftest import ROOT, compose_train, entry_env, make_digits


def optimizer_and_labels(*overrides: str) -> tuple[dict, str]:
    config = validated(compose_train(*overrides))
    return vars(config.optimizer), config.data.labels


# What each edition's chapter-2 notebook compiles with (see conf/experiment/*.yaml), and Keras's defaults.
RMSPROP = {"name": "rmsprop", "lr": 1e-3, "rho": 0.9, "eps": 1e-7}
ADAM = {"name": "adam", "lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-7}


@pytest.mark.parametrize("overrides, optimizer, labels", [
    ((), RMSPROP, "one_hot"),  # the default is the 1st edition, the study note's program
    (("experiment=dlwp1",), RMSPROP, "one_hot"),
    (("experiment=dlwp2",), RMSPROP, "integer"),
    (("experiment=dlwp3",), ADAM, "integer"),
])
def test_each_edition_sets_its_optimizer_and_labels(overrides, optimizer, labels):
    got_optimizer, got_labels = optimizer_and_labels(*overrides)
    assert {key: got_optimizer[key] for key in optimizer} == optimizer
    assert got_labels == labels


def test_the_command_line_still_overrides_an_edition():
    optimizer, labels = optimizer_and_labels("experiment=dlwp3", "optimizer=rmsprop", "data.labels=one_hot")
    assert optimizer["name"] == "rmsprop" and labels == "one_hot"
    optimizer, _ = optimizer_and_labels("experiment=dlwp3", "optimizer.lr=0.01")
    assert optimizer["name"] == "adam" and optimizer["lr"] == 0.01


def test_bad_label_encoding_is_refused():
    expected = "data.labels='onehot' is not valid: expected one of one_hot, integer"
    with pytest.raises(UserError, match=re.escape(expected)):
        validated(compose_train("data.labels=onehot"))


def test_integer_labels_are_the_digits(tiny_data):
    dm = MNISTDataModule(data_dir=str(tiny_data), labels="integer")
    dm.setup("fit")
    x, y = dm.train_xy
    _, labels = make_digits(600, seed=1)  # what conftest wrote
    assert y.dtype == torch.int64 and torch.equal(y, torch.from_numpy(labels).long())
    assert dm.test_xy[1].shape == (200,) and x.shape == (600, 784)


def test_integer_labels_train_as_one_hot_labels_do(tiny_data):
    """Sparse categorical cross-entropy of a digit is categorical cross-entropy of its one-hot row:
    from the same seed, two epochs end with the same weights and test metrics (dlwp2 trains as dlwp1)."""
    results = {}
    for labels in ("one_hot", "integer"):
        L.seed_everything(3)
        dm = MNISTDataModule(data_dir=str(tiny_data), batch_size=64, seed=3, labels=labels)
        model = MNISTClassifier(hidden=32)
        trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        trainer.fit(model, datamodule=dm)
        test = trainer.test(model, datamodule=dm, verbose=False)[0]
        results[labels] = (model.net.state_dict(), test)
    (weights_1, test_1), (weights_2, test_2) = results.values()
    for key in weights_1:  # bit for bit, as the docs say: F.cross_entropy computes the two alike on the CPU
        assert torch.equal(weights_2[key], weights_1[key]), key
    # The test loss to float32's last bits: F.cross_entropy averages a batch's losses in another kernel for class
    # indices than for one-hot rows, and on one thread (tests/conftest.py) the two sums round apart by 1e-7.
    assert test_2["test/acc"] == test_1["test/acc"] and test_2.keys() == test_1.keys()
    assert test_2["test/loss"] == pytest.approx(test_1["test/loss"], rel=1e-6, abs=0)


@pytest.mark.slow
def test_third_edition_trains_and_its_checkpoint_says_how(tiny_data, tmp_path, capsys):
    cfg = compose_train("experiment=dlwp3", f"data.data_dir={tiny_data}", "trainer.max_epochs=2",
                        "trainer.accelerator=cpu", "model.hidden=32")
    assert train(cfg, tmp_path / "run") > 0.9, "the bar pattern is easy to learn"
    assert re.search(r"^test_loss: \d\.\d{4} test_acc: \d\.\d{4}$", capsys.readouterr().out, re.M)
    checkpoint = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)
    assert checkpoint["datamodule_hyper_parameters"]["labels"] == "integer"
    assert checkpoint["hyper_parameters"]["optimizer"] == "adam"
    assert isinstance(checkpoint["optimizer_states"][0]["state"][0]["exp_avg_sq"], torch.Tensor)  # Adam's state


@pytest.mark.slow
def test_help_lists_the_editions():
    result = subprocess.run([sys.executable, "-m", "src.train", "--help"], cwd=ROOT, env=entry_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "experiment: dlwp1, dlwp2, dlwp3" in result.stdout
