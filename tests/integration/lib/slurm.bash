# Shared set-up of the Slurm tests (sourced; ctest registers only tests/integration/*.sh): a real one-node Slurm
# cluster (tests/slurm/local_cluster.sh) on free ports under a scratch directory, its jobs and daemons stopped on exit,
# and fail(), which prints the jobs' output and the controller's log. Needs root and the Debian Slurm packages:
# installs them with apt-get when missing and SKIPs (exit 0) only when apt-get cannot install them.
: "${MOE_BIN:?run through ctest}" "${MOE_SOURCE_DIR:?}" "${MOE_DATA_DIR:?}"
t0=$(date +%s)
need=(munged slurmctld slurmd srun sbatch squeue scontrol scancel sinfo)
missing() { for b in "${need[@]}"; do command -v "$b" >/dev/null || return 0; done; return 1; }
if missing; then
  if [ "$(id -u)" -ne 0 ]; then echo "SKIP: Slurm is not installed and installing it needs root"; exit 0; fi
  echo "installing slurmctld slurmd slurm-client munge"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge \
       >/tmp/slurm_apt.$$.log 2>&1; then
    tail -5 /tmp/slurm_apt.$$.log; rm -f /tmp/slurm_apt.$$.log
    echo "SKIP: apt-get could not install the Slurm packages (see above)"; exit 0
  fi
  rm -f /tmp/slurm_apt.$$.log
  missing && { echo "FAIL: Slurm installed but ${need[*]} not all on PATH"; exit 1; }
fi
[ "$(id -u)" -eq 0 ] || { echo "SKIP: the local Slurm daemons run as root"; exit 0; }

work=$(mktemp -d)
chmod 755 "$work"   # munged needs a world-executable path to its socket
cluster="$work/slurm"
# the jobs' scratch (Open MPI's session directory, its shared-memory segments) under this test, not /tmp and
# /dev/shm: two tests running at once have clusters that both number their jobs (and PMIx namespaces) from 1, so
# their ranks would open each other's vader_segment.<host>.<job>.<rank> files; sbatch passes the environment on
mkdir -p "$work/tmp"
export TMPDIR="$work/tmp" OMPI_MCA_btl_vader_backing_directory="$work/tmp"
cleanup() {
  set +e
  if [ -f "$cluster/slurm.conf" ]; then
    export SLURM_CONF="$cluster/slurm.conf"
    scancel --user=root >/dev/null 2>&1   # only this cluster's jobs: SLURM_CONF points at it
    for _ in $(seq 1 50); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
    "$MOE_SOURCE_DIR/tests/slurm/local_cluster.sh" stop "$cluster"
  fi
  rm -rf "$work"
}
trap cleanup EXIT
fail() {
  echo "FAIL: $*"
  for f in "$work"/*.out "$work"/*.err; do [ -f "$f" ] && { echo "--- $f"; tail -n 30 "$f"; }; done
  [ -d "$cluster/log" ] && { echo "--- slurmctld.log"; tail -n 20 "$cluster/log/slurmctld.log"; }
  exit 1
}
# free ports for this cluster (another one may run on the default 6817/6818)
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
base=$(( 20000 + ($$ % 2000) * 4 ))
while ! { port_free "$base" && port_free $((base + 1)); }; do base=$((base + 4)); done
SLURMCTLD_PORT=$base SLURMD_PORT=$((base + 1)) "$MOE_SOURCE_DIR/tests/slurm/local_cluster.sh" start "$cluster"
export SLURM_CONF="$cluster/slurm.conf"

