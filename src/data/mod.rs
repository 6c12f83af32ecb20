//! Supervised fine-tuning datasets: JSONL, CSV and Parquet files (through polars), polars
//! DataFrames or records built in Rust, turned into token ids and loss masks with TRL's
//! completion-only semantics, split into train and validation, and batched for the trainer.
//!
//! ```no_run
//! use qlora::data::{ColumnMap, DataConfig, SftDataset};
//! use qlora::model::Model;
//! let model = Model::load("default")?;
//! let config = DataConfig::default()
//!     .columns(ColumnMap::prompt_completion("question", "answer"))
//!     .validation_split(0.1);
//! let data = SftDataset::load("data/train.csv", &model, &config)?;
//! println!("{}", data.report);
//! # Ok::<(), qlora::Error>(())
//! ```
//!
//! Formats ([`Format`]) are detected from the column names: `messages` (chat, OpenAI roles) or
//! `conversations` (ShareGPT), `prompt` + `completion`, `instruction` + `input` + `output`
//! (Alpaca), `text`; [`ColumnMap`] maps other names.
//!
//! Loss masks follow TRL's completion-only training. With the model's chat template (the
//! default) a conversation is rendered once and tokenised once; assistant message `i` covers
//! the text from the end of `render(messages[..i], add_generation_prompt = true)` to the end of
//! `render(messages[..=i])` — its content and the end-of-turn tokens the template writes after
//! it (`<|im_end|>\n`), so the model learns to stop — and a token is trained on when it starts
//! inside such a span. Prompt/completion and Alpaca rows are one user and one assistant
//! message. Without a template, prompt and completion are joined as text with EOS appended
//! (loss on completion + EOS; Alpaca rows use the Stanford Alpaca prompt); plain text gets BOS
//! (when the tokenizer adds one) and EOS and is trained on everywhere.
//!
//! Errors name the file, the row (the 1-based *line* of a JSONL file; the 1-based *data row* of
//! a CSV, Parquet file or DataFrame) and the field; [`DataConfig::skip_invalid_rows`] turns row
//! errors into warnings in the [`DataReport`].

mod batch;
mod config;
mod read;
mod record;
mod report;
mod tokenize;

use std::path::Path;

use polars::prelude::DataFrame;
use rayon::prelude::*;

pub use batch::{collate, epoch_batches, Batch};
pub use config::{ColumnMap, DataConfig, Format, COLUMN_ROLES};
pub use read::RowLocation;
pub use record::Record;

pub use report::DataReport;
pub use tokenize::TokenizedExample;

use read::{SourceKind, Table};
use tokenize::Encoder;

use crate::model::Model;
use crate::rng::SplitMix64;
use crate::{Error, Result};

/// A tokenised dataset, ready for the trainer.
#[derive(Debug, Clone)]
pub struct SftDataset {
    /// Training examples, in source order.
    pub train: Vec<TokenizedExample>,
    /// Held-out examples (empty unless [`DataConfig::validation_split`] > 0), in source order.
    pub validation: Vec<TokenizedExample>,
    /// What loading did.
    pub report: DataReport,
    /// The id [`collate`] pads with: the tokenizer's pad token, else its end-of-sequence token.
    pub pad_token_id: u32,
}

/// A row on its way to becoming an example.
struct Pending {
    loc: RowLocation,
    record: record::Record,
    system: Option<String>,
}

impl SftDataset {
    /// Reads a `.jsonl` (or `.json`), `.csv` or `.parquet` file and tokenises it for `model`.
    pub fn load(path: impl AsRef<Path>, model: &Model, config: &DataConfig) -> Result<Self> {
        config.validate()?;
        let table = read::read_file(path.as_ref(), config.skip_invalid_rows)?;
        Self::from_table(table, model, config)
    }

    /// Tokenises the rows of a polars DataFrame; `name` stands for it in messages. Chat columns
    /// may be lists of structs (`{role, content}`) or JSON strings.
    pub fn from_frame(
        frame: &DataFrame,
        name: &str,
        model: &Model,
        config: &DataConfig,
    ) -> Result<Self> {
        config.validate()?;
        let table = read::frame_table(frame, name.to_string(), SourceKind::DataFrame)?;
        Self::from_table(table, model, config)
    }

    /// Tokenises records built in Rust (any mix of formats); they are numbered from 1 in
    /// messages. [`DataConfig::format`] and [`DataConfig::columns`] do not apply.
    pub fn from_records(
        records: impl IntoIterator<Item = Record>,
        model: &Model,
        config: &DataConfig,
    ) -> Result<Self> {
        config.validate()?;
        let name = "records".to_string();
        let mut pending = Vec::new();
        let mut formats = Vec::new();
        for (i, record) in records.into_iter().enumerate() {
            if !formats.contains(&record.format()) {
                formats.push(record.format());
            }
            pending.push(Pending {
                loc: RowLocation::Record(i + 1),
                record,
                system: None,
            });
        }
        let format = match formats.as_slice() {
            [one] => *one,
            _ => Format::Auto,
        };
        let rows_read = pending.len();
        let mut builder = Builder::new(name, SourceKind::Records, format, model, config)?;
        builder.report.rows_read = rows_read;
        builder.validate_and_run(pending)
    }

    fn from_table(table: Table, model: &Model, config: &DataConfig) -> Result<Self> {
        let Table {
            name,
            kind,
            columns,
            rows,
            unreadable,
        } = table;
        let format = record::resolve_format(config.format, &columns, &config.columns)
            .map_err(|m| Error::data(&name, m))?;
        let mut builder = Builder::new(name, kind, format, model, config)?;
        builder.report.rows_read = rows.len() + unreadable.len();
        builder.report.column_mapping = config
            .columns
            .iter()
            .map(|(o, t)| (o.to_string(), t.to_string()))
            .collect();
        if format == Format::Chat && !config.columns.is_mapped("messages") {
            let col = record::messages_column(&columns, &config.columns);
            if col != "messages" {
                builder
                    .report
                    .column_mapping
                    .push(("messages".into(), col.into()));
            }
        }
        for problem in unreadable {
            builder.skip(problem);
        }
        let mut pending = Vec::with_capacity(rows.len());
        for (loc, row) in rows {
            match record::row_to_record(&row, format, &columns, &config.columns) {
                Ok((record, system)) => pending.push(Pending {
                    loc,
                    record,
                    system,
                }),
                Err(message) => builder.row_error(loc, &message)?,
            }
        }
        builder.run(pending)
    }

    /// Number of examples (train + validation).
    pub fn len(&self) -> usize {
        self.train.len() + self.validation.len()
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Lengths of the training examples, for [`epoch_batches`].
    pub fn train_lengths(&self) -> Vec<usize> {
        self.train.iter().map(TokenizedExample::len).collect()
    }

    /// Shows the report in a notebook.
    pub fn evcxr_display(&self) {
        self.report.evcxr_display();
    }
}

/// Turns pending rows into the dataset, collecting the report.
struct Builder<'a> {
    name: String,
    config: &'a DataConfig,
    encoder: Encoder<'a>,
    report: DataReport,
    pad_token_id: u32,
}

impl<'a> Builder<'a> {
    fn new(
        name: String,
        kind: SourceKind,
        format: Format,
        model: &'a Model,
        config: &'a DataConfig,
    ) -> Result<Self> {
        let encoder = Encoder::new(model, config)?;
        let tok = &model.tokenizer;
        let pad_token_id = tok
            .pad_token_id()
            .or_else(|| tok.eos_token_id())
            .or_else(|| model.eos_token_ids.first().copied())
            .ok_or_else(|| {
                Error::tokenizer(
                    tok.source(),
                    "the tokenizer has neither a pad nor an eos token",
                )
            })?;
        let mut warnings = Vec::new();
        if config.use_chat_template && !encoder.uses_template() {
            if format == Format::Chat {
                let why = tok
                    .require_chat_template()
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_default();
                return Err(Error::data(
                    &name,
                    format!(
                        "chat rows need the model's chat template: {why}. Set one with \
                         model.tokenizer.set_chat_template(..), or give prompt/completion rows"
                    ),
                ));
            }
            if format != Format::Text {
                warnings.push(format!(
                    "model `{}` has no chat template: prompts and completions are joined as \
                     plain text (EOS appended)",
                    model.name
                ));
            }
        }
        let report = DataReport {
            source: name.clone(),
            source_kind: kind.describe().to_string(),
            format,
            column_mapping: Vec::new(),
            chat_template: encoder.uses_template() && format != Format::Text,
            rows_read: 0,
            examples: 0,
            train_examples: 0,
            validation_examples: 0,
            truncated: 0,
            skipped: 0,
            dropped: 0,
            max_seq_len: config.max_seq_len,
            tokens: 0,
            target_tokens: 0,
            longest: 0,
            warnings,
        };
        Ok(Self {
            name,
            config,
            encoder,
            report,
            pad_token_id,
        })
    }

    fn skip(&mut self, problem: String) {
        self.report.skipped += 1;
        self.report.warnings.push(format!("skipped {problem}"));
    }

    /// A row that cannot be used: a warning when skipping, else the error.
    fn row_error(&mut self, loc: RowLocation, message: &str) -> Result<()> {
        if self.config.skip_invalid_rows {
            self.skip(format!("{loc}: {message}"));
            Ok(())
        } else {
            Err(Error::data(
                &self.name,
                format!(
                    "{loc}: {message} (or pass DataConfig::skip_invalid_rows(true) to skip such \
                     rows)"
                ),
            ))
        }
    }

    /// Programmatic records are checked here (file rows were checked while reading them).
    fn validate_and_run(mut self, pending: Vec<Pending>) -> Result<SftDataset> {
        let mut valid = Vec::with_capacity(pending.len());
        for p in pending {
            match p.record.validate() {
                Ok(()) => valid.push(p),
                Err(message) => self.row_error(p.loc, &message)?,
            }
        }
        self.run(valid)
    }

    fn run(mut self, pending: Vec<Pending>) -> Result<SftDataset> {
        let encoded: Vec<_> = pending
            .par_iter()
            .map(|p| self.encoder.encode(&p.record, p.system.as_deref()))
            .collect();
        let max_len = self.config.max_seq_len;
        let mut examples = Vec::with_capacity(pending.len());
        for (p, result) in pending.iter().zip(encoded) {
            let (mut input_ids, mut labels) = match result {
                Ok(x) => x,
                Err(message) => {
                    self.row_error(p.loc, &message)?;
                    continue;
                }
            };
            let full_len = input_ids.len();
            if full_len > max_len {
                input_ids.truncate(max_len);
                labels.truncate(max_len);
                self.report.truncated += 1;
            }
            let example = TokenizedExample {
                input_ids,
                labels,
                row: row_number(p.loc),
            };
            if example.num_target_tokens() == 0 {
                self.report.dropped += 1;
                self.report.warnings.push(format!(
                    "dropped {}: no token left to train on after truncating {full_len} tokens \
                     to max_seq_len {max_len}; raise DataConfig::max_seq_len or shorten the \
                     prompt",
                    p.loc
                ));
                continue;
            }
            examples.push(example);
        }
        if examples.is_empty() {
            let first = self
                .report
                .warnings
                .iter()
                .find(|w| w.starts_with("skipped") || w.starts_with("dropped"))
                .map(|w| format!(" (first: {w})"))
                .unwrap_or_default();
            return Err(Error::data(
                &self.name,
                format!(
                    "no usable examples: {} rows read, {} skipped as invalid, {} dropped by \
                     truncation{first}",
                    self.report.rows_read, self.report.skipped, self.report.dropped
                ),
            ));
        }
        let (train, validation) = split(examples, self.config.validation_split, self.config.seed)
            .map_err(|m| Error::data(&self.name, m))?;
        let r = &mut self.report;
        r.examples = train.len() + validation.len();
        r.train_examples = train.len();
        r.validation_examples = validation.len();
        for e in train.iter().chain(&validation) {
            r.tokens += e.len();
            r.target_tokens += e.num_target_tokens();
            r.longest = r.longest.max(e.len());
        }
        Ok(SftDataset {
            train,
            validation,
            report: self.report,
            pad_token_id: self.pad_token_id,
        })
    }
}

fn row_number(loc: RowLocation) -> usize {
    match loc {
        RowLocation::Line(n)
        | RowLocation::CsvRow(n)
        | RowLocation::Row(n)
        | RowLocation::Record(n) => n,
    }
}

/// Splits off `ceil(share · n)` examples for validation (as `datasets`' `train_test_split`),
/// chosen by a seeded shuffle; both parts keep the source order.
fn split(
    examples: Vec<TokenizedExample>,
    share: f64,
    seed: u64,
) -> std::result::Result<(Vec<TokenizedExample>, Vec<TokenizedExample>), String> {
    let n = examples.len();
    if share <= 0.0 {
        return Ok((examples, Vec::new()));
    }
    let n_val = ((share * n as f64).ceil() as usize).min(n);
    if n_val >= n {
        return Err(format!(
            "validation_split {share} of {n} example(s) leaves none for training; lower it or \
             add data"
        ));
    }
    let order = batch::permutation(n, &mut SplitMix64::new(seed));
    let mut is_val = vec![false; n];
    for &i in &order[..n_val] {
        is_val[i] = true;
    }
    let (mut train, mut validation) = (Vec::with_capacity(n - n_val), Vec::with_capacity(n_val));
    for (e, v) in examples.into_iter().zip(is_val) {
        if v {
            validation.push(e);
        } else {
            train.push(e);
        }
    }
    Ok((train, validation))
}

/// Writes `records` as JSON Lines (one [`Record::to_json`] object per line), atomically enough
/// for datasets: a temporary file renamed into place.
///
/// ```no_run
/// use qlora::data::{write_jsonl, Record};
/// write_jsonl("train.jsonl", &[Record::prompt_completion("2+2?", "4")])?;
/// # Ok::<(), qlora::Error>(())
/// ```
pub fn write_jsonl<'a>(
    path: impl AsRef<Path>,
    records: impl IntoIterator<Item = &'a Record>,
) -> crate::Result<()> {
    let path = path.as_ref();
    let mut text = String::new();
    for r in records {
        text.push_str(&r.to_json().to_string());
        text.push('\n');
    }
    let tmp = path.with_extension("jsonl.tmp");
    std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn examples(n: usize) -> Vec<TokenizedExample> {
        (0..n)
            .map(|i| TokenizedExample {
                input_ids: vec![1, 2],
                labels: vec![1, 2],
                row: i + 1,
            })
            .collect()
    }

    #[test]
    fn split_is_seeded_and_keeps_order() {
        let rows = |v: &[TokenizedExample]| v.iter().map(|e| e.row).collect::<Vec<_>>();
        let (t1, v1) = split(examples(20), 0.1, 42).unwrap();
        let (t2, v2) = split(examples(20), 0.1, 42).unwrap();
        let (_, v3) = split(examples(20), 0.1, 7).unwrap();
        assert_eq!((t1.len(), v1.len()), (18, 2));
        assert_eq!(rows(&v1), rows(&v2));
        assert_eq!(rows(&t1), rows(&t2));
        assert_ne!(rows(&v1), rows(&v3));
        assert!(rows(&t1).windows(2).all(|w| w[0] < w[1]));
        assert_eq!(split(examples(3), 0.0, 1).unwrap().1.len(), 0);
        assert!(split(examples(1), 0.5, 1).is_err());
    }
}
