#!/usr/bin/env python3
"""LoRA gradient references for the Rust parity test (tests/lora_grad_parity.rs).

Usage: grad_reference.py OUT_DIR TINY_DIR

TINY_DIR holds the tiny checkpoints written by make_tiny_models.py (llama, qwen2, ...).
For every case in CASES: a PEFT LoRA model over the tiny base (f32), every lora_B set to seeded
random nonzero values (B = 0 would give A no gradient), one batch (2 rows x 12 ids, labels = ids
with some -100 positions) through transformers' causal-LM loss (`model(input_ids, labels=...)`),
one `loss.backward()`:
  OUT_DIR/<case>/adapter/                 PEFT's save_pretrained output (the nonzero B included)
  OUT_DIR/<case>/reference.safetensors    input_ids int64 [2,12]; labels int64 [2,12]; loss f32 [];
                                          and every adapter matrix's gradient (f32) under the key
                                          it has in adapter_model.safetensors
                                          (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`)
  OUT_DIR/<case>/reference_f64.safetensors the same forward/backward in float64 (loss f64 [], grads
                                          f64): the f32 rounding noise floor, for diagnostics
  OUT_DIR/<case>/meta.json                base, LoRA config, scaling, loss, per-tensor torch f32 vs
                                          f64 relative differences
OUT_DIR/index.json                        cases + versions (written last: its presence means "complete")
"""

import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the hub is unreachable; fail fast instead of retrying

import peft
import safetensors
import torch
import transformers
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

SEED = 8765
B_STD = 0.1

# name -> (base variant in TINY_DIR, LoraConfig kwargs beyond the common ones, description)
CASES = {
    "llama-qv": ("llama", dict(r=4, target_modules=["q_proj", "v_proj"]),
                 "q,v, r=4, scaling alpha/r = 4"),
    "llama-all-rslora": ("llama", dict(r=8, target_modules="all-linear", use_rslora=True),
                         "all-linear, r=8, rslora: scaling alpha/sqrt(r) = 5.657"),
    "qwen2-qv": ("qwen2", dict(r=4, target_modules=["q_proj", "v_proj"]),
                 "Qwen2 (q/k/v biases in the base), q,v, r=4"),
    "qwen2-all": ("qwen2", dict(r=8, target_modules="all-linear"),
                  "Qwen2, all-linear, r=8, scaling 2"),
    "mistral-all": ("mistral", dict(r=4, target_modules="all-linear"),
                    "Mistral, all-linear, r=4"),
    "llama-tied-qv": ("llama-tied", dict(r=8, target_modules=["q_proj", "v_proj"]),
                      "tied embeddings, q,v, r=8"),
    "llama3-rope-all": ("llama3-rope", dict(r=4, target_modules="all-linear"),
                        "llama3 rope scaling, all-linear, r=4"),
    "llama-mts-head-norm": ("llama", dict(r=4, target_modules=["q_proj", "v_proj"],
                                          modules_to_save=["lm_head", "norm"]),
                            "q,v + modules_to_save lm_head and every norm"),
    "qwen2-mts-embed-k": ("qwen2", dict(r=4, target_modules=["q_proj", "v_proj"],
                                        modules_to_save=["embed_tokens", "k_proj"]),
                          "q,v + modules_to_save embeddings and k_proj (weight + bias)"),
}
COMMON_LORA = dict(task_type="CAUSAL_LM", lora_alpha=16, lora_dropout=0.0, bias="none")

# One fixed batch: 2 rows x 12 ids (no pad id 0), labels = ids with -100 on a "prompt" prefix of
# row 0 and a gap inside row 1.
INPUT_IDS = torch.tensor(
    [[1, 17, 42, 99, 128, 200, 255, 3, 64, 77, 150, 9],
     [1, 5, 250, 3, 77, 64, 31, 180, 12, 99, 240, 33]], dtype=torch.int64)
LABELS = INPUT_IDS.clone()
LABELS[0, :4] = -100
LABELS[1, 6:8] = -100


def versions():
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "safetensors": safetensors.__version__,
    }


def saved_key(name):
    """In-memory PEFT name -> the key save_pretrained writes (adapter name stripped; for a
    module trained in full, `.modules_to_save.default.` stripped)."""
    assert ".default." in name, name
    return name.replace(".modules_to_save.default.", ".").replace(".default.", ".")


def loss_and_grads(model):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=INPUT_IDS, labels=LABELS).loss
    loss.backward()
    grads = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, f"frozen {n} got a gradient"
            continue
        assert "lora_" in n or ".modules_to_save." in n, f"unexpected trainable parameter {n}"
        assert p.grad is not None, f"{n}: no gradient"
        grads[saved_key(n)] = p.grad.detach().clone().contiguous()
    return loss.detach(), grads


def run_case(name, base_name, lora_kwargs, description, tiny_dir: Path, out_dir: Path, index):
    case_dir = out_dir / name
    case_dir.mkdir(parents=True, exist_ok=True)
    seed = SEED + index
    base = AutoModelForCausalLM.from_pretrained(tiny_dir / base_name, dtype=torch.float32)

    torch.manual_seed(seed)  # PEFT's A init (kaiming uniform)
    config = LoraConfig(**COMMON_LORA, **lora_kwargs)
    model = get_peft_model(base, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(B_STD * torch.randn(p.shape, generator=g))
            elif ".modules_to_save." in n:  # move the full copy away from the base's values
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.train()  # dropout is 0.0: train and eval compute the same thing

    adapter_dir = case_dir / "adapter"
    model.save_pretrained(adapter_dir)
    # The saved file holds exactly the matrices we differentiate, with the values used here.
    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    params = {saved_key(n): p for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(saved) == sorted(params), (sorted(saved), sorted(params))
    for k, p in params.items():
        assert torch.equal(saved[k], p.detach()), k

    loss, grads = loss_and_grads(model)
    with torch.no_grad(), model.disable_adapter():
        base_loss = model(input_ids=INPUT_IDS, labels=LABELS).loss.item()
    # The adapters must matter, or a scaling or loading bug would pass unnoticed.
    assert abs(loss.item() - base_loss) > 1e-2, f"{name}: adapter barely moves the loss"
    for k, gr in grads.items():
        assert gr.abs().max() > 0, f"{name}: {k} has an all-zero gradient"

    model64 = copy.deepcopy(model).double()
    loss64, grads64 = loss_and_grads(model64)
    noise = {}
    for k in grads:
        denom = grads64[k].abs().max().item()
        noise[k] = (grads[k].double() - grads64[k]).abs().max().item() / denom
    loss_noise = abs(loss.item() - loss64.item()) / abs(loss64.item())

    tensors = {"input_ids": INPUT_IDS.contiguous(), "labels": LABELS.contiguous(),
               "loss": loss.float().reshape(())}
    for k, gr in grads.items():
        assert k not in tensors, k
        tensors[k] = gr.float()
    save_file(tensors, str(case_dir / "reference.safetensors"), metadata={"format": "pt"})
    tensors64 = {"loss": loss64.reshape(()), **grads64}
    save_file(tensors64, str(case_dir / "reference_f64.safetensors"), metadata={"format": "pt"})

    scaling = sorted({m.scaling["default"] for m in model.modules() if hasattr(m, "scaling")
                      and isinstance(m.scaling, dict) and "default" in m.scaling})
    meta = {
        "case": name,
        "description": description,
        "base": base_name,
        "lora_config_kwargs": {**COMMON_LORA, **lora_kwargs},
        "scaling": scaling,
        "seed": seed,
        "lora_B_init": f"N(0, {B_STD}^2), torch.Generator seed {seed}",
        "loss": loss.item(),
        "loss_f64": loss64.item(),
        "loss_without_adapter": base_loss,
        "loss_rel_f32_vs_f64": loss_noise,
        "num_adapter_tensors": len(grads),
        "num_counted_targets": int((LABELS[:, 1:] != -100).sum()),
        "grad_rel_f32_vs_f64": noise,
        "max_grad_rel_f32_vs_f64": max(noise.values()),
    }
    (case_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"{name:18s} loss={loss.item():.6f} (base {base_loss:.6f}) tensors={len(grads)} "
          f"f32-vs-f64 max rel={meta['max_grad_rel_f32_vs_f64']:.2e}")
    return {"base": base_name, "description": description, "loss": loss.item(),
            "num_adapter_tensors": len(grads)}


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    out_dir, tiny_dir = Path(sys.argv[1]), Path(sys.argv[2]).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "index.json").unlink(missing_ok=True)
    torch.use_deterministic_algorithms(True)
    start = time.time()
    cases = {}
    for i, (name, (base_name, kwargs, desc)) in enumerate(CASES.items()):
        t0 = time.time()
        cases[name] = run_case(name, base_name, kwargs, desc, tiny_dir, out_dir, i)
        cases[name]["seconds"] = round(time.time() - t0, 2)
    index = {
        "generator": "tests/reference/grad_reference.py",
        "versions": versions(),
        "tiny_dir": str(tiny_dir),
        "common_lora_config": COMMON_LORA,
        "input_ids": INPUT_IDS.tolist(),
        "labels": LABELS.tolist(),
        "reference_tensors": {
            "input_ids": "int64 [2,12]",
            "labels": "int64 [2,12], -100 = not counted",
            "loss": "float32 [], transformers' ForCausalLMLoss (mean over counted targets)",
            "<adapter key>": "float32, d loss / d (that adapter matrix), keyed as in "
                             "adapter/adapter_model.safetensors",
        },
        "cases": cases,
        "seconds": round(time.time() - start, 2),
    }
    (out_dir / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    print(f"wrote {out_dir / 'index.json'} in {index['seconds']}s")


if __name__ == "__main__":
    main()
