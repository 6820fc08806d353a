#!/usr/bin/env bash
# Installs every Debian package the project needs (idempotent: skips apt when all are present), then the
# project-local Python environment of the test clients (.venv, see below).
# Usage: deploy/setup.sh [--with-slurm] [--no-torch]
set -euo pipefail
PKGS=(build-essential cmake ninja-build pkgconf git
      libopenmpi-dev openmpi-bin libboost-dev libboost-system-dev
      libprotobuf-dev protobuf-compiler libhdf5-dev libopenblas-dev libopenblas-openmp-dev
      libsentencepiece-dev sentencepiece libgtest-dev libgmock-dev libssl-dev curl chromium)
WITH_TORCH=1
for a in "$@"; do
  case "$a" in
    --with-slurm) PKGS+=(slurmctld slurmd slurm-client munge) ;;
    --no-torch) WITH_TORCH=0 ;;
    *) echo "setup.sh: unknown option '$a' (known: --with-slurm --no-torch)" >&2; exit 2 ;;
  esac
done
# The PyTorch oracle for tests and benchmarks (Debian's torch works with /usr/bin/python3 only).
[ "$WITH_TORCH" = 1 ] && PKGS+=(python3 python3-torch python3-h5py python3-numpy python3-venv)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup.sh: all ${#PKGS[@]} packages already installed"
else
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  echo "setup.sh: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
[ "$WITH_TORCH" = 1 ] || exit 0
# The test clients from PyPI, pinned, in a project-local virtual environment (.venv, git-ignored) that still sees
# Debian's torch, h5py and numpy (--system-site-packages; the pyenv python3 on PATH has no torch: use /usr/bin).
# Downloads about 45 MB of wheels (these and their dependencies) on the first run; nothing when
# up to date. transformers 4.38 works with Debian's torch 1.13 (newer releases need torch 2); openai 1.30 needs
# httpx < 0.28 (0.28 removed the `proxies` argument it passes); schemathesis 3.27 needs click < 8.2 (LazyFile) and a
# hypothesis of its time (6.100).
VENV_PKGS=(tensorboard==2.15.1 transformers==4.38.2 safetensors==0.4.2 sentencepiece==0.1.99 openai==1.30.1
           prometheus_client==0.20.0 schemathesis==3.27.1 httpx==0.27.2 click==8.1.7 hypothesis==6.100.1)
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || /usr/bin/python3 -m venv --system-site-packages .venv
frozen=$(.venv/bin/python -m pip freeze 2>/dev/null || true)
stale=0
for p in "${VENV_PKGS[@]}"; do grep -qxF "$p" <<<"$frozen" || stale=1; done
if [ $stale -eq 0 ]; then
  echo "setup.sh: .venv up to date (${VENV_PKGS[*]})"
else
  echo "setup.sh: installing ${VENV_PKGS[*]} into .venv"
  .venv/bin/python -m pip install -q --disable-pip-version-check "${VENV_PKGS[@]}"
fi
