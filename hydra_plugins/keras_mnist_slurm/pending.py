"""Why a sweep's SLURM job is still pending, and whether it can ever start as it was submitted.

squeue gives each pending job a reason (SLURM's job reason codes). Most mean "wait": Resources,
Priority, a limit on running jobs (QOSGrp*, AssocGrp*, ...PerUser), a hold, a dependency, a
partition or node that an administrator will bring back. The ones `cannot_start` knows mean that
the request itself does not fit (more CPUs, memory, GPUs, nodes or time than the partition or its
QOS allows, an account, QOS or constraint that is not there), or that every node of the partition
is down or drained: such a job would wait forever. For those it says which hydra.launcher setting
to change. sbatch refuses some requests outright; `refused` reads its message the same way.

submitit follows only the jobs' states (sacct), so the launcher asks squeue and sinfo itself.
Hydra imports this module in every run (it scans hydra_plugins): standard library only.
"""

# No `from __future__ import annotations`: Hydra's plugin scan runs this module before it is in
# sys.modules, where @dataclass would look its string annotations up.
import re
import subprocess
from dataclasses import dataclass, field


class CannotStart(Exception):
    """A job that SLURM could not start as submitted: cancelled while pending, or refused by sbatch."""


@dataclass
class Partition:
    name: str
    time_limit: str = "infinite"  # sinfo's %l: infinite, MM, HH:MM:SS or D-HH:MM:SS
    nodes: dict[str, str] = field(default_factory=dict)  # node -> state (sinfo's %t: idle, mix, drain, down*, ...)
    cpus: list[int] = field(default_factory=list)  # per node
    memory_mb: list[int] = field(default_factory=list)
    gpus: list[int] = field(default_factory=list)


def pending_reasons(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """{job id: (SLURM's reason, partition)} for those of the jobs that are pending now."""
    arrays = sorted({job_id.split("_")[0] for job_id in job_ids})
    lines = _run(["squeue", "-h", "-r", "-t", "PENDING", "-j", ",".join(arrays), "-o", "%i|%P|%r"])
    reasons = {}
    for line in lines:
        job_id, partition, reason = line.split("|", 2)
        if job_id in job_ids:
            reasons[job_id] = (reason.strip(), partition)
    return reasons


class Cluster:
    """The partitions and their nodes as sinfo lists them, asked once, when first needed (or given)."""

    def __init__(self, partitions: dict[str, Partition] | None = None, default: str | None = None) -> None:
        self._partitions, self._default = partitions, default

    def partitions(self) -> dict[str, Partition]:
        if self._partitions is None:
            self._partitions = {}
            for line in _run(["sinfo", "-h", "-N", "-o", "%P|%N|%t|%c|%m|%G|%l"]):
                name, node, state, cpus, memory, gres, limit = line.split("|")
                if name.endswith("*"):  # the default partition
                    name = self._default = name[:-1]
                part = self._partitions.setdefault(name, Partition(name, limit))
                part.nodes[node] = state
                part.cpus.append(_number(cpus))
                part.memory_mb.append(_number(memory))
                part.gpus.append(sum(int(n) for n in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", gres)))
        return self._partitions

    def partition(self, name: str | None) -> Partition | None:
        """The partition `name`, or the default one when it is None; None when sinfo does not know it."""
        partitions = self.partitions()
        return partitions.get(name or self._default or "")


def cannot_start(reason: str, partition: str, request: dict, cluster: Cluster) -> str | None:
    """Why a job pending for `reason` in `partition` cannot start as submitted, and what to change;
    None if it may start later. `request` holds the launcher's settings (cpus_per_task, mem_gb, ...)."""
    code = reason.split(",")[0].strip()
    if code == "ReqNodeNotAvail" or reason.startswith("Nodes required for job are DOWN"):  # 22.05 says the latter
        # Also said of nodes that are busy or reserved (a maintenance window): final only when no node
        # of the partition takes jobs at all.
        return _all_nodes_out(cluster.partition(partition))
    if code in ("PartitionConfig", "BadConstraints"):
        return _too_big(request, cluster.partition(partition))
    if code == "PartitionNodeLimit":
        return _nodes(request, cluster.partition(partition))
    if code == "PartitionTimeLimit":
        return _time(request, cluster.partition(partition))
    if code in ("InvalidAccount", "InvalidQOS"):
        key = "account" if code == "InvalidAccount" else "qos"
        return f"hydra.launcher.{key}={request.get(key)} cannot be used here: set it to one of yours"
    # A per-job limit of the job's QOS or account (QOSMaxCpuPerJobLimit, AssocMaxWallDurationPerJobLimit,
    # QOSMinGRES, ...); QOSGrp*, AssocGrp* and ...PerUser are limits on running jobs, which free up.
    if re.match(r"(QOS|Assoc)(Max\w*Per(Job|Node)|Min)", code):
        return f"the request is outside a per-job limit of its QOS or account: {_limit_key(code, request)}"
    return None


def refused(message: str, request: dict) -> str:
    """sbatch's refusal of the sweep's jobs, in one line, with what to change."""
    said = [line.split("error:", 1)[-1].strip() for line in message.splitlines() if "error:" in line]
    text = "; ".join(said) or " ".join(message.split())
    cluster, lower = Cluster(), text.lower()
    part = cluster.partition(request.get("partition"))
    if "invalid partition" in lower:
        advice = f"hydra.launcher.partition={request.get('partition')} is not a partition here: valid are " \
                 f"{', '.join(cluster.partitions()) or '?'}"
    elif "invalid account" in lower or "invalid qos" in lower:
        advice = cannot_start("InvalidAccount" if "account" in lower else "InvalidQOS", "", request, cluster)
    elif "time limit" in lower:
        advice = _time(request, part)
    elif "node count" in lower:
        advice = _nodes(request, part)
    elif "node configuration" in lower or "memory specification" in lower or "feature" in lower:
        advice = _too_big(request, part)
    else:
        advice = None
    return f"sbatch refused the jobs: {text}" + (f": {advice}" if advice else "")


def _too_big(request: dict, part: Partition | None) -> str:
    """What the job asks of one node that no node of the partition has, and the settings that ask for it."""
    found = []
    tasks = request.get("tasks_per_node") or 1
    cpus, mem_gb, gpus = (request.get("cpus_per_task") or 1) * tasks, request.get("mem_gb"), request.get("gpus_per_node")
    if part and cpus > max(part.cpus):
        found.append(f"it asks for {cpus} CPUs a node (hydra.launcher.cpus_per_task={request.get('cpus_per_task')} "
                     f"x tasks_per_node={tasks}) and partition {part.name}'s nodes have at most {max(part.cpus)}")
    if part and mem_gb and mem_gb * 1024 > max(part.memory_mb):
        found.append(f"it asks for {mem_gb} GB a node (hydra.launcher.mem_gb={mem_gb}) and partition {part.name}'s "
                     f"nodes have at most {max(part.memory_mb) / 1024:.1f} GB")
    if part and gpus and gpus > max(part.gpus):
        found.append(f"it asks for {gpus} GPUs a node (hydra.launcher.gpus_per_node={gpus}) and partition "
                     f"{part.name}'s nodes have at most {max(part.gpus)}")
    if part and (request.get("nodes") or 1) > len(part.nodes):
        found.append(_nodes(request, part))
    if not found:
        asked = ", ".join(f"{key}={request.get(key)}" for key in ("cpus_per_task", "tasks_per_node", "mem_gb",
                                                                  "gpus_per_node", "nodes", "constraint"))
        found.append(f"no node of {_name(part)} has what it asks for (hydra.launcher.{asked})")
    return "; ".join(found) + "; ask for less, or choose another hydra.launcher.partition"


def _nodes(request: dict, part: Partition | None) -> str:
    has = f"{_name(part)} has {len(part.nodes)}" if part else f"{_name(part)} allows fewer"
    return f"it asks for {request.get('nodes') or 1} nodes (hydra.launcher.nodes) and {has}"


def _time(request: dict, part: Partition | None) -> str:
    limit = f" of {part.time_limit}" if part else ""
    return f"hydra.launcher.timeout_min={request.get('timeout_min')} is above {_name(part)}'s time limit{limit}: " \
           f"lower it, or choose another hydra.launcher.partition"


def _all_nodes_out(part: Partition | None) -> str | None:
    if not part:
        return None
    # sinfo's compact states: down, drain(ed), drng (draining), fail, failg (failing), futr (not yet
    # there), inval; a trailing * is a node that does not respond. The others (idle, mix, alloc, resv,
    # maint, powered down ~, ...) take jobs now or later.
    out = [node for node, state in part.nodes.items() if state.endswith("*")
           or state.rstrip("~#!%$@^-+") in ("down", "drain", "drng", "fail", "failg", "futr", "inval")]
    if len(out) < len(part.nodes):
        return None
    states = ", ".join(f"{node} {state}" for node, state in part.nodes.items())
    return f"every node of partition {part.name} is down or drained ({states}): " \
           f"choose another hydra.launcher.partition"


def _name(part: Partition | None) -> str:
    return f"partition {part.name}" if part else "the partition"


def _limit_key(code: str, request: dict) -> str:
    for word, key in (("WallDuration", "timeout_min"), ("Cpu", "cpus_per_task"), ("Mem", "mem_gb"),
                      ("GRES", "gpus_per_node"), ("Node", "nodes")):
        if word.lower() in code.replace("PerNode", "").lower():
            return f"change hydra.launcher.{key}={request.get(key)} (sacctmgr show qos lists the limits)"
    return "ask for less (sacctmgr show qos lists the limits)"


def _number(text: str) -> int:
    """sinfo's 2, 2+ (more on some nodes) or N/A."""
    digits = re.match(r"\d+", text)
    return int(digits.group()) if digits else 0


def _run(command: list[str]) -> list[str]:
    """The command's output lines; none if it fails (a job id squeue no longer knows, a slurmctld
    that is slow to answer): the caller looks again at its next turn."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return done.stdout.splitlines() if done.returncode == 0 else []
