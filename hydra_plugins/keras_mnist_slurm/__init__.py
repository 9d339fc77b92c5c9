"""The SLURM launcher of conf/hydra/launcher/slurm*.yaml: Hydra's submitit_slurm launcher, with two
changes. A job that SLURM ends before it returns (scancel, a time limit, out of memory, a node
failure) becomes a failed job of the sweep, with SLURM's word for what happened, instead of an
exception that ends the whole sweep without its summary. (It lives here because Hydra takes
launchers only from the hydra_plugins package, found on sys.path: the project folder.)

Hydra's launcher collects the jobs with `job.results()`, which raises submitit's
UncompletedJobError for a job that left no result; the sweep then stops at that job, and the
SweepSummary callback never writes summary.csv. A killed job cannot report its own end, so the
launcher does it here, from the launching process: it calls the Hydra callbacks' on_job_end for
that job with a failed JobReturn, as the job itself would have, and the summary has its row.

A job may also never start: it asks for more than the partition's nodes have, or every node is
drained, and SLURM keeps it pending; submitit would wait for it forever, in silence. So while
jobs wait, the launcher prints SLURM's reason for each (squeue) every `wait_report_s`; a job
whose reason says it cannot start as submitted (pending.py) for `cannot_start_grace_s` is
cancelled and becomes a failed row saying what to change. A request that sbatch refuses outright
makes every job of the sweep such a row.
"""

# No `from __future__ import annotations`: Hydra's plugin scan runs this module before it is in
# sys.modules, where @dataclass would look its string annotations up.
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import OmegaConf, open_dict, read_write

try:  # Hydra imports every plugin module at start-up; without the `sweep` extra this one offers nothing
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher
except ImportError:
    SubmititSlurmLauncher = None

log = logging.getLogger(__name__)

# The settings this launcher adds to submitit_slurm's, which are not sbatch's (launch() keeps them from submitit).
OWN_SETTINGS = ("wait_report_s", "cannot_start_grace_s", "requeue")

if SubmititSlurmLauncher is not None:
    @dataclass
    class KerasMnistSlurmConf(SlurmQueueConf):
        """submitit_slurm's settings and this launcher's own: conf/hydra/launcher/slurm.yaml builds on it."""

        _target_: str = "hydra_plugins.keras_mnist_slurm.SlurmLauncher"
        # While jobs wait in the queue: a line per waiting job, with SLURM's reason, this often.
        wait_report_s: int = 60
        # A job whose reason says it cannot start as submitted is cancelled once it has said so this long.
        cannot_start_grace_s: int = 120
        # SLURM starts a job again after a node failure (sbatch --requeue; false: --no-requeue, the job fails).
        requeue: bool = True

    ConfigStore.instance().store(group="hydra/launcher", name="keras_mnist_slurm", node=KerasMnistSlurmConf,
                                 provider="keras_mnist_slurm")


def one_line(text: object) -> str:
    from src.errors import one_line  # imported when used: Hydra loads this module in every run

    return one_line(text)


class SlurmLauncher(SubmititSlurmLauncher or object):
    def __init__(self, **params: Any) -> None:
        for key, least in (("wait_report_s", 1), ("cannot_start_grace_s", 0)):
            if params[key] < least:
                from src.errors import exit_with

                # Said here and now: Hydra would wrap a UserError from a launcher in its own message.
                exit_with(f"hydra.launcher.{key}={params[key]} is not valid: expected a whole number of seconds, "
                          f"{least} or more")
        super().__init__(**params)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        # The plugin's launch(), but for what follows the submission: a refusal, the wait, and the results.
        import submitit
        from submitit.core.utils import FailedJobError

        assert self.config is not None
        params = dict(self.params)
        report_s, grace_s, requeue = (params.pop(key) for key in OWN_SETTINGS)
        # A job requeued after a node failure goes on from its last.ckpt (src/slurm_job.py).
        params["additional_parameters"] = {**params["additional_parameters"], "requeue" if requeue else "no-requeue": True}
        request = dict(params)  # what the jobs ask for, to say what to change when SLURM cannot start them
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
        try:
            jobs = executor.map_array(self, [list(o) for o in job_overrides], ["hydra.sweep.dir"] * len(job_overrides),
                                      list(numbers), [f"job_id_for_{n}" for n in numbers],
                                      [Singleton.get_state()] * len(job_overrides))
        except FailedJobError as refusal:  # sbatch said no (CommandFunction's error): nothing was submitted
            from hydra_plugins.keras_mnist_slurm import pending

            error = pending.CannotStart(pending.refused(str(refusal), request))
            log.error(one_line(error))
            return [self._report_failure(list(o), num, "not-submitted", error) for o, num in zip(job_overrides, numbers)]
        for num, job in zip(numbers, jobs):
            log.info(f"\t#{num} : SLURM job {job.job_id}")
        cancelled = self._wait(jobs, numbers, request, report_s, grace_s)
        return [self._report_failure(list(overrides), num, job.job_id, cancelled[job.job_id])
                if job.job_id in cancelled else self._result(job, overrides, num)
                for job, overrides, num in zip(jobs, job_overrides, numbers)]

    def _wait(self, jobs: list, numbers: range, request: dict, report_s: float, grace_s: float) -> dict[str, Exception]:
        """Wait for the jobs to end, as job.results() would (their result files every second, sacct now
        and then), and every `report_s` look at the queue: one line per pending job with SLURM's reason;
        a job whose reason has said for `grace_s` that it cannot start as submitted is cancelled.
        Returns the cancelled jobs' errors, by job id."""
        from hydra_plugins.keras_mnist_slurm import pending

        submitted = next_look = time.time()
        next_look += report_s
        hopeless_since: dict[str, float] = {}  # job id -> when its reason first said it cannot start
        cancelled: dict[str, Exception] = {}
        num = dict(zip((job.job_id for job in jobs), numbers))
        while waiting := [job.job_id for job in jobs if job.job_id not in cancelled and not job.done()]:
            if time.time() < next_look:
                time.sleep(1)
                continue
            next_look += report_s
            cluster, now = pending.Cluster(), time.time()
            for job_id, (reason, partition) in pending.pending_reasons(waiting).items():
                why = pending.cannot_start(reason, partition, request, cluster)
                line = f"#{num[job_id]} : SLURM job {job_id} still waiting after {_duration(now - submitted)}: {reason}"
                if why is None:
                    hopeless_since.pop(job_id, None)
                    log.info(line)
                    continue
                since = hopeless_since.setdefault(job_id, now)
                if now - since < grace_s:
                    log.warning(f"{line}; it cannot start as submitted: {why} (cancelled if still so after "
                                f"{_duration(grace_s)})")
                elif _cancel_pending(job_id):
                    cancelled[job_id] = pending.CannotStart(
                        f"SLURM job {job_id} could not start ({reason}) and was cancelled after waiting "
                        f"{_duration(now - submitted)}: {why}")
                    log.error(f"#{num[job_id]} : {one_line(cancelled[job_id])}")
        return cancelled

    def _result(self, job: Any, overrides: Sequence[str], num: int) -> JobReturn:
        from submitit.core.utils import UncompletedJobError

        try:
            return job.results()[0]  # the first task's JobReturn, as the plugin returns
        except UncompletedJobError as failure:  # FailedJobError too, a subclass of it
            error = _why_no_result(job, failure, Path(str(self.config.hydra.sweep.dir)) / str(num))
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


def _cancel_pending(job_id: str) -> bool:
    """Cancel the job if it is still pending (it may have started since the look): whether it was."""
    subprocess.run(["scancel", "--state=PENDING", job_id], capture_output=True, timeout=60, check=False)
    state = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                           timeout=60, check=False)
    return state.stdout.split() == ["CANCELLED"]


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _why_no_result(job: Any, failure: Exception, job_dir: Path) -> Exception:
    """One line for a job that returned nothing: its own code failed outside the task (FailedJobError,
    say importing it), or SLURM ended it first (UncompletedJobError: killed, timed out, cancelled, a node
    failure that it did not requeue)."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    if isinstance(failure, FailedJobError):
        # submitit's message: a header, then the job's traceback between two lines of dashes, then where the
        # logs are; the traceback's last line says what failed.
        parts = str(failure).split("-" * 22 + "\n")
        trace = [line for line in (parts[1] if len(parts) > 2 else str(failure)).splitlines() if line.strip()]
        return FailedJobError(f"SLURM job {job.job_id} failed: {one_line(trace[-1] if trace else failure)}"
                              f" (log: {job.paths.stderr})")
    node_failure = ""
    if job.state == "NODE_FAIL":
        from src.run_files import last_checkpoint

        last = last_checkpoint(job_dir)
        node_failure = (" (a node of the job failed, and SLURM did not start it again: hydra.launcher.requeue=false "
                        "or the cluster's JobRequeue=0; " + (f"resume from {last})" if last.is_file() else
                                                             "it had saved no last.ckpt)"))
    return UncompletedJobError(f"SLURM job {job.job_id} ended {job.state}{node_failure} without returning"
                               f"{_last_words(job)} (log: {job.paths.stderr})")


def _last_words(job: Any) -> str:
    """What the job said last on stderr, e.g. that it was interrupted and where it saved last.ckpt."""
    text = job.stderr() or ""
    lines = [one_line(line) for line in text.splitlines() if line.strip()]
    said = [line for line in lines if line.startswith("Interrupted in epoch")] or lines[-1:]
    return f": {said[-1]}" if said else ""
