//! BootstrapFinetune: the chat records equal DSPy 3.4's `_prepare_finetune_data` output (data
//! from tests/reference/dspy_reference.py), and a scripted teacher's records train the tiny
//! reference Llama's adapter.

mod common;

use qlora::data::{DataConfig, Record};
use qlora::lora::{LoraConfig, PeftModel};
use qlora::model::Model;
use qlora::prompt::{
    metric_fn, BootstrapFinetune, Context, Example, LabeledFewShot, Module, Predict, Prediction,
    ScriptedLm,
};
use qlora::train::{Progress, TrainConfig};
use serde_json::{json, Value};

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

/// The script's dictionary DummyLM: every third question (i % 3 == 1) answered wrongly.
fn dummy_lm(trainset: &[Example]) -> ScriptedLm {
    let answers: Vec<(String, Vec<(String, String)>)> = trainset
        .iter()
        .enumerate()
        .map(|(i, ex)| {
            let answer = if i % 3 != 1 {
                ex.get_str("answer").unwrap()
            } else {
                "wrong".into()
            };
            (
                ex.get_str("question").unwrap(),
                vec![("answer".to_string(), answer)],
            )
        })
        .collect();
    ScriptedLm::answers_by_substring(answers)
}

fn exact() -> impl qlora::prompt::Metric {
    metric_fn("exact", |ex: &Example, p: &Prediction| {
        (ex.get("answer") == p.get("answer")) as u8 as f64
    })
}

fn record_json(r: &Record) -> Value {
    match r {
        Record::Chat(ms) => json!({"messages": ms.iter()
            .map(|m| json!({"role": m.role, "content": m.content}))
            .collect::<Vec<_>>()}),
        other => panic!("not a chat record: {other:?}"),
    }
}

fn teacher(k: usize, trainset: &[Example]) -> Predict {
    let p = Predict::new("question -> answer").unwrap();
    if k == 0 {
        p
    } else {
        LabeledFewShot::new(k).compile(&p, trainset).program
    }
}

#[test]
fn records_equal_dspy() {
    let path = common::reference_dir().join("dspy/index.json");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let cases = r["finetune"]
        .as_array()
        .expect("finetune cases: run make reference");
    assert_eq!(cases.len(), 2);
    for case in cases {
        assert_eq!(case["data_format"], "TrainDataFormat.CHAT");
        let n = case["trainset_size"].as_u64().unwrap() as usize;
        let k = case["teacher_demos"].as_u64().unwrap() as usize;
        let trainset = arithmetic_trainset(n);
        let ctx = Context::new(dummy_lm(&trainset));
        let student = Predict::new("question -> answer").unwrap();
        let t = teacher(k, &trainset);
        let (records, report) = BootstrapFinetune::new(exact())
            .bootstrap_records(&student, Some(&t), &trainset, &ctx)
            .unwrap();
        let ours: Vec<Value> = records.iter().map(record_json).collect();
        assert_eq!(Value::Array(ours), case["records"], "teacher demos {k}");
        // One row per training example; the rejected ones are every third.
        assert_eq!(report.rows.len(), n);
        for (i, row) in report.rows.iter().enumerate() {
            assert_eq!(row.outcome == "kept", i % 3 != 1, "{report}");
        }
    }
}

#[test]
fn teacher_traces_train_the_student_adapter() {
    let dir = common::reference_dir().join("llama");
    let mut model = Model::load(dir.to_str().unwrap()).expect("tiny llama from make reference");
    // The tiny model has no chat template; this one leaves the (long) system message out so
    // records fit its 256 positions.
    model
        .tokenizer
        .set_chat_template(
            "{% for m in messages %}{% if m.role != 'system' %}{{ m.role }}: {{ m.content }}\n\
             {% endif %}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}",
        )
        .unwrap();
    let config = LoraConfig::qlora().all_linear();
    let mut peft = PeftModel::new_seeded(model, &config, 7).unwrap();
    let before: Vec<f32> = adapter_values(&peft);

    let trainset = arithmetic_trainset(6);
    let ctx = Context::new(dummy_lm(&trainset));
    let student = Predict::new("question -> answer").unwrap();
    let opt = BootstrapFinetune::new(exact())
        .exclude_demos(true)
        .data_config(DataConfig::default().max_seq_len(256))
        .train_config(
            TrainConfig::default()
                .progress(Progress::Silent)
                .epochs(2.0)
                .batch_size(2)
                .learning_rate(5e-3),
        );
    let tuned = opt
        .compile(&student, None, &trainset, &ctx, &mut peft)
        .unwrap();
    // 4 of 6 runs pass the metric: 4 records of system, user, assistant.
    assert_eq!(tuned.records.len(), 4);
    for r in &tuned.records {
        let Record::Chat(ms) = r else { panic!() };
        let roles: Vec<&str> = ms.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant"]);
        assert!(ms[2].content.starts_with("[[ ## answer ## ]]\n"));
    }
    assert_eq!(tuned.run.history.len(), 4); // 2 epochs of 2 batches
    assert!(tuned.run.history.iter().all(|s| s.loss.is_finite()));
    assert!(tuned.run.final_loss().unwrap() < tuned.run.history[0].loss);
    assert_ne!(adapter_values(&peft), before, "the adapter was trained");
    assert!(tuned.program.compiled && tuned.program.demos.is_empty());
    assert!(tuned.report.summary.contains("4 of 6 training runs kept"));
    assert!(tuned.report.summary.contains("trained 4 steps"));
    let _ = tuned.program.named_predictors();
}

fn adapter_values(p: &PeftModel) -> Vec<f32> {
    p.trainable_parameters()
        .iter()
        .flat_map(|(_, v)| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}
