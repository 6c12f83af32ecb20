//! Optimisers ("teleprompters") that choose a program's demos, with DSPy's algorithms,
//! defaults and random draws (Python's `random.Random(0)`, reproduced in
//! [`PyRandom`](super::py::PyRandom)), so the same trainset and metric give the same demos
//! as DSPy:
//!
//! - [`LabeledFewShot`]: `k` examples sampled from the trainset;
//! - [`BootstrapFewShot`]: run a teacher on the trainset, keep the traces the metric accepts
//!   as demos, fill the remaining slots with labeled examples;
//! - [`BootstrapFewShotWithRandomSearch`]: zero-shot, labeled-only and bootstrapped candidates
//!   on shuffled trainsets, each scored on a valset; the best wins;
//! - [`MiproV2`]: instructions proposed by an LM and bootstrapped demo sets, combined by a
//!   TPE search with minibatch evaluation;
//! - [`BootstrapFinetune`]: the teacher's successful traces as chat SFT records, and a QLoRA
//!   training run of the student's model on them;
//! - [`BetterTogether`]: prompt and weight optimisers in a sequence (`"p -> w -> p"`), each
//!   step scored on a valset, the best program (and its adapter) kept.
//!
//! Each returns the compiled program and an [`OptimizerReport`] of what it did.

mod better_together;
mod bootstrap;
mod finetune;
mod labeled;
mod mipro;
mod random_search;

pub use better_together::{
    BetterTogether, BetterTogetherReport, BetterTogetherResult, StepCandidate, StepOptimizer,
    StepRow, STRAT_SEP,
};
pub use bootstrap::BootstrapFewShot;
pub use finetune::{BootstrapFinetune, Finetuned};
pub use labeled::LabeledFewShot;
pub use mipro::{strip_prefix, AutoRun, MiproPlan, MiproV2, TIPS};
pub use random_search::BootstrapFewShotWithRandomSearch;

use std::fmt;

use polars::prelude::{Column, DataFrame};

use super::example::Example;
use super::predict::Module;
use crate::display::{emit_html, escape_html};
use crate::{Error, Result};

/// Every example of `set` (called `what` in the error) says which keys are its inputs.
fn require_inputs(what: &str, set: &[Example]) -> Result<()> {
    set.iter()
        .enumerate()
        .try_for_each(|(i, ex)| ex.require_inputs(what, i))
}

/// The predictor names of `student`, checked against `teacher`'s: a teacher runs in the
/// student's place, so both need the same predictors with the same fields.
fn matching_predictors<P: Module>(
    optimizer: &str,
    student: &P,
    teacher: &P,
) -> Result<Vec<String>> {
    let s = student.named_predictors();
    let t = teacher.named_predictors();
    let names = |v: &[(String, &super::predict::Predict)]| -> Vec<String> {
        v.iter().map(|(n, _)| n.clone()).collect()
    };
    if names(&s) != names(&t) {
        return Err(Error::InvalidArgument(format!(
            "{optimizer}: student and teacher must have the same predictors: {:?} vs {:?}",
            names(&s),
            names(&t)
        )));
    }
    for ((n, sp), (_, tp)) in s.iter().zip(&t) {
        if sp.signature.inputs() != tp.signature.inputs()
            || sp.signature.outputs() != tp.signature.outputs()
        {
            return Err(Error::InvalidArgument(format!(
                "{optimizer}: student and teacher predictor `{n}` have different signatures"
            )));
        }
    }
    Ok(names(&s))
}

/// One step an optimiser took (a bootstrap attempt on one training example, or a demo set
/// given to a predictor).
#[derive(Debug, Clone, PartialEq)]
pub struct ReportRow {
    /// Index in the trainset (`None` for per-predictor rows).
    pub example: Option<usize>,
    /// Bootstrap round (0 = the first, greedy one).
    pub round: usize,
    /// The predictor concerned, or `*` for the whole program.
    pub predictor: String,
    /// What happened (`bootstrapped`, `rejected by metric`, `error: ...`, `demos`).
    pub outcome: String,
    /// The metric's value, when it ran.
    pub score: Option<f64>,
    /// Demos (traces) kept from this step.
    pub kept: usize,
}

/// What an optimiser did, as a table for a notebook.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OptimizerReport {
    /// The optimiser (`BootstrapFewShot`, ...).
    pub optimizer: String,
    /// One line of totals.
    pub summary: String,
    /// The steps, in order.
    pub rows: Vec<ReportRow>,
}

impl OptimizerReport {
    /// The steps as a DataFrame (`example, round, predictor, outcome, score, kept`).
    pub fn to_dataframe(&self) -> Result<DataFrame> {
        let r = &self.rows;
        DataFrame::new(
            r.len(),
            vec![
                Column::new(
                    "example".into(),
                    r.iter()
                        .map(|x| x.example.map(|e| e as u64))
                        .collect::<Vec<Option<u64>>>(),
                ),
                Column::new(
                    "round".into(),
                    r.iter().map(|x| x.round as u64).collect::<Vec<u64>>(),
                ),
                Column::new(
                    "predictor".into(),
                    r.iter()
                        .map(|x| x.predictor.clone())
                        .collect::<Vec<String>>(),
                ),
                Column::new(
                    "outcome".into(),
                    r.iter().map(|x| x.outcome.clone()).collect::<Vec<String>>(),
                ),
                Column::new(
                    "score".into(),
                    r.iter().map(|x| x.score).collect::<Vec<Option<f64>>>(),
                ),
                Column::new(
                    "kept".into(),
                    r.iter().map(|x| x.kept as u64).collect::<Vec<u64>>(),
                ),
            ],
        )
        .map_err(|e| Error::InvalidArgument(format!("building the optimiser report: {e}")))
    }

    /// HTML table.
    pub fn to_html(&self) -> String {
        let mut html = format!(
            "<div><b>{}</b>: {}</div><table style=\"border-collapse:collapse\"><tr>",
            escape_html(&self.optimizer),
            escape_html(&self.summary)
        );
        for h in ["example", "round", "predictor", "outcome", "score", "kept"] {
            html.push_str(&format!(
                "<th style=\"text-align:left;padding:2px 8px;border-bottom:1px solid #999\">{h}</th>"
            ));
        }
        html.push_str("</tr>");
        for r in &self.rows {
            html.push_str(&format!(
                "<tr><td style=\"padding:2px 8px\">{}</td><td style=\"padding:2px 8px\">{}</td>\
                 <td style=\"padding:2px 8px\">{}</td><td style=\"padding:2px 8px\">{}</td>\
                 <td style=\"padding:2px 8px\">{}</td><td style=\"padding:2px 8px\">{}</td></tr>",
                r.example.map(|e| e.to_string()).unwrap_or_default(),
                r.round,
                escape_html(&r.predictor),
                escape_html(&r.outcome),
                r.score.map(|s| format!("{s}")).unwrap_or_default(),
                r.kept
            ));
        }
        html.push_str("</table>");
        html
    }

    /// Shows the report in a notebook.
    pub fn evcxr_display(&self) {
        emit_html(&self.to_html());
    }
}

impl fmt::Display for OptimizerReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}: {}", self.optimizer, self.summary)?;
        for r in &self.rows {
            writeln!(
                f,
                "  {:>5} r{} {:<10} {:<24} {:>6} kept {}",
                r.example
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "-".into()),
                r.round,
                r.predictor,
                r.outcome,
                r.score.map(|s| format!("{s}")).unwrap_or_default(),
                r.kept
            )?;
        }
        Ok(())
    }
}

/// A compiled program with the report of how it was made.
#[derive(Debug, Clone)]
pub struct Compiled<P> {
    /// The program with its new demos.
    pub program: P,
    /// What the optimiser did.
    pub report: OptimizerReport,
    /// The programs a search optimiser scored, best first (DSPy's `candidate_programs`;
    /// empty for optimisers that build one program).
    pub candidates: Vec<Candidate<P>>,
}

/// One program a search optimiser built and scored.
#[derive(Debug, Clone)]
pub struct Candidate<P> {
    /// The candidate's seed (random search: −3 zero-shot, −2 labeled only, −1 unshuffled
    /// bootstrap, then shuffled trainsets) or trial number (MIPROv2).
    pub seed: i64,
    /// The score on the valset (0–100, as `Evaluate`).
    pub score: f64,
    /// The metric's value per valset example.
    pub subscores: Vec<f64>,
    /// What the candidate is (`zero-shot`, `3 bootstrapped + 4 labeled demos`, ...).
    pub description: String,
    /// The program.
    pub program: P,
}
