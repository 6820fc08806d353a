#!/usr/bin/env bash
# A one-node Slurm cluster on localhost for tests: munged + slurmctld + slurmd, every file under DIR
# (config, state, spool, logs, munge key and socket, PID files); nothing in /etc is read or written.
#   tests/slurm/local_cluster.sh start DIR   writes DIR/slurm.conf, starts the daemons, waits for the node to be idle
#   tests/slurm/local_cluster.sh stop DIR    kills only the PIDs recorded under DIR/run and waits for them to exit
# Clients then need `export SLURM_CONF=DIR/slurm.conf`. Env: SLURM_CPUS (default: nproc), SLURMCTLD_PORT (6817),
# SLURMD_PORT (6818). Needs root (daemons run as root) and the Debian packages slurmctld slurmd slurm-client munge.
# The layout is the one verified in /work/shared/notes/toolchain.md section 5 (Slurm 22.05).
set -euo pipefail
usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
cmd=$1
mkdir -p "$2"
D=$(cd "$2" && pwd)

start() {
  for b in munged slurmctld slurmd sinfo; do
    command -v "$b" >/dev/null || { echo "local_cluster: '$b' not found (apt-get install slurmctld slurmd slurm-client munge)" >&2; exit 1; }
  done
  local cpus=${SLURM_CPUS:-$(nproc)}
  mkdir -p "$D"/{state,spool,log,munge,run,tmp}
  chmod 755 "$D" "$D/run"; chmod 700 "$D/munge"   # munged wants a world-executable socket dir and a private key dir
  cat > "$D/slurm.conf" <<CONF
ClusterName=moetest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$D/run/munge.socket
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=pmix
TmpFS=$D/tmp
MailProg=/bin/true
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus Sockets=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=16000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
  # PMIx client directories (spmix_appdir_<uid>_<job>.<step>) under this cluster, not /tmp: two clusters started by
  # concurrent tests both number their jobs from 1 and would collide on /tmp/spmix_appdir_0_1.0
  echo "PMIxCliTmpDirBase=$D/tmp" > "$D/mpi.conf"
  [ -f "$D/munge/munge.key" ] || { dd if=/dev/urandom of="$D/munge/munge.key" bs=1 count=1024 2>/dev/null; chmod 600 "$D/munge/munge.key"; }
  munged --socket="$D/run/munge.socket" --key-file="$D/munge/munge.key" --pid-file="$D/run/munged.pid" \
         --log-file="$D/log/munged.log" --seed-file="$D/munge/munged.seed"
  export SLURM_CONF="$D/slurm.conf"
  slurmctld -i          # -i: ignore any saved state
  slurmd -N localhost   # the node name from slurm.conf, not the hostname
  for _ in $(seq 1 100); do
    sinfo -h -o %T 2>/dev/null | grep -qx idle && { echo "local_cluster: up ($cpus CPUs), SLURM_CONF=$D/slurm.conf"; return 0; }
    sleep 0.1
  done
  echo "local_cluster: the node did not become idle; logs in $D/log" >&2
  tail -n 20 "$D"/log/*.log >&2 || true
  return 1
}

stop() {
  local pids="" p f alive
  for f in slurmd slurmctld munged; do
    p=$(cat "$D/run/$f.pid" 2>/dev/null) || continue
    kill "$p" 2>/dev/null && pids="$pids $p"
  done
  for _ in $(seq 1 100); do
    alive=""; for p in $pids; do [ -d "/proc/$p" ] && alive="$alive $p"; done
    [ -z "$alive" ] && return 0
    sleep 0.1
  done
  echo "local_cluster: still alive after 10 s:$alive" >&2
  return 1
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  *) usage ;;
esac
