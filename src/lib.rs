//! # qlora
//!
//! QLoRA fine-tuning of small causal language models (SmolLM2, Qwen2.5, TinyLlama, Llama 3,
//! Mistral) in Rust, built to be used from Jupyter notebooks through the evcxr kernel, and
//! DSPy-style programs over the fine-tuned models.
//!
//! ```no_run
//! use qlora::prelude::*;
//! let model = Model::load("default")?; // SmolLM2-135M-Instruct (Q4_1 GGUF), fully offline
//! let out = model.generate_chat(&[Message::user("What is the capital of France?")],
//!                               &GenerationConfig::greedy(32))?;
//! println!("{}", out.text);
//! # Ok::<(), qlora::Error>(())
//! ```

pub mod data;
pub mod demo;
pub mod display;
pub mod error;
pub mod generate;
pub mod lora;
pub mod model;
pub mod ops;
pub mod prompt;
pub mod quant;
pub mod rng;
#[cfg(feature = "serve")]
pub mod serve;
pub mod train;

// The tensor library, re-exported so notebooks need only `:dep qlora`.
pub use candle_core;
pub use candle_nn;
// The dataframe library, so notebooks can build a dataset for `SftDataset::from_frame`.
pub use error::{Error, Result};
pub use lora::setup_qlora;
pub use polars;
pub use train::train;

/// The names a notebook needs, in one import.
pub mod prelude {
    pub use crate::data::{ColumnMap, DataConfig, Format, Record, SftDataset};
    pub use crate::generate::{GenerationConfig, GenerationOutput};
    pub use crate::lora::{get_peft_model, setup_qlora, LoraConfig, PeftModel};
    pub use crate::model::{LoadOptions, Message, Model};
    #[cfg(feature = "openai")]
    pub use crate::prompt::OpenAiLm;
    pub use crate::prompt::{
        BetterTogether, BootstrapFewShot, BootstrapFewShotWithRandomSearch, BootstrapFinetune,
        CachedLm, ChainOfThought, Context, Evaluate, Example, LabeledFewShot, Lm, LocalLm, MiproV2,
        Module, Predict, Prediction, Signature,
    };
    pub use crate::train::{train, ResumeFrom, SchedulerType, TrainConfig, TrainRun, Warmup};
    pub use crate::{Error, Result};
    pub use candle_core::{DType, Device, Tensor};
}
