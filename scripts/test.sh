#!/usr/bin/env bash
# The test command: sets up .venv with the test extras on first use, installs the Debian tools the tests
# drive when missing and run as root (tmux: the demo's scripted terminal session; iptables and iproute2:
# the NAT lab's routers in network namespaces; coturn: the lab's TURN server; chromium: the web page's browser test,
# driven headless over the DevTools protocol), then runs the whole suite (extra args go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v tmux >/dev/null || missing+=(tmux)
command -v iptables >/dev/null || missing+=(iptables)
command -v ip >/dev/null || missing+=(iproute2)
command -v turnserver >/dev/null || missing+=(coturn)
command -v chromium >/dev/null || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing ${missing[*]} (tools the tests drive)" >&2
    (apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 ||
        { apt-get update -qq && apt-get install -y -qq "${missing[@]}"; }) >&2 || echo "could not install ${missing[*]}" >&2
fi
export SPECSWARM_EXTRAS="${SPECSWARM_EXTRAS:-test}"
source scripts/venv.sh
exec python -m pytest "$@"
