"""The speed benchmark runs and reports each loop beside the hand-written one (its timings are not asserted,
only that the table is computed from them as it says)."""

from __future__ import annotations

import importlib.util
import os
import re
import statistics
import subprocess
import sys
from ast import literal_eval

import pytest

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
