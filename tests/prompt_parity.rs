//! Parity with DSPy 3.4 (issue 5, "Proof"), on data written by tests/reference/dspy_reference.py:
//! - `ChatAdapter().format(...)` and `JSONAdapter().format(...)` messages are byte-identical for
//!   signatures with default and custom instructions, several and typed fields, descriptions,
//!   complete and incomplete demos, list inputs, and ChainOfThought's extended signature;
//! - `parse(...)` gives the same typed fields, and fails where DSPy fails;
//! - Python's `random.Random` draws, the metrics, the demos LabeledFewShot and BootstrapFewShot
//!   pick (with DSPy's dictionary DummyLM mirrored by `ScriptedLm::answers_by_substring`), and
//!   the saved state of programs.
//!
//! Data: `make reference` (target/reference/dspy/index.json). Missing data fails the test.

mod common;

use std::path::PathBuf;

use qlora::prompt::py::PyRandom;
use qlora::prompt::teleprompt::TIPS;
use qlora::prompt::{
    f1_score, normalize_text, AnswerExactMatch, BootstrapFewShot, BootstrapFewShotWithRandomSearch,
    ChainOfThought, ChatAdapter, Context, Example, FieldRole, FieldType, JsonAdapter,
    LabeledFewShot, Metric, MiproV2, Module, Predict, Prediction, ReportRow, ScriptedLm, Signature,
};
use qlora::prompt::{metric_fn, Field};
use serde_json::Value;

fn reference() -> Value {
    let path: PathBuf = common::reference_dir().join("dspy/index.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: DSPy reference data missing, run `make reference` first",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap()
}

fn field_type(v: &Value) -> FieldType {
    match v {
        Value::String(s) => FieldType::parse(s).unwrap(),
        Value::Object(o) => FieldType::literal(
            o["literal"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().unwrap().to_string()),
        ),
        Value::Null => FieldType::Str,
        other => panic!("bad type {other}"),
    }
}

/// Rebuilds a signature from the script's spec (string form or typed field lists).
fn build(spec: &Value) -> Signature {
    if let Some(s) = spec["string"].as_str() {
        let sig = Signature::parse(s).unwrap();
        return match spec["instructions"].as_str() {
            Some(i) => sig.with_instructions(i),
            None => sig,
        };
    }
    let mut b = Signature::builder();
    for (kind, role) in [("inputs", FieldRole::Input), ("outputs", FieldRole::Output)] {
        for f in spec[kind].as_array().unwrap() {
            b = b.field(
                f["name"].as_str().unwrap(),
                role,
                field_type(&f["type"]),
                f["desc"].as_str(),
            );
        }
    }
    if let Some(i) = spec["instructions"].as_str() {
        b = b.instructions(i);
    }
    b.build().unwrap()
}

fn example(v: &Value) -> Example {
    Example::from_json(v).unwrap()
}

fn messages_json(ms: &[qlora::model::Message]) -> Vec<(String, String)> {
    ms.iter()
        .map(|m| (m.role.clone(), m.content.clone()))
        .collect()
}

fn reference_messages(v: &Value) -> Vec<(String, String)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap().to_string(),
                m["content"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn assert_same_messages(case: &str, ours: Vec<(String, String)>, theirs: Vec<(String, String)>) {
    assert_eq!(ours.len(), theirs.len(), "{case}: number of messages");
    for (i, (o, t)) in ours.iter().zip(&theirs).enumerate() {
        assert_eq!(o.0, t.0, "{case}: role of message {i}");
        assert!(
            o.1 == t.1,
            "{case}: message {i} ({}) differs\n--- ours ---\n{}\n--- DSPy ---\n{}\n",
            o.0,
            o.1,
            t.1
        );
    }
}

#[test]
fn chat_and_json_messages_equal_dspy() {
    let r = reference();
    assert_eq!(r["dspy_version"], "3.4.1");
    let cases = r["format"].as_array().unwrap();
    assert!(cases.len() >= 12);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let mut sig = build(&case["spec"]);
        if case["cot"].as_bool() == Some(true) {
            sig = ChainOfThought::new(sig).unwrap().predict.signature;
        }
        assert_eq!(
            sig.instructions(),
            case["instructions"].as_str().unwrap(),
            "{name}: instructions"
        );
        let demos: Vec<Example> = case["demos"]
            .as_array()
            .map(|d| d.iter().map(example).collect())
            .unwrap_or_default();
        let inputs = example(&case["inputs"]);
        assert_same_messages(
            &format!("{name} (ChatAdapter)"),
            messages_json(&ChatAdapter::new().format(&sig, &demos, &inputs)),
            reference_messages(&case["chat_messages"]),
        );
        assert_same_messages(
            &format!("{name} (JSONAdapter)"),
            messages_json(&JsonAdapter.format(&sig, &demos, &inputs)),
            reference_messages(&case["json_messages"]),
        );
    }
}

#[test]
fn chain_of_thought_signature_equals_dspy() {
    let r = reference();
    let case = r["format"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "chain_of_thought")
        .unwrap();
    let cot = ChainOfThought::new("question -> answer").unwrap();
    let names: Vec<&str> = cot
        .predict
        .signature
        .outputs()
        .iter()
        .map(|f: &Field| f.name.as_str())
        .collect();
    let want: Vec<&str> = case["signature"]["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, want);
}

#[test]
fn parsing_equals_dspy() {
    let r = reference();
    let mut failures_seen = 0;
    for case in r["parse"].as_array().unwrap() {
        let sig = build(&case["spec"]);
        let completion = case["completion"].as_str().unwrap();
        let ours = match case["adapter"].as_str().unwrap() {
            "chat" => ChatAdapter::new().parse(&sig, completion),
            _ => JsonAdapter.parse(&sig, completion),
        };
        match (&ours, case["result"].get("ok")) {
            (Ok(fields), Some(want)) => {
                assert_eq!(&fields.to_json(), want, "parse of {completion:?}");
                // Typed values keep their JSON kind (4 is an int, 4.0 a float).
                for (k, v) in fields.iter() {
                    assert_eq!(
                        v.is_f64(),
                        want[k].is_f64(),
                        "{completion:?}: field {k} kind"
                    );
                }
            }
            (Err(_), None) => failures_seen += 1,
            (ours, want) => panic!(
                "{} parse of {completion:?}: ours {ours:?}, DSPy {want:?}",
                case["adapter"]
            ),
        }
    }
    assert!(failures_seen >= 8, "the failure cases ran");
}

#[test]
fn python_random_draws_equal_cpython() {
    let r = reference();
    for case in r["random"].as_array().unwrap() {
        let seed = case["seed"].as_u64().unwrap();
        let mut rng = PyRandom::new(seed);
        let got: Value = match case["op"].as_str().unwrap() {
            "getrandbits32" => (0..5).map(|_| rng.getrandbits(32)).collect(),
            "sample" => {
                let n = case["n"].as_u64().unwrap() as usize;
                let xs: Vec<usize> = (0..n).collect();
                rng.sample(&xs, case["k"].as_u64().unwrap() as usize).into()
            }
            "shuffle" => {
                let mut xs: Vec<usize> = (0..case["n"].as_u64().unwrap() as usize).collect();
                rng.shuffle(&mut xs);
                xs.into()
            }
            "sample_twice" => {
                let xs: Vec<usize> = (0..12).collect();
                let a = rng.sample(&xs, 5);
                let b = rng.sample(&xs, 5);
                serde_json::json!([a, b])
            }
            op => panic!("unknown op {op}"),
        };
        assert_eq!(got, case["result"], "{case}");
    }
}

#[test]
fn metrics_equal_dspy() {
    let r = reference();
    for case in r["metrics"].as_array().unwrap() {
        let pred = case["prediction"].as_str().unwrap();
        let prediction = Prediction::from_fields(Example::new().with("answer", pred));
        if let Some(answers) = case.get("answers") {
            let ex = Example::new().with("answer", answers.clone());
            let em = AnswerExactMatch::new("answer").score(&ex, &prediction, None);
            assert_eq!(em == 1.0, case["exact_match"].as_bool().unwrap());
            continue;
        }
        let answer = case["answer"].as_str().unwrap();
        assert_eq!(
            normalize_text(pred),
            case["normalized_prediction"],
            "{pred:?}"
        );
        assert_eq!(
            normalize_text(answer),
            case["normalized_answer"],
            "{answer:?}"
        );
        let f1 = case["f1"].as_f64().unwrap();
        assert!(
            (f1_score(pred, answer) - f1).abs() < 1e-12,
            "f1 {pred:?} {answer:?}"
        );
        let ex = Example::new().with("answer", answer);
        let em = AnswerExactMatch::new("answer").score(&ex, &prediction, None);
        assert_eq!(
            em == 1.0,
            case["exact_match"].as_bool().unwrap(),
            "{pred:?}"
        );
        let half = AnswerExactMatch::new("answer")
            .frac(0.5)
            .score(&ex, &prediction, None);
        assert_eq!(
            half == 1.0,
            case["match_frac_0_5"].as_bool().unwrap(),
            "{pred:?}"
        );
    }
}

// ---- optimisers ----------------------------------------------------------------------------

/// The script's `arithmetic_trainset(n)`.
fn arithmetic_trainset(n: usize) -> Vec<Example> {
    (0..n)
        .map(|i| {
            let (a, b) = (3 * i + 1, 7 * i + 2);
            Example::new()
                .with("question", format!("What is {a} + {b}?"))
                .with("answer", (a + b).to_string())
                .with_inputs(&["question"])
        })
        .collect()
}

type Answers = Vec<(String, Vec<(String, String)>)>;

/// The script's dummy answers: every third question (i % 3 == 1) answered wrongly.
fn answers(program: &str, trainset: &[Example]) -> Answers {
    let mut out = vec![];
    for (i, ex) in trainset.iter().enumerate() {
        let q = ex.get_str("question").unwrap();
        let gold = ex.get_str("answer").unwrap();
        let answer = if i % 3 != 1 { gold } else { "wrong".into() };
        match program {
            "predict" => out.push((q, vec![("answer".into(), answer)])),
            "cot" => out.push((
                q,
                vec![
                    (
                        "reasoning".into(),
                        format!("Add the numbers of example {i}."),
                    ),
                    ("answer".into(), answer),
                ],
            )),
            _ => {
                out.push((format!("DRAFT{i}:"), vec![("answer".into(), answer)]));
                out.push((q.clone(), vec![("draft".into(), format!("DRAFT{i}: {q}"))]));
            }
        }
    }
    out
}

/// The script's `TwoStep` module.
#[derive(Clone)]
struct TwoStep {
    draft: Predict,
    answer: Predict,
}

impl TwoStep {
    fn new() -> Self {
        Self {
            draft: Predict::new("question -> draft").unwrap(),
            answer: Predict::new("question, draft -> answer").unwrap(),
        }
    }
}

impl Module for TwoStep {
    fn forward(&self, ctx: &Context, inputs: &Example) -> qlora::Result<Prediction> {
        let d = self.draft.forward(ctx, inputs)?;
        let next = inputs
            .clone()
            .with("draft", d.get("draft").cloned().unwrap());
        self.answer.forward(ctx, &next)
    }
    fn named_predictors(&self) -> Vec<(String, &Predict)> {
        vec![
            ("draft".into(), &self.draft),
            ("answer".into(), &self.answer),
        ]
    }
    fn named_predictors_mut(&mut self) -> Vec<(String, &mut Predict)> {
        vec![
            ("draft".into(), &mut self.draft),
            ("answer".into(), &mut self.answer),
        ]
    }
}

fn demos_json(program: &dyn Module) -> Value {
    Value::Object(
        program
            .named_predictors()
            .into_iter()
            .map(|(n, p)| {
                (
                    n,
                    Value::Array(p.demos.iter().map(Example::to_json).collect()),
                )
            })
            .collect(),
    )
}

#[test]
fn optimisers_pick_the_demos_dspy_picks() {
    let r = reference();
    let exact = || {
        metric_fn("exact", |ex: &Example, p: &Prediction| {
            (ex.get("answer") == p.get("answer")) as u8 as f64
        })
    };
    let mut bootstrap_cases = 0;
    for case in r["teleprompt"].as_array().unwrap() {
        let n = case["trainset_size"].as_u64().unwrap() as usize;
        let trainset = arithmetic_trainset(n);
        let program = case["program"].as_str().unwrap();
        let got = match case["optimizer"].as_str().unwrap() {
            "LabeledFewShot" => {
                let k = case["k"].as_u64().unwrap() as usize;
                let c = LabeledFewShot::new(k)
                    .compile(&Predict::new("question -> answer").unwrap(), &trainset);
                demos_json(&c.program)
            }
            _ => {
                bootstrap_cases += 1;
                let script = answers(program, &trainset);
                // Our answer table is the script's (same keys and replies).
                let theirs = case["dummy_answers"].as_object().unwrap();
                assert_eq!(theirs.len(), script.len());
                for (k, fields) in &script {
                    for (f, v) in fields {
                        assert_eq!(theirs[k][f].as_str(), Some(v.as_str()), "{k}.{f}");
                    }
                }
                let ctx = Context::new(ScriptedLm::answers_by_substring(script));
                let opt = BootstrapFewShot::new(exact())
                    .max_bootstrapped_demos(
                        case["max_bootstrapped_demos"].as_u64().unwrap() as usize
                    )
                    .max_labeled_demos(case["max_labeled_demos"].as_u64().unwrap() as usize);
                match program {
                    "predict" => demos_json(
                        &opt.compile(
                            &Predict::new("question -> answer").unwrap(),
                            None,
                            &trainset,
                            &ctx,
                        )
                        .unwrap()
                        .program,
                    ),
                    "cot" => demos_json(
                        &opt.compile(
                            &ChainOfThought::new("question -> answer").unwrap(),
                            None,
                            &trainset,
                            &ctx,
                        )
                        .unwrap()
                        .program,
                    ),
                    _ => demos_json(
                        &opt.compile(&TwoStep::new(), None, &trainset, &ctx)
                            .unwrap()
                            .program,
                    ),
                }
            }
        };
        assert_eq!(got, case["demos"], "{} {case}", case["optimizer"]);
    }
    assert_eq!(bootstrap_cases, 6);
}

#[test]
fn saved_state_has_dspys_shape_and_values() {
    let r = reference();
    for case in r["state"].as_array().unwrap() {
        let ours = match case["program"].as_str().unwrap() {
            "predict" => {
                let c = LabeledFewShot::new(2).compile(
                    &Predict::new("question -> answer").unwrap(),
                    &arithmetic_trainset(6),
                );
                c.program.dump_state()
            }
            "cot" => {
                let mut cot = ChainOfThought::new(
                    Signature::parse("question -> answer")
                        .unwrap()
                        .with_instructions("Think, then answer."),
                )
                .unwrap();
                cot.predict.demos = vec![Example::new()
                    .with("question", "q")
                    .with("reasoning", "r")
                    .with("answer", "a")
                    .with("augmented", true)];
                cot.dump_state()
            }
            _ => {
                let mut two = TwoStep::new();
                two.answer.demos = vec![Example::new()
                    .with("question", "q")
                    .with("draft", "d")
                    .with("answer", "a")];
                two.dump_state()
            }
        };
        assert_eq!(ours, case["state"], "{}", case["program"]);
        // And DSPy's state loads into a fresh program.
        if case["program"] == "two_step" {
            let mut fresh = TwoStep::new();
            fresh.load_state(&case["state"]).unwrap();
            assert_eq!(fresh.dump_state(), case["state"]);
        }
    }
}

/// The script's `DemoCountingDummyLM`: question `i` of `full` is answered wrongly when
/// `(i + k) % 3 == 1`, `k` being the index of the first demo's question (0 without demos).
fn demo_sensitive_lm(full: &[Example]) -> ScriptedLm {
    let questions: Vec<String> = full
        .iter()
        .map(|x| x.get_str("question").unwrap())
        .collect();
    let gold: Vec<String> = full.iter().map(|x| x.get_str("answer").unwrap()).collect();
    ScriptedLm::new(move |req| {
        let index = |content: &str| questions.iter().position(|q| content.contains(q.as_str()));
        let m = &req.messages;
        let k = if m.len() > 2 {
            index(&m[1].content).unwrap_or(0)
        } else {
            0
        };
        match index(&m.last().unwrap().content) {
            Some(i) => {
                let answer = if (i + k) % 3 != 1 {
                    gold[i].clone()
                } else {
                    "wrong".into()
                };
                format!("[[ ## answer ## ]]\n{answer}")
            }
            None => "No more responses".into(),
        }
    })
}

#[test]
fn random_search_candidates_equal_dspy() {
    let r = reference();
    let cases = r["random_search"].as_array().expect("random_search cases");
    assert_eq!(cases.len(), 3);
    for case in cases {
        let get = |k: &str| case[k].as_u64().unwrap() as usize;
        let full = arithmetic_trainset(get("trainset_size") + get("valset_size"));
        let (trainset, valset) = full.split_at(get("trainset_size"));
        let ctx = Context::new(demo_sensitive_lm(&full));
        let metric = metric_fn("exact", |ex: &Example, p: &Prediction| {
            (ex.get("answer") == p.get("answer")) as u8 as f64
        });
        let mut opt = BootstrapFewShotWithRandomSearch::new(metric)
            .max_bootstrapped_demos(get("max_bootstrapped_demos"))
            .max_labeled_demos(get("max_labeled_demos"))
            .num_candidate_programs(get("num_candidate_programs"))
            .display_progress(false);
        if let Some(s) = case["stop_at_score"].as_f64() {
            opt = opt.stop_at_score(s);
        }
        let compiled = opt
            .compile(
                &Predict::new("question -> answer").unwrap(),
                None,
                trainset,
                Some(valset),
                &ctx,
            )
            .unwrap();
        let theirs = case["candidates"].as_array().unwrap();
        assert_eq!(compiled.candidates.len(), theirs.len(), "{case}");
        for (ours, t) in compiled.candidates.iter().zip(theirs) {
            assert_eq!(ours.seed, t["seed"].as_i64().unwrap(), "candidate order");
            assert_eq!(
                ours.score,
                t["score"].as_f64().unwrap(),
                "seed {}",
                ours.seed
            );
            let subscores: Vec<f64> = t["subscores"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            assert_eq!(ours.subscores, subscores, "seed {}", ours.seed);
            assert_eq!(demos_json(&ours.program), t["demos"], "seed {}", ours.seed);
        }
        assert_eq!(demos_json(&compiled.program), case["best_demos"]);
        // The report has one row per candidate, in the order they were tried.
        assert_eq!(compiled.report.rows.len(), theirs.len());
        assert!(compiled.report.summary.contains("best: seed"));
    }
}

/// The script's `proposer_answers()`, in its order (DummyLM answers with the first key found).
fn proposer_answers() -> Answers {
    let mut out: Answers = vec![];
    for (key, tip) in TIPS {
        if !tip.is_empty() {
            out.push((
                tip.to_string(),
                vec![(
                    "proposed_instruction".into(),
                    format!("Proposed instruction: Solve it ({key})."),
                )],
            ));
        }
    }
    let fixed = [
        (
            "[[ ## basic_instruction ## ]]",
            "proposed_instruction",
            "Solve it (no tip).",
        ),
        (
            "field `[[ ## module_description ## ]]`",
            "module_description",
            "It adds.",
        ),
        (
            "field `[[ ## program_description ## ]]`",
            "program_description",
            "Arithmetic.",
        ),
        (
            "field `[[ ## summary ## ]]`",
            "summary",
            "Summary: additions of two numbers.",
        ),
        (
            "field `[[ ## observations ## ]]`",
            "observations",
            "Questions ask for sums.",
        ),
    ];
    for (k, f, v) in fixed {
        out.push((k.into(), vec![(f.into(), v.into())]));
    }
    out
}

fn exact_metric() -> impl Metric {
    metric_fn("exact", |ex: &Example, p: &Prediction| {
        (ex.get("answer") == p.get("answer")) as u8 as f64
    })
}

fn mipro_for(case: &Value) -> MiproV2 {
    let get = |k: &str| case[k].as_u64().unwrap() as usize;
    let mut opt = MiproV2::new(exact_metric())
        .max_bootstrapped_demos(get("max_bootstrapped_demos"))
        .max_labeled_demos(get("max_labeled_demos"))
        .seed(get("seed") as u64)
        .minibatch_size(get("minibatch_size"))
        .prompt_lm(ScriptedLm::answers_by_substring(proposer_answers()))
        .display_progress(false);
    if case["auto"].is_null() {
        opt = opt.manual(get("num_candidates"), get("num_trials"));
    } else {
        assert_eq!(case["auto"], "light");
    }
    opt
}

#[test]
fn mipro_plan_equals_dspy_and_search_is_consistent() {
    let r = reference();
    let cases = r["mipro"].as_array().expect("mipro cases");
    assert_eq!(cases.len(), 3);
    for case in cases {
        // Our proposer answers are the script's.
        let theirs = case["proposer_answers"].as_object().unwrap();
        let ours = proposer_answers();
        assert_eq!(theirs.len(), ours.len());
        for (k, fields) in &ours {
            for (f, v) in fields {
                assert_eq!(theirs[k][f].as_str(), Some(v.as_str()), "{k}");
            }
        }
        let get = |k: &str| case[k].as_u64().unwrap() as usize;
        let full = arithmetic_trainset(get("trainset_size") + get("valset_size"));
        let (trainset, valset) = full.split_at(get("trainset_size"));
        let ctx = Context::new(demo_sensitive_lm(&full));
        let opt = mipro_for(case);
        let student = Predict::new("question -> answer").unwrap();
        let plan = opt
            .prepare(&student, None, trainset, Some(valset), &ctx)
            .unwrap();

        // Steps 0-2 equal DSPy's: valset draw, settings, demo sets, instructions.
        let questions: Vec<Value> = plan
            .valset
            .iter()
            .map(|x| Value::String(x.get_str("question").unwrap()))
            .collect();
        assert_eq!(Value::Array(questions), case["valset"]);
        assert_eq!(plan.num_trials as u64, case["num_trials"].as_u64().unwrap());
        assert_eq!(Value::Bool(plan.minibatch), case["minibatch"]);
        assert_eq!(
            serde_json::to_value(&plan.instruction_candidates).unwrap(),
            case["instruction_candidates"]
        );
        let demos = plan.demo_candidates.as_ref().map(|per_pred| {
            per_pred
                .iter()
                .map(|sets| {
                    sets.iter()
                        .map(|s| s.iter().map(Example::to_json).collect::<Vec<_>>())
                        .collect::<Vec<_>>()
                })
                .collect::<Vec<_>>()
        });
        assert_eq!(
            serde_json::to_value(demos).unwrap(),
            case["demo_candidates"]
        );

        // Step 3 (our TPE, not Optuna's): the schedule of evaluations is DSPy's.
        let num_trials = plan.num_trials;
        let minibatch = plan.minibatch;
        let n_val = plan.valset.len();
        let val = plan.valset.clone();
        let again = opt.search(plan.clone(), &ctx).unwrap();
        let compiled = opt.search(plan, &ctx).unwrap();
        assert_eq!(compiled.report, again.report, "the search is deterministic");
        let trial_rows: Vec<&ReportRow> = compiled
            .report
            .rows
            .iter()
            .filter(|r| r.outcome.starts_with("trial "))
            .collect();
        let minibatch_rows = trial_rows
            .iter()
            .filter(|r| r.outcome.contains(": minibatch of "))
            .count();
        let full_rows = trial_rows.len() - minibatch_rows;
        if minibatch {
            // trials, + the default program, + a full eval after every 5 and at the end
            let scheduled = num_trials / 5 + usize::from(num_trials % 5 != 0);
            assert_eq!(minibatch_rows, num_trials);
            assert_eq!(full_rows, 1 + scheduled, "{}", compiled.report);
            let adjusted = num_trials + num_trials / 5 + 1 + usize::from(num_trials % 5 != 0);
            assert_eq!(trial_rows.last().unwrap().round, adjusted);
            for r in &trial_rows {
                let size = format!("minibatch of {} (", get("minibatch_size"));
                let full = format!("full eval on {n_val} ");
                assert!(
                    r.outcome.contains(&size) || r.outcome.contains(&full),
                    "{}",
                    r.outcome
                );
            }
        } else {
            assert_eq!(minibatch_rows, 0);
            assert_eq!(full_rows, 1 + num_trials);
        }
        assert_eq!(compiled.candidates.len(), full_rows);
        // Best first, and the returned program scores what its candidate scored.
        for w in compiled.candidates.windows(2) {
            assert!(w[0].score >= w[1].score);
        }
        let best = &compiled.candidates[0];
        let rescored = qlora::prompt::Evaluate::new(val)
            .display_progress(false)
            .run(&compiled.program, &ctx, &exact_metric())
            .unwrap();
        assert_eq!(rescored.score, best.score);
        assert_eq!(demos_json(&compiled.program), demos_json(&best.program));
        assert_eq!(
            compiled.program.signature.instructions(),
            best.program.signature.instructions()
        );
        assert!(best.score >= compiled.candidates.last().unwrap().score);
    }
}
