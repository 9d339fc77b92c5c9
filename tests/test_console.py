"""What a training run prints, as Keras's fit() prints it (src/console.py): in a file, one line per epoch with
metrics.csv's figures, the device and the layers before it; on a terminal, the bar, `Epoch 1/N`."""

from __future__ import annotations

import csv
import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from src import console
from src.callbacks import KerasEpochCheckpoint
from src.train import train
from tests.conftest import compose_train, entry_env

NUMBER = r"\d+\.\d{4}"
EPOCH_LINE = re.compile(rf"^Epoch (\d+)/(\d+) - (\d+)/(\d+) - \d+\.\ds - loss: ({NUMBER}) - acc: ({NUMBER})"
                        rf"(?: - val_loss: ({NUMBER}) - val_acc: ({NUMBER}))?$", re.M)
SUMMARY = """\
Model: "MNISTClassifier"
___________________________________________________________________
 Layer (type)                 Output Shape                   Param #
===================================================================
 net.0 (Linear)               (None, 512)                    401,920
 net.1 (ReLU)                 (None, 512)                          0
 net.2 (Linear)               (None, 10)                       5,130
===================================================================
Total params: 407,050 (1.55 MiB)
Trainable params: 407,050
Non-trainable params: 0
Forward FLOPs per image: 813,056
___________________________________________________________________"""


def epoch_rows(metrics_csv: Path) -> dict[int, dict[str, float]]:
    """metrics.csv's figures by epoch (Lightning's count, from 0): train/* and val/* of each."""
    rows: dict[int, dict[str, float]] = {}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            figures = {k: float(v) for k, v in row.items() if v and k.startswith(("train/", "val/"))}
            if figures:
                rows.setdefault(int(row["epoch"]), {}).update(figures)
    return rows


def check_epoch_lines(output: str, metrics_csv: Path, epochs: int, steps: int, val: bool = True) -> None:
    """One `Epoch N/M` line per epoch, in order, whose figures are metrics.csv's to the printed 4 decimals."""
    lines = EPOCH_LINE.findall(output)
    assert [(int(n), int(m)) for n, m, *_ in lines] == [(n, epochs) for n in range(1, epochs + 1)], output[-3000:]
    rows = epoch_rows(metrics_csv)
    for epoch, (_, _, done, total, loss, acc, val_loss, val_acc) in enumerate(lines):
        assert (int(done), int(total)) == (steps, steps)
        printed = {"train/loss": loss, "train/acc": acc, **({"val/loss": val_loss, "val/acc": val_acc} if val else {})}
        assert printed == {k: f"{v:.4f}" for k, v in rows[epoch].items()}, epoch
        assert bool(val_loss) == val


@pytest.mark.slow
def test_a_run_into_a_file_reads_like_keras(tiny_data, tmp_path):
    """`python -m src.train ... > train.out 2>&1`, as a SLURM job's log, nohup or CI has it."""
    run, out = tmp_path / "run", tmp_path / "train.out"
    with open(out, "w") as log:
        result = subprocess.run([sys.executable, "-m", "src.train", f"data.data_dir={tiny_data}", "data.val_size=100",
                                 "trainer.max_epochs=3", f"hydra.run.dir={run}"], cwd=tmp_path, env=entry_env(),
                                stdout=log, stderr=subprocess.STDOUT, timeout=300)
    text = out.read_text()
    assert result.returncode == 0, text[-3000:]
    assert not re.search(r"[\r\x1b]", text), "a carriage return or an escape code went into the file"
    assert max(map(len, text.splitlines())) <= 200
    check_epoch_lines(text, run / "metrics.csv", epochs=3, steps=4)  # 500 training images in batches of 128
    assert SUMMARY in text
    assert re.search(r"^device: cpu \(trainer\.accelerator=auto; found: no CUDA or MPS device\)$", text, re.M)
    assert re.search(rf"^test_loss: {NUMBER} test_acc: {NUMBER} \(best epoch \d of 3\)$", text, re.M)
    order = [text.index(s) for s in ("device: ", "Model: ", "Epoch 1/3", "Epoch 3/3", "test_loss: ")]
    assert order == sorted(order)
    # Lightning's lines that the device line replaces,
    # and its srun hint (SLURM is installed on the test machines): one process, so the run's own note is not said
    assert "GPU available" not in text and "TPU available" not in text and "srun" not in text and "SLURM" not in text
    assert "][INFO] - " not in text  # no date and logger on the console: train.log has them
    # and each said once: Lightning's own console handler (its "INFO: ..." copy of every line) is removed
    assert "INFO: " not in text and text.count("train images (500, 784)") == 1
    assert "limit_val_batches" not in text and "Trainer.fit" not in text  # Lightning's lines that say nothing
    assert "][INFO] - train images (500, 784)" in (run / "train.log").read_text()
    # The best checkpoint is named by its epoch as the console counts it, from 1
    (best,) = (run / "checkpoints").glob("best-*.ckpt")
    epoch = torch.load(best, weights_only=True)["epoch"]
    assert best.name.startswith(f"best-epoch{epoch + 1:02d}-val_acc")
    for name in (".hydra/config.yaml", "checkpoints/last.ckpt", "training_curves.png", "confusion_matrix.png"):
        assert (run / name).is_file(), name
    assert not (tmp_path / "lightning_logs").exists() and not (tmp_path / "outputs").exists()


def in_a_terminal(args: list[str], cwd: Path) -> tuple[int, str]:
    """Run a command with stdout and stderr on a pseudo-terminal of 120 columns; its return code and output."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen(args, cwd=cwd, env=entry_env(), stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    output = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the terminal closed: the process has ended
            break
        if not chunk:
            break
        output += chunk
    os.close(master)
    return process.wait(timeout=300), output.decode(errors="replace")


@pytest.mark.slow
def test_a_terminal_gets_the_bar_counting_epochs_from_one(tiny_data, tmp_path):
    code, output = in_a_terminal([sys.executable, "-m", "src.train", f"data.data_dir={tiny_data}",
                                  "trainer.max_epochs=2", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert code == 0, output[-3000:]
    assert re.search(r"\rEpoch 1/2: +\d+%\|.*\| 0/5 ", output) and re.search(r"Epoch 2/2: 100%\|.*\| 5/5 .*acc=", output)
    assert not re.search(r"Epoch \d+:", output), "an epoch counted from 0"
    shown = [line.split("\r")[-1] for line in output.split("\r\n")]  # what stays on the screen
    assert [line[:10] for line in shown if re.match(r"Epoch|Training", line)] == ["Epoch 1/2:", "Epoch 2/2:"]
    assert not EPOCH_LINE.search(output.replace("\r\n", "\n"))  # the bar, not the lines of a file
    assert "Model: \"MNISTClassifier\"" in output and re.search(r"^test_loss: ", output, re.M)


class FakeClock:
    """A clock that moves `step` seconds each time it is read."""

    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_a_long_epoch_says_how_far_it_got_about_every_minute_without_reading_the_device(tiny_data, tmp_path,
                                                                                       monkeypatch, capsys):
    lines = console.EpochLines(clock=FakeClock(25.0))  # each step "takes" 25 s: a progress line every 3 steps
    monkeypatch.setattr(console, "progress_callback", lambda mode: lines)
    monkeypatch.setattr("src.model.MNISTClassifier.running_metrics", lambda *a: pytest.fail("read the device"))
    train(compose_train(f"data.data_dir={tiny_data}", "trainer.max_epochs=2", "data.batch_size=64",
                        "model.hidden=16", "trainer.accelerator=cpu"), tmp_path / "run")
    out = capsys.readouterr().out
    progress = re.findall(r"^Epoch (\d)/2 - (\d+)/10 - (\d+)s - ETA: (\d+)s$", out, re.M)
    # 10 steps an epoch; the clock is read at the epoch's start and after every step
    assert [(int(e), int(done)) for e, done, _, _ in progress] == [(e, d) for e in (1, 2) for d in (3, 6, 9)]
    assert [int(s) for _, _, s, _ in progress[:3]] == [75, 150, 225]
    assert int(progress[0][3]) == 175  # 25 s a step, 7 steps left
    check_epoch_lines(out, tmp_path / "run" / "metrics.csv", epochs=2, steps=10, val=False)


def test_no_progress_bar_means_no_epoch_output(tiny_data, tmp_path, capsys):
    train(compose_train(f"data.data_dir={tiny_data}", "trainer.max_epochs=1", "model.hidden=16", "progress=lines",
                        "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"), tmp_path / "run")
    out = capsys.readouterr().out
    assert "Epoch" not in out and re.search(r"^test_loss: ", out, re.M) and 'Model: "MNISTClassifier"' in out


class Terminal:
    def __init__(self, tty: bool):
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("mode, tty, expected", [
    ("auto", True, console.KerasProgressBar), ("auto", False, console.EpochLines),
    ("bar", False, console.KerasProgressBar), ("lines", True, console.EpochLines)])
def test_progress_auto_draws_the_bar_on_a_terminal_only(mode, tty, expected):
    assert type(console.progress_callback(mode, Terminal(tty))) is expected


def test_best_checkpoints_keep_model_checkpoints_state_so_earlier_runs_resume_with_their_record(tmp_path):
    arguments = dict(dirpath=tmp_path, monitor="val/acc", mode="max", filename="best-epoch{epoch:02d}",
                     auto_insert_metric_name=False)
    ours, lightnings = KerasEpochCheckpoint(**arguments), ModelCheckpoint(**arguments)
    assert ours.state_key == lightnings.state_key and ours.state_key.startswith("ModelCheckpoint{")
    assert Path(ours.format_checkpoint_name({"epoch": torch.tensor(4)})).name == "best-epoch05.ckpt"
