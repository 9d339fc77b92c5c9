"""`python -m src.evaluate` and the best epoch a training run tests: the figures a run printed,
reproduced from its checkpoints; its own validation split; the gallery of mistakes; bad input."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from src.errors import CannotWrite, UserError
from src.evaluate import evaluate
from src.idx import validation_split
from src.train import train
from tests.conftest import compose_config, compose_train, entry_env, make_digits, write_dataset, write_idx

TESTED = re.compile(r"^test_loss: (\d+\.\d+) test_acc: (\d+\.\d+)(.*)$", re.M)
VAL_SIZE, EPOCHS = 100, 4


def train_printing(*overrides: str, run_dir: Path) -> tuple[float, str]:
    """A training run in this process: the metric it returns and what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        metric = train(compose_train("trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "model.hidden=16",
                                     *overrides), run_dir)
    return metric, printed.getvalue()


def run_evaluate(*overrides: str, run_dir: Path):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = evaluate(compose_config("evaluate", *overrides), run_dir)
    return result, printed.getvalue()


def val_per_epoch(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [row for row in csv.DictReader(f) if row.get("val/acc")]


def logged_figures(run_dir: Path) -> tuple[float, float]:
    """test/loss and test/acc as the training run logged them, unrounded."""
    with open(run_dir / "metrics.csv", newline="") as f:
        [row] = [row for row in csv.DictReader(f) if row.get("test/acc")]
    return float(row["test/loss"]), float(row["test/acc"])


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> tuple[Path, str]:
    """A run without a validation split on the tiny data: its folder and what it printed."""
    root = tmp_path_factory.mktemp("plain")
    _, printed = train_printing(f"data.data_dir={write_dataset(root / 'data')}", "trainer.max_epochs=2",
                                run_dir=root / "run")
    return root / "run", printed


@pytest.fixture(scope="module")
def best_run(tmp_path_factory) -> tuple[Path, float, str]:
    """A run whose val/acc falls every epoch, so that its best epoch is provably not its last: outside the
    validation split every training label is shifted by one class, so what it learns is wrong on the
    split (and on the test set, whose labels are true). Its folder, returned metric and printed lines."""
    root = tmp_path_factory.mktemp("best")
    data = write_dataset(root / "data")
    _, labels = make_digits(600, seed=1)  # the training labels conftest wrote
    shifted = (labels + 1) % 10
    _, held_out = validation_split(600, VAL_SIZE, 42)
    shifted[held_out.numpy()] = labels[held_out.numpy()]
    write_idx(data / "train-labels-idx1-ubyte.gz", shifted)
    metric, printed = train_printing(f"data.data_dir={data}", f"data.val_size={VAL_SIZE}",
                                     f"trainer.max_epochs={EPOCHS}", "optimizer.lr=3e-4", run_dir=root / "run")
    return root / "run", metric, printed


@pytest.mark.slow
def test_evaluate_reproduces_what_a_run_without_validation_printed(plain_run, tmp_path):
    run, printed = plain_run
    (loss, acc, note), = TESTED.findall(printed)
    assert note == ""  # the final weights were tested, and the line is the original's
    result, out = run_evaluate(f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", run_dir=tmp_path / "eval")
    assert f"test_loss: {loss} test_acc: {acc}" in out.splitlines()
    assert (result.loss, result.acc) == logged_figures(run)  # bit for bit: the same batches, averaged the same way

    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["ckpt_path"] == str(run / "checkpoints" / "last.ckpt") and metrics["split"] == "test"
    assert metrics["n"] == 200 and f"{metrics['loss']:.4f}" == loss and f"{metrics['acc']:.4f}" == acc
    # Every field docs/evaluate.md lists, the dataset and batch size as the run recorded them.
    assert sorted(metrics) == sorted(["ckpt_path", "split", "n", "loss", "acc", "per_class_acc", "dataset", "batch_size",
                                      "mistakes"])
    assert metrics["dataset"] == "mnist" and metrics["batch_size"] == 128
    _, labels = make_digits(200, seed=2)  # the test labels conftest wrote
    per_class = [metrics["per_class_acc"][str(k)] for k in range(10)]
    assert sum(a * np.sum(labels == k) for k, a in enumerate(per_class)) == pytest.approx(metrics["acc"] * 200)
    assert (tmp_path / "eval" / "confusion_matrix.png").is_file()


def test_a_class_the_split_has_no_image_of_has_no_accuracy(plain_run, tmp_path):
    run, _ = plain_run
    data = write_dataset(tmp_path / "data")
    _, labels = make_digits(200, seed=2)
    labels[labels == 9] = 8  # no test image of class 9 left
    write_idx(data / "t10k-labels-idx1-ubyte.gz", labels)
    result, _ = run_evaluate(f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"data_dir={data}", "gallery=0",
                             run_dir=tmp_path / "eval")
    assert result.per_class_acc["9"] is None and all(result.per_class_acc[str(k)] is not None for k in range(9))
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["per_class_acc"]["9"] is None  # null, not 0


@pytest.mark.slow
def test_a_run_with_validation_tests_its_best_epoch_and_evaluate_reproduces_it(best_run, tmp_path):
    run, metric, printed = best_run
    val_acc = [float(row["val/acc"]) for row in val_per_epoch(run)]
    assert len(val_acc) == EPOCHS and val_acc == sorted(val_acc, reverse=True) and val_acc[0] > val_acc[-1]
    (loss, acc, note), = TESTED.findall(printed)
    assert note == f" (best epoch 1 of {EPOCHS})"
    [best] = (run / "checkpoints").glob("best-*.ckpt")
    assert torch.load(best, weights_only=True)["epoch"] == 0
    assert metric == val_acc[0]  # a sweep gets the tested epoch's val/acc

    result, out = run_evaluate(f"ckpt_path={best}", run_dir=tmp_path / "best")
    assert f"test_loss: {loss} test_acc: {acc}" in out.splitlines()
    assert (result.loss, result.acc) == logged_figures(run)
    _, out = run_evaluate(f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", run_dir=tmp_path / "last")
    last_loss = re.search(r"^test_loss: (\S+) test_acc: \S+$", out, re.M).group(1)
    assert last_loss != loss  # the printed figures are not the final weights'


@pytest.mark.slow
def test_split_val_scores_the_runs_own_validation_images(best_run, tmp_path):
    run, _, _ = best_run
    [best] = (run / "checkpoints").glob("best-*.ckpt")
    result, out = run_evaluate(f"ckpt_path={best}", "split=val", run_dir=tmp_path / "eval")
    first_epoch = val_per_epoch(run)[0]
    # Bit for bit what training logged for this epoch: the same images, in the same batches.
    assert (result.loss, result.acc) == (float(first_epoch["val/loss"]), float(first_epoch["val/acc"]))
    assert f"val_loss: {result.loss:.4f} val_acc: {result.acc:.4f}" in out.splitlines()
    assert result.n == VAL_SIZE and result.mistakes
    _, labels = make_digits(600, seed=1)
    for mistake in result.mistakes:  # named by their place among the training images
        index = int(re.fullmatch(r"train\[(\d+)\]", mistake["image"]).group(1))
        assert mistake["true"] == str(labels[index])


@pytest.mark.slow
def test_split_val_rebuilds_the_split_from_the_checkpoints_seed_and_scores_in_its_batch_size(best_run, tmp_path):
    run, _, _ = best_run
    [best] = (run / "checkpoints").glob("best-*.ckpt")
    checkpoint = torch.load(best, weights_only=True)
    checkpoint["datamodule_hyper_parameters"].update(seed=7, batch_size=30)  # as a run with seed=7 data.batch_size=30
    torch.save(checkpoint, tmp_path / "seed7.ckpt")
    result, _ = run_evaluate(f"ckpt_path={tmp_path / 'seed7.ckpt'}", "split=val", run_dir=tmp_path / "eval")
    _, held_out = validation_split(600, VAL_SIZE, 7)
    assert result.mistakes and {m["image"] for m in result.mistakes} <= {f"train[{i}]" for i in held_out.tolist()}
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["batch_size"] == 30
    explicit, _ = run_evaluate(f"ckpt_path={tmp_path / 'seed7.ckpt'}", "split=val", "batch_size=30", "gallery=0",
                               run_dir=tmp_path / "b")
    assert (explicit.loss, explicit.acc) == (result.loss, result.acc)


def test_a_checkpoint_that_does_not_record_its_dataset_is_one_line(best_run, tmp_path):
    run, _, _ = best_run
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    del checkpoint["datamodule_hyper_parameters"]
    torch.save(checkpoint, tmp_path / "anonymous.ckpt")
    with pytest.raises(UserError, match=r"^ckpt_path='\S+anonymous.ckpt' does not record the dataset it was trained on, "
                                        r"so there is no split to score it on$"):
        run_evaluate(f"ckpt_path={tmp_path / 'anonymous.ckpt'}", run_dir=tmp_path / "eval")


@pytest.mark.slow
def test_the_gallery_is_the_most_confidently_wrong_images_most_confident_first(best_run, tmp_path):
    run, _, _ = best_run
    [best] = (run / "checkpoints").glob("best-*.ckpt")
    result, out = run_evaluate(f"ckpt_path={best}", run_dir=tmp_path / "eval")

    # The same from the checkpoint's weights with nothing of src: a plain forward pass over the test images.
    weights = torch.load(best, weights_only=True)["state_dict"]
    images, labels = make_digits(200, seed=2)
    x = torch.from_numpy(images.reshape(200, 784).astype(np.float32) / 255)
    hidden = torch.relu(x @ weights["net.0.weight"].T + weights["net.0.bias"])
    probabilities = torch.softmax(hidden @ weights["net.2.weight"].T + weights["net.2.bias"], dim=1)
    wrong = [i for i in range(200) if int(probabilities[i].argmax()) != labels[i]]
    expected = sorted(wrong, key=lambda i: -float(probabilities[i].max()))[:25]
    assert len(wrong) > 25
    assert f"mnist test split: 200 images, {len(wrong)} wrong" in out.splitlines()  # all of them, not the gallery's 25

    assert [m["image"] for m in result.mistakes] == [f"test[{i}]" for i in expected]
    assert [m["true"] for m in result.mistakes] == [str(labels[i]) for i in expected]
    assert [m["predicted"] for m in result.mistakes] == [str(int(probabilities[i].argmax())) for i in expected]
    assert [m["probability"] for m in result.mistakes] == pytest.approx(
        [float(probabilities[i].max()) for i in expected], abs=1e-5)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["mistakes"] == result.mistakes
    with Image.open(tmp_path / "eval" / "mistakes.png") as figure:
        assert figure.format == "PNG" and figure.width > 400 and figure.height > 400

    few, _ = run_evaluate(f"ckpt_path={best}", "gallery=3", run_dir=tmp_path / "few")
    assert few.mistakes == result.mistakes[:3]
    none, out = run_evaluate(f"ckpt_path={best}", "gallery=0", run_dir=tmp_path / "none")
    assert none.mistakes == [] and not (tmp_path / "none" / "mistakes.png").exists() and "gallery=0" in out


@pytest.mark.parametrize("override, message", [
    ("split=val", r"split='val' is not valid: \S+ was trained without a validation split \(data.val_size=0\); "
                  r"use split=test"),
    ("split=train", r"split='train' is not valid: expected one of test, val"),
    ("gallery=-1", r"gallery=-1 is not valid"),
    ("batch_size=0", r"batch_size=0 is not valid"),
    ("ckpt_path=missing.ckpt", r"ckpt_path='missing.ckpt' is not valid: no such file"),
    ("data_dir=EMPTY", r"mnist data not found in \S*empty"),
])
def test_bad_input_is_one_line(plain_run, tmp_path, override, message):
    run, _ = plain_run
    overrides = [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", override.replace("EMPTY", str(tmp_path / "empty"))]
    with pytest.raises(UserError, match=message):
        run_evaluate(*overrides, run_dir=tmp_path / "eval")
    assert not (tmp_path / "eval").exists()


@pytest.mark.slow
def test_metrics_json_that_cannot_be_written_is_one_line_naming_it(plain_run, tmp_path):
    run, _ = plain_run
    (tmp_path / "eval" / "metrics.json").mkdir(parents=True)  # in the way of the file, as a full disk would be
    with pytest.raises(CannotWrite) as failed:
        run_evaluate(f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", run_dir=tmp_path / "eval")
    assert str(failed.value) == f"cannot write {tmp_path / 'eval' / 'metrics.json'}: Is a directory"
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["confusion_matrix.png", "metrics.json", "mistakes.png"]


@pytest.mark.slow
def test_the_command_finds_the_newest_run_leaves_lightning_out_and_refuses_bad_input(plain_run, tmp_path):
    run, printed = plain_run
    copied = tmp_path / "outputs" / "2026-01-01" / "12-00-00" / "checkpoints" / "last.ckpt"
    copied.parent.mkdir(parents=True)
    copied.write_bytes((run / "checkpoints" / "last.ckpt").read_bytes())
    # Two commands in one interpreter, which saves a second start-up: a good one, then a bad one.
    code = ("import runpy, sys\n"
            "sys.argv = ['evaluate']\n"
            "runpy.run_module('src.evaluate', run_name='__main__')\n"
            "print('lightning imported:', any(m.split('.')[0] == 'lightning' for m in sys.modules), flush=True)\n"
            "sys.argv = ['evaluate', 'split=val']\n"
            "runpy.run_module('src.evaluate', run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=entry_env(), capture_output=True,
                            text=True, timeout=300)
    loss, acc, _ = TESTED.findall(printed)[0]
    assert f"test_loss: {loss} test_acc: {acc}" in result.stdout.splitlines(), result.stderr[-3000:]
    assert "the newest last.ckpt" in result.stdout and "lightning imported: False" in result.stdout
    [written] = (tmp_path / "outputs" / "evaluate").glob("*/*/metrics.json")
    assert f"{json.loads(written.read_text())['acc']:.4f}" == acc

    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: split='val' is not valid: {copied.relative_to(tmp_path)} was trained without a validation split "
        "(data.val_size=0); use split=test"]
