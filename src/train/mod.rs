//! The numeric core of training: AdamW, learning-rate schedules, gradient clipping and the
//! chunked causal-LM loss — each checked against its PyTorch/transformers counterpart by
//! `tests/train_parity.rs`.
//!
//! One optimiser step, as transformers' Trainer does it:
//!
//! ```no_run
//! use qlora::lora::{get_peft_model, LoraConfig};
//! use qlora::model::Model;
//! use qlora::train::{causal_lm_loss, clip_grad_norm, AdamW, AdamWConfig, LossOptions, LrSchedule};
//! # use qlora::candle_core::{Device, Tensor};
//! let peft = get_peft_model(Model::load("default")?, &LoraConfig::qlora())?;
//! let params = peft.trainable_parameters();
//! let mut opt = AdamW::new(params.clone(), AdamWConfig::default())?;
//! let schedule = LrSchedule::default();
//! let ids = Tensor::new(&[[1u32, 9690, 198, 2683]], &Device::Cpu)?;
//! let decoder = &peft.model().decoder;
//! let hidden = decoder.hidden_states(&ids, None, None)?;
//! let loss = causal_lm_loss(&hidden, &decoder.lm_head, &ids, &LossOptions::for_vocab(49152))?;
//! let mut grads = loss.loss.backward()?;
//! let norm = clip_grad_norm(&mut grads, &params, 1.0)?;
//! norm.check(0).expect("finite gradient");
//! opt.step(&grads, schedule.lr_at(0))?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod alloc;
pub mod checkpoint;
pub mod clip;
pub mod history;
pub mod loss;
pub mod optim;
pub mod schedule;
pub mod trainer;

pub use alloc::keep_freed_memory;
pub use checkpoint::{latest_checkpoint, list_checkpoints, load_checkpoint};
pub use clip::{clip_grad_norm, grad_norms, total_grad_norm, GradNorm, NonFinite};
pub use history::{StepRecord, StopReason, TrainRun};
pub use loss::{causal_lm_loss, LmLoss, LossOptions, IGNORE_INDEX};
pub use optim::{AdamW, AdamWConfig};
pub use schedule::{LrSchedule, SchedulerType, Warmup};
pub use trainer::{
    evaluate_loss, train, train_with, Progress, ResumeFrom, TrainConfig, TrainEvent,
};
