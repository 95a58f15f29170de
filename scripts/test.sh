#!/usr/bin/env bash
# The test command: sets up the environment (see setup.sh), then runs the test suite.
# Usage: bash scripts/test.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# A real single-node Slurm for the scheduler tests (as root; otherwise it prints the commands to run).
bash scripts/setup_slurm.sh
# A real single-node OAR for the OAR tests (as root; otherwise it says why, and those tests say so and skip).
bash scripts/setup_oar.sh
# Style: the formatter and the linter configured in pyproject.toml ([tool.ruff]).
.venv/bin/ruff format --check --quiet . || { echo "test: run .venv/bin/ruff format . to format the code" >&2; exit 1; }
.venv/bin/ruff check --quiet . || { echo "test: fix the lint findings above (.venv/bin/ruff check .)" >&2; exit 1; }
exec .venv/bin/python -m pytest -ra "$@"
