//! Language models for prompt programs: chat messages in, completions out.
//!
//! - [`LocalLm`]: the in-process [`Model`], with or without a LoRA adapter ([`PeftModel`]),
//!   batched generation for several requests at once;
//! - [`CachedLm`]: an on-disk cache in front of any LM, keyed by the whole request (as DSPy's
//!   cache is), so re-running a notebook costs nothing;
//! - [`ScriptedLm`]: canned replies by rule, for tests and teaching (DSPy's `DummyLM`).
//!
//! Every LM keeps a [`LmHistory`] of its calls; `lm.history(3)` shows the last three in a
//! notebook, like `dspy.inspect_history(3)`.
//!
//! ```
//! use qlora::prompt::{Lm, LmRequest, ScriptedLm};
//! use qlora::model::Message;
//! let lm = ScriptedLm::new(|req: &LmRequest| format!("echo: {}", req.messages.last().unwrap().content));
//! let out = lm.complete(&LmRequest::new(vec![Message::user("hi")]))?;
//! assert_eq!(out.choices, ["echo: hi"]);
//! assert_eq!(lm.history(1).calls.len(), 1);
//! # Ok::<(), qlora::Error>(())
//! ```

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::display::{emit_html, escape_html};
use crate::generate::{GenerationConfig, PrefixCache, PrefixCacheStats};
use crate::lora::PeftModel;
use crate::model::{Message, Model};
use crate::{Error, Result};

/// One request to an LM (OpenAI's chat-completions parameters that matter here).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LmRequest {
    /// The conversation.
    pub messages: Vec<Message>,
    /// Completions wanted (`n`).
    pub n: usize,
    /// Sampling temperature; `None` uses the LM's default (0 = greedy for [`LocalLm`]).
    pub temperature: Option<f64>,
    /// Tokens to generate at most; `None` uses the LM's default.
    pub max_tokens: Option<usize>,
    /// Generation stops before any of these strings.
    pub stop: Vec<String>,
    /// Sampling seed; `None` uses the LM's default.
    pub seed: Option<u64>,
    /// DSPy's `rollout_id`: distinguishes otherwise equal requests (cache key; for
    /// [`LocalLm`] it also shifts the sampling seed).
    pub rollout_id: Option<u64>,
    /// Ask for a JSON object (OpenAI's `response_format: {"type": "json_object"}`); the local
    /// model has no constrained decoding and ignores it.
    pub json_object: bool,
}

impl LmRequest {
    /// A request for one completion with the LM's defaults.
    pub fn new(messages: Vec<Message>) -> Self {
        Self {
            messages,
            n: 1,
            temperature: None,
            max_tokens: None,
            stop: vec![],
            seed: None,
            rollout_id: None,
            json_object: false,
        }
    }

    /// A stable 128-bit hex digest of the request (the cache key).
    pub fn cache_key(&self) -> String {
        let text = serde_json::to_string(self).expect("a request serialises");
        let h1 = fnv1a(text.as_bytes(), 0xcbf2_9ce4_8422_2325);
        let h2 = fnv1a(text.as_bytes(), 0x8422_2325_cbf2_9ce4 ^ text.len() as u64);
        format!("{h1:016x}{h2:016x}")
    }
}

fn fnv1a(bytes: &[u8], seed: u64) -> u64 {
    let mut h = seed;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Token counts of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens in the prompt (per completion, summed over completions).
    pub prompt_tokens: usize,
    /// Tokens generated (summed over completions).
    pub completion_tokens: usize,
}

/// What an LM returned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LmResponse {
    /// One text per requested completion.
    pub choices: Vec<String>,
    /// Token counts.
    pub usage: Usage,
    /// The model that answered.
    pub model: String,
    /// Whether this came from a cache.
    #[serde(default)]
    pub cached: bool,
}

/// A language model: chat messages in, completions out. Implementations must be usable from
/// several threads at once (`Evaluate` runs examples in parallel).
pub trait Lm: Send + Sync {
    /// The model's name (shown in history and reports).
    fn model_name(&self) -> String;

    /// Answers one request.
    fn complete(&self, request: &LmRequest) -> Result<LmResponse>;

    /// Answers several requests; implementations may batch them (the default answers one by
    /// one).
    fn complete_batch(&self, requests: &[LmRequest]) -> Result<Vec<LmResponse>> {
        requests.iter().map(|r| self.complete(r)).collect()
    }

    /// The log of calls, when the LM keeps one.
    fn history_log(&self) -> Option<&LmHistory> {
        None
    }

    /// The last `n` calls, for a notebook (DSPy's `inspect_history(n)`).
    fn history(&self, n: usize) -> History {
        self.history_log().map(|h| h.last(n)).unwrap_or_default()
    }
}

impl<T: Lm + ?Sized> Lm for Arc<T> {
    fn model_name(&self) -> String {
        (**self).model_name()
    }
    fn complete(&self, request: &LmRequest) -> Result<LmResponse> {
        (**self).complete(request)
    }
    fn complete_batch(&self, requests: &[LmRequest]) -> Result<Vec<LmResponse>> {
        (**self).complete_batch(requests)
    }
    fn history_log(&self) -> Option<&LmHistory> {
        (**self).history_log()
    }
}

// ---------------------------------------------------------------------------------------------
// History

/// One logged call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LmCall {
    /// The request.
    pub request: LmRequest,
    /// The response.
    pub response: LmResponse,
    /// Wall time of the call, in milliseconds.
    pub millis: u64,
}

/// A bounded log of an LM's calls (the oldest are dropped past `capacity`; DSPy keeps 10 000).
#[derive(Debug)]
pub struct LmHistory {
    calls: Mutex<VecDeque<LmCall>>,
    capacity: usize,
}

impl Default for LmHistory {
    fn default() -> Self {
        Self::new(10_000)
    }
}

impl LmHistory {
    /// A log keeping the last `capacity` calls.
    pub fn new(capacity: usize) -> Self {
        Self {
            calls: Mutex::new(VecDeque::new()),
            capacity,
        }
    }

    /// Appends a call.
    pub fn record(&self, call: LmCall) {
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        calls.push_back(call);
        while calls.len() > self.capacity {
            calls.pop_front();
        }
    }

    /// The last `n` calls, oldest first.
    pub fn last(&self, n: usize) -> History {
        let calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        let skip = calls.len().saturating_sub(n);
        History {
            calls: calls.iter().skip(skip).cloned().collect(),
        }
    }

    /// Number of calls logged.
    pub fn len(&self) -> usize {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether nothing is logged.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every call.
    pub fn clear(&self) {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// A snapshot of calls, shown as a conversation in a notebook.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    /// The calls, oldest first.
    pub calls: Vec<LmCall>,
}

impl History {
    /// HTML: each call's messages by role, then the completions.
    pub fn to_html(&self) -> String {
        let mut html = String::new();
        for (i, call) in self.calls.iter().enumerate() {
            html.push_str(&format!(
                "<div style=\"margin:8px 0;border-left:3px solid #888;padding-left:8px\">\
                 <div style=\"font-weight:bold\">call {} · {} · {} ms · {} prompt + {} completion tokens{}</div>",
                i + 1,
                escape_html(&call.response.model),
                call.millis,
                call.response.usage.prompt_tokens,
                call.response.usage.completion_tokens,
                if call.response.cached { " · cached" } else { "" }
            ));
            for m in &call.request.messages {
                let color = match m.role.as_str() {
                    "system" => "#6a737d",
                    "user" => "#0366d6",
                    _ => "#28a745",
                };
                html.push_str(&format!(
                    "<div style=\"color:{color};font-weight:bold\">{}</div>\
                     <pre style=\"white-space:pre-wrap;margin:0 0 6px 0\">{}</pre>",
                    escape_html(&m.role),
                    escape_html(&m.content)
                ));
            }
            for (j, c) in call.response.choices.iter().enumerate() {
                html.push_str(&format!(
                    "<div style=\"color:#d73a49;font-weight:bold\">response{}</div>\
                     <pre style=\"white-space:pre-wrap;margin:0 0 6px 0;background:#f6f8fa\">{}</pre>",
                    if call.response.choices.len() > 1 {
                        format!(" {}", j + 1)
                    } else {
                        String::new()
                    },
                    escape_html(c)
                ));
            }
            html.push_str("</div>");
        }
        if self.calls.is_empty() {
            html.push_str("<i>no calls</i>");
        }
        html
    }

    /// Shows the calls in a notebook.
    pub fn evcxr_display(&self) {
        emit_html(&self.to_html());
    }
}

impl fmt::Display for History {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for call in &self.calls {
            writeln!(f, "[{}]", call.response.model)?;
            for m in &call.request.messages {
                writeln!(f, "{} message:\n\n{}\n", m.role, m.content)?;
            }
            for c in &call.response.choices {
                writeln!(f, "Response:\n\n{c}\n")?;
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// LocalLm

/// Prompts whose keys and values a [`LocalLm`] keeps (a teacher's and a student's prompt,
/// with room to spare).
const PREFIX_CACHE_PROMPTS: usize = 4;

#[derive(Debug)]
enum Backend {
    Base(Arc<Model>),
    Adapted(Arc<PeftModel>),
}

/// The in-process model as an LM — the seed's `FineTunedLLM(dspy.LM)`. Messages go through
/// the model's chat template; `complete_batch` generates several requests in one batch; a
/// single request starts from the cached keys and values of the longest prompt beginning it
/// shares with a recent one ([`LocalLm::prefix_cache`]); generation records no gradient graph.
///
/// Defaults: greedy (temperature 0), 256 new tokens, seed 42; a request's own values win.
///
/// ```no_run
/// use qlora::prompt::{LocalLm, Lm, LmRequest};
/// use qlora::model::{Message, Model};
/// let lm = LocalLm::new(Model::load("default")?).max_tokens(64);
/// let out = lm.complete(&LmRequest::new(vec![Message::user("Say hi")]))?;
/// println!("{}", out.choices[0]);
/// # Ok::<(), qlora::Error>(())
/// ```
#[derive(Debug)]
pub struct LocalLm {
    backend: Backend,
    name: String,
    /// Default generation settings for requests that leave them unset.
    pub defaults: GenerationConfig,
    history: LmHistory,
    prefixes: Option<PrefixCache>,
}

impl LocalLm {
    /// The base model.
    pub fn new(model: Model) -> Self {
        Self::from_arc(Arc::new(model))
    }

    /// A shared base model.
    pub fn from_arc(model: Arc<Model>) -> Self {
        let name = model.name.clone();
        Self {
            backend: Backend::Base(model),
            name,
            defaults: GenerationConfig::greedy(256),
            history: LmHistory::default(),
            prefixes: Some(PrefixCache::new(PREFIX_CACHE_PROMPTS)),
        }
    }

    /// A model with its (active) LoRA adapter, e.g. after fine-tuning.
    pub fn with_adapter(peft: PeftModel) -> Self {
        Self::from_peft_arc(Arc::new(peft))
    }

    /// A shared adapted model.
    pub fn from_peft_arc(peft: Arc<PeftModel>) -> Self {
        let name = format!("{}+{}", peft.model().name, peft.active_adapter());
        Self {
            backend: Backend::Adapted(peft),
            name,
            defaults: GenerationConfig::greedy(256),
            history: LmHistory::default(),
            prefixes: Some(PrefixCache::new(PREFIX_CACHE_PROMPTS)),
        }
    }

    /// Sets the default number of new tokens.
    pub fn max_tokens(mut self, n: usize) -> Self {
        self.defaults.max_new_tokens = n;
        self
    }

    /// Sets the default temperature.
    pub fn temperature(mut self, t: f64) -> Self {
        self.defaults.temperature = t;
        self
    }

    /// Renames the LM (for history and reports).
    pub fn named(mut self, name: &str) -> Self {
        self.name = name.to_string();
        self
    }

    /// Turns the reuse of shared prompt beginnings on (the default) or off. On, a single
    /// request runs only the tokens after the longest beginning it shares with one of the
    /// last prompts (the signature's system message and the demos): an evaluation with
    /// 16 demos runs several times faster. Outputs agree with a fresh run except at
    /// near-ties of greedy decoding (see [`PrefixCache`]).
    pub fn prefix_cache(mut self, on: bool) -> Self {
        self.prefixes = on.then(|| PrefixCache::new(PREFIX_CACHE_PROMPTS));
        self
    }

    /// What the prefix cache saved (`None` when it is off).
    pub fn prefix_cache_stats(&self) -> Option<PrefixCacheStats> {
        self.prefixes.as_ref().map(PrefixCache::stats)
    }

    /// The model that generates (with adapters attached when there are any).
    pub fn model(&self) -> &Model {
        match &self.backend {
            Backend::Base(m) => m,
            Backend::Adapted(p) => p.model(),
        }
    }

    fn config_for(&self, r: &LmRequest) -> GenerationConfig {
        let mut c = self.defaults.clone();
        if let Some(t) = r.temperature {
            c.temperature = t;
        }
        if let Some(n) = r.max_tokens {
            c.max_new_tokens = n;
        }
        if let Some(s) = r.seed {
            c.seed = s;
        }
        if let Some(id) = r.rollout_id {
            c.seed = c.seed.wrapping_add(id.wrapping_mul(1_000_003));
        }
        c.stop.extend(r.stop.iter().cloned());
        c
    }
}

impl Lm for LocalLm {
    fn model_name(&self) -> String {
        self.name.clone()
    }

    fn complete(&self, request: &LmRequest) -> Result<LmResponse> {
        Ok(self
            .complete_batch(std::slice::from_ref(request))?
            .remove(0))
    }

    /// Requests with the same generation settings are generated together (one row per
    /// requested completion; rows get seeds `seed, seed+1, ...`).
    fn complete_batch(&self, requests: &[LmRequest]) -> Result<Vec<LmResponse>> {
        let start = Instant::now();
        let mut responses: Vec<Option<LmResponse>> = vec![None; requests.len()];
        // Group by generation settings.
        let mut groups: Vec<(GenerationConfig, Vec<usize>)> = vec![];
        for (i, r) in requests.iter().enumerate() {
            if r.n == 0 {
                return Err(Error::InvalidArgument(
                    "n must be at least 1 completion".into(),
                ));
            }
            let c = self.config_for(r);
            match groups.iter_mut().find(|(g, _)| *g == c) {
                Some((_, members)) => members.push(i),
                None => groups.push((c, vec![i])),
            }
        }
        for (config, members) in groups {
            let mut conversations = vec![];
            let mut owner = vec![];
            for &i in &members {
                for _ in 0..requests[i].n {
                    conversations.push(requests[i].messages.clone());
                    owner.push(i);
                }
            }
            let outputs = match &self.prefixes {
                Some(p) if conversations.len() == 1 => {
                    vec![self
                        .model()
                        .generate_chat_reusing(&conversations[0], &config, p)?]
                }
                _ => self.model().generate_chat_batch(&conversations, &config)?,
            };
            for (out, &i) in outputs.into_iter().zip(&owner) {
                let resp = responses[i].get_or_insert_with(|| LmResponse {
                    choices: vec![],
                    usage: Usage::default(),
                    model: self.name.clone(),
                    cached: false,
                });
                resp.usage.prompt_tokens += out.prompt_tokens;
                resp.usage.completion_tokens += out.token_ids.len();
                resp.choices.push(out.text);
            }
        }
        let millis = start.elapsed().as_millis() as u64 / requests.len().max(1) as u64;
        let responses: Vec<LmResponse> = responses.into_iter().map(|r| r.unwrap()).collect();
        for (req, resp) in requests.iter().zip(&responses) {
            self.history.record(LmCall {
                request: req.clone(),
                response: resp.clone(),
                millis,
            });
        }
        Ok(responses)
    }

    fn history_log(&self) -> Option<&LmHistory> {
        Some(&self.history)
    }
}

// ---------------------------------------------------------------------------------------------
// CachedLm

/// A cache in front of another LM: a response is stored on disk (one JSON file per request
/// under `dir`, named by [`LmRequest::cache_key`]) and in memory, and an equal request later
/// is answered from it — DSPy's cache, which keys on the whole request. Every field of the
/// request takes part, so sampled requests are cached per seed and `rollout_id` (the local
/// model is deterministic given them).
///
/// ```no_run
/// use qlora::prompt::{CachedLm, LocalLm};
/// use qlora::model::Model;
/// let lm = CachedLm::new(LocalLm::new(Model::load("default")?), "target/lm-cache")?;
/// # Ok::<(), qlora::Error>(())
/// ```
pub struct CachedLm<L: Lm> {
    inner: L,
    dir: PathBuf,
    memory: Mutex<HashMap<String, LmResponse>>,
    hits: AtomicUsize,
    misses: AtomicUsize,
    history: LmHistory,
}

#[derive(Serialize, Deserialize)]
struct CacheEntry {
    request: LmRequest,
    response: LmResponse,
}

impl<L: Lm> CachedLm<L> {
    /// Wraps `inner`, caching under `dir` (created if missing).
    pub fn new(inner: L, dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        Ok(Self {
            inner,
            dir,
            memory: Mutex::new(HashMap::new()),
            hits: AtomicUsize::new(0),
            misses: AtomicUsize::new(0),
            history: LmHistory::default(),
        })
    }

    /// The wrapped LM.
    pub fn inner(&self) -> &L {
        &self.inner
    }

    /// (hits, misses) so far.
    pub fn stats(&self) -> (usize, usize) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.json"))
    }

    fn lookup(&self, request: &LmRequest) -> Option<LmResponse> {
        let key = request.cache_key();
        if let Some(r) = self
            .memory
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Some(r.clone());
        }
        let text = std::fs::read_to_string(self.path(&key)).ok()?;
        let entry: CacheEntry = serde_json::from_str(&text).ok()?;
        // A different request with the same digest is a miss, never a wrong answer.
        (entry.request == *request).then_some(entry.response)
    }

    fn store(&self, request: &LmRequest, response: &LmResponse) -> Result<()> {
        let key = request.cache_key();
        let path = self.path(&key);
        let entry = CacheEntry {
            request: request.clone(),
            response: response.clone(),
        };
        let text = serde_json::to_string(&entry).expect("cache entries serialise");
        let tmp = self.dir.join(format!(".{key}.{}.tmp", std::process::id()));
        std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        self.memory
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, response.clone());
        Ok(())
    }
}

impl<L: Lm> Lm for CachedLm<L> {
    fn model_name(&self) -> String {
        self.inner.model_name()
    }

    fn complete(&self, request: &LmRequest) -> Result<LmResponse> {
        Ok(self
            .complete_batch(std::slice::from_ref(request))?
            .remove(0))
    }

    fn complete_batch(&self, requests: &[LmRequest]) -> Result<Vec<LmResponse>> {
        let start = Instant::now();
        let mut out: Vec<Option<LmResponse>> = requests.iter().map(|r| self.lookup(r)).collect();
        let missing: Vec<usize> = (0..requests.len()).filter(|&i| out[i].is_none()).collect();
        self.hits
            .fetch_add(requests.len() - missing.len(), Ordering::Relaxed);
        self.misses.fetch_add(missing.len(), Ordering::Relaxed);
        for r in out.iter_mut().flatten() {
            r.cached = true;
        }
        if !missing.is_empty() {
            let todo: Vec<LmRequest> = missing.iter().map(|&i| requests[i].clone()).collect();
            let fresh = self.inner.complete_batch(&todo)?;
            for (&i, resp) in missing.iter().zip(fresh) {
                self.store(&requests[i], &resp)?;
                out[i] = Some(resp);
            }
        }
        let millis = start.elapsed().as_millis() as u64;
        let out: Vec<LmResponse> = out.into_iter().map(|r| r.unwrap()).collect();
        for (req, resp) in requests.iter().zip(&out) {
            self.history.record(LmCall {
                request: req.clone(),
                response: resp.clone(),
                millis,
            });
        }
        Ok(out)
    }

    fn history_log(&self) -> Option<&LmHistory> {
        Some(&self.history)
    }
}

// ---------------------------------------------------------------------------------------------
// ScriptedLm

type ReplyFn = dyn Fn(&LmRequest) -> String + Send + Sync;

/// An LM whose replies come from a closure — for tests, examples and teaching, like DSPy's
/// `DummyLM`. Each of the `n` completions is the closure's reply.
///
/// ```
/// use qlora::prompt::{ChainOfThought, Context, Example, Module, ScriptedLm};
/// // DummyLM's dictionary mode: the first key found in the last message picks the answer.
/// let lm = ScriptedLm::answers_by_substring(vec![
///     ("2+2", vec![("reasoning", "Two and two."), ("answer", "4")]),
/// ]);
/// let cot = ChainOfThought::new("question -> answer")?;
/// let ctx = Context::new(lm);
/// let pred = cot.forward(&ctx, &Example::new().with("question", "What is 2+2?"))?;
/// assert_eq!(pred.get_str("answer").as_deref(), Some("4"));
/// # Ok::<(), qlora::Error>(())
/// ```
pub struct ScriptedLm {
    reply: Box<ReplyFn>,
    name: String,
    history: LmHistory,
}

impl fmt::Debug for ScriptedLm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScriptedLm")
            .field("name", &self.name)
            .finish()
    }
}

impl ScriptedLm {
    /// Replies with `reply(request)`.
    pub fn new(reply: impl Fn(&LmRequest) -> String + Send + Sync + 'static) -> Self {
        Self {
            reply: Box::new(reply),
            name: "scripted".into(),
            history: LmHistory::default(),
        }
    }

    /// DSPy's `DummyLM({...})`: the first `(key, fields)` whose key occurs in the last
    /// message is answered with those fields in `[[ ## field ## ]]` form; otherwise
    /// `[[ ## answer ## ]]\nNo more responses`.
    pub fn answers_by_substring<K: Into<String>, F: Into<String>, V: Into<String>>(
        answers: Vec<(K, Vec<(F, V)>)>,
    ) -> Self {
        let answers: Vec<(String, Vec<(String, String)>)> = answers
            .into_iter()
            .map(|(k, fs)| {
                (
                    k.into(),
                    fs.into_iter().map(|(f, v)| (f.into(), v.into())).collect(),
                )
            })
            .collect();
        Self::new(move |req| {
            let last = req
                .messages
                .last()
                .map(|m| m.content.as_str())
                .unwrap_or("");
            match answers.iter().find(|(k, _)| last.contains(k.as_str())) {
                Some((_, fields)) => format_fields(fields),
                None => "[[ ## answer ## ]]\nNo more responses".into(),
            }
        })
    }

    /// Renames the LM.
    pub fn named(mut self, name: &str) -> Self {
        self.name = name.to_string();
        self
    }
}

/// `[[ ## name ## ]]\nvalue` sections joined by blank lines — how DummyLM answers.
pub fn format_fields<K: AsRef<str>, V: AsRef<str>>(fields: &[(K, V)]) -> String {
    fields
        .iter()
        .map(|(k, v)| format!("[[ ## {} ## ]]\n{}", k.as_ref(), v.as_ref()))
        .collect::<Vec<_>>()
        .join("\n\n")
        .trim()
        .to_string()
}

impl Lm for ScriptedLm {
    fn model_name(&self) -> String {
        self.name.clone()
    }

    fn complete(&self, request: &LmRequest) -> Result<LmResponse> {
        let choices: Vec<String> = (0..request.n.max(1))
            .map(|_| (self.reply)(request))
            .collect();
        let prompt_chars: usize = request.messages.iter().map(|m| m.content.len()).sum();
        let response = LmResponse {
            usage: Usage {
                prompt_tokens: prompt_chars / 4,
                completion_tokens: choices.iter().map(|c| c.len() / 4).sum(),
            },
            choices,
            model: self.name.clone(),
            cached: false,
        };
        self.history.record(LmCall {
            request: request.clone(),
            response: response.clone(),
            millis: 0,
        });
        Ok(response)
    }

    fn history_log(&self) -> Option<&LmHistory> {
        Some(&self.history)
    }
}
