#!/usr/bin/env bash
# The README's test command: set up .venv (see launch/setup_env.sh), then run the test suite.
# Extra arguments go to pytest, e.g. `bash launch/test.sh -k config -x`. The 30 slowest tests are listed at
# the end, so a CI log shows where the 20-minute budget goes.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export WANDB_MODE="${WANDB_MODE:-disabled}"
exec python -m pytest -q --durations=30 "$@"
