"""The LightningModule's own promises, checked in-process on a few images: probabilities from predict_step,
the running figures the progress bar shows, the test's confusion counts, and no diverged model saved."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from src.data import MNISTDataModule
from src.model import DivergedError, MNISTClassifier


def batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 784, generator=generator)
    y = torch.nn.functional.one_hot(torch.arange(n) % 10, 10).float()
    return x, y


def test_predict_step_gives_the_softmax_of_the_logits():
    torch.manual_seed(0)
    model = MNISTClassifier(hidden=16)
    x, _ = batch()
    probabilities = model.predict_step((x,))
    torch.testing.assert_close(probabilities, model(x).softmax(dim=1))
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(len(x)))


def test_running_metrics_are_the_epochs_mean_loss_and_accuracy_so_far():
    torch.manual_seed(0)
    model = MNISTClassifier(hidden=16)
    assert model.running_metrics("train") == {}  # before the first step: nothing to show
    batches = [batch(seed=s) for s in (1, 2)]
    losses = [float(model._step("train", b)) for b in batches]
    with torch.no_grad():
        right = sum(int((model(x).argmax(1) == y.argmax(1)).sum()) for x, y in batches)
    shown = model.running_metrics("train")
    assert shown == pytest.approx({"loss": sum(losses) / 2, "acc": right / 16}, abs=1e-6)


def test_the_test_confusion_counts_every_test_image_and_agrees_with_test_acc(tiny_data):
    torch.manual_seed(0)
    model = MNISTClassifier(hidden=16)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    datamodule = MNISTDataModule(data_dir=str(tiny_data), val_size=100)
    trainer.validate(model, datamodule=datamodule, verbose=False)  # as in training: validation before the test
    [result] = trainer.test(model, datamodule=datamodule, verbose=False)
    confusion = model.test_confusion
    assert confusion.shape == (10, 10) and int(confusion.sum()) == 200  # the 200 test images, each once, and no others
    assert float(confusion.diag().sum() / 200) == pytest.approx(result["test/acc"], abs=1e-6)
    dm = MNISTDataModule(data_dir=str(tiny_data))
    dm.setup("test")
    # Rows are the true classes: each row holds as many images as the test set has of that class.
    assert confusion.sum(dim=1).tolist() == torch.bincount(dm.test_xy[1].argmax(dim=1), minlength=10).tolist()
    # A second test run (a notebook's cell run again) counts its own images, not the first run's again.
    trainer.test(model, datamodule=datamodule, verbose=False)
    assert torch.equal(model.test_confusion, confusion)


@pytest.mark.parametrize("how, reason", [
    ("weights", "the weights are no longer finite"),
    ("loss", "train/loss reached 2e[+]04"),  # over DIVERGED_LOSS, 1e4: far above a start near ln(10)
])
def test_no_save_writes_a_diverged_model(how, reason):
    """Every save passes on_save_checkpoint, the one on Ctrl-C too, not only the epoch's end."""
    model = MNISTClassifier(hidden=16)
    if how == "weights":
        with torch.no_grad():
            model.net[0].weight[0, 0] = float("nan")
    else:
        model.train_loss.update(torch.tensor(2e4))
    with pytest.raises(DivergedError, match=f"^training diverged in epoch 1: {reason} "):
        model.on_save_checkpoint({})


def test_a_high_but_ordinary_loss_is_not_divergence():
    model = MNISTClassifier(hidden=16)
    model.train_loss.update(torch.tensor(5e3))
    model.on_save_checkpoint({})  # no error


def test_a_nan_loss_stays_in_the_epochs_mean():
    """A batch whose loss is NaN makes the epoch's loss NaN, as Keras shows it: a mean that left it out would print
    a plausible val/test loss, and the divergence check would read a finite train/loss."""
    model = MNISTClassifier(hidden=16)
    x, y = batch()
    model._step("val", (x, y))
    x[0, 0] = float("nan")
    model._step("val", (x, y))
    assert math.isnan(model.running_metrics("val")["loss"])
