#!/usr/bin/env python3
"""SFT tokenisation references (TRL's completion-only semantics) for the GGUF model's tokenizer.

Usage: data_reference.py GGUF_PATH OUT_DIR

Writes the datasets as JSONL files into OUT_DIR and, for every row, the input ids and the
0/1 completion mask that TRL's SFTTrainer trains on (OUT_DIR/index.json, written last):

- conversations (chat, prompt/completion and Alpaca rows rendered as a conversation): for each
  assistant turn i, prompt = apply_chat_template(messages[:i], add_generation_prompt=True,
  tokenize=True), upto = apply_chat_template(messages[:i+1], tokenize=True); both must be
  prefixes of the whole conversation's ids, and the tokens in [len(prompt), len(upto)) are
  trained on (the assistant's content and the end-of-turn tokens the template writes after it).
  For a single-turn prompt/completion row this is exactly TRL's `completion_mask`.
- prompt/completion without a chat template: TRL's non-conversational path,
  prompt_ids = tokenizer(prompt), ids = tokenizer(prompt + completion) + [eos], the mask is 1
  after the prompt's ids.
- plain text: tokenizer(text) + [eos], every token trained on.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoTokenizer

LONG_ANSWER = " ".join(
    f"Step {i}: mix the ingredients thoroughly, wait {i * 3} minutes, then taste and adjust."
    for i in range(1, 26)
)

CHAT = [
    {"messages": [{"role": "user", "content": "What is 2+2?"},
                  {"role": "assistant", "content": "4"}]},
    {"messages": [{"role": "system", "content": "You are terse."},
                  {"role": "user", "content": "Name a fruit."},
                  {"role": "assistant", "content": "Apple."}]},
    {"messages": [{"role": "system", "content": "You answer in French."},
                  {"role": "user", "content": "Hello!"},
                  {"role": "assistant", "content": "Bonjour !"},
                  {"role": "user", "content": "How are you?"},
                  {"role": "assistant", "content": "Très bien, merci.\nEt vous ?"}]},
    {"messages": [{"role": "user", "content": "Ünïcödé: 你好，世界 🚀 — «quotes» ½"},
                  {"role": "assistant", "content": "日本語のテキスト and emoji 👨‍👩‍👧 ok"}]},
    {"messages": [{"role": "user", "content": "Give me a long recipe."},
                  {"role": "assistant", "content": LONG_ANSWER}]},
    {"messages": [{"role": "user", "content": "  spaces around  "},
                  {"role": "assistant", "content": "trailing spaces and newline  \n"}]},
]

# The same conversations in ShareGPT form (`conversations`, {from, value}).
SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}
SHAREGPT = [{"conversations": [{"from": SHAREGPT_ROLE[m["role"]], "value": m["content"]}
                               for m in row["messages"]]} for row in CHAT[:3]]

PROMPT_COMPLETION = [
    {"prompt": "Translate to German: cat", "completion": "Katze"},
    {"prompt": "Classify the intent: I lost my card", "completion": "lost_or_stolen_card"},
    {"prompt": "Write two lines.\nAbout the sea.", "completion": "Waves fold and unfold,\nsalt on the wind. 🌊"},
]

ALPACA = [
    {"instruction": "Summarise the text.", "input": "The cat sat on the mat all day.",
     "output": "A cat rested on a mat."},
    {"instruction": "Name three colours.", "input": "", "output": "Red, green, blue."},
    {"instruction": "Say hi in Spanish.", "output": "¡Hola!"},
]

TEXT = [
    {"text": "The quick brown fox jumps over the lazy dog."},
    {"text": "Línea uno\nLine two 😀"},
]


def ids_of(tok, messages, add_generation_prompt):
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def conversation_reference(tok, messages):
    ids = ids_of(tok, messages, False)
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = ids_of(tok, messages[:i], True)
        upto = ids_of(tok, messages[: i + 1], False)
        assert upto[: len(prompt)] == prompt, f"prompt ids are no prefix at turn {i}"
        assert ids[: len(upto)] == upto, f"turn {i} ids are no prefix of the conversation"
        for t in range(len(prompt), len(upto)):
            mask[t] = 1
    return {"messages": messages, "input_ids": ids, "mask": mask}


def alpaca_messages(row):
    user = row["instruction"]
    if row.get("input"):
        user += "\n\n" + row["input"]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]


def write_jsonl(path: Path, rows):
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main():
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} GGUF_PATH OUT_DIR")
    gguf_path = Path(sys.argv[1]).resolve()
    out = Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    eos = tok.eos_token_id

    datasets = {}

    def conversations(name, rows, to_messages):
        write_jsonl(out / f"{name}.jsonl", rows)
        datasets[name] = {"file": f"{name}.jsonl", "use_chat_template": True,
                          "rows": [conversation_reference(tok, to_messages(r)) for r in rows]}

    conversations("chat", CHAT, lambda r: r["messages"])
    conversations("sharegpt", SHAREGPT, lambda r: [
        {"role": {"human": "user", "gpt": "assistant", "system": "system"}[m["from"]],
         "content": m["value"]} for m in r["conversations"]])
    conversations("prompt_completion", PROMPT_COMPLETION, lambda r: [
        {"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}])
    conversations("alpaca", ALPACA, alpaca_messages)

    # Without the chat template: TRL's plain-text prompt/completion path.
    plain = []
    for r in PROMPT_COMPLETION:
        prompt_ids = tok(text=r["prompt"])["input_ids"]
        ids = tok(text=r["prompt"] + r["completion"])["input_ids"] + [eos]
        assert ids[: len(prompt_ids)] == prompt_ids
        plain.append({"input_ids": ids, "mask": [0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids))})
    datasets["prompt_completion_plain"] = {"file": "prompt_completion.jsonl",
                                           "use_chat_template": False, "rows": plain}

    write_jsonl(out / "text.jsonl", TEXT)
    text_rows = []
    for r in TEXT:
        ids = tok(text=r["text"])["input_ids"] + [eos]
        text_rows.append({"input_ids": ids, "mask": [1] * len(ids)})
    datasets["text"] = {"file": "text.jsonl", "use_chat_template": True, "rows": text_rows}

    index = {"eos_token_id": eos, "pad_token_id": tok.pad_token_id,
             "bos_token_id": tok.bos_token_id, "datasets": datasets}
    (out / "index.json").write_text(json.dumps(index, indent=1, ensure_ascii=False) + "\n")
    for name, d in datasets.items():
        lens = [len(r["input_ids"]) for r in d["rows"]]
        print(f"  {name}: {len(lens)} rows, lengths {lens}")


if __name__ == "__main__":
    main()
