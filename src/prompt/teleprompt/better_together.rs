//! DSPy's `BetterTogether`: prompt optimisation and weight optimisation (fine-tuning) in a
//! sequence such as `"p -> w -> p"`, each step scored on a valset, the best program kept.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Tensor;
use polars::prelude::{Column, DataFrame};

use super::super::evaluate::Evaluate;
use super::super::example::Example;
use super::super::lm::{Lm, LocalLm};
use super::super::metric::Metric;
use super::super::predict::{Context, Module};
use super::super::py::PyRandom;
use super::{
    BootstrapFewShot, BootstrapFewShotWithRandomSearch, BootstrapFinetune, LabeledFewShot, MiproV2,
    OptimizerReport,
};
use crate::display::{emit_html, escape_html};
use crate::lora::PeftModel;
use crate::{Error, Result};

/// An optimiser BetterTogether can run as one step of its strategy: the prompt optimisers of
/// this crate, or [`BootstrapFinetune`] (the weight optimiser).
#[derive(Clone)]
pub enum StepOptimizer {
    /// `LabeledFewShot` (demos sampled from the trainset).
    LabeledFewShot(LabeledFewShot),
    /// `BootstrapFewShot`.
    BootstrapFewShot(BootstrapFewShot),
    /// `BootstrapFewShotWithRandomSearch` (gets the valset).
    RandomSearch(BootstrapFewShotWithRandomSearch),
    /// `MIPROv2` (gets the valset).
    MiproV2(MiproV2),
    /// `BootstrapFinetune`: trains the adapter.
    Finetune(BootstrapFinetune),
}

impl StepOptimizer {
    /// The optimiser's DSPy name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::LabeledFewShot(_) => "LabeledFewShot",
            Self::BootstrapFewShot(_) => "BootstrapFewShot",
            Self::RandomSearch(_) => "BootstrapFewShotWithRandomSearch",
            Self::MiproV2(_) => "MIPROv2",
            Self::Finetune(_) => "BootstrapFinetune",
        }
    }

    /// Whether the step trains weights.
    pub fn is_weight_optimizer(&self) -> bool {
        matches!(self, Self::Finetune(_))
    }
}

impl From<LabeledFewShot> for StepOptimizer {
    fn from(o: LabeledFewShot) -> Self {
        Self::LabeledFewShot(o)
    }
}
impl From<BootstrapFewShot> for StepOptimizer {
    fn from(o: BootstrapFewShot) -> Self {
        Self::BootstrapFewShot(o)
    }
}
impl From<BootstrapFewShotWithRandomSearch> for StepOptimizer {
    fn from(o: BootstrapFewShotWithRandomSearch) -> Self {
        Self::RandomSearch(o)
    }
}
impl From<MiproV2> for StepOptimizer {
    fn from(o: MiproV2) -> Self {
        Self::MiproV2(o)
    }
}
impl From<BootstrapFinetune> for StepOptimizer {
    fn from(o: BootstrapFinetune) -> Self {
        Self::Finetune(o)
    }
}

/// The model in service, its LM's context and the saved weight versions.
struct WeightState {
    ctx: Context,
    shared: Option<Arc<PeftModel>>,
    versions: Vec<(PathBuf, Vec<Tensor>)>,
}

type LmBuilder = Arc<dyn Fn(Arc<PeftModel>) -> Arc<dyn Lm> + Send + Sync>;

/// Prompt and weight optimisation in sequence — DSPy 3.4's `BetterTogether`:
///
/// 1. the valset is the given one, else the first `valset_ratio` (0.1) of the trainset, the
///    rest training (DSPy's split);
/// 2. the student as given is scored on the valset (strategy `""`, the baseline);
/// 3. for each key of the strategy (`"p -> w -> p"` by default, keys joined by `" -> "`), the
///    trainset is shuffled with one `random.Random(seed)` generator (unless
///    `shuffle_trainset_between_steps` is off), the key's optimiser compiles the current
///    program (prompt optimisers with the current model's LM; `BootstrapFinetune` bootstraps
///    with it, then trains the [`PeftModel`]'s adapter), and the result is scored on the
///    valset;
/// 4. the candidate with the highest score wins (the earlier one on ties; without a valset,
///    the last one). A step that fails stops the sequence, and the best so far is returned
///    with the error noted ([`BetterTogetherResult::error`], DSPy's
///    `flag_compilation_error_occurred`).
///
/// Defaults as DSPy: `p` = [`BootstrapFewShotWithRandomSearch`], `w` = [`BootstrapFinetune`],
/// both with the metric; [`BetterTogether::optimizer`] replaces or adds keys.
///
/// Weights: every candidate keeps its adapter. After the baseline and after each weight step
/// the adapter is saved in PEFT's format to `run_dir/step-<i>` (prompt steps share the folder
/// of the weights they ran with), and a copy stays in memory so that the returned model holds
/// the best candidate's weights.
///
/// Differences from DSPy: the seed defaults to 0 (DSPy: `None`, a fresh random generator);
/// the LM of each step is built from the adapted model by [`BetterTogether::lm`] (default
/// [`LocalLm`]) where DSPy relaunches the fine-tuned provider's model; teachers run with the
/// current model's LM.
///
/// ```no_run
/// use qlora::prelude::*;
/// use qlora::prompt::{BetterTogether, ExactMatch};
/// # let (trainset, valset): (Vec<Example>, Vec<Example>) = (vec![], vec![]);
/// let peft = setup_qlora(Model::load("default")?, &LoraConfig::qlora())?;
/// let result = BetterTogether::new(ExactMatch::new("answer"))
///     .lm(|peft| LocalLm::from_peft_arc(peft).max_tokens(48))
///     .run_dir("runs/better-together")
///     .compile(&Predict::new("question -> answer")?, None, &trainset, Some(&valset), peft)?;
/// result.report.evcxr_display(); // step, strategy, optimiser, score, adapter folder
/// let ctx = result.ctx.clone(); // the best program's LM
/// # Ok::<(), qlora::Error>(())
/// ```
#[derive(Clone)]
pub struct BetterTogether {
    /// Scores every step on the valset.
    pub metric: Arc<dyn Metric>,
    /// The optimisers by strategy key.
    pub optimizers: BTreeMap<String, StepOptimizer>,
    /// The order of the steps (keys joined by `" -> "`; DSPy: `"p -> w -> p"`).
    pub strategy: String,
    /// The share of the trainset held out when no valset is given (DSPy: 0.1).
    pub valset_ratio: f64,
    /// Shuffle the trainset before each step (DSPy: true).
    pub shuffle_trainset_between_steps: bool,
    /// Seed of the shuffles.
    pub seed: u64,
    /// Threads of each evaluation.
    pub num_threads: usize,
    /// Failed examples tolerated by each evaluation (`None`: never stop).
    pub max_errors: Option<usize>,
    /// Where each candidate's adapter is saved.
    pub run_dir: PathBuf,
    /// Print a line per step (and evaluation progress).
    pub display_progress: bool,
    lm_builder: LmBuilder,
}

impl fmt::Debug for BetterTogether {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BetterTogether")
            .field("metric", &self.metric.name())
            .field(
                "optimizers",
                &self
                    .optimizers
                    .iter()
                    .map(|(k, o)| (k.clone(), o.name()))
                    .collect::<Vec<_>>(),
            )
            .field("strategy", &self.strategy)
            .field("valset_ratio", &self.valset_ratio)
            .field("seed", &self.seed)
            .field("run_dir", &self.run_dir)
            .finish()
    }
}

/// The separator of strategy keys (DSPy's `STRAT_SEP`).
pub const STRAT_SEP: &str = " -> ";

/// One program BetterTogether scored.
#[derive(Debug, Clone)]
pub struct StepCandidate<P> {
    /// 0 for the baseline, then 1, 2, ... in strategy order.
    pub step: usize,
    /// The strategy prefix that made it (`""`, `"p"`, `"p -> w"`, ...).
    pub strategy: String,
    /// The optimiser of the last step (`"original"` for the baseline).
    pub optimizer: String,
    /// The valset score (0–100; `None` without a valset).
    pub score: Option<f64>,
    /// The folder with the adapter this program runs with.
    pub adapter_dir: PathBuf,
    /// What the step's optimiser reported.
    pub report: Option<OptimizerReport>,
    /// The program.
    pub program: P,
    weights: usize,
}

/// What [`BetterTogether::compile`] returns.
#[derive(Clone)]
pub struct BetterTogetherResult<P> {
    /// The best program (the last one without a valset).
    pub program: P,
    /// Its strategy prefix.
    pub strategy: String,
    /// Its valset score.
    pub score: Option<f64>,
    /// The folder with its adapter.
    pub adapter_dir: PathBuf,
    /// The model, holding the best program's adapter weights.
    pub peft: Arc<PeftModel>,
    /// A context whose LM runs that model (built by [`BetterTogether::lm`]).
    pub ctx: Context,
    /// Every candidate, best first (DSPy's `candidate_programs`; equal scores keep their
    /// order).
    pub candidates: Vec<StepCandidate<P>>,
    /// The steps in order, as a table.
    pub report: BetterTogetherReport,
    /// The error that stopped the sequence early, if one did.
    pub error: Option<String>,
}

impl<P> fmt::Debug for BetterTogetherResult<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BetterTogetherResult")
            .field("strategy", &self.strategy)
            .field("score", &self.score)
            .field("adapter_dir", &self.adapter_dir)
            .field("error", &self.error)
            .finish()
    }
}

/// One row of [`BetterTogetherReport`].
#[derive(Debug, Clone, PartialEq)]
pub struct StepRow {
    /// 0 = baseline.
    pub step: usize,
    /// The strategy prefix.
    pub strategy: String,
    /// The step's optimiser.
    pub optimizer: String,
    /// The valset score.
    pub score: Option<f64>,
    /// Demos in the program after the step (all predictors).
    pub demos: usize,
    /// The adapter folder.
    pub adapter_dir: String,
    /// The step optimiser's summary line.
    pub summary: String,
}

/// BetterTogether's steps as a table for a notebook.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BetterTogetherReport {
    /// One line of totals.
    pub summary: String,
    /// Baseline then each step, in order.
    pub rows: Vec<StepRow>,
}

impl BetterTogetherReport {
    /// The rows as a DataFrame (`step, strategy, optimizer, score, demos, adapter_dir,
    /// summary`).
    pub fn to_dataframe(&self) -> Result<DataFrame> {
        let r = &self.rows;
        let s = |f: fn(&StepRow) -> String| r.iter().map(f).collect::<Vec<String>>();
        DataFrame::new(
            r.len(),
            vec![
                Column::new(
                    "step".into(),
                    r.iter().map(|x| x.step as u64).collect::<Vec<u64>>(),
                ),
                Column::new("strategy".into(), s(|x| x.strategy.clone())),
                Column::new("optimizer".into(), s(|x| x.optimizer.clone())),
                Column::new(
                    "score".into(),
                    r.iter().map(|x| x.score).collect::<Vec<Option<f64>>>(),
                ),
                Column::new(
                    "demos".into(),
                    r.iter().map(|x| x.demos as u64).collect::<Vec<u64>>(),
                ),
                Column::new("adapter_dir".into(), s(|x| x.adapter_dir.clone())),
                Column::new("summary".into(), s(|x| x.summary.clone())),
            ],
        )
        .map_err(|e| Error::InvalidArgument(format!("building the BetterTogether report: {e}")))
    }

    /// HTML table.
    pub fn to_html(&self) -> String {
        let mut html = format!(
            "<div><b>BetterTogether</b>: {}</div><table style=\"border-collapse:collapse\"><tr>",
            escape_html(&self.summary)
        );
        for h in [
            "step",
            "strategy",
            "optimizer",
            "score",
            "demos",
            "adapter",
            "summary",
        ] {
            html.push_str(&format!(
                "<th style=\"text-align:left;padding:2px 8px;border-bottom:1px solid #999\">{h}</th>"
            ));
        }
        html.push_str("</tr>");
        for r in &self.rows {
            let cells = [
                r.step.to_string(),
                if r.strategy.is_empty() {
                    "(original)".into()
                } else {
                    r.strategy.clone()
                },
                r.optimizer.clone(),
                r.score.map(|s| format!("{s}")).unwrap_or_default(),
                r.demos.to_string(),
                r.adapter_dir.clone(),
                r.summary.clone(),
            ];
            html.push_str("<tr>");
            for c in cells {
                html.push_str(&format!(
                    "<td style=\"padding:2px 8px\">{}</td>",
                    escape_html(&c)
                ));
            }
            html.push_str("</tr>");
        }
        html.push_str("</table>");
        html
    }

    /// Shows the report in a notebook.
    pub fn evcxr_display(&self) {
        emit_html(&self.to_html());
    }
}

impl fmt::Display for BetterTogetherReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "BetterTogether: {}", self.summary)?;
        for r in &self.rows {
            writeln!(
                f,
                "  {:>2} {:<16} {:<34} {:>7} demos {:>2}  {}",
                r.step,
                if r.strategy.is_empty() {
                    "(original)"
                } else {
                    &r.strategy
                },
                r.optimizer,
                r.score
                    .map(|s| format!("{s}"))
                    .unwrap_or_else(|| "-".into()),
                r.demos,
                r.adapter_dir
            )?;
        }
        Ok(())
    }
}

impl BetterTogether {
    /// DSPy's defaults: `p` = random search and `w` = BootstrapFinetune with `metric`,
    /// strategy `"p -> w -> p"`.
    pub fn new(metric: impl Metric + 'static) -> Self {
        Self::from_arc(Arc::new(metric))
    }

    /// DSPy's defaults with a shared metric.
    pub fn from_arc(metric: Arc<dyn Metric>) -> Self {
        let mut optimizers = BTreeMap::new();
        optimizers.insert(
            "p".to_string(),
            StepOptimizer::RandomSearch(BootstrapFewShotWithRandomSearch::from_arc(metric.clone())),
        );
        optimizers.insert(
            "w".to_string(),
            StepOptimizer::Finetune(BootstrapFinetune::from_arc(metric.clone())),
        );
        Self {
            metric,
            optimizers,
            strategy: "p -> w -> p".into(),
            valset_ratio: 0.1,
            shuffle_trainset_between_steps: true,
            seed: 0,
            num_threads: 1,
            max_errors: None,
            run_dir: PathBuf::from("better-together"),
            display_progress: true,
            lm_builder: Arc::new(|peft| Arc::new(LocalLm::from_peft_arc(peft)) as Arc<dyn Lm>),
        }
    }

    /// Sets (or adds) the optimiser of strategy key `key`.
    pub fn optimizer(mut self, key: &str, optimizer: impl Into<StepOptimizer>) -> Self {
        self.optimizers.insert(key.to_string(), optimizer.into());
        self
    }

    /// Sets the strategy (`"p -> w"`, ...).
    pub fn strategy(mut self, strategy: &str) -> Self {
        self.strategy = strategy.to_string();
        self
    }

    /// Sets the share of the trainset held out when no valset is given.
    pub fn valset_ratio(mut self, r: f64) -> Self {
        self.valset_ratio = r;
        self
    }

    /// Turns the shuffles between steps on or off.
    pub fn shuffle_trainset_between_steps(mut self, on: bool) -> Self {
        self.shuffle_trainset_between_steps = on;
        self
    }

    /// Sets the seed of the shuffles.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Sets the evaluation threads.
    pub fn num_threads(mut self, n: usize) -> Self {
        self.num_threads = n.max(1);
        self
    }

    /// Sets `max_errors` of the evaluations.
    pub fn max_errors(mut self, n: usize) -> Self {
        self.max_errors = Some(n);
        self
    }

    /// Sets the folder of the saved adapters.
    pub fn run_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.run_dir = dir.as_ref().to_path_buf();
        self
    }

    /// Turns progress lines on or off.
    pub fn display_progress(mut self, on: bool) -> Self {
        self.display_progress = on;
        self
    }

    /// How the LM of each step is built from the adapted model (default: `LocalLm` with its
    /// defaults), e.g. `|peft| LocalLm::from_peft_arc(peft).max_tokens(48)`. The LM must not
    /// keep the model alive after it is dropped (weight steps need the model back to train
    /// it).
    pub fn lm<L: Lm + 'static>(
        mut self,
        build: impl Fn(Arc<PeftModel>) -> L + Send + Sync + 'static,
    ) -> Self {
        self.lm_builder = Arc::new(move |peft| Arc::new(build(peft)) as Arc<dyn Lm>);
        self
    }

    /// The strategy's keys, checked against the optimisers.
    pub fn parse_strategy(&self) -> Result<Vec<String>> {
        if self.strategy.trim().is_empty() {
            return Err(Error::InvalidArgument("strategy cannot be empty".into()));
        }
        let steps: Vec<String> = self.strategy.split(STRAT_SEP).map(str::to_string).collect();
        let invalid: Vec<&String> = steps
            .iter()
            .filter(|s| !self.optimizers.contains_key(*s))
            .collect();
        if !invalid.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "strategy {:?} contains invalid optimizer keys: {invalid:?}; valid keys are {:?} \
                 (separate keys with \" -> \")",
                self.strategy,
                self.optimizers.keys().collect::<Vec<_>>()
            )));
        }
        Ok(steps)
    }

    fn evaluate<P: Module>(
        &self,
        program: &P,
        valset: &[Example],
        ctx: &Context,
    ) -> Result<Option<f64>> {
        if valset.is_empty() {
            return Ok(None);
        }
        let mut e = Evaluate::new(valset.to_vec())
            .num_threads(self.num_threads)
            .display_progress(self.display_progress);
        e.max_errors = self.max_errors;
        Ok(Some(e.run(program, ctx, &*self.metric)?.score))
    }

    fn save_weights(&self, peft: &PeftModel, step: usize) -> Result<(PathBuf, Vec<Tensor>)> {
        let dir = self.run_dir.join(format!("step-{step}"));
        peft.save_adapter(peft.active_adapter(), &dir)?;
        let snapshot = peft
            .trainable_parameters()
            .iter()
            .map(|(_, v)| v.as_tensor().copy())
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok((dir, snapshot))
    }

    /// Runs one step's optimiser on `program` (its `compiled` flags cleared first).
    fn run_step<P: Module + Clone>(
        &self,
        optimizer: &StepOptimizer,
        program: &mut P,
        teacher: Option<&P>,
        (trainset, valset_arg): (&[Example], Option<&[Example]>),
        state: &mut WeightState,
        step: usize,
    ) -> Result<(P, OptimizerReport)> {
        for (_, p) in program.named_predictors_mut() {
            p.compiled = false;
        }
        Ok(match optimizer {
            StepOptimizer::LabeledFewShot(o) => {
                let c = o.compile(&*program, trainset);
                (c.program, c.report)
            }
            StepOptimizer::BootstrapFewShot(o) => {
                let c = o.compile(&*program, teacher, trainset, &state.ctx)?;
                (c.program, c.report)
            }
            StepOptimizer::RandomSearch(o) => {
                let c = o.compile(&*program, teacher, trainset, valset_arg, &state.ctx)?;
                (c.program, c.report)
            }
            StepOptimizer::MiproV2(o) => {
                let c = o.compile(&*program, teacher, trainset, valset_arg, &state.ctx)?;
                (c.program, c.report)
            }
            StepOptimizer::Finetune(o) => {
                let (records, report) =
                    o.bootstrap_records(&*program, teacher, trainset, &state.ctx)?;
                // The model back from the LM, to train it.
                state.ctx = Context::new(super::super::lm::ScriptedLm::new(|_| String::new()));
                let taken = state.shared.take().expect("the model is in service");
                let mut peft = match Arc::try_unwrap(taken) {
                    Ok(p) => p,
                    Err(back) => {
                        state.ctx = Context::from_arc((self.lm_builder)(back.clone()));
                        state.shared = Some(back);
                        return Err(Error::InvalidArgument(
                            "BetterTogether: the LM built by `.lm(...)` keeps the model alive \
                             after it is dropped; a weight step cannot train it"
                                .into(),
                        ));
                    }
                };
                let trained = o.train_on_records(&*program, records, report, &mut peft);
                // Whatever happened, the model goes back into service.
                let step_weights = trained
                    .as_ref()
                    .ok()
                    .map(|_| self.save_weights(&peft, step));
                let model = Arc::new(peft);
                state.ctx = Context::from_arc((self.lm_builder)(model.clone()));
                state.shared = Some(model);
                let tuned = trained?;
                state.versions.push(step_weights.expect("trained")?);
                (tuned.program, tuned.report)
            }
        })
    }

    /// Runs the strategy on `student` (with `teacher`, default the current program, for the
    /// bootstrapping steps) and `peft`, the model whose adapter the weight steps train.
    pub fn compile<P: Module + Clone>(
        &self,
        student: &P,
        teacher: Option<&P>,
        trainset: &[Example],
        valset: Option<&[Example]>,
        peft: PeftModel,
    ) -> Result<BetterTogetherResult<P>> {
        if trainset.is_empty() {
            return Err(Error::InvalidArgument("trainset cannot be empty".into()));
        }
        if !(0.0..1.0).contains(&self.valset_ratio) {
            return Err(Error::InvalidArgument(format!(
                "valset_ratio must be in [0, 1), got {}",
                self.valset_ratio
            )));
        }
        let steps = self.parse_strategy()?;
        let mut trainset = trainset.to_vec();
        let valset: Vec<Example> = match valset {
            Some(v) if !v.is_empty() => v.to_vec(),
            _ => {
                let n = (self.valset_ratio * trainset.len() as f64) as usize;
                trainset.drain(..n).collect()
            }
        };
        let valset_arg = (!valset.is_empty()).then_some(valset.as_slice());
        let mut rng = PyRandom::new(self.seed);

        // Weight versions: folder and in-memory copy.
        let versions = vec![self.save_weights(&peft, 0)?];
        let model = Arc::new(peft);
        let mut state = WeightState {
            ctx: Context::from_arc((self.lm_builder)(model.clone())),
            shared: Some(model),
            versions,
        };

        let mut program = student.clone();
        let mut candidates: Vec<StepCandidate<P>> = vec![];
        let score = self.evaluate(&program, &valset, &state.ctx)?;
        if self.display_progress {
            println!("BetterTogether baseline: score {}", show(score));
        }
        candidates.push(StepCandidate {
            step: 0,
            strategy: String::new(),
            optimizer: "original".into(),
            score,
            adapter_dir: state.versions[0].0.clone(),
            report: None,
            program: program.clone(),
            weights: 0,
        });
        let mut error = None;
        for (i, key) in steps.iter().enumerate() {
            let prefix = steps[..=i].join(STRAT_SEP);
            let optimizer = &self.optimizers[key];
            if self.shuffle_trainset_between_steps {
                rng.shuffle(&mut trainset);
            }
            if self.display_progress {
                println!(
                    "BetterTogether step {}/{}: {} ({prefix})",
                    i + 1,
                    steps.len(),
                    optimizer.name()
                );
            }
            let outcome = self.run_step(
                optimizer,
                &mut program,
                teacher,
                (&trainset, valset_arg),
                &mut state,
                i + 1,
            );
            match outcome {
                Ok((p, report)) => {
                    program = p;
                    let score = match self.evaluate(&program, &valset, &state.ctx) {
                        Ok(s) => s,
                        Err(e) => {
                            error = Some(format!("step {} ({prefix}): {e}", i + 1));
                            break;
                        }
                    };
                    let best_so_far = candidates
                        .iter()
                        .filter_map(|c| c.score)
                        .fold(f64::NEG_INFINITY, f64::max);
                    if self.display_progress {
                        println!(
                            "BetterTogether {prefix}: score {}{}",
                            show(score),
                            if score.is_some_and(|s| s >= best_so_far) {
                                " (new best)"
                            } else {
                                ""
                            }
                        );
                    }
                    let weights = state.versions.len() - 1;
                    candidates.push(StepCandidate {
                        step: i + 1,
                        strategy: prefix,
                        optimizer: optimizer.name().into(),
                        score,
                        adapter_dir: state.versions[weights].0.clone(),
                        report: Some(report),
                        program: program.clone(),
                        weights,
                    });
                }
                Err(e) => {
                    if self.display_progress {
                        println!("BetterTogether step {} failed, stopping: {e}", i + 1);
                    }
                    error = Some(format!("step {} ({prefix}): {e}", i + 1));
                    break;
                }
            }
        }
        let WeightState {
            mut ctx,
            shared,
            versions,
        } = state;
        let shared = shared.ok_or_else(|| {
            Error::InvalidArgument(
                error
                    .clone()
                    .unwrap_or_else(|| "BetterTogether: the model was lost".into()),
            )
        })?;

        let rows: Vec<StepRow> = candidates
            .iter()
            .map(|c| StepRow {
                step: c.step,
                strategy: c.strategy.clone(),
                optimizer: c.optimizer.clone(),
                score: c.score,
                demos: c
                    .program
                    .named_predictors()
                    .iter()
                    .map(|(_, p)| p.demos.len())
                    .sum(),
                adapter_dir: c.adapter_dir.display().to_string(),
                summary: c
                    .report
                    .as_ref()
                    .map(|r| r.summary.clone())
                    .unwrap_or_default(),
            })
            .collect();
        let n = candidates.len();
        // Best first, earlier first on ties (None below every score).
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| {
            let sa = candidates[a].score.unwrap_or(f64::NEG_INFINITY);
            let sb = candidates[b].score.unwrap_or(f64::NEG_INFINITY);
            sb.total_cmp(&sa).then(a.cmp(&b))
        });
        let best = if valset.is_empty() { n - 1 } else { order[0] };
        let chosen = &candidates[best];
        if chosen.weights != versions.len() - 1 {
            for ((_, var), t) in shared
                .trainable_parameters()
                .iter()
                .zip(&versions[chosen.weights].1)
            {
                var.set(t)?;
            }
            ctx = Context::from_arc((self.lm_builder)(shared.clone()));
        }
        let summary = format!(
            "{} of {} steps of \"{}\" ran, scored on {} validation examples; best: {} (score {}){}",
            n - 1,
            steps.len(),
            self.strategy,
            valset.len(),
            if chosen.strategy.is_empty() {
                "original (no optimization)"
            } else {
                &chosen.strategy
            },
            show(chosen.score),
            error
                .as_ref()
                .map(|e| format!("; stopped early: {e}"))
                .unwrap_or_default()
        );
        if self.display_progress {
            println!("{summary}");
        }
        let mut program = chosen.program.clone();
        for (_, p) in program.named_predictors_mut() {
            p.compiled = true;
        }
        let (strategy, score, adapter_dir) = (
            chosen.strategy.clone(),
            chosen.score,
            chosen.adapter_dir.clone(),
        );
        let sorted: Vec<StepCandidate<P>> =
            order.into_iter().map(|i| candidates[i].clone()).collect();
        Ok(BetterTogetherResult {
            program,
            strategy,
            score,
            adapter_dir,
            peft: shared,
            ctx,
            candidates: sorted,
            report: BetterTogetherReport { summary, rows },
            error,
        })
    }
}

fn show(score: Option<f64>) -> String {
    score.map(|s| format!("{s}")).unwrap_or_else(|| "-".into())
}
