"""The port beside the book's Keras program, on the same data with the same seeds: the training loss and
accuracy of every epoch as one figure, and the final test figures with their spread.

    python bench/faithfulness.py --keras-python PYTHON [--seeds 42 1 2 3 4] [--epochs 5] [--figure docs/faithfulness.png]

PYTHON is a Python that has TensorFlow and Keras (a virtual environment of its own, as for bench/speed.py's
--keras-python). Both programs train on Fashion-MNIST from Debian's dataset-fashion-mnist: this project as
`python -m src.train data=fashion_mnist seed=S`, Keras as bench/keras_original.py --seed S, which seeds
Python, NumPy and TensorFlow with keras.utils.set_random_seed(S). Each run is a process of its own, Keras's
and the project's alternating. The table goes to stdout, with the machine and its load average before and
after (the runs take a few minutes and the machine may be shared); the figure goes to --figure.

The epoch's loss is averaged over its steps by both: the project takes the mean of the 469 batch means,
Keras weights each batch by its size (the last batch holds 96 images, the others 128).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from speed import FASHION, keras_command, peak_rss_mb, project_command  # noqa: E402

PROGRAMS = ("Keras", "project")


def project_run(python: str, seed: int, epochs: int, run_dir: Path) -> dict:
    """One `python -m src.train` run: per-epoch train/loss and train/acc and the test figures, from its metrics.csv."""
    from src.run_files import METRICS

    peak_rss_mb(project_command(python, epochs, str(run_dir), f"seed={seed}"), ROOT)
    run = {"loss": [], "accuracy": []}
    for row in csv.DictReader(open(run_dir / METRICS)):
        if row.get("train/loss"):
            run["loss"].append(float(row["train/loss"]))
            run["accuracy"].append(float(row["train/acc"]))
        if row.get("test/acc"):
            run["test_loss"], run["test_acc"] = float(row["test/loss"]), float(row["test/acc"])
    return run


def keras_run(python: str, seed: int, epochs: int, out: Path) -> dict:
    """One run of the book's Keras program: fit()'s history and evaluate()'s figures."""
    history = out.with_suffix(".json")
    peak_rss_mb(keras_command(python, epochs, str(out), f"--seed={seed}", f"--history={history}"), ROOT)
    return json.loads(history.read_text())


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} | {statistics.stdev(values):.4f} | {min(values):.4f} to {max(values):.4f}"


def print_tables(runs: dict[str, list[dict]], seeds: list[int], epochs: int) -> None:
    print(f"\n| program | {' | '.join(f'seed {s}' for s in seeds)} | mean | standard deviation | range |")
    print("|---|" + "---|" * (len(seeds) + 3))
    for figure in ("test_acc", "test_loss"):
        for program in PROGRAMS:
            values = [run[figure] for run in runs[program]]
            print(f"| {program} {figure} | {' | '.join(f'{v:.4f}' for v in values)} | {spread(values)} |")
    print(f"\n| epoch | {' | '.join(f'{p} loss' for p in PROGRAMS)} | {' | '.join(f'{p} accuracy' for p in PROGRAMS)} |")
    print("|---|---|---|---|---|")
    for epoch in range(epochs):
        cells = [statistics.mean(run[series][epoch] for run in runs[program])
                 for series in ("loss", "accuracy") for program in PROGRAMS]
        print(f"| {epoch + 1} | " + " | ".join(f"{c:.4f}" for c in cells) + " |")
    print(f"# per-epoch figures: training loss and accuracy, means over the {len(seeds)} seeds")


def draw(runs: dict[str, list[dict]], epochs: int, out: Path) -> None:
    """Loss and accuracy per epoch (each seed thin, the mean bold), and each seed's test accuracy."""
    from src.plots import file_pyplot, save_figure

    plt = file_pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), gridspec_kw={"width_ratios": [2, 2, 1.2]})
    colours = {"Keras": "tab:red", "project": "tab:blue"}
    x = list(range(1, epochs + 1))
    for ax, series, title in ((axes[0], "loss", "training loss"), (axes[1], "accuracy", "training accuracy")):
        for program in PROGRAMS:
            for run in runs[program]:
                ax.plot(x, run[series], color=colours[program], alpha=0.3, linewidth=1)
            mean = [statistics.mean(run[series][e] for run in runs[program]) for e in range(epochs)]
            label = "Keras original" if program == "Keras" else "this project"
            ax.plot(x, mean, color=colours[program], marker="o", linewidth=2, label=f"{label} (mean of {len(runs[program])})")
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend()
    for i, program in enumerate(PROGRAMS):
        values = [run["test_acc"] for run in runs[program]]
        axes[2].scatter([i] * len(values), values, color=colours[program], alpha=0.7)
        axes[2].errorbar([i + 0.15], [statistics.mean(values)], yerr=[statistics.stdev(values)], color=colours[program],
                         fmt="D", capsize=4)
    axes[2].set(title="test accuracy (mean ± s.d.)", xticks=[0, 1],
                xticklabels=["Keras original", "this project"], xlim=(-0.5, 1.6))
    axes[2].grid(alpha=0.3)
    fig.suptitle(f"Fashion-MNIST, {epochs} epochs, batch 128, RMSprop: the same seeds for both programs")
    fig.tight_layout()
    save_figure(fig, out)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keras-python", required=True, help="a Python that has TensorFlow and Keras")
    parser.add_argument("--python", default=sys.executable, help="the Python that runs the project (default: this one)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "faithfulness.png")
    args = parser.parse_args()
    if len(args.seeds) < 2:
        raise SystemExit(f"error: --seeds {' '.join(map(str, args.seeds))} is not valid: the spread needs two seeds or more")
    if not FASHION.is_dir():
        raise SystemExit(f"error: {FASHION} not found: bench/faithfulness.py needs Fashion-MNIST "
                         "(apt-get install dataset-fashion-mnist)")
    from src.idx import prepare_files

    prepare_files("fashion_mnist", ROOT / "data")  # where the project's runs read it
    versions = {python: subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
                for python, code in ((args.keras_python, "import keras, tensorflow as tf; print('Keras', keras.__version__, "
                                      "'on tensorflow', tf.__version__)"),
                                     (args.python, "import torch, lightning; print('torch', torch.__version__, "
                                      "'lightning', lightning.__version__)"))}
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}; "
          f"{'; '.join(versions.values())}; load average before: {' '.join(f'{v:.1f}' for v in os.getloadavg())}",
          flush=True)
    runs: dict[str, list[dict]] = {program: [] for program in PROGRAMS}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            runs["Keras"].append(keras_run(args.keras_python, seed, args.epochs, Path(tmp) / f"keras-{seed}"))
            runs["project"].append(project_run(args.python, seed, args.epochs, Path(tmp) / f"project-{seed}"))
            print(f"# seed {seed}: Keras test_acc {runs['Keras'][-1]['test_acc']:.4f}, "
                  f"project test_acc {runs['project'][-1]['test_acc']:.4f}; "
                  f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}", flush=True)
    print_tables(runs, args.seeds, args.epochs)
    draw(runs, args.epochs, args.figure)
    print(f"# figure: {args.figure}")
    print("# every run: " + json.dumps({p: [{k: [round(v, 5) for v in r[k]] if isinstance(r[k], list) else round(r[k], 5)
                                             for k in r} for r in runs[p]] for p in PROGRAMS}))


if __name__ == "__main__":
    main()
