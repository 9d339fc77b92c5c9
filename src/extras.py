"""The optional extras of pyproject.toml: what each brings, and one line naming the extra a feature needs.

The core (train, predict, plain -m sweeps) needs none of them; each optional capability imports
its packages only when it is used, and a user who has not installed them gets one line saying
which extra to install instead of a ModuleNotFoundError (or, for a launcher, Hydra's "Could not
find" message: src/cli.py checks those before Hydra starts).
"""

from __future__ import annotations

import importlib.util

from src.errors import UserError


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False
    except ValueError:  # imported already, as a module without __spec__ (optuna_integration is such a lazy one)
        return True


def require(extra: str, feature: str, *modules: str) -> None:
    """Raise a one-line UserError if any of `modules` is missing: `feature` needs `extra`."""
    missing = [module for module in modules if not installed(module)]
    if missing:
        raise UserError(f"{feature} needs the '{extra}' extra, which is not installed (no module named "
                        f"{missing[0]}): pip install -e \".[{extra}]\"")
