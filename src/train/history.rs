//! What a training run leaves behind: one record per optimiser step, the outcome, and the
//! history as a polars DataFrame, CSV, JSON and an SVG loss plot.

use std::path::{Path, PathBuf};

use polars::prelude::{Column, DataFrame};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// One optimiser step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// 1-based optimiser step.
    pub step: usize,
    /// Fractional epoch at the end of this step (transformers' `epoch` in its logs).
    pub epoch: f64,
    /// Mean training loss over the step's target tokens (all micro-batches together).
    pub loss: f64,
    /// Validation loss, on the steps where it was evaluated.
    pub eval_loss: Option<f64>,
    /// Learning rate used by this step.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Real (non-padding) tokens per second over this step.
    pub tokens_per_sec: f64,
    /// Real tokens in this step.
    pub tokens: usize,
}

/// Why a run ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// Every planned step ran.
    Completed,
    /// The evaluation loss stopped improving for `patience` evaluations.
    EarlyStopped {
        /// The step it stopped at.
        step: usize,
        /// The best step, whose adapter weights were restored.
        best_step: usize,
    },
}

/// The result of [`super::train`]: history, outcome and where things were written.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainRun {
    /// One record per optimiser step.
    pub history: Vec<StepRecord>,
    /// Steps the run was planned for.
    pub total_steps: usize,
    /// Why it ended.
    pub stop_reason: StopReason,
    /// Best validation loss and its step.
    pub best_eval: Option<(f64, usize)>,
    /// Wall time spent training (including evaluation), seconds.
    pub train_seconds: f64,
    /// Real tokens processed.
    pub tokens_seen: u64,
    /// The step this run resumed from, if it did.
    pub resumed_from_step: Option<usize>,
    /// Where the final adapter, history and plot were written.
    pub output_dir: Option<PathBuf>,
}

impl TrainRun {
    /// Loss of the last step.
    pub fn final_loss(&self) -> Option<f64> {
        self.history.last().map(|r| r.loss)
    }

    /// Evaluation losses as `(step, loss)`.
    pub fn eval_losses(&self) -> Vec<(usize, f64)> {
        self.history
            .iter()
            .filter_map(|r| r.eval_loss.map(|l| (r.step, l)))
            .collect()
    }

    /// Mean tokens per second over the whole run.
    pub fn tokens_per_sec(&self) -> f64 {
        self.tokens_seen as f64 / self.train_seconds.max(1e-9)
    }

    /// The history as a DataFrame with columns `step, epoch, loss, eval_loss, lr, grad_norm,
    /// tokens_per_sec` (`eval_loss` is null where no evaluation ran).
    pub fn history_frame(&self) -> Result<DataFrame> {
        let h = &self.history;
        let col_f64 = |name: &str, f: &dyn Fn(&StepRecord) -> f64| {
            Column::new(name.into(), h.iter().map(f).collect::<Vec<f64>>())
        };
        DataFrame::new(
            h.len(),
            vec![
                Column::new(
                    "step".into(),
                    h.iter().map(|r| r.step as u64).collect::<Vec<u64>>(),
                ),
                col_f64("epoch", &|r| r.epoch),
                col_f64("loss", &|r| r.loss),
                Column::new(
                    "eval_loss".into(),
                    h.iter().map(|r| r.eval_loss).collect::<Vec<Option<f64>>>(),
                ),
                col_f64("lr", &|r| r.lr),
                col_f64("grad_norm", &|r| r.grad_norm),
                col_f64("tokens_per_sec", &|r| r.tokens_per_sec),
            ],
        )
        .map_err(|e| Error::InvalidArgument(format!("building the history frame: {e}")))
    }

    /// The history as CSV text (same columns as [`TrainRun::history_frame`]).
    pub fn history_csv(&self) -> String {
        let mut out = String::from("step,epoch,loss,eval_loss,lr,grad_norm,tokens_per_sec\n");
        for r in &self.history {
            out.push_str(&format!(
                "{},{},{},{},{},{},{}\n",
                r.step,
                r.epoch,
                r.loss,
                r.eval_loss.map(|l| l.to_string()).unwrap_or_default(),
                r.lr,
                r.grad_norm,
                r.tokens_per_sec
            ));
        }
        out
    }

    /// An SVG plot of training loss (and evaluation loss) against the step.
    pub fn loss_plot_svg(&self) -> String {
        crate::display::plot::loss_plot_svg(self)
    }

    /// Writes `history.csv`, `history.json` and `loss.svg` into `dir`.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let json = serde_json::to_string_pretty(self)
            .map_err(|e| Error::InvalidArgument(format!("serialising the run: {e}")))?;
        for (name, text) in [
            ("history.csv", self.history_csv()),
            ("history.json", json),
            ("loss.svg", self.loss_plot_svg()),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
        }
        Ok(())
    }

    /// Reads a run saved by [`TrainRun::save`].
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let path = dir.as_ref().join("history.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::Config {
            path,
            message: format!("not a training history written by qlora ({e})"),
        })
    }
}
