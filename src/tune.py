"""Search hyperparameters with Optuna: `python -m src.tune [hparams_search.n_trials=N] [key=value ...]`.

TPE proposes lr, hidden size and batch size; each trial is a normal training run (src.train.train)
in `<study folder>/trial_<n>/`, reporting val/acc to Optuna after every epoch so the median pruner
can stop hopeless trials early. The study is kept in `<study folder>/journal.log`, Optuna's journal
storage, which several workers (processes, SLURM jobs) may share through a shared file system; a
database URL in hparams_search.storage serves the same purpose. The same command, run again or run
as several workers at once, adds trials until the study holds hparams_search.n_trials in all.

Optuna is driven directly rather than through Hydra's Optuna sweeper plugin, which requires
optuna<3 and, running each trial through a launcher, cannot report to Optuna during training.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from src.atomic import writing
from src.cli import entry_point
from src.config import TrainConfig, validated
from src.errors import CannotWrite, UserError, cannot_write
from src.extras import require
from src.run_context import RunContext

log = logging.getLogger(__name__)


@dataclass
class PrunerConfig:
    n_startup_trials: int = 5
    n_warmup_steps: int = 1

    def __post_init__(self) -> None:
        for key in ("n_startup_trials", "n_warmup_steps"):
            if getattr(self, key) < 0:
                raise UserError(f"hparams_search.pruner.{key}={getattr(self, key)!r} is not valid: expected 0 or more")


@dataclass
class SearchConfig:
    study_name: str = "mnist-mlp"
    n_trials: int = 20
    seed: int = 42
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    params: Any = None  # nested training keys -> {low, high, log} or {choices}
    storage: Optional[str] = None  # None: journal.log in the study folder; or a database URL

    def __post_init__(self) -> None:
        if not self.study_name.strip():
            raise UserError(f"hparams_search.study_name={self.study_name!r} is not valid: expected a name")
        if self.n_trials < 1:
            raise UserError(f"hparams_search.n_trials={self.n_trials!r} is not valid: expected 1 or more")
        if self.storage is not None and "://" not in self.storage:
            raise UserError(f"hparams_search.storage={self.storage!r} is not valid: expected a database URL "
                            "(postgresql://USER@HOST/DB, mysql://...), or null for journal.log in the study folder")


@dataclass
class TuneConfig(TrainConfig):
    hparams_search: SearchConfig = field(default_factory=SearchConfig)


# hparams_search/optuna.yaml composes train.yaml with this schema in place of TrainConfig.
ConfigStore.instance().store(group="schema", name="tune", node=TuneConfig, package="_global_")


def search_space(params: dict, prefix: str = "") -> dict[str, dict]:
    """{"optimizer.lr": {low, high, log}, ...} from the nested hparams_search.params."""
    space = {}
    for name, spec in params.items():
        if isinstance(spec, dict) and not ({"low", "high", "choices"} & spec.keys()):
            space.update(search_space(spec, f"{prefix}{name}."))
        else:
            space[f"{prefix}{name}"] = spec
    return space


SPEC = "expected {low: A, high: B}, with log: true for a log scale, or {choices: [A, B, ...]}"


def _as_written(spec: Any) -> str:
    """A spec as the command line writes it: {low: 32, high: 1024, log: true}."""
    if isinstance(spec, dict):
        return "{" + ", ".join(f"{k}: {_as_written(v)}" for k, v in spec.items()) + "}"
    if isinstance(spec, list):
        return "[" + ", ".join(map(_as_written, spec)) + "]"
    return "true" if spec is True else "false" if spec is False else "null" if spec is None else str(spec)


def check_space(cfg: DictConfig, space: dict[str, Any]) -> None:
    """Every searched key's range or choices, checked before the study is opened, as training checks its keys: the
    form, the bounds (numbers, low < high, low > 0 on a log scale, whole numbers for a key of whole numbers), and
    each bound and choice put into the training config and checked there, so that no trial fails on a setting."""
    from omegaconf.errors import OmegaConfBaseException

    from src.errors import one_line

    for key, spec in space.items():
        name = f"hparams_search.params.{key}"
        current = OmegaConf.select(cfg, key, default=None)
        if current is None:
            raise UserError(f"{name} is not valid: {key} is not a key of the training config")
        if not isinstance(spec, dict) or ("choices" in spec) == bool({"low", "high", "log"} & spec.keys()) \
                or spec.keys() - {"low", "high", "log", "choices"}:
            raise UserError(f"{name}={_as_written(spec)} is not valid: {SPEC}")
        if "choices" in spec:
            values = spec["choices"]
            if not isinstance(values, list) or not values or \
                    not all(v is None or isinstance(v, (bool, int, float, str)) for v in values):
                raise UserError(f"{name}.choices={values!r} is not valid: expected a list of one or more values, "
                                f"e.g. [32, 64, 128]")
        else:
            low, high, log = spec.get("low"), spec.get("high"), spec.get("log", False)
            for bound, value in (("low", low), ("high", high)):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise UserError(f"{name}.{bound}={value!r} is not valid: expected a number ({SPEC})")
            if not isinstance(log, bool):
                raise UserError(f"{name}.log={log!r} is not valid: expected true or false")
            if not low < high:
                raise UserError(f"{name}.low={low!r} is not valid: expected low < high, and high={high!r}")
            if log and low <= 0:
                raise UserError(f"{name}.low={low!r} is not valid: a log scale needs low > 0")
            if isinstance(current, int) and not isinstance(current, bool) and not (
                    isinstance(low, int) and isinstance(high, int)):
                raise UserError(f"{name}={_as_written(spec)} is not valid: {key} takes whole numbers, so low and "
                                "high must be whole numbers")
            values = [low, high]
        for value in values:
            trial_cfg = copy.deepcopy(cfg)
            try:
                OmegaConf.update(trial_cfg, key, value)
                validated(trial_cfg)
            except (UserError, OmegaConfBaseException) as error:
                raise UserError(f"{name} is not valid: a trial could get {key}={value!r}, which training refuses: "
                                f"{one_line(error)}") from None


def suggest(trial, space: dict) -> dict[str, Any]:
    """One value per key of the search space (checked: check_space), as Optuna's trial.suggest_* draws it."""
    values = {}
    for key, spec in space.items():
        if "choices" in spec:
            values[key] = trial.suggest_categorical(key, list(spec["choices"]))
        elif isinstance(spec["low"], int) and isinstance(spec["high"], int):
            values[key] = trial.suggest_int(key, spec["low"], spec["high"], log=spec.get("log", False))
        else:
            values[key] = trial.suggest_float(key, spec["low"], spec["high"], log=spec.get("log", False))
    return values


def tune(cfg: DictConfig, context: RunContext):
    """Run trials of the study in the run folder until it holds n_trials in all (with other workers'); return it.

    Each trial trains in that context: interrupted, it says to run the search again, which continues the study.
    """
    require("sweep", "python -m src.tune", "optuna", "optuna_integration")
    if cfg.data.val_size <= 0:  # before validated(), whose early-stopping check would say less
        raise UserError(f"data.val_size={cfg.data.val_size} is not valid: the search needs a validation split (> 0)")
    config = validated(cfg)
    search = config.hparams_search
    metric = config.optimized_metric or "val/acc"
    if not metric.startswith("val/"):
        raise UserError(f"optimized_metric={metric} is not valid: the search optimises a validation metric")
    space = search_space(OmegaConf.to_container(cfg.hparams_search.params) or {})
    if not space:
        raise UserError("hparams_search.params is empty: give at least one key to search")
    check_space(cfg, space)

    import optuna
    from filelock import FileLock
    from optuna.trial import TrialState
    from optuna_integration import PyTorchLightningPruningCallback

    from src.train import train

    study_dir = Path(context.output_dir)
    with writing(study_dir):
        study_dir.mkdir(parents=True, exist_ok=True)
    # Held while a worker creates or loads the study, and while it counts the trials and asks for the next.
    lock = FileLock(study_dir / ".ask.lock")
    with lock:
        study = optuna.create_study(
            study_name=search.study_name, storage=open_storage(search.storage, study_dir), load_if_exists=True,
            direction="minimize" if "loss" in metric else "maximize",
            pruner=optuna.pruners.MedianPruner(n_startup_trials=search.pruner.n_startup_trials,
                                               n_warmup_steps=search.pruner.n_warmup_steps),
        )
    finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    done = len(study.get_trials(deepcopy=False, states=finished))
    if done:
        log.info("resuming study %r in %s: %d of %d trials done", search.study_name, study_dir, done, search.n_trials)

    def objective(trial) -> float:
        values = suggest(trial, space)
        trial_cfg = copy.deepcopy(cfg)
        for key, value in values.items():
            OmegaConf.update(trial_cfg, key, value)
        log.info("trial %d: %s", trial.number, " ".join(f"{k}={v}" for k, v in values.items()))
        return train(trial_cfg, study_dir / f"trial_{trial.number}",
                     callbacks=(PyTorchLightningPruningCallback(trial, monitor=metric),), context=context)

    # study.optimize(n_trials=N) runs N trials per worker, and MaxTrialsCallback stops a worker only
    # after a trial, so workers that start at once overshoot the total. Counting the trials and
    # asking for the next one under a lock in the study folder makes n_trials the study's total.
    while True:
        with lock:
            number = len(study.get_trials(deepcopy=False))  # every state: running trials are taken
            if number >= search.n_trials:
                break
            # Seeded by the trial's number: each worker's trials are new points, and one worker
            # draws the same points as before; constant_liar keeps TPE away from running trials.
            study.sampler = optuna.samplers.TPESampler(seed=search.seed + number, constant_liar=True)
            trial = study.ask()
        try:
            value = objective(trial)
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
        except CannotWrite:  # a fault of the machine (a full disk) would fail every trial after it: the search stops
            with contextlib.suppress(CannotWrite):  # the journal on the same full disk: the first failure is told
                study.tell(trial, state=TrialState.FAIL)
            raise
        except UserError as error:  # settings that cannot train (divergence, say): failed; the search goes on
            log.warning("trial %d failed: %s", trial.number, error)
            study.tell(trial, state=TrialState.FAIL)
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)
            raise
        else:
            study.tell(trial, value)
    report(study, metric)
    return study


def open_storage(url: str | None, study_dir: Path):
    """The study's storage: the database at the URL given, else Optuna's journal file in the study folder.

    A study.db left there by earlier versions (SQLite, one worker at a time) is resumed as it is.
    """
    import optuna

    if url is not None:
        return database(url)
    journal, legacy = study_dir / "journal.log", study_dir / "study.db"
    if legacy.is_file() and not journal.exists():
        log.warning("resuming %s (SQLite): run one worker at a time on it, or copy it into journal.log "
                    "with optuna.copy_study (see docs/sweeps.md) to run several", legacy)
        return database(f"sqlite:///{legacy.resolve()}")
    from src.journal import WholeRecordsJournal

    return optuna.storages.JournalStorage(WholeRecordsJournal(str(journal)))


def database(url: str):
    """Optuna's storage in the database at `url`, whose failed writes (a full disk under SQLite's file, a
    folder that cannot be opened) name the database in one line (CannotWrite), not in Optuna's traceback.

    They are caught where SQLAlchemy meets them, below Optuna: Optuna would call such an error 'invalid
    data in the commit' and retry the creation of a trial with it five times, seconds apart.
    """
    import optuna
    import sqlalchemy

    from src.tracking import store_name

    name = store_name(url)
    with writing(name):  # opens the database, and creates its tables if it is new
        storage = optuna.storages.RDBStorage(url)

    def named(context):
        if "is locked" in str(context.original_exception):
            return None  # another worker's write holds SQLite's file: no fault of the disk, and Optuna retries
        return cannot_write(name, context.original_exception)  # None: SQLAlchemy's own error stands

    sqlalchemy.event.listen(storage.engine, "handle_error", named)
    return storage


def report(study, metric: str) -> None:
    from optuna.trial import TrialState

    counts = {state: len(study.get_trials(deepcopy=False, states=(state,)))
              for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    names = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}
    print(f"study {study.study_name!r}: " + ", ".join(f"{n} {names[s]}" for s, n in counts.items()))
    if counts[TrialState.COMPLETE]:
        best = study.best_trial
        print(f"best trial {best.number}: {metric} {best.value:.4f} with "
              + " ".join(f"{k}={v}" for k, v in best.params.items()))


@entry_point("hparams_search/optuna")
def main(cfg: DictConfig, context: RunContext) -> None:
    tune(cfg, context)


if __name__ == "__main__":
    main()
