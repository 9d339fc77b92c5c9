"""The command-line layer: how every `python -m src.X` is declared and run.

`entry_point(NAME)` turns `main(cfg, context)` into the program: Hydra composes conf/NAME.yaml, the
run's context is built once (src/run_context.py), and bad input — a wrong override, an unknown key, a
missing launcher extra, any UserError — ends with one line `error: ...` and exit status 1, never a
traceback. HYDRA_FULL_ERROR=1 shows Hydra's own report instead.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
from dataclasses import fields, is_dataclass

from src.errors import UserError, cannot_write, exit_with
from src.extras import require
from src.run_context import RunContext

_ONE_LINE = "_MNIST_ONE_LINE_ERRORS"  # set while run_hydra made Hydra raise config errors

# hydra/launcher=NAME -> the Hydra plugin module that provides it (all in the `sweep` extra).
LAUNCHER_PLUGINS = {
    "joblib": "hydra_plugins.hydra_joblib_launcher",
    "submitit_local": "hydra_plugins.hydra_submitit_launcher",
    "submitit_slurm": "hydra_plugins.hydra_submitit_launcher",
    "slurm": "hydra_plugins.hydra_submitit_launcher",  # conf/hydra/launcher/slurm.yaml extends submitit_slurm
    "slurm_cpu": "hydra_plugins.hydra_submitit_launcher",
}


class ConsoleFormatter(logging.Formatter):
    """The console's log lines (conf/hydra/job_logging/console.yaml): a message as print() would show it, and
    `warning: ...` for a warning or worse, without Hydra's date and logger name (train.log keeps those)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def entry_point(config_name: str):
    """Declare `main(cfg, context)` as the program of conf/CONFIG_NAME.yaml; call the result to run it.

    In a -m sweep a UserError is re-raised instead of ending the process, so that Hydra records the
    job as failed and the sweep goes on with the next job.
    """
    import hydra

    def declare(task):
        @functools.wraps(task)  # Hydra finds the entry module, its job name and conf/ through __wrapped__
        def job(cfg):
            _stop_one_line_errors()  # composed: bugs in the task keep Hydra's usual report
            context = RunContext.from_hydra()
            try:
                return task(cfg, context)
            except UserError as error:
                if context.sweep:
                    raise
                exit_with(error)

        hydra_main = hydra.main(config_path="../conf", config_name=config_name, version_base="1.3")(job)

        @functools.wraps(task)
        def main():
            return run_hydra(hydra_main)

        return main

    return declare


def run_hydra(hydra_main) -> None:
    """Run a @hydra.main function so that config errors print one line and exit 1.

    Hydra prints a bad override, an unknown key, a wrong type or a missing group option over
    several lines. With HYDRA_FULL_ERROR=1 it raises them instead, so they are caught here;
    the task wrapper restores the user's setting once the config is composed.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        check_launcher(sys.argv[1:])  # before Hydra, which would only say it cannot find the launcher
    except UserError as error:
        exit_with(error)
    if os.environ.get("HYDRA_FULL_ERROR") == "1":  # the user asked for full tracebacks
        return hydra_main()
    os.environ["HYDRA_FULL_ERROR"] = os.environ[_ONE_LINE] = "1"
    try:
        return hydra_main()
    except (HydraException, OmegaConfBaseException) as error:
        exit_with(_hydra_message(error))
    except Exception as error:
        # Hydra's own writing before the task starts (the run folder, .hydra/, train.log): a folder that
        # cannot be made, a full disk. The task's own errors have passed the job above, which took _ONE_LINE.
        failed = cannot_write(None, error) if _ONE_LINE in os.environ else None
        if failed is None:
            raise
        exit_with(failed)
    finally:
        _stop_one_line_errors()


def _stop_one_line_errors() -> None:
    """Give HYDRA_FULL_ERROR back to the user, if run_hydra set it (once: the first caller does it)."""
    if os.environ.pop(_ONE_LINE, None):
        os.environ.pop("HYDRA_FULL_ERROR", None)


def check_launcher(arguments: list[str]) -> None:
    """A hydra/launcher=NAME override whose plugin is missing: one line naming the `sweep` extra.

    Checked before Hydra composes the config, which would otherwise say only that it cannot
    find hydra/launcher/NAME among the launchers it knows.
    """
    for argument in arguments:
        match = re.fullmatch(r"[+~]*hydra/launcher=(\w+)", argument)
        if match and match.group(1) in LAUNCHER_PLUGINS:
            require("sweep", f"hydra/launcher={match.group(1)}", LAUNCHER_PLUGINS[match.group(1)])


def _hydra_message(error: BaseException) -> str:
    """Hydra's and OmegaConf's multi-line messages, and their causes, as one line; an unknown key gets
    the valid keys of its schema."""
    lines: list[str] = []
    while error is not None:
        for line in str(error).splitlines():
            line = line.strip()
            noise = ("full_key:", "reference_type=", "object_type=", "Config search path", "provider=",
                     "Set the environment", "To append")
            if line and not line.startswith(noise) and line not in lines:
                lines.append(line)
        error = error.__cause__
    text = "; ".join(lines)
    unknown = re.search(r"Key '\w+' not in '(\w+)'", text)
    schema = _schema_named(unknown.group(1)) if unknown else None
    if schema is not None:
        text += f"; valid keys are {', '.join(f.name for f in fields(schema))}"
    # "Available options in 'optimizer':; adam; rmsprop" -> "Available options in 'optimizer': adam, rmsprop"
    return re.sub(r":; (.*)$", lambda m: ": " + m.group(1).replace("; ", ", "), text)


def _schema_named(name: str):
    """The dataclass called `name` among the schemas in Hydra's ConfigStore, nested ones included
    (the search's SearchConfig inside TuneConfig, say), or None."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import DictConfig, OmegaConf

    def schemas(node):
        if isinstance(node, dict):  # a group of the store
            for child in node.values():
                yield from schemas(child)
        elif isinstance(getattr(node, "node", None), DictConfig):  # a stored config
            yield from dataclasses_in(node.node)

    def dataclasses_in(config: DictConfig):
        kind = OmegaConf.get_type(config)
        if is_dataclass(kind):
            yield kind
        for key in config.keys():
            child = config._get_node(key)
            if isinstance(child, DictConfig):
                yield from dataclasses_in(child)

    return next((kind for kind in schemas(ConfigStore.instance().repo) if kind.__name__ == name), None)
