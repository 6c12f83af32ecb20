//! Programs: [`Predict`] (one LM call for a signature), [`ChainOfThought`] (the same with a
//! `reasoning` field first), and the [`Module`] trait for your own programs that call several
//! predictors. A [`Context`] carries the LM, the adapter, LM settings and (when an optimiser
//! asks for it) the trace of predictor calls — what DSPy keeps in `dspy.settings`.
//!
//! ```
//! use qlora::prompt::{Context, Example, Module, Predict, ScriptedLm};
//! let lm = ScriptedLm::new(|_| "[[ ## answer ## ]]\n4\n\n[[ ## completed ## ]]".to_string());
//! let qa = Predict::new("question -> answer")?;
//! let pred = qa.forward(&Context::new(lm), &Example::new().with("question", "What is 2+2?"))?;
//! assert_eq!(pred.get_str("answer").as_deref(), Some("4"));
//! # Ok::<(), qlora::Error>(())
//! ```
//!
//! A user-defined module implements `forward` with its predictors and lists them in
//! `named_predictors` (the names are the keys of the saved state, as in DSPy):
//!
//! ```
//! use qlora::prompt::{Context, Example, Module, Predict, Prediction};
//! #[derive(Clone)]
//! struct DraftThenAnswer { draft: Predict, answer: Predict }
//! impl Module for DraftThenAnswer {
//!     fn forward(&self, ctx: &Context, inputs: &Example) -> qlora::Result<Prediction> {
//!         let d = self.draft.forward(ctx, inputs)?;
//!         let with_draft = inputs.clone().with("draft", d.get("draft").cloned().unwrap_or_default());
//!         self.answer.forward(ctx, &with_draft)
//!     }
//!     fn named_predictors(&self) -> Vec<(String, &Predict)> {
//!         vec![("draft".into(), &self.draft), ("answer".into(), &self.answer)]
//!     }
//!     fn named_predictors_mut(&mut self) -> Vec<(String, &mut Predict)> {
//!         vec![("draft".into(), &mut self.draft), ("answer".into(), &mut self.answer)]
//!     }
//! }
//! ```

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::adapter::{ChatAdapter, ParseCounts, ParseStats};
use super::example::{Example, Prediction};
use super::lm::{Lm, LmRequest};
use super::signature::{FieldType, Signature};
use crate::{Error, Result};

/// LM settings a predictor or a context sets for its calls (`None`: leave to the next level —
/// predictor, then context, then the LM's defaults).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LmConfig {
    /// Sampling temperature.
    pub temperature: Option<f64>,
    /// Tokens to generate at most.
    pub max_tokens: Option<usize>,
    /// Completions per call.
    pub n: Option<usize>,
    /// Sampling seed.
    pub seed: Option<u64>,
    /// DSPy's `rollout_id` (distinct cache entries for otherwise equal requests).
    pub rollout_id: Option<u64>,
    /// Extra stop strings.
    pub stop: Vec<String>,
}

impl LmConfig {
    /// `self` where set, else `base`.
    pub fn over(&self, base: &LmConfig) -> LmConfig {
        LmConfig {
            temperature: self.temperature.or(base.temperature),
            max_tokens: self.max_tokens.or(base.max_tokens),
            n: self.n.or(base.n),
            seed: self.seed.or(base.seed),
            rollout_id: self.rollout_id.or(base.rollout_id),
            stop: if self.stop.is_empty() {
                base.stop.clone()
            } else {
                self.stop.clone()
            },
        }
    }
}

/// One predictor call recorded while tracing: which predictor (by id), its inputs, and what
/// it predicted (DSPy's `(predictor, inputs, prediction)` trace entries).
#[derive(Debug, Clone, PartialEq)]
pub struct TraceStep {
    /// The predictor's [`Predict::id`].
    pub predictor_id: u64,
    /// The inputs it was given.
    pub inputs: Example,
    /// What it returned.
    pub prediction: Prediction,
}

/// What a program runs with: the LM, the adapter, LM settings under the predictors' own, the
/// parse counters and, when tracing, the predictor calls made.
#[derive(Clone)]
pub struct Context {
    /// The LM.
    pub lm: Arc<dyn Lm>,
    /// The adapter (DSPy's default ChatAdapter with JSON fallback).
    pub adapter: ChatAdapter,
    /// LM settings for every call made with this context (a predictor's own config wins).
    pub lm_config: LmConfig,
    stats: Arc<ParseStats>,
    trace: Option<Arc<Mutex<Vec<TraceStep>>>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("lm", &self.lm.model_name())
            .field("lm_config", &self.lm_config)
            .field("tracing", &self.trace.is_some())
            .finish()
    }
}

impl Context {
    /// A context for `lm` with DSPy's defaults.
    pub fn new(lm: impl Lm + 'static) -> Self {
        Self::from_arc(Arc::new(lm))
    }

    /// A context for a shared LM.
    pub fn from_arc(lm: Arc<dyn Lm>) -> Self {
        Self {
            lm,
            adapter: ChatAdapter::default(),
            lm_config: LmConfig::default(),
            stats: Arc::new(ParseStats::default()),
            trace: None,
        }
    }

    /// The same context with other LM settings (e.g. `temperature: Some(1.0)`).
    pub fn with_lm_config(&self, config: LmConfig) -> Self {
        Self {
            lm_config: config,
            ..self.clone()
        }
    }

    /// The same context recording a fresh trace (read it with [`Context::trace`]).
    pub fn tracing(&self) -> Self {
        Self {
            trace: Some(Arc::new(Mutex::new(vec![]))),
            ..self.clone()
        }
    }

    /// The same context without a trace.
    pub fn untraced(&self) -> Self {
        Self {
            trace: None,
            ..self.clone()
        }
    }

    /// The predictor calls recorded so far (empty when not tracing).
    pub fn trace(&self) -> Vec<TraceStep> {
        self.trace
            .as_ref()
            .map(|t| t.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .unwrap_or_default()
    }

    /// How completions parsed so far with this context (and its copies).
    pub fn parse_counts(&self) -> ParseCounts {
        self.stats.counts()
    }

    pub(crate) fn stats(&self) -> &ParseStats {
        &self.stats
    }

    fn record(&self, step: TraceStep) {
        if let Some(t) = &self.trace {
            t.lock().unwrap_or_else(|e| e.into_inner()).push(step);
        }
    }
}

/// A program: something that maps inputs to a prediction with predictors inside.
pub trait Module: Send + Sync {
    /// Runs the program on `inputs`.
    fn forward(&self, ctx: &Context, inputs: &Example) -> Result<Prediction>;

    /// The predictors, by name (DSPy's `named_predictors()`; a lone Predict is `self`).
    fn named_predictors(&self) -> Vec<(String, &Predict)>;

    /// The predictors, mutable (optimisers set their demos and instructions).
    fn named_predictors_mut(&mut self) -> Vec<(String, &mut Predict)>;

    /// Whether an optimiser has compiled this program (DSPy's `_compiled`).
    fn is_compiled(&self) -> bool {
        self.named_predictors().iter().any(|(_, p)| p.compiled)
    }

    /// Clears every predictor's demos (DSPy's `reset_copy` on a copy).
    fn reset(&mut self) {
        for (_, p) in self.named_predictors_mut() {
            p.demos.clear();
            p.compiled = false;
        }
    }

    /// The program's state in DSPy's shape: `{name: {"traces", "train", "demos", "signature",
    /// "lm"}}`.
    fn dump_state(&self) -> Value {
        let map: serde_json::Map<String, Value> = self
            .named_predictors()
            .into_iter()
            .map(|(name, p)| (name, p.dump_state()))
            .collect();
        Value::Object(map)
    }

    /// Restores demos and instructions from [`Module::dump_state`]'s shape (also a DSPy
    /// `program.save("x.json")` file's content; its `metadata` is ignored).
    fn load_state(&mut self, state: &Value) -> Result<()> {
        for (name, p) in self.named_predictors_mut() {
            let s = state.get(&name).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "saved state has no predictor `{name}`: it was saved from another program"
                ))
            })?;
            p.load_state(s)?;
        }
        Ok(())
    }

    /// Writes the state as JSON to `path` (DSPy's `save(path)` with `save_program=False`).
    fn save(&self, path: &Path) -> Result<()> {
        let mut state = self.dump_state();
        state["metadata"] = json!({"dependency_versions": {"qlora": env!("CARGO_PKG_VERSION")}});
        let text = serde_json::to_string_pretty(&state).expect("state serialises");
        std::fs::write(path, text).map_err(|e| Error::io(path, e))
    }

    /// Reads a state file written by [`Module::save`] (or by DSPy).
    fn load(&mut self, path: &Path) -> Result<()> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let state: Value = serde_json::from_str(&text)
            .map_err(|e| Error::InvalidArgument(format!("{}: not JSON: {e}", path.display())))?;
        self.load_state(&state)
    }
}

static NEXT_PREDICTOR_ID: AtomicU64 = AtomicU64::new(1);

fn next_id() -> u64 {
    NEXT_PREDICTOR_ID.fetch_add(1, Ordering::Relaxed)
}

/// DSPy's `dspy.Predict`: formats the signature with its demos, calls the LM, parses the
/// output fields.
#[derive(Debug, PartialEq)]
pub struct Predict {
    /// The task.
    pub signature: Signature,
    /// Few-shot examples (inputs and outputs) shown before the inputs.
    pub demos: Vec<Example>,
    /// This predictor's LM settings (over the context's).
    pub config: LmConfig,
    /// Set by optimisers.
    pub compiled: bool,
    id: u64,
}

impl Clone for Predict {
    /// A copy with its own [`Predict::id`] (traces tell the copies apart).
    fn clone(&self) -> Self {
        Self {
            signature: self.signature.clone(),
            demos: self.demos.clone(),
            config: self.config.clone(),
            compiled: self.compiled,
            id: next_id(),
        }
    }
}

/// Anything that names a signature: `"question -> answer"` or a [`Signature`].
pub trait IntoSignature {
    /// The signature.
    fn into_signature(self) -> Result<Signature>;
}

impl IntoSignature for &str {
    fn into_signature(self) -> Result<Signature> {
        Signature::parse(self)
    }
}

impl IntoSignature for Signature {
    fn into_signature(self) -> Result<Signature> {
        Ok(self)
    }
}

impl IntoSignature for &Signature {
    fn into_signature(self) -> Result<Signature> {
        Ok(self.clone())
    }
}

impl Predict {
    /// A predictor for `signature` (a string like `"question -> answer"` or a [`Signature`]).
    pub fn new(signature: impl IntoSignature) -> Result<Self> {
        Ok(Self {
            signature: signature.into_signature()?,
            demos: vec![],
            config: LmConfig::default(),
            compiled: false,
            id: next_id(),
        })
    }

    /// Sets this predictor's LM settings.
    pub fn with_config(mut self, config: LmConfig) -> Self {
        self.config = config;
        self
    }

    /// This predictor's identity in traces (copies get new ids).
    pub fn id(&self) -> u64 {
        self.id
    }

    fn request(&self, ctx: &Context) -> LmRequest {
        let c = self.config.over(&ctx.lm_config);
        let n = c.n.unwrap_or(1);
        // DSPy: with n > 1 and an unset or low temperature, sample at 0.7.
        let temperature = match c.temperature {
            t if n > 1 && t.is_none_or(|t| t <= 0.15) => Some(0.7),
            t => t,
        };
        LmRequest {
            messages: vec![],
            n,
            temperature,
            max_tokens: c.max_tokens,
            stop: c.stop,
            seed: c.seed,
            rollout_id: c.rollout_id,
            json_object: false,
        }
    }

    /// Runs several inputs with one batched LM call (faster with [`LocalLm`](super::LocalLm));
    /// a completion that does not parse is retried alone (and may fall back to JSON).
    pub fn forward_batch(&self, ctx: &Context, inputs: &[Example]) -> Vec<Result<Prediction>> {
        let template = self.request(ctx);
        let requests: Vec<LmRequest> = inputs
            .iter()
            .map(|x| LmRequest {
                messages: ctx.adapter.format(&self.signature, &self.demos, x),
                ..template.clone()
            })
            .collect();
        let responses = match ctx.lm.complete_batch(&requests) {
            Ok(r) => r,
            Err(e) => {
                let msg = e.to_string();
                return inputs
                    .iter()
                    .map(|_| Err(Error::InvalidArgument(format!("LM batch failed: {msg}"))))
                    .collect();
            }
        };
        inputs
            .iter()
            .zip(responses)
            .map(|(x, resp)| {
                let parsed: std::result::Result<Vec<Example>, _> = resp
                    .choices
                    .iter()
                    .map(|c| ctx.adapter.parse(&self.signature, c))
                    .collect();
                match parsed {
                    Ok(completions) => {
                        ctx.stats().add_call();
                        let pred = Prediction::from_completions(completions);
                        ctx.record(TraceStep {
                            predictor_id: self.id,
                            inputs: x.clone(),
                            prediction: pred.clone(),
                        });
                        Ok(pred)
                    }
                    Err(_) => self.forward(ctx, x),
                }
            })
            .collect()
    }

    /// DSPy's saved state of one predictor.
    pub fn dump_state(&self) -> Value {
        json!({
            "traces": [],
            "train": [],
            "demos": self.demos.iter().map(Example::to_json).collect::<Vec<_>>(),
            "signature": self.signature.dump_state(),
            "lm": Value::Null,
        })
    }

    /// Restores demos and signature instructions/descriptions.
    pub fn load_state(&mut self, state: &Value) -> Result<()> {
        let demos = state["demos"].as_array().ok_or_else(|| {
            Error::InvalidArgument("saved predictor state: `demos` is missing or not a list".into())
        })?;
        self.demos = demos
            .iter()
            .map(Example::from_json)
            .collect::<Result<_>>()?;
        self.signature.load_state(&state["signature"])?;
        Ok(())
    }
}

impl Module for Predict {
    fn forward(&self, ctx: &Context, inputs: &Example) -> Result<Prediction> {
        let request = self.request(ctx);
        let completions = ctx.adapter.call(
            ctx.lm.as_ref(),
            &request,
            &self.signature,
            &self.demos,
            inputs,
            ctx.stats(),
        )?;
        let pred = Prediction::from_completions(completions);
        ctx.record(TraceStep {
            predictor_id: self.id,
            inputs: inputs.clone(),
            prediction: pred.clone(),
        });
        Ok(pred)
    }

    fn named_predictors(&self) -> Vec<(String, &Predict)> {
        vec![("self".into(), self)]
    }

    fn named_predictors_mut(&mut self) -> Vec<(String, &mut Predict)> {
        vec![("self".into(), self)]
    }
}

/// DSPy's `dspy.ChainOfThought`: a [`Predict`] whose signature gains a first output field
/// `reasoning` (description `${reasoning}`), so the model reasons before answering.
#[derive(Debug, Clone, PartialEq)]
pub struct ChainOfThought {
    /// The inner predictor (named `predict` in saved state, as in DSPy).
    pub predict: Predict,
}

impl ChainOfThought {
    /// Chain of thought over `signature`.
    pub fn new(signature: impl IntoSignature) -> Result<Self> {
        let sig = signature.into_signature()?;
        let extended = sig.prepend_output("reasoning", FieldType::Str, None)?;
        Ok(Self {
            predict: Predict::new(extended)?,
        })
    }
}

impl Module for ChainOfThought {
    fn forward(&self, ctx: &Context, inputs: &Example) -> Result<Prediction> {
        self.predict.forward(ctx, inputs)
    }

    fn named_predictors(&self) -> Vec<(String, &Predict)> {
        vec![("predict".into(), &self.predict)]
    }

    fn named_predictors_mut(&mut self) -> Vec<(String, &mut Predict)> {
        vec![("predict".into(), &mut self.predict)]
    }
}
