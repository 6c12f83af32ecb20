//! DSPy's `BootstrapFinetune`: the teacher's successful traces become chat fine-tuning data
//! in the adapter's format, and the student's model is QLoRA-trained on them.

use std::collections::HashMap;
use std::sync::Arc;

use super::super::adapter::ChatAdapter;
use super::super::example::Example;
use super::super::metric::Metric;
use super::super::predict::{Context, Module, Predict};
use super::super::py::PyRandom;
use super::{matching_predictors, require_inputs, OptimizerReport, ReportRow};
use crate::data::{DataConfig, Record, SftDataset};
use crate::lora::PeftModel;
use crate::model::Message;
use crate::train::{train, TrainConfig, TrainRun};
use crate::{Error, Result};

/// Fine-tunes the student's model on its teacher's successful traces — DSPy's
/// `BootstrapFinetune` with one multitask dataset (DSPy's default `multitask=True`):
///
/// 1. the teacher (default: the student itself) runs every training example while tracing
///    (DSPy's `bootstrap_trace_data`); examples the metric scores 0 are dropped (every
///    successful run is kept without a metric), and so are runs that fail (DSPy raises);
/// 2. each predictor call of a kept run becomes one chat record: the adapter's messages for
///    that predictor's signature, its demos (unless `exclude_demos`) and inputs, then the
///    assistant turn with its outputs (`ChatAdapter.format_finetune_data`); the records are
///    shuffled with `random.Random(0)`, as DSPy does;
/// 3. the records are tokenised with the model's chat template (loss on the assistant turn
///    only) and the [`PeftModel`]'s adapter is trained with [`train`].
///
/// The compiled program is the student (demos cleared when `exclude_demos`); use it with
/// `LocalLm::with_adapter(peft)` — in this crate a program's LM comes from its [`Context`],
/// where DSPy attaches the fine-tuned LM to each predictor.
///
/// ```no_run
/// use qlora::prelude::*;
/// use qlora::prompt::{BootstrapFinetune, ExactMatch};
/// # let trainset: Vec<Example> = vec![];
/// // The teacher: a larger model (or `OpenAiLm` for a hosted one, feature `openai`).
/// let teacher_ctx = Context::new(LocalLm::new(Model::load("Qwen/Qwen2.5-1.5B-Instruct")?));
/// let mut peft = setup_qlora(Model::load("default")?, &LoraConfig::qlora())?;
/// let program = Predict::new("question -> answer")?;
/// let tuned = BootstrapFinetune::new(ExactMatch::new("answer"))
///     .compile(&program, None, &trainset, &teacher_ctx, &mut peft)?;
/// let student_ctx = Context::new(LocalLm::with_adapter(peft));
/// # Ok::<(), qlora::Error>(())
/// ```
#[derive(Clone)]
pub struct BootstrapFinetune {
    /// Keeps the traces it scores nonzero (`None`: every successful run).
    pub metric: Option<Arc<dyn Metric>>,
    /// Leave demos out of the training prompts and the compiled program (DSPy: false).
    pub exclude_demos: bool,
    /// How records are tokenised (default: the chat template, loss on the assistant turn).
    pub data_config: DataConfig,
    /// How the adapter is trained.
    pub train_config: TrainConfig,
    /// The adapter that formats the records (DSPy's default ChatAdapter).
    pub adapter: ChatAdapter,
}

impl std::fmt::Debug for BootstrapFinetune {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootstrapFinetune")
            .field("metric", &self.metric.as_ref().map(|m| m.name()))
            .field("exclude_demos", &self.exclude_demos)
            .field("train_config", &self.train_config)
            .finish()
    }
}

/// What [`BootstrapFinetune::compile`] produced.
#[derive(Debug, Clone)]
pub struct Finetuned<P> {
    /// The student, ready to run with the trained model.
    pub program: P,
    /// The chat records the model was trained on (after the shuffle).
    pub records: Vec<Record>,
    /// The training run (history, loss).
    pub run: TrainRun,
    /// One row per training example (kept or not, with its score).
    pub report: OptimizerReport,
}

impl BootstrapFinetune {
    /// DSPy's defaults with `metric`.
    pub fn new(metric: impl Metric + 'static) -> Self {
        Self::from_arc(Arc::new(metric))
    }

    /// DSPy's defaults with a shared metric.
    pub fn from_arc(metric: Arc<dyn Metric>) -> Self {
        Self::with_metric(Some(metric))
    }

    /// Keeps every successful run (no metric).
    pub fn without_metric() -> Self {
        Self::with_metric(None)
    }

    fn with_metric(metric: Option<Arc<dyn Metric>>) -> Self {
        Self {
            metric,
            exclude_demos: false,
            data_config: DataConfig::default(),
            train_config: TrainConfig::default(),
            adapter: ChatAdapter::default(),
        }
    }

    /// Sets the training configuration.
    pub fn train_config(mut self, config: TrainConfig) -> Self {
        self.train_config = config;
        self
    }

    /// Sets the data configuration.
    pub fn data_config(mut self, config: DataConfig) -> Self {
        self.data_config = config;
        self
    }

    /// Leaves demos out.
    pub fn exclude_demos(mut self, on: bool) -> Self {
        self.exclude_demos = on;
        self
    }

    /// Steps 1–2: runs the teacher (default: the student) on `trainset` with `ctx`'s LM and
    /// returns the chat records (shuffled as DSPy does) and the report.
    pub fn bootstrap_records<P: Module + Clone>(
        &self,
        student: &P,
        teacher: Option<&P>,
        trainset: &[Example],
        ctx: &Context,
    ) -> Result<(Vec<Record>, OptimizerReport)> {
        require_inputs("trainset", trainset)?;
        let teacher = teacher.cloned().unwrap_or_else(|| student.clone());
        matching_predictors("BootstrapFinetune", student, &teacher)?;
        let by_id: HashMap<u64, (String, &Predict)> = teacher
            .named_predictors()
            .into_iter()
            .map(|(n, p)| (p.id(), (n, p)))
            .collect();
        let mut rows = vec![];
        let mut records = vec![];
        let mut kept = 0;
        for (idx, example) in trainset.iter().enumerate() {
            let run_ctx = ctx.tracing();
            let mut row = ReportRow {
                example: Some(idx),
                round: 0,
                predictor: "*".into(),
                outcome: String::new(),
                score: None,
                kept: 0,
            };
            let prediction = match teacher.forward(&run_ctx, &example.inputs()) {
                Ok(p) => p,
                Err(e) => {
                    row.outcome = format!("error: {e}");
                    rows.push(row);
                    continue;
                }
            };
            let trace = run_ctx.trace();
            if let Some(m) = &self.metric {
                let score = m.score(example, &prediction, Some(&trace));
                row.score = Some(score);
                if score == 0.0 {
                    row.outcome = "rejected by metric".into();
                    rows.push(row);
                    continue;
                }
            }
            kept += 1;
            for step in &trace {
                let Some((_, pred)) = by_id.get(&step.predictor_id) else {
                    continue;
                };
                let demos: &[Example] = if self.exclude_demos { &[] } else { &pred.demos };
                let mut messages: Vec<Message> =
                    self.adapter.format(&pred.signature, demos, &step.inputs);
                messages.push(Message::new(
                    "assistant",
                    self.adapter
                        .format_assistant(&pred.signature, &step.prediction.fields),
                ));
                records.push(Record::Chat(messages));
                row.kept += 1;
            }
            row.outcome = "kept".into();
            rows.push(row);
        }
        PyRandom::new(0).shuffle(&mut records);
        let summary = format!(
            "{kept} of {} training runs kept, {} chat records",
            trainset.len(),
            records.len()
        );
        Ok((
            records,
            OptimizerReport {
                optimizer: "BootstrapFinetune".into(),
                summary,
                rows,
            },
        ))
    }

    /// Bootstraps the records with `ctx`'s LM (the teacher's), then trains `peft` on them.
    pub fn compile<P: Module + Clone>(
        &self,
        student: &P,
        teacher: Option<&P>,
        trainset: &[Example],
        ctx: &Context,
        peft: &mut PeftModel,
    ) -> Result<Finetuned<P>> {
        let (records, report) = self.bootstrap_records(student, teacher, trainset, ctx)?;
        self.train_on_records(student, records, report, peft)
    }

    /// Step 3 alone: trains `peft` on `records` (from [`BootstrapFinetune::bootstrap_records`])
    /// and returns the student ready for the trained model — for callers that bootstrap with
    /// an LM that shares the model being trained (BetterTogether).
    pub fn train_on_records<P: Module + Clone>(
        &self,
        student: &P,
        records: Vec<Record>,
        mut report: OptimizerReport,
        peft: &mut PeftModel,
    ) -> Result<Finetuned<P>> {
        if records.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "BootstrapFinetune: no training data — {}; check the teacher's LM and the metric",
                report.summary
            )));
        }
        let data = SftDataset::from_records(records.clone(), peft.model(), &self.data_config)?;
        let run = train(peft, &data, &self.train_config)?;
        report.summary.push_str(&format!(
            "; trained {} steps, final loss {}",
            run.history.len(),
            run.final_loss()
                .map(|l| format!("{l:.4}"))
                .unwrap_or_else(|| "-".into())
        ));
        let mut program = student.clone();
        for (_, p) in program.named_predictors_mut() {
            if self.exclude_demos {
                p.demos.clear();
            }
            p.compiled = true;
        }
        Ok(Finetuned {
            program,
            records,
            run,
            report,
        })
    }
}
