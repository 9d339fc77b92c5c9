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
    job.stderr = lambda: "train images (600, 784)\nInterrupted in epoch 3 after 41 steps; saved /run/last.ckpt\n"
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
