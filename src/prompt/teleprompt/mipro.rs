//! DSPy's `MIPROv2`: instruction candidates proposed by an LM, demo-set candidates from
//! bootstrapping, and a Bayesian (TPE) search over their combinations with minibatch
//! evaluation.

use std::collections::HashMap;
use std::sync::Arc;

use regex::Regex;
use serde_json::Value;

use super::super::evaluate::Evaluate;
use super::super::example::Example;
use super::super::lm::Lm;
use super::super::metric::Metric;
use super::super::predict::{Context, LmConfig, Module, Predict};
use super::super::py::{py_repr, PyRandom};
use super::super::signature::Signature;
use super::bootstrap::BootstrapFewShot;
use super::labeled::LabeledFewShot;
use super::{require_inputs, Candidate, Compiled, OptimizerReport, ReportRow};
use crate::{Error, Result};

/// DSPy's `auto` presets: candidates `n` and the valset size they subsample to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoRun {
    /// 6 candidates, valset ≤ 100.
    Light,
    /// 12 candidates, valset ≤ 300.
    Medium,
    /// 18 candidates, valset ≤ 1000.
    Heavy,
}

impl AutoRun {
    /// Candidates (DSPy's `n`).
    pub fn n(self) -> usize {
        match self {
            AutoRun::Light => 6,
            AutoRun::Medium => 12,
            AutoRun::Heavy => 18,
        }
    }

    /// Valset size (DSPy's `val_size`).
    pub fn val_size(self) -> usize {
        match self {
            AutoRun::Light => 100,
            AutoRun::Medium => 300,
            AutoRun::Heavy => 1000,
        }
    }
}

/// DSPy's proposal tips, in DSPy's order (the proposer picks one at random per instruction).
pub const TIPS: [(&str, &str); 6] = [
    ("none", ""),
    (
        "creative",
        "Don't be afraid to be creative when creating the new instruction!",
    ),
    ("simple", "Keep the instruction clear and concise."),
    (
        "description",
        "Make sure your instruction is very informative and descriptive.",
    ),
    (
        "high_stakes",
        "The instruction should include a high stakes scenario in which the LM must solve the task!",
    ),
    (
        "persona",
        "Include a persona that is relevant to the task in the instruction (ie. \"You are a ...\")",
    ),
];

const BOOTSTRAPPED_FEWSHOT_EXAMPLES_IN_CONTEXT: usize = 3;
const MIN_MINIBATCH_SIZE: usize = 50;

/// MIPROv2 — DSPy's algorithm and defaults:
///
/// 0. **settings**: with `auto` (default light), the valset is subsampled to
///    `val_size` (100/300/1000) with the optimiser's `random.Random(seed)`, minibatching is on
///    when more than 50 examples remain, `n` = 6/12/18 demo-set candidates and `n/2`
///    instruction candidates (`n` when zero-shot), and
///    `num_trials = int(max(2·vars·log2(n), 1.5·n))` with `vars` = predictors × 2 (× 1 when
///    zero-shot); without a valset 80% of the trainset becomes one;
/// 1. **demo sets** per predictor, as `create_n_fewshot_demo_sets`: zero-shot, labeled only,
///    the bootstrapped trainset in order, then shuffled trainsets with random bootstrap counts —
///    all drawn from the one `random.Random(seed)`, exactly as DSPy;
/// 2. **instructions** per predictor, proposed by `prompt_lm` (default: the context's LM) from
///    a dataset summary (the LM's observations over batches of `view_data_batch_size`
///    examples), a description of the program and of the predictor, up to 3 bootstrapped demos
///    and a random tip, at temperature `init_temperature` with a random `rollout_id`; the
///    first candidate is always the predictor's current instruction;
/// 3. **search**: the default program is evaluated on the full valset, then `num_trials`
///    trials each pick an (instruction, demo set) per predictor and score the program on a
///    random minibatch of `minibatch_size` (35) — after every `minibatch_full_eval_steps` (5)
///    trials and at the end, the combination with the best mean minibatch score not yet fully
///    evaluated is scored on the whole valset. The best full score wins.
///
/// Differences from DSPy: the search uses our own TPE sampler (below), not Optuna's, so which
/// combinations are tried differs from DSPy's run (the demo sets, instruction prompts'
/// random draws and the schedule of evaluations are DSPy's); the program description comes
/// from the predictors' signatures, not Python source code; a proposal the prompt LM fails
/// to produce falls back to the current instruction (reported), and when every combination
/// has been fully evaluated a scheduled full evaluation is skipped (DSPy raises).
///
/// The sampler: the first 10 observations (Optuna's `n_startup_trials`) sample uniformly
/// (with `random.Random(seed)`); afterwards the observed trials are split into the best
/// `min(ceil(0.1·n), 25)` and the rest, each side becomes a mixture of categorical kernels
/// (one per observation, plus a uniform prior of weight 1, as Optuna's multivariate
/// Parzen estimator), and of 24 draws from the good side the one with the highest
/// `log l(x) − log g(x)` is tried.
#[derive(Clone)]
pub struct MiproV2 {
    /// Scores programs (and filters bootstrapped traces).
    pub metric: Arc<dyn Metric>,
    /// The LM that proposes instructions (DSPy's `prompt_model`; default: the context's LM).
    pub prompt_lm: Option<Arc<dyn Lm>>,
    /// LM settings for the teacher's calls while bootstrapping.
    pub teacher_settings: Option<LmConfig>,
    /// Bootstrapped demos per demo set (DSPy: 4).
    pub max_bootstrapped_demos: usize,
    /// Demos per demo set in all (DSPy: 4).
    pub max_labeled_demos: usize,
    /// Preset (DSPy default: light); `None` needs `num_candidates` and `num_trials`.
    pub auto: Option<AutoRun>,
    /// Demo-set and instruction candidates when `auto` is `None`.
    pub num_candidates: Option<usize>,
    /// Trials when `auto` is `None`.
    pub num_trials: Option<usize>,
    /// Evaluation threads.
    pub num_threads: usize,
    /// Errors tolerated while bootstrapping (default 10) and evaluating (default: never stop).
    pub max_errors: Option<usize>,
    /// Seed of every random draw (DSPy: 9).
    pub seed: u64,
    /// Temperature of instruction proposals (DSPy: 1.0).
    pub init_temperature: f64,
    /// With a threshold, a trace is kept when the metric reaches it.
    pub metric_threshold: Option<f64>,
    /// Evaluate trials on minibatches (DSPy: true; `auto` decides by valset size).
    pub minibatch: bool,
    /// Minibatch size (DSPy: 35).
    pub minibatch_size: usize,
    /// Full evaluation every this many minibatch trials (DSPy: 5).
    pub minibatch_full_eval_steps: usize,
    /// Describe the program to the proposer (DSPy: true).
    pub program_aware_proposer: bool,
    /// Summarise the trainset for the proposer (DSPy: true).
    pub data_aware_proposer: bool,
    /// Examples per summarising call (DSPy: 10).
    pub view_data_batch_size: usize,
    /// Give the proposer a random tip (DSPy: true).
    pub tip_aware_proposer: bool,
    /// Show the proposer bootstrapped demos (DSPy: true).
    pub fewshot_aware_proposer: bool,
    /// Print a line per trial.
    pub display_progress: bool,
}

impl std::fmt::Debug for MiproV2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MiproV2")
            .field("metric", &self.metric.name())
            .field("auto", &self.auto)
            .field("num_candidates", &self.num_candidates)
            .field("num_trials", &self.num_trials)
            .field("max_bootstrapped_demos", &self.max_bootstrapped_demos)
            .field("max_labeled_demos", &self.max_labeled_demos)
            .field("seed", &self.seed)
            .field("minibatch_size", &self.minibatch_size)
            .finish()
    }
}

/// What steps 0–2 of [`MiproV2`] produced: the search space and the data it is scored on.
#[derive(Debug, Clone)]
pub struct MiproPlan<P> {
    /// The program being optimised (a copy of the student).
    pub program: P,
    /// The examples demos are bootstrapped from.
    pub trainset: Vec<Example>,
    /// The examples programs are scored on (after `auto`'s subsampling).
    pub valset: Vec<Example>,
    /// Trials of the search.
    pub num_trials: usize,
    /// Whether trials are scored on minibatches.
    pub minibatch: bool,
    /// Per predictor: instruction candidates (the first is the current instruction).
    pub instruction_candidates: Vec<Vec<String>>,
    /// Per predictor: demo-set candidates (`None` when optimising zero-shot).
    pub demo_candidates: Option<Vec<Vec<Vec<Example>>>>,
    /// What the proposal steps did.
    pub rows: Vec<ReportRow>,
    rng: PyRandom,
}

impl MiproV2 {
    /// DSPy's defaults (auto = light) with `metric`.
    pub fn new(metric: impl Metric + 'static) -> Self {
        Self::from_arc(Arc::new(metric))
    }

    /// DSPy's defaults with a shared metric.
    pub fn from_arc(metric: Arc<dyn Metric>) -> Self {
        Self {
            metric,
            prompt_lm: None,
            teacher_settings: None,
            max_bootstrapped_demos: 4,
            max_labeled_demos: 4,
            auto: Some(AutoRun::Light),
            num_candidates: None,
            num_trials: None,
            num_threads: 1,
            max_errors: None,
            seed: 9,
            init_temperature: 1.0,
            metric_threshold: None,
            minibatch: true,
            minibatch_size: 35,
            minibatch_full_eval_steps: 5,
            program_aware_proposer: true,
            data_aware_proposer: true,
            view_data_batch_size: 10,
            tip_aware_proposer: true,
            fewshot_aware_proposer: true,
            display_progress: true,
        }
    }

    /// Sets the preset.
    pub fn auto(mut self, auto: Option<AutoRun>) -> Self {
        self.auto = auto;
        self
    }

    /// Without a preset: `n` candidates and `trials` trials.
    pub fn manual(mut self, num_candidates: usize, num_trials: usize) -> Self {
        self.auto = None;
        self.num_candidates = Some(num_candidates);
        self.num_trials = Some(num_trials);
        self
    }

    /// Sets the LM that proposes instructions.
    pub fn prompt_lm(mut self, lm: impl Lm + 'static) -> Self {
        self.prompt_lm = Some(Arc::new(lm));
        self
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

    /// Sets the seed.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Sets the minibatch size.
    pub fn minibatch_size(mut self, n: usize) -> Self {
        self.minibatch_size = n;
        self
    }

    /// Turns minibatch evaluation on or off (`auto` decides by itself).
    pub fn minibatch(mut self, on: bool) -> Self {
        self.minibatch = on;
        self
    }

    /// Sets the evaluation threads.
    pub fn num_threads(mut self, n: usize) -> Self {
        self.num_threads = n.max(1);
        self
    }

    /// Turns progress lines on or off.
    pub fn display_progress(mut self, on: bool) -> Self {
        self.display_progress = on;
        self
    }

    fn zeroshot(&self) -> bool {
        self.max_bootstrapped_demos == 0 && self.max_labeled_demos == 0
    }

    /// DSPy's `num_trials` for `n` candidates.
    pub fn trials_for(num_predictors: usize, zeroshot: bool, n: usize) -> usize {
        let vars = num_predictors * if zeroshot { 1 } else { 2 };
        let a = 2.0 * vars as f64 * (n as f64).log2();
        let b = 1.5 * n as f64;
        a.max(b) as usize
    }

    /// Optimises `student`'s instructions and demos: [`MiproV2::prepare`], then
    /// [`MiproV2::search`].
    pub fn compile<P: Module + Clone>(
        &self,
        student: &P,
        teacher: Option<&P>,
        trainset: &[Example],
        valset: Option<&[Example]>,
        ctx: &Context,
    ) -> Result<Compiled<P>> {
        let plan = self.prepare(student, teacher, trainset, valset, ctx)?;
        self.search(plan, ctx)
    }

    /// Steps 0–2: settings, demo-set candidates, instruction candidates.
    pub fn prepare<P: Module + Clone>(
        &self,
        student: &P,
        teacher: Option<&P>,
        trainset: &[Example],
        valset: Option<&[Example]>,
        ctx: &Context,
    ) -> Result<MiproPlan<P>> {
        let bad = |m: String| Err(Error::InvalidArgument(format!("MIPROv2: {m}")));
        match (self.auto, self.num_candidates, self.num_trials) {
            (None, Some(_), None) | (None, None, _) => {
                return bad("without `auto`, set both num_candidates and num_trials".into())
            }
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                return bad(
                    "with `auto`, num_candidates and num_trials come from the preset; set auto to None to choose them"
                        .into(),
                )
            }
            _ => {}
        }
        let zeroshot = self.zeroshot();
        let mut rng = PyRandom::new(self.seed);
        // Datasets.
        if trainset.is_empty() {
            return bad("the trainset is empty".into());
        }
        let (trainset, mut valset): (Vec<Example>, Vec<Example>) = match valset {
            Some([]) => return bad("the valset is empty".into()),
            Some(v) => (trainset.to_vec(), v.to_vec()),
            None => {
                if trainset.len() < 2 {
                    return bad("without a valset the trainset needs at least 2 examples".into());
                }
                let size = 1000.min(((trainset.len() as f64 * 0.8) as usize).max(1));
                let cut = trainset.len() - size;
                (trainset[..cut].to_vec(), trainset[cut..].to_vec())
            }
        };
        require_inputs("trainset", &trainset)?;
        require_inputs("valset", &valset)?;
        let num_predictors = student.named_predictors().len();
        let (num_trials, minibatch, num_instruct, num_fewshot) = match self.auto {
            Some(auto) => {
                valset = create_minibatch(&valset, auto.val_size(), &mut rng);
                let n = auto.n();
                (
                    Self::trials_for(num_predictors, zeroshot, n),
                    valset.len() > MIN_MINIBATCH_SIZE,
                    if zeroshot { n } else { n / 2 },
                    n,
                )
            }
            None => {
                let n = self.num_candidates.unwrap();
                (self.num_trials.unwrap(), self.minibatch, n, n)
            }
        };
        if minibatch && self.minibatch_size > valset.len() {
            return bad(format!(
                "minibatch_size {} exceeds the valset ({} examples)",
                self.minibatch_size,
                valset.len()
            ));
        }
        let mut rows = vec![ReportRow {
            example: None,
            round: 0,
            predictor: "*".into(),
            outcome: format!(
                "settings: {num_trials} trials, minibatch {}, {num_fewshot} demo sets, {num_instruct} instructions, valset {}",
                if minibatch {
                    self.minibatch_size.to_string()
                } else {
                    "off".into()
                },
                valset.len()
            ),
            score: None,
            kept: 0,
        }];
        let program = student.clone();

        // Step 1: demo sets.
        let demo_sets = self.demo_sets(
            &program,
            teacher,
            &trainset,
            num_fewshot,
            zeroshot,
            &mut rng,
            ctx,
        )?;
        for (i, (name, _)) in program.named_predictors().iter().enumerate() {
            for (j, set) in demo_sets[i].iter().enumerate() {
                rows.push(ReportRow {
                    example: None,
                    round: 0,
                    predictor: name.clone(),
                    outcome: format!("demo set {j}"),
                    score: None,
                    kept: set.len(),
                });
            }
        }

        // Step 2: instructions.
        let prompt_ctx = match &self.prompt_lm {
            Some(lm) => Context::from_arc(lm.clone()),
            None => ctx.untraced().with_lm_config(LmConfig::default()),
        };
        let instruction_candidates = self.propose_instructions(
            &program,
            &trainset,
            &demo_sets,
            num_instruct,
            &mut rng,
            &prompt_ctx,
            &mut rows,
        );
        Ok(MiproPlan {
            program,
            trainset,
            valset,
            num_trials,
            minibatch,
            instruction_candidates,
            demo_candidates: if zeroshot { None } else { Some(demo_sets) },
            rows,
            rng,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn demo_sets<P: Module + Clone>(
        &self,
        student: &P,
        teacher: Option<&P>,
        trainset: &[Example],
        num_sets: usize,
        zeroshot: bool,
        rng: &mut PyRandom,
        ctx: &Context,
    ) -> Result<Vec<Vec<Vec<Example>>>> {
        let (max_labeled, max_boot) = if zeroshot {
            (0, BOOTSTRAPPED_FEWSHOT_EXAMPLES_IN_CONTEXT)
        } else {
            (self.max_labeled_demos, self.max_bootstrapped_demos)
        };
        let bootstrap = |n: usize| BootstrapFewShot {
            metric: Some(self.metric.clone()),
            metric_threshold: self.metric_threshold,
            max_bootstrapped_demos: n,
            max_labeled_demos: max_labeled,
            max_rounds: 1,
            max_errors: self.max_errors.unwrap_or(10),
            teacher_settings: self.teacher_settings.clone(),
        };
        let n_pred = student.named_predictors().len();
        let mut sets: Vec<Vec<Vec<Example>>> = vec![vec![]; n_pred];
        for seed in -3..(num_sets as i64 - 3) {
            let program = if seed == -3 {
                let mut p = student.clone();
                p.reset();
                p
            } else if seed == -2 && max_labeled > 0 {
                LabeledFewShot::new(max_labeled)
                    .compile(student, trainset)
                    .program
            } else if seed == -1 {
                bootstrap(max_boot)
                    .compile(student, teacher, trainset, ctx)?
                    .program
            } else {
                let mut shuffled = trainset.to_vec();
                rng.shuffle(&mut shuffled);
                let size = rng.randint(1, max_boot as i64).ok_or_else(|| {
                    Error::InvalidArgument(
                        "MIPROv2: max_bootstrapped_demos must be at least 1 for shuffled demo sets"
                            .into(),
                    )
                })? as usize;
                bootstrap(size)
                    .compile(student, teacher, &shuffled, ctx)?
                    .program
            };
            for (i, (_, p)) in program.named_predictors().iter().enumerate() {
                sets[i].push(p.demos.clone());
            }
        }
        Ok(sets)
    }

    #[allow(clippy::too_many_arguments)]
    fn propose_instructions<P: Module + Clone>(
        &self,
        program: &P,
        trainset: &[Example],
        demo_sets: &[Vec<Vec<Example>>],
        n: usize,
        rng: &mut PyRandom,
        ctx: &Context,
        rows: &mut Vec<ReportRow>,
    ) -> Vec<Vec<String>> {
        let summary = if self.data_aware_proposer {
            match dataset_summary(trainset, self.view_data_batch_size, ctx) {
                Ok(s) => Some(s),
                Err(e) => {
                    rows.push(note(format!(
                        "dataset summary failed, proposing without it: {e}"
                    )));
                    None
                }
            }
        } else {
            None
        };
        if let Some(s) = &summary {
            rows.push(note(format!("dataset summary: {s}")));
        }
        let program_code = program_code(program);
        let num_demo_sets = demo_sets.first().map(|s| s.len().max(1)).unwrap_or(n);
        let predictors = program.named_predictors();
        let mut out = vec![];
        for (pred_i, (name, predictor)) in predictors.iter().enumerate() {
            let mut candidates = vec![];
            for demo_set_i in 0..n.min(num_demo_sets) {
                let tip = if self.tip_aware_proposer {
                    Some(*rng.choice(&TIPS))
                } else {
                    None
                };
                let rollout_id = rng.randint(0, 1_000_000_000).unwrap() as u64;
                let config = LmConfig {
                    temperature: Some(self.init_temperature),
                    rollout_id: Some(rollout_id),
                    ..LmConfig::default()
                };
                let pctx = ctx.with_lm_config(config);
                let proposal = self.propose_one(
                    &pctx,
                    predictor,
                    demo_sets.get(pred_i).map(|s| s.as_slice()).unwrap_or(&[]),
                    demo_set_i,
                    summary.as_deref(),
                    &program_code,
                    tip.map(|t| t.1).filter(|t| !t.is_empty()),
                );
                let basic = predictor.signature.instructions().to_string();
                let (text, outcome) = match proposal {
                    _ if demo_set_i == 0 => (
                        basic,
                        "is the current one (its proposal is discarded, as in DSPy)",
                    ),
                    Ok(t) => (t, "proposed"),
                    Err(_) => (basic, "proposal failed, current instruction kept"),
                };
                rows.push(ReportRow {
                    example: None,
                    round: demo_set_i,
                    predictor: name.clone(),
                    outcome: format!(
                        "instruction {demo_set_i} {outcome} (tip: {}): {text}",
                        tip.map(|t| t.0).unwrap_or("off")
                    ),
                    score: None,
                    kept: 0,
                });
                candidates.push(text);
            }
            if candidates.is_empty() {
                candidates.push(String::new());
            }
            candidates[0] = predictor.signature.instructions().to_string();
            out.push(candidates);
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn propose_one(
        &self,
        ctx: &Context,
        predictor: &Predict,
        demo_sets: &[Vec<Example>],
        demo_set_i: usize,
        summary: Option<&str>,
        program_code: &str,
        tip: Option<&str>,
    ) -> Result<String> {
        let sig = &predictor.signature;
        let mut task_demos = String::new();
        if self.fewshot_aware_proposer && !demo_sets.is_empty() {
            let order = std::iter::once(demo_set_i)
                .chain(demo_set_i + 1..demo_sets.len())
                .chain(0..demo_set_i);
            let mut strings = vec![];
            'outer: for j in order {
                for ex in &demo_sets[j] {
                    if ex.contains("augmented") {
                        strings.push(example_string(sig, ex));
                        if strings.len() >= BOOTSTRAPPED_FEWSHOT_EXAMPLES_IN_CONTEXT {
                            break 'outer;
                        }
                    }
                }
            }
            task_demos = strings.join("\n\n") + "\n\n";
        }
        if task_demos.trim().is_empty() || demo_set_i == 0 {
            task_demos = "No task demos provided.".into();
        }
        let mut program_description = "Not available".to_string();
        let mut module_code = "Not provided".to_string();
        let mut module_description = "Not provided".to_string();
        let mut program_aware = self.program_aware_proposer;
        if program_aware {
            let described = (|| -> Result<(String, String, String)> {
                let pd = run_one(
                    ctx,
                    describe_program_signature()?,
                    &[
                        ("program_code", program_code),
                        ("program_example", &task_demos),
                    ],
                    "program_description",
                )?;
                let pd = strip_prefix(&pd);
                let inputs: Vec<&str> = sig.inputs().iter().map(|f| f.name.as_str()).collect();
                let outputs: Vec<&str> = sig.outputs().iter().map(|f| f.name.as_str()).collect();
                let mc = format!("Predict({}) -> {}", inputs.join(", "), outputs.join(", "));
                let md = run_one(
                    ctx,
                    describe_module_signature()?,
                    &[
                        ("program_code", program_code),
                        ("program_example", &task_demos),
                        ("program_description", &pd),
                        ("module", &mc),
                    ],
                    "module_description",
                )?;
                Ok((pd, mc, md))
            })();
            match described {
                Ok((pd, mc, md)) => {
                    program_description = pd;
                    module_code = mc;
                    module_description = md;
                }
                Err(_) => program_aware = false,
            }
        }
        let gen = generate_instruction_signature(summary.is_some(), program_aware, tip.is_some())?;
        let mut inputs: Vec<(&str, &str)> = vec![];
        if let Some(s) = summary {
            inputs.push(("dataset_description", s));
        }
        if program_aware {
            inputs.push(("program_code", program_code));
            inputs.push(("program_description", &program_description));
            inputs.push(("module", &module_code));
            inputs.push(("module_description", &module_description));
        }
        inputs.push(("task_demos", &task_demos));
        inputs.push(("basic_instruction", sig.instructions()));
        if let Some(t) = tip {
            inputs.push(("tip", t));
        }
        let text = run_one(ctx, gen, &inputs, "proposed_instruction")?;
        Ok(strip_prefix(&text))
    }

    /// Step 3: the search over `plan`'s combinations, scored with `ctx`'s LM.
    pub fn search<P: Module + Clone>(
        &self,
        plan: MiproPlan<P>,
        ctx: &Context,
    ) -> Result<Compiled<P>> {
        let MiproPlan {
            program,
            valset,
            num_trials,
            minibatch,
            instruction_candidates,
            demo_candidates,
            mut rows,
            mut rng,
            ..
        } = plan;
        let steps = self.minibatch_full_eval_steps.max(1);
        let adjusted = if minibatch {
            num_trials + num_trials / steps + 1 + usize::from(num_trials % steps != 0)
        } else {
            num_trials
        };
        let evaluate = {
            let mut e = Evaluate::new(valset.clone())
                .num_threads(self.num_threads)
                .display_progress(false);
            e.max_errors = self.max_errors;
            e
        };
        let eval_on = |p: &P, batch: usize, rng: &mut PyRandom| -> (f64, Vec<f64>) {
            let devset = if batch >= valset.len() {
                valset.clone()
            } else {
                create_minibatch(&valset, batch, rng)
            };
            let e = Evaluate {
                devset,
                ..evaluate.clone()
            };
            match e.run(p, ctx, &*self.metric) {
                Ok(r) => (r.score, r.results.iter().map(|x| x.score).collect()),
                // DSPy scores a failed evaluation 0.
                Err(_) => (0.0, vec![]),
            }
        };
        let describe = |params: &[usize]| -> String {
            let per = if demo_candidates.is_some() { 2 } else { 1 };
            program
                .named_predictors()
                .iter()
                .enumerate()
                .map(|(i, (name, _))| {
                    if per == 2 {
                        format!(
                            "{name}: instruction {}, demo set {}",
                            params[2 * i],
                            params[2 * i + 1]
                        )
                    } else {
                        format!("{name}: instruction {}", params[i])
                    }
                })
                .collect::<Vec<_>>()
                .join("; ")
        };
        let build = |params: &[usize]| -> P {
            let mut p = program.clone();
            let per = if demo_candidates.is_some() { 2 } else { 1 };
            for (i, (_, pred)) in p.named_predictors_mut().into_iter().enumerate() {
                let instr = &instruction_candidates[i][params[per * i]];
                pred.signature = pred.signature.clone().with_instructions(instr);
                if let Some(d) = &demo_candidates {
                    pred.demos = d[i][params[per * i + 1]].clone();
                }
            }
            p
        };
        let mut dims = vec![];
        for i in 0..instruction_candidates.len() {
            dims.push(instruction_candidates[i].len());
            if let Some(d) = &demo_candidates {
                dims.push(d[i].len());
            }
        }

        // The default program on the full valset.
        let (default_score, default_sub) = eval_on(&program, valset.len(), &mut rng);
        let default_params = vec![0; dims.len()];
        let mut best_score = default_score;
        let mut best_program = program.clone();
        let mut full: Vec<Candidate<P>> = vec![Candidate {
            seed: 1,
            score: default_score,
            subscores: default_sub,
            description: format!("default program ({})", describe(&default_params)),
            program: program.clone(),
        }];
        rows.push(ReportRow {
            example: None,
            round: 1,
            predictor: "*".into(),
            outcome: format!(
                "trial 1 / {adjusted}: full eval on {} of the default program",
                valset.len()
            ),
            score: Some(default_score),
            kept: demo_count(&program),
        });
        if self.display_progress {
            println!("MIPROv2 trial 1 / {adjusted}: default program, full score {default_score}");
        }
        let mut sampler = Tpe::new(dims, self.seed);
        sampler.observe(default_params, default_score);
        let mut study_len = 1usize;
        // Per combination tried: its minibatch scores and programs, in first-tried order.
        type Tried<P> = (Vec<usize>, Vec<(f64, P)>);
        let mut by_params: Vec<Tried<P>> = vec![];
        let mut fully: HashMap<Vec<usize>, f64> = HashMap::new();
        let mut minibatch_count = 0;
        for _ in 0..num_trials {
            let number = study_len;
            study_len += 1;
            let trial_num = number + 1;
            let params = sampler.suggest();
            let candidate = build(&params);
            let batch = if minibatch {
                self.minibatch_size
            } else {
                valset.len()
            };
            let (score, sub) = eval_on(&candidate, batch, &mut rng);
            let is_full = batch >= valset.len();
            let mut new_best = false;
            if !minibatch && score > best_score {
                best_score = score;
                best_program = candidate.clone();
                new_best = true;
            }
            rows.push(ReportRow {
                example: None,
                round: trial_num,
                predictor: "*".into(),
                outcome: format!(
                    "trial {trial_num} / {adjusted}: {} ({}){}",
                    if is_full {
                        format!("full eval on {}", valset.len())
                    } else {
                        format!("minibatch of {batch}")
                    },
                    describe(&params),
                    if new_best { ", new best" } else { "" }
                ),
                score: Some(score),
                kept: demo_count(&candidate),
            });
            if self.display_progress {
                println!(
                    "MIPROv2 trial {trial_num} / {adjusted}: {} score {score} ({})",
                    if is_full { "full" } else { "minibatch" },
                    describe(&params)
                );
            }
            if is_full {
                full.push(Candidate {
                    seed: trial_num as i64,
                    score,
                    subscores: sub,
                    description: describe(&params),
                    program: candidate.clone(),
                });
            } else {
                minibatch_count += 1;
            }
            match by_params.iter_mut().find(|(k, _)| *k == params) {
                Some((_, v)) => v.push((score, candidate)),
                None => by_params.push((params.clone(), vec![(score, candidate)])),
            }
            // The full evaluation is added to the study before this trial completes.
            let mut pending_full = None;
            if minibatch && (trial_num % (steps + 1) == 0 || trial_num == adjusted - 1) {
                // The best mean minibatch score not yet fully evaluated (first of equals).
                let mut ranked: Vec<(f64, usize)> = by_params
                    .iter()
                    .enumerate()
                    .map(|(j, (_, v))| (v.iter().map(|x| x.0).sum::<f64>() / v.len() as f64, j))
                    .collect();
                ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
                let pick = ranked
                    .into_iter()
                    .find(|(_, j)| !fully.contains_key(&by_params[*j].0));
                match pick {
                    Some((mean, j)) => {
                        let (key, v) = &by_params[j];
                        let p = v[0].1.clone();
                        let (fs, fsub) = eval_on(&p, valset.len(), &mut rng);
                        study_len += 1;
                        fully.insert(key.clone(), fs);
                        let improved = fs > best_score;
                        if improved {
                            best_score = fs;
                            best_program = p.clone();
                        }
                        rows.push(ReportRow {
                            example: None,
                            round: trial_num + 1,
                            predictor: "*".into(),
                            outcome: format!(
                                "trial {} / {adjusted}: full eval on {} of the best minibatch mean {mean:.2} ({}){}",
                                trial_num + 1,
                                valset.len(),
                                describe(key),
                                if improved { ", new best" } else { "" }
                            ),
                            score: Some(fs),
                            kept: demo_count(&p),
                        });
                        if self.display_progress {
                            println!(
                                "MIPROv2 trial {} / {adjusted}: full score {fs} ({})",
                                trial_num + 1,
                                describe(key)
                            );
                        }
                        full.push(Candidate {
                            seed: (trial_num + 1) as i64,
                            score: fs,
                            subscores: fsub,
                            description: describe(key),
                            program: p,
                        });
                        pending_full = Some((key.clone(), fs));
                    }
                    None => rows.push(note(format!(
                        "trial {}: every combination tried is already fully evaluated; full eval skipped",
                        trial_num + 1
                    ))),
                }
            }
            if let Some((key, fs)) = pending_full {
                sampler.observe(key, fs);
            }
            sampler.observe(params, score);
        }
        let summary = format!(
            "{num_trials} trials ({minibatch_count} on minibatches of {}), {} full evaluations on {} examples; best score {best_score} (default program {default_score})",
            self.minibatch_size,
            full.len(),
            valset.len()
        );
        full.sort_by(|a, b| b.score.total_cmp(&a.score));
        Ok(Compiled {
            program: best_program,
            report: OptimizerReport {
                optimizer: "MIPROv2".into(),
                summary,
                rows,
            },
            candidates: full,
        })
    }
}

fn demo_count<P: Module>(p: &P) -> usize {
    p.named_predictors()
        .iter()
        .map(|(_, x)| x.demos.len())
        .sum()
}

fn note(outcome: String) -> ReportRow {
    ReportRow {
        example: None,
        round: 0,
        predictor: "*".into(),
        outcome,
        score: None,
        kept: 0,
    }
}

/// DSPy's `create_minibatch`: `rng.sample(range(len), min(size, len))`.
fn create_minibatch(set: &[Example], size: usize, rng: &mut PyRandom) -> Vec<Example> {
    let idx: Vec<usize> = (0..set.len()).collect();
    rng.sample(&idx, size.min(set.len()))
        .into_iter()
        .map(|i| set[i].clone())
        .collect()
}

/// DSPy's `strip_prefix`: drops a leading `Some Label:` (up to five words) and quotes.
pub fn strip_prefix(text: &str) -> String {
    static RE: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
    let re = RE.get_or_init(|| {
        Regex::new(r"^[\*\s]*(([\w'\-]+\s+){0,4}[\w'\-]+):\s*").expect("valid regex")
    });
    let stripped = re.replace(text, "");
    stripped.trim_matches('"').to_string()
}

/// `Question: ...\nAnswer: ...` lines of a demo (DSPy's `create_example_string`).
fn example_string(sig: &Signature, ex: &Example) -> String {
    sig.fields()
        .map(|f| {
            let v = ex
                .get(&f.name)
                .map(super::super::py::py_str)
                .unwrap_or_else(|| "None".into());
            format!("{} {v}", f.prefix)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Pseudo-code of the program for the proposer (DSPy shows Python source).
fn program_code<P: Module>(program: &P) -> String {
    let preds = program.named_predictors();
    let mut s = format!(
        "A program with {} language-model call(s), run in this order:\n",
        preds.len()
    );
    for (name, p) in preds {
        let inputs: Vec<&str> = p
            .signature
            .inputs()
            .iter()
            .map(|f| f.name.as_str())
            .collect();
        let outputs: Vec<&str> = p
            .signature
            .outputs()
            .iter()
            .map(|f| f.name.as_str())
            .collect();
        s.push_str(&format!(
            "{name} = Predict(\"{} -> {}\")  # {}\n",
            inputs.join(", "),
            outputs.join(", "),
            p.signature.instructions().replace('\n', " ")
        ));
    }
    s
}

/// Python's repr of a list of examples, with sorted input keys (what DSPy's summariser sees).
fn examples_repr(examples: &[Example]) -> String {
    let items: Vec<String> = examples
        .iter()
        .map(|ex| {
            let fields: Vec<String> = ex
                .iter()
                .map(|(k, v)| format!("{}: {}", py_repr(&Value::String(k.into())), py_repr(v)))
                .collect();
            let mut keys: Vec<String> = ex.input_keys().map(|k| k.to_vec()).unwrap_or_default();
            keys.sort();
            let keys: Vec<String> = keys
                .iter()
                .map(|k| py_repr(&Value::String(k.clone())))
                .collect();
            format!(
                "Example({{{}}}) (input_keys={{{}}})",
                fields.join(", "),
                keys.join(", ")
            )
        })
        .collect();
    format!("[{}]", items.join(", "))
}

fn run_one(ctx: &Context, sig: Signature, inputs: &[(&str, &str)], output: &str) -> Result<String> {
    let mut ex = Example::new();
    for (k, v) in inputs {
        ex.set(k, *v);
    }
    let pred = Predict::new(sig)?.forward(ctx, &ex)?;
    Ok(pred.get_str(output).unwrap_or_default())
}

/// DSPy's `create_dataset_summary`: observations over batches, then a short summary.
fn dataset_summary(trainset: &[Example], batch: usize, ctx: &Context) -> Result<String> {
    let batch = batch.max(1);
    let ctx = ctx.with_lm_config(LmConfig {
        temperature: Some(1.0),
        n: Some(1),
        ..LmConfig::default()
    });
    let upper = trainset.len().min(batch);
    let mut observations = run_one(
        &ctx,
        Signature::builder()
            .instructions("Given several examples from a dataset please write observations about trends that hold for most or all of the samples. Some areas you may consider in your observations: topics, content, syntax, conciseness, etc. It will be useful to make an educated guess as to the nature of the task this dataset will enable. Don't be afraid to be creative")
            .input_desc("examples", "Sample data points from the dataset")
            .output_desc("observations", "Somethings that holds true for most or all of the data you observed")
            .build()?,
        &[("examples", &examples_repr(&trainset[..upper]))],
        "observations",
    )?;
    let with_prior = Signature::builder()
        .instructions("Given several examples from a dataset please write observations about trends that hold for most or all of the samples. I will also provide you with a few observations I have already made.  Please add your own observations or if you feel the observations are comprehensive say 'COMPLETE' Some areas you may consider in your observations: topics, content, syntax, conciceness, etc. It will be useful to make an educated guess as to the nature of the task this dataset will enable. Don't be afraid to be creative")
        .input_desc("examples", "Sample data points from the dataset")
        .input_desc("prior_observations", "Some prior observations I made about the data")
        .output_desc("observations", "Somethings that holds true for most or all of the data you observed or COMPLETE if you have nothing to add")
        .build()?;
    let mut skips = 0;
    let mut calls = 0;
    let mut b = batch;
    while b < trainset.len() {
        calls += 1;
        if calls >= 10 {
            break;
        }
        let upper = trainset.len().min(b + batch);
        // DSPy keeps the observations so far when a call fails.
        let Ok(more) = run_one(
            &ctx,
            with_prior.clone(),
            &[
                ("examples", &examples_repr(&trainset[b..upper])),
                ("prior_observations", &observations),
            ],
            "observations",
        ) else {
            break;
        };
        b += batch;
        if more.len() >= 8 && more[..8].eq_ignore_ascii_case("COMPLETE") {
            skips += 1;
            if skips >= 5 {
                break;
            }
            continue;
        }
        observations.push_str(&more);
    }
    let summary = run_one(
        &ctx,
        Signature::builder()
            .instructions("Given a series of observations I have made about my dataset, please summarize them into a brief 2-3 sentence summary which highlights only the most important details.")
            .input_desc("observations", "Observations I have made about my dataset")
            .output_desc("summary", "Two to Three sentence summary of only the most significant highlights of my observations")
            .build()?,
        &[("observations", &observations)],
        "summary",
    )?;
    Ok(strip_prefix(&summary))
}

fn describe_program_signature() -> Result<Signature> {
    Signature::builder()
        .instructions("Below is some pseudo-code for a pipeline that solves tasks with calls to language models. Please describe what type of task this program appears to be designed to solve, and how it appears to work.")
        .input_desc("program_code", "Pseudocode for a language model program designed to solve a particular task.")
        .input_desc("program_example", "An example of the program in use.")
        .output_desc("program_description", "Describe what task the program is designed to solve, and how it goes about solving this task.")
        .build()
}

fn describe_module_signature() -> Result<Signature> {
    Signature::builder()
        .instructions("Below is some pseudo-code for a pipeline that solves tasks with calls to language models. Please describe the purpose of one of the specified module in this pipeline.")
        .input_desc("program_code", "Pseudocode for a language model program designed to solve a particular task.")
        .input_desc("program_example", "An example of the program in use.")
        .input_desc("program_description", "Summary of the task the program is designed to solve, and how it goes about solving it.")
        .input_desc("module", "The module in the program that we want to describe.")
        .output_desc("module_description", "Description of the module's role in the broader program.")
        .build()
}

fn generate_instruction_signature(
    summary: bool,
    program_aware: bool,
    tip: bool,
) -> Result<Signature> {
    let mut b = Signature::builder().instructions("Use the information below to learn about a task that we are trying to solve using calls to an LM, then generate a new instruction that will be used to prompt a Language Model to better solve the task.");
    if summary {
        b = b.input_desc(
            "dataset_description",
            "A description of the dataset that we are using.",
        );
    }
    if program_aware {
        b = b
            .input_desc(
                "program_code",
                "Language model program designed to solve a particular task.",
            )
            .input_desc(
                "program_description",
                "Summary of the task the program is designed to solve, and how it goes about solving it.",
            )
            .input_desc("module", "The module to create an instruction for.")
            .input_desc(
                "module_description",
                "Description of the module to create an instruction for.",
            );
    }
    b = b
        .input_desc("task_demos", "Example inputs/outputs of our module.")
        .input_desc("basic_instruction", "Basic instruction.");
    if tip {
        b = b.input_desc(
            "tip",
            "A suggestion for how to go about generating the new instruction.",
        );
    }
    b.output_desc(
        "proposed_instruction",
        "Propose an instruction that will be used to prompt a Language Model to perform this task.",
    )
    .build()
}

// ---------------------------------------------------------------------------------------------
// The sampler

/// A TPE sampler over categorical dimensions (see [`MiproV2`]).
#[derive(Debug, Clone)]
struct Tpe {
    dims: Vec<usize>,
    observations: Vec<(Vec<usize>, f64)>,
    rng: PyRandom,
    n_startup: usize,
    n_candidates: usize,
}

impl Tpe {
    fn new(dims: Vec<usize>, seed: u64) -> Self {
        Self {
            dims,
            observations: vec![],
            rng: PyRandom::new(seed),
            n_startup: 10,
            n_candidates: 24,
        }
    }

    fn observe(&mut self, params: Vec<usize>, value: f64) {
        self.observations.push((params, value));
    }

    fn suggest(&mut self) -> Vec<usize> {
        if self.observations.len() < self.n_startup {
            let dims = self.dims.clone();
            return dims.iter().map(|&n| self.rng.randbelow(n)).collect();
        }
        let mut order: Vec<usize> = (0..self.observations.len()).collect();
        // Best first (stable for equal values: earlier trials first).
        order.sort_by(|&a, &b| self.observations[b].1.total_cmp(&self.observations[a].1));
        let n_good = ((0.1 * order.len() as f64).ceil() as usize).min(25);
        let good: Vec<&Vec<usize>> = order[..n_good]
            .iter()
            .map(|&i| &self.observations[i].0)
            .collect();
        let bad: Vec<&Vec<usize>> = order[n_good..]
            .iter()
            .map(|&i| &self.observations[i].0)
            .collect();
        let l = Parzen::new(&good, &self.dims);
        let g = Parzen::new(&bad, &self.dims);
        let mut best: Option<(f64, Vec<usize>)> = None;
        for _ in 0..self.n_candidates {
            let x = l.sample(&mut self.rng);
            let score = l.log_pdf(&x) - g.log_pdf(&x);
            if best.as_ref().is_none_or(|(s, _)| score > *s) {
                best = Some((score, x));
            }
        }
        best.expect("n_candidates > 0").1
    }
}

/// A mixture of categorical kernels, one per observation plus a uniform prior (Optuna's
/// categorical Parzen estimator with `prior_weight = 1`).
struct Parzen {
    /// Per component: per dimension, the category probabilities.
    components: Vec<Vec<Vec<f64>>>,
}

impl Parzen {
    fn new(obs: &[&Vec<usize>], dims: &[usize]) -> Self {
        let n = obs.len() as f64 + 1.0;
        let prior = 1.0 / n;
        let mut components = vec![];
        for o in obs {
            components.push(
                dims.iter()
                    .enumerate()
                    .map(|(d, &k)| {
                        let mut w = vec![prior; k];
                        w[o[d]] += 1.0;
                        let s: f64 = w.iter().sum();
                        w.iter().map(|x| x / s).collect()
                    })
                    .collect(),
            );
        }
        components.push(dims.iter().map(|&k| vec![1.0 / k as f64; k]).collect());
        Self { components }
    }

    fn sample(&self, rng: &mut PyRandom) -> Vec<usize> {
        let c = &self.components[rng.randbelow(self.components.len())];
        c.iter()
            .map(|probs| {
                let u = rng.random();
                let mut acc = 0.0;
                for (i, p) in probs.iter().enumerate() {
                    acc += p;
                    if u < acc {
                        return i;
                    }
                }
                probs.len() - 1
            })
            .collect()
    }

    fn log_pdf(&self, x: &[usize]) -> f64 {
        let m = self.components.len() as f64;
        let p: f64 = self
            .components
            .iter()
            .map(|c| c.iter().zip(x).map(|(probs, &v)| probs[v]).product::<f64>() / m)
            .sum();
        p.ln()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_prefix_as_dspy() {
        assert_eq!(strip_prefix("Proposed Instruction: Do it."), "Do it.");
        assert_eq!(
            strip_prefix("**New instruction:** \"Be brief\""),
            "** \"Be brief"
        );
        assert_eq!(strip_prefix("\"Answer well\""), "Answer well");
        assert_eq!(strip_prefix("no colon here"), "no colon here");
    }

    #[test]
    fn trials_as_dspy() {
        // light (n = 6) with demos, one predictor: max(2·2·log2 6, 9) = 10.34 -> 10
        assert_eq!(MiproV2::trials_for(1, false, 6), 10);
        assert_eq!(MiproV2::trials_for(1, true, 6), 9);
        assert_eq!(MiproV2::trials_for(1, false, 12), 18);
        assert_eq!(MiproV2::trials_for(2, false, 18), 33);
    }

    #[test]
    fn tpe_prefers_good_regions() {
        let mut t = Tpe::new(vec![4, 3], 0);
        for a in 0..4 {
            for b in 0..3 {
                // Instruction 2 is what matters; demo set 1 helps a little.
                let v = if a == 2 { 0.8 } else { 0.1 } + if b == 1 { 0.1 } else { 0.0 };
                t.observe(vec![a, b], v);
            }
        }
        let picks: Vec<Vec<usize>> = (0..10).map(|_| t.suggest()).collect();
        assert!(picks.iter().filter(|p| p[0] == 2).count() >= 8, "{picks:?}");
    }
}
