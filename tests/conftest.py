"""Shared fixtures: tiny, learnable datasets in the real (gzip'd IDX) format, written per session."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

import src.config  # noqa: F401 - registers the config schema with Hydra

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# Where the data is; bench/gpu_check.sh points these at the copies it brings to a GPU host.
FASHION = Path(os.environ.get("FASHION_MNIST_DIR") or "/usr/share/datasets/fashion-mnist")
MNIST_T10K = Path(os.environ.get("MNIST_T10K_DIR") or ROOT.parent / "shared" / "data" / "mnist-t10k")


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write a uint8 array as an IDX file (gzip'd when the name ends in .gz), as MNIST ships them."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())
    return path


def make_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n 28x28 images whose class k is a bright bar in row band k, plus noise: easy to learn."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
    for i, k in enumerate(labels):
        images[i, 2 + 2 * k : 4 + 2 * k, 4:24] = 255
    return images, labels


def write_dataset(folder: Path, n_train: int = 600, n_test: int = 200, gz: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        images, labels = make_digits(n, seed)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return folder


def entry_env(*drop: str, **extra: str) -> dict:
    """This process's environment for a `python -m src.X` subprocess: the repository importable (before
    what PYTHONPATH held, which may be where a package came from), `extra` added, and without
    HYDRA_FULL_ERROR and PYTHONWARNINGS (which change what the tests read) or `drop`."""
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "PYTHONWARNINGS", *drop)}
    return {**env, **extra, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a server a test starts."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def needs(present: bool, reason: str) -> None:
    """Skip a test whose input this machine lacks (a Debian package, ../shared); under CI, whose
    .ci/run installs all of them, fail instead: a skip there would hide a missing install step."""
    if not present:
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (.ci/run should have provided it)")
        pytest.skip(reason)


def needs_fashion() -> None:
    needs(FASHION.is_dir(), f"Fashion-MNIST not found in {FASHION}: apt-get install dataset-fashion-mnist")


def real_digits() -> tuple[np.ndarray, np.ndarray]:
    """MNIST's 10,000 real test digits (uint8 (N, 28, 28)) and labels from ../shared; skips the test without them."""
    needs((MNIST_T10K / "t10k-images-idx3-ubyte.gz").is_file(), f"real MNIST digits not found in {MNIST_T10K}")
    with gzip.open(MNIST_T10K / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read()[16:], np.uint8).reshape(-1, 28, 28)
    with gzip.open(MNIST_T10K / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read()[8:], np.uint8)
    return images, labels


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    """A fresh data folder holding four tiny gzip'd IDX files (600 train, 200 test images)."""
    return write_dataset(tmp_path / "data")


def compose_config(name: str, *overrides: str):
    """conf/NAME.yaml composed as its entry point would compose it, in-process."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def compose_train(*overrides: str):
    return compose_config("train", *overrides)


@pytest.fixture(autouse=True)
def _no_download(monkeypatch):
    """Tests never touch the network: torchvision's download reports failure at once."""
    import torchvision.datasets.utils as tv_utils
    import torchvision.datasets.mnist as tv_mnist

    def refuse(*args, **kwargs):
        raise RuntimeError("network disabled in tests")

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", refuse)
    monkeypatch.setattr(tv_utils, "download_and_extract_archive", refuse)


SLURM_DIR = ROOT / "tests" / "slurm"


@pytest.fixture(scope="session")
def slurm_cluster() -> dict[str, str]:
    """A real one-node SLURM cluster (tests/slurm/cluster.sh), started once per session and
    stopped at its end (unless it was running before). Yields the environment variables that
    point SLURM's commands at it: SLURM_CONF, and PATH with the cluster's sacct first.

    Skipped where it cannot run (not root; SLURM missing and no apt-get), unless CI is set."""
    import shutil
    import subprocess

    reason = None
    if os.geteuid() != 0:
        reason = "the test SLURM cluster needs root to run slurmctld and slurmd"
    elif not shutil.which("slurmd") and not shutil.which("apt-get"):
        reason = "slurm-wlm is not installed and there is no apt-get to install it"
    needs(reason is None, reason)
    script = str(SLURM_DIR / "cluster.sh")
    started = subprocess.run([script, "start"], capture_output=True, text=True, timeout=900)
    assert started.returncode == 0, f"{script} start failed:\n{started.stderr[-3000:]}"
    conf = started.stdout.strip().splitlines()[-1].removeprefix("export SLURM_CONF=")
    env = {"SLURM_CONF": conf, "PATH": f"{SLURM_DIR / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    try:
        yield env
    finally:
        if "already running" not in started.stderr:  # another session's cluster is left to it
            stopped = subprocess.run([script, "stop"], capture_output=True, text=True, timeout=120)
            assert stopped.returncode == 0, f"{script} stop failed:\n{stopped.stderr[-3000:]}"
