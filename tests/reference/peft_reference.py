#!/usr/bin/env python3
"""PEFT (LoRA) references for the Rust parity tests (tests/lora_parity.rs).

Usage:
  peft_reference.py OUT_DIR TINY_DIR
      TINY_DIR holds the tiny checkpoints written by make_tiny_models.py (llama, qwen2, ...).
      For every case in CASES:
        OUT_DIR/<case>/adapter/                  PEFT's save_pretrained output
                                                 (adapter_config.json, adapter_model.safetensors)
        OUT_DIR/<case>/reference.safetensors     input_ids int64 [2,6]; logits f32 [2,6,vocab]
                                                 of the PEFT model in eval mode; merged_logits
                                                 f32 of merge_and_unload() on the same ids
        OUT_DIR/<case>/meta.json                 base, print_trainable_parameters() line, counts,
                                                 the LoraConfig as PEFT serialises it, the adapter
                                                 tensors (name, dtype, shape), training losses
      OUT_DIR/counts.json    print_trainable_parameters() lines for the SmolLM2-135M shape
      OUT_DIR/index.json     cases + versions (written last: its presence means "complete")

  peft_reference.py check BASE_DIR ADAPTER_DIR IDS_SAFETENSORS OUT_SAFETENSORS [4 more ...]
      (several quadruples may follow one another: one process, one torch import, for all).
      Loads BASE_DIR (f32) + ADAPTER_DIR with PeftModel.from_pretrained (eval) and writes to
      OUT_SAFETENSORS: `input_ids` (int64), `logits` (f32) for IDS_SAFETENSORS's `input_ids`,
      and every LoRA tensor PEFT actually holds after loading, under the key it has in the
      adapter file (`base_model.model.....lora_A.weight`), so that a key PEFT silently ignored
      (left at its init: B = 0) shows up as a mismatch against the file. Also writes
      OUT_SAFETENSORS + ".json": the config as PEFT re-reads it (LoraConfig.from_pretrained
      (...).to_dict()), the file's and the model's adapter keys, missing/unexpected keys, the
      warnings PEFT emitted and the print_trainable_parameters() line. Exits 1 (after writing
      both, for every quadruple) when a key is missing, unexpected or loaded with other values.

  peft_reference.py counts [OUT_JSON]
      Only the SmolLM2-135M-shape counts (printed, and written to OUT_JSON if given).
"""

import contextlib
import copy
import io
import json
import os
import platform
import sys
import time
import traceback
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the hub is unreachable; fail fast instead of retrying

import peft
import safetensors
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

SEED = 4321
VOCAB = 256
LR = 1e-2
TRAIN_STEPS = 3

# name -> (base variant in TINY_DIR, LoraConfig kwargs beyond the common ones, description)
CASES = {
    "llama-qv": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                 "q,v, scaling alpha/r = 2"),
    "llama-all-rslora": ("llama", dict(r=4, lora_alpha=16, target_modules="all-linear",
                                       use_rslora=True),
                         "all-linear (every linear but lm_head), rslora: scaling alpha/sqrt(r) = 8"),
    "qwen2-qv": ("qwen2", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                 "Qwen2 (q/k/v biases in the base), q,v"),
    "qwen2-all": ("qwen2", dict(r=8, lora_alpha=16, target_modules="all-linear"),
                  "Qwen2, all-linear, r=8"),
    "llama-layers": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                   layers_to_transform=[1]),
                     "q,v on layer 1 only (layers_to_transform=[1])"),
    "llama-regex": ("llama", dict(r=2, lora_alpha=4,
                                  target_modules=r".*\.layers\.0\.self_attn\.(k_proj|o_proj)|.*\.mlp\.down_proj"),
                    "target_modules as a regex string (re.fullmatch on the module name): "
                    "layer-0 k_proj,o_proj and every down_proj"),
    "llama-tied-qv": ("llama-tied", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                         init_lora_weights="gaussian"),
                      "tied embeddings (all params counted once), gaussian A init"),
    "llama-mts-head-norm": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                          modules_to_save=["lm_head", "norm"]),
                            "modules_to_save: lm_head and every norm (PEFT's suffix match)"),
    "qwen2-mts-embed-k": ("qwen2", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                        modules_to_save=["embed_tokens", "k_proj"]),
                          "modules_to_save: embeddings and k_proj (weight + bias)"),
    "llama-tied-mts-head": ("llama-tied", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                               modules_to_save=["lm_head"]),
                            "tied embeddings, lm_head trained in full (an untied copy)"),
}
COMMON_LORA = dict(task_type="CAUSAL_LM", lora_dropout=0.0, bias="none")

# SmolLM2-135M's shape (random init; only the counts matter).
SMOLLM2 = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
               intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
               max_position_embeddings=8192, rms_norm_eps=1e-5)
COUNT_CASES = {
    "r16-qv": dict(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]),
    "r16-all-linear": dict(r=16, lora_alpha=32, target_modules="all-linear"),
}


def versions():
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "safetensors": safetensors.__version__,
    }


def trainable_line(model):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        model.print_trainable_parameters()
    line = buf.getvalue()
    assert line.endswith("\n") and line.count("\n") == 1, repr(line)
    return line[:-1]


def load_base(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model


def adapter_tensor_info(path: Path):
    out = {}
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        for k in sorted(f.keys()):
            t = f.get_tensor(k)
            out[k] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
    return metadata, out


def run_case(name, base_name, lora_kwargs, description, tiny_dir: Path, out_dir: Path, index):
    case_dir = out_dir / name
    case_dir.mkdir(parents=True, exist_ok=True)
    seed = SEED + index
    base = load_base(tiny_dir / base_name)

    torch.manual_seed(seed)
    config = LoraConfig(**COMMON_LORA, **lora_kwargs)
    model = get_peft_model(base, config)
    line = trainable_line(model)
    trainable, total = model.get_nb_trainable_parameters()

    # A few AdamW steps so that lora_B is far from its zero init (and A moves too).
    g = torch.Generator().manual_seed(seed)
    train_ids = torch.randint(3, VOCAB, (2, 12), generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    model.train()
    losses = []
    for _ in range(TRAIN_STEPS):
        loss = model(input_ids=train_ids, labels=train_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    for n, p in model.named_parameters():
        if "lora_B" in n:
            assert p.abs().max() > 1e-3, f"{n} is still ~0 after training"

    adapter_dir = case_dir / "adapter"
    model.save_pretrained(adapter_dir)

    input_ids = torch.randint(3, VOCAB, (2, 6), generator=g)
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits.float().contiguous()
        with model.disable_adapter():
            base_logits_check = model(input_ids=input_ids).logits.float()
    adapter_effect = (logits - base_logits_check).abs().max().item()
    assert adapter_effect > 1e-2, f"{name}: the adapter barely changes the logits ({adapter_effect})"

    merged = model.merge_and_unload()
    merged.eval()
    with torch.no_grad():
        merged_logits = merged(input_ids=input_ids).logits.float().contiguous()
    merge_diff = (merged_logits - logits).abs().max().item()
    assert merge_diff < 1e-4, f"{name}: merged vs adapter logits differ by {merge_diff}"

    # Reload check: the saved adapter on a fresh base reproduces the logits exactly.
    reloaded = PeftModel.from_pretrained(load_base(tiny_dir / base_name), adapter_dir)
    reloaded.eval()
    with torch.no_grad():
        reload_logits = reloaded(input_ids=input_ids).logits.float()
    torch.testing.assert_close(reload_logits, logits, rtol=0, atol=1e-6)
    # PeftModel.from_pretrained loads for inference (is_trainable=False): adapters frozen.
    loaded_line = trainable_line(reloaded)

    save_file({"input_ids": input_ids.contiguous(), "logits": logits,
               "merged_logits": merged_logits},
              str(case_dir / "reference.safetensors"), metadata={"format": "pt"})

    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    metadata, tensors = adapter_tensor_info(adapter_dir / "adapter_model.safetensors")
    meta = {
        "case": name,
        "description": description,
        "base": base_name,
        "lora_config_kwargs": {**COMMON_LORA, **lora_kwargs},
        "print_trainable_parameters": line,
        "print_trainable_parameters_after_from_pretrained": loaded_line,
        "trainable_params": trainable,
        "all_params": total,
        "adapter_config": adapter_config,
        "adapter_files": sorted(p.name for p in adapter_dir.iterdir()),
        "adapter_safetensors_metadata": metadata,
        "adapter_tensors": tensors,
        "seed": seed,
        "train": {"optimizer": "AdamW", "lr": LR, "steps": TRAIN_STEPS,
                  "ids_shape": list(train_ids.shape), "losses": losses},
        "max_abs_logits_minus_base": adapter_effect,
        "max_abs_merged_minus_adapter": merge_diff,
    }
    (case_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"{name:18s} {line}   merge_diff={merge_diff:.2e} effect={adapter_effect:.3f}")
    return {"base": base_name, "description": description, "print_trainable_parameters": line}


def smollm2_counts():
    out = {"shape": SMOLLM2, "cases": {}}
    for name, kwargs in COUNT_CASES.items():
        # On the meta device: no memory, no init cost; numel() is all that is counted.
        with torch.device("meta"):
            base = LlamaForCausalLM(LlamaConfig(**SMOLLM2))
            model = get_peft_model(base, LoraConfig(**COMMON_LORA, **kwargs))
        trainable, total = model.get_nb_trainable_parameters()
        out["cases"][name] = {
            "lora_config_kwargs": {**COMMON_LORA, **kwargs},
            "print_trainable_parameters": trainable_line(model),
            "trainable_params": trainable,
            "all_params": total,
            "base_params": total - trainable,
        }
    assert out["cases"]["r16-qv"]["trainable_params"] == 921_600, out
    return out


def main_generate(out_dir: Path, tiny_dir: Path):
    tiny_dir = tiny_dir.resolve()  # becomes base_model_name_or_path in adapter_config.json
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "index.json").unlink(missing_ok=True)
    torch.use_deterministic_algorithms(True)
    start = time.time()
    cases = {}
    for i, (name, (base_name, kwargs, desc)) in enumerate(CASES.items()):
        t0 = time.time()
        cases[name] = run_case(name, base_name, kwargs, desc, tiny_dir, out_dir, i)
        cases[name]["seconds"] = round(time.time() - t0, 2)

    t0 = time.time()
    counts = smollm2_counts()
    counts["seconds"] = round(time.time() - t0, 2)
    (out_dir / "counts.json").write_text(json.dumps(counts, indent=2) + "\n")
    for name, c in counts["cases"].items():
        print(f"SmolLM2 {name:14s} {c['print_trainable_parameters']}")

    index = {
        "generator": "tests/reference/peft_reference.py",
        "versions": versions(),
        "tiny_dir": str(tiny_dir),
        "common_lora_config": COMMON_LORA,
        "reference_tensors": {
            "input_ids": "int64 [2,6]",
            "logits": "float32 [2,6,vocab], PeftModel (adapter loaded as trained) in eval mode",
            "merged_logits": "float32 [2,6,vocab], merge_and_unload() on the same ids",
        },
        "cases": cases,
        "counts": "counts.json",
        "seconds": round(time.time() - start, 2),
    }
    (out_dir / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    print(f"wrote {out_dir / 'index.json'} in {index['seconds']}s")


def main_check(base_dir: Path, adapter_dir: Path, ids_path: Path, out_path: Path):
    input_ids = load_file(str(ids_path))["input_ids"].to(torch.int64)
    base = load_base(base_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits.float().contiguous()

    file_tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    loaded = {k: v.detach().float().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    missing = sorted(set(loaded) - set(file_tensors))      # in the model, absent from the file
    unexpected = sorted(set(file_tensors) - set(loaded))   # in the file, not used by the model
    mismatched = sorted(k for k in set(loaded) & set(file_tensors)
                        if not torch.equal(loaded[k], file_tensors[k].float()))

    tensors = {"input_ids": input_ids.contiguous(), "logits": logits}
    for k, v in loaded.items():
        assert k not in tensors, k
        tensors[k] = v
    save_file(tensors, str(out_path), metadata={"format": "pt"})

    config = LoraConfig.from_pretrained(str(adapter_dir))
    summary = {
        "versions": versions(),
        "config": json.loads(json.dumps(config.to_dict(), default=sorted)),
        "file_keys": sorted(file_tensors),
        "loaded_keys": sorted(loaded),
        "file_dtypes": {k: str(v.dtype).removeprefix("torch.") for k, v in sorted(file_tensors.items())},
        "missing_keys": missing,
        "unexpected_keys": unexpected,
        "value_mismatch_keys": mismatched,
        "warnings": [str(w.message) for w in caught],
        "print_trainable_parameters": trainable_line(model),
    }
    Path(str(out_path) + ".json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({"adapter": str(adapter_dir), **{k: summary[k] for k in (
        "missing_keys", "unexpected_keys", "value_mismatch_keys")}}))
    if missing or unexpected or mismatched:
        print(f"check: {adapter_dir}: adapter keys do not match what PEFT loaded: missing={missing} "
              f"unexpected={unexpected} mismatched={mismatched}", file=sys.stderr)
        return False
    return True


def main():
    args = sys.argv[1:]
    if args and args[0] == "check":
        if len(args) < 5 or (len(args) - 1) % 4:
            sys.exit(f"usage: {sys.argv[0]} check BASE_DIR ADAPTER_DIR IDS_SAFETENSORS OUT_SAFETENSORS [...]")
        rest = [Path(a) for a in args[1:]]
        results = []
        for i in range(0, len(rest), 4):
            try:
                results.append(main_check(*rest[i:i + 4]))
            except Exception:  # report, and go on with the other adapters
                traceback.print_exc()
                print(f"check: {rest[i + 1]}: PEFT could not load or run it", file=sys.stderr)
                results.append(False)
        if not all(results):
            sys.exit(1)
    elif args and args[0] == "counts":
        if len(args) not in (1, 2):
            sys.exit(f"usage: {sys.argv[0]} counts [OUT_JSON]")
        counts = smollm2_counts()
        text = json.dumps(counts, indent=2) + "\n"
        if len(args) == 2:
            Path(args[1]).write_text(text)
        print(text, end="")
    elif len(args) == 2:
        main_generate(Path(args[0]), Path(args[1]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
