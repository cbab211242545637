#!/usr/bin/env bash
# The test command: sets up .venv on first use, then runs the whole suite (extra args go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
exec python -m pytest "$@"
