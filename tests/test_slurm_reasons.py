"""Which of SLURM's reasons for a pending job mean that it can never start as submitted, and what
the launcher then tells the user to change (hydra_plugins/keras_mnist_slurm/pending.py).

tests/test_slurm.py shows PartitionConfig, Resources and sbatch's refusal on the real test
cluster; the other reasons, which that one-node cluster cannot produce (several partitions, QOS
limits, GPUs), are given here as squeue words them, with sinfo's view of the partition. Last, the
line for a job that returned no result, from submitit's own exceptions.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hydra_plugins.keras_mnist_slurm.pending import Cluster, Partition, cannot_start

REQUEST = {"cpus_per_task": 4, "tasks_per_node": 1, "mem_gb": 32, "gpus_per_node": 8, "nodes": 1,
           "timeout_min": 600, "account": "nobody", "qos": None, "constraint": None}


def gpu_cluster(*states: str) -> Cluster:
    """Partition `gpu` (2 hours at most): one node per state, each with 16 CPUs, 64000 MB and 4 GPUs."""
    n = len(states)
    nodes = {f"g{i}": state for i, state in enumerate(states)}
    return Cluster({"gpu": Partition("gpu", "2:00:00", nodes, [16] * n, [64000] * n, [4] * n)}, default="gpu")


@pytest.mark.parametrize("reason", [
    "None", "Resources", "Priority", "Dependency", "BeginTime", "JobHeldUser", "JobHeldAdmin", "PartitionDown",
    "QOSGrpCpuLimit", "AssocGrpGRES", "QOSMaxJobsPerUserLimit", "AssocMaxJobsLimit", "JobArrayTaskLimit",
])
def test_reasons_that_free_up_are_waited_for(reason):
    assert cannot_start(reason, "gpu", REQUEST, gpu_cluster("idle")) is None


@pytest.mark.parametrize("states", [("drain", "mix"), ("down*", "alloc"), ("resv",), ("maint", "drain"), ("idle~",)])
def test_unavailable_nodes_are_waited_for_while_any_node_of_the_partition_takes_jobs(states):
    # Busy, reserved (a maintenance window ahead), powered down (~): the job starts later.
    for reason in ("ReqNodeNotAvail, UnavailableNodes:g0",
                   "Nodes required for job are DOWN, DRAINED or reserved for jobs in higher priority partitions"):
        assert cannot_start(reason, "gpu", REQUEST, gpu_cluster(*states)) is None


def test_a_partition_whose_nodes_are_all_down_or_drained_cannot_start_the_job():
    for reason in ("ReqNodeNotAvail, UnavailableNodes:g[0-2]",
                   "Nodes required for job are DOWN, DRAINED or reserved for jobs in higher priority partitions"):
        assert cannot_start(reason, "gpu", REQUEST, gpu_cluster("drain", "down*", "drng")) == (
            "every node of partition gpu is down or drained (g0 drain, g1 down*, g2 drng): "
            "choose another hydra.launcher.partition")


@pytest.mark.parametrize("reason, said", [
    ("PartitionConfig", "it asks for 8 GPUs a node (hydra.launcher.gpus_per_node=8) and partition gpu's nodes have "
                        "at most 4; ask for less, or choose another hydra.launcher.partition"),
    ("PartitionTimeLimit", "hydra.launcher.timeout_min=600 is above partition gpu's time limit of 2:00:00: "
                           "lower it, or choose another hydra.launcher.partition"),
    ("InvalidAccount", "hydra.launcher.account=nobody cannot be used here: set it to one of yours"),
    ("QOSMaxGRESPerJob", "the request is outside a per-job limit of its QOS or account: change "
                         "hydra.launcher.gpus_per_node=8 (sacctmgr show qos lists the limits)"),
    ("QOSMaxCpuPerNode", "the request is outside a per-job limit of its QOS or account: change "
                         "hydra.launcher.cpus_per_task=4 (sacctmgr show qos lists the limits)"),
    ("QOSMaxBillingPerNode", "the request is outside a per-job limit of its QOS or account: ask for less "
                             "(sacctmgr show qos lists the limits)"),
    ("AssocMaxWallDurationPerJobLimit", "the request is outside a per-job limit of its QOS or account: change "
                                        "hydra.launcher.timeout_min=600 (sacctmgr show qos lists the limits)"),
])
def test_a_request_that_does_not_fit_says_what_to_change(reason, said):
    assert cannot_start(reason, "gpu", REQUEST, gpu_cluster("idle", "mix")) == said


@pytest.mark.parametrize("reason, request_, said", [
    # The CPUs of a node are those of all its tasks.
    ("PartitionConfig", {"cpus_per_task": 4, "tasks_per_node": 8, "gpus_per_node": None, "mem_gb": 8},
     "it asks for 32 CPUs a node (hydra.launcher.cpus_per_task=4 x tasks_per_node=8) and partition gpu's nodes have at "
     "most 16; ask for less, or choose another hydra.launcher.partition"),
    # sinfo's memory is in MB of 1024 KB: 64000 MB is 62.5 GB, short of 63.
    ("PartitionConfig", {"gpus_per_node": None, "mem_gb": 63},
     "it asks for 63 GB a node (hydra.launcher.mem_gb=63) and partition gpu's nodes have at most 62.5 GB; ask for "
     "less, or choose another hydra.launcher.partition"),
    ("PartitionNodeLimit", {"nodes": 3}, "it asks for 3 nodes (hydra.launcher.nodes) and partition gpu has 2"),
    ("InvalidQOS", {"qos": "high"}, "hydra.launcher.qos=high cannot be used here: set it to one of yours"),
    ("QOSMaxMemoryPerJob", {}, "the request is outside a per-job limit of its QOS or account: change "
                               "hydra.launcher.mem_gb=32 (sacctmgr show qos lists the limits)"),
    ("QOSMaxNodePerJobLimit", {"nodes": 3}, "the request is outside a per-job limit of its QOS or account: change "
                                            "hydra.launcher.nodes=3 (sacctmgr show qos lists the limits)"),
])
def test_a_request_that_does_not_fit_names_the_setting_that_asks_for_it(reason, request_, said):
    assert cannot_start(reason, "gpu", {**REQUEST, **request_}, gpu_cluster("idle", "mix")) == said


def test_sinfo_lines_are_read_per_partition_with_the_default_one_marked(monkeypatch):
    # sinfo -h -N -o "%P|%N|%t|%c|%m|%G|%l", as a GPU cluster answers (the test cluster's one line is
    # "debug*|localhost|idle|2|21694|(null)|infinite").
    lines = ["gpu*|g0|mix|64|512000|gpu:a100:4(S:0-1)|2-00:00:00", "gpu*|g1|drain*|32|256000|gpu:8|2-00:00:00",
             "cpu|c0|idle|128|1024000|(null)|infinite"]
    # Imported here, not at the top: Hydra's plugin scan, run by any earlier test that composes a config, runs
    # this module again, and the names imported before it would be the first run's classes and functions.
    from hydra_plugins.keras_mnist_slurm import pending
    from hydra_plugins.keras_mnist_slurm.pending import Cluster, Partition, cannot_start

    monkeypatch.setattr(pending, "_run", lambda command: lines if command[0] == "sinfo" else [])
    cluster = Cluster()
    assert cluster.partition(None) == cluster.partition("gpu") == Partition(
        "gpu", "2-00:00:00", {"g0": "mix", "g1": "drain*"}, [64, 32], [512000, 256000], [4, 8])
    assert cluster.partition("cpu") == Partition("cpu", "infinite", {"c0": "idle"}, [128], [1024000], [0])
    assert cannot_start("PartitionConfig", "cpu", REQUEST, cluster) == (
        "it asks for 8 GPUs a node (hydra.launcher.gpus_per_node=8) and partition cpu's nodes have at most 0; "
        "ask for less, or choose another hydra.launcher.partition")


def test_a_job_that_failed_outside_its_task_says_what_failed_not_that_it_ended(tmp_path):
    """submitit's FailedJobError (the job's code raised outside the task, say importing it) is an
    UncompletedJobError too: it gets its own line, the traceback's last, not "ended without returning"."""
    import traceback
    from types import SimpleNamespace

    from submitit.core.utils import FailedJobError, UncompletedJobError

    from hydra_plugins.keras_mnist_slurm import _why_no_result

    try:
        import src.no_such_module  # noqa: F401
    except ImportError:
        trace = traceback.format_exc()
    paths = SimpleNamespace(stderr="/sweep/.submitit/7/7_0_log.err", stdout="/sweep/.submitit/7/7_0_log.out")
    job = SimpleNamespace(job_id="7", state="FAILED", paths=paths, stderr=lambda: "")
    # Worded as submitit's Job.exception() words it.
    failure = FailedJobError(f"Job (task=0) failed during processing with trace:\n----------------------\n{trace}\n"
                             "----------------------\nYou can check full logs with 'job.stderr(0)' and 'job.stdout(0)'"
                             f"or at paths:\n  - {paths.stderr}\n  - {paths.stdout}")
    error = _why_no_result(job, failure, Path("/sweep/0"))
    assert type(error) is FailedJobError
    assert str(error) == f"SLURM job 7 failed: ModuleNotFoundError: No module named 'src.no_such_module' (log: {paths.stderr})"

    job.state = "TIMEOUT"
    job.stderr = lambda: ("train images (600, 784)\nslurmstepd: error: *** JOB 7 ON node1 CANCELLED AT 2026-01-01T12:00:00 "
                          "DUE TO TIME LIMIT ***\nInterrupted in epoch 3 after 41 steps; saved /run/last.ckpt\n"
                          "srun: error: node1: task 0: Exited with exit code 1\n")  # the job's own line is not the last
    error = _why_no_result(job, UncompletedJobError("Job 7 (task: 0) with path ... has not produced any output"),
                           Path("/sweep/0"))
    assert type(error) is UncompletedJobError
    assert str(error) == ("SLURM job 7 ended TIMEOUT without returning: Interrupted in epoch 3 after 41 steps; saved "
                          f"/run/last.ckpt (log: {paths.stderr})")

    job.state = "NODE_FAIL"  # a lost node, and hydra.launcher.requeue=false: the row says where to resume from
    last = tmp_path / "0" / "checkpoints" / "last.ckpt"
    for saved in (False, True):
        error = _why_no_result(job, UncompletedJobError("Job 7 (task: 0) has not produced any output"), tmp_path / "0")
        where = f"resume from {last}" if saved else "it had saved no last.ckpt"
        assert str(error) == ("SLURM job 7 ended NODE_FAIL (a node of the job failed, and SLURM did not start it again: "
                              f"hydra.launcher.requeue=false or the cluster's JobRequeue=0; {where}) without returning: "
                              f"Interrupted in epoch 3 after 41 steps; saved /run/last.ckpt (log: {paths.stderr})")
        last.parent.mkdir(parents=True, exist_ok=True)
        last.touch()

    job.state = "OUT_OF_MEMORY"  # no line of the job's own: SLURM's last one
    job.stderr = lambda: ("train images (600, 784)\n\nslurmstepd: error: Detected 1 oom_kill event in StepId=7.0. Some "
                          "of the step tasks have been OOM Killed.\n\n")
    error = _why_no_result(job, UncompletedJobError("Job 7 (task: 0) has not produced any output"), tmp_path / "0")
    assert str(error) == ("SLURM job 7 ended OUT_OF_MEMORY without returning: slurmstepd: error: Detected 1 oom_kill "
                          f"event in StepId=7.0. Some of the step tasks have been OOM Killed. (log: {paths.stderr})")


def test_a_job_of_several_tasks_returns_its_first_tasks_result():
    """Each task of a DDP job returns a JobReturn; the first task's callback turned a failure into a failed row and
    a completed job, while the others' callbacks leave theirs failed (src/sweep.py), which Hydra's sweeper would
    re-raise, ending the sweep without its summary."""
    from types import SimpleNamespace

    from hydra.core.utils import JobReturn, JobStatus

    import hydra_plugins.keras_mnist_slurm as plugin

    first, second = JobReturn(status=JobStatus.COMPLETED), JobReturn(status=JobStatus.FAILED)
    job = SimpleNamespace(job_id="7_0", results=lambda: [first, second])
    assert plugin.SlurmLauncher._result(None, job, ["model.hidden=8"], 0) is first

def test_pending_reasons_are_read_for_the_jobs_asked_about(monkeypatch):
    """squeue -r lists each task of an array on a line of its own (without it, "12_[0-1]"); a reason may hold commas."""
    from hydra_plugins.keras_mnist_slurm import pending

    asked = []
    lines = ["12_0|gpu|Resources", "12_1|gpu|ReqNodeNotAvail, UnavailableNodes:g[0-2]", "12_3|gpu|Priority",
             "13|cpu|PartitionConfig "]
    monkeypatch.setattr(pending, "_run", lambda command: asked.append(command) or lines)
    assert pending.pending_reasons(["12_0", "12_1", "13"]) == {
        "12_0": ("Resources", "gpu"), "12_1": ("ReqNodeNotAvail, UnavailableNodes:g[0-2]", "gpu"),
        "13": ("PartitionConfig", "cpu")}  # 12_3 is not one of them
    assert asked == [["squeue", "-h", "-r", "-t", "PENDING", "-j", "12,13", "-o", "%i|%P|%r"]]


@pytest.mark.parametrize("stderr, request_, said", [
    ("sbatch: error: Memory specification can not be satisfied\n"
     "sbatch: error: Batch job submission failed: Requested node configuration is not available",
     {"mem_gb": 1000},
     "Memory specification can not be satisfied; Batch job submission failed: Requested node configuration is not "
     "available: it asks for 1000 GB a node (hydra.launcher.mem_gb=1000) and partition gpu's nodes have at most 500.0 "
     "GB; ask for less, or choose another hydra.launcher.partition"),
    ("sbatch: error: invalid partition specified: big\nsbatch: error: Batch job submission failed: Invalid partition "
     "name specified", {"partition": "big"},
     "invalid partition specified: big; Batch job submission failed: Invalid partition name specified: "
     "hydra.launcher.partition=big is not a partition here: valid are gpu, cpu"),
    ("sbatch: error: Batch job submission failed: Requested time limit is invalid (missing or exceeds some limit)",
     {"timeout_min": 6000},
     "Batch job submission failed: Requested time limit is invalid (missing or exceeds some limit): "
     "hydra.launcher.timeout_min=6000 is above partition gpu's time limit of 2-00:00:00: lower it, or choose another "
     "hydra.launcher.partition"),
    ("sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified",
     {"account": "nobody"},
     "Batch job submission failed: Invalid account or account/partition combination specified: "
     "hydra.launcher.account=nobody cannot be used here: set it to one of yours"),
    ("sbatch: error: Batch job submission failed: Socket timed out on send/recv operation", {},
     "Batch job submission failed: Socket timed out on send/recv operation"),  # nothing to change in the request
])
def test_a_request_that_sbatch_refuses_says_what_to_change(monkeypatch, stderr, request_, said):
    """sbatch's own words (submitit's FailedJobError holds its stderr), with the partition as sinfo shows it."""
    from hydra_plugins.keras_mnist_slurm import pending

    lines = ["gpu*|g0|mix|64|512000|gpu:a100:4(S:0-1)|2-00:00:00", "cpu|c0|idle|128|256000|(null)|infinite"]
    monkeypatch.setattr(pending, "_run", lambda command: lines if command[0] == "sinfo" else [])
    request = {"cpus_per_task": 4, "tasks_per_node": 1, "mem_gb": 16, "gpus_per_node": None, "nodes": 1,
               "timeout_min": 60, "partition": None, "account": None, "qos": None, **request_}
    assert pending.refused(stderr, request) == f"sbatch refused the jobs: {said}"


def test_while_jobs_wait_each_look_reports_their_reasons_and_cancels_those_that_cannot_start(monkeypatch):
    """The launcher's wait, on a clock of its own: a look every report_s=60 s, and a job whose reason has said for
    cannot_start_grace_s=120 s that it cannot start as submitted is cancelled. Job 11_0 waits for Resources and then
    runs; 11_1 asks for more GPUs than a node has; 11_2 says so too, then Resources (its count starts again), and when
    its time is up it has started meanwhile: scancel --state=PENDING leaves it alone, and it is not a failed row."""
    from types import SimpleNamespace

    import hydra_plugins.keras_mnist_slurm as plugin
    from hydra_plugins.keras_mnist_slurm import pending

    clock = [1000.0]
    monkeypatch.setattr(plugin, "time", SimpleNamespace(time=lambda: clock[0],
                                                        sleep=lambda s: clock.__setitem__(0, clock[0] + s)))
    big = "PartitionConfig"
    looks = [{"11_0": "Resources", "11_1": big, "11_2": big}, {"11_0": "Resources", "11_1": big, "11_2": "Resources"},
             {"11_1": big, "11_2": big}, {"11_2": big}, {"11_2": big}, {}]
    seen = []

    def reasons(waiting):
        assert len(seen) < len(looks), "the launcher is still waiting"
        seen.append(sorted(waiting))
        return {job: (reason, "gpu") for job, reason in looks[len(seen) - 1].items()}

    done_after = {"11_0": 2, "11_1": len(looks), "11_2": len(looks)}  # looks after which each job is done
    jobs = [SimpleNamespace(job_id=job, done=lambda job=job: len(seen) >= done_after[job]) for job in done_after]
    cluster = pending.Cluster({"gpu": pending.Partition("gpu", "2:00:00", {"g0": "idle"}, [16], [64000], [4])}, "gpu")
    monkeypatch.setattr(pending, "pending_reasons", reasons)
    monkeypatch.setattr(pending, "Cluster", lambda: cluster)
    cancels = []
    monkeypatch.setattr(plugin, "_cancel_pending", lambda job: cancels.append(job) or job == "11_1")
    said = []
    monkeypatch.setattr(plugin, "log", SimpleNamespace(**{level: lambda line, level=level: said.append((level, line))
                                                          for level in ("info", "warning", "error")}))

    cancelled = plugin.SlurmLauncher._wait(None, jobs, range(3), REQUEST, 60, 120)

    why = ("it asks for 8 GPUs a node (hydra.launcher.gpus_per_node=8) and partition gpu's nodes have at most 4; "
           "ask for less, or choose another hydra.launcher.partition")
    assert list(cancelled) == ["11_1"] and type(cancelled["11_1"]).__name__ == "CannotStart"
    assert str(cancelled["11_1"]) == f"SLURM job 11_1 could not start ({big}) and was cancelled after waiting 3 min: {why}"
    assert cancels == ["11_1", "11_2"]
    assert seen == [["11_0", "11_1", "11_2"]] * 2 + [["11_1", "11_2"], ["11_2"], ["11_2"], ["11_2"]]
    hopeless = f"{big}; it cannot start as submitted: {why} (cancelled if still so after 2 min)"
    assert said == [
        ("info", "#0 : SLURM job 11_0 still waiting after 60 s: Resources"),
        ("warning", f"#1 : SLURM job 11_1 still waiting after 60 s: {hopeless}"),
        ("warning", f"#2 : SLURM job 11_2 still waiting after 60 s: {hopeless}"),
        ("info", "#0 : SLURM job 11_0 still waiting after 2 min: Resources"),
        ("warning", f"#1 : SLURM job 11_1 still waiting after 2 min: {hopeless}"),
        ("info", "#2 : SLURM job 11_2 still waiting after 2 min: Resources"),
        ("error", f"#1 : {cancelled['11_1']}"),
        ("warning", f"#2 : SLURM job 11_2 still waiting after 3 min: {hopeless}"),
        ("warning", f"#2 : SLURM job 11_2 still waiting after 4 min: {hopeless}"),
    ]


@pytest.mark.parametrize("state, cancelled", [("CANCELLED", True), ("RUNNING", False)])
def test_a_job_is_cancelled_only_while_it_still_waits(monkeypatch, state, cancelled):
    """Between the look at the queue and the cancel, the job may have started: scancel --state=PENDING leaves a
    running job alone, and squeue then says whether it was cancelled."""
    import subprocess
    from types import SimpleNamespace

    import hydra_plugins.keras_mnist_slurm as plugin

    commands = []

    def run(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 0, stdout=f"{state}\n" if command[0] == "squeue" else "", stderr="")

    monkeypatch.setattr(plugin, "subprocess", SimpleNamespace(run=run))
    assert plugin._cancel_pending("7_1") is cancelled
    assert commands == [["scancel", "--state=PENDING", "7_1"], ["squeue", "-h", "-t", "all", "-j", "7_1", "-o", "%T"]]
