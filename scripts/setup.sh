#!/usr/bin/env bash
# Prepares a fresh Debian/Ubuntu machine for jaxsurro: system OpenMPI (when
# missing), a virtual environment in .venv and the package with its test extras.
# Idempotent: a second run only checks. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${JAXSURRO_VENV:-.venv}

need_mpi=0
command -v mpicc >/dev/null 2>&1 || need_mpi=1
command -v mpirun >/dev/null 2>&1 || need_mpi=1
if [ "$need_mpi" = 1 ]; then
  mpi_cmd="apt-get update && apt-get install -y --no-install-recommends openmpi-bin libopenmpi-dev"
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing OpenMPI from the system packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends openmpi-bin libopenmpi-dev >/dev/null
  else
    echo "setup: OpenMPI (mpicc, mpirun) is missing and this user cannot install it." >&2
    echo "setup: run as root:  sudo sh -c '$mpi_cmd'   then run this command again." >&2
    exit 1
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating the virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.jaxsurro-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing jaxsurro and its dependencies into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # mpi4jax compiles against MPI; it looks for CUDA headers when nvcc is on the
  # PATH, so point it at the CUDA root (an empty one builds the CPU extension).
  CUDA_ROOT=${CUDA_ROOT:-/usr/local/cuda} "$VENV/bin/python" -m pip install -q -e '.[test]'
  touch "$stamp"
fi
