#!/usr/bin/env python3
"""Real Python clients against a running `qlora serve` (tests/serve_python.rs starts it).

Usage: serve_clients.py BASE_URL MODEL API_KEY OUT_JSON

1. The `openai` client: a greedy chat completion, the same request streamed, a plain
   completion, and an unknown model (must raise NotFoundError, 404).
2. DSPy 3.4 with its default engine and with engine="litellm" (DSPy sends
   max_completion_tokens): dspy.Predict("question -> answer") with three labeled demos (a
   135M model follows DSPy's [[ ## field ## ]] format when shown examples), then a
   BootstrapFewShot compile on four examples.
Everything observed goes to OUT_JSON; the Rust test asserts on it. Exits 1 on an unexpected
exception (after writing what it has).
"""

import json
import os
import sys
import tempfile
import time
import traceback

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("DSPY_CACHEDIR", tempfile.mkdtemp(prefix="dspy-cache-"))

import dspy  # noqa: E402
import openai  # noqa: E402

QUESTION = "What is the capital of France? Answer in one word."
PAIRS = [("What is the capital of France?", "Paris"), ("What is the capital of Italy?", "Rome"),
         ("What is the capital of Spain?", "Madrid"), ("What is the capital of Germany?", "Berlin")]


def openai_checks(base_url, model, key):
    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=600)
    out = {}
    messages = [{"role": "user", "content": QUESTION}]
    r = client.chat.completions.create(model=model, messages=messages, temperature=0,
                                       max_completion_tokens=12)
    out["chat"] = {"text": r.choices[0].message.content, "finish_reason": r.choices[0].finish_reason,
                   "prompt_tokens": r.usage.prompt_tokens, "completion_tokens": r.usage.completion_tokens}
    pieces, finish, chunks = [], None, 0
    stream = client.chat.completions.create(model=model, messages=messages, temperature=0,
                                            max_tokens=12, stream=True)
    for chunk in stream:
        chunks += 1
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    out["stream"] = {"text": "".join(pieces), "finish_reason": finish, "chunks": chunks}
    c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=6,
                                  temperature=0)
    out["completion"] = {"text": c.choices[0].text}
    try:
        client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=2)
        out["unknown_model"] = {"raised": None}
    except openai.NotFoundError as e:
        out["unknown_model"] = {"raised": "NotFoundError", "status": e.status_code,
                                "code": (e.body or {}).get("code") if isinstance(e.body, dict) else None}
    return out


def dspy_checks(base_url, model, key, engine):
    lm = dspy.LM(f"openai/{model}", api_base=base_url, api_key=key, temperature=0.0,
                 max_tokens=24, cache=False, engine=engine)
    dspy.configure(lm=lm)
    train = [dspy.Example(question=q, answer=a).with_inputs("question") for q, a in PAIRS]
    predict = dspy.Predict("question -> answer")
    predict.demos = train[1:]
    pred = predict(question="What is the capital of Japan?")
    sent = lm.history[-1]
    tp = dspy.BootstrapFewShot(metric=lambda ex, p, trace=None: bool(p.answer),
                               max_bootstrapped_demos=2, max_labeled_demos=2)
    compiled = tp.compile(dspy.Predict("question -> answer"), trainset=train)
    return {
        "answer": pred.answer,
        "request_kwargs": sorted(k for k in sent.get("kwargs", {})),
        "compiled_demos": len(compiled.demos),
        "augmented_demos": sum(1 for d in compiled.demos if d.get("augmented")),
        "calls": len(lm.history),
    }


def main():
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    base_url, model, key, out_path = sys.argv[1:]
    result, ok = {"versions": {"openai": openai.__version__, "dspy": dspy.__version__}}, True
    steps = [("openai", lambda: openai_checks(base_url, model, key))]
    steps += [(f"dspy_{e}", lambda e=e: dspy_checks(base_url, model, key, e)) for e in ("auto", "litellm")]
    for name, step in steps:
        t0 = time.time()
        try:
            result[name] = step()
        except Exception:
            ok = False
            result[name] = {"error": traceback.format_exc()}
            traceback.print_exc()
        result[name]["seconds"] = round(time.time() - t0, 1)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=2)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
