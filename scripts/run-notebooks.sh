#!/usr/bin/env bash
# Executes every notebook in notebooks/ with the real evcxr Rust kernel; any error cell fails.
# Executed copies go to target/notebooks/ so the stored notebooks stay output-free.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${QLORA_REF_VENV:-$HOME/.cache/qlora/ref-venv}"
export PATH="$HOME/.cargo/bin:$venv/bin:$PATH"

# evcxr reads init.evcxr from its config dir at start: a build cache keeps compiled dependencies
# between notebooks and runs, so only the first notebook pays for compiling candle & co.
export EVCXR_CONFIG_DIR="${EVCXR_CONFIG_DIR:-$HOME/.cache/qlora/evcxr-config}"
mkdir -p "$EVCXR_CONFIG_DIR"
echo ":cache 6000" > "$EVCXR_CONFIG_DIR/init.evcxr"

"$venv/bin/python" scripts/run_notebooks.py target/notebooks notebooks/*.ipynb
