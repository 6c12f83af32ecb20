//! Optimisers on tasks where the right choice is known, with scripted LMs: MIPROv2 finds the
//! one instruction that makes the task model answer right, and reports what it tried.

use std::sync::{Arc, Mutex};

use qlora::prompt::{
    metric_fn, Context, Evaluate, Example, MiproV2, Module, Predict, Prediction, ScriptedLm,
};

fn sums(n: usize) -> Vec<Example> {
    (0..n)
        .map(|i| {
            Example::new()
                .with("question", format!("What is {i} + {}?", 2 * i + 1))
                .with("answer", (3 * i + 1).to_string())
                .with_inputs(&["question"])
        })
        .collect()
}

#[test]
fn mipro_finds_the_instruction_that_works() {
    let train = sums(12);
    let val = sums(40)[12..].to_vec();
    // The task model is right only when the system message carries the target instruction
    // (chosen after the proposals are known), and for even questions otherwise.
    let target: Arc<Mutex<String>> = Arc::new(Mutex::new(String::new()));
    let t = target.clone();
    let task = ScriptedLm::new(move |req| {
        let system = &req.messages[0].content;
        let last = &req.messages.last().unwrap().content;
        let q = last
            .split("What is ")
            .nth(1)
            .and_then(|s| s.split(" +").next())
            .and_then(|s| s.parse::<usize>().ok());
        let Some(i) = q else {
            return "[[ ## answer ## ]]\n?".into();
        };
        let target = t.lock().unwrap().clone();
        let right = (!target.is_empty() && system.contains(&target)) || i % 2 == 0;
        let answer = if right { 3 * i + 1 } else { 0 };
        format!("[[ ## answer ## ]]\n{answer}")
    });
    // The prompt model numbers its proposals.
    let counter = Arc::new(Mutex::new(0));
    let c = counter.clone();
    let prompt = ScriptedLm::new(move |req| {
        let last = &req.messages.last().unwrap().content;
        let field = [
            "proposed_instruction",
            "module_description",
            "program_description",
            "summary",
            "observations",
        ]
        .into_iter()
        .find(|f| last.contains(&format!("field `[[ ## {f} ## ]]`")))
        .unwrap();
        let mut n = c.lock().unwrap();
        *n += 1;
        format!("[[ ## {field} ## ]]\nAdd the two numbers carefully (variant {n}).")
    });
    let ctx = Context::new(task);
    let metric = metric_fn("exact", |ex: &Example, p: &Prediction| {
        (ex.get("answer") == p.get("answer")) as u8 as f64
    });
    let opt = MiproV2::new(metric)
        .manual(6, 12)
        .minibatch_size(10)
        .max_bootstrapped_demos(2)
        .max_labeled_demos(2)
        .prompt_lm(prompt)
        .display_progress(false);
    let student = Predict::new("question -> answer").unwrap();
    let plan = opt
        .prepare(&student, None, &train, Some(&val), &ctx)
        .unwrap();
    let instructions = plan.instruction_candidates[0].clone();
    assert_eq!(instructions.len(), 6);
    assert_eq!(instructions[0], student.signature.instructions());
    assert!(
        instructions[1..].iter().all(|i| i.contains("(variant ")),
        "{instructions:?}"
    );
    *target.lock().unwrap() = instructions[4].clone();

    let compiled = opt.search(plan, &ctx).unwrap();
    println!("{}", compiled.report);
    assert_eq!(compiled.program.signature.instructions(), instructions[4]);
    let best = &compiled.candidates[0];
    assert_eq!(best.score, 100.0);
    let default = compiled.candidates.iter().find(|c| c.seed == 1).unwrap();
    assert_eq!(default.score, 50.0);
    let check = Evaluate::new(val)
        .display_progress(false)
        .run(
            &compiled.program,
            &ctx,
            &metric_fn("exact", |ex: &Example, p: &Prediction| {
                (ex.get("answer") == p.get("answer")) as u8 as f64
            }),
        )
        .unwrap();
    assert_eq!(check.score, 100.0);
    let frame = compiled.report.to_dataframe().unwrap();
    assert!(frame.height() > 12);
    let _ = compiled.program.named_predictors();
}
