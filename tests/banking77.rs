//! Real data: Banking77 (CC-BY-4.0, read from ../shared/data/banking77, never copied here).
//! Fine-tuning the default model with QLoRA on a few intents must lift exact-match accuracy on
//! the official test split well above zero-shot.
//!
//! Set QLORA_BANKING77_DIR to read the dataset from elsewhere. Two sizes: a small one that
//! `make test` runs (4 intents, 12 training rows each, 12 steps), and a larger opt-in one
//! (8 intents, 16 training rows each, 32 steps; several minutes on two cores):
//! `cargo test --release --features cli --test banking77 -- --ignored --nocapture`.

#[path = "common/banking77.rs"]
mod banking77;
mod common;

use qlora::data::{ColumnMap, DataConfig, SftDataset};
use qlora::generate::GenerationConfig;
use qlora::lora::{setup_qlora, LoraConfig};
use qlora::model::{Message, Model};
use qlora::polars::prelude::*;
use qlora::train::{train, Progress, TrainConfig};

use banking77::{strings, subset, INTENTS};

/// One experiment's size.
struct Run {
    intents: usize,
    train_per_intent: usize,
    test_per_intent: usize,
    epochs: f64,
    /// Recompute activations in backward (setup_qlora's default) or keep them (faster).
    checkpointing: bool,
}

fn system_prompt(intents: &[&str]) -> String {
    format!(
        "Classify the bank customer's message into exactly one of these intents: {}. Answer with the intent name only.",
        intents.join(", ")
    )
}

/// Share of test rows whose greedy answer is exactly the label.
fn accuracy(model: &Model, test: &DataFrame, system: &str) -> f64 {
    let texts = strings(test, "text");
    let labels = strings(test, "category");
    let config = GenerationConfig::greedy(12);
    let mut right = 0;
    for (chunk, chunk_labels) in texts.chunks(8).zip(labels.chunks(8)) {
        let conversations: Vec<Vec<Message>> = chunk
            .iter()
            .map(|t| vec![Message::system(system), Message::user(t.clone())])
            .collect();
        let outs = model.generate_chat_batch(&conversations, &config).unwrap();
        right += outs
            .iter()
            .zip(chunk_labels)
            .filter(|(o, l)| o.text.trim() == l.as_str())
            .count();
    }
    right as f64 / texts.len() as f64
}

fn fine_tune_and_compare(run: &Run) {
    let intents = &INTENTS[..run.intents];
    let system = system_prompt(intents);
    let train_frame = subset("train.csv", intents, 0, run.train_per_intent);
    let test_frame = subset("test.csv", intents, 0, run.test_per_intent);
    assert_eq!(train_frame.height(), intents.len() * run.train_per_intent);
    assert_eq!(test_frame.height(), intents.len() * run.test_per_intent);

    let model = Model::load(common::default_gguf().to_str().unwrap()).unwrap();
    let started = std::time::Instant::now();
    let zero_shot = accuracy(&model, &test_frame, &system);

    let config = DataConfig::default()
        .columns(ColumnMap::prompt_completion("text", "category"))
        .system_prompt(system.clone());
    let data =
        SftDataset::from_frame(&train_frame, "banking77/train.csv", &model, &config).unwrap();
    assert_eq!(data.train.len(), intents.len() * run.train_per_intent);

    let mut peft = setup_qlora(model, &LoraConfig::qlora()).unwrap();
    peft.set_gradient_checkpointing(run.checkpointing);
    let result = train(
        &mut peft,
        &data,
        &TrainConfig::default()
            .epochs(run.epochs)
            .batch_size(8)
            .learning_rate(2e-3)
            .progress(Progress::Silent),
    )
    .unwrap();
    let tuned = accuracy(peft.model(), &test_frame, &system);
    println!(
        "Banking77, {} intents, {} train / {} test rows: zero-shot exact match {:.1}%, after QLoRA {:.1}% ({} steps, {:.0} s training, {:.0} s in all, loss {:.3} -> {:.3})",
        intents.len(),
        train_frame.height(),
        test_frame.height(),
        100.0 * zero_shot,
        100.0 * tuned,
        result.total_steps,
        result.train_seconds,
        started.elapsed().as_secs_f64(),
        result.history[0].loss,
        result.final_loss().unwrap()
    );
    assert!(
        tuned >= zero_shot + 0.3 && tuned >= 0.5,
        "zero-shot {zero_shot:.3}, fine-tuned {tuned:.3}"
    );
}

#[test]
fn qlora_on_four_banking77_intents_beats_zero_shot() {
    fine_tune_and_compare(&Run {
        intents: 4,
        train_per_intent: 12,
        test_per_intent: 10,
        epochs: 2.0,
        checkpointing: false,
    });
}

#[test]
#[ignore = "several minutes of CPU training: run with --ignored"]
fn qlora_on_eight_banking77_intents_beats_zero_shot() {
    fine_tune_and_compare(&Run {
        intents: 8,
        train_per_intent: 16,
        test_per_intent: 10,
        epochs: 2.0,
        checkpointing: true,
    });
}
