#!/usr/bin/env bash
# The main job: sets up .venv on first use, then generates code with the bundled model.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
exec swarm generate --local --prompt "${1:-def fibonacci(n):}" --max-new-tokens "${2:-48}"
