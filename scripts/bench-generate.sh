#!/usr/bin/env bash
# Generation benchmark: qlora (examples/bench_generate.rs) against transformers
# (tests/reference/bench_generate_torch.py) on the same prompts, back to back.
#
#   scripts/bench-generate.sh [OUT_DIR]        (default OUT_DIR: target/bench-generate)
#
# Environment knobs: REQUESTS=10 DEMOS=16 MAX_TOKENS=16 DECODE_TOKENS=64 THREADS=$(nproc)
#   REF_VENV=~/.cache/qlora/ref-venv
set -euo pipefail
cd "$(dirname "$0")/.."

out="${1:-target/bench-generate}"
REQUESTS="${REQUESTS:-10}"
DEMOS="${DEMOS:-16}"
MAX_TOKENS="${MAX_TOKENS:-16}"
DECODE_TOKENS="${DECODE_TOKENS:-64}"
. scripts/bench-common.sh
bench_setup "$out" bench_generate

echo "== ours" >&2
env RAYON_NUM_THREADS="$THREADS" CANDLE_NUM_THREADS="$THREADS" "$bin" --model default \
  --requests "$REQUESTS" --demos "$DEMOS" --max-tokens "$MAX_TOKENS" \
  --decode-tokens "$DECODE_TOKENS" --json "$out/ours.json" --workload "$out/workload.json" >&2
echo "== transformers" >&2
"$PY" tests/reference/bench_generate_torch.py --gguf "$MODEL" --workload "$out/workload.json" \
  --threads "$THREADS" --json "$out/torch.json" >&2

"$PY" - "$out/ours.json" "$out/torch.json" <<'PYEOF'
import json, sys
o, t = (json.load(open(p)) for p in sys.argv[1:3])
same = sum(a.strip() == b.strip() for a, b in zip(o["answers"], t["answers"]))
print("| measure | qlora | transformers (torch %s, f32) | ratio |" % t["torch"])
print("|---|---|---|---|")
print("| prefill, %d-token prompt (tok/s) | %.0f | %.0f | %.2fx |" % (
    o["long_prompt_tokens"], o["prefill_tok_s"], t["prefill_tok_s"], o["prefill_tok_s"] / t["prefill_tok_s"]))
print("| decode (tok/s) | %.1f | %.1f | %.2fx |" % (
    o["decode_tok_s"], t["decode_tok_s"], o["decode_tok_s"] / t["decode_tok_s"]))
n = o["few_shot_requests"]
print("| few-shot, %d requests, %d prompt tokens (s), prefix cache on | %.1f | %.1f | %.2fx faster |" % (
    n, o["few_shot_prompt_tokens"], o["few_shot_seconds_prefix_cache"], t["few_shot_seconds"],
    t["few_shot_seconds"] / o["few_shot_seconds_prefix_cache"]))
print("| few-shot, same, prefix cache off (s) | %.1f | %.1f | %.2fx faster |" % (
    o["few_shot_seconds_no_cache"], t["few_shot_seconds"], t["few_shot_seconds"] / o["few_shot_seconds_no_cache"]))
print()
print("few-shot answers identical to transformers': %d/%d; with and without our prefix cache: %d/%d" % (
    same, n, o["answers_identical_with_and_without_cache"], n))
PYEOF
