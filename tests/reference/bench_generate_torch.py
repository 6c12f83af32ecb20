#!/usr/bin/env python3
"""transformers' generation speed on the workload examples/bench_generate.rs wrote.

Usage:
  bench_generate_torch.py --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf
      --workload target/bench-generate/workload.json [--threads N] [--json out.json]

The model is AutoModelForCausalLM from the GGUF (dequantised to f32 on load, as transformers
does), in eval mode under torch.inference_mode(). Prompts are rendered with the tokenizer's chat
template (add_generation_prompt=True) and answered with model.generate(do_sample=False):

- long prompt: time to the first token is measured as a generate(max_new_tokens=1) call; decode
  tokens/s as (n - 1) new tokens over the time the full call took beyond that;
- few-shot: each prompt on its own, one after another, max_new_tokens from the workload — what a
  DSPy program over a transformers-backed LM does (no key/value reuse between calls).
"""

import argparse
import json
import os
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--workload", required=True)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(args.gguf))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    with open(args.workload) as f:
        work = json.load(f)

    def ids(messages):
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tok(text, return_tensors="pt", add_special_tokens=False).input_ids

    def generate(input_ids, n):
        return model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=tok.eos_token_id,
        )

    with torch.inference_mode():
        long_ids = ids(work["long_prompt"])
        generate(long_ids, 2)  # warm-up
        t0 = time.perf_counter()
        generate(long_ids, 1)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = generate(long_ids, work["decode_tokens"])
        full = time.perf_counter() - t0
        new_tokens = out.shape[1] - long_ids.shape[1]
        decode_tok_s = (new_tokens - 1) / max(full - prefill, 1e-9)
        print(
            f"long prompt: {long_ids.shape[1]} tokens, prefill {prefill:.2f} s "
            f"({long_ids.shape[1] / prefill:.0f} tok/s); decode {new_tokens} tokens at {decode_tok_s:.1f} tok/s"
        )

        answers = []
        prompt_tokens = 0
        t0 = time.perf_counter()
        for messages in work["few_shot"]:
            x = ids(messages)
            prompt_tokens += x.shape[1]
            y = generate(x, work["max_tokens"])
            answers.append(tok.decode(y[0, x.shape[1]:], skip_special_tokens=True))
        few = time.perf_counter() - t0
        n = len(work["few_shot"])
        print(
            f"few-shot: {n} requests ({prompt_tokens} prompt tokens in all) in {few:.1f} s, {few / n:.2f} s/request"
        )

    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "impl": "transformers",
                    "torch": torch.__version__,
                    "threads": args.threads,
                    "long_prompt_tokens": long_ids.shape[1],
                    "prefill_seconds": prefill,
                    "prefill_tok_s": long_ids.shape[1] / prefill,
                    "decode_tokens": new_tokens,
                    "decode_tok_s": decode_tok_s,
                    "few_shot_requests": n,
                    "few_shot_prompt_tokens": prompt_tokens,
                    "few_shot_seconds": few,
                    "answers": answers,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
