"""The speed benchmark runs and reports both loops side by side (its figures are not asserted)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_quick_benchmark_reports_both_loops_and_their_ratio():
    result = subprocess.run([sys.executable, "bench/speed.py", "--quick"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    hand = re.search(r"^\| hand-written PyTorch \| (\d+\.\d+) \| (\d+) \| 1\.00 \|$", result.stdout, re.M)
    project = re.search(r"^\| project .*\| (\d+\.\d+) \| (\d+) \| (\d+\.\d+) \|$", result.stdout, re.M)
    assert hand and project, result.stdout
    ratio = float(project[1]) / float(hand[1])
    assert float(project[3]) == pytest.approx(ratio, abs=0.011)
    assert "47 steps per epoch" in result.stdout  # 6000 generated images in batches of 128
    assert re.search(r"^\| backward \| \d+\.\d+ \|$", result.stdout, re.M)
