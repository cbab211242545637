#!/usr/bin/env bash
# The main job: sets up .venv on first use, then starts a local swarm of three peers on the bundled
# model and chats through it (interactive on a terminal; otherwise answers the prompts piped in, one a
# line, or a built-in one, and exits).
# Extra arguments go to `swarm demo` (e.g. --prompt "def quicksort(xs):" --max-new-tokens 64).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
exec swarm demo "$@"
