#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for trying `hydra/launcher=slurm` and for the `slurm` tests.
#
#   scripts/slurm_local.sh start         # install slurmctld, slurmd, slurm-client, munge if missing; configure; start
#   scripts/slurm_local.sh status        # "running: node <host> idle" or "stopped"
#   scripts/slurm_local.sh stop          # stop the daemons this script started (by their pid files)
#
# start and stop need root (sudo where you are not root). One node with this machine's CPUs and memory,
# one partition `debug`, no accounting, processes tracked by /proc (no cgroups). The daemons run as root and
# keep their state, logs and pid files under $SLURM_LOCAL_DIR (default /var/lib/structlearn-slurm).
# Idempotent: `start` on a running cluster and `stop` on a stopped one say so and exit 0. Exit 2 with one
# line when it cannot run (not root, packages unreachable).
set -euo pipefail

DIR="${SLURM_LOCAL_DIR:-/var/lib/structlearn-slurm}"
CONF=/etc/slurm/slurm.conf
PACKAGES=(slurmctld slurmd slurm-client munge)
HOST="$(hostname -s)"

say() { echo "slurm_local: $*"; }
die() { echo "slurm_local: error: $*" >&2; exit 2; }

running() { [[ -f "$DIR/slurmctld.pid" ]] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; }

node_state() { sinfo -h -n "$HOST" -o %t 2>/dev/null | head -n 1; }

install() {
  local missing=()
  for p in "${PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [[ ${#missing[@]} -eq 0 ]] && return
  command -v apt-get >/dev/null || die "packages ${missing[*]} are missing and there is no apt-get to install them"
  say "installing ${missing[*]}"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >"$DIR/apt.log" 2>&1 \
    || die "could not install ${missing[*]} (no package registry reachable?); see $DIR/apt.log"
}

configure() {
  local cpus mem
  cpus="$(nproc)"
  mem="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"  # MB; leave some to the machine
  mkdir -p /etc/slurm "$DIR/state" "$DIR/spool" "$DIR/log"
  cat >"$CONF" <<EOF
# Written by structlearn's scripts/slurm_local.sh: a one-node cluster for local tests.
ClusterName=structlearn-local
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job may start again 10 s after its requeue (SLURM's default: 120 s)
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
# schedule every few seconds (a requeued job starts soon after it may)
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
MinJobAge=60
KillWait=5
NodeName=$HOST CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  if pgrep -x munged >/dev/null; then return; fi
  [[ -f /etc/munge/munge.key ]] || { mungekey --create >/dev/null 2>&1 || create-munge-key -f >/dev/null; }
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge && chown munge:munge /run/munge
  runuser -u munge -- /usr/sbin/munged
}

start() {
  [[ $EUID -eq 0 ]] || die "start needs root (it installs packages and starts daemons): run it as root, e.g. sudo $0 start"
  if running; then say "already running: node $HOST $(node_state)"; return; fi
  mkdir -p "$DIR"
  install
  configure
  start_munge
  /usr/sbin/slurmctld
  /usr/sbin/slurmd
  for _ in $(seq 60); do
    case "$(node_state)" in
      idle*) say "running: node $HOST idle, partition debug ($(nproc) CPUs)"; return ;;
      down* | drain*) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 1
  done
  die "the node did not become idle within 60 s (state: $(node_state)); see $DIR/log/"
}

stop() {
  [[ $EUID -eq 0 ]] || die "stop needs root: run it as root, e.g. sudo $0 stop"
  local stopped=0
  for daemon in slurmd slurmctld; do
    local pidfile="$DIR/$daemon.pid" pid=""
    [[ -f "$pidfile" ]] && pid="$(cat "$pidfile")"
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
      kill "$pid" && stopped=1
      for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    fi
    rm -f "$pidfile"
  done
  if [[ $stopped -eq 1 ]]; then say "stopped"; else say "not running"; fi
}

status() {
  if running; then say "running: node $HOST $(node_state)"; else say "stopped"; fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) die "usage: $0 start | stop | status" ;;
esac
