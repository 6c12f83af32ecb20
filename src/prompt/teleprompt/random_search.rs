//! DSPy's `BootstrapFewShotWithRandomSearch`.

use std::sync::Arc;

use super::super::evaluate::Evaluate;
use super::super::example::Example;
use super::super::metric::Metric;
use super::super::predict::{Context, LmConfig, Module};
use super::super::py::PyRandom;
use super::bootstrap::BootstrapFewShot;
use super::labeled::LabeledFewShot;
use super::{Candidate, Compiled, OptimizerReport, ReportRow};
use crate::{Error, Result};

/// Random search over bootstrapped demo sets — DSPy's `BootstrapFewShotWithRandomSearch`,
/// with its defaults and its candidates, seed by seed:
///
/// - seed −3: the student zero-shot (no demos);
/// - seed −2: [`LabeledFewShot`]`(k = max_labeled_demos)` (sampled unless `labeled_sample`
///   is off);
/// - seed −1: [`BootstrapFewShot`] on the trainset as given, with up to
///   `max_bootstrapped_demos` traces;
/// - seeds 0 .. `num_candidate_programs`: the trainset shuffled with `random.Random(seed)`,
///   and `BootstrapFewShot` with `random.Random(seed).randint(1, max_bootstrapped_demos)`
///   traces (a fresh generator, as DSPy draws it).
///
/// Every candidate is scored with [`Evaluate`] on the valset (the trainset when none is
/// given); the first candidate with the highest score wins (DSPy keeps the first of equal
/// scores). The compiled result lists every candidate, best first
/// ([`Compiled::candidates`], DSPy's `candidate_programs`), and the report has one row per
/// candidate.
///
/// ```
/// use qlora::prompt::{BootstrapFewShotWithRandomSearch, Context, Example, ExactMatch, Predict, ScriptedLm};
/// let data: Vec<Example> = (0..8)
///     .map(|i| Example::new().with("question", format!("{i}+{i}?")).with("answer", (2 * i).to_string()).with_inputs(&["question"]))
///     .collect();
/// let lm = ScriptedLm::new(|_| "[[ ## answer ## ]]\n4".to_string());
/// let compiled = BootstrapFewShotWithRandomSearch::new(ExactMatch::new("answer"))
///     .num_candidate_programs(2)
///     .display_progress(false)
///     .compile(&Predict::new("question -> answer")?, None, &data[..6], Some(&data[6..]), &Context::new(lm))?;
/// assert_eq!(compiled.candidates.len(), 5); // seeds -3, -2, -1, 0, 1
/// # Ok::<(), qlora::Error>(())
/// ```
#[derive(Clone)]
pub struct BootstrapFewShotWithRandomSearch {
    /// Scores candidates on the valset and decides which traces are kept.
    pub metric: Arc<dyn Metric>,
    /// With a threshold, a trace is kept when the metric reaches it.
    pub metric_threshold: Option<f64>,
    /// LM settings for the teacher's calls.
    pub teacher_settings: Option<LmConfig>,
    /// Most bootstrapped demos per predictor; candidates draw between 1 and this (DSPy: 4).
    pub max_bootstrapped_demos: usize,
    /// Demos per predictor in all (DSPy: 16).
    pub max_labeled_demos: usize,
    /// Bootstrap attempts per example (DSPy: 1).
    pub max_rounds: usize,
    /// Shuffled candidates after the three fixed ones (DSPy: 16).
    pub num_candidate_programs: usize,
    /// Threads for each evaluation.
    pub num_threads: usize,
    /// Errors tolerated in bootstrapping (default 10, DSPy's `settings.max_errors`) and
    /// evaluation (`None`: evaluation never stops; DSPy stops at 10 — see [`Evaluate`]).
    pub max_errors: Option<usize>,
    /// Stop as soon as a candidate scores at least this.
    pub stop_at_score: Option<f64>,
    /// Evaluate only these seeds (DSPy's `restrict`).
    pub restrict: Option<Vec<i64>>,
    /// Whether seed −2 samples its labeled demos (DSPy's `labeled_sample`, true).
    pub labeled_sample: bool,
    /// Print a line per candidate (and evaluation progress).
    pub display_progress: bool,
}

impl std::fmt::Debug for BootstrapFewShotWithRandomSearch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootstrapFewShotWithRandomSearch")
            .field("metric", &self.metric.name())
            .field("max_bootstrapped_demos", &self.max_bootstrapped_demos)
            .field("max_labeled_demos", &self.max_labeled_demos)
            .field("max_rounds", &self.max_rounds)
            .field("num_candidate_programs", &self.num_candidate_programs)
            .field("stop_at_score", &self.stop_at_score)
            .finish()
    }
}

impl BootstrapFewShotWithRandomSearch {
    /// DSPy's defaults with `metric`.
    pub fn new(metric: impl Metric + 'static) -> Self {
        Self::from_arc(Arc::new(metric))
    }

    /// DSPy's defaults with a shared metric.
    pub fn from_arc(metric: Arc<dyn Metric>) -> Self {
        Self {
            metric,
            metric_threshold: None,
            teacher_settings: None,
            max_bootstrapped_demos: 4,
            max_labeled_demos: 16,
            max_rounds: 1,
            num_candidate_programs: 16,
            num_threads: 1,
            max_errors: None,
            stop_at_score: None,
            restrict: None,
            labeled_sample: true,
            display_progress: true,
        }
    }

    /// Sets `max_bootstrapped_demos`.
    pub fn max_bootstrapped_demos(mut self, n: usize) -> Self {
        self.max_bootstrapped_demos = n;
        self
    }

    /// Sets `max_labeled_demos`.
    pub fn max_labeled_demos(mut self, n: usize) -> Self {
        self.max_labeled_demos = n;
        self
    }

    /// Sets `max_rounds`.
    pub fn max_rounds(mut self, n: usize) -> Self {
        self.max_rounds = n;
        self
    }

    /// Sets `num_candidate_programs`.
    pub fn num_candidate_programs(mut self, n: usize) -> Self {
        self.num_candidate_programs = n;
        self
    }

    /// Sets `metric_threshold`.
    pub fn metric_threshold(mut self, t: f64) -> Self {
        self.metric_threshold = Some(t);
        self
    }

    /// Sets `stop_at_score`.
    pub fn stop_at_score(mut self, s: f64) -> Self {
        self.stop_at_score = Some(s);
        self
    }

    /// Sets the evaluation threads.
    pub fn num_threads(mut self, n: usize) -> Self {
        self.num_threads = n.max(1);
        self
    }

    /// Sets `max_errors`.
    pub fn max_errors(mut self, n: usize) -> Self {
        self.max_errors = Some(n);
        self
    }

    /// Evaluates only these seeds.
    pub fn restrict(mut self, seeds: &[i64]) -> Self {
        self.restrict = Some(seeds.to_vec());
        self
    }

    /// Turns progress lines on or off.
    pub fn display_progress(mut self, on: bool) -> Self {
        self.display_progress = on;
        self
    }

    /// Searches for `student`'s best demo set: candidates are built from `trainset` (with
    /// `teacher`, default a copy of the student) and scored on `valset` (default: the
    /// trainset) with `ctx`'s LM.
    pub fn compile<P: Module + Clone>(
        &self,
        student: &P,
        teacher: Option<&P>,
        trainset: &[Example],
        valset: Option<&[Example]>,
        ctx: &Context,
    ) -> Result<Compiled<P>> {
        let valset = valset.unwrap_or(trainset);
        let last = self.num_candidate_programs as i64;
        if let Some(r) = &self.restrict {
            if !r.iter().any(|s| (-3..last).contains(s)) {
                return Err(Error::InvalidArgument(format!(
                    "restrict {r:?} matches no candidate seed in -3..{last}: nothing would be evaluated"
                )));
            }
        }
        if self.max_bootstrapped_demos == 0 && self.num_candidate_programs > 0 {
            return Err(Error::InvalidArgument(
                "max_bootstrapped_demos must be at least 1: shuffled candidates draw between 1 and it"
                    .into(),
            ));
        }
        let evaluate = {
            let mut e = Evaluate::new(valset.to_vec())
                .num_threads(self.num_threads)
                .display_progress(self.display_progress);
            e.max_errors = self.max_errors;
            e
        };
        let bootstrap = |max_bootstrapped: usize| BootstrapFewShot {
            metric: Some(self.metric.clone()),
            metric_threshold: self.metric_threshold,
            max_bootstrapped_demos: max_bootstrapped,
            max_labeled_demos: self.max_labeled_demos,
            max_rounds: self.max_rounds,
            max_errors: self.max_errors.unwrap_or(10),
            teacher_settings: self.teacher_settings.clone(),
        };

        let mut candidates: Vec<Candidate<P>> = vec![];
        let mut best: Option<usize> = None;
        let mut rows = vec![];
        for seed in -3..last {
            if self.restrict.as_ref().is_some_and(|r| !r.contains(&seed)) {
                continue;
            }
            let (program, description) = match seed {
                -3 => {
                    let mut p = student.clone();
                    p.reset();
                    (p, "zero-shot".to_string())
                }
                -2 => {
                    let c = LabeledFewShot {
                        k: self.max_labeled_demos,
                        sample: self.labeled_sample,
                    }
                    .compile(student, trainset);
                    (c.program, "labeled only".to_string())
                }
                -1 => {
                    let c = bootstrap(self.max_bootstrapped_demos)
                        .compile(student, teacher, trainset, ctx)?;
                    (c.program, "bootstrap, trainset in order".to_string())
                }
                _ => {
                    let mut shuffled = trainset.to_vec();
                    PyRandom::new(seed as u64).shuffle(&mut shuffled);
                    let size = PyRandom::new(seed as u64)
                        .randint(1, self.max_bootstrapped_demos as i64)
                        .expect("max_bootstrapped_demos >= 1")
                        as usize;
                    let c = bootstrap(size).compile(student, teacher, &shuffled, ctx)?;
                    (c.program, format!("bootstrap ≤{size}, trainset shuffled"))
                }
            };
            let result = evaluate.run(&program, ctx, &*self.metric)?;
            let demos: Vec<usize> = program
                .named_predictors()
                .iter()
                .map(|(_, p)| p.demos.len())
                .collect();
            let bootstrapped: usize = program
                .named_predictors()
                .iter()
                .map(|(_, p)| {
                    p.demos
                        .iter()
                        .filter(|d| d.get("augmented") == Some(&serde_json::Value::Bool(true)))
                        .count()
                })
                .sum();
            let total: usize = demos.iter().sum();
            let description = format!(
                "seed {seed}: {description}; {bootstrapped} bootstrapped + {} labeled demos",
                total - bootstrapped
            );
            let is_best = best.is_none_or(|b| result.score > candidates[b].score);
            if is_best {
                best = Some(candidates.len());
            }
            if self.display_progress {
                println!(
                    "{description}: score {}{}",
                    result.score,
                    if is_best { " (new best)" } else { "" }
                );
            }
            rows.push(ReportRow {
                example: None,
                round: 0,
                predictor: "*".into(),
                outcome: description.clone(),
                score: Some(result.score),
                kept: total,
            });
            candidates.push(Candidate {
                seed,
                score: result.score,
                subscores: result.results.iter().map(|r| r.score).collect(),
                description,
                program,
            });
            if self.stop_at_score.is_some_and(|s| result.score >= s) {
                break;
            }
        }
        let best = best.expect("at least one candidate (restrict was checked)");
        let program = candidates[best].program.clone();
        let summary = format!(
            "{} candidates scored on {} validation examples; best: {} (score {})",
            candidates.len(),
            valset.len(),
            candidates[best].description,
            candidates[best].score
        );
        // Best first; equal scores keep their order (Python's sort is stable).
        candidates.sort_by(|a, b| b.score.total_cmp(&a.score));
        Ok(Compiled {
            program,
            report: OptimizerReport {
                optimizer: "BootstrapFewShotWithRandomSearch".into(),
                summary,
                rows,
            },
            candidates,
        })
    }
}
