"""The results table of a Hydra multirun: summary.csv, a sorted table and a plot in the sweep folder.

Registered in conf/train.yaml as a Hydra callback, so every `python -m src.train -m ...` gets it,
whatever the launcher. Each job records its own outcome in `result.json` in its folder (from the
process that ran it: this one, a joblib worker or a SLURM node); when the sweep ends, the rows are
collected from the job folders and the job's own metrics.csv.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from src.atomic import written_whole
from src.config import sweep_metric, tested_checkpoint
from src.errors import CannotWrite, exit_with, one_line
from src.run_files import METRICS, last_checkpoint
from src.slurm_job import resumed_note

RESULT_FILE = "result.json"
# resumed: where a job that SLURM started again went on from (src/slurm_job.py); empty for the others.
COLUMNS = ("job", "overrides", "status", "val/acc", "test/acc", "tested", "epochs", "wall_s", "resumed", "checkpoint",
           "error")


class SweepSummary(Callback):
    """Record every job's outcome; when the sweep ends, write, print and plot the summary."""

    def __init__(self, filename: str = "summary.csv", plot: str = "summary.png"):
        self.filename, self.plot = filename, plot
        self._started: float | None = None

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._started = time.time()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN or os.environ.get("SLURM_PROCID", "0") != "0":
            return  # a DDP job on SLURM runs once per task; the first task speaks for the job
        failed = job_return.status == JobStatus.FAILED
        # The exception itself; the public getter would re-raise it.
        error = job_return._return_value if failed else None
        result = {
            "job": config.hydra.job.num,
            "overrides": list(config.hydra.overrides.task),
            "status": "failed" if failed else "completed",
            "metric": sweep_metric(config),
            "tested": tested_checkpoint(config),
            "value": None if failed else _number(job_return.return_value),
            "wall_s": round(time.time() - self._started, 2) if self._started else None,
            "error": _one_line(error) if failed else "",
        }
        with _stop_on_a_failed_write(), written_whole(Path(config.hydra.runtime.output_dir) / RESULT_FILE) as partial:
            partial.write_text(json.dumps(result, indent=1))
        if failed:
            # Hydra's sweeper re-raises the first failure once every job has run, which would skip
            # on_multirun_end and with it the summary; the error is recorded above instead.
            job_return.status, job_return.return_value = JobStatus.COMPLETED, float("nan")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = collect(sweep_dir)
        if not rows:
            return
        metric = rows[0]["metric"]
        rows.sort(key=lambda row: _sort_key(row, metric))
        with _stop_on_a_failed_write():
            write_csv(rows, sweep_dir / self.filename)
        print(f"\nSweep summary, best {metric} first ({sweep_dir / self.filename}):")
        print(format_table(rows, metric))
        with _stop_on_a_failed_write():
            plotted = plot_metric(rows, metric, sweep_dir / self.plot)
        if plotted:
            print(f"Plot of {metric} against the swept values: {plotted}")
        if metric.startswith("test/"):
            print("note: ranked on the test set; choose hyperparameters on a validation split with +sweep=grid "
                  "(or data.val_size=N), and keep the test set for the final figure")
        failed = sum(row["status"] == "failed" for row in rows)
        if failed:
            exit_with(f"{failed} of {len(rows)} jobs failed; their errors are in {sweep_dir / self.filename}")


@contextlib.contextmanager
def _stop_on_a_failed_write():
    """A file of the sweep that cannot be written stops the sweep with one line and exit status 1.

    Hydra turns an exception of a callback into a warning and goes on, and the sweep would end with
    status 0 and a summary short of a job, or none at all.
    """
    try:
        yield
    except CannotWrite as error:
        exit_with(error)


def collect(sweep_dir: Path) -> list[dict]:
    """One row per job folder under the sweep folder: its result.json and its metrics.csv."""
    rows = []
    for result_file in sorted(sweep_dir.glob(f"**/{RESULT_FILE}")):
        job_dir = result_file.parent
        result = json.loads(result_file.read_text())
        result.setdefault("tested", "last")  # a result.json of an earlier version
        metrics = last_metrics(job_dir / METRICS)
        checkpoint = last_checkpoint(job_dir)
        rows.append({
            **result,
            "overrides": " ".join(result["overrides"]),
            # The tested weights' val/acc: the best epoch's when the best was tested.
            "val/acc": metrics.get("best val/acc" if result["tested"] == "best" else "val/acc"),
            "test/acc": metrics.get("test/acc"),
            "epochs": metrics.get("epochs"),
            "resumed": resumed_note(job_dir),
            "checkpoint": str(checkpoint) if checkpoint.is_file() else "",
            "swept": dict(o.split("=", 1) for o in result["overrides"] if "=" in o),
        })
    return rows


def last_metrics(metrics_csv: Path) -> dict:
    """The last value of every column of Lightning's metrics.csv, the highest val/acc, and how many epochs trained."""
    if not metrics_csv.is_file():
        return {}
    last: dict[str, Any] = {}
    trained = set()
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if value not in ("", None):
                    last[key] = float(value)
            if row.get("train/loss"):
                trained.add(int(row["epoch"]))
            if row.get("val/acc"):
                last["best val/acc"] = max(last.get("best val/acc", 0.0), float(row["val/acc"]))
    last["epochs"] = len(trained)
    return last


def _sort_key(row: dict, metric: str) -> tuple:
    value = row["value"]
    if value is None or math.isnan(value):
        return (1, 0.0, row["job"])  # failed or unmeasured jobs last
    return (0, value if "loss" in metric else -value, row["job"])


def write_csv(rows: list[dict], path: Path) -> None:
    with written_whole(path) as partial, open(partial, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in COLUMNS})


def format_table(rows: list[dict], metric: str) -> str:
    """An aligned text table; columns that say nothing in this sweep are left out."""
    varied = swept_keys(rows)
    rows = [{**row, "swept values": " ".join(f"{k}={row['swept'].get(k, '')}" for k in varied)} for row in rows]
    wanted = dict.fromkeys(("job", "status", "val/acc", "test/acc", metric, "tested", "epochs", "wall_s", "resumed",
                            "swept values", "error"))
    columns = [c for c in wanted if any(row.get(c) not in (None, "") for row in rows)]

    def cell(column: str, value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.1f}" if column == "wall_s" else f"{value:.4f}"
        return "" if value is None else str(value)

    table = [columns] + [[cell(c, row.get(c)) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in table)


def swept_keys(rows: list[dict]) -> list[str]:
    """The override keys whose value differs between jobs."""
    keys = dict.fromkeys(key for row in rows for key in row["swept"])
    return [k for k in keys if len({row["swept"].get(k) for row in rows}) > 1]


def plot_metric(rows: list[dict], metric: str, out: Path) -> Path | None:
    """The metric against each swept key's values, one panel per key; failed jobs are left out."""
    done = [row for row in rows if row["value"] is not None and not math.isnan(row["value"])]
    keys = swept_keys(rows)
    if not done or not keys:
        return None
    from src.plots import file_pyplot, save_figure

    plt = file_pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        values = [row["swept"].get(key) for row in done]
        numbers = [_number(v) for v in values]
        if all(n is not None for n in numbers):
            ax.scatter(numbers, [row["value"] for row in done])
            if min(numbers) > 0 and max(numbers) / min(numbers) >= 100:
                ax.set_xscale("log")
        else:  # categories, in the order they first appear
            labels = list(dict.fromkeys(str(v) for v in values))
            ax.scatter([labels.index(str(v)) for v in values], [row["value"] for row in done])
            ax.set_xticks(range(len(labels)), labels)
        ax.set(xlabel=key, ylabel=metric)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out)
    plt.close(fig)
    return out


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _one_line(error: BaseException | None) -> str:
    if error is None:
        return ""
    text = one_line(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
