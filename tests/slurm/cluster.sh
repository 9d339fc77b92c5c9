#!/usr/bin/env bash
# A real one-node SLURM cluster for the tests, from Debian's slurm-wlm and munge (run as root).
#
#   tests/slurm/cluster.sh start   install the packages if missing, start munged, slurmctld and
#                                  slurmd, return once the node has run a batch job; print the
#                                  line `export SLURM_CONF=...` that points SLURM's commands at it
#   tests/slurm/cluster.sh stop    cancel its jobs, stop the daemons by their process ids
#   tests/slurm/cluster.sh env     print that export line
#
# Everything lives under $KERAS_MNIST_SLURM_ROOT (default /var/lib/keras-mnist-test-slurm): its
# own slurm.conf and cgroup.conf (found through SLURM_CONF), state, logs, pid files, and its own
# munged with its own key and socket. Ports 16817/16818 instead of SLURM's 6817/6818. So a real
# SLURM or munge setup on the machine (/etc/slurm, /etc/munge, /run/munge) is neither read nor
# touched. Starting twice returns at once; starting after a crash clears the dead daemons' pid
# files and starts afresh.
#
# Accounting: this cluster has no slurmdbd, so SLURM's sacct cannot answer. submitit polls job
# states with sacct only; tests/slurm/bin/sacct answers its query from squeue, which keeps
# finished jobs for MinJobAge seconds. The tests put tests/slurm/bin first on PATH.
set -euo pipefail

ROOT=${KERAS_MNIST_SLURM_ROOT:-/var/lib/keras-mnist-test-slurm}
ETC=$ROOT/etc
MUNGE=$ROOT/munge              # munge's own: key, log, pid, seed (0700, munge user)
SOCKET_DIR=$ROOT/munge-socket  # readable by everyone, as /run/munge is
SOCKET=$SOCKET_DIR/munge.socket
export SLURM_CONF=$ETC/slurm.conf
CTLD_PID=$ROOT/run/slurmctld.pid
SLURMD_PID=$ROOT/run/slurmd.pid
MUNGED_PID=$MUNGE/munged.pid

die() { echo "cluster.sh: error: $*" >&2; exit 1; }
say() { echo "cluster.sh: $*" >&2; }

alive() {  # alive PIDFILE: the process named in the file is running (a zombie is not)
  [ -s "$1" ] || return 1
  local state
  state=$(ps -o stat= -p "$(cat "$1")" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "${state#Z}" = "$state" ]
}

wait_for() {  # wait_for SECONDS WHAT COMMAND...: retry COMMAND every 0.5 s
  local seconds=$1 what=$2; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || die "$what did not happen within ${seconds}s (logs: $ROOT/log/)"
    sleep 0.5
  done
}

install_packages() {
  command -v slurmd >/dev/null && command -v slurmctld >/dev/null && command -v munged >/dev/null && return
  [ "$(id -u)" = 0 ] || die "slurm-wlm and munge are missing and installing them needs root"
  command -v apt-get >/dev/null || die "slurm-wlm and munge are missing and there is no apt-get to install them"
  say "installing slurm-wlm and munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || die "apt-get update failed"
  apt-get install -y -qq --no-install-recommends slurm-wlm munge || die "apt-get install slurm-wlm munge failed"
}

write_config() {
  mkdir -p "$ETC" "$ROOT/run" "$ROOT/log" "$ROOT/state" "$ROOT/spool"
  # This machine's own CPUs and memory: a node that claims more than it has is drained.
  local hw cpus sockets cores threads memory
  hw=$(slurmd -C | head -1) || die "slurmd -C failed"
  field() { sed -n "s/.*\b$1=\([0-9]*\).*/\1/p" <<<"$hw"; }
  cpus=$(field CPUs); sockets=$(field SocketsPerBoard); cores=$(field CoresPerSocket)
  threads=$(field ThreadsPerCore); memory=$(field RealMemory)
  [ -n "$cpus" ] && [ -n "$memory" ] || die "could not read CPUs and RealMemory from: $hw"
  memory=$((memory * 9 / 10))  # what slurmd measures varies a little between starts
  cat >"$ETC/slurm.conf" <<EOF
# Written by tests/slurm/cluster.sh: a one-node test cluster.
ClusterName=keras-mnist-test
SlurmctldHost=localhost
SlurmctldPort=16817
SlurmdPort=16818
AuthType=auth/munge
AuthInfo=socket=$SOCKET
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
# Finished jobs stay visible to squeue (and so to tests/slurm/bin/sacct) for an hour.
MinJobAge=3600
# SIGTERM at a time limit or scancel, then SIGKILL this many seconds later: time to save last.ckpt.
KillWait=30
SchedulerParameters=sched_interval=2
NodeName=localhost CPUs=$cpus Sockets=${sockets:-1} CoresPerSocket=${cores:-$cpus} ThreadsPerCore=${threads:-1} RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE DefMemPerCPU=2048 State=UP
EOF
  # slurmd 22.05 loads a cgroup plugin whatever the other settings; without systemd the
  # autodetected cgroup/v2 fails. (CgroupPlugin=disabled exists only from 24.05.)
  echo "CgroupPlugin=cgroup/v1" >"$ETC/cgroup.conf"
}

start_munge() {
  if alive "$MUNGED_PID" && munge -S "$SOCKET" -n | unmunge -S "$SOCKET" >/dev/null 2>&1; then
    return
  fi
  [ -s "$MUNGED_PID" ] && kill "$(cat "$MUNGED_PID")" 2>/dev/null || true
  install -d -o munge -g munge -m 0700 "$MUNGE"
  install -d -o munge -g munge -m 0755 "$SOCKET_DIR"
  rm -f "$MUNGED_PID" "$SOCKET" "$SOCKET.lock"
  if [ ! -s "$MUNGE/munge.key" ]; then
    runuser -u munge -- mungekey -c -k "$MUNGE/munge.key" || die "mungekey could not create $MUNGE/munge.key"
  fi
  runuser -u munge -- munged --socket="$SOCKET" --key-file="$MUNGE/munge.key" --pid-file="$MUNGED_PID" \
    --log-file="$MUNGE/munged.log" --seed-file="$MUNGE/munged.seed" \
    || die "munged did not start (log: $MUNGE/munged.log)"
  wait_for 10 "munge credentials (munge -n | unmunge)" sh -c "munge -S '$SOCKET' -n | unmunge -S '$SOCKET'"
}

node_state() { sinfo -h -N -o %t 2>/dev/null | head -1; }
node_ready() { case "$(node_state)" in idle|mix|alloc) return 0 ;; *) return 1 ;; esac; }

start() {
  [ "$(id -u)" = 0 ] || die "starting slurmctld and slurmd needs root"
  install_packages
  if alive "$CTLD_PID" && alive "$SLURMD_PID" && alive "$MUNGED_PID" && scontrol ping >/dev/null 2>&1 && node_ready; then
    say "already running (SLURM_CONF=$SLURM_CONF)"
    echo "export SLURM_CONF=$SLURM_CONF"
    return
  fi
  # A half-running cluster (a crash, a killed daemon): stop what is left, start afresh.
  stop_daemons
  write_config
  start_munge
  # -c: a clean start, without the jobs a crashed controller left in its state files.
  slurmctld -c || die "slurmctld did not start (log: $ROOT/log/slurmctld.log)"
  wait_for 30 "slurmctld answering (scontrol ping)" sh -c "scontrol ping | grep -q UP"
  slurmd || die "slurmd did not start (log: $ROOT/log/slurmd.log)"
  wait_for 60 "the node becoming idle (sinfo)" node_ready
  # The proof that it works: a batch job, run by slurmd, within 60 s.
  local out=$ROOT/run/check.out
  rm -f "$out"
  timeout 60 sbatch --wait --quiet --time=1 --output="$out" --wrap 'echo ran on $(hostname) as job $SLURM_JOB_ID' \
    || die "a test batch job did not run (logs: $ROOT/log/)"
  grep -q "as job" "$out" || die "the test batch job wrote nothing to $out"
  say "running: $(cat "$out")"
  echo "export SLURM_CONF=$SLURM_CONF"
}

stop_pid() {  # stop_pid PIDFILE NAME: TERM, wait up to 20 s, then KILL
  [ -s "$1" ] || return 0
  local pid; pid=$(cat "$1")
  if alive "$1"; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 40); do alive "$1" || break; sleep 0.5; done
    if alive "$1"; then
      say "$2 (pid $pid) did not stop on SIGTERM; killing it"
      kill -9 "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$1"
}

stop_daemons() {
  if [ -f "$SLURM_CONF" ] && alive "$CTLD_PID"; then
    # This cluster's jobs only: SLURM_CONF points scancel at it.
    scancel --full --quiet --state=PENDING,RUNNING,SUSPENDED $(squeue -h -o %i 2>/dev/null) 2>/dev/null || true
    for _ in $(seq 40); do [ -z "$(squeue -h -t RUNNING,COMPLETING -o %i 2>/dev/null)" ] && break; sleep 0.5; done
  fi
  stop_pid "$SLURMD_PID" slurmd
  stop_pid "$CTLD_PID" slurmctld
  stop_pid "$MUNGED_PID" munged
}

stop() {
  [ "$(id -u)" = 0 ] || die "stopping slurmctld and slurmd needs root"
  stop_daemons
  if alive "$CTLD_PID" || alive "$SLURMD_PID" || alive "$MUNGED_PID"; then
    die "a daemon is still running (pid files in $ROOT/run, $MUNGE)"
  fi
  say "stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  env) echo "export SLURM_CONF=$SLURM_CONF" ;;
  *) echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac
