"""Sweeps, DDP and the Optuna search on a real two-node SLURM cluster (tests/slurm/cluster.sh), and what
a lost node or processes that cannot meet do to a run.

The jobs are submitted with sbatch (by submitit, through hydra/launcher=slurm_cpu, or by sbatch
itself for the search's workers) and run by the slurmd of node n1 or n2, with this interpreter
(submitit submits sys.executable) and PYTHONPATH at the repository, which sbatch passes on to the
jobs: they unpickle Hydra's task function, src.train.main. Each node has the machine's CPUs (2):
a job that asks for them all has a node to itself, so two such jobs run on the two nodes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.conftest import entry_env, logged, meeting, needs_extra
from tests.test_console import check_epoch_lines
from tests.test_sweep import completed_jobs, read_summary, run

pytestmark = pytest.mark.slow

# The test cluster's node has 2 CPUs: ask for what it has.
SLURM_CPU = ("hydra/launcher=slurm_cpu", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2")


def environment(slurm_cluster: dict) -> dict:
    return entry_env(**slurm_cluster)


def command(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def slurm_states(env: dict) -> dict[str, str]:
    """Every job the cluster knows, finished ones included: {job id: state}, straight from squeue."""
    out = subprocess.run(["squeue", "-h", "-t", "all", "-r", "-o", "%i|%T"], env=env, capture_output=True,
                         text=True, check=True).stdout
    return dict(line.split("|") for line in out.split())


def final_state(env: dict, job_id: str, timeout: float = 60) -> str:
    """The job's state once it has ended (its result file may come a moment before its end)."""
    deadline = time.time() + timeout
    while (state := slurm_states(env).get(job_id, "PENDING")) in ("PENDING", "RUNNING", "COMPLETING") \
            and time.time() < deadline:
        time.sleep(0.5)
    return state


def job_log(sweep_dir: Path, job_id: str) -> str:
    """What SLURM wrote for each task of a job (stdout and stderr), joined."""
    return "".join(p.read_text() for p in sorted((sweep_dir / ".submitit" / job_id).glob("*_log.*")))


def nodes_said(log: str) -> dict[int, str]:
    """{task: node} from the line each process of a SLURM job prints (src/slurm_job.py)."""
    return {int(task): node for task, node in re.findall(r"^SLURM job \S+: task (\d+) of \d+ on node (\S+)$", log, re.M)}


def ran_at(env: dict, job_id: str) -> tuple[str, datetime, datetime]:
    """A finished job's node list, start and end, as squeue keeps them (to the second)."""
    nodes, start, end = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%N|%S|%e"], env=env,
                                       capture_output=True, text=True, check=True).stdout.strip().split("|")
    return nodes, datetime.fromisoformat(start), datetime.fromisoformat(end)


def slurm_job_id(job_dir: Path) -> str:
    """The SLURM job id that Hydra's submitit launcher recorded as the job's hydra.job.id."""
    return re.search(r"^    id: '?(\w+)'?$", (job_dir / ".hydra" / "hydra.yaml").read_text(), re.M).group(1)


def test_grid_sweep_runs_each_job_as_a_slurm_job_on_its_own_node_at_once(slurm_cluster, tiny_data, tmp_path):
    env, sweep_dir = environment(slurm_cluster), tmp_path / "sweep"
    cpus, _ = node_size(env)  # each job asks for a whole node: the two run on the two nodes
    result = run("src.train", "-m", "hydra/launcher=slurm_cpu", f"hydra.launcher.cpus_per_task={cpus}",
                 "hydra.launcher.mem_gb=2", f"data.data_dir={tiny_data}", "trainer.max_epochs=1",
                 "model.hidden=8,16", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path, env=env)

    assert result.returncode == 0, result.stderr[-3000:]
    assert "Submitit 'slurm' sweep" in result.stdout
    for row in completed_jobs(sweep_dir, ["model.hidden=16", "model.hidden=8"]):
        job_dir = sweep_dir / row["job"]
        assert Path(row["checkpoint"]) == job_dir / "checkpoints" / "last.ckpt" and Path(row["checkpoint"]).is_file()
        # The job ran as SLURM job ID: Hydra recorded that id, SLURM wrote its log, and slurmd ran it to the end.
        job_id = slurm_job_id(job_dir)
        log = job_log(sweep_dir, job_id)
        assert f"Starting with JobEnvironment(job_id={job_id}," in log and "SLURM auto-requeueing enabled" in log
        assert f"test_acc: {float(row['test/acc']):.4f}" in log
        # A job's log is a file: one line per epoch, no bar's carriage returns, the device and the layers
        check_epoch_lines(log, job_dir / "metrics.csv", epochs=1, steps=5, val=False)
        assert not re.search(r"[\r\x1b]", log) and max(map(len, log.splitlines())) <= 300
        assert re.search(r"^device: cpu \(trainer\.accelerator=auto; ", log, re.M) and "Total params: " in log
        assert final_state(env, job_id) == "COMPLETED"
    (one, two) = [ran_at(env, slurm_job_id(sweep_dir / row["job"])) for row in read_summary(sweep_dir)]
    assert {one[0], two[0]} == {"n1", "n2"}, (one, two)  # SLURM's record: one job a node...
    assert one[1] <= two[2] and two[1] <= one[2], (one, two)  # ...at the same time
    logs = [job_log(sweep_dir, slurm_job_id(sweep_dir / row["job"])) for row in read_summary(sweep_dir)]
    assert sorted(nodes_said(log)[0] for log in logs) == ["n1", "n2"]  # and the jobs' own word for it
    submission = next((sweep_dir / ".submitit").glob("*/*_submission.sh")).read_text()
    assert "#SBATCH --array=0-1" in submission and "#SBATCH --signal=TERM@120" in submission
    assert "#SBATCH --requeue" in submission  # hydra.launcher.requeue's default: a lost node's job goes on
    assert "srun --unbuffered" in submission and sys.executable in submission


# One DDP process on each of the two nodes, as docs/slurm.md gives it.
TWO_NODES = ("hydra/launcher=slurm_cpu", "hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=1",
             "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2", "trainer=ddp_cpu", "trainer.num_nodes=2",
             "trainer.devices=1")


def test_ddp_across_two_slurm_nodes_matches_local_ddp(slurm_cluster, tiny_data, tmp_path):
    import torch

    # One thread a process in both: Lightning gives each of two processes on one machine half its CPUs, and the
    # one process of a node all of them, and a matrix product summed by other threads differs in its last bits.
    env = {**environment(slurm_cluster), "OMP_NUM_THREADS": "1"}
    same = [f"data.data_dir={tiny_data}", "data.batch_size=32", "trainer.max_epochs=2", "seed=7"]
    local_dir, sweep_dir = tmp_path / "local", tmp_path / "sweep"
    local = run("src.train", *same, "trainer=ddp_cpu", "trainer.devices=2", f"hydra.run.dir={local_dir}",
                cwd=tmp_path, env=env)
    assert local.returncode == 0, local.stderr[-3000:]
    result = run("src.train", "-m", *TWO_NODES, *same, f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]

    (row,) = read_summary(sweep_dir)
    assert row["status"] == "completed"
    assert sorted(p.name for p in sweep_dir.iterdir() if not p.name.startswith(".")) == [
        "0", "multirun.yaml", "summary.csv"]  # one run folder for the two processes
    job_id = slurm_job_id(sweep_dir / "0")
    assert final_state(env, job_id) == "COMPLETED"
    assert len(list((sweep_dir / ".submitit" / job_id).glob("*_result.pkl"))) == 2  # one SLURM job, two tasks
    log = job_log(sweep_dir, job_id)
    assert "MEMBER: 1/2" in log and "MEMBER: 2/2" in log and "Starting with 2 processes" in log  # world size 2
    assert sum(line.startswith("test_loss:") for line in log.splitlines()) == 1
    assert nodes_said(log) == {0: "n1", 1: "n2"}  # rank 0 and rank 1 on different nodes
    assert ran_at(env, job_id)[0] == "n[1-2]"
    assert "devices: 2 processes on cpu, 2 nodes x 1 " in log

    run_dir = sweep_dir / "0"
    assert [p.relative_to(run_dir) for p in run_dir.rglob("*.ckpt")] == [Path("checkpoints/last.ckpt")]
    for key in ("train/loss", "train/acc", "test/loss", "test/acc"):
        assert logged(run_dir / "metrics.csv", key) == logged(local_dir / "metrics.csv", key), key
    on_slurm = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    started_locally = torch.load(local_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert on_slurm["global_step"] == started_locally["global_step"]
    for name, weight in started_locally["state_dict"].items():
        assert torch.equal(on_slurm["state_dict"][name], weight), name


def test_a_job_killed_by_slurm_is_a_failed_row_and_resumes_from_last_ckpt(slurm_cluster, tiny_data, tmp_path):
    import torch

    env, sweep_dir = environment(slurm_cluster), tmp_path / "sweep"
    # 600 steps an epoch (batch of 1), 100 epochs: far longer than the test waits.
    args = [*SLURM_CPU, f"data.data_dir={tiny_data}", "data.batch_size=1", "model.hidden=8"]
    sweep = subprocess.Popen(command("src.train", "-m", *args, "trainer.max_epochs=100", f"hydra.sweep.dir={sweep_dir}"),
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        checkpoint = sweep_dir / "0" / "checkpoints" / "last.ckpt"
        deadline = time.time() + 120
        while not checkpoint.is_file():  # the first epoch is done: the job is well under way
            assert sweep.poll() is None and time.time() < deadline, "the job did not train its first epoch"
            time.sleep(0.5)
        (job_id,) = [job for job, state in slurm_states(env).items() if state == "RUNNING"]
        subprocess.run(["scancel", job_id], env=env, check=True)
        out, err = sweep.communicate(timeout=120)  # the sweep ends: it does not wait for a result forever
    finally:
        if sweep.poll() is None:
            sweep.kill()

    assert sweep.returncode == 1, err[-3000:]
    assert err.strip().splitlines()[-1] == f"error: 1 of 1 jobs failed; their errors are in {sweep_dir / 'summary.csv'}"
    (row,) = read_summary(sweep_dir)
    assert row["status"] == "failed" and row["checkpoint"] == str(checkpoint)
    assert row["error"].startswith(f"UncompletedJobError: SLURM job {job_id} ended CANCELLED without returning: "
                                   f"Interrupted in epoch ")  # SIGTERM: the run saved where it stood
    steps = int(re.search(r"after (\d+) steps; saved " + re.escape(str(checkpoint)), row["error"]).group(1))
    # The job's log says how to resume that one run: its own overrides, not submitit's command line.
    (log,) = (sweep_dir / ".submitit" / job_id).glob("*_log.err")
    assert f"Resume with: python -m src.train {' '.join(args[len(SLURM_CPU):])} trainer.max_epochs=100 " \
           f"ckpt_path={checkpoint}" in log.read_text()
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["global_step"] == steps

    # Resubmitted with ckpt_path, it goes on from that step and finishes the epoch it was in.
    epochs = saved["epoch"] + 1
    again_dir = tmp_path / "again"
    again = run("src.train", "-m", *args, f"trainer.max_epochs={epochs}", f"ckpt_path={checkpoint}",
                f"hydra.sweep.dir={again_dir}", cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    (row,) = read_summary(again_dir)
    assert row["status"] == "completed" and int(row["epochs"]) == 1  # only the interrupted epoch was trained again
    resumed = torch.load(again_dir / "0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == epochs * 600 > steps


def node_size(env: dict) -> tuple[int, int]:
    """A node of the test cluster (both are alike): its CPUs and its memory in MB, as SLURM has them (the
    machine's CPUs, and half its memory)."""
    first = subprocess.run(["sinfo", "-h", "-N", "-o", "%c %m"], env=env, capture_output=True, text=True,
                           check=True).stdout.splitlines()[0]
    cpus, memory = first.split()
    return int(cpus), int(memory)


# Look at the queue every 3 s instead of every minute.
WAIT = ("hydra.launcher.wait_report_s=3",)


def test_a_job_asking_for_more_cpus_than_the_node_has_is_cancelled_as_a_failed_row(slurm_cluster, tiny_data,
                                                                                   tmp_path):
    env, sweep_dir = environment(slurm_cluster), tmp_path / "sweep"
    cpus, _ = node_size(env)
    # More CPUs than the two nodes have together: SLURM takes the job and keeps it pending for PartitionConfig,
    # forever (more than a node has but no more than both, sbatch refuses at once, as in the test below); the
    # launcher cancels it once it has said so for 6 s. (The run's timeout is the "within two minutes".)
    too_many = 2 * cpus + 1
    result = run("src.train", "-m", "hydra/launcher=slurm_cpu", f"hydra.launcher.cpus_per_task={too_many}",
                 "hydra.launcher.mem_gb=2", *WAIT, "hydra.launcher.cannot_start_grace_s=6", f"data.data_dir={tiny_data}",
                 f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path, env=env, timeout=120)

    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == \
        f"error: 1 of 1 jobs failed; their errors are in {sweep_dir / 'summary.csv'}"
    (row,) = read_summary(sweep_dir)
    job_id = re.search(r"#0 : SLURM job (\d+)$", result.stdout, re.M).group(1)
    advice = (f"it asks for {too_many} CPUs a node (hydra.launcher.cpus_per_task={too_many} x tasks_per_node=1) "
              f"and partition debug's nodes have at most {cpus}; ask for less, or choose another "
              f"hydra.launcher.partition")
    assert row["status"] == "failed"
    assert re.fullmatch(rf"CannotStart: SLURM job {job_id} could not start \(PartitionConfig\) and was cancelled "
                        rf"after waiting \d+ s: {re.escape(advice)}", row["error"]), row["error"]
    # While it waited, the sweep said why, with what to change, and when it would give up.
    waiting = re.findall(rf"#0 : SLURM job {job_id} still waiting after \d+ s: PartitionConfig; it cannot start as "
                         rf"submitted: {re.escape(advice)} \(cancelled if still so after 6 s\)$", result.stdout, re.M)
    assert len(waiting) >= 2, result.stdout[-3000:]
    assert final_state(env, job_id) == "CANCELLED"


def test_a_job_waiting_for_resources_is_reported_and_then_runs(slurm_cluster, tiny_data, tmp_path):
    env, sweep_dir = environment(slurm_cluster), tmp_path / "sweep"
    cpus, _ = node_size(env)
    # Two jobs that each take every CPU of a node, both kept off n2: one runs, the other waits for Resources.
    # With a grace of 0, a reason taken for "cannot start" would cancel the waiting one at once.
    result = run("src.train", "-m", "hydra/launcher=slurm_cpu", f"hydra.launcher.cpus_per_task={cpus}",
                 "hydra.launcher.exclude=n2", "hydra.launcher.mem_gb=2", *WAIT, "hydra.launcher.cannot_start_grace_s=0", f"data.data_dir={tiny_data}",
                 "trainer.max_epochs=1", "model.hidden=8,16", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path, env=env)

    assert result.returncode == 0, result.stderr[-3000:]
    completed_jobs(sweep_dir, ["model.hidden=16", "model.hidden=8"])
    waited = re.findall(r"#(\d) : SLURM job (\d+_\d) still waiting after (\d+) s: (.*)$", result.stdout, re.M)
    assert waited and "cannot start" not in result.stdout, result.stdout[-3000:]
    assert {reason for _, _, _, reason in waited} <= {"Resources", "Priority", "None"}  # None: not yet looked at
    assert "Resources" in {reason for _, _, _, reason in waited}
    # The job that waited for Resources ran once the other had ended: its own folder has its results.
    for num, job_id in {(num, job_id) for num, job_id, _, reason in waited if reason == "Resources"}:
        assert job_id.endswith(f"_{num}") and slurm_job_id(sweep_dir / num) == job_id
        assert final_state(env, job_id) == "COMPLETED"


def test_a_request_that_sbatch_refuses_is_a_failed_row_for_each_job(slurm_cluster, tiny_data, tmp_path):
    env, sweep_dir = environment(slurm_cluster), tmp_path / "sweep"
    _, memory = node_size(env)
    too_much = memory // 1024 + 10
    result = run("src.train", "-m", *SLURM_CPU[:-1], f"hydra.launcher.mem_gb={too_much}", f"data.data_dir={tiny_data}",
                 "model.hidden=8,16", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path, env=env, timeout=120)

    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == \
        f"error: 2 of 2 jobs failed; their errors are in {sweep_dir / 'summary.csv'}"
    rows = read_summary(sweep_dir)
    assert sorted(row["overrides"].split()[-1] for row in rows) == ["model.hidden=16", "model.hidden=8"]
    for row in rows:
        assert row["status"] == "failed"
        assert row["error"] == (
            "CannotStart: sbatch refused the jobs: Memory specification can not be satisfied; Batch job submission "
            f"failed: Requested node configuration is not available: it asks for {too_much} GB a node "
            f"(hydra.launcher.mem_gb={too_much}) and partition debug's nodes have at most {memory / 1024:.1f} GB; "
            "ask for less, or choose another hydra.launcher.partition")


@pytest.mark.parametrize("setting, valid", [("wait_report_s=0", "1 or more"), ("cannot_start_grace_s=-1", "0 or more")])
def test_a_bad_waiting_setting_is_one_line_before_anything_is_submitted(tmp_path, setting, valid):
    result = run("src.train", "-m", "hydra/launcher=slurm_cpu", f"hydra.launcher.{setting}",
                 f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)  # no cluster: it never gets that far
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: hydra.launcher.{setting} is not valid: expected a whole number of seconds, {valid}"]
    assert not (tmp_path / "sweep").exists()


FAKE_SBATCH = """#!/bin/sh
cp "$1" "$(dirname "$0")/submitted.sh"
echo "sbatch: error: Memory specification can not be satisfied" >&2
echo "sbatch: error: Batch job submission failed: Requested node configuration is not available" >&2
exit 1
"""


def test_a_refused_request_is_a_failed_row_for_each_job_without_a_cluster(tmp_path):
    """The launcher's part of a refusal, with an sbatch and a sinfo of the test's own on PATH that answer as the
    cluster's do (test_a_request_that_sbatch_refuses_is_a_failed_row_for_each_job): what it submits, and the rows."""
    needs_extra("sweep", "submitit")
    bin_dir, sweep_dir = tmp_path / "bin", tmp_path / "sweep"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sinfo").write_text("#!/bin/sh\necho 'debug*|localhost|idle|2|2000|(null)|infinite'\n")
    for script in bin_dir.iterdir():
        script.chmod(0o755)
    env = entry_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    result = run("src.train", "-m", *SLURM_CPU[:-1], "hydra.launcher.mem_gb=10", "model.hidden=8,16",
                 f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path, env=env, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    submitted = (bin_dir / "submitted.sh").read_text()
    assert "#SBATCH --mem=10GB" in submitted and "#SBATCH --cpus-per-task=1" in submitted
    assert "#SBATCH --array=0-1" in submitted and "wait_report" not in submitted and "grace" not in submitted
    assert "#SBATCH --requeue" in submitted and "no-requeue" not in submitted  # hydra.launcher.requeue=true
    rows = read_summary(sweep_dir)
    assert [(row["overrides"], row["status"]) for row in rows] == [("model.hidden=8", "failed"), ("model.hidden=16", "failed")]
    assert {row["error"] for row in rows} == {
        "CannotStart: sbatch refused the jobs: Memory specification can not be satisfied; Batch job submission "
        "failed: Requested node configuration is not available: it asks for 10 GB a node (hydra.launcher.mem_gb=10) "
        "and partition debug's nodes have at most 2.0 GB; ask for less, or choose another hydra.launcher.partition"}


SEARCH = ["data.val_size=100", "trainer.max_epochs=3", "hparams_search.pruner.n_startup_trials=1",
          "hparams_search.pruner.n_warmup_steps=0", "hparams_search.params.optimizer.lr.low=1e-7"]


def check_study(study_dir: Path, n_trials: int, worker_logs: list[str], epochs: int = 3):
    """Every trial of the study ran once, in one worker, in its own folder; none is left running."""
    needs_extra("sweep", "optuna", "optuna_integration")
    import optuna
    from optuna.trial import TrialState

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(study_dir / "journal.log")))
    study = optuna.load_study(study_name="mnist-mlp", storage=storage)
    assert [t.number for t in study.trials] == list(range(n_trials))
    assert {t.state for t in study.trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert len({json.dumps(t.params, sort_keys=True) for t in study.trials}) == n_trials
    assert sorted(p.name for p in study_dir.glob("trial_*")) == sorted(f"trial_{n}" for n in range(n_trials))
    started = [re.findall(r"^trial (\d+):", log, re.M) for log in worker_logs]
    assert sorted(int(n) for numbers in started for n in numbers) == list(range(n_trials))  # each once, in all
    assert all(started), "a worker ran no trial"
    for trial in study.trials:  # val/acc reported after every epoch; a pruned trial stopped there, untested
        reported = sorted(trial.intermediate_values)
        assert reported == list(range(len(reported)))
        metrics = study_dir / f"trial_{trial.number}" / "metrics.csv"
        if trial.state == TrialState.COMPLETE:
            assert len(reported) == epochs == len(logged(metrics, "train/loss")) and len(logged(metrics, "test/acc")) == 1
        else:
            assert 1 <= len(reported) <= epochs and logged(metrics, "test/acc") == []
    return study


def test_optuna_workers_share_one_study_locally_and_it_resumes(tiny_data, tmp_path):
    study_dir = tmp_path / "study"
    args = command("src.tune", f"data.data_dir={tiny_data}", *SEARCH, "hparams_search.n_trials=5",
                   f"hydra.run.dir={study_dir}")
    # Each worker has a trial under way (its first epoch saved) before either takes another: both run trials.
    env = meeting(entry_env(), tmp_path, 2, after="last.ckpt")
    workers = [subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    outputs = [worker.communicate(timeout=300) for worker in workers]
    for worker, (out, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-3000:]
    logs = [out + err for out, err in outputs]
    check_study(study_dir, 5, logs)

    again = run("src.tune", f"data.data_dir={tiny_data}", *SEARCH, "hparams_search.n_trials=6",
                f"hydra.run.dir={study_dir}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    said = again.stdout + again.stderr
    assert "resuming study 'mnist-mlp'" in said and "5 of 6 trials done" in said
    check_study(study_dir, 6, logs + [said])


def test_optuna_workers_as_slurm_jobs_share_one_study(slurm_cluster, tiny_data, tmp_path):
    env, study_dir = environment(slurm_cluster), tmp_path / "study"
    # sbatch passes the environment on: each worker has a trial under way before either takes another (without
    # this, a worker that SLURM starts a few seconds after the other found all 4 trials taken, now and then).
    env = meeting(env, tmp_path, 2, after="last.ckpt")
    tune = " ".join(command("src.tune", f"data.data_dir={tiny_data}", *SEARCH, "hparams_search.n_trials=4",
                            f"hydra.run.dir={study_dir}"))
    # docs/slurm.md's command for a cluster, with what this one has: a whole node each, so one worker a node.
    cpus, _ = node_size(env)
    submitted = subprocess.run(["sbatch", "--array=1-2", f"--cpus-per-task={cpus}", "--mem=2G", "--time=10",
                                f"--output={tmp_path}/worker-%a.out", "--wrap", tune],
                               cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job_id = re.search(r"Submitted batch job (\d+)", submitted.stdout).group(1)
    assert [final_state(env, f"{job_id}_{n}", timeout=300) for n in (1, 2)] == ["COMPLETED", "COMPLETED"]
    logs = [(tmp_path / f"worker-{n}.out").read_text() for n in (1, 2)]
    check_study(study_dir, 4, logs)
    assert sorted(nodes_said(log)[0] for log in logs) == ["n1", "n2"]  # one worker on each node


def test_a_sqlite_study_from_before_is_still_resumed(tiny_data, tmp_path):
    needs_extra("sweep", "optuna", "optuna_integration")
    import optuna

    study_dir = tmp_path / "study"
    study_dir.mkdir()
    storage = f"sqlite:///{study_dir / 'study.db'}"
    old = optuna.create_study(study_name="mnist-mlp", storage=storage, direction="maximize")
    old.optimize(lambda trial: trial.suggest_float("optimizer.lr", 1e-7, 1e-1, log=True) * 0 + 0.5, n_trials=1)

    result = run("src.tune", f"data.data_dir={tiny_data}", *SEARCH, "trainer.max_epochs=1",
                 "hparams_search.n_trials=2", f"hydra.run.dir={study_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    said = result.stdout + result.stderr
    assert "1 of 2 trials done" in said and f"resuming {study_dir / 'study.db'} (SQLite)" in said
    assert [t.number for t in optuna.load_study(study_name="mnist-mlp", storage=storage).trials] == [0, 1]
    assert not (study_dir / "journal.log").exists()


def scontrol_job(env: dict, job_id: str) -> dict[str, str]:
    """`scontrol show job` of the job as {field: value}."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True,
                         check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def take_a_node_away_once_trained(env: dict, sweep: subprocess.Popen, checkpoint: Path) -> tuple[str, int]:
    """Once the two-node job has saved its first last.ckpt, n2 goes down (as a failed node goes) and comes back.
    Returns the job's id and the step of the last.ckpt saved before the job ended."""
    import torch

    deadline = time.time() + 180
    while not checkpoint.is_file():  # an epoch is done: the job is well under way
        assert sweep.poll() is None and time.time() < deadline, "the job did not train its first epoch"
        time.sleep(0.5)
    (job_id,) = [job for job, state in slurm_states(env).items() if state == "RUNNING"]
    subprocess.run(["scontrol", "update", "nodename=n2", "state=down", "reason=a test's lost node"], env=env,
                   check=True)
    while (state := slurm_states(env)[job_id]) in ("RUNNING", "COMPLETING"):
        assert time.time() < deadline, f"job {job_id} still {state} after its node went down"
        time.sleep(0.5)
    subprocess.run(["scontrol", "update", "nodename=n2", "state=resume"], env=env, check=False)  # may be back already
    return job_id, torch.load(checkpoint, weights_only=True)["global_step"]


STEPS = 75  # a two-node job's steps an epoch: 600 images / 2 processes / batches of 4


def test_a_lost_node_requeues_the_job_and_it_goes_on_from_its_last_ckpt(slurm_cluster, tiny_data, tmp_path):
    import torch

    env, sweep_dir = environment(slurm_cluster), tmp_path / "sweep"
    args = [*TWO_NODES, f"data.data_dir={tiny_data}", f"data.batch_size={600 // 2 // STEPS}", "trainer.max_epochs=2"]
    sweep = subprocess.Popen(command("src.train", "-m", *args, *WAIT, f"hydra.sweep.dir={sweep_dir}"), cwd=tmp_path,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoint = sweep_dir / "0" / "checkpoints" / "last.ckpt"
    try:
        job_id, saved_step = take_a_node_away_once_trained(env, sweep, checkpoint)
        # SLURM requeued it (--requeue) and holds it back for the credentials' lifetime (BeginTime: 20 s on the
        # test cluster, cred_expire), then starts it again.
        job = scontrol_job(env, job_id)
        assert (job["JobState"], job["Restarts"], job["Requeue"]) == ("PENDING", "1", "1"), job
        out, err = sweep.communicate(timeout=240)  # a sweep that would wait for the first start forever fails here
    finally:
        if sweep.poll() is None:
            sweep.kill()

    assert sweep.returncode == 0, err[-3000:]
    assert f"SLURM job {job_id} still waiting after " in out + err  # while requeued: said, with the reason
    (row,) = read_summary(sweep_dir)
    assert row["status"] == "completed" and row["resumed"] == f"step {saved_step} (SLURM restart 1)", row
    assert STEPS <= saved_step < 2 * STEPS
    log = job_log(sweep_dir, job_id)
    assert "DUE TO NODE FAILURE" in log
    assert log.count(f"SLURM started this job again (restart 1); going on from {checkpoint} at step {saved_step}, "
                     "not from step 0") == 2  # both processes went on
    final = torch.load(checkpoint, weights_only=True)
    assert (final["epoch"], final["global_step"]) == (1, 2 * STEPS)  # Lightning counts epochs from 0
    # Nothing lost: metrics.csv has every epoch, the ones before the node failed among them.
    assert len(logged(sweep_dir / "0" / "metrics.csv", "train/loss")) == 2 and row["epochs"] == "2"
    assert final_state(env, job_id) == "COMPLETED"


def test_a_lost_node_without_requeue_is_a_failed_row_naming_it_and_the_last_ckpt(slurm_cluster, tiny_data, tmp_path):
    env, sweep_dir = environment(slurm_cluster), tmp_path / "sweep"
    args = [*TWO_NODES, "hydra.launcher.requeue=false", f"data.data_dir={tiny_data}", "data.batch_size=8",
            "trainer.max_epochs=50"]
    sweep = subprocess.Popen(command("src.train", "-m", *args, f"hydra.sweep.dir={sweep_dir}"), cwd=tmp_path,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoint = sweep_dir / "0" / "checkpoints" / "last.ckpt"
    try:
        job_id, _ = take_a_node_away_once_trained(env, sweep, checkpoint)
        out, err = sweep.communicate(timeout=120)
    finally:
        if sweep.poll() is None:
            sweep.kill()

    assert sweep.returncode == 1, err[-3000:]
    assert err.strip().splitlines()[-1] == f"error: 1 of 1 jobs failed; their errors are in {sweep_dir / 'summary.csv'}"
    (row,) = read_summary(sweep_dir)
    assert row["status"] == "failed" and row["checkpoint"] == str(checkpoint) and row["resumed"] == ""
    assert row["error"].startswith(
        f"UncompletedJobError: SLURM job {job_id} ended NODE_FAIL (a node of the job failed, and SLURM did not start "
        f"it again: hydra.launcher.requeue=false or the cluster's JobRequeue=0; resume from {checkpoint}) without "
        "returning"), row["error"]
    assert "#SBATCH --no-requeue" in next((sweep_dir / ".submitit").glob("*/*_submission.sh")).read_text()
    assert scontrol_job(env, job_id)["Restarts"] == "0"


def rendezvous_line(world_size: int, port: str, bound: int) -> str:
    return (rf"the {world_size} DDP processes did not meet at nowhere\.invalid:{port} \(MASTER_ADDR:MASTER_PORT\) "
            rf"within trainer\.rendezvous_timeout_s={bound} \(waited (\d+) s\): nowhere\.invalid resolves nowhere; "
            r"check that the node names resolve on every node \(getent hosts nowhere\.invalid\), that port \d+ is "
            r"not blocked between the nodes, and that every task started \(the job's logs\)")


def test_processes_that_cannot_meet_end_a_two_node_job_as_a_failed_row_within_the_bound(slurm_cluster, tiny_data,
                                                                                        tmp_path):
    # sbatch passes the environment on: the address Lightning would take from the node list resolves nowhere.
    env, sweep_dir = {**environment(slurm_cluster), "MASTER_ADDR": "nowhere.invalid"}, tmp_path / "sweep"
    result = run("src.train", "-m", *TWO_NODES, "trainer.rendezvous_timeout_s=6", f"data.data_dir={tiny_data}",
                 f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path, env=env, timeout=150)

    assert result.returncode == 1, result.stderr[-3000:]
    (row,) = read_summary(sweep_dir)
    job_id = slurm_job_id(sweep_dir / "0")
    port = str(15000 + int(job_id[-4:]))  # Lightning's port of a SLURM job
    waited = re.fullmatch("RendezvousTimeout: " + rendezvous_line(2, port, 6), row["error"])
    assert row["status"] == "failed" and waited, row["error"]
    assert int(waited.group(1)) <= 6
    assert final_state(env, job_id) == "COMPLETED"  # the job ended by itself, as the row says


def test_local_ddp_processes_that_cannot_meet_end_in_one_line_within_the_bound(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    result = run("src.train", "trainer=ddp_cpu", "trainer.rendezvous_timeout_s=4", f"data.data_dir={tiny_data}",
                 f"hydra.run.dir={run_dir}", cwd=tmp_path, env=entry_env(MASTER_ADDR="nowhere.invalid"), timeout=120)

    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()  # torch's retries and their stack traces held back
    waited = re.fullmatch("error: " + rendezvous_line(2, r"\d+", 4), line)
    assert waited and int(waited.group(1)) <= 4, line
    # The process Lightning started for the second device was stopped with the first.
    left = subprocess.run(["pgrep", "-f", f"hydra.run.dir={run_dir}"], capture_output=True, text=True)
    assert left.stdout == "", left.stdout
