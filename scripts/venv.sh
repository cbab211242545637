# Sourced by scripts/demo.sh and scripts/test.sh: makes .venv with the pinned dependencies, once.
# `SPECSWARM_EXTRAS` names the optional groups of pyproject.toml the caller needs on top of the runtime
# ones (demo: none; tests: "test"; benchmarks: "test,dev"). Installs again only when pyproject.toml or
# scripts/constraints.txt change, or when an extra is asked for that the venv does not have yet.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
"$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "specswarm needs Python >= 3.11 ($py is older; set PYTHON=...)" >&2; exit 1; }
want="${SPECSWARM_EXTRAS:-}"
stamp="$(cat "$root/pyproject.toml" "$root/scripts/constraints.txt" | sha256sum | cut -c1-16)"
have_stamp="$(sed -n 1p "$root/.venv/.specswarm-stamp" 2>/dev/null || true)"
have_extras="$(sed -n 2p "$root/.venv/.specswarm-stamp" 2>/dev/null || true)"
missing=""
for extra in ${want//,/ }; do
    case ",$have_extras," in *",$extra,"*) ;; *) missing="$missing $extra" ;; esac
done
if [ ! -x "$root/.venv/bin/python" ] || [ "$have_stamp" != "$stamp" ] || [ -n "$missing" ]; then
    [ "$have_stamp" = "$stamp" ] || have_extras=""  # pins changed: the old extras are re-installed too
    extras="$(echo "$have_extras,$want" | tr ',' '\n' | sed '/^$/d' | sort -u | paste -sd, -)"
    pip=("$root/.venv/bin/pip" install --disable-pip-version-check --progress-bar on -c "$root/scripts/constraints.txt")
    log="$root/.venv/setup.log"
    progress() {  # pip's "Collecting X" lines as one counter (redrawn in place on a terminal)
        awk -v tty="$([ -t 2 ] && echo 1)" '
            /^Collecting / { n++; if (tty) printf "\r\033[K  %d packages: %s", n, $2; fflush() }
            /^Successfully installed/ { if (tty && n) printf "\n"; printf "  installed %d packages\n", NF - 2; fflush() }'
    }
    install() {  # one line per package as progress; pip's whole output in $log, shown if it fails
        "${pip[@]}" "$@" > >(tee -a "$log" | progress >&2) 2>&1 \
            || { echo "pip failed; its output ($log):" >&2; tail -n 30 "$log" >&2; exit 1; }
    }
    t0=$SECONDS
    echo "setting up $root/.venv${extras:+ with extras [$extras]} (first run only; see README for timings)" >&2
    [ -x "$root/.venv/bin/python" ] || { echo "[1/3] creating the virtual environment" >&2; "$py" -m venv "$root/.venv"; }
    : > "$log"
    echo "[2/3] installing torch (the CPU build where no CUDA is wanted)" >&2
    install torch
    echo "[3/3] installing specswarm and its dependencies" >&2
    install -e "$root${extras:+[$extras]}"
    rm -f "$log"
    printf '%s\n%s\n' "$stamp" "$extras" > "$root/.venv/.specswarm-stamp"
    echo "set-up done in $((SECONDS - t0)) s" >&2
fi
export PATH="$root/.venv/bin:$PATH"
