"""The speed benchmark runs and reports each loop beside the hand-written one (its timings are not asserted,
only that the table is computed from them as it says)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import site
import statistics
import subprocess
import sys
import tempfile
import venv
from ast import literal_eval
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, needs_fashion


@pytest.mark.slow
def test_quick_benchmark_reports_each_loop_beside_the_hand_written_one():
    result = subprocess.run([sys.executable, "bench/speed.py", "--quick"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "47 steps per epoch" in result.stdout  # 6000 generated images in batches of 128
    # Every figure of the table, recomputed from the epoch times the benchmark prints: medians without
    # the first epoch, and each ratio the loop's median over the hand-written median beside it.
    epochs = {name: (literal_eval(hand), literal_eval(other)) for name, hand, other in re.findall(
        r"^# every epoch, (\w+) run: hand-written (\[.*?\]), \w+ (\[.*?\])$", result.stdout, re.M)}
    assert sorted(epochs) == ["lightning", "project"] and all(len(t) == 3 for pair in epochs.values() for t in pair)
    hand_all = statistics.median(t for hand, _ in epochs.values() for t in hand[1:])
    assert f"\n| hand-written PyTorch | {hand_all:.3f} | {47 / hand_all:.0f} | | 1.00 |\n" in result.stdout, result.stdout
    for name, label in (("lightning", "Lightning alone"), ("project", "project")):
        hand, other = (statistics.median(times[1:]) for times in epochs[name])
        row = f"| {other:.3f} | {47 / other:.0f} | {hand:.3f} | {other / hand:.2f} |\n"
        assert re.search(rf"^\| {label} .*{re.escape(row)}", result.stdout, re.M), (row, result.stdout)
    assert re.search(r"^\| backward \| \d+\.\d+ \|$", result.stdout, re.M)


@pytest.mark.slow
def test_quick_process_benchmark_reports_both_processes_and_start_up():
    needs_fashion()
    # This Python, not the base-only venv the benchmark makes by default (that takes minutes to install).
    result = subprocess.run([sys.executable, "bench/speed.py", "--mode", "process", "--quick", "--python", sys.executable],
                            cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    scipy = "yes" if importlib.util.find_spec("scipy") else "no"
    assert re.search(rf"^# processes run by {re.escape(sys.executable)} .*; scipy importable there: {scipy}$",
                     result.stdout, re.M), result.stdout
    for name in ("plain", "project"):
        assert re.search(rf"^\| {name} \| \d+\.\d+ \| \d+ \| test_loss: \d", result.stdout, re.M), result.stdout
    assert re.search(r"^# ratio project / plain: \d+\.\d+$", result.stdout, re.M)
    assert re.search(r"^\| the same and what src\.train adds .*\| \d+\.\d+ \| [+-]\d+\.\d+ \|$", result.stdout, re.M)


@pytest.mark.slow
def test_timeline_splits_each_whole_process_into_parts_at_the_points_its_files_show(tmp_path):
    needs_fashion()
    keep = tmp_path / "runs"
    result = subprocess.run([sys.executable, "bench/timeline.py", "--quick", "--python",
                             sys.executable, "--keep", str(keep)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = re.findall(r"^\| ([^|]+) \| (\d+\.\d+) \| (\d+\.\d+) \| ([+-]\d+\.\d+) \|$", result.stdout, re.M)
    assert [row[0] for row in rows] == ["start-up and imports", "Hydra: config, logging, run folder",
                                        "setup: Trainer, data, model", "training", "test", "figures", "exit",
                                        "whole process"], result.stdout
    marks = json.loads((keep / "marks.json").read_text())
    ends = ["config", "setup", "training", "trained", "figures", "figures-done", "wall"]
    for column, run in ((1, "plain0"), (2, "project0")):
        taken = {**marks[run], "setup": marks[run].get("setup", marks[run]["config"])}  # the plain script has no config
        points = [0.0] + [taken[end] for end in ends]
        assert points == sorted(points), (run, taken)  # the parts follow one another
        # Each figure of the table is the gap between the marks that bound its part, to the printed precision.
        assert [row[column] for row in rows] == [f"{b - a:.2f}" for a, b in zip(points, points[1:])] + [
            f"{taken['wall']:.2f}"]
        # The marks are where the parts meet: the process's files were written between them (their times in
        # seconds since the process began, from the clock time it began).
        written = {p.name: p.stat().st_mtime - taken["began"] for p in (keep / run).rglob("*") if p.is_file()}
        slack = 0.05  # the start's clock ticks (10 ms) and the file system's times
        assert taken["training"] - slack <= written["last.ckpt"] <= taken["trained"] + slack, (run, written, taken)
        for figure in ("training_curves.png", "confusion_matrix.png"):
            assert taken["figures"] - slack <= written[figure] <= taken["figures-done"] + slack, (figure, written, taken)
        assert max(written.values()) <= taken["wall"] + slack
    assert float(rows[1][1]) == 0  # the plain script has no config
    # Both trained for that one epoch (94 steps, 0.25 s or more on this 2-core machine): each part's boundaries were found.
    assert float(rows[3][1]) > 0.1 and float(rows[3][2]) > 0.1
    # --quick: the first 12,000 images, in batches of 128
    assert torch.load(keep / "project0" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 94


HIDE_HYDRA = """\"\"\"Hydra's packages hidden in the borrowed site folder: importable only from elsewhere on sys.path.\"\"\"
import importlib.machinery, sys

class HideHydra:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if path is None and name in ("hydra", "omegaconf", "antlr4", "hydra_plugins"):
            elsewhere = [entry for entry in sys.path if entry != {borrowed!r}]
            spec = importlib.machinery.PathFinder.find_spec(name, elsewhere)
            if spec is None:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return spec

sys.meta_path.insert(0, HideHydra)
"""


def python_without_hydra(folder: Path) -> Path:
    """A Python with this one's packages but hydra-core, omegaconf and antlr4 (and Hydra's plugins), as the
    GPU host's: a virtual environment that borrows this one's site folder, where it cannot see those.
    (The packages keep their paths, so torch.compile finds what it compiled for this Python in its cache.)"""
    venv.create(folder, with_pip=False)
    [own] = Path(folder).glob("lib/python*/site-packages")
    borrowed = site.getsitepackages()[0]
    (own / "hide_hydra.py").write_text(HIDE_HYDRA.format(borrowed=borrowed))
    (own / "borrowed.pth").write_text(f"{borrowed}\nimport hide_hydra\n")
    return folder / "bin" / "python"


@pytest.mark.slow
def test_gpu_check_rehearses_end_to_end_on_a_cpu(tmp_path):
    """`bash bench/gpu_check.sh --cpu`: the GPU host's check on tiny data, from a Python without hydra (the
    host's has none: the check installs the prepared wheels for itself), so that it cannot rot between runs."""
    if not (ROOT / ".gpu" / "manifest.json").is_file():  # what the check brings to the host: wheels from PyPI, the data
        prepared = subprocess.run(["bash", "bench/gpu_check.sh", "--prepare"], cwd=ROOT, capture_output=True, text=True,
                                  timeout=600, env={**os.environ, "PYTHON": sys.executable})
        assert prepared.returncode == 0, (prepared.stdout + prepared.stderr)[-3000:]
    python = python_without_hydra(tmp_path / "venv")
    assert subprocess.run([python, "-c", "import torch, lightning, hydra"], capture_output=True).returncode == 1
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    out = tmp_path / "out"
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu", str(out)], cwd=ROOT, env={**env, "PYTHON": str(python)},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["check.log", "junit.xml", "results.json", "results.md"]
    results = json.loads((out / "results.json").read_text())
    assert Path(results["host"]["hydra from"]).is_relative_to(tempfile.gettempdir())  # the wheels, for this run
    assert results["host"]["accelerator=auto"] == "CPUAccelerator on cpu"
    assert results["tests"]["outcomes"] == {"tests.test_cuda": "skipped"}  # no CUDA here: the module is skipped
    timings = {(r["precision"], r["compile"]): r for r in results["timings"]}
    assert list(timings) == [("32", False), ("bf16-mixed", False), ("32", True)]
    for (precision, compiled), row in timings.items():
        assert row["returncode"] == 0 and row["images"] == 2048 and row["steps_per_epoch"] == 16
        assert len(row["project_epochs"]) == len(row["hand_epochs"]) == 3  # the rehearsal's epochs
        assert (row["first_step_s"] is not None) == compiled
    table = (out / "results.md").read_text()
    assert "(a CPU rehearsal on tiny data, not GPU figures)" in table
    assert "(2048 images), batch 128, 16 steps per epoch, 3 epochs on cpu;" in table
    for precision, compiled in timings:
        assert re.search(rf"^\| {precision} \| {str(compiled).lower()} \| \d+\.\d+ \| \d+ \| \d+\.\d+ \| \d+ \| "
                         r"\d+\.\d+ \|", table, re.M), table
