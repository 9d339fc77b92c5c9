"""Where a run stands: its entry point, its command line's overrides, whether it is a job of a sweep,
and the command that continues it.

Built once, from Hydra, by the entry point (src/cli.py) and handed to what needs it (training, the
loggers, the interrupt callback), so that nothing below the entry points reads Hydra's global state
and `train(cfg, run_dir)` called directly behaves as a plain run.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunContext:
    entry: str = "train"  # `python -m src.<entry>`; Hydra's job name too (train.log, MLflow's experiment)
    output_dir: Path | None = None  # Hydra's folder for this run (or this job of a sweep)
    overrides: tuple[str, ...] = ()  # the run's own key=value overrides: in a sweep, this job's values
    override_dirname: str = ""  # those overrides as one string, Hydra's override_dirname
    sweep_dir: Path | None = None  # in a -m sweep: the sweep's folder
    job_num: int | None = None  # in a -m sweep: this job's number
    run_dir_override: tuple[str, ...] = ()  # `hydra.run.dir=...`, when the command line gave it

    @property
    def sweep(self) -> bool:
        return self.sweep_dir is not None

    @classmethod
    def from_hydra(cls) -> RunContext:
        """The context of the Hydra job now running (called by the entry point, where Hydra has set it up)."""
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra = HydraConfig.get()
        multirun = hydra.mode == RunMode.MULTIRUN
        return cls(entry=hydra.job.name, output_dir=Path(hydra.runtime.output_dir),
                   overrides=tuple(hydra.overrides.task), override_dirname=hydra.job.override_dirname,
                   sweep_dir=Path(hydra.sweep.dir).resolve() if multirun else None,
                   job_num=hydra.job.num if multirun else None,
                   run_dir_override=tuple(o for o in hydra.overrides.hydra if o.startswith("hydra.run.dir=")))

    def resume_command(self, checkpoint: Path) -> str:
        """The command line that continues this run from `checkpoint`.

        A training run (or a job of a sweep: the command line may be the sweep's, or submitit's on a
        SLURM node, neither of which resumes one run) goes on from the checkpoint with its own overrides.
        A trial of the search is continued by running the search again, which keeps its study in the run
        folder: the trial's sampled values are the study's, not the command line's.
        """
        if self.entry == "train":
            return shlex.join(["python", "-m", "src.train", *[o for o in self.overrides if not o.startswith("ckpt_path=")],
                               f"ckpt_path={checkpoint}"])
        return shlex.join(["python", "-m", f"src.{self.entry}", *self.overrides, *self.run_dir_override])
