"""Failure behaviour: interrupts, crashes while saving, divergence, concurrent data preparation,
damaged files and untrusted checkpoints. Each test fails without the protection it names."""

from __future__ import annotations

import fractions
import hashlib
import multiprocessing
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from src.callbacks import AtomicCheckpointIO
from src.checkpoint import load_checkpoint
from src.errors import UserError, one_line
from src.idx import IDX_FILES, DataError, load_split, prepare_files, raw_folder
from src.model import DivergedError, MNISTClassifier
from src.train import train
from tests.conftest import (ROOT, compose_train, ctrl_c_as_in_a_terminal, entry_env, needs_extra, needs_fashion,
                            write_dataset, write_idx)

EPOCHS, BATCH = 3, 64  # tiny data: 600 images -> 10 steps per epoch
LINE = re.compile(r"^test_loss: \S+ test_acc: \S+$", re.M)


def tiny_run(tiny_data, *extra: str):
    return compose_train(f"data.data_dir={tiny_data}", f"trainer.max_epochs={EPOCHS}", f"data.batch_size={BATCH}",
                         "trainer.accelerator=cpu", "model.hidden=32", "seed=3", *extra)


def final_weights(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def interrupt_at_step(monkeypatch, step: int, times: int = 1) -> None:
    """Send real SIGINTs (Ctrl-C) to this process right after optimizer step `step`."""
    original = MNISTClassifier.on_train_batch_end

    def maybe_interrupt(self, *args):
        if self.global_step == step:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return original(self, *args)

    monkeypatch.setattr(MNISTClassifier, "on_train_batch_end", maybe_interrupt)


@pytest.mark.parametrize("step", [10, 14])  # after epoch 1 exactly, and in the middle of epoch 2
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tiny_data, tmp_path, monkeypatch, capsys, step):
    handler = signal.getsignal(signal.SIGINT)
    train(tiny_run(tiny_data), tmp_path / "straight")
    assert signal.getsignal(signal.SIGINT) is handler  # after the run (a notebook's cell), Ctrl-C interrupts at once
    straight_out = capsys.readouterr().out

    with monkeypatch.context() as patch:
        interrupt_at_step(patch, step)
        with pytest.raises(SystemExit) as stopped:
            train(tiny_run(tiny_data), tmp_path / "broken")
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    checkpoint = tmp_path / "broken" / "checkpoints" / "last.ckpt"
    # epochs counted from 1, as the console counts them: step 10 ended the 1st, so both stops come in the 2nd
    assert f"Interrupted in epoch 2 after {step} steps; saved {checkpoint}" in err and f"ckpt_path={checkpoint}" in err
    assert torch.load(checkpoint, weights_only=True)["global_step"] == step

    train(tiny_run(tiny_data, f"ckpt_path={checkpoint}"), tmp_path / "resumed")
    resumed_out = capsys.readouterr().out
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    line = [l for l in straight_out.splitlines() if l.startswith("test_loss")]
    assert line and line == [l for l in resumed_out.splitlines() if l.startswith("test_loss")]


def test_a_second_ctrl_c_stops_at_once_without_saving(tiny_data, tmp_path, monkeypatch, capsys):
    interrupt_at_step(monkeypatch, 5, times=2)  # in the middle of the first epoch: no checkpoint yet
    with pytest.raises(SystemExit) as stopped:
        train(tiny_run(tiny_data), tmp_path / "run")
    assert stopped.value.code == 1
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
    assert "Resume with" not in capsys.readouterr().err


SIGNALLED = ("data.batch_size=1", "model.hidden=32", "trainer.max_epochs=1", "trainer.accelerator=cpu")
STEPS = 1200  # one epoch: 1200 images in batches of 1, a few seconds


def train_command(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "src.train", f"data.data_dir={data}", *SIGNALLED, *extra, f"hydra.run.dir={run_dir}"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, dict, str]:
    """The data, and the final weights and test line of a real run with the signal tests' settings, left alone."""
    root = tmp_path_factory.mktemp("signals")
    data = write_dataset(root / "data", n_train=STEPS)
    done = subprocess.run(train_command(data, root / "run"), cwd=root, env=entry_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return data, final_weights(root / "run"), LINE.search(done.stdout)[0]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_to_a_real_run_saves_the_step_it_reached_and_resumes_to_the_uninterrupted_weights(
        uninterrupted, tmp_path, signum):
    data, straight, straight_line = uninterrupted
    run, out = tmp_path / "run", tmp_path / "out.txt"
    with open(out, "w") as stdout, open(tmp_path / "err.txt", "w") as stderr:
        # progress=bar: the bar, drawn into the file too, says every 20 steps how far the epoch got
        process = subprocess.Popen(train_command(data, run, "progress=bar"), cwd=tmp_path, env=entry_env(), stdout=stdout,
                                   stderr=stderr, preexec_fn=ctrl_c_as_in_a_terminal)
    try:
        # The progress bar (on stdout, every 20 steps) shows the epoch under way: the signal comes near its
        # start, over a thousand steps before its end, so the run stops in the middle of the epoch.
        deadline = time.time() + 120
        while not re.search(rf"Epoch 1/1: .*\b([2-9]\d|\d{{3,}})/{STEPS}\b", out.read_text()):
            assert process.poll() is None and time.time() < deadline, "the run did not start training"
            time.sleep(0.05)
        process.send_signal(signum)
        assert process.wait(timeout=120) == 1
    finally:
        if process.poll() is None:
            process.kill()
    err = (tmp_path / "err.txt").read_text()
    assert "Traceback" not in err, err[-3000:]
    checkpoint = run / "checkpoints" / "last.ckpt"
    assert "Resume with: python -m src.train" in err and f"ckpt_path={checkpoint}" in err
    steps = int(re.search(rf"Interrupted in epoch 1 after (\d+) steps; saved {re.escape(str(checkpoint))}$", err, re.M)[1])
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["global_step"] == steps and saved["epoch"] == 0 and 20 <= steps < STEPS  # mid-epoch, where it stood

    resume = subprocess.run(train_command(data, tmp_path / "resumed", f"ckpt_path={checkpoint}"), cwd=tmp_path,
                            env=entry_env(), capture_output=True, text=True, timeout=300)
    assert resume.returncode == 0, resume.stderr[-3000:]
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == STEPS
    resumed = final_weights(tmp_path / "resumed")
    assert resumed.keys() == straight.keys()
    for name, weight in straight.items():
        assert torch.equal(resumed[name], weight), name
    assert LINE.search(resume.stdout)[0] == straight_line


SAVER = r"""
import sys, torch
from src.callbacks import AtomicCheckpointIO
io, path = AtomicCheckpointIO(), sys.argv[1]
io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "tag": "old"}, path)
print("saved", flush=True)
io.save_checkpoint({"state_dict": {"w": torch.zeros(200_000_000)}, "tag": "new"}, path)  # 800 MB: slow to write
print("done", flush=True)
"""


@pytest.mark.slow
def test_sigkill_while_saving_leaves_the_previous_checkpoint_whole(tmp_path):
    path = tmp_path / "last.ckpt"
    process = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert process.stdout.readline().strip() == "saved"
    temporary = []
    deadline = time.time() + 60
    while not temporary and time.time() < deadline:  # wait until the new checkpoint is being written
        temporary = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp") and p.stat().st_size > 0]
    process.kill()
    process.wait()
    assert temporary, "the second save never started"
    assert torch.load(path, weights_only=True)["tag"] == "old"


class BlowUpAfterOneEpoch(L.Callback):
    """A learning rate that wrecks training, set after one good epoch: from the second epoch's first step
    (Keras's RMSprop keeps the weights finite and the loss explodes), or `infinite` for its last step only
    (the weights become NaN and infinite, while the epoch's loss, computed before that step, stays finite)."""

    def __init__(self, infinite: bool):
        self.infinite = infinite
        self.after_first_epoch: dict | None = None

    @staticmethod
    def set_lr(trainer, lr: float) -> None:
        for group in trainer.optimizers[0].param_groups:
            group["lr"] = lr

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            self.after_first_epoch = {k: v.clone() for k, v in pl_module.state_dict().items()}
            if not self.infinite:
                self.set_lr(trainer, 1e6)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.infinite and trainer.current_epoch == 1 and batch_idx == trainer.num_training_batches - 1:
            self.set_lr(trainer, float("inf"))


@pytest.mark.parametrize("infinite, reason", [(False, r"train/loss reached \S+"), (True, "the weights are no longer finite")],
                         ids=["loss", "weights"])
def test_a_run_diverging_in_epoch_2_stops_and_keeps_epoch_1s_checkpoint(tiny_data, tmp_path, infinite, reason):
    blow_up = BlowUpAfterOneEpoch(infinite)
    with pytest.raises(DivergedError, match=rf"^training diverged in epoch 2: {reason} \(optimizer.lr=0.001 is likely"):
        train(tiny_run(tiny_data), tmp_path / "run", callbacks=(blow_up,))
    checkpoints = tmp_path / "run" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["last.ckpt"]
    saved = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert (saved["epoch"], saved["global_step"]) == (0, 10)  # the first epoch's 10 steps, and no more
    assert saved["state_dict"].keys() == blow_up.after_first_epoch.keys()
    for name, weight in blow_up.after_first_epoch.items():
        assert torch.isfinite(weight).all() and torch.equal(saved["state_dict"][name], weight), name


def _prepare_and_load(args):
    data_dir, barrier = args
    barrier.wait()  # both processes start on the empty folder at the same moment
    raw = prepare_files("fashion_mnist", data_dir)
    x, _ = load_split("fashion_mnist", str(raw), train=True)
    return tuple(x.shape)


@pytest.mark.slow
def test_two_processes_prepare_the_same_empty_folder_at_once(tmp_path):
    needs_fashion()
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        barrier = manager.Barrier(2)
        with context.Pool(2) as pool:
            shapes = pool.map(_prepare_and_load, [(tmp_path / "data", barrier)] * 2)
    assert shapes == [(60000, 784)] * 2
    raw = raw_folder("fashion_mnist", tmp_path / "data")
    assert sorted(p.name for p in raw.iterdir() if not p.name.startswith(".lock")) == sorted(IDX_FILES)


def test_search_workers_append_to_the_journal_under_optunas_lock(tmp_path):
    """Workers of one search append to one journal.log: each append happens while Optuna's own lock of the journal
    is held, as Optuna's own appends do, so that a worker cutting off its torn record never cuts off another's."""
    needs_extra("sweep", "optuna")
    from optuna.storages.journal import JournalFileSymlinkLock

    from src.journal import WholeRecordsJournal

    journal, events = tmp_path / "journal.log", []

    class Recorded(JournalFileSymlinkLock):  # the lock JournalFileBackend takes by default
        def acquire(self) -> bool:
            events.append(("acquire", journal.stat().st_size))
            return super().acquire()

        def release(self) -> None:
            events.append(("release", journal.stat().st_size))
            super().release()

    backend = WholeRecordsJournal(str(journal), lock_obj=Recorded(str(journal)))
    backend.append_logs([{"op_code": 0, "worker_id": "w0", "study_name": "s", "directions": [1]}])
    written = journal.stat().st_size
    assert written > 0 and events == [("acquire", 0), ("release", written)]  # the record went in while it was held


def digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def damage(raw: Path, name: str, how: str) -> None:
    path = raw / name
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "not idx":
        path.write_bytes(b"<html>404 Not Found</html>" * 100)


@pytest.mark.parametrize("name, how", [
    ("train-images-idx3-ubyte", "truncated"),
    ("train-labels-idx1-ubyte", "not idx"),
    ("t10k-images-idx3-ubyte", "not idx"),
])
def test_damaged_file_is_named_and_nothing_else_is_touched(tiny_data, name, how):
    raw = prepare_files("mnist", tiny_data)
    damage(raw, name, how)
    before = digest(raw)
    with pytest.raises(DataError) as error:
        load_split.__wrapped__("mnist", str(raw), train=name.startswith("train"))
    message = str(error.value)
    assert str(raw / name) in message and "delete it" in message and "\n" not in message
    assert digest(raw) == before


def test_image_and_label_counts_must_match(tiny_data):
    raw = prepare_files("mnist", tiny_data)
    write_idx(raw / "t10k-labels-idx1-ubyte", torch.zeros(199, dtype=torch.uint8).numpy())
    with pytest.raises(DataError, match="has 200 images but .*t10k-labels-idx1-ubyte has 199 labels"):
        load_split.__wrapped__("mnist", str(raw), train=False)


PAYLOAD = """
import os, torch
class Payload:
    def __reduce__(self):
        return (os.system, ("touch {marker}",))
torch.save({{"state_dict": {{}}, "hyper_parameters": {{}}, "x": Payload()}}, "{path}")
"""


def test_checkpoint_whose_pickle_runs_code_is_refused_and_never_runs(tiny_data, tmp_path):
    evil, marker = tmp_path / "evil.ckpt", tmp_path / "payload-ran"
    subprocess.run([sys.executable, "-c", PAYLOAD.format(marker=marker, path=evil)], check=True)
    assert evil.is_file() and not marker.exists()
    with pytest.raises(UserError, match="was refused") as refused:
        train(tiny_run(tiny_data, f"ckpt_path={evil}"), tmp_path / "run")
    assert not marker.exists(), "the checkpoint's payload ran"
    assert "(it would call or build posix.system)" in str(refused.value)
    # Lightning's own loader of the run's checkpoints refuses it too, even when asked for a full unpickling
    with pytest.raises(pickle.UnpicklingError):
        AtomicCheckpointIO().load_checkpoint(evil, weights_only=False)
    assert not marker.exists(), "the checkpoint's payload ran"


def test_refusing_a_checkpoint_names_what_it_would_build_without_pytorchs_escape_codes(tmp_path):
    # For a class (not a function), PyTorch's refusal has bold-on and bold-off escape codes.
    path = tmp_path / "fraction.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "x": fractions.Fraction(1, 3)}, path)
    with pytest.raises(UserError) as refused:
        load_checkpoint(path)
    assert str(refused.value).endswith("was refused: it holds more than tensors and plain values and is not loaded "
                                       "(it would call or build fractions.Fraction)")
    assert not any(c < " " for c in str(refused.value))


def test_a_checkpoint_missing_a_part_is_named_in_one_line(tmp_path):
    """A zip archive that lacks one of its tensors' records (a copy gone wrong): PyTorch's reader fails with a
    RuntimeError, which is told as one line naming the file, not a traceback."""
    import zipfile

    whole, damaged = tmp_path / "whole.ckpt", tmp_path / "damaged.ckpt"
    torch.save({"state_dict": {"net.0.weight": torch.zeros(3, 4)}, "hyper_parameters": {}}, whole)
    with zipfile.ZipFile(whole) as source, zipfile.ZipFile(damaged, "w") as copy:
        for name in source.namelist():
            if not name.endswith("/data/0"):
                copy.writestr(name, source.read(name))
    with pytest.raises(UserError) as refused:
        load_checkpoint(damaged)
    message = str(refused.value)
    assert message.startswith(f"ckpt_path={str(damaged)!r} is not a checkpoint this program can read (")
    assert "data/0" in message and "\n" not in message


def test_foreign_text_in_an_error_line_loses_escape_codes_and_control_characters():
    assert one_line("two options, \x1b[1mdo those steps\x1b[0m.\n  next\tline\x07") == "two options, do those steps. next line"


def test_checkpoint_of_another_architecture_gets_a_clear_error(tiny_data, tmp_path):
    train(tiny_run(tiny_data, "trainer.max_epochs=1"), tmp_path / "small")
    with pytest.raises(UserError, match=r"another architecture \(hidden=32.*set model.hidden"):
        train(tiny_run(tiny_data, "model.hidden=64", f"ckpt_path={tmp_path / 'small/checkpoints/last.ckpt'}"),
              tmp_path / "run")


def test_resuming_with_another_optimizer_gets_a_clear_error(tiny_data, tmp_path):
    train(tiny_run(tiny_data, "trainer.max_epochs=1", "experiment=dlwp3"), tmp_path / "adam")
    resumed = f"ckpt_path={tmp_path / 'adam/checkpoints/last.ckpt'}"
    with pytest.raises(UserError, match=r"was trained with optimizer=adam, .* which optimizer=rmsprop cannot take: "
                                        r"resume with optimizer=adam"):
        train(tiny_run(tiny_data, "trainer.max_epochs=2", resumed), tmp_path / "run")
    train(tiny_run(tiny_data, "trainer.max_epochs=2", "experiment=dlwp3", resumed), tmp_path / "run")  # the same: goes on


def test_a_file_that_is_not_a_checkpoint_gets_a_clear_error(tiny_data, tmp_path):
    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint")
    with pytest.raises(UserError, match="is not a checkpoint"):
        train(tiny_run(tiny_data, f"ckpt_path={junk}"), tmp_path / "run")
