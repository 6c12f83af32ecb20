//! Banking77 (CC-BY-4.0), read from `../shared/data/banking77` and never copied into the repo:
//! the folder, the intents the experiments use, and per-intent subsets of a split. Shared by
//! `tests/banking77.rs` and `examples/banking77_synergy.rs` (through `#[path]`).
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use qlora::polars::prelude::*;

/// The intents the experiments draw from, in this order (the first `n` are used).
pub const INTENTS: [&str; 8] = [
    "card_arrival",
    "lost_or_stolen_card",
    "exchange_rate",
    "pin_blocked",
    "top_up_failed",
    "terminate_account",
    "request_refund",
    "apple_pay_or_google_pay",
];

/// QLORA_BANKING77_DIR, else `../shared/data/banking77` beside the checkout, else the shared
/// folder of this workplace (`/work/shared/data/banking77`, for clones made elsewhere).
pub fn data_dir() -> Result<PathBuf, String> {
    let candidates: Vec<PathBuf> = match std::env::var_os("QLORA_BANKING77_DIR") {
        Some(dir) => vec![PathBuf::from(dir)],
        None => vec![
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/banking77"),
            PathBuf::from("/work/shared/data/banking77"),
        ],
    };
    candidates
        .iter()
        .find(|d| d.join("train.csv").is_file() && d.join("test.csv").is_file())
        .cloned()
        .ok_or_else(|| {
            format!(
                "Banking77 not found in {candidates:?}: set QLORA_BANKING77_DIR to the folder with train.csv and test.csv"
            )
        })
}

/// A string column's values (empty for nulls).
pub fn strings(frame: &DataFrame, name: &str) -> Vec<String> {
    let column = frame
        .column(name)
        .unwrap_or_else(|e| panic!("Banking77: no `{name}` column: {e}"))
        .str()
        .unwrap_or_else(|e| panic!("Banking77: `{name}` is not text: {e}"));
    (0..column.len())
        .map(|i| column.get(i).unwrap_or_default().to_string())
        .collect()
}

/// Rows `skip..skip + per_intent` of each of `intents` in `file` (`train.csv`/`test.csv`), in
/// file order, so disjoint subsets of one split come from different `skip`s.
pub fn subset(file: &str, intents: &[&str], skip: usize, per_intent: usize) -> DataFrame {
    let path = data_dir().unwrap_or_else(|e| panic!("{e}")).join(file);
    let frame = CsvReadOptions::default()
        .with_has_header(true)
        .try_into_reader_with_file_path(Some(path.clone()))
        .and_then(|r| r.finish())
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut seen = HashMap::new();
    let mask: Vec<bool> = strings(&frame, "category")
        .into_iter()
        .map(|c| {
            if !intents.contains(&c.as_str()) {
                return false;
            }
            let n = seen.entry(c).or_insert(0usize);
            *n += 1;
            *n > skip && *n <= skip + per_intent
        })
        .collect();
    let picked = frame
        .filter(&BooleanChunked::from_slice("mask".into(), &mask))
        .unwrap_or_else(|e| panic!("cannot filter {}: {e}", path.display()));
    assert_eq!(
        picked.height(),
        intents.len() * per_intent,
        "{} has fewer than {} rows of some intent in {intents:?}",
        path.display(),
        skip + per_intent
    );
    picked
}
