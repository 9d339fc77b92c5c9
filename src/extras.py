"""The optional extras of pyproject.toml: what each brings, and one line naming the extra a feature needs.

The core (train, predict, plain -m sweeps) needs none of them; each optional capability imports
its packages only when it is used, and a user who has not installed them gets one line saying
which extra to install instead of a ModuleNotFoundError or Hydra's "Could not find" message.
"""

from __future__ import annotations

import importlib.util
import re

from src.config import UserError

# hydra/launcher=NAME -> the Hydra plugin module that provides it (all in the `sweep` extra).
LAUNCHER_PLUGINS = {
    "joblib": "hydra_plugins.hydra_joblib_launcher",
    "submitit_local": "hydra_plugins.hydra_submitit_launcher",
    "submitit_slurm": "hydra_plugins.hydra_submitit_launcher",
    "slurm": "hydra_plugins.hydra_submitit_launcher",  # conf/hydra/launcher/slurm.yaml extends submitit_slurm
    "slurm_cpu": "hydra_plugins.hydra_submitit_launcher",
}


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def require(extra: str, feature: str, *modules: str) -> None:
    """Raise a one-line UserError if any of `modules` is missing: `feature` needs `extra`."""
    missing = [module for module in modules if not installed(module)]
    if missing:
        raise UserError(f"{feature} needs the '{extra}' extra, which is not installed (no module named "
                        f"{missing[0]}): pip install -e \".[{extra}]\"")


def check_launcher(arguments: list[str]) -> None:
    """A hydra/launcher=NAME override whose plugin is missing: one line naming the `sweep` extra.

    Checked before Hydra composes the config, which would otherwise say only that it cannot
    find hydra/launcher/NAME among the launchers it knows.
    """
    for argument in arguments:
        match = re.fullmatch(r"[+~]*hydra/launcher=(\w+)", argument)
        if match and match.group(1) in LAUNCHER_PLUGINS:
            require("sweep", f"hydra/launcher={match.group(1)}", LAUNCHER_PLUGINS[match.group(1)])
