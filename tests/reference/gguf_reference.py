#!/usr/bin/env python3
"""Tokenizer, chat-template and greedy-generation references for a GGUF model.

Usage: gguf_reference.py GGUF_PATH OUT_DIR

transformers reads the GGUF itself (tokenizer rebuilt from the GGUF metadata,
weights dequantised to f32), which is exactly what the Rust side does, so its
outputs are the reference. Writes OUT_DIR/{tokens,chat,greedy,meta,tokenizer}.json.
"""

import importlib.metadata
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the hub is unreachable; fail fast instead of retrying

import gguf
import torch
import transformers
from tokenizers import Tokenizer, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer

N_NEW = 32

# Each entry targets a tokenizer corner: pre-tokenizer regex branches, whitespace handling,
# digit splitting, byte-level fallback for non-ASCII, added/special tokens.
TEXTS = [
    "",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "trailing space ",
    "  x",
    "x  ",
    "a\n\nb",
    "line one\nline two\r\nline three",
    "\t\tindent",
    "tabs\tand   multiple    spaces",
    "   ",
    "\n",
    "12345",
    "3.14159",
    "year 2024",
    "x 12 y 345 z",
    "v1.2.3-rc4",
    "1,000,000 and 0.5%",
    "\uff11\uff12\uff13 \u0663\u0664\u0665 \u00b2 \u216b",  # fullwidth, Arabic-Indic digits, superscript, roman numeral
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00c5ngstr\u00f6m",
    "e\u0301 combining acute vs \u00e9 precomposed",
    "\u4f60\u597d\uff0c\u4e16\u754c\u3002\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645",
    "emoji \U0001f600\U0001f680 family \U0001f468\u200d\U0001f469\u200d\U0001f467 flag \U0001f1eb\U0001f1f7",
    "def add(a, b):\n    return a + b\n",
    "fn main() {\n    let v: Vec<u32> = vec![1, 2, 3];\n    println!(\"{:?}\", v);\n}",
    "!!!??? ... --- *** ((()))",
    "don't you're we've they'll I'd it's",
    "I'M DON'T YOU'RE",
    "<|im_start|>user\nhi<|im_end|>",
    "text<|endoftext|>more text",
    "<|im_start|><|im_end|>",
    "a <|im_start|> b",
    "http://example.com/path?q=1&r=two#frag",
    "user@example.com",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Name a fruit."}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Name a fruit."},
     {"role": "assistant", "content": "Apple."},
     {"role": "user", "content": "Another one?"}],
    [{"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! How can I help?"}],
    [{"role": "user", "content": "multi\nline\n\ncontent with  spaces "}],
]

GREEDY_PROMPTS = [
    "What is the capital of France? Answer in one word.",
    "Write a haiku about the sea.",
    "List three primary colors.",
]


def gguf_metadata(path: Path) -> dict:
    """Scalar/short metadata from the GGUF (the big token/merge arrays are only counted)."""
    reader = gguf.GGUFReader(str(path))
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "tokenizer.chat_template":
            continue
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                   "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            out[key + ".len"] = len(field.data)
            continue
        out[key] = field.contents()
    return out


def smollm_reference_tokenizer(tok) -> Tokenizer:
    """The same vocab/merges behind the pre-tokenizer of the original SmolLM2 tokenizer.json
    (and of llama.cpp's `smollm` pre type): every digit split off individually, then the
    GPT-2 byte-level regex. Used to check whether transformers' GGUF converter, which
    ignores tokenizer.ggml.pre, still produces identical ids."""
    ref = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    ref.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    return ref


def dump(path: Path, obj):
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


@torch.no_grad()
def greedy(model, tok, eos_ids):
    # eos disabled: a plain argmax for exactly N_NEW steps, with no stopping and no eos masking
    # (min_new_tokens would set the eos logits to -inf and change the argmax).
    model.generation_config.eos_token_id = None
    results = []
    for prompt in GREEDY_PROMPTS:
        rendered = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                           tokenize=False, add_generation_prompt=True)
        ids = tok.encode(rendered, add_special_tokens=False)
        inp = torch.tensor([ids])
        t0 = time.time()
        out = model.generate(inp, attention_mask=torch.ones_like(inp), do_sample=False,
                             max_new_tokens=N_NEW, min_new_tokens=N_NEW,
                             pad_token_id=tok.pad_token_id, output_logits=True,
                             return_dict_in_generate=True)
        dt = time.time() - t0
        gen = out.sequences[0, len(ids):].tolist()
        assert len(gen) == N_NEW, len(gen)
        logits = [l[0].float() for l in out.logits]  # raw logits, before any processor
        gaps = []
        for step, l in enumerate(logits):
            top = torch.topk(l, 2)
            assert top.indices[0].item() == gen[step]
            gaps.append((top.values[0] - top.values[1]).item())
        top10 = torch.topk(logits[0], 10)
        eos_at = next((i for i, t in enumerate(gen) if t in eos_ids), None)
        results.append({
            "prompt": prompt,
            "rendered": rendered,
            "prompt_ids": ids,
            "generated_ids": gen,
            "generated_text": tok.decode(gen),
            "generated_text_until_eos": tok.decode(gen[:eos_at] if eos_at is not None else gen),
            "first_eos_index": eos_at,
            "top2_gap": gaps,
            "logits_first_step_top10": {"ids": top10.indices.tolist(),
                                        "values": top10.values.tolist()},
            "seconds": round(dt, 2),
        })
        print(f"  greedy {dt:5.1f}s  {prompt!r} -> {results[-1]['generated_text_until_eos']!r} "
              f"(min gap {min(gaps):.4f})")
    return results


def main():
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} GGUF_PATH OUT_DIR")
    gguf_path = Path(sys.argv[1]).resolve()
    out_dir = Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    d, f = str(gguf_path.parent), gguf_path.name

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    print(f"tokenizer loaded in {time.time() - t0:.1f}s")

    meta_gguf = gguf_metadata(gguf_path)
    backend = json.loads(tok.backend_tokenizer.to_str())
    dump(out_dir / "tokenizer.json", backend)

    # --- tokens.json ---
    ref_tok = smollm_reference_tokenizer(tok)
    tokens, mismatches = [], []
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        ref_ids = ref_tok.encode(text, add_special_tokens=False).ids
        # "ids" is what transformers does; "ids_digit_split" is what llama.cpp (pre=smollm)
        # and the original tokenizer.json do. They differ only on non-ASCII numerals.
        tokens.append({"text": text, "ids": ids, "ids_digit_split": ref_ids,
                       "tokens": tok.convert_ids_to_tokens(ids),
                       "decoded": tok.decode(ids)})
        if ref_ids != ids:
            mismatches.append({"text": text, "transformers": ids, "digits_split": ref_ids})
    dump(out_dir / "tokens.json", tokens)

    # --- chat.json ---
    chat = {"chat_template": tok.chat_template, "bos_token": tok.bos_token,
            "eos_token": tok.eos_token, "conversations": []}
    for messages in CONVERSATIONS:
        for agp in (False, True):
            rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=agp)
            chat["conversations"].append({
                "messages": messages, "add_generation_prompt": agp, "rendered": rendered,
                "ids": tok.encode(rendered, add_special_tokens=False)})
    dump(out_dir / "chat.json", chat)

    # --- greedy.json ---
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.eval()
    print(f"model loaded in {time.time() - t0:.1f}s")
    eos_ids = {tok.eos_token_id, model.config.eos_token_id} - {None}
    dump(out_dir / "greedy.json", {"n_new_tokens": N_NEW, "eos_disabled": True,
                                   "results": greedy(model, tok, eos_ids)})

    # --- meta.json ---
    cfg = model.config
    rope = getattr(cfg, "rope_parameters", None) or {}
    meta = {
        "gguf_file": f,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "gguf": importlib.metadata.version("gguf"),
                     "tokenizers": importlib.metadata.version("tokenizers")},
        "bos_token": tok.bos_token, "bos_token_id": tok.bos_token_id,
        "eos_token": tok.eos_token, "eos_token_id": tok.eos_token_id,
        "pad_token": tok.pad_token, "pad_token_id": tok.pad_token_id,
        "unk_token": tok.unk_token, "unk_token_id": tok.unk_token_id,
        "config_bos_token_id": cfg.bos_token_id, "config_eos_token_id": cfg.eos_token_id,
        "tokenizer_vocab_size": len(tok),
        # Does encode(..., add_special_tokens=True) prepend anything? (GGUF says add_bos false.)
        "encode_hi_with_special_tokens": tok.encode("hi"),
        "encode_hi_without_special_tokens": tok.encode("hi", add_special_tokens=False),
        "added_tokens": [{"id": t["id"], "content": t["content"], "special": t["special"]}
                         for t in backend["added_tokens"]],
        "config": {
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "intermediate_size": cfg.intermediate_size,
            "head_dim": getattr(cfg, "head_dim", None),
            "max_position_embeddings": cfg.max_position_embeddings,
            "rope_parameters": rope,
            "rope_theta": rope.get("rope_theta", getattr(cfg, "rope_theta", None)),
            "rms_norm_eps": cfg.rms_norm_eps,
            "tie_word_embeddings": cfg.tie_word_embeddings,
            "model_lm_head_is_embedding": model.lm_head.weight.data_ptr()
            == model.model.embed_tokens.weight.data_ptr(),
        },
        "gguf_metadata": meta_gguf,
        "tokenizer_pipeline": {k: backend[k] for k in
                               ("normalizer", "pre_tokenizer", "post_processor", "decoder")},
        # The GGUF declares tokenizer.ggml.pre; transformers' converter does not read it. This
        # records whether ids nonetheless equal a digit-splitting (smollm-style) pre-tokenizer.
        "transformers_pre_tokenizer_splits_digits": "Digits" in json.dumps(backend["pre_tokenizer"]),
        "digit_split_pretokenizer_mismatches": mismatches,
    }
    dump(out_dir / "meta.json", meta)
    print(f"tokenizer.ggml.pre = {meta_gguf.get('tokenizer.ggml.pre')!r}; "
          f"{len(mismatches)} of {len(TEXTS)} texts differ from a digit-splitting pre-tokenizer")


if __name__ == "__main__":
    main()
