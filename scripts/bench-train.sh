#!/usr/bin/env bash
# Training benchmark: qlora (examples/bench_train.rs) against PyTorch + PEFT
# (tests/reference/bench_train_torch.py) on the SmolLM2-135M shape, in the same run, back to back.
#
#   scripts/bench-train.sh [OUT_DIR]          (default OUT_DIR: target/bench-train)
#
# For each config (targets × gradient checkpointing) it runs ours, then torch fp32, then torch
# bf16, each in its own process (clean peak RSS), and prints a markdown table; the per-run JSON
# files stay in OUT_DIR. Environment knobs:
#   STEPS=5 WARMUP=2 BATCH=4 SEQ=128
#   CONFIGS="q,v:off q,v:on all-linear:off all-linear:on"
#   TORCH_PRECISIONS="fp32 bf16"   (bf16-autocast also works)
#   THREADS=N                      threads for both sides (ours: RAYON_NUM_THREADS and
#                                  CANDLE_NUM_THREADS; torch: set_num_threads); default: all cores
#   REF_VENV=~/.cache/qlora/ref-venv
#   OURS_ENV="..."                 extra environment for our side only
#   OURS_TUNED_ENV="..."           if set, ours runs a second time per config with this
#                                  environment (own column), e.g.
#     OURS_TUNED_ENV="CANDLE_NUM_THREADS=1 MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_TOP_PAD_=1073741824"
set -euo pipefail
cd "$(dirname "$0")/.."

out="${1:-target/bench-train}"
STEPS="${STEPS:-5}"
WARMUP="${WARMUP:-2}"
BATCH="${BATCH:-4}"
SEQ="${SEQ:-128}"
CONFIGS="${CONFIGS:-q,v:off q,v:on all-linear:off all-linear:on}"
TORCH_PRECISIONS="${TORCH_PRECISIONS:-fp32 bf16}"
OURS_ENV="${OURS_ENV:-}"
OURS_TUNED_ENV="${OURS_TUNED_ENV:-}"
. scripts/bench-common.sh
bench_setup "$out" bench_train

start=$(date +%s)
for cfg in $CONFIGS; do
  targets="${cfg%%:*}"
  ckpt="${cfg##*:}"
  tag="${targets//,/}-ckpt${ckpt}"
  echo "== $targets, checkpointing $ckpt: ours" >&2
  env RAYON_NUM_THREADS="$THREADS" CANDLE_NUM_THREADS="$THREADS" $OURS_ENV "$bin" --model default --batch "$BATCH" --seq "$SEQ" --targets "$targets" \
    --steps "$STEPS" --warmup "$WARMUP" --checkpointing "$ckpt" \
    --json "$out/ours-$tag.json" >/dev/null
  if [ -n "$OURS_TUNED_ENV" ]; then
    echo "== $targets, checkpointing $ckpt: ours with $OURS_TUNED_ENV" >&2
    env RAYON_NUM_THREADS="$THREADS" CANDLE_NUM_THREADS="$THREADS" $OURS_ENV $OURS_TUNED_ENV "$bin" --model default --batch "$BATCH" --seq "$SEQ" \
      --targets "$targets" --steps "$STEPS" --warmup "$WARMUP" --checkpointing "$ckpt" \
      --json "$out/ours-tuned-$tag.json" >/dev/null
  fi
  for prec in $TORCH_PRECISIONS; do
    echo "== $targets, checkpointing $ckpt: torch $prec" >&2
    "$PY" tests/reference/bench_train_torch.py --gguf "$MODEL" --batch "$BATCH" --seq "$SEQ" \
      --targets "$targets" --steps "$STEPS" --warmup "$WARMUP" --checkpointing "$ckpt" \
      --precision "$prec" --threads "$THREADS" --json "$out/torch-$prec-$tag.json" >/dev/null
  done
done
echo "== done in $(( $(date +%s) - start )) s; load: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

"$PY" - "$out" "$CONFIGS" "$TORCH_PRECISIONS" "$OURS_TUNED_ENV" <<'EOF'
import json, sys
from pathlib import Path

out, configs, precs = Path(sys.argv[1]), sys.argv[2].split(), sys.argv[3].split()
tuned = bool(sys.argv[4].strip())
def load(name):
    p = out / name
    return json.loads(p.read_text()) if p.exists() else None
gib = lambda m: f"{m / 1024:.2f}"

head = (["config", "ours tok/s"] + (["ours tuned tok/s"] if tuned else [])
        + [f"torch {p} tok/s" for p in precs]
        + ["ours / best torch"] + (["ours tuned / best torch"] if tuned else [])
        + ["ours peak RSS GiB"] + (["ours tuned peak RSS GiB"] if tuned else [])
        + [f"torch {p} peak RSS GiB" for p in precs])
print("| " + " | ".join(head) + " |")
print("|" + "---|" * len(head))
phases = []
for cfg in configs:
    targets, ckpt = cfg.split(":")
    tag = f"{targets.replace(',', '')}-ckpt{ckpt}"
    ours = load(f"ours-{tag}.json")
    ours_t = load(f"ours-tuned-{tag}.json") if tuned else None
    torch = {p: load(f"torch-{p}-{tag}.json") for p in precs}
    best = max((t["tokens_per_s"] for t in torch.values() if t), default=None)
    def rss(r):
        # Process peak; the training-only peak (VmHWM reset after loading) in parentheses
        # where it differs.
        if not r:
            return "—"
        total, train = r["peak_rss_mib"], r.get("peak_rss_train_mib")
        if train and abs(total - train) > 0.02 * total:
            return f"{gib(total)} ({gib(train)})"
        return gib(total)
    tps = lambda r: f"{r['tokens_per_s']:.0f}" if r else "—"
    ratio = lambda r: f"{r['tokens_per_s'] / best:.2f}×" if r and best else "—"
    row = ([f"{targets}, ckpt {ckpt}", tps(ours)] + ([tps(ours_t)] if tuned else [])
           + [tps(torch[p]) for p in precs]
           + [ratio(ours)] + ([ratio(ours_t)] if tuned else [])
           + [rss(ours)] + ([rss(ours_t)] if tuned else [])
           + [rss(torch[p]) for p in precs])
    print("| " + " | ".join(row) + " |")
    for name, r in ([("ours", ours)] + ([("ours tuned", ours_t)] if tuned else [])
                    + [(f"torch {p}", torch[p]) for p in precs]):
        if r:
            ph = ", ".join(f"{k} {v:.2f}" for k, v in r["phases_s_per_step"].items())
            med = r.get("tokens_per_s_median")
            cpu = r.get("tokens_per_cpu_s")
            phases.append(f"| {targets}, ckpt {ckpt} | {name} | {r['s_per_step']:.2f} | "
                          f"{med:.0f} | {cpu:.0f} | {ph} |" if med and cpu else
                          f"| {targets}, ckpt {ckpt} | {name} | {r['s_per_step']:.2f} | — | — | {ph} |")
print()
print("| config | run | s/step (mean) | tok/s (median step) | tok per CPU-s | phases (s/step) |")
print("|---|---|---|---|---|---|")
print("\n".join(phases))
EOF
