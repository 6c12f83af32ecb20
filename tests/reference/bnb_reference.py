#!/usr/bin/env python3
"""Reference data for tests/bnb_checkpoint.rs: transformers + bitsandbytes 4-bit checkpoints.

    bnb_reference.py OUT_DIR [TINY_DIR]
        TINY_DIR (default: OUT_DIR/..) holds make_tiny_models.py's f32/bf16 checkpoints.
        For each variant V below, loads TINY_DIR/<source> with
        `from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True, ...))`
        on CPU, `save_pretrained`s it to OUT_DIR/V/ and writes OUT_DIR/V/reference.safetensors:
          input_ids  int64 [2,7] (make_tiny_models.INPUT_IDS)
          logits     float32 [2,7,vocab] from the saved folder re-loaded by transformers with
                     dtype=torch.float32 (bitsandbytes' portable dequantise-then-matmul path)
        OUT_DIR/means.safetensors: x<n> and torch's x.mean() for the sizes in MEAN_SIZES.
        OUT_DIR/index.json is written last: its presence means the run completed.

    bnb_reference.py --check DIR OUT.safetensors
        Loads a 4-bit folder written by the Rust side with transformers + bitsandbytes, checks
        that every decoder-block linear became a bnb Linear4bit (and lm_head did not), and
        writes the logits for INPUT_IDS to OUT.safetensors (keys input_ids, logits). Prints a
        one-line summary.

Everything is deterministic: quantisation has no randomness, the sources are seeded.
"""

import json
import os
import platform
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the hub is unreachable; fail fast

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import bitsandbytes as bnb

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tiny_models import INPUT_IDS  # noqa: E402  (same fixed ids as the tiny references)

BLOCK_LINEARS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)

# name -> (source variant, quant type, double quant, load dtype or None for the checkpoint's,
#          description)
VARIANTS = {
    "llama-nf4": ("llama", "nf4", True, None, "the QLoRA recipe: nf4 + double quant, f32 source"),
    "qwen2-nf4": ("qwen2", "nf4", True, None, "nf4 + double quant; q/k/v biases stay dense"),
    "llama-tied-nf4": ("llama-tied", "nf4", True, None,
                       "tied embeddings: lm_head (= embed_tokens) is not quantised or saved"),
    "llama-fp4": ("llama", "fp4", False, None, "fp4, plain f32 absmax (transformers' defaults)"),
    "llama-bf16-nf4": ("llama-bf16", "nf4", True, None,
                       "bf16 checkpoint: quant_state dtype bfloat16, dense tensors bf16"),
}


MEAN_SIZES = [1, 5, 8, 31, 64, 100, 513, 1000, 4096, 5184, 13824, 32768]


def bnb_config(quant_type, double_quant):
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    )


def check_quantised_layout(model, where):
    """Block linears are Linear4bit, the output head is a plain Linear (transformers'
    get_keys_to_not_convert keeps the output embeddings in full precision)."""
    for i, layer in enumerate(model.model.layers):
        for name in BLOCK_LINEARS:
            mod = layer.get_submodule(name)
            assert isinstance(mod, bnb.nn.Linear4bit), f"{where}: layer {i} {name} is {type(mod)}"
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit), f"{where}: lm_head was quantised"


def portable_path(model):
    """Switch off bitsandbytes' AVX512-BF16 CPU inference path. On CPUs that have it, the first
    eval forward of a Linear4bit repacks the weight and rounds its absmax to bf16 (and a later
    save_pretrained writes a re-quantised state), so logits would depend on the machine. With it
    off, bnb dequantises exactly (as on a GPU) and multiplies in the compute dtype."""
    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            mod.support_avx512bf16_for_cpu = False
    return model


@torch.no_grad()
def logits_of(model):
    model.eval()
    portable_path(model)
    return model(INPUT_IDS).logits.float().contiguous()


def make(out_dir: Path, tiny_dir: Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    index = out_dir / "index.json"
    index.unlink(missing_ok=True)
    meta = {
        "generator": "tests/reference/bnb_reference.py",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "bitsandbytes": bnb.__version__,
        },
        "compute_dtype": "float32",
        "variants": {},
    }
    for name, (source, qt, dq, dtype, desc) in VARIANTS.items():
        src = tiny_dir / source
        if not (src / "config.json").is_file():
            sys.exit(f"bnb_reference: {src} is missing; run make_tiny_models.py first")
        path = out_dir / name
        if path.exists():
            shutil.rmtree(path)
        kwargs = {"dtype": dtype} if dtype is not None else {}
        model = AutoModelForCausalLM.from_pretrained(
            src, quantization_config=bnb_config(qt, dq), **kwargs)
        check_quantised_layout(model, name)
        in_memory = logits_of(model)
        model.save_pretrained(path)

        # The reference is what a user gets from the saved folder loaded in f32 (what the Rust
        # f32 path must match; a bf16 quant_state still dequantises through bf16). From an f32
        # source that must be exactly what the in-memory quantised model computed.
        reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        check_quantised_layout(reloaded, f"{name} (reloaded)")
        logits = logits_of(reloaded)
        if model.dtype == torch.float32:
            assert torch.equal(logits, in_memory), f"{name}: reloaded logits differ"
        save_file({"input_ids": INPUT_IDS.clone(), "logits": logits},
                  str(path / "reference.safetensors"), metadata={"format": "pt"})

        q = model.model.layers[0].self_attn.q_proj.weight.quant_state
        files = sorted(p.name for p in path.iterdir())
        meta["variants"][name] = {
            "source": source,
            "description": desc,
            "quant_type": qt,
            "double_quant": dq,
            "quant_state_dtype": str(q.dtype).removeprefix("torch."),
            "files": files,
        }
        print(f"{name:16s} from {source:11s} {qt} dq={dq} state dtype {q.dtype} files={files}")
    # torch's f32 mean (the double-quant offset) at sizes that reach every level of its cascade
    # sum; below 32768 values it runs on one thread, so the order is fixed.
    g = torch.Generator().manual_seed(7)
    means = {}
    for n in MEAN_SIZES:
        x = torch.rand(n, generator=g) * 0.5 + 0.01
        means[f"x{n}"] = x
        means[f"mean{n}"] = x.mean().reshape(1)
    save_file(means, str(out_dir / "means.safetensors"))
    meta["means"] = {"sizes": MEAN_SIZES, "what": "x<n> f32 [n], mean<n> = x.mean() f32 [1]"}
    index.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {index}")


def check(folder: Path, out_file: Path):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    check_quantised_layout(model, str(folder))
    q = model.model.layers[0].self_attn.q_proj.weight.quant_state
    logits = logits_of(model)
    save_file({"input_ids": INPUT_IDS.clone(), "logits": logits}, str(out_file),
              metadata={"format": "pt"})
    print(f"loaded {folder}: {type(model).__name__}, layer 0 q_proj {q.quant_type} "
          f"blocksize {q.blocksize} nested {q.nested} dtype {q.dtype}; logits {tuple(logits.shape)} "
          f"written to {out_file}")


def main():
    args = sys.argv[1:]
    if len(args) == 3 and args[0] == "--check":
        check(Path(args[1]), Path(args[2]))
    elif len(args) in (1, 2) and not args[0].startswith("-"):
        out_dir = Path(args[0])
        tiny_dir = Path(args[1]) if len(args) == 2 else out_dir.resolve().parent
        make(out_dir, tiny_dir)
    else:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR [TINY_DIR] | --check DIR OUT.safetensors")


if __name__ == "__main__":
    main()
