"""Asking for an optional capability whose extra is not installed gets one line naming the extra.

The tests hide an installed package from a real entry-point process (sys.modules[NAME] = None
makes Python treat it as absent), since the test environment has every extra installed.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import entry_env

HIDE_AND_RUN = """
import runpy, sys
for name in {hidden!r}:
    sys.modules[name] = None
sys.argv = ["{module}", *{args!r}]
runpy.run_module("{module}", run_name="__main__", alter_sys=True)
"""


def run_without(hidden: list[str], module: str, *args: str, cwd) -> subprocess.CompletedProcess:
    code = HIDE_AND_RUN.format(hidden=hidden, module=module, args=list(args))
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=entry_env(), capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("launcher, plugin", [
    ("slurm", "hydra_plugins.hydra_submitit_launcher"),
    ("submitit_local", "hydra_plugins.hydra_submitit_launcher"),
    ("joblib", "hydra_plugins.hydra_joblib_launcher"),
])
def test_a_launcher_without_the_sweep_extra_names_the_extra(tmp_path, launcher, plugin):
    result = run_without([plugin], "src.train", "-m", f"hydra/launcher={launcher}", "model.hidden=32,64", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: hydra/launcher={launcher} needs the 'sweep' extra, which is not installed "
                                     f"(no module named {plugin}): pip install -e \".[sweep]\"")
    assert not (tmp_path / "multirun").exists()


def test_the_search_without_optuna_names_the_extra(tmp_path):
    result = run_without(["optuna"], "src.tune", "hparams_search.n_trials=1", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == ("error: python -m src.tune needs the 'sweep' extra, which is not installed "
                                     "(no module named optuna): pip install -e \".[sweep]\"")
