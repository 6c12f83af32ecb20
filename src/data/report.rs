//! What loading a dataset did: counts, lengths and warnings, for the terminal and notebooks.

use std::fmt;

use super::config::Format;
use crate::display::{emit_html, escape_html, key_value_table, thousands};

/// How many warnings [`DataReport`]'s displays list before summarising the rest.
const SHOWN_WARNINGS: usize = 10;

/// What loading a dataset did.
#[derive(Debug, Clone, PartialEq)]
pub struct DataReport {
    /// The file (or the name given to a DataFrame / list of records).
    pub source: String,
    /// `JSON Lines`, `CSV`, `Parquet`, `DataFrame`, `records`, ...
    pub source_kind: String,
    /// The format the rows were read as (detected or forced).
    pub format: Format,
    /// Non-default column names used, as `ours ← theirs`.
    pub column_mapping: Vec<(String, String)>,
    /// Whether the model's chat template rendered the examples.
    pub chat_template: bool,
    /// Rows in the source (unreadable JSONL lines included).
    pub rows_read: usize,
    /// Examples kept (train + validation).
    pub examples: usize,
    /// Examples in the training split.
    pub train_examples: usize,
    /// Examples in the validation split.
    pub validation_examples: usize,
    /// Examples cut to `max_seq_len`.
    pub truncated: usize,
    /// Invalid rows skipped (`skip_invalid_rows`); each has a warning.
    pub skipped: usize,
    /// Examples dropped because truncation left no token to train on; each has a warning.
    pub dropped: usize,
    /// The length limit used.
    pub max_seq_len: usize,
    /// Tokens in all kept examples.
    pub tokens: usize,
    /// Tokens the loss counts in all kept examples.
    pub target_tokens: usize,
    /// Length of the longest kept example.
    pub longest: usize,
    /// One line per skipped row, dropped example or other notice, naming the row.
    pub warnings: Vec<String>,
}

impl DataReport {
    /// Mean length of the kept examples in tokens.
    pub fn mean_length(&self) -> f64 {
        self.tokens as f64 / self.examples.max(1) as f64
    }

    fn rows(&self) -> Vec<(String, String)> {
        let mut rows = vec![
            (
                "source".to_string(),
                format!("{} ({})", self.source, self.source_kind),
            ),
            (
                "format".to_string(),
                format!(
                    "{}{}",
                    self.format,
                    if self.chat_template {
                        ", chat template"
                    } else {
                        ", plain text"
                    }
                ),
            ),
        ];
        if !self.column_mapping.is_empty() {
            rows.push((
                "columns".to_string(),
                self.column_mapping
                    .iter()
                    .map(|(o, t)| format!("{o} ← {t}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            ));
        }
        rows.extend([
            ("rows read".to_string(), thousands(self.rows_read)),
            (
                "examples (train / validation)".to_string(),
                format!(
                    "{} ({} / {})",
                    thousands(self.examples),
                    thousands(self.train_examples),
                    thousands(self.validation_examples)
                ),
            ),
            (
                "tokens (trained on)".to_string(),
                format!(
                    "{} ({}, {:.1} %)",
                    thousands(self.tokens),
                    thousands(self.target_tokens),
                    100.0 * self.target_tokens as f64 / self.tokens.max(1) as f64
                ),
            ),
            (
                "length mean / max".to_string(),
                format!(
                    "{:.1} / {} (limit {})",
                    self.mean_length(),
                    self.longest,
                    self.max_seq_len
                ),
            ),
            ("truncated".to_string(), thousands(self.truncated)),
            ("skipped (invalid)".to_string(), thousands(self.skipped)),
            (
                "dropped (nothing to train on)".to_string(),
                thousands(self.dropped),
            ),
            ("warnings".to_string(), thousands(self.warnings.len())),
        ]);
        rows
    }

    /// Shows the report as an HTML table (and the first warnings) in a notebook.
    pub fn evcxr_display(&self) {
        let mut html = key_value_table("Dataset", &self.rows());
        if !self.warnings.is_empty() {
            html.push_str("<details><summary>warnings</summary><ul>");
            for w in self.warnings.iter().take(SHOWN_WARNINGS) {
                html.push_str(&format!("<li>{}</li>", escape_html(w)));
            }
            if self.warnings.len() > SHOWN_WARNINGS {
                html.push_str(&format!(
                    "<li>… and {} more (DataReport::warnings)</li>",
                    self.warnings.len() - SHOWN_WARNINGS
                ));
            }
            html.push_str("</ul></details>");
        }
        emit_html(&html);
    }
}

impl fmt::Display for DataReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "Dataset")?;
        for (k, v) in self.rows() {
            writeln!(f, "  {k:<30} {v}")?;
        }
        for w in self.warnings.iter().take(SHOWN_WARNINGS) {
            writeln!(f, "  warning: {w}")?;
        }
        if self.warnings.len() > SHOWN_WARNINGS {
            writeln!(
                f,
                "  ... and {} more warnings",
                self.warnings.len() - SHOWN_WARNINGS
            )?;
        }
        Ok(())
    }
}
