# Sourced by the bench-*.sh scripts: the model, the reference venv's python, the output folder
# and a release build of one example.
#   bench_setup OUT_DIR EXAMPLE   sets MODEL, PY, THREADS, bin; creates OUT_DIR

bench_setup() {
  local out="$1" example="$2"
  REF_VENV="${REF_VENV:-${QLORA_REF_VENV:-$HOME/.cache/qlora/ref-venv}}"
  THREADS="${THREADS:-$(nproc)}"
  MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
  PY="$REF_VENV/bin/python"
  [ -f "$MODEL" ] || ./scripts/fetch-model.sh models
  if [ ! -x "$PY" ]; then
    echo "error: no reference venv at $REF_VENV (run \`make reference\` once)" >&2
    exit 1
  fi
  mkdir -p "$out"
  echo "== building the release example $example" >&2
  cargo build --release --example "$example" >&2
  bin="${CARGO_TARGET_DIR:-target}/release/examples/$example"
  echo "== $(date -u +%FT%TZ)  threads: $THREADS  load: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
}
