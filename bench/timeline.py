"""Where a whole run's time goes, part by part: `python -m src.train data=fashion_mnist` against
bench/plain_train.py, each in a process of its own, alternating, in the base-only venv.

    python bench/timeline.py [--repeats 3] [--epochs 5] [--python PYTHON] [--keep DIR] [--quick]

Each process is started through this file (`--inside project|plain`), which notes the time since the
process began where its parts meet and prints the notes at exit. The notes only read the clock, from
wrappers around the calls where a part begins or ends and, for the project, a Lightning callback.
The exit runs from the last figure saved until the process has ended, timed from outside. The table
holds medians. `--keep DIR` keeps each run's folder in DIR (project0/, plain0/, ...) and its marks, with
the clock time the process began, in DIR/marks.json: the files' times there show where the parts met.
`--quick`: one run of each, 1 epoch, on the first 12,000 images of Fashion-MNIST (a check that it works).
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import json
import os
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Each part ends at the named mark ("exit" ends when the process has ended).
PARTS = {"start-up and imports": "config", "Hydra: config, logging, run folder": "setup",
         "setup: Trainer, data, model": "training", "training": "trained", "test": "figures",
         "figures": "figures-done", "exit": None}
MARKS: dict[str, float] = {}


def since_start() -> float:
    """Seconds since this process began (the kernel's start time: the interpreter's own start counts)."""
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def mark(name: str, first: bool = True) -> None:
    """Note when `name` happens: the first time, or with first=False the last."""
    if not first or name not in MARKS:
        MARKS[name] = since_start()


def wrap(owner, attribute: str, before: str | None = None, after: str | None = None) -> None:
    """Note `before` the first call of owner.attribute begins and `after` its last call ends."""
    original = getattr(owner, attribute)

    def wrapped(*args, **kwargs):
        if before:
            mark(before)
        result = original(*args, **kwargs)
        if after:
            mark(after, first=False)
        return result

    setattr(owner, attribute, wrapped)


def inside_project(args: list[str]) -> None:
    sys.argv = ["-m", *args]  # as `python -m` has it while it finds the module (src/__init__.py reads it)
    sys.path.insert(0, str(ROOT))
    importlib.import_module("src")  # first, as in `python -m src.train`

    import lightning as L

    from src import cli, plots, run_context

    class Marks(L.Callback):
        def on_train_start(self, *_):
            mark("training")

        def on_train_end(self, *_):
            mark("trained")

    init = L.Trainer.__init__

    def trainer(self, *a, callbacks=None, **k):
        init(self, *a, callbacks=[*(callbacks or []), Marks()], **k)

    L.Trainer.__init__ = trainer
    wrap(cli, "run_hydra", before="config")
    wrap(run_context.RunContext, "from_hydra", before="setup")  # the task starts
    wrap(plots, "training_curves", before="figures")
    wrap(plots, "confusion_matrix", after="figures-done")
    runpy.run_module("src.train", run_name="__main__", alter_sys=True)


def inside_plain(args: list[str]) -> None:
    import matplotlib.figure
    import torch
    import torchvision.datasets

    wrap(torchvision.datasets.FashionMNIST, "__init__", before="config")  # the data begins loading
    wrap(torch.optim.RMSprop, "__init__", before="training")
    wrap(torch, "save", after="trained")  # the checkpoint, right after the last epoch; the test follows
    wrap(matplotlib.figure.Figure, "savefig", before="figures", after="figures-done")
    sys.argv = [str(ROOT / "bench" / "plain_train.py"), *args]
    runpy.run_path(sys.argv[0], run_name="__main__")


def parts(marks: dict[str, float], wall: float) -> dict[str, float]:
    marks.setdefault("setup", marks["config"])  # the plain script has no config: that part takes no time
    ends = [marks[end] if end else wall for end in PARTS.values()]
    return {name: end - begin for name, begin, end in zip(PARTS, [0.0, *ends], ends)} | {"whole process": wall}


def run_one(python: str, which: str, out: Path, epochs: int, data: Path) -> tuple[dict[str, float], dict[str, float]]:
    """One timed process: its parts, and its marks (seconds since it began; `began`: that moment's clock time)."""
    arguments = (["data=fashion_mnist", f"data.data_dir={data}", f"trainer.max_epochs={epochs}", f"hydra.run.dir={out}"]
                 if which == "project" else [f"--epochs={epochs}", f"--data={data}", f"--out={out}"])
    start = time.perf_counter()
    result = subprocess.run([python, __file__, "--inside", which, *arguments], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"error: the {which} run failed:\n{result.stderr[-2000:]}")
    line = [line for line in result.stderr.splitlines() if line.startswith("TIMELINE ")][-1]
    marks = {k: float(v) for k, v in (item.split("=") for item in line.split()[1:])}
    return parts(dict(marks), wall), {**marks, "wall": wall}


def main() -> None:
    if sys.argv[1:2] == ["--inside"]:  # one of the timed processes: the rest of the command line is its own
        began = time.time() - since_start()
        atexit.register(lambda: print(f"TIMELINE began={began:.3f} " + " ".join(f"{k}={v:.3f}" for k, v in MARKS.items()),
                                      file=sys.stderr, flush=True))
        (inside_project if sys.argv[2] == "project" else inside_plain)(sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--python", help="the Python of both (default: the base-only venv of bench/speed.py)")
    parser.add_argument("--keep", type=Path, help="keep the runs' folders and their marks (marks.json) here")
    parser.add_argument("--quick", action="store_true", help="one run of each, 1 epoch, on 12,000 images")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.epochs = 1, 1
    sys.path.insert(0, str(ROOT / "bench"))
    from speed import FASHION, base_python, whole_run_data

    if not FASHION.is_dir():
        raise SystemExit("error: bench/timeline.py needs Fashion-MNIST (apt-get install dataset-fashion-mnist)")
    python = args.python or base_python()
    runs: dict[str, list[dict[str, float]]] = {"plain": [], "project": []}
    kept: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = whole_run_data(args.quick, Path(tmp))  # where both read it
        folder = args.keep or Path(tmp)
        for i in range(args.repeats):
            for which in runs:
                timed, kept[f"{which}{i}"] = run_one(python, which, folder / f"{which}{i}", args.epochs, data)
                runs[which].append(timed)
    if args.keep:
        (args.keep / "marks.json").write_text(json.dumps(kept, indent=1))
    print(f"# run by {python}; {args.epochs} epochs; medians of {args.repeats} alternating runs, seconds")
    print("| part | plain script | project | difference |\n|---|---|---|---|")
    for part in runs["plain"][0]:
        plain, project = (statistics.median(run[part] for run in runs[which]) for which in ("plain", "project"))
        print(f"| {part} | {plain:.2f} | {project:.2f} | {project - plain:+.2f} |")
    for which, rows in runs.items():
        print(f"# every {which} run, part by part: " + "; ".join(" ".join(f"{v:.2f}" for v in row.values())
                                                                 for row in rows))


if __name__ == "__main__":
    main()
