//! The supervised fine-tuning loop, read top to bottom: plan the steps, maybe resume, then for
//! each optimiser step accumulate gradients over micro-batches, check they are finite, clip, step
//! AdamW, record, evaluate, checkpoint.
//!
//! It follows transformers' `Trainer` where that has an answer: the learning rate of step `k` is
//! `schedule.lr_at(k)`, micro-batch losses are divided by the token count of the whole optimiser
//! step (`num_items_in_batch`), the number of steps per epoch rounds up, and `max_steps` wins over
//! epochs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use super::checkpoint::{
    latest_checkpoint, load_checkpoint, rotate_checkpoints, save_checkpoint, RunFingerprint,
    TrainerState,
};
use super::history::{StepRecord, StopReason, TrainRun};
use super::{
    causal_lm_loss, clip_grad_norm, total_grad_norm, AdamW, AdamWConfig, LossOptions, LrSchedule,
    NonFinite, SchedulerType, Warmup,
};
use crate::data::{collate, epoch_batches, SftDataset, TokenizedExample};
use crate::lora::PeftModel;
use crate::{Error, Result};

/// Where to resume from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResumeFrom {
    /// The newest complete `checkpoint-N` in the output folder.
    Latest,
    /// A given `checkpoint-N` folder.
    Path(PathBuf),
}

/// How [`train`] reports progress by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Progress {
    /// A line every `logging_steps` steps, evaluations and checkpoints (what a notebook shows
    /// as the cell runs).
    #[default]
    Lines,
    /// Nothing; use [`train_with`]'s callback for your own display.
    Silent,
}

/// Training hyper-parameters, named as transformers' `TrainingArguments`.
///
/// `Default` follows transformers except where the QLoRA recipe differs: learning rate 2e-4
/// (transformers: 5e-5), 1 epoch (3), batch size 4 (8), logging every 10 steps (500).
///
/// ```
/// use qlora::train::{TrainConfig, SchedulerType, Warmup};
/// let config = TrainConfig::default()
///     .epochs(2.0)
///     .learning_rate(2e-4)
///     .batch_size(4)
///     .gradient_accumulation_steps(2)
///     .scheduler(SchedulerType::Cosine)
///     .warmup(Warmup::Ratio(0.05))
///     .output_dir("runs/demo")
///     .save_steps(50);
/// assert_eq!(config.max_grad_norm, Some(1.0));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    /// Where checkpoints, the final adapter, the history and the loss plot go.
    pub output_dir: Option<PathBuf>,
    /// Passes over the training set (fractional allowed); ignored when `max_steps` is set.
    pub num_train_epochs: f64,
    /// Optimiser steps to run, overriding epochs.
    pub max_steps: Option<usize>,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Examples per evaluation batch.
    pub eval_batch_size: usize,
    /// Micro-batches per optimiser step.
    pub gradient_accumulation_steps: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Learning-rate schedule.
    pub lr_scheduler_type: SchedulerType,
    /// Warmup steps or ratio.
    pub warmup: Warmup,
    /// AdamW β1, β2, ε and decoupled weight decay.
    pub adamw: AdamWConfig,
    /// Global gradient-norm clip (`None`: no clipping).
    pub max_grad_norm: Option<f64>,
    /// Seed of the data order (the adapters' own seed fixes their init and dropout).
    pub seed: u64,
    /// Shuffle the training set each epoch.
    pub shuffle: bool,
    /// Batch examples of similar length together (less padding), as transformers'
    /// `group_by_length`.
    pub group_by_length: bool,
    /// Print a progress line every this many steps.
    pub logging_steps: usize,
    /// Evaluate on the validation split every this many steps (and always at the end when there
    /// is a validation split).
    pub eval_steps: Option<usize>,
    /// Write a checkpoint every this many steps (needs `output_dir`).
    pub save_steps: Option<usize>,
    /// Keep at most this many checkpoints (the best one is kept in addition).
    pub save_total_limit: Option<usize>,
    /// Stop after this many evaluations without improvement, then restore the best adapter.
    pub early_stopping_patience: Option<usize>,
    /// An evaluation improves when it beats the best by more than this.
    pub early_stopping_threshold: f64,
    /// Continue an interrupted run.
    pub resume_from_checkpoint: Option<ResumeFrom>,
    /// Rows per chunk of the loss (`None`: about 8M logits per chunk).
    pub loss_chunk_rows: Option<usize>,
    /// Built-in progress output.
    pub progress: Progress,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            output_dir: None,
            num_train_epochs: 1.0,
            max_steps: None,
            batch_size: 4,
            eval_batch_size: 8,
            gradient_accumulation_steps: 1,
            learning_rate: 2e-4,
            lr_scheduler_type: SchedulerType::Linear,
            warmup: Warmup::Steps(0),
            adamw: AdamWConfig::default(),
            max_grad_norm: Some(1.0),
            seed: 42,
            shuffle: true,
            group_by_length: false,
            logging_steps: 10,
            eval_steps: None,
            save_steps: None,
            save_total_limit: None,
            early_stopping_patience: None,
            early_stopping_threshold: 0.0,
            resume_from_checkpoint: None,
            loss_chunk_rows: None,
            progress: Progress::Lines,
        }
    }
}

impl TrainConfig {
    /// Sets `num_train_epochs`.
    pub fn epochs(mut self, epochs: f64) -> Self {
        self.num_train_epochs = epochs;
        self
    }
    /// Sets `max_steps`.
    pub fn max_steps(mut self, steps: usize) -> Self {
        self.max_steps = Some(steps);
        self
    }
    /// Sets the micro-batch size.
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n;
        self
    }
    /// Sets the evaluation batch size.
    pub fn eval_batch_size(mut self, n: usize) -> Self {
        self.eval_batch_size = n;
        self
    }
    /// Sets `gradient_accumulation_steps`.
    pub fn gradient_accumulation_steps(mut self, n: usize) -> Self {
        self.gradient_accumulation_steps = n;
        self
    }
    /// Sets the peak learning rate.
    pub fn learning_rate(mut self, lr: f64) -> Self {
        self.learning_rate = lr;
        self
    }
    /// Sets the schedule.
    pub fn scheduler(mut self, kind: SchedulerType) -> Self {
        self.lr_scheduler_type = kind;
        self
    }
    /// Sets the warmup.
    pub fn warmup(mut self, warmup: Warmup) -> Self {
        self.warmup = warmup;
        self
    }
    /// Sets AdamW's decoupled weight decay.
    pub fn weight_decay(mut self, wd: f64) -> Self {
        self.adamw.weight_decay = wd;
        self
    }
    /// Sets (or with `None` disables) gradient clipping.
    pub fn max_grad_norm(mut self, norm: Option<f64>) -> Self {
        self.max_grad_norm = norm;
        self
    }
    /// Sets the data-order seed.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    /// Turns length-grouped batching on or off.
    pub fn group_by_length(mut self, on: bool) -> Self {
        self.group_by_length = on;
        self
    }
    /// Sets the progress-line interval.
    pub fn logging_steps(mut self, n: usize) -> Self {
        self.logging_steps = n;
        self
    }
    /// Evaluates every `n` steps.
    pub fn eval_steps(mut self, n: usize) -> Self {
        self.eval_steps = Some(n);
        self
    }
    /// Sets the output folder.
    pub fn output_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.output_dir = Some(dir.into());
        self
    }
    /// Checkpoints every `n` steps.
    pub fn save_steps(mut self, n: usize) -> Self {
        self.save_steps = Some(n);
        self
    }
    /// Keeps at most `n` checkpoints.
    pub fn save_total_limit(mut self, n: usize) -> Self {
        self.save_total_limit = Some(n);
        self
    }
    /// Early stopping after `patience` evaluations without improvement.
    pub fn early_stopping(mut self, patience: usize) -> Self {
        self.early_stopping_patience = Some(patience);
        self
    }
    /// Resumes from a checkpoint.
    pub fn resume_from(mut self, from: ResumeFrom) -> Self {
        self.resume_from_checkpoint = Some(from);
        self
    }
    /// Sets the built-in progress output.
    pub fn progress(mut self, progress: Progress) -> Self {
        self.progress = progress;
        self
    }

    fn validate(&self, data: &SftDataset) -> Result<()> {
        let bad = |field: &str, why: &str| {
            Err(Error::InvalidArgument(format!(
                "TrainConfig.{field}: {why}"
            )))
        };
        if self.batch_size == 0 {
            return bad("batch_size", "must be at least 1");
        }
        if self.eval_batch_size == 0 {
            return bad("eval_batch_size", "must be at least 1");
        }
        if self.gradient_accumulation_steps == 0 {
            return bad("gradient_accumulation_steps", "must be at least 1");
        }
        if !(self.learning_rate.is_finite() && self.learning_rate >= 0.0) {
            return bad("learning_rate", "must be a finite number ≥ 0");
        }
        if self.max_steps.is_none()
            && !(self.num_train_epochs > 0.0 && self.num_train_epochs.is_finite())
        {
            return bad("num_train_epochs", "must be > 0 (or set max_steps)");
        }
        if self.max_steps == Some(0) {
            return bad("max_steps", "must be at least 1");
        }
        if self.logging_steps == 0 || self.eval_steps == Some(0) || self.save_steps == Some(0) {
            return bad("logging_steps/eval_steps/save_steps", "must be at least 1");
        }
        if self.save_total_limit == Some(0) {
            return bad("save_total_limit", "must be at least 1");
        }
        if let Some(m) = self.max_grad_norm {
            if !(m > 0.0 && m.is_finite()) {
                return bad("max_grad_norm", "must be > 0 (or None to disable clipping)");
            }
        }
        if self.output_dir.is_none() && self.save_steps.is_some() {
            return bad("save_steps", "checkpoints need output_dir");
        }
        if self.output_dir.is_none() && self.resume_from_checkpoint == Some(ResumeFrom::Latest) {
            return bad(
                "resume_from_checkpoint",
                "`Latest` looks in output_dir, which is not set",
            );
        }
        if self.early_stopping_patience.is_some() && data.validation.is_empty() {
            return bad(
                "early_stopping_patience",
                "early stopping needs a validation split (DataConfig::validation_split)",
            );
        }
        if data.train.is_empty() {
            return Err(Error::InvalidArgument(
                "the training split is empty: nothing to train on".into(),
            ));
        }
        Ok(())
    }
}

/// What [`train_with`] reports as it goes.
#[derive(Debug)]
pub enum TrainEvent<'a> {
    /// Before the first step.
    Started {
        /// Steps planned in all.
        total_steps: usize,
        /// Steps already done (resumed runs).
        start_step: usize,
        /// Training examples.
        num_examples: usize,
    },
    /// After each optimiser step.
    Step(&'a StepRecord),
    /// After an evaluation.
    Evaluated {
        /// The step evaluated after.
        step: usize,
        /// Mean loss over the validation split's target tokens.
        eval_loss: f64,
        /// Whether it is the best so far.
        improved: bool,
    },
    /// After a checkpoint was written.
    Saved {
        /// Its step.
        step: usize,
        /// Its folder.
        path: &'a Path,
    },
}

/// Fine-tunes `peft`'s active adapter on `data` and returns the run's history.
///
/// ```no_run
/// use qlora::prelude::*;
/// use qlora::data::{DataConfig, SftDataset};
/// use qlora::train::{train, TrainConfig};
/// let model = Model::load("default")?;
/// let data = SftDataset::load("data.jsonl", &model, &DataConfig::default())?;
/// let mut peft = setup_qlora(model, &LoraConfig::qlora())?;
/// let run = train(&mut peft, &data, &TrainConfig::default().output_dir("runs/first"))?;
/// println!("final loss {:?}", run.final_loss());
/// # Ok::<(), qlora::Error>(())
/// ```
pub fn train(peft: &mut PeftModel, data: &SftDataset, config: &TrainConfig) -> Result<TrainRun> {
    train_with(peft, data, config, |_| {})
}

fn rng_states(peft: &PeftModel) -> Vec<Vec<Option<u64>>> {
    peft.model()
        .decoder
        .layers
        .iter()
        .map(|l| l.adapter_rng_states())
        .collect()
}

fn short_duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// [`train`] with a callback that sees every [`TrainEvent`] (for progress bars and live plots).
pub fn train_with(
    peft: &mut PeftModel,
    data: &SftDataset,
    config: &TrainConfig,
    mut on_event: impl FnMut(&TrainEvent),
) -> Result<TrainRun> {
    config.validate(data)?;
    super::alloc::keep_freed_memory();
    let params = peft.trainable_parameters();
    if params.is_empty() {
        return Err(Error::InvalidArgument(
            "the model has no trainable parameters: adapters loaded with PeftModel::from_pretrained are frozen; use from_pretrained_trainable or setup_qlora".into(),
        ));
    }
    let device = peft.model().device().clone();
    let vocab = peft.model().config().vocab_size;
    let lengths: Vec<usize> = data.train.iter().map(|e| e.input_ids.len()).collect();
    let accum = config.gradient_accumulation_steps;
    let micro_per_epoch = lengths.len().div_ceil(config.batch_size);
    let steps_per_epoch = micro_per_epoch.div_ceil(accum).max(1);
    let total_steps = config.max_steps.unwrap_or_else(|| {
        ((config.num_train_epochs * steps_per_epoch as f64).ceil() as usize).max(1)
    });
    let schedule = LrSchedule::new(config.lr_scheduler_type, config.learning_rate, total_steps)
        .warmup(config.warmup);
    let mut optimizer = AdamW::new(params.clone(), config.adamw)?;
    let fingerprint = RunFingerprint {
        num_examples: lengths.len(),
        batch_size: config.batch_size,
        gradient_accumulation_steps: accum,
        seed: config.seed,
        total_steps,
        num_parameters: params.len(),
    };
    let mut state = TrainerState {
        global_step: 0,
        epoch: 0,
        micro_batch_in_epoch: 0,
        adapter_rng_states: rng_states(peft),
        history: Vec::new(),
        best_eval: None,
        evals_without_improvement: 0,
        tokens_seen: 0,
        train_seconds: 0.0,
        fingerprint: fingerprint.clone(),
    };

    let mut resumed_from_step = None;
    if let Some(from) = &config.resume_from_checkpoint {
        let dir = match from {
            ResumeFrom::Path(p) => p.clone(),
            ResumeFrom::Latest => {
                let out = config.output_dir.as_deref().expect("validated");
                latest_checkpoint(out)?.ok_or_else(|| Error::Checkpoint {
                    path: out.to_path_buf(),
                    message: "no complete checkpoint-N folder to resume from".into(),
                })?
            }
        };
        let ck = load_checkpoint(&dir, &device)?;
        if ck.state.fingerprint != fingerprint {
            return Err(Error::Checkpoint {
                path: dir,
                message: format!(
                    "made for another run: checkpoint has {:?}, this run has {:?}; resume with the same data, batch size, accumulation, seed and step count",
                    ck.state.fingerprint, fingerprint
                ),
            });
        }
        let active = peft.active_adapter().to_string();
        for (name, var) in &params {
            let key = crate::lora::saved_key(name, &active);
            let t = ck.adapter.get(&key).ok_or_else(|| Error::Checkpoint {
                path: dir.clone(),
                message: format!("adapter lacks `{key}`"),
            })?;
            if t.dims() != var.dims() {
                return Err(Error::Checkpoint {
                    path: dir.clone(),
                    message: format!(
                        "`{key}` has shape {:?}, the model's adapter needs {:?}",
                        t.dims(),
                        var.dims()
                    ),
                });
            }
            var.set(&t.to_dtype(var.dtype())?)?;
        }
        optimizer
            .load_state_dict(ck.optimizer)
            .map_err(|e| Error::Checkpoint {
                path: dir.clone(),
                message: e.to_string(),
            })?;
        for (layer, states) in peft
            .model()
            .decoder
            .layers
            .iter()
            .zip(&ck.state.adapter_rng_states)
        {
            layer.set_adapter_rng_states(states);
        }
        resumed_from_step = Some(ck.state.global_step);
        state = ck.state;
    }

    peft.train();
    let lines = config.progress == Progress::Lines;
    on_event(&TrainEvent::Started {
        total_steps,
        start_step: state.global_step,
        num_examples: lengths.len(),
    });
    if lines {
        println!(
            "training {} examples: {} steps ({} per epoch, batch {} × accumulation {}){}",
            lengths.len(),
            total_steps,
            steps_per_epoch,
            config.batch_size,
            accum,
            resumed_from_step.map_or(String::new(), |s| format!(", resuming after step {s}"))
        );
    }
    let loss_options = config.loss_chunk_rows.map_or_else(
        || LossOptions::for_vocab(vocab),
        |r| LossOptions::default().chunk_rows(r),
    );
    let session_start = Instant::now();
    let seconds_before = state.train_seconds;
    let step_at_session_start = state.global_step;
    let mut stop_reason = StopReason::Completed;
    let mut best_weights: Option<Vec<Tensor>> = None;

    'run: while state.global_step < total_steps {
        let batches = epoch_batches(
            &lengths,
            config.batch_size,
            config.seed,
            state.epoch,
            config.shuffle,
            config.group_by_length,
        );
        while state.micro_batch_in_epoch < batches.len() && state.global_step < total_steps {
            let step = state.global_step + 1;
            let start = state.micro_batch_in_epoch;
            let end = (start + accum).min(batches.len());
            let group = &batches[start..end];
            let step_start = Instant::now();
            let num_items: usize = group
                .iter()
                .flatten()
                .map(|&i| data.train[i].num_target_tokens())
                .sum();
            let options = loss_options.num_items_in_batch(Some(num_items.max(1)));
            let mut grads = GradStore::default();
            let mut loss = 0f64;
            let mut tokens = 0usize;
            for indices in group {
                let examples: Vec<&TokenizedExample> =
                    indices.iter().map(|&i| &data.train[i]).collect();
                let batch = collate(&examples, data.pad_token_id, &device)?;
                tokens += batch.num_tokens;
                let head = &peft.model().decoder.lm_head;
                let mut value = 0f32;
                // Right padding and a causal mask: real tokens never see the padding, so no
                // attention mask is needed (padded positions carry no label).
                let (_, mut micro) = peft.forward_backward(&batch.input_ids, None, |hidden| {
                    let l = causal_lm_loss(hidden, head, &batch.labels, &options)?;
                    value = l.value;
                    Ok(l.loss)
                })?;
                loss += f64::from(value);
                accumulate(&mut grads, &mut micro, &params)?;
            }
            NonFinite::check("training loss", loss as f32, step)?;
            let grad_norm = match config.max_grad_norm {
                Some(max) => clip_grad_norm(&mut grads, &params, max)?.norm,
                None => total_grad_norm(&grads, &params)?,
            };
            NonFinite::check("gradient norm", grad_norm, step)?;
            let lr = schedule.lr_at(state.global_step);
            optimizer.step(&grads, lr)?;
            drop(grads);

            state.global_step = step;
            state.micro_batch_in_epoch = end;
            state.tokens_seen += tokens as u64;
            let seconds = step_start.elapsed().as_secs_f64();
            state.history.push(StepRecord {
                step,
                epoch: state.epoch as f64 + end as f64 / batches.len() as f64,
                loss,
                eval_loss: None,
                lr,
                grad_norm: f64::from(grad_norm),
                tokens_per_sec: tokens as f64 / seconds.max(1e-9),
                tokens,
            });
            let record = state.history.last().expect("just pushed");
            on_event(&TrainEvent::Step(record));
            if lines && (step % config.logging_steps == 0 || step == 1 || step == total_steps) {
                let done = (step - step_at_session_start) as f64;
                let per_step = session_start.elapsed().as_secs_f64() / done.max(1.0);
                println!(
                    "step {step:>5}/{total_steps}  loss {:.4}  lr {:.2e}  grad {:.3}  {:.0} tok/s  eta {}",
                    record.loss,
                    record.lr,
                    record.grad_norm,
                    record.tokens_per_sec,
                    short_duration(per_step * (total_steps - step) as f64)
                );
            }

            let due = config.eval_steps.is_some_and(|n| step % n == 0) || step == total_steps;
            if !data.validation.is_empty() && due {
                let eval_loss = evaluate_loss(
                    peft,
                    &data.validation,
                    data.pad_token_id,
                    config.eval_batch_size,
                )?;
                state.history.last_mut().expect("pushed").eval_loss = Some(eval_loss);
                let improved = state
                    .best_eval
                    .is_none_or(|(best, _)| eval_loss < best - config.early_stopping_threshold);
                if improved {
                    state.best_eval = Some((eval_loss, step));
                    state.evals_without_improvement = 0;
                    if config.early_stopping_patience.is_some() {
                        best_weights = Some(snapshot(&params)?);
                    }
                } else {
                    state.evals_without_improvement += 1;
                }
                on_event(&TrainEvent::Evaluated {
                    step,
                    eval_loss,
                    improved,
                });
                if lines {
                    println!(
                        "step {step:>5}/{total_steps}  eval_loss {eval_loss:.4}{}",
                        if improved { "  (best)" } else { "" }
                    );
                }
            }

            if let (Some(every), Some(out)) = (config.save_steps, config.output_dir.as_deref()) {
                if step % every == 0 {
                    state.adapter_rng_states = rng_states(peft);
                    state.train_seconds = seconds_before + session_start.elapsed().as_secs_f64();
                    let path = save_checkpoint(out, peft, &optimizer.state_dict()?, &state)?;
                    if let Some(limit) = config.save_total_limit {
                        rotate_checkpoints(out, limit, state.best_eval.map(|(_, s)| s))?;
                    }
                    on_event(&TrainEvent::Saved { step, path: &path });
                    if lines {
                        println!("step {step:>5}/{total_steps}  saved {}", path.display());
                    }
                }
            }

            if let (Some(patience), Some((_, best_step))) =
                (config.early_stopping_patience, state.best_eval)
            {
                if state.evals_without_improvement >= patience {
                    stop_reason = StopReason::EarlyStopped { step, best_step };
                    break 'run;
                }
            }
        }
        if state.micro_batch_in_epoch >= batches.len() {
            state.epoch += 1;
            state.micro_batch_in_epoch = 0;
        }
    }

    if let (StopReason::EarlyStopped { best_step, .. }, Some(best)) = (&stop_reason, &best_weights)
    {
        for ((_, var), t) in params.iter().zip(best) {
            var.set(t)?;
        }
        if lines {
            println!("early stopping: restored the adapter of step {best_step}");
        }
    }
    // Ready for generation: dropout off, as after transformers' `model.eval()`.
    peft.eval();
    let run = TrainRun {
        history: state.history,
        total_steps,
        stop_reason,
        best_eval: state.best_eval,
        train_seconds: seconds_before + session_start.elapsed().as_secs_f64(),
        tokens_seen: state.tokens_seen,
        resumed_from_step,
        output_dir: config.output_dir.clone(),
    };
    if let Some(out) = &config.output_dir {
        peft.save_adapter(peft.active_adapter(), out)?;
        run.save(out)?;
        if lines {
            println!(
                "saved the adapter, history.csv and loss.svg to {}",
                out.display()
            );
        }
    }
    Ok(run)
}

/// Adds the trainable parameters' gradients of one micro-batch into `into`, dropping the rest.
fn accumulate(into: &mut GradStore, micro: &mut GradStore, params: &[(String, Var)]) -> Result<()> {
    for (_, var) in params {
        if let Some(g) = micro.remove(var.as_tensor()) {
            let sum = match into.remove(var.as_tensor()) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            into.insert(var.as_tensor(), sum);
        }
    }
    Ok(())
}

fn snapshot(params: &[(String, Var)]) -> Result<Vec<Tensor>> {
    params
        .iter()
        .map(|(_, v)| Ok(v.as_tensor().detach().copy()?))
        .collect()
}

/// Mean loss per target token over `examples` (adapters in eval mode: no dropout), in batches of
/// `batch_size`. Leaves the model in training mode.
pub fn evaluate_loss(
    peft: &PeftModel,
    examples: &[TokenizedExample],
    pad_token_id: u32,
    batch_size: usize,
) -> Result<f64> {
    if examples.is_empty() {
        return Err(Error::InvalidArgument(
            "no examples to evaluate the loss on".into(),
        ));
    }
    let decoder = &peft.model().decoder;
    let options = LossOptions::for_vocab(peft.model().config().vocab_size);
    peft.eval();
    let result = (|| {
        let (mut sum, mut count) = (0f64, 0usize);
        for chunk in examples.chunks(batch_size.max(1)) {
            let refs: Vec<&TokenizedExample> = chunk.iter().collect();
            let batch = collate(&refs, pad_token_id, peft.model().device())?;
            let hidden = decoder
                .hidden_states(&batch.input_ids, None, None)?
                .detach();
            let l = causal_lm_loss(&hidden, &decoder.lm_head, &batch.labels, &options)?;
            sum += l.sum;
            count += l.num_tokens;
        }
        Ok(sum / count.max(1) as f64)
    })();
    peft.train();
    result
}
