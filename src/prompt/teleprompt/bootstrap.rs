//! DSPy's `BootstrapFewShot`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use serde_json::Value;

use super::super::example::Example;
use super::super::metric::Metric;
use super::super::predict::{Context, LmConfig, Module};
use super::super::py::PyRandom;
use super::labeled::LabeledFewShot;
use super::{matching_predictors, require_inputs, Compiled, OptimizerReport, ReportRow};
use crate::Result;

/// Bootstraps demos from a teacher's successful traces — DSPy's `BootstrapFewShot`, with its
/// defaults and algorithm:
///
/// 1. the teacher is a copy of the student (or the given teacher) with
///    `LabeledFewShot(k=max_labeled_demos)` demos, unless it is already compiled;
/// 2. training examples are tried in order until `max_bootstrapped_demos` succeed; each is
///    run by the teacher (without itself among the demos) for up to `max_rounds` rounds —
///    round 0 with the context's settings, later rounds at temperature 1.0 with
///    `rollout_id = round` — while tracing; when the metric accepts the prediction (score ≥
///    `metric_threshold`, or nonzero without a threshold) every traced predictor call becomes a
///    demo (`augmented: true`, its inputs and outputs) of the predictor with that name;
/// 3. each student predictor gets its first `max_bootstrapped_demos` traces, then labeled
///    examples sampled (`random.Random(0)`) from the examples that were not bootstrapped
///    (shuffled with `random.Random(0)`) up to `max_labeled_demos` in all.
///
/// ```
/// use qlora::prompt::{BootstrapFewShot, Context, Example, ExactMatch, Predict, ScriptedLm};
/// let trainset: Vec<Example> = (0..6)
///     .map(|i| Example::new().with("question", format!("{i}+{i}?")).with("answer", (2 * i).to_string()).with_inputs(&["question"]))
///     .collect();
/// // An LM that always answers 4: right only for 2+2.
/// let lm = ScriptedLm::new(|_| "[[ ## answer ## ]]\n4".to_string());
/// let compiled = BootstrapFewShot::new(ExactMatch::new("answer"))
///     .compile(&Predict::new("question -> answer")?, None, &trainset, &Context::new(lm))?;
/// let demos = &compiled.program.demos;
/// assert_eq!(demos[0].get_str("question").as_deref(), Some("2+2?")); // the bootstrapped one first
/// assert_eq!(demos.len(), 6); // then the 5 others as labeled demos
/// # Ok::<(), qlora::Error>(())
/// ```
#[derive(Clone)]
pub struct BootstrapFewShot {
    /// Decides whether a teacher's trace is kept (`None`: every trace that ran is kept).
    pub metric: Option<Arc<dyn Metric>>,
    /// With a threshold, a trace is kept when the metric reaches it.
    pub metric_threshold: Option<f64>,
    /// Bootstrapped demos per predictor (DSPy: 4).
    pub max_bootstrapped_demos: usize,
    /// Demos per predictor in all, labeled ones filling up (DSPy: 16).
    pub max_labeled_demos: usize,
    /// Attempts per training example (DSPy: 1).
    pub max_rounds: usize,
    /// Stop with the error after this many failed teacher runs (DSPy: 10).
    pub max_errors: usize,
    /// LM settings for the teacher's calls (DSPy's `teacher_settings`).
    pub teacher_settings: Option<LmConfig>,
}

impl std::fmt::Debug for BootstrapFewShot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootstrapFewShot")
            .field("metric", &self.metric.as_ref().map(|m| m.name()))
            .field("metric_threshold", &self.metric_threshold)
            .field("max_bootstrapped_demos", &self.max_bootstrapped_demos)
            .field("max_labeled_demos", &self.max_labeled_demos)
            .field("max_rounds", &self.max_rounds)
            .field("max_errors", &self.max_errors)
            .finish()
    }
}

impl Default for BootstrapFewShot {
    fn default() -> Self {
        Self {
            metric: None,
            metric_threshold: None,
            max_bootstrapped_demos: 4,
            max_labeled_demos: 16,
            max_rounds: 1,
            max_errors: 10,
            teacher_settings: None,
        }
    }
}

impl BootstrapFewShot {
    /// DSPy's defaults with `metric`.
    pub fn new(metric: impl Metric + 'static) -> Self {
        Self::from_arc(Arc::new(metric))
    }

    /// DSPy's defaults with a shared metric.
    pub fn from_arc(metric: Arc<dyn Metric>) -> Self {
        Self {
            metric: Some(metric),
            ..Self::default()
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

    /// Sets `metric_threshold`.
    pub fn metric_threshold(mut self, t: f64) -> Self {
        self.metric_threshold = Some(t);
        self
    }

    /// Sets `max_errors`.
    pub fn max_errors(mut self, n: usize) -> Self {
        self.max_errors = n;
        self
    }

    /// Compiles `student` (its demos are reset) with `teacher` (default: a copy of the
    /// student) on `trainset`, running the teacher with `ctx`'s LM.
    pub fn compile<P: Module + Clone>(
        &self,
        student: &P,
        teacher: Option<&P>,
        trainset: &[Example],
        ctx: &Context,
    ) -> Result<Compiled<P>> {
        require_inputs("trainset", trainset)?;
        let mut student = student.clone();
        student.reset();
        let mut teacher = teacher.cloned().unwrap_or_else(|| student.clone());
        if self.max_labeled_demos > 0 && !teacher.is_compiled() {
            teacher = LabeledFewShot::new(self.max_labeled_demos)
                .compile(&teacher, trainset)
                .program;
        }
        let student_names = matching_predictors("BootstrapFewShot", &student, &teacher)?;

        // Bootstrap.
        let mut rows = vec![];
        let mut traces: BTreeMap<String, Vec<Example>> =
            student_names.iter().map(|n| (n.clone(), vec![])).collect();
        let mut bootstrapped: HashSet<usize> = HashSet::new();
        let mut attempts = 0;
        let mut errors = 0;
        let mut last_index = 0;
        for (idx, example) in trainset.iter().enumerate() {
            last_index = idx;
            if bootstrapped.len() >= self.max_bootstrapped_demos {
                break;
            }
            for round in 0..self.max_rounds {
                attempts += 1;
                let (success, row) = self.bootstrap_one(
                    &teacher,
                    example,
                    idx,
                    round,
                    ctx,
                    &mut traces,
                    &mut errors,
                )?;
                rows.push(row);
                if success {
                    bootstrapped.insert(idx);
                    break;
                }
            }
        }
        let summary = format!(
            "bootstrapped {} full traces after {} examples for up to {} rounds, amounting to {} attempts",
            bootstrapped.len(),
            last_index,
            self.max_rounds,
            attempts
        );

        // Unbootstrapped examples, shuffled, fill the remaining slots.
        let mut validation: Vec<Example> = trainset
            .iter()
            .enumerate()
            .filter(|(i, _)| !bootstrapped.contains(i))
            .map(|(_, x)| x.clone())
            .collect();
        PyRandom::new(0).shuffle(&mut validation);
        let mut rng = PyRandom::new(0);
        for (name, p) in student.named_predictors_mut() {
            let augmented: Vec<Example> = traces[&name]
                .iter()
                .take(self.max_bootstrapped_demos)
                .cloned()
                .collect();
            let sample_size = self
                .max_labeled_demos
                .saturating_sub(augmented.len())
                .min(validation.len());
            let sampled = rng.sample(&validation, sample_size);
            rows.push(ReportRow {
                example: None,
                round: 0,
                predictor: name.clone(),
                outcome: format!(
                    "demos: {} bootstrapped + {} labeled",
                    augmented.len(),
                    sampled.len()
                ),
                score: None,
                kept: augmented.len() + sampled.len(),
            });
            p.demos = augmented.into_iter().chain(sampled).collect();
            p.compiled = true;
        }
        Ok(Compiled {
            program: student,
            report: OptimizerReport {
                optimizer: "BootstrapFewShot".into(),
                summary,
                rows,
            },
            candidates: vec![],
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn bootstrap_one<P: Module + Clone>(
        &self,
        teacher: &P,
        example: &Example,
        idx: usize,
        round: usize,
        ctx: &Context,
        traces: &mut BTreeMap<String, Vec<Example>>,
        errors: &mut usize,
    ) -> Result<(bool, ReportRow)> {
        // The teacher runs without the example among its demos.
        let mut t = teacher.clone();
        for (_, p) in t.named_predictors_mut() {
            p.demos.retain(|d| d != example);
        }
        let names: HashMap<u64, String> = t
            .named_predictors()
            .into_iter()
            .map(|(n, p)| (p.id(), n))
            .collect();
        let mut config = self
            .teacher_settings
            .clone()
            .unwrap_or_default()
            .over(&ctx.lm_config);
        if round > 0 {
            config.temperature = Some(1.0);
            config.rollout_id = Some(round as u64);
        }
        let run_ctx = ctx.with_lm_config(config).tracing();
        let mut row = ReportRow {
            example: Some(idx),
            round,
            predictor: "*".into(),
            outcome: String::new(),
            score: None,
            kept: 0,
        };
        let prediction = match t.forward(&run_ctx, &example.inputs()) {
            Ok(p) => p,
            Err(e) => {
                *errors += 1;
                if *errors >= self.max_errors {
                    return Err(e);
                }
                row.outcome = format!("error: {e}");
                return Ok((false, row));
            }
        };
        let trace = run_ctx.trace();
        let success = match &self.metric {
            None => true,
            Some(m) => {
                let score = m.score(example, &prediction, Some(&trace));
                row.score = Some(score);
                match self.metric_threshold {
                    Some(th) => score >= th,
                    None => score != 0.0,
                }
            }
        };
        if !success {
            row.outcome = "rejected by metric".into();
            return Ok((false, row));
        }
        let mut by_name: BTreeMap<String, Vec<Example>> = BTreeMap::new();
        for step in trace {
            let Some(name) = names.get(&step.predictor_id) else {
                continue;
            };
            let mut demo = Example::new().with("augmented", true);
            for (k, v) in step.inputs.iter() {
                demo.set(k, v.clone());
            }
            for (k, v) in step.prediction.fields.iter() {
                demo.set(k, v.clone());
            }
            by_name.entry(name.clone()).or_default().push(demo);
        }
        for (name, mut demos) in by_name {
            if demos.len() > 1 {
                // DSPy: 50/50 one of the first N-1 traces or the last, with a generator seeded
                // by a hash of the traces (ours is a different hash, so the pick may differ).
                let mut rng = PyRandom::new(stable_hash(&demos));
                let pick = if rng.random() < 0.5 {
                    rng.choice(&demos[..demos.len() - 1]).clone()
                } else {
                    demos.last().unwrap().clone()
                };
                demos = vec![pick];
            }
            row.kept += demos.len();
            traces.entry(name).or_default().extend(demos);
        }
        row.outcome = "bootstrapped".into();
        Ok((true, row))
    }
}

fn stable_hash(demos: &[Example]) -> u64 {
    let text = Value::Array(demos.iter().map(Example::to_json).collect()).to_string();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}
