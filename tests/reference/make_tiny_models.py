#!/usr/bin/env python3
"""Tiny random HF checkpoints + reference outputs for the Rust parity tests.

Usage: make_tiny_models.py OUT_DIR

Each variant lands in OUT_DIR/<name>/ exactly as `save_pretrained` writes it
(config.json, generation_config.json, safetensors), plus reference.safetensors
with the tensors the Rust side must reproduce, and a byte-level tokenizer
(tokenizer.json + tokenizer_config.json: 256 tokens, one per byte, no merges)
so that the folder is a complete model that `Model::load(dir)` and
`AutoTokenizer` accept. The references are computed
from a model *re-loaded from disk*, so they also prove that the files on disk
(legacy config layout, shards, bf16 weights) mean what we claim they mean.

Everything is seeded: re-running produces the same weights and references.
"""

import json
import os
import platform
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the hub is unreachable; fail fast instead of retrying

import safetensors
import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

SEED = 1234
VOCAB = 256
PAD_ID = 0
BOS_ID = 1
EOS_ID = 2

# Shapes shared by every variant (head_dim = 64 / 4 = 16, GQA 4 heads : 2 KV heads).
COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=VOCAB,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    # The default 0.02 leaves attention scores ~0.03, i.e. near-uniform attention, under which
    # RoPE or masking bugs barely move the logits. 0.15 gives O(1) scores and logits.
    initializer_range=0.15,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=PAD_ID,
)
DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 10000.0}

# Fixed inputs. Real tokens avoid PAD_ID so that a pad/real mix-up shows up.
INPUT_IDS = torch.tensor(
    [[1, 17, 42, 99, 128, 200, 255], [1, 5, 250, 3, 77, 64, 31]], dtype=torch.int64
)
N_PAD = 3
# Row 0: 3 left pads then the first 4 tokens of INPUT_IDS[0]; row 1: INPUT_IDS[1] unpadded,
# so padded row 1 must equal the unpadded logits row 1 (checked below).
PADDED_INPUT_IDS = torch.tensor(
    [[PAD_ID] * N_PAD + INPUT_IDS[0, : 7 - N_PAD].tolist(), INPUT_IDS[1].tolist()],
    dtype=torch.int64,
)
PADDED_MASK = torch.tensor([[0] * N_PAD + [1] * (7 - N_PAD), [1] * 7], dtype=torch.int64)
GREEDY_PROMPT = torch.tensor([[1, 23, 45, 67, 89]], dtype=torch.int64)
GREEDY_NEW = 12


def randomize_extras(model):
    """transformers initialises RMSNorm weights to 1 and q/k/v biases to 0, which would let a
    Rust implementation that ignores them pass. Make them random so parity means something."""
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def build_llama(tied=False, rope=DEFAULT_ROPE):
    torch.manual_seed(SEED)
    cfg = LlamaConfig(**COMMON, tie_word_embeddings=tied, rope_parameters=dict(rope))
    model = LlamaForCausalLM(cfg)
    randomize_extras(model)
    return model


def build_mistral():
    torch.manual_seed(SEED)
    # sliding_window larger than any sequence used here: parsed as an int, but never bites.
    cfg = MistralConfig(**COMMON, tie_word_embeddings=False, sliding_window=4096,
                        rope_parameters=dict(DEFAULT_ROPE))
    model = MistralForCausalLM(cfg)
    randomize_extras(model)
    return model


def build_qwen2():
    torch.manual_seed(SEED)
    cfg = Qwen2Config(**COMMON, tie_word_embeddings=False, use_sliding_window=False,
                      rope_parameters=dict(DEFAULT_ROPE))
    model = Qwen2ForCausalLM(cfg)
    randomize_extras(model)  # q/k/v biases become nonzero here
    assert any(n.endswith("q_proj.bias") for n, _ in model.named_parameters())
    return model


def to_legacy_config(path: Path):
    """Rewrite config.json the way transformers 4 wrote it: top-level rope_theta,
    rope_scaling null and torch_dtype, with no rope_parameters/dtype keys."""
    cfg = json.loads((path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    assert rope.get("rope_type", "default") == "default", rope
    cfg["rope_theta"] = rope["rope_theta"]
    cfg["rope_scaling"] = None
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    cfg["transformers_version"] = "4.46.0"
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# name -> (builder, eos for generation_config.json, save kwargs, post-save hook, description)
VARIANTS = {
    "llama": (lambda: build_llama(), [BOS_ID, EOS_ID], {}, None,
              "LlamaForCausalLM, untied, rope_theta 1e4; generation_config eos_token_id is a list"),
    "llama-tied": (lambda: build_llama(tied=True), EOS_ID, {}, None,
                   "tie_word_embeddings=true: no lm_head.weight in the file"),
    "llama3-rope": (
        lambda: build_llama(rope={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            # 64 => high-freq wavelen 16, low-freq wavelen 64; at head_dim 16 the 8 wavelengths
            # are 6.3, 32.6, 167, ... so one is kept, one is smoothly blended, six are scaled.
            "original_max_position_embeddings": 64,
        }),
        EOS_ID, {}, None, "llama3 rope scaling exercising all three frequency bands"),
    "llama-legacy": (lambda: build_llama(), EOS_ID, {}, to_legacy_config,
                     "same weights as llama, config.json in the transformers-4 layout"),
    "llama-sharded": (lambda: build_llama(), EOS_ID, {"max_shard_size": "100KB"}, None,
                      "same weights as llama, split into several shards + index.json"),
    "llama-bf16": (lambda: build_llama().to(torch.bfloat16), EOS_ID, {}, None,
                   "llama weights stored as bf16; references from the bf16 values upcast to f32"),
    "mistral": (build_mistral, EOS_ID, {}, None, "MistralForCausalLM, sliding_window 4096"),
    "qwen2": (build_qwen2, EOS_ID, {}, None, "Qwen2ForCausalLM with random nonzero q/k/v biases"),
}


def bytes_to_unicode():
    """GPT-2's byte -> printable character table (the ByteLevel alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


BYTE_SYMBOLS = bytes_to_unicode()


def write_tokenizer(path: Path):
    """A byte-level BPE whose vocabulary is exactly the 256 ByteLevel symbols (id = byte value)
    with no merges, so every byte string round-trips and ids 0/1/2 (pad/bos/eos) are the
    symbols of bytes 0x00/0x01/0x02. No post-processor: nothing is added on encode."""
    vocab = {BYTE_SYMBOLS[b]: b for b in range(VOCAB)}
    assert set(vocab) == set(pre_tokenizers.ByteLevel.alphabet()), "not the ByteLevel alphabet"
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BYTE_SYMBOLS[BOS_ID],
        "eos_token": BYTE_SYMBOLS[EOS_ID],
        "pad_token": BYTE_SYMBOLS[PAD_ID],
        # transformers 5 picks the tokenizer class from config.json's model_type (Qwen2Tokenizer
        # for qwen2), and Qwen2Tokenizer would add an unk token <|endoftext|> as id 256.
        "unk_token": None,
        "add_bos_token": False,
        "model_max_length": COMMON["max_position_embeddings"],
    }
    (path / "tokenizer_config.json").write_text(
        json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")

    # transformers must accept it and agree on the special ids and the byte mapping.
    hf = AutoTokenizer.from_pretrained(path)
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID), hf
    assert len(hf) == VOCAB, len(hf)
    text = "Hello, wörld! 123"
    ids = hf(text).input_ids
    assert ids == list(text.encode("utf-8")), ids
    assert hf.decode(ids) == text


def top2_gap(logits_row):
    top = torch.topk(logits_row.float(), 2).values
    return (top[0] - top[1]).item()


@torch.no_grad()
def reference_tensors(path: Path):
    # float32 regardless of the stored dtype: that is what the Rust f32 path must match.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()

    logits = model(INPUT_IDS).logits.float()

    # A plain forward numbers positions 0..T-1 even under padding (only generate() derives
    # them from the mask), so pass them explicitly and record them for the Rust side.
    pos = (PADDED_MASK.cumsum(-1) - 1).clamp(min=0)
    padded_logits = model(PADDED_INPUT_IDS, attention_mask=PADDED_MASK, position_ids=pos).logits.float()

    # Self-checks: real positions of a left-padded row must equal the unpadded computation.
    alone = model(PADDED_INPUT_IDS[:1, N_PAD:]).logits.float()
    torch.testing.assert_close(padded_logits[0, N_PAD:], alone[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(padded_logits[1], logits[1], rtol=1e-4, atol=1e-4)

    # Pure greedy argmax for exactly GREEDY_NEW steps. Disabling eos (rather than
    # min_new_tokens, which masks the eos logits to -inf) keeps the semantics a plain argmax.
    model.generation_config.eos_token_id = None
    out = model.generate(
        GREEDY_PROMPT, attention_mask=torch.ones_like(GREEDY_PROMPT), do_sample=False,
        max_new_tokens=GREEDY_NEW, min_new_tokens=GREEDY_NEW, pad_token_id=PAD_ID,
        output_scores=True, return_dict_in_generate=True,
    )
    greedy = out.sequences
    assert greedy.shape == (1, GREEDY_PROMPT.shape[1] + GREEDY_NEW), greedy.shape
    gaps = torch.tensor([top2_gap(s[0]) for s in out.scores], dtype=torch.float32)

    # Cross-check the KV-cached generate() against full recomputation without a cache.
    seq = GREEDY_PROMPT
    for _ in range(GREEDY_NEW):
        nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=-1)
    assert torch.equal(seq, greedy), (seq, greedy)

    return {
        "input_ids": INPUT_IDS.clone(),
        "logits": logits.contiguous(),
        "padded_input_ids": PADDED_INPUT_IDS.clone(),
        "padded_attention_mask": PADDED_MASK.clone(),
        "padded_position_ids": pos.contiguous(),
        "padded_logits": padded_logits.contiguous(),
        "greedy_prompt": GREEDY_PROMPT.clone(),
        "greedy_output": greedy.contiguous(),
        "greedy_top2_gap": gaps,
    }


def main():
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR")
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.use_deterministic_algorithms(True)

    manifest = {
        "generator": "tests/reference/make_tiny_models.py",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "safetensors": safetensors.__version__,
        },
        "seed": SEED,
        "pad_token_id": PAD_ID,
        "tokenizer": "tokenizer.json + tokenizer_config.json in every variant: byte-level BPE, "
                     "id = byte value (ByteLevel symbols), no merges, pad/bos/eos = ids 0/1/2",
        "reference_tensors": {
            "input_ids": "int64 [2,7]",
            "logits": "float32 [2,7,vocab], model(input_ids), f32 eval",
            "padded_input_ids": "int64 [2,7], row 0 = 3 left pads (id 0) + 4 tokens, row 1 full",
            "padded_attention_mask": "int64 [2,7]",
            "padded_position_ids": "int64 [2,7] = (mask.cumsum(-1)-1).clamp(min=0), passed explicitly",
            "padded_logits": "float32 [2,7,vocab]; rows at mask==0 are meaningless, compare mask==1 only",
            "greedy_prompt": "int64 [1,5]",
            "greedy_output": "int64 [1,17], prompt + 12 argmax tokens, eos disabled (no stop, no masking)",
            "greedy_top2_gap": "float32 [12], top1-top2 logit gap at each generated step",
        },
        "variants": {},
    }

    for name, (build, gen_eos, save_kwargs, post_save, desc) in VARIANTS.items():
        path = out_dir / name
        if path.exists():
            shutil.rmtree(path)  # stale shards from an older run would confuse loaders
        model = build()
        model.generation_config = GenerationConfig(
            bos_token_id=BOS_ID, eos_token_id=gen_eos, pad_token_id=PAD_ID)
        model.save_pretrained(path, **save_kwargs)
        if post_save:
            post_save(path)
        write_tokenizer(path)

        ref = reference_tensors(path)
        save_file(ref, str(path / "reference.safetensors"), metadata={"format": "pt"})

        files = sorted(p.name for p in path.iterdir())
        manifest["variants"][name] = {
            "description": desc,
            "architecture": type(model).__name__,
            "files": files,
            "min_greedy_top2_gap": float(ref["greedy_top2_gap"].min()),
        }
        print(f"{name:14s} {type(model).__name__:20s} files={files} "
              f"min_gap={ref['greedy_top2_gap'].min():.4f}")

    # Weight-sharing variants must agree with `llama` (identical weights; bf16 excepted).
    base = (out_dir / "llama")
    from safetensors.torch import load_file
    base_ref = load_file(str(base / "reference.safetensors"))
    for name in ("llama-legacy", "llama-sharded"):
        other = load_file(str(out_dir / name / "reference.safetensors"))
        for k in ("logits", "padded_logits", "greedy_output"):
            assert torch.equal(base_ref[k], other[k]), (name, k)
    legacy_cfg = json.loads((out_dir / "llama-legacy" / "config.json").read_text())
    assert "rope_parameters" not in legacy_cfg and "dtype" not in legacy_cfg
    sharded = [f for f in manifest["variants"]["llama-sharded"]["files"] if f.startswith("model-")]
    assert len(sharded) >= 2, sharded

    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {out_dir / 'manifest.json'}")


if __name__ == "__main__":
    main()
