"""Search hyperparameters with Optuna: `python -m src.tune [hparams_search.n_trials=N] [key=value ...]`.

TPE proposes lr, hidden size and batch size; each trial is a normal training run (src.train.train)
in `<study folder>/trial_<n>/`, reporting val/acc to Optuna after every epoch so the median pruner
can stop hopeless trials early. The study is kept in `<study folder>/study.db` (SQLite): the same
command run again adds trials to it until it holds hparams_search.n_trials.

Optuna is driven directly rather than through Hydra's Optuna sweeper plugin, which requires
optuna<3 and, running each trial through a launcher, cannot report to Optuna during training.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from src.config import TrainConfig, UserError, exit_on_user_error, run_hydra, validated
from src.extras import require

log = logging.getLogger(__name__)


@dataclass
class PrunerConfig:
    n_startup_trials: int = 5
    n_warmup_steps: int = 1


@dataclass
class SearchConfig:
    study_name: str = "mnist-mlp"
    n_trials: int = 20
    seed: int = 42
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    params: Any = None  # nested training keys -> {low, high, log} or {choices}

    def __post_init__(self) -> None:
        if self.n_trials < 1:
            raise UserError(f"hparams_search.n_trials={self.n_trials!r} is not valid: expected 1 or more")


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


def suggest(trial, space: dict) -> dict[str, Any]:
    """One value per key of the search space, as Optuna's trial.suggest_* draws it."""
    values = {}
    for key, spec in space.items():
        if "choices" in spec:
            values[key] = trial.suggest_categorical(key, list(spec["choices"]))
        elif isinstance(spec.get("low"), int) and isinstance(spec.get("high"), int):
            values[key] = trial.suggest_int(key, spec["low"], spec["high"], log=spec.get("log", False))
        elif "low" in spec and "high" in spec:
            values[key] = trial.suggest_float(key, spec["low"], spec["high"], log=spec.get("log", False))
        else:
            raise UserError(f"hparams_search.params.{key}={spec} is not valid: expected {{low, high[, log]}} or {{choices}}")
    return values


def tune(cfg: DictConfig, study_dir: str | Path):
    """Run the study in study_dir until it holds n_trials finished trials; return it."""
    require("sweep", "python -m src.tune", "optuna", "optuna_integration")
    config = validated(cfg)
    search = config.hparams_search
    if config.data.val_size <= 0:
        raise UserError(f"data.val_size={config.data.val_size} is not valid: the search needs a validation split (> 0)")
    metric = config.optimized_metric or "val/acc"
    if not metric.startswith("val/"):
        raise UserError(f"optimized_metric={metric} is not valid: the search optimises a validation metric")
    space = search_space(OmegaConf.to_container(cfg.hparams_search.params) or {})
    if not space:
        raise UserError("hparams_search.params is empty: give at least one key to search")
    for key in space:
        if OmegaConf.select(cfg, key, default=None) is None:
            raise UserError(f"hparams_search.params.{key} is not valid: {key} is not a key of the training config")

    import optuna
    from optuna.trial import TrialState
    from optuna_integration import PyTorchLightningPruningCallback

    from src.train import train

    study_dir = Path(study_dir)
    study_dir.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{(study_dir / 'study.db').resolve()}"
    finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    study = optuna.create_study(
        study_name=search.study_name, storage=storage, load_if_exists=True,
        direction="minimize" if "loss" in metric else "maximize",
        pruner=optuna.pruners.MedianPruner(n_startup_trials=search.pruner.n_startup_trials,
                                           n_warmup_steps=search.pruner.n_warmup_steps),
    )
    done = len(study.get_trials(deepcopy=False, states=finished))
    # Seeded by the trials so far: a resumed run draws new points, not the first run's again.
    study.sampler = optuna.samplers.TPESampler(seed=search.seed + done)

    def objective(trial) -> float:
        values = suggest(trial, space)
        trial_cfg = copy.deepcopy(cfg)
        for key, value in values.items():
            OmegaConf.update(trial_cfg, key, value)
        log.info("trial %d: %s", trial.number, " ".join(f"{k}={v}" for k, v in values.items()))
        return train(trial_cfg, study_dir / f"trial_{trial.number}",
                     callbacks=(PyTorchLightningPruningCallback(trial, monitor=metric),))

    if done:
        log.info("resuming study %r in %s: %d of %d trials done", search.study_name, study_dir, done, search.n_trials)
    # A trial whose settings cannot train (divergence, say) is recorded as failed; the search goes on.
    study.optimize(objective, n_trials=max(0, search.n_trials - done), catch=(UserError,))
    report(study, metric)
    return study


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


@hydra.main(config_path="../conf", config_name="hparams_search/optuna", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    tune(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    run_hydra(main)
