"""A training run as a SLURM job: where each of its processes runs, and going on after SLURM starts it again.

SLURM requeues a batch job whose node failed (JobRequeue=1, its default; hydra.launcher.requeue sets it per
job), as Lightning's SLURM support requeues a preempted one, and the job then runs its command again from
the top. A job of a sweep runs in the same folder every time (multirun/DATE/TIME/N), so when
SLURM_RESTART_COUNT says it was started again it goes on from that folder's last.ckpt instead of from step
0, says so, and leaves a record that the sweep's summary reads (its `resumed` column). Without a last.ckpt
it cannot go on, and its row of summary.csv is failed and says so. A run of its own goes on the same way
where its folder is fixed (hydra.run.dir); in a new folder it says that it starts from step 0.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shlex
import sys
from pathlib import Path

from src import run_files
from src.errors import UserError
from src.run_context import RunContext


class CannotGoOn(UserError):
    """SLURM started the job again and its run folder has no last.ckpt to go on from."""


@functools.cache  # once a process: the search trains many trials in one
def say_where() -> None:
    """`SLURM job 12: task 1 of 2 on node n2`, from every process that SLURM started (each task has its log)."""
    env = os.environ
    if "SLURM_JOB_ID" in env and "SLURM_PROCID" in env:
        job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}" if "SLURM_ARRAY_JOB_ID" in env \
            else env["SLURM_JOB_ID"]
        print(f"SLURM job {job}: task {env['SLURM_PROCID']} of {env.get('SLURM_NTASKS', '1')} on node "
              f"{env.get('SLURMD_NODENAME', 'unknown')}", flush=True)


def restarts() -> int:
    """How many times SLURM has started this job again (0: this is its first start, or not a SLURM job)."""
    count = os.environ.get("SLURM_RESTART_COUNT", "0")
    return int(count) if count.isdigit() else 0


def going_on(config, run_dir: Path, context: RunContext):
    """The config of this run: as given, or, for a job that SLURM started again in a folder holding a last.ckpt
    (a job of a sweep; a run given its hydra.run.dir), with ckpt_path at that last.ckpt."""
    count = restarts()
    if count == 0:
        return config
    last = run_files.last_checkpoint(run_dir)
    if not last.is_file() and not context.sweep:  # a run of its own has a new folder each time it starts
        print(f"warning: SLURM started this job again (restart {count}) in a new run folder, so it starts from "
              "step 0; a run given hydra.run.dir=FOLDER goes on from FOLDER's last.ckpt", file=sys.stderr)
        return config
    if not last.is_file():
        raise CannotGoOn(f"SLURM started job {os.environ.get('SLURM_JOB_ID')} again (restart {count}: after a node "
                         f"failure or a preemption) and {last} is missing, so it cannot go on where it stopped; "
                         f"run it again with: {shlex.join(['python', '-m', 'src.train', *context.overrides])}")
    return dataclasses.replace(config, ckpt_path=str(last))


def record_going_on(run_dir: Path, checkpoint: dict, first_process: bool) -> None:
    """Say, and (from the first process) record in the run folder, where the restarted job goes on from."""
    from src.atomic import written_whole

    count, step = restarts(), checkpoint["global_step"]
    last = run_files.last_checkpoint(run_dir)
    print(f"SLURM started this job again (restart {count}); going on from {last} at step {step}, not from step 0",
          flush=True)
    if first_process:
        with written_whole(Path(run_dir) / run_files.RESUMED) as partial:
            partial.write_text(json.dumps({"restart": count, "step": step}))


def resumed_note(run_dir: Path) -> str:
    """What summary.csv's `resumed` column says of a job: '' or `step 300 (SLURM restart 1)`."""
    record = Path(run_dir) / run_files.RESUMED
    if not record.is_file():
        return ""
    said = json.loads(record.read_text())
    return f"step {said['step']} (SLURM restart {said['restart']})"
