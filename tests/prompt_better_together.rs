//! BetterTogether on the tiny reference Llama with a scripted LM whose answers depend on the
//! adapter's weights: the steps run in strategy order, every step is scored on the valset,
//! and the best program is returned with its own adapter (restored after a later, worse weight
//! step, and equal to the folder saved for it).

mod common;

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use qlora::data::DataConfig;
use qlora::lora::{LoraConfig, PeftModel};
use qlora::model::Model;
use qlora::prompt::{
    BetterTogether, BootstrapFewShotWithRandomSearch, BootstrapFinetune, ExactMatch, Example,
    Module, Predict, ScriptedLm, StepOptimizer,
};
use qlora::train::{Progress, TrainConfig};

fn examples(range: std::ops::Range<usize>) -> Vec<Example> {
    range
        .map(|i| {
            Example::new()
                .with("question", format!("Question {i}: what is {i} + {i}?"))
                .with("answer", (2 * i).to_string())
                .with_inputs(&["question"])
        })
        .collect()
}

fn tiny_peft() -> PeftModel {
    let dir = common::reference_dir().join("llama");
    let mut model = Model::load(dir.to_str().unwrap()).expect("tiny llama from make reference");
    // No system message in the records, so they fit the tiny model's 256 positions.
    model
        .tokenizer
        .set_chat_template(
            "{% for m in messages %}{% if m.role != 'system' %}{{ m.role }}: {{ m.content }}\n\
             {% endif %}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}",
        )
        .unwrap();
    PeftModel::new_seeded(model, &LoraConfig::qlora().all_linear(), 7).unwrap()
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

fn fingerprint(p: &PeftModel) -> u64 {
    let mut h = DefaultHasher::new();
    for v in adapter_values(p) {
        v.to_bits().hash(&mut h);
    }
    h.finish()
}

/// One LM call: the weight version it ran with, whether the prompt had demos, whether the
/// question was a validation one.
type Call = (usize, bool, bool);

#[test]
fn steps_in_order_scored_after_each_best_program_and_adapter_kept() {
    let trainset = examples(0..6);
    let valset = examples(100..104);
    let versions: Arc<Mutex<Vec<u64>>> = Arc::new(Mutex::new(vec![]));
    let log: Arc<Mutex<Vec<Call>>> = Arc::new(Mutex::new(vec![]));
    let (vs, lg) = (versions.clone(), log.clone());
    // Weight version 0 (the initial adapter) answers even questions right when shown demos;
    // version 1 (trained once) answers everything right without demos, even ones with demos;
    // version 2 (trained twice) answers nothing right.
    let build = move |peft: Arc<PeftModel>| {
        let fp = fingerprint(&peft);
        let version = {
            let mut seen = vs.lock().unwrap();
            match seen.iter().position(|f| *f == fp) {
                Some(v) => v,
                None => {
                    seen.push(fp);
                    seen.len() - 1
                }
            }
        };
        let lg = lg.clone();
        ScriptedLm::new(move |req| {
            let last = &req.messages.last().unwrap().content;
            let i: usize = last
                .split("Question ")
                .nth(1)
                .and_then(|s| s.split(':').next())
                .and_then(|s| s.parse().ok())
                .expect("a question");
            let demos = req.messages.len() > 2;
            lg.lock().unwrap().push((version, demos, i >= 100));
            let right = match version {
                0 => demos && i % 2 == 0,
                1 => !demos || i % 2 == 0,
                _ => false,
            };
            let answer = if right { 2 * i } else { 7777 };
            format!("[[ ## answer ## ]]\n{answer}\n\n[[ ## completed ## ]]")
        })
    };
    let metric = ExactMatch::new("answer");
    let p = BootstrapFewShotWithRandomSearch::new(metric.clone())
        .restrict(&[-1])
        .num_candidate_programs(0)
        .max_bootstrapped_demos(2)
        .max_labeled_demos(2)
        .display_progress(false);
    let w = BootstrapFinetune::new(metric.clone())
        .exclude_demos(true)
        .data_config(DataConfig::default().max_seq_len(256))
        .train_config(
            TrainConfig::default()
                .progress(Progress::Silent)
                .epochs(1.0)
                .batch_size(2)
                .learning_rate(5e-3),
        );
    let run_dir = std::env::temp_dir().join(format!("qlora-bt-test-{}", std::process::id()));
    let opt = BetterTogether::new(metric)
        .optimizer("p", p)
        .optimizer("w", w)
        .strategy("p -> w -> p -> w")
        .lm(build)
        .run_dir(&run_dir)
        .display_progress(false);
    assert!(matches!(
        opt.optimizers["p"],
        StepOptimizer::RandomSearch(_)
    ));
    let peft = tiny_peft();
    let initial = fingerprint(&peft);
    let student = Predict::new("question -> answer").unwrap();
    let result = opt
        .compile(&student, None, &trainset, Some(&valset), peft)
        .unwrap();
    assert_eq!(result.error, None);

    // Every step scored, in strategy order.
    let rows: Vec<(usize, &str, &str, Option<f64>)> = result
        .report
        .rows
        .iter()
        .map(|r| (r.step, r.strategy.as_str(), r.optimizer.as_str(), r.score))
        .collect();
    assert_eq!(
        rows,
        [
            (0, "", "original", Some(0.0)),
            (1, "p", "BootstrapFewShotWithRandomSearch", Some(50.0)),
            (2, "p -> w", "BootstrapFinetune", Some(100.0)),
            (
                3,
                "p -> w -> p",
                "BootstrapFewShotWithRandomSearch",
                Some(50.0)
            ),
            (4, "p -> w -> p -> w", "BootstrapFinetune", Some(0.0)),
        ],
        "{}",
        result.report
    );
    let demos: Vec<usize> = result.report.rows.iter().map(|r| r.demos).collect();
    assert_eq!(demos, [0, 2, 0, 2, 0]);

    // The LM calls, run-length compressed: each step's own calls, then its valset evaluation
    // (random search also scores its candidate on the valset) with the weights it produced.
    let mut runs: Vec<(Call, usize)> = vec![];
    for c in log.lock().unwrap().iter() {
        match runs.last_mut() {
            Some((last, n)) if last == c => *n += 1,
            _ => runs.push((*c, 1)),
        }
    }
    let keys: Vec<Call> = runs.iter().map(|(c, _)| *c).collect();
    assert_eq!(
        keys,
        [
            (0, false, true), // baseline
            (0, true, false), // p: bootstrap
            (0, true, true),  // p: random search's candidate, then BetterTogether's score
            (0, true, false), // w: teacher traces (with the demos of step 1)
            (1, false, true), // w: score with the trained adapter, demos excluded
            (1, true, false), // p: bootstrap
            (1, true, true),  // p: scores
            (1, true, false), // w: teacher traces
            (2, false, true), // w: score after the second training
        ],
        "{runs:?}"
    );
    let val_runs: Vec<usize> = runs
        .iter()
        .filter(|((_, _, val), _)| *val)
        .map(|(_, n)| *n)
        .collect();
    assert_eq!(val_runs, [4, 8, 4, 8, 4]);
    assert_eq!(
        runs[3].1, 6,
        "the weight step runs the teacher on every example"
    );

    // The best: "p -> w", with the adapter of its weight step, restored after step 4.
    assert_eq!(result.strategy, "p -> w");
    assert_eq!(result.score, Some(100.0));
    assert!(result.program.demos.is_empty() && result.program.compiled);
    assert_eq!(result.adapter_dir, run_dir.join("step-2"));
    let seen = versions.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "three weight versions");
    assert_eq!(seen[0], initial);
    assert_eq!(fingerprint(&result.peft), seen[1], "best weights restored");
    // Its context runs those weights: right on every valset question without demos.
    let scored = qlora::prompt::Evaluate::new(valset.clone())
        .display_progress(false)
        .run(&result.program, &result.ctx, &ExactMatch::new("answer"))
        .unwrap();
    assert_eq!(scored.score, 100.0);

    // Every candidate's adapter folder is kept; step 2's holds the restored weights.
    let dirs: Vec<String> = result
        .report
        .rows
        .iter()
        .map(|r| r.adapter_dir.clone())
        .collect();
    let d = |s: &str| run_dir.join(s).display().to_string();
    assert_eq!(
        dirs,
        [
            d("step-0"),
            d("step-0"),
            d("step-2"),
            d("step-2"),
            d("step-4")
        ]
    );
    for s in ["step-0", "step-2", "step-4"] {
        assert!(run_dir.join(s).join("adapter_model.safetensors").is_file());
        assert!(run_dir.join(s).join("adapter_config.json").is_file());
    }
    let reloaded =
        PeftModel::from_pretrained_trainable(tiny_model_plain(), run_dir.join("step-2")).unwrap();
    assert_eq!(adapter_values(&reloaded), adapter_values(&result.peft));

    // Candidates best first; ties keep their order.
    let order: Vec<&str> = result
        .candidates
        .iter()
        .map(|c| c.strategy.as_str())
        .collect();
    assert_eq!(
        order,
        ["p -> w", "p", "p -> w -> p", "", "p -> w -> p -> w"]
    );
    let _ = result.program.named_predictors();
    std::fs::remove_dir_all(&run_dir).ok();
}

fn tiny_model_plain() -> Model {
    let dir = common::reference_dir().join("llama");
    Model::load(dir.to_str().unwrap()).unwrap()
}

#[test]
fn strategy_keys_are_checked_and_defaults_match_dspy() {
    let opt = BetterTogether::new(ExactMatch::new("answer"));
    assert_eq!(opt.strategy, "p -> w -> p");
    assert_eq!(opt.valset_ratio, 0.1);
    assert!(opt.shuffle_trainset_between_steps);
    assert!(matches!(
        opt.optimizers["p"],
        StepOptimizer::RandomSearch(_)
    ));
    assert!(matches!(opt.optimizers["w"], StepOptimizer::Finetune(_)));
    assert_eq!(opt.parse_strategy().unwrap(), ["p", "w", "p"]);
    let err = opt.clone().strategy("p -> x").parse_strategy().unwrap_err();
    assert!(err.to_string().contains("[\"x\"]"), "{err}");
    assert!(opt.clone().strategy(" ").parse_strategy().is_err());
    // "p->w" is one (unknown) key, as in DSPy.
    assert!(opt.strategy("p->w").parse_strategy().is_err());
}

#[test]
fn without_a_valset_a_tenth_is_held_out_and_a_failing_step_stops_early() {
    // 20 examples: the first 2 become the valset. The weight step fails (the scripted LM's
    // answers never pass the metric, so there is nothing to train on); the sequence stops and
    // the best program so far comes back with the error noted.
    let trainset = examples(0..20);
    let asked: Arc<Mutex<Vec<usize>>> = Arc::new(Mutex::new(vec![]));
    let a = asked.clone();
    let opt = BetterTogether::new(ExactMatch::new("answer"))
        .strategy("w -> p")
        .lm(move |_| {
            let a = a.clone();
            ScriptedLm::new(move |req| {
                let last = &req.messages.last().unwrap().content;
                let i: usize = last
                    .split("Question ")
                    .nth(1)
                    .and_then(|s| s.split(':').next())
                    .and_then(|s| s.parse().ok())
                    .unwrap();
                a.lock().unwrap().push(i);
                "[[ ## answer ## ]]\nno".to_string()
            })
        })
        .run_dir(std::env::temp_dir().join(format!("qlora-bt-test2-{}", std::process::id())))
        .display_progress(false);
    let result = opt
        .compile(
            &Predict::new("question -> answer").unwrap(),
            None,
            &trainset,
            None,
            tiny_peft(),
        )
        .unwrap();
    let err = result.error.clone().expect("the weight step failed");
    assert!(err.contains("no training data"), "{err}");
    assert_eq!(result.report.rows.len(), 1);
    assert_eq!(result.strategy, "");
    assert_eq!(result.score, Some(0.0));
    let asked = asked.lock().unwrap().clone();
    assert_eq!(&asked[..2], [0, 1], "the valset is the first tenth");
    assert_eq!(asked.len(), 2 + 18, "then the teacher ran on the other 18");
    std::fs::remove_dir_all(&opt.run_dir).ok();
}
