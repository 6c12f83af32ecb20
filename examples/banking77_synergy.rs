//! The "better together" table on real data: Banking77 intents with the default model
//! (SmolLM2-135M-Instruct, Q4_1 GGUF), one DSPy program (`text -> intent: Literal[...]`) and
//! one test set, measured after each step:
//!
//! 1. zero-shot (the base model, ChatAdapter prompt, no demos);
//! 2. BootstrapFewShot (DSPy's defaults: 4 bootstrapped + up to 16 labeled demos);
//! 3. QLoRA fine-tuned (`BootstrapFinetune` on the gold labels, records in the adapter's
//!    format without demos), zero-shot;
//! 4. fine-tuned + BootstrapFewShot (the tuned model as teacher and student);
//! 5. BetterTogether `"p -> w -> p"` (p: BootstrapFewShot, w: BootstrapFinetune on the
//!    program's own successful traces, recorded without their demos so that the training
//!    sequences stay short), scored on a validation split taken from train.csv.
//!
//! ```text
//! cargo run --release --features cli --example banking77_synergy -- \
//!     --intents 4 --train 12 --val 4 --test 10 --epochs 3 --json target/banking77-synergy.json
//! ```
//!
//! Training, validation and test rows are disjoint: train and validation are consecutive
//! slices of each intent's rows in train.csv, test rows come from the official test.csv.

#[path = "../tests/common/banking77.rs"]
mod banking77;
#[path = "common/flags.rs"]
mod flags;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use qlora::lora::{setup_qlora, LoraConfig};
use qlora::model::Model;
use qlora::polars::prelude::DataFrame;
use qlora::prompt::*;
use qlora::train::{Progress, TrainConfig};

const USAGE: &str = "\
usage: banking77_synergy [--model default] [--intents 4] [--train 12] [--val 4] [--test 10]
                         [--epochs 3] [--batch 8] [--lr 2e-3] [--max-tokens 24]
                         [--skip-better-together] [--run-dir target/banking77-synergy]
                         [--json out.json]";

struct Args {
    model: String,
    intents: usize,
    train: usize,
    val: usize,
    test: usize,
    epochs: f64,
    batch: usize,
    lr: f64,
    max_tokens: usize,
    better_together: bool,
    run_dir: PathBuf,
    json: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        model: "default".into(),
        intents: 4,
        train: 12,
        val: 4,
        test: 10,
        epochs: 3.0,
        batch: 8,
        lr: 2e-3,
        max_tokens: 24,
        better_together: true,
        run_dir: PathBuf::from("target/banking77-synergy"),
        json: None,
    };
    flags::parse(USAGE, &["--skip-better-together"], |flag, v| {
        match flag {
            "--skip-better-together" => a.better_together = false,
            "--model" => a.model = v.to_string(),
            "--intents" => a.intents = flags::value(flag, v)?,
            "--train" => a.train = flags::value(flag, v)?,
            "--val" => a.val = flags::value(flag, v)?,
            "--test" => a.test = flags::value(flag, v)?,
            "--epochs" => a.epochs = flags::value(flag, v)?,
            "--batch" => a.batch = flags::value(flag, v)?,
            "--lr" => a.lr = flags::value(flag, v)?,
            "--max-tokens" => a.max_tokens = flags::value(flag, v)?,
            "--run-dir" => a.run_dir = PathBuf::from(v),
            "--json" => a.json = Some(PathBuf::from(v)),
            _ => return Err(format!("unknown flag {flag}")),
        }
        Ok(())
    })?;
    if a.intents == 0 || a.intents > banking77::INTENTS.len() {
        return Err(format!(
            "--intents must be 1..={}",
            banking77::INTENTS.len()
        ));
    }
    Ok(a)
}

/// Rows of a frame as examples with `text` as the input and `intent` as the label.
fn examples(frame: &DataFrame) -> Vec<Example> {
    banking77::strings(frame, "text")
        .into_iter()
        .zip(banking77::strings(frame, "category"))
        .map(|(text, intent)| {
            Example::new()
                .with("text", text)
                .with("intent", intent)
                .with_inputs(&["text"])
        })
        .collect()
}

/// One line of the table.
struct Row {
    configuration: String,
    score: f64,
    parse_failures: usize,
    seconds: f64,
    note: String,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2)
    });
    let started = Instant::now();
    let intents = &banking77::INTENTS[..args.intents];
    let trainset = examples(&banking77::subset("train.csv", intents, 0, args.train));
    let valset = examples(&banking77::subset(
        "train.csv",
        intents,
        args.train,
        args.val,
    ));
    let testset = examples(&banking77::subset("test.csv", intents, 0, args.test));
    println!(
        "Banking77, {} intents: {} train, {} validation, {} test rows",
        intents.len(),
        trainset.len(),
        valset.len(),
        testset.len()
    );

    let signature = Signature::builder()
        .input_desc("text", "a bank customer's message")
        .output_typed("intent", FieldType::literal(intents.iter().copied()), "")
        .instructions("Classify the intent of the bank customer's message.")
        .build()?;
    let student = Predict::new(signature)?;
    let metric: Arc<dyn Metric> = Arc::new(ExactMatch::new("intent"));
    let evaluate = Evaluate::new(testset.clone()).display_progress(false);
    let train_config = |dir: &str| {
        TrainConfig::default()
            .epochs(args.epochs)
            .batch_size(args.batch)
            .learning_rate(args.lr)
            .progress(Progress::Silent)
            .output_dir(args.run_dir.join(dir))
    };
    let mut rows: Vec<Row> = vec![];
    let mut record = |configuration: &str, r: &EvaluationResult, t0: Instant, note: String| {
        println!(
            "{configuration:<32} {:>6.1}%  {}  ({:.0} s) {note}",
            r.score,
            r.summary(),
            t0.elapsed().as_secs_f64()
        );
        rows.push(Row {
            configuration: configuration.into(),
            score: r.score,
            parse_failures: r.failures(),
            seconds: t0.elapsed().as_secs_f64(),
            note,
        });
    };

    // 1. Zero-shot.
    let t0 = Instant::now();
    let base = Context::from_arc(Arc::new(
        LocalLm::new(Model::load(&args.model)?).max_tokens(args.max_tokens),
    ));
    let r = evaluate.run(&student, &base, metric.as_ref())?;
    record("zero-shot", &r, t0, String::new());

    // 2. BootstrapFewShot on the base model.
    let t0 = Instant::now();
    let fewshot =
        BootstrapFewShot::from_arc(metric.clone()).compile(&student, None, &trainset, &base)?;
    let r = evaluate.run(&fewshot.program, &base, metric.as_ref())?;
    record(
        "BootstrapFewShot",
        &r,
        t0,
        format!(
            "{} demos; {}",
            fewshot.program.demos.len(),
            fewshot.report.summary
        ),
    );

    // 3. QLoRA fine-tuned on the gold labels, in the adapter's format.
    let t0 = Instant::now();
    let gold = ScriptedLm::answers_by_substring(
        trainset
            .iter()
            .map(|e| {
                (
                    format!(
                        "[[ ## text ## ]]\n{}\n",
                        e.get_str("text").unwrap_or_default()
                    ),
                    vec![("intent", e.get_str("intent").unwrap_or_default())],
                )
            })
            .collect(),
    );
    let finetune = BootstrapFinetune::from_arc(metric.clone())
        .exclude_demos(true)
        .train_config(train_config("finetune"));
    let mut peft = setup_qlora(Model::load(&args.model)?, &LoraConfig::qlora())?;
    let tuned = finetune.compile(&student, None, &trainset, &Context::new(gold), &mut peft)?;
    let tuned_ctx = Context::from_arc(Arc::new(
        LocalLm::with_adapter(peft).max_tokens(args.max_tokens),
    ));
    let r = evaluate.run(&tuned.program, &tuned_ctx, metric.as_ref())?;
    record("QLoRA fine-tuned", &r, t0, tuned.report.summary.clone());

    // 4. Fine-tuned + BootstrapFewShot.
    let t0 = Instant::now();
    let both = BootstrapFewShot::from_arc(metric.clone()).compile(
        &tuned.program,
        None,
        &trainset,
        &tuned_ctx,
    )?;
    let r = evaluate.run(&both.program, &tuned_ctx, metric.as_ref())?;
    record(
        "fine-tuned + BootstrapFewShot",
        &r,
        t0,
        format!(
            "{} demos; {}",
            both.program.demos.len(),
            both.report.summary
        ),
    );
    drop(tuned_ctx);

    // 5. BetterTogether, p -> w -> p, scored on the validation split.
    if args.better_together {
        let t0 = Instant::now();
        let bt = BetterTogether::from_arc(metric.clone())
            .optimizer("p", BootstrapFewShot::from_arc(metric.clone()))
            .optimizer(
                "w",
                BootstrapFinetune::from_arc(metric.clone())
                    .exclude_demos(true)
                    .train_config(train_config("bt-train")),
            )
            .strategy("p -> w -> p")
            .lm({
                let n = args.max_tokens;
                move |peft| LocalLm::from_peft_arc(peft).max_tokens(n)
            })
            .run_dir(args.run_dir.join("better-together"))
            .display_progress(false);
        let peft = setup_qlora(Model::load(&args.model)?, &LoraConfig::qlora())?;
        let result = bt.compile(&student, None, &trainset, Some(&valset), peft)?;
        println!("{}", result.report);
        let r = evaluate.run(&result.program, &result.ctx, metric.as_ref())?;
        let mut note = format!(
            "best: \"{}\" (validation {:?})",
            result.strategy, result.score
        );
        if let Some(e) = &result.error {
            note.push_str(&format!("; stopped early: {e}"));
        }
        record("BetterTogether p -> w -> p", &r, t0, note);
    }

    println!(
        "\n| configuration | exact match (test, {} rows) | parse failures | seconds |\n|---|---|---|---|",
        testset.len()
    );
    for r in &rows {
        println!(
            "| {} | {:.1}% | {} | {:.0} |",
            r.configuration, r.score, r.parse_failures, r.seconds
        );
    }
    println!("total {:.0} s", started.elapsed().as_secs_f64());
    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "dataset": "banking77",
            "model": args.model,
            "intents": intents,
            "train_rows": trainset.len(),
            "val_rows": valset.len(),
            "test_rows": testset.len(),
            "epochs": args.epochs,
            "batch": args.batch,
            "lr": args.lr,
            "total_seconds": started.elapsed().as_secs_f64(),
            "rows": rows.iter().map(|r| serde_json::json!({
                "configuration": r.configuration,
                "exact_match": r.score,
                "parse_failures": r.parse_failures,
                "seconds": r.seconds,
                "note": r.note,
            })).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
