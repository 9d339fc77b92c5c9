"""Speed of the project's training against a hand-written PyTorch loop, measured side by side.

    python bench/speed.py                 # epochs, in one process: Lightning alone, then the project,
                                          # each alternating A/B/A/B with a hand-written loop
    python bench/speed.py --mode process  # whole `python -m src.train` runs against bench/plain_train.py,
                                          # then the start-up and exit of what each imports, in a venv
                                          # holding only the project's base dependencies (.benchmarks/base-venv)
    python bench/speed.py --quick         # a few seconds, on generated data (what the test runs; with
                                          # --mode process, 1 epoch on the first 12,000 Fashion-MNIST images)
    python bench/speed.py --mode device --precision bf16-mixed --compile
                                          # the project's real run on accelerator=auto (a GPU), data on the
                                          # device, alternating with a hand-written loop on the same tensors
                                          # (bench/gpu_check.sh runs each variant in a process of its own)

Data: Fashion-MNIST from /usr/share/datasets/fashion-mnist when present (MNIST's shapes),
else generated tensors of MNIST's size. Timings on a shared machine are noisy: compare the
ratios, which are measured under the same conditions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest.mock import patch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FASHION = Path("/usr/share/datasets/fashion-mnist")
# --quick in process mode and in bench/timeline.py: the first training and test images of Fashion-MNIST, enough
# for every part of a whole run to show (the figures of a check that the tables are made, not of the speed)
QUICK_IMAGES = (12000, 2000)


def fashion_folder(folder: Path, images: tuple[int, int] | None = None, source: Path = FASHION,
                   packed: bool = False) -> Path:
    """A data folder holding Fashion-MNIST as the data module leaves it (FashionMNIST/raw, unpacked), so that
    every timed process finds it ready; `images`: only the first (training, test) images. packed: the
    files gzip'd in the folder itself, as Debian's are (what bench/keras_original.py reads)."""
    from src.offline_digits import read_idx, write_idx

    raw = folder if packed else folder / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in zip(("train", "t10k"), images or (None, None)):
        for kind in ("images-idx3", "labels-idx1"):
            name = f"{prefix}-{kind}-ubyte"
            write_idx(raw / (name + ".gz" * packed), read_idx(source / f"{name}.gz")[:n])
    return folder


def whole_run_data(quick: bool, tmp: Path) -> Path:
    """The data folder of process mode and bench/timeline.py: the full Fashion-MNIST in ROOT/data, or with
    --quick the first QUICK_IMAGES of it in `tmp`."""
    if quick:
        return fashion_folder(tmp / "data", QUICK_IMAGES)
    from src.idx import prepare_files

    prepare_files("fashion_mnist", ROOT / "data")
    return ROOT / "data"


def tensors(quick: bool):
    """(x, y) train and test tensors, preprocessed as the project does."""
    import torch

    if FASHION.is_dir() and not quick:
        from src.idx import load_split, prepare_files

        raw = str(prepare_files("fashion_mnist", ROOT / "data"))
        return load_split("fashion_mnist", raw, True), load_split("fashion_mnist", raw, False), "Fashion-MNIST"
    n_train, n_test = (6000, 1000) if quick else (60000, 10000)
    generator = torch.Generator().manual_seed(0)
    make = lambda n: (torch.rand(n, 784, generator=generator),  # noqa: E731
                      torch.nn.functional.one_hot(torch.randint(0, 10, (n,), generator=generator), 10).float())
    return make(n_train), make(n_test), f"generated data ({n_train} images)"


def torch_rmsprop(parameters):
    """torch's own RMSprop with Keras's settings, as a hand-written loop would use it."""
    import torch

    return torch.optim.RMSprop(parameters, lr=1e-3, alpha=0.9, eps=1e-7)


class HandWrittenLoop:
    """The baseline: the few lines anyone would write in plain PyTorch for the Keras program, on the
    device that holds x and y, at bf16 under autocast for precision="bf16-mixed", compiled as
    model.compile=true compiles the project's network."""

    def __init__(self, x, y, batch_size: int = 128, seed: int = 0, hidden: int = 512, precision: str = "32",
                 compile: bool = False):
        import torch
        from torch import nn

        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10)).to(x.device)
        if compile:
            self.model.compile(dynamic=True)
        self.optimizer = torch_rmsprop(self.model.parameters())
        self.x, self.y, self.batch_size, self.epoch = x, y, batch_size, 0
        self.bf16 = precision == "bf16-mixed"

    def run_epoch(self) -> float:
        import torch
        import torch.nn.functional as F

        start = time.perf_counter()
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.epoch)).to(self.x.device)
        for i in range(0, len(self.x), self.batch_size):
            index = order[i : i + self.batch_size]
            with torch.autocast(self.x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                loss = F.cross_entropy(self.model(self.x[index]), self.y[index])
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        self.epoch += 1
        synchronize(self.x.device)
        return time.perf_counter() - start


def synchronize(device) -> None:
    """Wait for the work queued on a GPU, so that a clock read after it times that work too."""
    import torch

    if device.type in ("cuda", "mps"):
        getattr(torch, device.type).synchronize()


def step_profile(x, y, epochs: int = 2) -> dict[str, float]:
    """Seconds per epoch spent in each part of a plain training step, with the project's model
    and optimizer and with torch.optim.RMSprop, timed part by part (the last epoch counts)."""
    import torch
    import torch.nn.functional as F

    from src.network import KerasRMSprop, build_mlp

    parts: dict[str, float] = {}
    for name, make_optimizer in (("RMSprop step (this project's KerasRMSprop)", KerasRMSprop),
                                 ("RMSprop step (torch.optim.RMSprop)", torch_rmsprop)):
        net = build_mlp()
        optimizer = make_optimizer(net.parameters())
        for _ in range(epochs):
            spent = dict.fromkeys(("batch gather", "forward + loss", "backward", name), 0.0)
            order = torch.randperm(len(x))
            for i in range(0, len(x), 128):
                t0 = time.perf_counter()
                index = order[i : i + 128]
                xb, yb = x[index], y[index]
                t1 = time.perf_counter()
                loss = F.cross_entropy(net(xb), yb)
                t2 = time.perf_counter()
                optimizer.zero_grad()
                loss.backward()
                t3 = time.perf_counter()
                optimizer.step()
                t4 = time.perf_counter()
                for key, dt in zip(spent, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                    spent[key] += dt
        parts.update(spent)
    return parts


def alternate_with_hand_loop(x, y, fit, make_hand=None, hand_after: bool = False) -> tuple[list[float], list[float]]:
    """Run `fit(callback)`; before each of its epochs the callback runs one hand-written epoch,
    so that both are timed A/B/A/B under the same conditions. Returns (hand, fit) epoch times.

    `make_hand(trainer)` builds the hand-written loop when training starts (default: on x and y).
    `hand_after`: each hand-written epoch follows the run's epoch instead, so that the run's first
    step is the first to compile the network when both are compiled."""
    import lightning as L

    hand = None
    hand_times, fit_times = [], []

    class Interleave(L.Callback):
        started = None

        def hand_epoch(self, trainer):
            nonlocal hand
            if hand is None:
                hand = make_hand(trainer) if make_hand else HandWrittenLoop(x, y)
            hand_times.append(hand.run_epoch())

        def on_train_epoch_start(self, trainer, pl_module):
            synchronize(trainer.strategy.root_device)
            now = time.perf_counter()
            if self.started is not None:
                fit_times.append(now - self.started)
            if self.started is not None or not hand_after:
                self.hand_epoch(trainer)
            self.started = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            synchronize(trainer.strategy.root_device)
            fit_times.append(time.perf_counter() - self.started)
            if hand_after:
                self.hand_epoch(trainer)

    fit(Interleave())
    return hand_times, fit_times


def fit_project(x, y, x_test, y_test, epochs: int):
    """The project's real configuration and code path (progress bar, metrics, checkpoints), fed the same tensors."""
    from hydra import compose, initialize_config_dir

    from src.data import MNISTDataModule
    from src.train import train

    def same_tensors(self, stage):
        self.train_xy, self.test_xy = (x, y), (x_test, y_test)

    def fit(callback):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"), \
                tempfile.TemporaryDirectory() as run_dir, \
                patch.object(MNISTDataModule, "setup", same_tensors), \
                patch.object(MNISTDataModule, "prepare_data", lambda self: None):
            # progress=bar: the bar, as in a terminal, whether or not this benchmark's output is one
            cfg = compose("train", overrides=[f"trainer.max_epochs={epochs}", "trainer.accelerator=cpu", "progress=bar"])
            train(cfg, run_dir, callbacks=(callback,))
    return fit


def fit_lightning_alone(x, y, epochs: int):
    """The hand-written loop's step inside a LightningModule, with everything optional switched
    off (metrics, progress bar, logger, checkpoints, summary): what Lightning's loop alone costs."""
    import lightning as L
    import torch.nn.functional as F

    from src.data import EpochShuffle, TensorBatches

    class HandWrittenStep(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False  # as in the project's module
            self.net = HandWrittenLoop(x, y).model

        def training_step(self, batch, batch_idx):
            optimizer = self.optimizers()
            loss = F.cross_entropy(self.net(batch[0]), batch[1])
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()

        def configure_optimizers(self):
            return torch_rmsprop(self.parameters())

    def fit(callback):
        trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, callbacks=[callback], logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(HandWrittenStep(), train_dataloaders=TensorBatches(x, y, 128, EpochShuffle(len(x), seed=0)))
    return fit


def epoch_mode(args) -> dict:
    """Lightning alone, then the project, each alternating with hand-written epochs on the same tensors."""
    (x, y), (x_test, y_test), source = tensors(args.quick)
    runs = {"lightning": alternate_with_hand_loop(x, y, fit_lightning_alone(x, y, args.epochs)),
            "project": alternate_with_hand_loop(x, y, fit_project(x, y, x_test, y_test, args.epochs))}
    # Whole microseconds, far below the noise: the "# every epoch" lines print these very numbers,
    # so every median and ratio in the table can be recomputed from them exactly.
    runs = {name: tuple([round(t, 6) for t in times] for times in pair) for name, pair in runs.items()}
    medians = {name: (statistics.median(hand[1:]), statistics.median(other[1:])) for name, (hand, other) in runs.items()}
    return dict(source=source, epochs=args.epochs, steps=-(-len(x) // 128), runs=runs, medians=medians,
                profile=step_profile(x, y))


def device_mode(args) -> dict:
    """The project's real run (`src.train.train` on accelerator=auto, the data read from files and put on
    the device by the data module), each of its epochs followed by a hand-written epoch on the same device
    tensors, at the same precision, compiled or not alike. Returns the epoch times and the run's figures."""
    import lightning as L
    import torch
    from hydra import compose, initialize_config_dir

    from src.callbacks import CompileTime
    from src.train import train

    overrides = ["data=fashion_mnist", f"data.data_dir={args.data}", f"trainer.max_epochs={args.epochs}",
                 f"model.hidden={args.hidden}", f"trainer.precision={args.precision}",
                 f"model.compile={str(args.compile).lower()}", "progress=bar"]
    figures = {}

    def make_hand(trainer):
        x, y = trainer.datamodule.train_xy
        figures.update(device=str(x.device), images=len(x), steps=-(-len(x) // 128),
                       accelerator=f"{type(trainer.accelerator).__name__} on {trainer.strategy.root_device}")
        return HandWrittenLoop(x, y, hidden=args.hidden, precision=args.precision, compile=args.compile)

    class Figures(L.Callback):
        def on_train_end(self, trainer, pl_module):
            [timer] = [c for c in trainer.callbacks if isinstance(c, CompileTime)] or [None]
            figures["first_step_s"] = timer.first_step if timer else None

    def fit(callback):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"), \
                tempfile.TemporaryDirectory() as run_dir:
            figures["test_acc"] = train(compose("train", overrides=overrides), run_dir, callbacks=(callback, Figures()))

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    hand, project = alternate_with_hand_loop(None, None, fit, make_hand, hand_after=True)
    figures.update(hand_epochs=hand, project_epochs=project,
                   peak_gpu_mb=torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None)
    return figures


BASE_VENV = ROOT / ".benchmarks" / "base-venv"


def base_python(venv: Path = BASE_VENV) -> str:
    """The Python of a virtual environment holding the project and its base dependencies alone, as a
    user's fresh `pip install -e .` gives them (made on first use, then reused).

    What else is installed changes start-up: with SciPy present, torchmetrics imports scipy.signal
    at start-up, and a Python with many packages (or the test extras) is not what users run."""
    python = venv / "bin" / "python"
    if not python.is_file():
        print(f"# making {venv} (python -m venv, then pip install -e . with no extras)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-e", str(ROOT)], check=True)
    return str(python)


def has_scipy(python: str) -> bool:
    code = "import importlib.util, sys; sys.exit(importlib.util.find_spec('scipy') is None)"
    return subprocess.run([python, "-c", code]).returncode == 0


def peak_rss_mb(command: list[str], cwd: Path) -> tuple[float, float, str]:
    """Run a command; return (wall seconds, peak resident MB, last stdout line)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"error: {' '.join(command)} failed")
    lines = [l for l in out.splitlines() if l.startswith("test_loss")]
    return wall, usage.ru_maxrss / 1024, lines[-1] if lines else "?"


def project_command(python: str, epochs: int, run_dir: str, *overrides: str) -> list[str]:
    """`python -m src.train data=fashion_mnist` for `epochs` epochs into run_dir, to be run in ROOT (its data/
    unless an override names another data.data_dir)."""
    return [python, "-m", "src.train", "data=fashion_mnist", f"trainer.max_epochs={epochs}", f"hydra.run.dir={run_dir}",
            *overrides]


def keras_command(python: str, epochs: int, out: str, *options: str) -> list[str]:
    """The book's Keras program, bench/keras_original.py, run by `python` (one that has TensorFlow and Keras)."""
    return [python, str(ROOT / "bench" / "keras_original.py"), f"--epochs={epochs}", f"--out={out}", *options]


def process_mode(args) -> dict:
    """Whole processes, alternating: the project's command and a plain script doing the same job."""
    if not FASHION.is_dir():
        raise SystemExit("error: --mode process needs Fashion-MNIST (apt-get install dataset-fashion-mnist)")
    epochs = 1 if args.quick else args.epochs
    results = {"project": [], "plain": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = whole_run_data(args.quick, Path(tmp))  # where both commands read it
        project = project_command(args.python, epochs, f"{tmp}/project", f"data.data_dir={data}")
        plain = [args.python, str(ROOT / "bench" / "plain_train.py"), f"--epochs={epochs}", f"--data={data}",
                 f"--out={tmp}/plain"]
        keras = None
        if args.keras_python:
            results["keras"] = []
            keras_data = fashion_folder(Path(tmp) / "packed", QUICK_IMAGES, packed=True) if args.quick else FASHION
            keras = keras_command(args.keras_python, epochs, f"{tmp}/keras", f"--data={keras_data}")
        for _ in range(args.repeats):
            results["plain"].append(peak_rss_mb(plain, ROOT))
            results["project"].append(peak_rss_mb(project, ROOT))
            if keras:
                results["keras"].append(peak_rss_mb(keras, ROOT))
    return results


PLAIN_IMPORTS = "import torch, torchvision.datasets, matplotlib.pyplot"
STARTUP = {
    "bench/plain_train.py's imports (torch, torchvision.datasets, matplotlib.pyplot)": PLAIN_IMPORTS,
    "the same and what src.train adds (hydra, lightning and with it torchmetrics)": f"{PLAIN_IMPORTS}, hydra, lightning",
    "the same as plain_train.py and scipy.signal alone (torchmetrics imports it whenever SciPy is installed)":
        f"{PLAIN_IMPORTS}, scipy.signal",
}


def startup_times(python: str, repeats: int) -> dict[str, float]:
    """Median wall seconds of `python -c "import ..."` processes (start, imports, exit), alternating."""
    scipy = has_scipy(python)
    commands = {name: code for name, code in STARTUP.items() if "scipy" not in code or scipy}
    walls: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, code in commands.items():
            start = time.perf_counter()
            subprocess.run([python, "-c", code], check=True)
            walls[name].append(time.perf_counter() - start)
    return {name: statistics.median(w) for name, w in walls.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("epoch", "process", "device"), default="epoch")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="process mode: runs of each command")
    parser.add_argument("--quick", action="store_true", help="small and fast: generated data, 3 epochs; process "
                        "mode: 1 epoch on the first 12,000 images of Fashion-MNIST, one run of each")
    parser.add_argument("--keras-python", help="process mode: also time the Keras original with this Python "
                        "(one that has TensorFlow)")
    parser.add_argument("--python", help="process mode: the Python that runs the project and the plain script "
                        f"(default: a venv with the base dependencies alone, {BASE_VENV.relative_to(ROOT)})")
    parser.add_argument("--data", default=str(FASHION), help="device mode: a folder holding Fashion-MNIST's files")
    parser.add_argument("--precision", choices=("32", "bf16-mixed"), default="32", help="device mode: trainer.precision")
    parser.add_argument("--compile", action="store_true", help="device mode: model.compile=true")
    parser.add_argument("--hidden", type=int, default=512, help="device mode: model.hidden")
    parser.add_argument("--json", help="device mode: also write the figures to this file")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.repeats = 3, 1
    import torch

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, python {platform.python_version()}")
    if args.mode == "device":
        r = device_mode(args)
        if args.json:
            Path(args.json).write_text(json.dumps(r, indent=1))
        hand, project = statistics.median(r["hand_epochs"][1:]), statistics.median(r["project_epochs"][1:])
        print(f"# {r['device']}, {r['images']} images, {r['steps']} steps per epoch, {args.epochs} epochs, "
              f"trainer.precision={args.precision}, model.compile={str(args.compile).lower()}; medians without epoch 1")
        print("| training loop | s / epoch | steps / s |\n|---|---|---|")
        print(f"| hand-written PyTorch | {hand:.3f} | {r['steps'] / hand:.0f} |")
        print(f"| project | {project:.3f} | {r['steps'] / project:.0f} |")
        print(f"# ratio {project / hand:.2f}; test_acc {r['test_acc']:.4f}; first step "
              + (f"{r['first_step_s']:.2f} s" if r["first_step_s"] is not None else "not timed (model.compile=false)")
              + (f"; peak GPU memory {r['peak_gpu_mb']:.0f} MiB" if r["peak_gpu_mb"] is not None else ""))
    elif args.mode == "epoch":
        r = epoch_mode(args)
        hand_all = [t for hand, _ in r["runs"].values() for t in hand[1:]]
        print(f"# {r['source']}, batch 128, {r['steps']} steps per epoch, {r['epochs']} epochs, medians without epoch 1")
        print("| training loop | s / epoch | steps / s | hand-written loop alongside, s / epoch | ratio |")
        print("|---|---|---|---|---|")
        print(f"| hand-written PyTorch | {statistics.median(hand_all):.3f} | "
              f"{r['steps'] / statistics.median(hand_all):.0f} | | 1.00 |")
        for name, label in (("lightning", "Lightning alone (the hand-written step, nothing optional switched on)"),
                            ("project", "project (Lightning, bar, metrics, checkpoints)")):
            hand, other = r["medians"][name]  # ratio: the loop's median over the hand-written one, before rounding
            print(f"| {label} | {other:.3f} | {r['steps'] / other:.0f} | {hand:.3f} | {other / hand:.2f} |")
        print("\n| one epoch of plain steps, by part | s |")
        print("|---|---|")
        for part, seconds in r["profile"].items():
            print(f"| {part} | {seconds:.3f} |")
        print()
        for name, (hand, other) in r["runs"].items():
            print(f"# every epoch, {name} run: hand-written {hand}, {name} {other}")
    else:
        args.python = args.python or base_python()
        version = subprocess.run([args.python, "-c", "import platform, torch, lightning; print(platform.python_version(), "
                                  "torch.__version__, lightning.__version__)"], capture_output=True, text=True, check=True)
        print(f"# processes run by {args.python} (python, torch, lightning: {version.stdout.strip()}); "
              f"scipy importable there: {'yes' if has_scipy(args.python) else 'no'}")
        r = process_mode(args)
        print("| whole process | median s | peak RSS MB | last line |")
        print("|---|---|---|---|")
        for name in r:
            walls = [w for w, _, _ in r[name]]
            print(f"| {name} | {statistics.median(walls):.2f} | {max(m for _, m, _ in r[name]):.0f} | "
                  f"{r[name][-1][2]} |")
        median = {name: statistics.median(w for w, _, _ in runs) for name, runs in r.items()}
        print(f"# ratio project / plain: {median['project'] / median['plain']:.2f}"
              + (f", project / keras: {median['project'] / median['keras']:.2f}" if "keras" in median else ""))
        print("# every run (s): " + "; ".join(f"{name} {[round(w, 2) for w, _, _ in runs]}" for name, runs in r.items()))
        startup = startup_times(args.python, args.repeats)
        plain_imports = startup[next(iter(STARTUP))]
        print("\n| start-up and exit alone: `python -c \"import ...\"` | median s | more than plain's imports |")
        print("|---|---|---|")
        for name, seconds in startup.items():
            print(f"| {name} | {seconds:.2f} | {seconds - plain_imports:+.2f} |")


if __name__ == "__main__":
    main()
