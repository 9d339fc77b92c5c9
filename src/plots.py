"""Figures saved into a run's folder. matplotlib is imported here only, when a figure is drawn."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch

from src.atomic import written_whole


def file_pyplot():
    """matplotlib.pyplot on the Agg backend: figures go to files, never to a window."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out: Path, dpi: int = 100) -> Path:
    """`fig` as the file `out`, put in place whole or not at all: a full disk leaves an earlier figure
    there as it was, and ends with one line naming `out`."""
    out = Path(out)
    with written_whole(out) as partial:
        fig.savefig(partial, dpi=dpi, format=out.suffix.lstrip(".") or "png")  # the temporary name has no such suffix
    return out


def training_curves(metrics_csv: Path, out: Path) -> Path | None:
    """Loss and accuracy per epoch from Lightning's metrics.csv, like plotting Keras's History."""
    rows = list(csv.DictReader(open(metrics_csv))) if metrics_csv.is_file() else []
    series: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in row.items():
            if value and key.split("/")[0] in ("train", "val"):
                series.setdefault(key, {})[int(row["epoch"])] = float(value)
    if not series:
        return None
    plt = file_pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, name in zip(axes, ("loss", "acc")):
        for stage in ("train", "val"):
            points = series.get(f"{stage}/{name}")
            if points:
                epochs = sorted(points)
                ax.plot([e + 1 for e in epochs], [points[e] for e in epochs], marker="o", label=stage)
        ax.set(title=name, xlabel="epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out)
    plt.close(fig)
    return out


def confusion_matrix(confusion: torch.Tensor, classes: list[str], out: Path, split: str = "test") -> Path:
    """Counts of (true, predicted) labels of the split, with each class's accuracy on its row."""
    plt = file_pyplot()
    counts = confusion.to(torch.int64)
    per_class = counts.diag().double() / counts.sum(dim=1).clamp(min=1)
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(counts, cmap="Blues")
    for i in range(len(classes)):
        for j in range(len(classes)):
            value = int(counts[i, j])
            ax.text(j, i, value, ha="center", va="center", fontsize=7,
                    color="white" if value > counts.max() / 2 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), [f"{c} ({a:.1%})" for c, a in zip(classes, per_class.tolist())])
    ax.set(xlabel="predicted", ylabel="true (per-class accuracy)", title=f"{split} confusion matrix")
    fig.tight_layout()
    save_figure(fig, out)
    plt.close(fig)
    return out


def mistakes(images: torch.Tensor, names: list[str], true: list[int], predicted: list[int],
             probabilities: list[float], classes: list[str], out: Path, title: str, columns: int = 5) -> Path:
    """Wrongly classified images in a grid, in the order given, each titled with its name, its true class,
    the predicted class and the probability the model gave it."""
    plt = file_pyplot()
    columns = max(1, min(columns, len(images)))
    rows = -(-len(images) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.75 * columns, 2.3 * rows + 0.4), squeeze=False,
                             layout="constrained")  # room for each image's four title lines
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, name, t, p, probability in zip(axes.flat, images, names, true, predicted, probabilities):
        ax.imshow(image.detach().cpu().reshape(28, 28), cmap="gray", vmin=0, vmax=1)
        # Cut, not rounded, to two decimals: a wrong answer given 99.996% must not read "100.00%".
        percent = math.floor(probability * 10_000) / 100
        ax.set_title(f"{name}\ntrue: {classes[t]}\npredicted: {classes[p]}\n{percent:.2f}%", fontsize=7.5)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, out, dpi=90)
    plt.close(fig)
    return out


def prediction(probabilities: torch.Tensor, classes: list[str], image: torch.Tensor, out: Path,
               title: str, label: int | None = None, keep_open: bool = False) -> Path:
    """The 10 probabilities as a bar plot, as the original draws with seaborn, beside the 28x28 image the model saw.

    The predicted class is orange and the true label, when known, green: a right answer is one green bar.
    keep_open leaves the figure open for `show_open_figures`, drawn with matplotlib's default
    backend: a window where a display exists.
    """
    if keep_open:
        import matplotlib.pyplot as plt  # not file_pyplot(): that one never opens a window
    else:
        plt = file_pyplot()
    probabilities = probabilities.detach().cpu().double()
    predicted = int(probabilities.argmax())
    colours = ["tab:blue"] * len(classes)
    colours[predicted] = "tab:orange"
    if label is not None:
        colours[label] = "tab:green"
    fig, (bars, picture) = plt.subplots(1, 2, figsize=(9, 3.2), gridspec_kw={"width_ratios": [2.4, 1]})
    bars.bar(range(len(classes)), probabilities.tolist(), color=colours)
    short = all(len(c) <= 2 for c in classes)
    bars.set_xticks(range(len(classes)), classes, rotation=0 if short else 35, ha="center" if short else "right",
                    fontsize=9)
    outcome = "" if label is None else (" (right)" if predicted == label else f" (wrong: it is {classes[label]})")
    bars.set(ylim=(0, 1), ylabel="probability",
             title=f"predicted {classes[predicted]}: {float(probabilities[predicted]):.1%}{outcome}")
    bars.grid(axis="y", alpha=0.3)
    picture.imshow(image.detach().cpu().reshape(28, 28), cmap="gray", vmin=0, vmax=1)
    picture.set_title(title, fontsize=9)
    picture.axis("off")
    fig.tight_layout()
    save_figure(fig, out)
    if not keep_open:
        plt.close(fig)
    return out


def show_open_figures() -> bool:
    """Open the figures kept open in windows and wait until they are closed.

    Returns False, closing them, where matplotlib found no display and fell back to a file-only backend.
    """
    import matplotlib.pyplot as plt

    if plt.get_backend().lower() in ("agg", "cairo", "pdf", "pgf", "ps", "svg", "template"):  # file-only backends
        plt.close("all")
        return False
    plt.show()
    return True
