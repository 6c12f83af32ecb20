#!/usr/bin/env python3
"""PyTorch + PEFT training throughput on the same shape as examples/bench_train.rs.

Usage:
  bench_train_torch.py --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf [--batch 4] [--seq 128]
      [--targets q,v|all-linear] [--steps 5] [--warmup 2] [--precision fp32|bf16|bf16-autocast]
      [--checkpointing on|off] [--threads N] [--json out.json]

The model is transformers' AutoModelForCausalLM from the GGUF (dequantised to f32 on load, as
transformers does with GGUF files), wrapped by PEFT's get_peft_model with LoraConfig(r=16,
lora_alpha=32, lora_dropout=0.05, target_modules=...). One step: forward with labels (the
model's own ForCausalLMLoss), backward, clip_grad_norm_(1.0), torch.optim.AdamW(lr=2e-4),
zero_grad — what transformers' Trainer does per optimiser step.

Precisions:
  fp32           everything f32
  bf16           model.to(torch.bfloat16): base, adapters and activations in bf16 (lowest memory)
  bf16-autocast  f32 weights, torch.autocast("cpu", bfloat16) around the forward (Trainer bf16=True)

Gradient checkpointing: model.gradient_checkpointing_enable(use_reentrant=False).
Peak RSS: resource.getrusage(RUSAGE_SELF).ru_maxrss for the process, and VmHWM after a reset
through /proc/self/clear_refs once the model is loaded (training alone).
"""

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch


def proc_status(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--gguf", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--targets", default="q,v")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "bf16-autocast"])
    p.add_argument("--checkpointing", default="off", choices=["on", "off"])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    a = p.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    import peft
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)

    gguf = Path(a.gguf).resolve()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32)
    if a.precision == "bf16":
        model = model.to(torch.bfloat16)
    if a.checkpointing == "on":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if a.targets in ("all-linear", "all"):
        targets = "all-linear"
    else:
        short = {"q", "k", "v", "o", "gate", "up", "down"}
        targets = [f"{t}_proj" if t in short else t for t in a.targets.split(",")]
    cfg = LoraConfig(r=a.r, lora_alpha=2 * a.r, lora_dropout=0.05, target_modules=targets,
                     bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    trainable = sum(q.numel() for q in params)
    opt = torch.optim.AdamW(params, lr=2e-4)
    load_s = time.perf_counter() - t0
    rss_after_load = proc_status("VmRSS:")
    peak_after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    reset_ok = reset_peak_rss()

    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(a.seed)
    ids = torch.randint(0, vocab, (a.batch, a.seq), generator=g)
    n = a.batch * a.seq
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if a.precision == "bf16-autocast"
                else torch.autocast("cpu", enabled=False))

    step_s, losses = [], []
    ph = {"forward_and_loss": 0.0, "backward": 0.0, "clip": 0.0, "optimizer": 0.0}
    cpu_timed = 0.0
    cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
    for step in range(a.warmup + a.steps):
        c0 = cpu()
        t0 = time.perf_counter()
        with autocast:
            out = model(input_ids=ids, labels=ids)
        loss = out.loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        t3 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        lv = float(loss.detach().float())
        del out, loss
        secs = t4 - t0
        tag = " (warmup)" if step < a.warmup else ""
        print(f"step {step:>2}{tag} {secs:6.2f} s  loss {lv:.4f}  grad norm {float(norm):.3f}",
              file=sys.stderr)
        if step >= a.warmup:
            cpu_timed += cpu() - c0
            step_s.append(secs)
            losses.append(lv)
            ph["forward_and_loss"] += t1 - t0
            ph["backward"] += t2 - t1
            ph["clip"] += t3 - t2
            ph["optimizer"] += t4 - t3

    timed = sum(step_s)
    k = a.steps
    peak_train = proc_status("VmHWM:")
    peak_total = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, peak_after_load)
    mib = lambda b: None if b is None else b / 2**20
    res = {
        "impl": f"PyTorch {torch.__version__} + PEFT {peft.__version__} "
                f"(transformers {transformers.__version__})",
        "precision": a.precision,
        "batch": a.batch,
        "seq": a.seq,
        "targets": a.targets,
        "r": a.r,
        "trainable_params": trainable,
        "gradient_checkpointing": a.checkpointing == "on",
        "threads": torch.get_num_threads(),
        "warmup": a.warmup,
        "steps": a.steps,
        "load_s": load_s,
        "tokens_per_s": n * k / timed,
        "s_per_step": timed / k,
        "tokens_per_s_median": n / statistics.median(step_s),
        "cpu_s_per_step": cpu_timed / k,
        "tokens_per_cpu_s": n * k / cpu_timed,
        "step_s": step_s,
        "losses": losses,
        "phases_s_per_step": {key: v / k for key, v in ph.items()},
        "rss_after_load_mib": mib(rss_after_load),
        "peak_rss_mib": mib(peak_total),
        "peak_rss_train_mib": mib(peak_train) if reset_ok else None,
        "python": platform.python_version(),
    }
    text = json.dumps(res, indent=2)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
