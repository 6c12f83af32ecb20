//! DSPy-style programs over the (fine-tuned) model: an [`Lm`] trait with a local, a cached, a
//! scripted and (feature `openai`) an OpenAI-compatible HTTP implementation (`OpenAiLm`);
//! [`Signature`]s; the [`ChatAdapter`] whose messages are byte-identical to DSPy 3.4's;
//! [`Predict`] and [`ChainOfThought`]; [`Example`]s, metrics and [`Evaluate`]; and the
//! optimisers with DSPy's algorithms and random draws: [`LabeledFewShot`],
//! [`BootstrapFewShot`], [`BootstrapFewShotWithRandomSearch`], [`MiproV2`] and
//! [`BootstrapFinetune`], and [`BetterTogether`] to chain prompt and weight optimisation.
//!
//! ```no_run
//! use qlora::prelude::*;
//! use qlora::prompt::*;
//! let lm = LocalLm::new(Model::load("default")?).max_tokens(64);
//! let ctx = Context::new(lm);
//! let qa = ChainOfThought::new("question -> answer")?;
//! let pred = qa.forward(&ctx, &Example::new().with("question", "What is the capital of France?"))?;
//! println!("{}", pred);
//! ctx.lm.history(1).evcxr_display(); // the exact messages and the raw completion
//! # Ok::<(), qlora::Error>(())
//! ```
//!
//! Differences from DSPy, on purpose:
//! - programs get their LM from an explicit [`Context`] instead of `dspy.settings`;
//! - `Evaluate` does not stop after 10 failures unless asked (`max_errors`), and counts
//!   format failures ([`ParseCounts`]);
//! - JSON objects inside values are written with sorted keys; the JSON fallback's repair of
//!   broken JSON approximates `json_repair` (strict JSON, fenced blocks, the first bracketed
//!   span, Python literals, bare-word lists).

pub mod adapter;
pub mod evaluate;
pub mod example;
pub mod lm;
pub mod metric;
#[cfg(feature = "openai")]
pub mod openai;
pub mod predict;
pub mod py;
pub mod signature;
pub mod teleprompt;

pub use adapter::{
    parse_value, AdapterParseError, ChatAdapter, JsonAdapter, ParseCounts, ParseStats,
};
pub use evaluate::{Evaluate, EvaluatedExample, EvaluationResult};
pub use example::{Example, Prediction};
pub use lm::{
    format_fields, CachedLm, History, Lm, LmCall, LmHistory, LmRequest, LmResponse, LocalLm,
    ScriptedLm, Usage,
};
pub use metric::{
    em_score, f1_score, metric_fn, normalize_text, AnswerExactMatch, AnswerF1, ExactMatch, Metric,
    MetricFn,
};
#[cfg(feature = "openai")]
pub use openai::OpenAiLm;
pub use predict::{ChainOfThought, Context, IntoSignature, LmConfig, Module, Predict, TraceStep};
pub use signature::{Field, FieldRole, FieldType, Signature, SignatureBuilder};
pub use teleprompt::{
    AutoRun, BetterTogether, BetterTogetherReport, BetterTogetherResult, BootstrapFewShot,
    BootstrapFewShotWithRandomSearch, BootstrapFinetune, Candidate, Compiled, Finetuned,
    LabeledFewShot, MiproPlan, MiproV2, OptimizerReport, ReportRow, StepCandidate, StepOptimizer,
};
