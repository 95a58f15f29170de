#!/usr/bin/env bash
# The test command: sets up the environment (see setup.sh), then runs the test suite.
# Usage: bash scripts/test.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# A real single-node Slurm for the scheduler tests (as root; otherwise it prints the commands to run).
bash scripts/setup_slurm.sh
exec .venv/bin/python -m pytest -ra "$@"
