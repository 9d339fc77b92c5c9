#!/usr/bin/env bash
# A real two-node SLURM cluster for the tests, on this one machine, from Debian's slurm-wlm and
# munge (run as root): slurmctld and two slurmd daemons, `slurmd -N n1` and `slurmd -N n2`.
#
#   tests/slurm/cluster.sh start   install the packages if missing, start munged, slurmctld and
#                                  both slurmd, return once a batch job has run on both nodes;
#                                  print the line `export SLURM_CONF=...` that points SLURM's
#                                  commands at it
#   tests/slurm/cluster.sh stop    cancel its jobs, stop the daemons by their process ids, take
#                                  back the /etc/hosts line that start added
#   tests/slurm/cluster.sh env     print that export line
#
# Everything lives under $KERAS_MNIST_SLURM_ROOT (default /var/lib/keras-mnist-test-slurm): its
# own slurm.conf and cgroup.conf (found through SLURM_CONF), state, logs, pid files and spool
# (one each per node), and its own munged with its own key and socket. Ports 16817 (slurmctld),
# 16818 and 16819 (n1's and n2's slurmd) instead of SLURM's 6817/6818. So a real SLURM or munge
# setup on the machine (/etc/slurm, /etc/munge, /run/munge) is neither read nor touched. Starting
# twice returns at once; starting after a crash clears the dead daemons' pid files and starts afresh.
#
# The node names must resolve: Lightning takes the first node of SLURM_NODELIST as the address
# where the processes of a multi-node DDP job meet (MASTER_ADDR). Where n1 and n2 resolve nowhere,
# start adds one line, `127.0.0.1 n1 n2 # ...cluster.sh...`, to /etc/hosts, and stop removes that
# line again; names that resolve to anything but this machine are refused.
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
MUNGED_PID=$MUNGE/munged.pid
NODES=(n1 n2)
HOSTS=/etc/hosts
HOSTS_LINE="127.0.0.1 ${NODES[*]} # keras-mnist tests/slurm/cluster.sh's test cluster; its stop removes this line"

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
  mkdir -p "$ETC" "$ROOT/run" "$ROOT/log" "$ROOT/state"
  local node
  for node in "${NODES[@]}"; do mkdir -p "$ROOT/spool/$node"; done
  # This machine's own CPUs and memory: a node that claims more than it has is drained.
  local hw cpus sockets cores threads memory
  hw=$(slurmd -C | head -1) || die "slurmd -C failed"
  field() { sed -n "s/.*\b$1=\([0-9]*\).*/\1/p" <<<"$hw"; }
  cpus=$(field CPUs); sockets=$(field SocketsPerBoard); cores=$(field CoresPerSocket)
  threads=$(field ThreadsPerCore); memory=$(field RealMemory)
  [ -n "$cpus" ] && [ -n "$memory" ] || die "could not read CPUs and RealMemory from: $hw"
  # What slurmd measures varies a little between starts; the two nodes share the machine's memory.
  # (They both claim its CPUs: SLURM does not know that they share them.)
  memory=$((memory * 9 / 10 / ${#NODES[@]}))
  cat >"$ETC/slurm.conf" <<EOF
# Written by tests/slurm/cluster.sh: a two-node test cluster on one machine.
ClusterName=keras-mnist-test
SlurmctldHost=localhost
SlurmctldPort=16817
AuthType=auth/munge
# cred_expire: a job step's credential lives 20 s (SLURM's default: 120), and a requeued job (a lost node)
# waits as long before it starts again.
AuthInfo=socket=$SOCKET,cred_expire=20
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$ROOT/state
# %n: the node's name, so that each slurmd has its own spool, pid file and log.
SlurmdSpoolDir=$ROOT/spool/%n
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$ROOT/run/slurmd-%n.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd-%n.log
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
# SIGTERM at a time limit, scancel or a lost node, then SIGKILL this many seconds later: time to save
# last.ckpt (a second or two here), and what a job whose node was lost waits for before it is requeued.
KillWait=10
SchedulerParameters=sched_interval=2
NodeName=n1 NodeHostname=localhost Port=16818 CPUs=$cpus Sockets=${sockets:-1} CoresPerSocket=${cores:-$cpus} ThreadsPerCore=${threads:-1} RealMemory=$memory State=UNKNOWN
NodeName=n2 NodeHostname=localhost Port=16819 CPUs=$cpus Sockets=${sockets:-1} CoresPerSocket=${cores:-$cpus} ThreadsPerCore=${threads:-1} RealMemory=$memory State=UNKNOWN
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

slurmd_pid() { echo "$ROOT/run/slurmd-$1.pid"; }
slurmds_alive() { local node; for node in "${NODES[@]}"; do alive "$(slurmd_pid "$node")" || return 1; done; }
# Every node idle, mixed or allocated (up), and as many as the cluster has.
nodes_ready() {
  local states
  states=$(sinfo -h -N -o %t 2>/dev/null) || return 1
  [ "$(grep -cE '^(idle|mix|alloc)$' <<<"$states")" = "${#NODES[@]}" ]
}

resolves_here() {  # resolves_here NAME: NAME's addresses are all this machine's (127.x or ::1)
  local addresses
  addresses=$(getent ahosts "$1" | awk '{print $1}' | sort -u) || return 1
  [ -n "$addresses" ] && ! grep -qvE '^(127\.|::1$)' <<<"$addresses"
}

add_host_names() {
  local node missing=0
  for node in "${NODES[@]}"; do
    if getent ahosts "$node" >/dev/null; then
      resolves_here "$node" || die "the node name $node resolves to another machine ($(getent ahosts "$node" | head -1)); the test cluster's nodes must resolve to this one"
    else
      missing=1
    fi
  done
  [ $missing = 0 ] && return
  grep -qxF "$HOSTS_LINE" "$HOSTS" || echo "$HOSTS_LINE" >>"$HOSTS" || die "could not add the node names to $HOSTS"
  for node in "${NODES[@]}"; do resolves_here "$node" || die "$node does not resolve to this machine even with $HOSTS's line"; done
  say "added to $HOSTS: $HOSTS_LINE"
}

remove_host_names() {
  grep -qxF "$HOSTS_LINE" "$HOSTS" 2>/dev/null || return 0
  local kept
  kept=$(grep -vxF "$HOSTS_LINE" "$HOSTS") || true
  # Written in place (not replaced by a new file): /etc/hosts may be a mount of its own.
  printf '%s\n' "$kept" >"$HOSTS" || die "could not remove the test cluster's line from $HOSTS"
  say "removed from $HOSTS: $HOSTS_LINE"
}

start() {
  [ "$(id -u)" = 0 ] || die "starting slurmctld and slurmd needs root"
  install_packages
  if alive "$CTLD_PID" && slurmds_alive && alive "$MUNGED_PID" && scontrol ping >/dev/null 2>&1 && nodes_ready; then
    say "already running (SLURM_CONF=$SLURM_CONF)"
    echo "export SLURM_CONF=$SLURM_CONF"
    return
  fi
  # A half-running cluster (a crash, a killed daemon): stop what is left, start afresh.
  stop_daemons
  write_config
  add_host_names
  start_munge
  # -c: a clean start, without the jobs a crashed controller left in its state files.
  slurmctld -c || die "slurmctld did not start (log: $ROOT/log/slurmctld.log)"
  wait_for 30 "slurmctld answering (scontrol ping)" sh -c "scontrol ping | grep -q UP"
  local node
  for node in "${NODES[@]}"; do
    slurmd -N "$node" || die "slurmd -N $node did not start (log: $ROOT/log/slurmd-$node.log)"
  done
  wait_for 60 "both nodes becoming idle (sinfo -N)" nodes_ready
  # The proof that it works: a batch job with a task on each node, within 60 s.
  local out=$ROOT/run/check.out
  rm -f "$out"
  timeout 60 sbatch --wait --quiet --time=1 --nodes=2 --ntasks-per-node=1 --output="$out" \
    --wrap 'srun bash -c "echo task \$SLURM_PROCID ran on \$SLURMD_NODENAME as job \$SLURM_JOB_ID"' \
    || die "a test batch job did not run (logs: $ROOT/log/)"
  [ "$(grep -cE '^task [01] ran on n[12] as job' "$out")" = 2 ] && grep -q "ran on n1" "$out" && grep -q "ran on n2" "$out" \
    || die "the test batch job did not run a task on each node: $(cat "$out")"
  say "running: $(sort "$out" | tr '\n' ';' | sed 's/;$//; s/;/; /g')"
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
  local node
  for node in "${NODES[@]}"; do stop_pid "$(slurmd_pid "$node")" "slurmd -N $node"; done
  stop_pid "$CTLD_PID" slurmctld
  stop_pid "$MUNGED_PID" munged
}

stop() {
  [ "$(id -u)" = 0 ] || die "stopping slurmctld and slurmd needs root"
  stop_daemons
  local node
  for node in "${NODES[@]}"; do
    ! alive "$(slurmd_pid "$node")" || die "slurmd -N $node is still running (pid file $(slurmd_pid "$node"))"
  done
  if alive "$CTLD_PID" || alive "$MUNGED_PID"; then
    die "a daemon is still running (pid files in $ROOT/run, $MUNGE)"
  fi
  remove_host_names
  say "stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  env) echo "export SLURM_CONF=$SLURM_CONF" ;;
  *) echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac
