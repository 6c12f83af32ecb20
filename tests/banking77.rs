//! Real data: Banking77 (CC-BY-4.0, read from ../shared/data/banking77, never copied here).
//! Fine-tuning the default model with QLoRA on a few intents must lift exact-match accuracy on
//! the official test split well above zero-shot.
//!
//! Set QLORA_BANKING77_DIR to read the dataset from elsewhere. The run takes several minutes on
//! two cores (zero-shot generation over 80 test rows, 32 training steps, generation again), so
//! it is opt-in: `cargo test --release --features cli --test banking77 -- --ignored --nocapture`.

mod common;

use std::path::PathBuf;

use qlora::data::{ColumnMap, DataConfig, SftDataset};
use qlora::generate::GenerationConfig;
use qlora::lora::{setup_qlora, LoraConfig};
use qlora::model::{Message, Model};
use qlora::polars::prelude::*;
use qlora::train::{train, Progress, TrainConfig};

const INTENTS: [&str; 8] = [
    "card_arrival",
    "lost_or_stolen_card",
    "exchange_rate",
    "pin_blocked",
    "top_up_failed",
    "terminate_account",
    "request_refund",
    "apple_pay_or_google_pay",
];
const TRAIN_PER_INTENT: usize = 16;
const TEST_PER_INTENT: usize = 10;

fn data_dir() -> PathBuf {
    let dir = std::env::var_os("QLORA_BANKING77_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/banking77")
        });
    assert!(
        dir.join("train.csv").is_file(),
        "Banking77 not found in {} (set QLORA_BANKING77_DIR)",
        dir.display()
    );
    dir
}

fn system_prompt() -> String {
    format!(
        "Classify the bank customer's message into exactly one of these intents: {}. Answer with the intent name only.",
        INTENTS.join(", ")
    )
}

/// A string column's values (empty for nulls).
fn strings(frame: &DataFrame, name: &str) -> Vec<String> {
    let column = frame.column(name).unwrap().str().unwrap();
    (0..column.len())
        .map(|i| column.get(i).unwrap_or_default().to_string())
        .collect()
}

/// The first `per_intent` rows of each chosen intent, in file order.
fn subset(file: &str, per_intent: usize) -> DataFrame {
    let frame = CsvReadOptions::default()
        .with_has_header(true)
        .try_into_reader_with_file_path(Some(data_dir().join(file)))
        .unwrap()
        .finish()
        .unwrap();
    let mut taken = std::collections::HashMap::new();
    let mask: Vec<bool> = strings(&frame, "category")
        .into_iter()
        .map(|c| {
            if !INTENTS.contains(&c.as_str()) {
                return false;
            }
            let n = taken.entry(c).or_insert(0usize);
            *n += 1;
            *n <= per_intent
        })
        .collect();
    frame
        .filter(&BooleanChunked::from_slice("mask".into(), &mask))
        .unwrap()
}

/// Share of test rows whose greedy answer is exactly the label.
fn accuracy(model: &Model, test: &DataFrame) -> f64 {
    let texts = strings(test, "text");
    let labels = strings(test, "category");
    let config = GenerationConfig::greedy(12);
    let mut right = 0;
    for (chunk, chunk_labels) in texts.chunks(8).zip(labels.chunks(8)) {
        let conversations: Vec<Vec<Message>> = chunk
            .iter()
            .map(|t| vec![Message::system(system_prompt()), Message::user(t.clone())])
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

#[test]
#[ignore = "several minutes of CPU training: run with --ignored"]
fn qlora_on_banking77_beats_zero_shot() {
    let train_frame = subset("train.csv", TRAIN_PER_INTENT);
    let test_frame = subset("test.csv", TEST_PER_INTENT);
    assert_eq!(train_frame.height(), INTENTS.len() * TRAIN_PER_INTENT);
    assert_eq!(test_frame.height(), INTENTS.len() * TEST_PER_INTENT);

    let model = Model::load(common::default_gguf().to_str().unwrap()).unwrap();
    let zero_shot = accuracy(&model, &test_frame);

    let config = DataConfig::default()
        .columns(ColumnMap::prompt_completion("text", "category"))
        .system_prompt(system_prompt());
    let data =
        SftDataset::from_frame(&train_frame, "banking77/train.csv", &model, &config).unwrap();
    assert_eq!(data.train.len(), INTENTS.len() * TRAIN_PER_INTENT);

    let mut peft = setup_qlora(model, &LoraConfig::qlora()).unwrap();
    let run = train(
        &mut peft,
        &data,
        &TrainConfig::default()
            .epochs(2.0)
            .batch_size(8)
            .learning_rate(2e-3)
            .progress(Progress::Silent),
    )
    .unwrap();
    let tuned = accuracy(peft.model(), &test_frame);
    println!(
        "Banking77, {} intents, {} train / {} test rows: zero-shot exact match {:.1}%, after QLoRA {:.1}% ({} steps, {:.0} s, loss {:.3} -> {:.3})",
        INTENTS.len(),
        train_frame.height(),
        test_frame.height(),
        100.0 * zero_shot,
        100.0 * tuned,
        run.total_steps,
        run.train_seconds,
        run.history[0].loss,
        run.final_loss().unwrap()
    );
    assert!(
        tuned >= zero_shot + 0.3 && tuned >= 0.5,
        "zero-shot {zero_shot:.3}, fine-tuned {tuned:.3}"
    );
}
