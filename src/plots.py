"""Figures saved into a run's folder. matplotlib is imported here only, when a figure is drawn."""

from __future__ import annotations

import csv
from pathlib import Path

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


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
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, name in zip(axes, ("loss", "acc")):
        for stage in ("train", "val"):
            points = series.get(f"{stage}/{name}")
            if points:
                epochs = sorted(points)
                ax.plot([e + 1 for e in epochs], [points[e] for e in epochs], marker="o", label=stage)
        ax.set(title=name, xlabel="epoch")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def confusion_matrix(confusion: torch.Tensor, classes: list[str], out: Path) -> Path:
    """Counts of (true, predicted) test labels, with each class's accuracy on its row."""
    plt = _pyplot()
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
    ax.set(xlabel="predicted", ylabel="true (per-class accuracy)", title="test confusion matrix")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
