#!/usr/bin/env bash
# Makes the evcxr Rust kernel available to Jupyter. Building evcxr_jupyter takes ~15-20 minutes
# on 2 cores, so an installed one is reused; the Python side (jupyter, nbconvert) lives in the
# reference venv.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${QLORA_REF_VENV:-$HOME/.cache/qlora/ref-venv}"
export PATH="$HOME/.cargo/bin:$venv/bin:$PATH"

"$here/../tests/reference/setup_venv.sh"

if ! command -v evcxr_jupyter >/dev/null 2>&1; then
  echo "building evcxr_jupyter (once; ~15-20 minutes on 2 cores)..."
  cargo install evcxr_jupyter --locked
fi
# Registers the kernel spec (idempotent) where the venv's jupyter finds it.
if ! jupyter kernelspec list 2>/dev/null | grep -q '^ *rust '; then
  evcxr_jupyter --install
fi
echo "evcxr kernel ready: $(command -v evcxr_jupyter)"
