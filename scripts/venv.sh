# Sourced by scripts/test.sh and scripts/demo.sh: makes .venv with the pinned dependencies, once.
# Re-installs only when pyproject.toml or scripts/constraints.txt change.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
"$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "specswarm needs Python >= 3.11 ($py is older; set PYTHON=...)" >&2; exit 1; }
stamp="$(cat "$root/pyproject.toml" "$root/scripts/constraints.txt" | sha256sum | cut -c1-16)"
if [ ! -x "$root/.venv/bin/python" ] || [ "$(cat "$root/.venv/.specswarm-stamp" 2>/dev/null)" != "$stamp" ]; then
    echo "setting up $root/.venv (first run only; about a minute)" >&2
    "$py" -m venv "$root/.venv"
    "$root/.venv/bin/pip" install -q --disable-pip-version-check -c "$root/scripts/constraints.txt" torch
    "$root/.venv/bin/pip" install -q --disable-pip-version-check -c "$root/scripts/constraints.txt" -e "$root[test,dev]"
    echo "$stamp" > "$root/.venv/.specswarm-stamp"
fi
export PATH="$root/.venv/bin:$PATH"
