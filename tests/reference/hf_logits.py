"""Loads a Hugging Face model folder with transformers and writes its logits for given ids.

Usage: hf_logits.py MODEL_DIR IDS_JSON OUT_SAFETENSORS
IDS_JSON holds a list of lists of token ids (equal lengths). Used by Rust tests to prove that a
folder qlora wrote (e.g. a merged adapter export) loads in transformers with the same numbers.
"""
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def main():
    model_dir, ids_path, out_path = sys.argv[1:4]
    ids = torch.tensor(json.load(open(ids_path)), dtype=torch.long)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(ids).logits.float().contiguous()
    # The tokenizer must load too (a folder without a usable tokenizer is not a usable model).
    tok = AutoTokenizer.from_pretrained(model_dir)
    rendered = ""
    if tok.chat_template:
        rendered = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    save_file({"logits": logits}, out_path, metadata={"rendered_chat": rendered})


if __name__ == "__main__":
    main()
