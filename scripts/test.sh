#!/usr/bin/env bash
# The test command: sets up .venv with the test extras on first use, installs the Debian tools the tests
# drive (tmux, for the scripted terminal session of the demo) when missing and run as root, then runs the
# whole suite (extra args go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v tmux >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing tmux (for the demo's terminal test)" >&2
    (apt-get install -y -qq tmux >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq tmux; }) >&2
fi
export SPECSWARM_EXTRAS="${SPECSWARM_EXTRAS:-test}"
source scripts/venv.sh
exec python -m pytest "$@"
