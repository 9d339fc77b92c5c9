"""The speed benchmark runs and reports each loop beside the hand-written one (its figures are not asserted)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, needs_fashion


@pytest.mark.slow
def test_quick_benchmark_reports_each_loop_beside_the_hand_written_one():
    result = subprocess.run([sys.executable, "bench/speed.py", "--quick"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^\| hand-written PyTorch \| \d+\.\d+ \| \d+ \| \| 1\.00 \|$", result.stdout, re.M), result.stdout
    for label in ("Lightning alone", "project"):
        row = re.search(rf"^\| {label} .*\| (\d+\.\d+) \| \d+ \| (\d+\.\d+) \| (\d+\.\d+) \|$", result.stdout, re.M)
        assert row, result.stdout
        assert float(row[3]) == pytest.approx(float(row[1]) / float(row[2]), abs=0.011)
    assert "47 steps per epoch" in result.stdout  # 6000 generated images in batches of 128
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
