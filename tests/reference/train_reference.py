#!/usr/bin/env python3
"""Training-core references for the Rust parity tests (tests/train_parity.rs).

Usage:
  train_reference.py OUT_DIR
      OUT_DIR/train.safetensors   all tensors below (f32 unless noted)
      OUT_DIR/train.json          scalars, schedule rates and the cases' settings
      OUT_DIR/index.json          versions (written last: its presence means "complete")

  (a) AdamW: torch.optim.AdamW (single-tensor path: foreach=False, fused=False) over three
      random parameters with random gradients for 5 steps, driven by a transformers scheduler.
      Tensors `adam.<case>.init.<i>`, `adam.<case>.grad.<step>.<i>`, `adam.<case>.param.<step>.<i>`
      (after step <step>, 0-based) and `adam.<case>.fused.<step>.<i>` (same run with fused=True,
      transformers' default optimiser "adamw_torch_fused", for information). train.json: each
      case's config and the lr used at each step.
  (b) Schedules: transformers.get_scheduler for constant / constant_with_warmup / linear / cosine,
      with warmup given as steps or as a ratio (resolved by TrainingArguments.get_warmup_steps);
      train.json `schedules`: the lr before each optimiser step, steps 0..total+2.
  (c) clip_grad_norm_: `clip.<case>.grad.<i>` before, `clip.<case>.clipped.<i>` after;
      train.json: max_norm and the returned total norm.
  (d) ForCausalLMLoss (transformers.loss.loss_utils) on logits = hidden @ W.T with -100-masked
      labels: `loss.<case>.hidden` [B,T,H], `.weight` [V,H], `.labels` (int64) [B,T],
      `.grad_mean` (d loss / d hidden, mean reduction), `.grad_items` (num_items_in_batch =
      count + 5, the gradient-accumulation path); train.json: the two losses and the count.
"""

import json
import os
import platform
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from safetensors.torch import save_file
from transformers import TrainingArguments, get_scheduler
from transformers.loss.loss_utils import ForCausalLMLoss

SEED = 20240607


def adam_case(tensors, meta, case, lr, weight_decay, betas, eps, schedule, steps=5):
    g = torch.Generator().manual_seed(SEED + len(meta["adam"]))
    shapes = [(4, 8), (8, 3), (5,)]
    init = [torch.randn(s, generator=g) for s in shapes]
    # Gradients of varied scale, one of them tiny, so eps matters somewhere.
    scales = [1.0, 1e-3, 1e-7]
    grads = [[torch.randn(s, generator=g) * sc for s, sc in zip(shapes, scales)] for _ in range(steps)]
    for i, t in enumerate(init):
        tensors[f"adam.{case}.init.{i}"] = t.clone()
    for k in range(steps):
        for i, t in enumerate(grads[k]):
            tensors[f"adam.{case}.grad.{k}.{i}"] = t.clone()
    lrs = None
    for fused in (False, True):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = torch.optim.AdamW(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
            foreach=False, fused=fused,
        )
        sched = get_scheduler(
            schedule["kind"], opt, num_warmup_steps=schedule["warmup_steps"],
            num_training_steps=steps,
        )
        used = []
        for k in range(steps):
            for p, gr in zip(params, grads[k]):
                p.grad = gr.clone()
            used.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
            for i, p in enumerate(params):
                key = "fused" if fused else "param"
                tensors[f"adam.{case}.{key}.{k}.{i}"] = p.detach().clone()
        lrs = lrs or used
    meta["adam"][case] = {
        "lr": lr, "weight_decay": weight_decay, "beta1": betas[0], "beta2": betas[1],
        "eps": eps, "schedule": schedule, "steps": steps, "num_params": len(init), "lrs": lrs,
    }


def schedules(meta):
    total = 20
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ["constant", "constant_with_warmup", "linear", "cosine"]:
            for warmup in [0, 3, 0.12, 25]:
                args = TrainingArguments(output_dir=tmp, warmup_steps=warmup, report_to="none")
                ws = args.get_warmup_steps(total)
                extra = [None]
                if kind == "cosine":
                    extra.append(1.5)
                for num_cycles in extra:
                    p = torch.nn.Parameter(torch.zeros(1))
                    opt = torch.optim.AdamW([p], lr=2e-4)
                    kwargs = {} if num_cycles is None else {"num_cycles": num_cycles}
                    sched = get_scheduler(
                        kind, opt, num_warmup_steps=ws, num_training_steps=total,
                        scheduler_specific_kwargs=kwargs,
                    )
                    lrs = []
                    for _ in range(total + 3):
                        lrs.append(opt.param_groups[0]["lr"])
                        opt.step()
                        sched.step()
                    cases.append({
                        "kind": kind, "learning_rate": 2e-4, "total_steps": total,
                        "warmup": {"ratio": warmup} if warmup < 1 and warmup != 0 else {"steps": int(warmup)},
                        "warmup_steps": ws, "num_cycles": 0.5 if num_cycles is None else num_cycles,
                        "lrs": lrs,
                    })
    meta["schedules"] = cases


def clip_case(tensors, meta, case, max_norm, scale):
    g = torch.Generator().manual_seed(SEED + 100 + len(meta["clip"]))
    shapes = [(16, 32), (32, 16), (7,)]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for i, p in enumerate(params):
        p.grad = torch.randn(p.shape, generator=g) * scale
        tensors[f"clip.{case}.grad.{i}"] = p.grad.clone()
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    for i, p in enumerate(params):
        tensors[f"clip.{case}.clipped.{i}"] = p.grad.clone()
    meta["clip"][case] = {"max_norm": max_norm, "norm": float(norm), "num_params": len(params)}


def loss_case(tensors, meta, case, b, t, h, v):
    g = torch.Generator().manual_seed(SEED + 200 + len(meta["loss"]))
    hidden = torch.randn(b, t, h, generator=g)
    weight = torch.randn(v, h, generator=g) * (1.5 / h**0.5)
    labels = torch.randint(0, v, (b, t), generator=g)
    mask = torch.rand(b, t, generator=g) < 0.3
    labels[mask] = -100
    labels[0, : t // 2] = -100  # a prompt part, as completion-only training masks it
    count = int((labels[:, 1:] != -100).sum())
    out = {"count": count}
    for key, items in [("mean", None), ("items", count + 5)]:
        hv = hidden.clone().requires_grad_(True)
        logits = hv @ weight.T
        loss = ForCausalLMLoss(
            logits, labels, vocab_size=v,
            num_items_in_batch=None if items is None else torch.tensor(items),
        )
        loss.backward()
        tensors[f"loss.{case}.grad_{key}"] = hv.grad.clone()
        out[f"loss_{key}"] = float(loss.detach())
        out[f"num_items_{key}"] = items
    tensors[f"loss.{case}.hidden"] = hidden
    tensors[f"loss.{case}.weight"] = weight
    tensors[f"loss.{case}.labels"] = labels.to(torch.int64)
    meta["loss"][case] = out


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.json").unlink(missing_ok=True)
    torch.manual_seed(SEED)
    tensors, meta = {}, {"adam": {}, "clip": {}, "loss": {}}
    adam_case(tensors, meta, "wd_linear", 1e-2, 0.01, (0.9, 0.999), 1e-8,
              {"kind": "linear", "warmup_steps": 2})
    adam_case(tensors, meta, "default_constant", 1e-3, 0.0, (0.9, 0.999), 1e-8,
              {"kind": "constant", "warmup_steps": 0})
    adam_case(tensors, meta, "betas_cosine", 3e-2, 0.1, (0.8, 0.95), 1e-6,
              {"kind": "cosine", "warmup_steps": 1})
    schedules(meta)
    clip_case(tensors, meta, "clipped", 1.0, 1.0)
    clip_case(tensors, meta, "within", 100.0, 0.1)
    clip_case(tensors, meta, "half", 0.5, 3.0)
    loss_case(tensors, meta, "small", 3, 12, 16, 50)
    loss_case(tensors, meta, "vocab49k", 2, 17, 64, 49152)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "train.safetensors"))
    (out / "train.json").write_text(json.dumps(meta, indent=1))
    index = {
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "seed": SEED,
    }
    (out / "index.json").write_text(json.dumps(index, indent=1))


if __name__ == "__main__":
    main()
