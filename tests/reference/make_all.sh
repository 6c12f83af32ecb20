#!/usr/bin/env bash
# Produce all reference data for the Rust parity tests:
#   make_all.sh OUT_DIR GGUF_PATH
# OUT_DIR/<variant>/ + OUT_DIR/manifest.json   tiny random checkpoints (make_tiny_models.py)
# OUT_DIR/{tokens,chat,greedy,meta,tokenizer}.json   GGUF references (gguf_reference.py)
# OUT_DIR/nf4/   bitsandbytes 4-bit and int8 references (nf4_reference.py)
# OUT_DIR/peft/  PEFT LoRA adapters, logits and counts over the tiny models (peft_reference.py)
# OUT_DIR/bnb/   transformers + bitsandbytes 4-bit checkpoints of the tiny models (bnb_reference.py)
# OUT_DIR/train/ AdamW, lr schedules, clip_grad_norm_ and ForCausalLMLoss (train_reference.py)
# OUT_DIR/data/  SFT datasets with TRL's input ids and completion masks (data_reference.py)
# OUT_DIR/grad/  LoRA adapters with nonzero B, one batch's loss and torch autograd dL/dA, dL/dB (grad_reference.py)
# OUT_DIR/dspy/  DSPy ChatAdapter messages, parses, random draws and optimiser demos (dspy_reference.py)
# A generator is skipped when its last-written output is newer than the generator and
# requirements.txt (and, for the GGUF, when it was made from the same GGUF file), so a
# re-run costs only the venv check.
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 OUT_DIR GGUF_PATH" >&2
    exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="$1"
gguf="$2"
venv="${QLORA_REF_VENV:-$HOME/.cache/qlora/ref-venv}"
py="$venv/bin/python"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ ! -f "$gguf" ]; then
    echo "make_all: GGUF not found: $gguf" >&2
    exit 1
fi
"$here/setup_venv.sh"
mkdir -p "$out"

# fresh OUTPUT INPUT...: true when OUTPUT exists and is newer than every INPUT.
fresh() {
    local output="$1"; shift
    [ -f "$output" ] || return 1
    for input in "$@"; do
        [ "$output" -nt "$input" ] || return 1
    done
}

# run NAME FINAL_OUTPUT CMD...: the final output is deleted first, so an interrupted run is
# never mistaken for a complete one.
run() {
    local name="$1" final="$2"; shift 2
    local start=$SECONDS
    rm -f "$final"
    echo "make_all: running $name" >&2
    "$@"
    [ -f "$final" ] || { echo "make_all: $name did not write $final" >&2; exit 1; }
    echo "make_all: $name took $((SECONDS - start))s" >&2
}

tiny="$here/make_tiny_models.py"
if fresh "$out/manifest.json" "$tiny" "$here/requirements.txt"; then
    echo "make_all: tiny models up to date" >&2
else
    run make_tiny_models.py "$out/manifest.json" "$py" "$tiny" "$out"
fi

ref="$here/gguf_reference.py"
gguf_abs="$(cd "$(dirname "$gguf")" && pwd)/$(basename "$gguf")"
source_stamp="$out/.gguf-source"
if fresh "$out/meta.json" "$ref" "$here/requirements.txt" "$gguf_abs" \
        && [ "$(cat "$source_stamp" 2>/dev/null)" = "$gguf_abs" ]; then
    echo "make_all: GGUF references up to date" >&2
else
    run gguf_reference.py "$out/meta.json" "$py" "$ref" "$gguf_abs" "$out"
    echo "$gguf_abs" > "$source_stamp"
fi
nf4="$here/nf4_reference.py"
if fresh "$out/nf4/index.json" "$nf4" "$here/requirements.txt"; then
    echo "make_all: bitsandbytes references up to date" >&2
else
    run nf4_reference.py "$out/nf4/index.json" "$py" "$nf4" "$out/nf4"
fi
bnbref="$here/bnb_reference.py"
# Made from the tiny checkpoints, so it is stale whenever they are remade.
if fresh "$out/bnb/index.json" "$bnbref" "$tiny" "$here/requirements.txt" "$out/manifest.json"; then
    echo "make_all: bitsandbytes 4-bit checkpoints up to date" >&2
else
    run bnb_reference.py "$out/bnb/index.json" "$py" "$bnbref" "$out/bnb" "$out"
fi
peft_ref="$here/peft_reference.py"
if fresh "$out/peft/index.json" "$peft_ref" "$here/requirements.txt" "$out/manifest.json"; then
    echo "make_all: PEFT references up to date" >&2
else
    run peft_reference.py "$out/peft/index.json" "$py" "$peft_ref" "$out/peft" "$out"
fi
train_ref="$here/train_reference.py"
if fresh "$out/train/index.json" "$train_ref" "$here/requirements.txt"; then
    echo "make_all: training references up to date" >&2
else
    run train_reference.py "$out/train/index.json" "$py" "$train_ref" "$out/train"
fi
data_ref="$here/data_reference.py"
if fresh "$out/data/index.json" "$data_ref" "$here/requirements.txt" "$gguf_abs"; then echo "make_all: data references up to date" >&2; else run data_reference.py "$out/data/index.json" "$py" "$data_ref" "$gguf_abs" "$out/data"; fi
grad_ref="$here/grad_reference.py"; if fresh "$out/grad/index.json" "$grad_ref" "$here/requirements.txt" "$out/manifest.json"; then echo "make_all: LoRA gradient references up to date" >&2; else run grad_reference.py "$out/grad/index.json" "$py" "$grad_ref" "$out/grad" "$out"; fi
dspy_ref="$here/dspy_reference.py"; if fresh "$out/dspy/index.json" "$dspy_ref" "$here/requirements.txt"; then echo "make_all: DSPy references up to date" >&2; else run dspy_reference.py "$out/dspy/index.json" "$py" "$dspy_ref" "$out/dspy"; fi
echo "make_all: reference data in $out" >&2
