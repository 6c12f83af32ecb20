#!/usr/bin/env bash
# Create/refresh the reference-data venv. Idempotent: pip runs only when requirements.txt
# changed since the last *successful* install (its sha256 is stamped inside the venv), so
# re-runs are instant and never touch the network.
#
#   QLORA_REF_VENV  venv location (default ~/.cache/qlora/ref-venv)
#   PYTHON          interpreter used to create it (default python3; 3.11 is what we test with)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
req="$here/requirements.txt"
venv="${QLORA_REF_VENV:-$HOME/.cache/qlora/ref-venv}"
python="${PYTHON:-python3}"
stamp="$venv/.qlora-requirements.sha256"

sha256() { "$python" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$1"; }

if ! command -v "$python" >/dev/null 2>&1; then
    echo "setup_venv: '$python' not found; install Python 3.11 or set PYTHON=..." >&2
    exit 1
fi

# A venv whose interpreter no longer runs (python upgraded/removed) is rebuilt from scratch.
if [ -d "$venv" ] && ! "$venv/bin/python" -c 'pass' >/dev/null 2>&1; then
    echo "setup_venv: $venv is broken, recreating it" >&2
    rm -rf "$venv"
fi

if [ ! -x "$venv/bin/python" ]; then
    echo "setup_venv: creating $venv with $("$python" --version 2>&1)" >&2
    mkdir -p "$(dirname "$venv")"
    if ! "$python" -m venv "$venv"; then
        echo "setup_venv: '$python -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)" >&2
        rm -rf "$venv"
        exit 1
    fi
fi

want="$(sha256 "$req")"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "setup_venv: $venv is up to date" >&2
    exit 0
fi

echo "setup_venv: installing $req into $venv (needs network access to PyPI)" >&2
if ! "$venv/bin/python" -m pip install --disable-pip-version-check -r "$req" >&2; then
    echo "setup_venv: ERROR: pip install failed (no network? no wheel for this platform?)." >&2
    echo "setup_venv: the venv is left as is; fix the cause and re-run." >&2
    exit 1
fi
echo "$want" > "$stamp"
echo "setup_venv: done" >&2
