#!/usr/bin/env bash
# The run command: sets up the environment (see setup.sh), then runs an experiment.
# Usage: bash scripts/run.sh experiments/heat.toml [--set section.key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m jaxsurro.run "$@"
