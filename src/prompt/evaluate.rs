//! `Evaluate`: run a program over a devset with a metric, in parallel, with progress lines;
//! the average score (in percent, as DSPy reports it) and a per-example table.
//!
//! ```
//! use qlora::prompt::{Context, Evaluate, Example, ExactMatch, Predict, ScriptedLm};
//! let lm = ScriptedLm::new(|_| "[[ ## answer ## ]]\n4".to_string());
//! let devset = vec![
//!     Example::new().with("question", "2+2?").with("answer", "4").with_inputs(&["question"]),
//!     Example::new().with("question", "3+3?").with("answer", "6").with_inputs(&["question"]),
//! ];
//! let result = Evaluate::new(devset).display_progress(false)
//!     .run(&Predict::new("question -> answer")?, &Context::new(lm), &ExactMatch::new("answer"))?;
//! assert_eq!(result.score, 50.0);
//! let frame = result.to_dataframe()?; // question, answer (example_ / pred_), exact_match(answer), error
//! assert_eq!(frame.height(), 2);
//! # Ok::<(), qlora::Error>(())
//! ```

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use polars::prelude::{Column, DataFrame};

use super::adapter::ParseCounts;
use super::example::{Example, Prediction};
use super::metric::Metric;
use super::predict::{Context, Module};
use super::py::py_str;
use crate::display::{emit_html, escape_html};
use crate::{Error, Result};

/// Evaluates programs on a devset (DSPy's `dspy.Evaluate`).
#[derive(Debug, Clone)]
pub struct Evaluate {
    /// The examples (each with input keys).
    pub devset: Vec<Example>,
    /// Worker threads (DSPy: `num_threads`; default 1 — the local model already uses every
    /// core for one generation).
    pub num_threads: usize,
    /// Print a progress line now and then (on stdout; notebooks treat stderr as failure).
    pub display_progress: bool,
    /// The score of an example whose program call failed (DSPy's `failure_score`, 0).
    pub failure_score: f64,
    /// Stop with an error after this many failed examples (`None`: never). DSPy stops at 10
    /// by default; small local models fail to follow the format often enough that we count
    /// and show failures instead.
    pub max_errors: Option<usize>,
}

/// One evaluated example.
#[derive(Debug, Clone, PartialEq)]
pub struct EvaluatedExample {
    /// The example.
    pub example: Example,
    /// What the program predicted (`None` when it failed).
    pub prediction: Option<Prediction>,
    /// The metric's score (or `failure_score`).
    pub score: f64,
    /// Why the program failed (an LM error or an [`AdapterParseError`](super::AdapterParseError)).
    pub error: Option<String>,
}

/// The outcome of [`Evaluate::run`].
#[derive(Debug, Clone, PartialEq)]
pub struct EvaluationResult {
    /// 100 × mean score, rounded to 2 decimals (DSPy's `EvaluationResult.score`).
    pub score: f64,
    /// Per example, in devset order.
    pub results: Vec<EvaluatedExample>,
    /// The metric's name.
    pub metric_name: String,
    /// How completions parsed during this evaluation.
    pub parse_counts: ParseCounts,
    /// Wall time in seconds.
    pub seconds: f64,
}

impl Evaluate {
    /// Evaluation over `devset` with DSPy's defaults (one thread here, progress shown).
    pub fn new(devset: Vec<Example>) -> Self {
        Self {
            devset,
            num_threads: 1,
            display_progress: true,
            failure_score: 0.0,
            max_errors: None,
        }
    }

    /// Sets the number of threads.
    pub fn num_threads(mut self, n: usize) -> Self {
        self.num_threads = n.max(1);
        self
    }

    /// Turns progress lines on or off.
    pub fn display_progress(mut self, on: bool) -> Self {
        self.display_progress = on;
        self
    }

    /// Sets the score of failed examples.
    pub fn failure_score(mut self, s: f64) -> Self {
        self.failure_score = s;
        self
    }

    /// Stops after `n` failures.
    pub fn max_errors(mut self, n: usize) -> Self {
        self.max_errors = Some(n);
        self
    }

    /// Runs `program` on every example's inputs and scores it with `metric`.
    pub fn run(
        &self,
        program: &dyn Module,
        ctx: &Context,
        metric: &dyn Metric,
    ) -> Result<EvaluationResult> {
        for (i, ex) in self.devset.iter().enumerate() {
            ex.require_inputs("devset", i)?;
        }
        let start = Instant::now();
        let ctx = ctx.untraced();
        let before = ctx.parse_counts();
        let n = self.devset.len();
        let next = AtomicUsize::new(0);
        let done = AtomicUsize::new(0);
        let errors = AtomicUsize::new(0);
        let total_score = Mutex::new(0.0f64);
        let slots: Mutex<Vec<Option<EvaluatedExample>>> = Mutex::new(vec![None; n]);
        let stop: Mutex<Option<Error>> = Mutex::new(None);
        let every = (n / 10).max(1);
        std::thread::scope(|s| {
            for _ in 0..self.num_threads.min(n.max(1)) {
                s.spawn(|| loop {
                    if stop.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= n {
                        return;
                    }
                    let example = &self.devset[i];
                    let evaluated = match program.forward(&ctx, &example.inputs()) {
                        Ok(pred) => EvaluatedExample {
                            example: example.clone(),
                            score: metric.score(example, &pred, None),
                            prediction: Some(pred),
                            error: None,
                        },
                        Err(e) => {
                            let count = errors.fetch_add(1, Ordering::SeqCst) + 1;
                            if self.max_errors.is_some_and(|m| count >= m) {
                                *stop.lock().unwrap_or_else(|e| e.into_inner()) = Some(Error::InvalidArgument(format!(
                                    "evaluation stopped after {count} failed examples (max_errors); the last: {e}"
                                )));
                            }
                            EvaluatedExample {
                                example: example.clone(),
                                prediction: None,
                                score: self.failure_score,
                                error: Some(e.to_string()),
                            }
                        }
                    };
                    let total = {
                        let mut t = total_score.lock().unwrap_or_else(|e| e.into_inner());
                        *t += evaluated.score;
                        *t
                    };
                    slots.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(evaluated);
                    let d = done.fetch_add(1, Ordering::SeqCst) + 1;
                    if self.display_progress && (d % every == 0 || d == n) {
                        println!(
                            "Average Metric: {} / {d} ({:.1}%){}",
                            trim_float(total),
                            100.0 * total / d as f64,
                            match errors.load(Ordering::SeqCst) {
                                0 => String::new(),
                                k => format!(", {k} failed"),
                            }
                        );
                    }
                });
            }
        });
        if let Some(e) = stop.into_inner().unwrap_or_else(|e| e.into_inner()) {
            return Err(e);
        }
        let results: Vec<EvaluatedExample> = slots
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .into_iter()
            .map(|r| r.expect("every example evaluated"))
            .collect();
        let total: f64 = results.iter().map(|r| r.score).sum();
        let score = if n == 0 {
            0.0
        } else {
            (100.0 * total / n as f64 * 100.0).round() / 100.0
        };
        let after = ctx.parse_counts();
        Ok(EvaluationResult {
            score,
            results,
            metric_name: metric.name(),
            parse_counts: ParseCounts {
                calls: after.calls - before.calls,
                chat_failures: after.chat_failures - before.chat_failures,
                json_recovered: after.json_recovered - before.json_recovered,
                failures: after.failures - before.failures,
            },
            seconds: start.elapsed().as_secs_f64(),
        })
    }
}

fn trim_float(x: f64) -> String {
    if x.fract() == 0.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.2}")
    }
}

impl EvaluationResult {
    /// Number of examples whose program call failed.
    pub fn failures(&self) -> usize {
        self.results.iter().filter(|r| r.error.is_some()).count()
    }

    /// Column names and per-row text, DSPy's way: example fields, then prediction fields; a
    /// name in both becomes `example_<name>` and `pred_<name>`.
    fn table(&self) -> (Vec<String>, Vec<Vec<Option<String>>>) {
        let mut example_keys: Vec<String> = vec![];
        let mut pred_keys: Vec<String> = vec![];
        for r in &self.results {
            for k in r.example.keys() {
                if !example_keys.iter().any(|x| x == k) {
                    example_keys.push(k.to_string());
                }
            }
            if let Some(p) = &r.prediction {
                for k in p.fields.keys() {
                    if !pred_keys.iter().any(|x| x == k) {
                        pred_keys.push(k.to_string());
                    }
                }
            }
        }
        let mut columns = vec![];
        for k in &example_keys {
            columns.push(if pred_keys.contains(k) {
                format!("example_{k}")
            } else {
                k.clone()
            });
        }
        for k in &pred_keys {
            columns.push(if example_keys.contains(k) {
                format!("pred_{k}")
            } else {
                k.clone()
            });
        }
        let rows = self
            .results
            .iter()
            .map(|r| {
                let mut row: Vec<Option<String>> =
                    example_keys.iter().map(|k| r.example.get_str(k)).collect();
                row.extend(
                    pred_keys
                        .iter()
                        .map(|k| r.prediction.as_ref().and_then(|p| p.get(k)).map(py_str)),
                );
                row
            })
            .collect();
        (columns, rows)
    }

    /// The per-example results as a DataFrame: the fields (text), the metric's score and the
    /// error (null when the call worked).
    pub fn to_dataframe(&self) -> Result<DataFrame> {
        let (names, rows) = self.table();
        let mut columns: Vec<Column> = names
            .iter()
            .enumerate()
            .map(|(j, name)| {
                Column::new(
                    name.as_str().into(),
                    rows.iter()
                        .map(|r| r[j].clone())
                        .collect::<Vec<Option<String>>>(),
                )
            })
            .collect();
        columns.push(Column::new(
            self.metric_name.as_str().into(),
            self.results.iter().map(|r| r.score).collect::<Vec<f64>>(),
        ));
        columns.push(Column::new(
            "error".into(),
            self.results
                .iter()
                .map(|r| r.error.clone())
                .collect::<Vec<Option<String>>>(),
        ));
        DataFrame::new(self.results.len(), columns)
            .map_err(|e| Error::InvalidArgument(format!("building the evaluation frame: {e}")))
    }

    /// A one-line summary: `Average Metric: 7 / 10 (70.0%)`, plus parse failures.
    pub fn summary(&self) -> String {
        let total: f64 = self.results.iter().map(|r| r.score).sum();
        let mut s = format!(
            "Average Metric: {} / {} ({:.1}%)",
            trim_float(total),
            self.results.len(),
            self.score
        );
        let p = &self.parse_counts;
        if p.chat_failures > 0 || self.failures() > 0 {
            s.push_str(&format!(
                "; {} failed; format: {} of {} calls broke the [[ ## ]] format, {} recovered by the JSON fallback",
                self.failures(),
                p.chat_failures,
                p.calls,
                p.json_recovered
            ));
        }
        s
    }

    /// HTML: the summary and the first `max_rows` rows.
    pub fn to_html(&self, max_rows: usize) -> String {
        let (names, rows) = self.table();
        let mut html = format!(
            "<div><b>{}</b> <span style=\"color:#666\">({}, {:.1} s)</span></div>\
             <table style=\"border-collapse:collapse\"><tr>",
            escape_html(&self.summary()),
            escape_html(&self.metric_name),
            self.seconds
        );
        for n in names
            .iter()
            .chain([&self.metric_name, &"error".to_string()])
        {
            html.push_str(&format!(
                "<th style=\"text-align:left;padding:2px 8px;border-bottom:1px solid #999\">{}</th>",
                escape_html(n)
            ));
        }
        html.push_str("</tr>");
        for (r, row) in self.results.iter().zip(&rows).take(max_rows) {
            let color = if r.error.is_some() {
                "#fde2e1"
            } else if r.score > 0.0 {
                "#e6ffed"
            } else {
                "#fff"
            };
            html.push_str(&format!("<tr style=\"background:{color}\">"));
            for cell in row {
                let text = cell.clone().unwrap_or_default();
                let short: String = text.chars().take(120).collect();
                let ellipsis = if text.chars().count() > 120 {
                    "…"
                } else {
                    ""
                };
                html.push_str(&format!(
                    "<td style=\"padding:2px 8px;vertical-align:top;white-space:pre-wrap\">{}{ellipsis}</td>",
                    escape_html(&short)
                ));
            }
            html.push_str(&format!(
                "<td style=\"padding:2px 8px\">{}</td><td style=\"padding:2px 8px;color:#b31d28\">{}</td></tr>",
                trim_float(r.score),
                escape_html(&r.error.clone().unwrap_or_default().chars().take(160).collect::<String>())
            ));
        }
        html.push_str("</table>");
        if self.results.len() > max_rows {
            html.push_str(&format!(
                "<div style=\"color:#666\">… {} more rows (to_dataframe() has them all)</div>",
                self.results.len() - max_rows
            ));
        }
        html
    }

    /// Shows the summary and the first 25 rows in a notebook.
    pub fn evcxr_display(&self) {
        emit_html(&self.to_html(25));
    }
}

impl fmt::Display for EvaluationResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.summary())
    }
}
