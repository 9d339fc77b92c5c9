"""The SLURM launcher of conf/hydra/launcher/slurm*.yaml: Hydra's submitit_slurm launcher, with one
change: a job that SLURM ends before it returns (scancel, a time limit, out of memory, a node
failure) becomes a failed job of the sweep, with SLURM's word for what happened, instead of an
exception that ends the whole sweep without its summary. (It lives here because Hydra takes
launchers only from the hydra_plugins package, found on sys.path: the project folder.)

Hydra's launcher collects the jobs with `job.results()`, which raises submitit's
UncompletedJobError for a job that left no result; the sweep then stops at that job, and the
SweepSummary callback never writes summary.csv. A killed job cannot report its own end, so the
launcher does it here, from the launching process: it calls the Hydra callbacks' on_job_end for
that job with a failed JobReturn, as the job itself would have, and the summary has its row.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import OmegaConf, open_dict, read_write

try:  # Hydra imports every plugin module at start-up; without the `sweep` extra this one offers nothing
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher
except ImportError:
    SubmititSlurmLauncher = None

log = logging.getLogger(__name__)


def one_line(text: object) -> str:
    from src.errors import one_line  # imported when used: Hydra loads this module in every run

    return one_line(text)


class SlurmLauncher(SubmititSlurmLauncher or object):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        # The plugin's launch(), down to its last line, which is the one that changes here.
        import submitit

        assert self.config is not None
        params = dict(self.params)
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, folder=params.pop("submitit_folder"),
                                         slurm_max_num_timeout=params.pop("max_num_timeout"))
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in params.items()})

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        numbers = range(initial_job_idx, initial_job_idx + len(job_overrides))
        for num, overrides in zip(numbers, job_overrides):
            log.info(f"\t#{num} : {' '.join(filter_overrides(overrides))}")
        jobs = executor.map_array(self, [list(o) for o in job_overrides], ["hydra.sweep.dir"] * len(job_overrides),
                                  list(numbers), [f"job_id_for_{n}" for n in numbers],
                                  [Singleton.get_state()] * len(job_overrides))
        for num, job in zip(numbers, jobs):
            log.info(f"\t#{num} : SLURM job {job.job_id}")
        return [self._result(job, overrides, num) for job, overrides, num in zip(jobs, job_overrides, numbers)]

    def _result(self, job: Any, overrides: Sequence[str], num: int) -> JobReturn:
        from submitit.core.utils import FailedJobError, UncompletedJobError

        try:
            return job.results()[0]  # the first task's JobReturn, as the plugin returns
        except UncompletedJobError:
            error = UncompletedJobError(f"SLURM job {job.job_id} ended {job.state} without returning{_last_words(job)}"
                                        f" (log: {job.paths.stderr})")
        except FailedJobError as failure:  # the job's own code failed outside the task (say, importing it)
            lines = [line for line in str(failure).splitlines() if line.strip() and not line.startswith("-")]
            error = FailedJobError(f"SLURM job {job.job_id} failed: {one_line(lines[2] if len(lines) > 2 else failure)}"
                                   f" (log: {job.paths.stderr})")
        log.error(f"#{num} : {one_line(error)}")
        return self._report_failure(list(overrides), num, job.job_id, error)

    def _report_failure(self, overrides: list[str], num: int, job_id: str, error: Exception) -> JobReturn:
        """Tell the Hydra callbacks that job `num` ended with `error`, as run_job would in the job."""
        assert self.hydra_context is not None and self.config is not None
        config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.job.num, config.hydra.job.id = num, job_id
        previous = HydraConfig.instance().cfg
        HydraConfig.instance().set_config(config)  # for the ${hydra:...} in the job folder's name
        try:
            output_dir = Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.runtime.output_dir = str(output_dir.absolute())
            output_dir.mkdir(parents=True, exist_ok=True)
            result = JobReturn(overrides=overrides, hydra_cfg=config, working_dir=os.getcwd(),
                               task_name=str(config.hydra.job.name), status=JobStatus.FAILED, _return_value=error)
            self.hydra_context.callbacks.on_job_end(config=config, job_return=result)
        finally:
            HydraConfig.instance().cfg = previous
        return result


def _last_words(job: Any) -> str:
    """What the job said last on stderr, e.g. that it was interrupted and where it saved last.ckpt."""
    text = job.stderr() or ""
    lines = [one_line(line) for line in text.splitlines() if line.strip()]
    said = [line for line in lines if line.startswith("Interrupted in epoch")] or lines[-1:]
    return f": {said[-1]}" if said else ""
