#!/usr/bin/env bash
# ONE command on a machine with an NVIDIA GPU: exactness (CUDA vs CPU), a swarm of CUDA peers with a CUDA
# client (plain, speculative, a failover; identical to --local) and the engine's ms per step beside the
# memory floor (bf16, int8). Uses the project's venv when there is one, else python3. On a machine with no
# network, the packages it lacks travel as .gpu/site.tar.xz (made here by `bash scripts/gpu_wheels.sh`).
# Extra arguments go to scripts/gpu_check.py (e.g. --json report.json).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
if [ -f .gpu/site.tar.xz ]; then
    mkdir -p /tmp/specswarm-gpu-site
    tar xJf .gpu/site.tar.xz -C /tmp/specswarm-gpu-site
    export PYTHONPATH="/tmp/specswarm-gpu-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec "$PY" scripts/gpu_check.py "$@"
