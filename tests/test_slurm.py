"""Sweeps, DDP and the Optuna search on a real one-node SLURM cluster (tests/slurm/cluster.sh).

The jobs are submitted with sbatch (by submitit, through hydra/launcher=slurm_cpu, or by sbatch
itself for the search's workers) and run by slurmd, with this interpreter (submitit submits
sys.executable) and PYTHONPATH at the repository, which sbatch passes on to the jobs: they
unpickle Hydra's task function, src.train.main. The cluster has 2 CPUs, so jobs queue.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import entry_env, logged, needs_extra
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


def slurm_job_id(job_dir: Path) -> str:
    """The SLURM job id that Hydra's submitit launcher recorded as the job's hydra.job.id."""
    return re.search(r"^    id: '?(\w+)'?$", (job_dir / ".hydra" / "hydra.yaml").read_text(), re.M).group(1)


def test_grid_sweep_runs_each_job_as_a_slurm_job(slurm_cluster, tiny_data, tmp_path):
    env, sweep_dir = environment(slurm_cluster), tmp_path / "sweep"
    result = run("src.train", "-m", *SLURM_CPU, f"data.data_dir={tiny_data}", "trainer.max_epochs=1",
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
    submission = next((sweep_dir / ".submitit").glob("*/*_submission.sh")).read_text()
    assert "#SBATCH --array=0-1" in submission and "#SBATCH --signal=TERM@120" in submission
    assert "srun --unbuffered" in submission and sys.executable in submission


def test_ddp_across_two_slurm_tasks_matches_local_ddp(slurm_cluster, tiny_data, tmp_path):
    import torch

    env = environment(slurm_cluster)
    same = [f"data.data_dir={tiny_data}", "trainer=ddp_cpu", "data.batch_size=32", "trainer.max_epochs=2", "seed=7"]
    local_dir, sweep_dir = tmp_path / "local", tmp_path / "sweep"
    local = run("src.train", *same, f"hydra.run.dir={local_dir}", cwd=tmp_path, env=env)
    assert local.returncode == 0, local.stderr[-3000:]
    result = run("src.train", "-m", "hydra/launcher=slurm_cpu", "hydra.launcher.tasks_per_node=2",
                 "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=4", *same,
                 f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path, env=env)
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
    """The test cluster's node: its CPUs and its memory in MB, as SLURM has them (this machine's own)."""
    cpus, memory = subprocess.run(["sinfo", "-h", "-N", "-o", "%c %m"], env=env, capture_output=True, text=True,
                                  check=True).stdout.split()
    return int(cpus), int(memory)


# Look at the queue every 3 s instead of every minute.
WAIT = ("hydra.launcher.wait_report_s=3",)


def test_a_job_asking_for_more_cpus_than_the_node_has_is_cancelled_as_a_failed_row(slurm_cluster, tiny_data,
                                                                                   tmp_path):
    env, sweep_dir = environment(slurm_cluster), tmp_path / "sweep"
    cpus, _ = node_size(env)
    # SLURM takes the job and keeps it pending for PartitionConfig, forever: the launcher cancels it
    # once it has said so for 6 s. (The run's timeout is the "within two minutes".)
    result = run("src.train", "-m", "hydra/launcher=slurm_cpu", f"hydra.launcher.cpus_per_task={cpus + 1}",
                 "hydra.launcher.mem_gb=2", *WAIT, "hydra.launcher.cannot_start_grace_s=6", f"data.data_dir={tiny_data}",
                 f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path, env=env, timeout=120)

    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == \
        f"error: 1 of 1 jobs failed; their errors are in {sweep_dir / 'summary.csv'}"
    (row,) = read_summary(sweep_dir)
    job_id = re.search(r"#0 : SLURM job (\d+)$", result.stdout, re.M).group(1)
    advice = (f"it asks for {cpus + 1} CPUs a node (hydra.launcher.cpus_per_task={cpus + 1} x tasks_per_node=1) "
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
    # Two jobs that each take every CPU of the node: one runs, the other waits for Resources. With
    # a grace of 0, a reason taken for "cannot start" would cancel the waiting one at once.
    result = run("src.train", "-m", "hydra/launcher=slurm_cpu", f"hydra.launcher.cpus_per_task={cpus}",
                 "hydra.launcher.mem_gb=2", *WAIT, "hydra.launcher.cannot_start_grace_s=0", f"data.data_dir={tiny_data}",
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
    workers = [subprocess.Popen(args, cwd=tmp_path, env=entry_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for _ in range(2)]
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
    tune = " ".join(command("src.tune", f"data.data_dir={tiny_data}", *SEARCH, "hparams_search.n_trials=4",
                            f"hydra.run.dir={study_dir}"))
    # docs/slurm.md's command for a cluster, with what this one has.
    submitted = subprocess.run(["sbatch", "--array=1-2", "--cpus-per-task=1", "--mem=2G", "--time=10",
                                f"--output={tmp_path}/worker-%a.out", "--wrap", tune],
                               cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job_id = re.search(r"Submitted batch job (\d+)", submitted.stdout).group(1)
    assert [final_state(env, f"{job_id}_{n}", timeout=300) for n in (1, 2)] == ["COMPLETED", "COMPLETED"]
    check_study(study_dir, 4, [(tmp_path / f"worker-{n}.out").read_text() for n in (1, 2)])


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
