"""DSPy references for the Rust prompt module (tests/prompt_parity.rs).

    python dspy_reference.py OUT_DIR

Writes OUT_DIR/index.json with:
- format: `dspy.ChatAdapter().format(signature, demos, inputs)` (and JSONAdapter's) messages for
  several signatures: default and custom instructions, several fields, typed inputs/outputs, field
  descriptions, complete and incomplete demos, ChainOfThought's extended signature;
- parse: ChatAdapter/JSONAdapter `parse(signature, completion)` results and failures;
- random: Python's `random.Random(seed)` sample/shuffle outputs (the optimisers' sampling);
- metrics: `normalize_text`, `f1_score`, `answer_exact_match`;
- teleprompt: demos LabeledFewShot and BootstrapFewShot pick with a dictionary DummyLM;
- state: `dump_state()` of programs with demos and instructions;
- random_search: `BootstrapFewShotWithRandomSearch` with a dummy LM whose answers depend on the
  number of demos in the prompt: every candidate's seed, demos, score and subscores, and the
  order of `candidate_programs`;
- mipro: what `MIPROv2.compile` builds before its Optuna search (the search itself is replaced,
  so Optuna is not needed): the valset after `auto`'s subsampling, the demo-set candidates,
  the instruction candidates (a dictionary DummyLM as prompt model answers by the proposal's
  random tip), the number of trials and whether minibatches are used;
- finetune: `BootstrapFinetune`'s chat fine-tuning records (`bootstrap_trace_data` with a
  dictionary DummyLM, then `_prepare_finetune_data`: metric filter, `format_finetune_data`,
  the `random.Random(0)` shuffle), for a teacher without and with labeled demos.

Each signature is described in a small JSON "spec" that the Rust test rebuilds with the typed
builder, so both sides format the same thing.
"""

import json
import os
import random
import sys
from typing import Literal

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("DSPY_CACHEDIR", os.path.join(sys.argv[1] if len(sys.argv) > 1 else ".", ".dspy-cache"))

import dspy  # noqa: E402
from dspy.evaluate.metrics import answer_exact_match, f1_score, normalize_text  # noqa: E402
from dspy.utils.dummies import DummyLM  # noqa: E402
from dspy.utils.exceptions import AdapterParseError  # noqa: E402

TYPES = {
    "str": str,
    "int": int,
    "float": float,
    "bool": bool,
    "list[str]": list[str],
}


def py_type(t):
    if isinstance(t, dict):  # {"literal": [...]}
        return Literal[tuple(t["literal"])]
    return TYPES[t]


def build(spec):
    """A signature from a spec: {"string": ...} or {"inputs": [...], "outputs": [...], "instructions"}."""
    if "string" in spec:
        return dspy.Signature(spec["string"], spec.get("instructions"))
    fields = {}
    for kind, maker in (("inputs", dspy.InputField), ("outputs", dspy.OutputField)):
        for f in spec[kind]:
            kwargs = {"desc": f["desc"]} if "desc" in f else {}
            fields[f["name"]] = (py_type(f.get("type", "str")), maker(**kwargs))
    return dspy.Signature(fields, spec.get("instructions"))


def demos_of(case):
    return [dspy.Example(**d) for d in case.get("demos", [])]


FORMAT_CASES = [
    {"name": "basic", "spec": {"string": "question -> answer"}, "inputs": {"question": "What is 2+2?"}},
    {
        "name": "several_fields_custom_instructions",
        "spec": {
            "string": "context, question -> reasoning, answer",
            "instructions": "Answer the question from the context.\nBe brief; one line.\n\n  Indented line.",
        },
        "inputs": {"context": "Paris is the capital of France.", "question": "Capital of France?"},
    },
    {
        "name": "typed_string_signature",
        "spec": {"string": "question: str, n: int -> answer: list[str], confident: bool"},
        "inputs": {"question": "Name some colours", "n": 3},
    },
    {
        "name": "typed_outputs_with_descriptions",
        "spec": {
            "inputs": [
                {"name": "text", "desc": "a customer message"},
                {"name": "max_words", "type": "int"},
                {"name": "ratio", "type": "float", "desc": "a float input"},
            ],
            "outputs": [
                {"name": "label", "type": {"literal": ["billing", "technical", "other"]}, "desc": "the intent"},
                {"name": "urgency", "type": "int", "desc": "1 to 5"},
                {"name": "score", "type": "float"},
                {"name": "escalate", "type": "bool"},
                {"name": "keywords", "type": "list[str]", "desc": "salient words"},
                {"name": "summary"},
            ],
            "instructions": "Classify the support ticket.",
        },
        "inputs": {"text": "My card was charged twice!", "max_words": 12, "ratio": 0.25},
    },
    {
        "name": "list_and_multiline_inputs",
        "spec": {"string": "passages, question -> answer"},
        "inputs": {
            "passages": ["First passage.", "Second\npassage with a newline.", "Third «quoted»."],
            "question": "Line one\nline two",
        },
    },
    {
        "name": "single_item_and_empty_list_inputs",
        "spec": {"string": "passages, extra -> answer"},
        "inputs": {"passages": ["Only passage."], "extra": []},
    },
    {
        "name": "demos_complete",
        "spec": {"string": "question -> answer", "instructions": "Answer with a number."},
        "demos": [
            {"question": "1+1?", "answer": "2"},
            {"question": "2+3?", "answer": "5", "augmented": True},
        ],
        "inputs": {"question": "3+4?"},
    },
    {
        "name": "demos_incomplete",
        "spec": {"string": "context, question -> reasoning, answer"},
        "demos": [
            {"question": "1+1?", "answer": "2"},
            {"context": "c1", "question": "q1", "reasoning": "r1", "answer": "a1"},
            {"context": "c2", "question": "q2", "answer": "a2"},
            {"question": "only input"},
            {"answer": "only output"},
        ],
        "inputs": {"context": "c", "question": "q"},
    },
    {
        "name": "demos_typed",
        "spec": {
            "inputs": [{"name": "text"}],
            "outputs": [
                {"name": "label", "type": {"literal": ["positive", "negative"]}},
                {"name": "confidence", "type": "float"},
                {"name": "tags", "type": "list[str]"},
                {"name": "sarcastic", "type": "bool"},
                {"name": "stars", "type": "int"},
            ],
        },
        "demos": [
            {"text": "Great!", "label": "positive", "confidence": 0.9, "tags": ["joy", "ünïcode"],
             "sarcastic": False, "stars": 5},
            {"text": "Meh", "label": "negative", "confidence": 1.0, "tags": [], "sarcastic": True, "stars": 2},
        ],
        "inputs": {"text": "Not bad at all"},
    },
    {
        "name": "chain_of_thought",
        "spec": {"string": "question -> answer"},
        "cot": True,
        "demos": [{"question": "1+1?", "reasoning": "One plus one.", "answer": "2"}],
        "inputs": {"question": "What is 2+2?"},
    },
    {
        "name": "chain_of_thought_typed",
        "spec": {"string": "question -> answer: int", "instructions": "Solve the arithmetic problem."},
        "cot": True,
        "inputs": {"question": "What is 6*7?"},
    },
    {
        "name": "literal_string_signature",
        "spec": {"string": "sentence -> sentiment: Literal['positive', 'negative', \"it's mixed\"]"},
        "inputs": {"sentence": "I love it"},
    },
    {
        "name": "camel_and_digits_field_names",
        "spec": {"string": "userQuery, doc2 -> finalAnswer"},
        "inputs": {"userQuery": "hi", "doc2": "there"},
    },
]


def signature_spec_json(sig):
    """What Rust needs to rebuild the extended (e.g. ChainOfThought) signature."""
    def field(name, info):
        d = {"name": name}
        desc = info.json_schema_extra["desc"]
        if desc != f"${{{name}}}":
            d["desc"] = desc
        return d

    return {
        "instructions": sig.instructions,
        "inputs": [field(k, v) for k, v in sig.input_fields.items()],
        "outputs": [field(k, v) for k, v in sig.output_fields.items()],
    }


def format_cases():
    out = []
    for case in FORMAT_CASES:
        sig = build(case["spec"])
        if case.get("cot"):
            sig = dspy.ChainOfThought(sig).predict.signature
        demos = demos_of(case)
        chat = dspy.ChatAdapter().format(sig, demos, case["inputs"])
        js = dspy.JSONAdapter().format(sig, demos, case["inputs"])
        out.append({
            **case,
            "signature": signature_spec_json(sig),
            "instructions": sig.instructions,
            "chat_messages": chat,
            "json_messages": js,
        })
    return out


PARSE_SPECS = {
    "qa": {"string": "question -> answer"},
    "cot": {"string": "question -> reasoning, answer"},
    "typed": {
        "inputs": [{"name": "text"}],
        "outputs": [
            {"name": "label", "type": {"literal": ["positive", "negative"]}},
            {"name": "stars", "type": "int"},
            {"name": "score", "type": "float"},
            {"name": "ok", "type": "bool"},
            {"name": "tags", "type": "list[str]"},
        ],
    },
}

CHAT_PARSE = [
    ("qa", "[[ ## answer ## ]]\n4\n\n[[ ## completed ## ]]"),
    ("qa", "[[ ## answer ## ]] 4"),
    ("qa", "Sure!\n[[ ## answer ## ]]\nline one\nline two\n\n[[ ## answer ## ]]\nsecond copy"),
    ("qa", "  [[ ## answer ## ]]  \n  padded  \n"),
    ("qa", "The answer is 4."),
    ("qa", "[[ ## answr ## ]]\n4"),
    ("qa", "[[ ## answer ## ]]\r\nwindows\r\n[[ ## completed ## ]]"),
    ("cot", "[[ ## reasoning ## ]]\nthink\n\n[[ ## answer ## ]]\n42\n\n[[ ## completed ## ]]"),
    ("cot", "[[ ## reasoning ## ]]\nthink only"),
    ("cot", "[[ ## answer ## ]]\nfirst\n[[ ## reasoning ## ]]\nthen"),
    ("typed", "[[ ## label ## ]]\npositive\n[[ ## stars ## ]]\n4\n[[ ## score ## ]]\n0.5\n"
              "[[ ## ok ## ]]\nTrue\n[[ ## tags ## ]]\n[\"a\", \"b\"]\n[[ ## completed ## ]]"),
    ("typed", "[[ ## label ## ]]\n'negative'\n[[ ## stars ## ]]\n4.0\n[[ ## score ## ]]\n3\n"
              "[[ ## ok ## ]]\nfalse\n[[ ## tags ## ]]\n['x']"),
    ("typed", "[[ ## label ## ]]\nLiteral[positive]\n[[ ## stars ## ]]\n 5 \n[[ ## score ## ]]\n1e3\n"
              "[[ ## ok ## ]]\nyes\n[[ ## tags ## ]]\n[]"),
    ("typed", "[[ ## label ## ]]\n\"positive\"\n[[ ## stars ## ]]\n\"3\"\n[[ ## score ## ]]\n-2.5\n"
              "[[ ## ok ## ]]\n0\n[[ ## tags ## ]]\n```json\n[\"fenced\"]\n```"),
    ("typed", "[[ ## label ## ]]\nPositive\n[[ ## stars ## ]]\n4\n[[ ## score ## ]]\n1\n"
              "[[ ## ok ## ]]\nTrue\n[[ ## tags ## ]]\n[]"),
    ("typed", "[[ ## label ## ]]\npositive\n[[ ## stars ## ]]\nfour\n[[ ## score ## ]]\n1\n"
              "[[ ## ok ## ]]\nTrue\n[[ ## tags ## ]]\n[]"),
    ("typed", "[[ ## label ## ]]\npositive\n[[ ## stars ## ]]\n4.5\n[[ ## score ## ]]\n1\n"
              "[[ ## ok ## ]]\nTrue\n[[ ## tags ## ]]\n[]"),
    ("typed", "[[ ## label ## ]]\npositive\n[[ ## stars ## ]]\n4\n[[ ## score ## ]]\n1\n"
              "[[ ## ok ## ]]\nmaybe\n[[ ## tags ## ]]\n[]"),
    ("typed", "[[ ## label ## ]]\npositive\n[[ ## stars ## ]]\n4\n[[ ## score ## ]]\n1\n"
              "[[ ## ok ## ]]\nTrue\n[[ ## tags ## ]]\n[1, 2]"),
    ("typed", "[[ ## label ## ]]\npositive\n[[ ## stars ## ]]\n4\n[[ ## score ## ]]\n1\n"
              "[[ ## ok ## ]]\nTrue\n[[ ## tags ## ]]\nplain words"),
    ("typed", "[[ ## label ## ]]\npositive\n[[ ## stars ## ]]\nTrue\n[[ ## score ## ]]\nFalse\n"
              "[[ ## ok ## ]]\n1\n[[ ## tags ## ]]\n[a, b]"),
]

JSON_PARSE = [
    ("qa", '{"answer": "4"}'),
    ("qa", 'Here you go: {"answer": "4", "extra": 1} done'),
    ("qa", '```json\n{"answer": "fenced"}\n```'),
    ("qa", '{"answer": 4}'),
    ("qa", '{"reply": "4"}'),
    ("qa", "no json at all"),
    ("cot", '{"reasoning": "r", "answer": "a"}'),
    ("cot", '{"answer": "a"}'),
    ("typed", '{"label": "negative", "stars": 2, "score": 0.5, "ok": false, "tags": ["t"]}'),
    ("typed", '{"label": "positive", "stars": "4", "score": "0.25", "ok": "true", "tags": []}'),
    ("typed", '{"label": "neutral", "stars": 2, "score": 0.5, "ok": false, "tags": []}'),
    ("typed", 'prefix {"label": "positive", "stars": 1, "score": 1, "ok": true, "tags": ["a"], "x": {"y": 1}} suffix'),
]


def parse_one(adapter, sig, completion):
    try:
        fields = adapter.parse(sig, completion)
        return {"ok": {k: v for k, v in fields.items()}}
    except AdapterParseError:
        return {"error": "AdapterParseError"}
    except Exception as e:  # noqa: BLE001 - recorded, the test expects a failure too
        return {"error": type(e).__name__}


def parse_cases():
    out = []
    for adapter_name, adapter, cases in (
        ("chat", dspy.ChatAdapter(), CHAT_PARSE),
        ("json", dspy.JSONAdapter(), JSON_PARSE),
    ):
        for spec_name, completion in cases:
            sig = build(PARSE_SPECS[spec_name])
            out.append({
                "adapter": adapter_name,
                "spec": PARSE_SPECS[spec_name],
                "completion": completion,
                "result": parse_one(adapter, sig, completion),
            })
    return out


def random_cases():
    out = []
    for seed in (0, 1, 42, 2**40 + 7):
        r = random.Random(seed)
        out.append({"seed": seed, "op": "getrandbits32", "result": [r.getrandbits(32) for _ in range(5)]})
    for seed, n, k in ((0, 10, 3), (0, 25, 16), (0, 5, 5), (0, 100, 4), (0, 100, 16), (7, 30, 10),
                       (0, 1000, 12), (3, 22, 1), (0, 0, 0), (0, 40, 6)):
        out.append({"seed": seed, "op": "sample", "n": n, "k": k,
                    "result": random.Random(seed).sample(list(range(n)), k)})
    for seed, n in ((0, 10), (0, 1), (5, 33), (0, 100)):
        xs = list(range(n))
        random.Random(seed).shuffle(xs)
        out.append({"seed": seed, "op": "shuffle", "n": n, "result": xs})
    # The same generator drawn twice, as LabeledFewShot does over several predictors.
    r = random.Random(0)
    out.append({"seed": 0, "op": "sample_twice", "n": 12, "k": 5,
                "result": [r.sample(list(range(12)), 5), r.sample(list(range(12)), 5)]})
    return out


METRIC_STRINGS = [
    ("The Eiffel Tower!", "eiffel tower"),
    ("Paris, France", "paris"),
    ("  An   apple a day ", "apple day"),
    ("Café", "cafe\u0301"),
    ("the the the", ""),
    ("New York City", "new york"),
    ("A-B testing", "ab testing"),
    ("théâtre THE", "Théâtre"),
    ("", ""),
    ("42", "42.0"),
]


def metric_cases():
    out = []
    for a, b in METRIC_STRINGS:
        ex = dspy.Example(answer=b)
        pred = dspy.Prediction(answer=a)
        out.append({
            "prediction": a,
            "answer": b,
            "normalized_prediction": normalize_text(a),
            "normalized_answer": normalize_text(b),
            "f1": float(f1_score(a, b)),
            "exact_match": bool(answer_exact_match(ex, pred)),
            "match_frac_0_5": bool(answer_exact_match(ex, pred, frac=0.5)),
        })
    ex = dspy.Example(answer=["Eiffel Tower", "Louvre"])
    out.append({"prediction": "the louvre", "answers": ["Eiffel Tower", "Louvre"],
                "exact_match": bool(answer_exact_match(ex, dspy.Prediction(answer="the louvre")))})
    return out


# ---- optimisers ---------------------------------------------------------------------------

def arithmetic_trainset(n):
    """Questions `What is a + b?` with answers; the dummy LM gets every third one wrong."""
    items = []
    for i in range(n):
        a, b = 3 * i + 1, 7 * i + 2
        items.append(dspy.Example(question=f"What is {a} + {b}?", answer=str(a + b)).with_inputs("question"))
    return items


def dummy_answers(trainset):
    """question → the answer the dummy LM gives: wrong for every third question."""
    answers = {}
    for i, ex in enumerate(trainset):
        answers[ex.question] = {"answer": ex.answer if i % 3 != 1 else "wrong"}
    return answers


def cot_dummy_answers(trainset):
    answers = {}
    for i, ex in enumerate(trainset):
        answers[ex.question] = {"reasoning": f"Add the numbers of example {i}.",
                                "answer": ex.answer if i % 3 != 1 else "wrong"}
    return answers


def exact_answer(example, pred, trace=None):
    return example.answer == pred.answer


def demo_list(program):
    return {name: [d.toDict() for d in p.demos] for name, p in program.named_predictors()}


class TwoStep(dspy.Module):
    """A user-defined module with two predictors (a draft, then an answer from it)."""

    def __init__(self):
        super().__init__()
        self.draft = dspy.Predict("question -> draft")
        self.answer = dspy.Predict("question, draft -> answer")

    def forward(self, question):
        d = self.draft(question=question).draft
        return self.answer(question=question, draft=d)


def two_step_answers(trainset):
    answers = {}
    for i, ex in enumerate(trainset):
        # The draft step's last message contains the question; the answer step's contains the draft.
        answers[f"DRAFT{i}:"] = {"answer": ex.answer if i % 3 != 1 else "wrong"}
        answers[ex.question] = {"draft": f"DRAFT{i}: {ex.question}"}
    return answers


def teleprompt_cases():
    out = []
    for n, k in ((10, 3), (25, 16), (5, 16)):
        trainset = arithmetic_trainset(n)
        compiled = dspy.LabeledFewShot(k=k).compile(dspy.Predict("question -> answer"), trainset=trainset)
        out.append({"optimizer": "LabeledFewShot", "k": k, "trainset_size": n, "program": "predict",
                    "demos": demo_list(compiled)})

    configs = [
        {"trainset_size": 12, "max_bootstrapped_demos": 4, "max_labeled_demos": 16, "program": "predict"},
        {"trainset_size": 30, "max_bootstrapped_demos": 4, "max_labeled_demos": 16, "program": "predict"},
        {"trainset_size": 30, "max_bootstrapped_demos": 2, "max_labeled_demos": 5, "program": "predict"},
        {"trainset_size": 8, "max_bootstrapped_demos": 8, "max_labeled_demos": 0, "program": "predict"},
        {"trainset_size": 20, "max_bootstrapped_demos": 3, "max_labeled_demos": 6, "program": "cot"},
        {"trainset_size": 15, "max_bootstrapped_demos": 3, "max_labeled_demos": 4, "program": "two_step"},
    ]
    for c in configs:
        trainset = arithmetic_trainset(c["trainset_size"])
        if c["program"] == "predict":
            program, answers = dspy.Predict("question -> answer"), dummy_answers(trainset)
        elif c["program"] == "cot":
            program, answers = dspy.ChainOfThought("question -> answer"), cot_dummy_answers(trainset)
        else:
            program, answers = TwoStep(), two_step_answers(trainset)
        lm = DummyLM(answers)
        with dspy.context(lm=lm):
            compiled = dspy.BootstrapFewShot(
                metric=exact_answer,
                max_bootstrapped_demos=c["max_bootstrapped_demos"],
                max_labeled_demos=c["max_labeled_demos"],
            ).compile(program, trainset=trainset)
        out.append({"optimizer": "BootstrapFewShot", **c, "dummy_answers": answers,
                    "demos": demo_list(compiled)})
    return out


class DemoCountingDummyLM(DummyLM):
    """DummyLM's dictionary mode, except that which questions it gets wrong depends on the
    prompt's demos: with `k` the index (in the full list) of the first demo's question, or 0
    without demos, question `i` is answered wrongly when `(i + k) % 3 == 1` — so candidates
    with different demo sets score differently."""

    def __init__(self, questions, gold):
        super().__init__({})
        self.questions, self.gold = questions, gold
        lm = self

        class Engine(type(self._engine_spec)):
            def _complete_messages(self, messages):
                from dspy.lm15 import Message, Response, TextPart, Usage
                def index(content):
                    return next((i for i, q in enumerate(lm.questions) if q in content), None)

                k = (index(messages[1]["content"]) or 0) if len(messages) > 2 else 0
                text = "No more responses"
                for i, q in enumerate(lm.questions):
                    if q in messages[-1]["content"]:
                        answer = lm.gold[i] if (i + k) % 3 != 1 else "wrong"
                        text = lm._format_answer_fields({"answer": answer})
                        break
                return Response(id=None, model="dummy", message=Message.assistant([TextPart(text)]),
                                finish_reason="stop", usage=Usage(input_tokens=0, output_tokens=0, total_tokens=0))

        self._engine_spec = Engine(self)
        from dspy.clients.engines.dummy_engine import AsyncDummyEngine
        self._async_engine_spec = AsyncDummyEngine(self._engine_spec)


def random_search_cases():
    configs = [
        {"trainset_size": 10, "valset_size": 7, "num_candidate_programs": 5,
         "max_bootstrapped_demos": 3, "max_labeled_demos": 4, "stop_at_score": None},
        {"trainset_size": 16, "valset_size": 11, "num_candidate_programs": 16,
         "max_bootstrapped_demos": 4, "max_labeled_demos": 16, "stop_at_score": None},
        {"trainset_size": 12, "valset_size": 5, "num_candidate_programs": 8,
         "max_bootstrapped_demos": 2, "max_labeled_demos": 3, "stop_at_score": 80.0},
    ]
    out = []
    for c in configs:
        full = arithmetic_trainset(c["trainset_size"] + c["valset_size"])
        trainset, valset = full[: c["trainset_size"]], full[c["trainset_size"]:]
        lm = DemoCountingDummyLM([x.question for x in full], [x.answer for x in full])
        with dspy.context(lm=lm):
            best = dspy.BootstrapFewShotWithRandomSearch(
                metric=exact_answer,
                max_bootstrapped_demos=c["max_bootstrapped_demos"],
                max_labeled_demos=c["max_labeled_demos"],
                num_candidate_programs=c["num_candidate_programs"],
                stop_at_score=c["stop_at_score"],
                num_threads=1,
            ).compile(dspy.Predict("question -> answer"), trainset=trainset, valset=valset)
        out.append({**c,
                    "candidates": [{"seed": d["seed"], "score": d["score"],
                                    "subscores": [float(x) for x in d["subscores"]],
                                    "demos": demo_list(d["program"])}
                                   for d in best.candidate_programs],
                    "best_demos": demo_list(best)})
    return out


def proposer_answers():
    """The prompt model's replies (DummyLM dictionary mode: the first key in the last message)."""
    from dspy.propose.grounded_proposer import TIPS
    answers = {}
    for key, tip in TIPS.items():
        if tip:
            answers[tip] = {"proposed_instruction": f"Proposed instruction: Solve it ({key})."}
    answers["[[ ## basic_instruction ## ]]"] = {"proposed_instruction": "Solve it (no tip)."}
    answers["field `[[ ## module_description ## ]]`"] = {"module_description": "It adds."}
    answers["field `[[ ## program_description ## ]]`"] = {"program_description": "Arithmetic."}
    answers["field `[[ ## summary ## ]]`"] = {"summary": "Summary: additions of two numbers."}
    answers["field `[[ ## observations ## ]]`"] = {"observations": "Questions ask for sums."}
    return answers


def mipro_cases():
    class Captured(Exception):
        pass

    class PlanOnly(dspy.MIPROv2):
        def _optimize_prompt_parameters(self, program, instruction_candidates, demo_candidates, evaluate,
                                        valset, num_trials, minibatch, *args):
            self.plan = {
                "valset": [x.question for x in valset],
                "num_trials": num_trials,
                "minibatch": minibatch,
                "instruction_candidates": [instruction_candidates[i] for i in sorted(instruction_candidates)],
                "demo_candidates": None if demo_candidates is None else [
                    [[d.toDict() for d in s] for s in demo_candidates[i]] for i in sorted(demo_candidates)],
            }
            return program

    configs = [
        {"trainset_size": 20, "valset_size": 60, "auto": "light", "num_candidates": None, "num_trials": None,
         "max_bootstrapped_demos": 3, "max_labeled_demos": 4, "seed": 9, "minibatch_size": 35},
        {"trainset_size": 10, "valset_size": 12, "auto": None, "num_candidates": 5, "num_trials": 7,
         "max_bootstrapped_demos": 4, "max_labeled_demos": 4, "seed": 3, "minibatch_size": 6},
        {"trainset_size": 8, "valset_size": 10, "auto": "light", "num_candidates": None, "num_trials": None,
         "max_bootstrapped_demos": 0, "max_labeled_demos": 0, "seed": 9, "minibatch_size": 35},
    ]
    out = []
    for c in configs:
        full = arithmetic_trainset(c["trainset_size"] + c["valset_size"])
        trainset, valset = full[: c["trainset_size"]], full[c["trainset_size"]:]
        task = DemoCountingDummyLM([x.question for x in full], [x.answer for x in full])
        answers = proposer_answers()
        opt = PlanOnly(metric=exact_answer, prompt_model=DummyLM(answers), task_model=task,
                       max_bootstrapped_demos=c["max_bootstrapped_demos"],
                       max_labeled_demos=c["max_labeled_demos"], auto=c["auto"],
                       num_candidates=c["num_candidates"], seed=c["seed"], num_threads=1)
        kwargs = {"num_trials": c["num_trials"]} if c["num_trials"] else {}
        opt.compile(dspy.Predict("question -> answer"), trainset=trainset, valset=valset,
                    minibatch_size=c["minibatch_size"], **kwargs)
        out.append({**c, "proposer_answers": answers, **opt.plan})
    return out


def finetune_cases():
    from dspy.teleprompt.bootstrap_trace import bootstrap_trace_data
    out = []
    for n, k in ((9, 0), (7, 2)):
        trainset = arithmetic_trainset(n)
        lm = DummyLM(dummy_answers(trainset))
        student = dspy.Predict("question -> answer")
        teacher = (dspy.LabeledFewShot(k=k).compile(dspy.Predict("question -> answer"), trainset=trainset)
                   if k else student)
        with dspy.context(lm=lm):
            trace_data = bootstrap_trace_data(program=teacher, dataset=trainset, metric=exact_answer, num_threads=1)
        data, data_format = dspy.BootstrapFinetune(metric=exact_answer)._prepare_finetune_data(
            trace_data=trace_data, lm=lm)
        out.append({"trainset_size": n, "teacher_demos": k, "data_format": str(data_format),
                    "records": data})
    return out


def state_cases():
    out = []
    trainset = arithmetic_trainset(6)
    p = dspy.LabeledFewShot(k=2).compile(dspy.Predict("question -> answer"), trainset=trainset)
    out.append({"program": "predict", "state": p.dump_state()})
    cot = dspy.ChainOfThought(dspy.Signature("question -> answer", "Think, then answer."))
    cot.predict.demos = [dspy.Example(question="q", reasoning="r", answer="a", augmented=True)]
    out.append({"program": "cot", "state": cot.dump_state()})
    two = TwoStep()
    two.answer.demos = [dspy.Example(question="q", draft="d", answer="a")]
    out.append({"program": "two_step", "state": two.dump_state()})
    return out


def main():
    if len(sys.argv) != 2:
        print("usage: dspy_reference.py OUT_DIR", file=sys.stderr)
        sys.exit(2)
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
    index = {
        "dspy_version": dspy.__version__,
        "format": format_cases(),
        "parse": parse_cases(),
        "random": random_cases(),
        "metrics": metric_cases(),
        "teleprompt": teleprompt_cases(),
        "state": state_cases(),
        "random_search": random_search_cases(),
        "mipro": mipro_cases(),
        "finetune": finetune_cases(),
    }
    tmp = os.path.join(out_dir, "index.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(index, f, ensure_ascii=False, indent=1)
    os.replace(tmp, os.path.join(out_dir, "index.json"))
    print(f"dspy_reference: {len(index['format'])} format, {len(index['parse'])} parse, "
          f"{len(index['teleprompt'])} optimiser cases in {out_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
