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


DISTRIBUTION = "keras-mnist-lightning"  # pyproject.toml's [project] name


def not_installed(extra: str | None = None) -> list[str]:
    """What `pip install -e .` (extra None) or `pip install -e ".[EXTRA]"` would install and this Python lacks:
    each requirement of the installed project, nested extras included, that is missing or whose version is
    outside its range, as `REQUIREMENT (found VERSION)` or `REQUIREMENT (missing)`. Empty: all there."""
    from importlib import metadata

    from packaging.requirements import Requirement

    def requirements(wanted: str | None) -> list[Requirement]:
        listed = [Requirement(text) for text in metadata.requires(DISTRIBUTION) or []]
        chosen = [r for r in listed if (r.marker is None if wanted is None else
                                        r.marker is not None and r.marker.evaluate({"extra": wanted}))]
        nested = [r for r in chosen if r.name == DISTRIBUTION]
        return [r for r in chosen if r.name != DISTRIBUTION] + [
            inner for r in nested for name in sorted(r.extras) for inner in requirements(name)]

    try:
        metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return [f"{DISTRIBUTION} (missing: the project is not installed)"]
    if extra is not None and extra not in (metadata.metadata(DISTRIBUTION).get_all("Provides-Extra") or []):
        raise UserError(f"extra {extra!r} is not valid: {DISTRIBUTION} has "
                        f"{', '.join(metadata.metadata(DISTRIBUTION).get_all('Provides-Extra') or [])}")
    missing = []
    for requirement in requirements(extra):
        try:
            found = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            missing.append(f"{requirement} (missing)")
            continue
        if not requirement.specifier.contains(found, prereleases=True):
            missing.append(f"{requirement} (found {found})")
    return missing
