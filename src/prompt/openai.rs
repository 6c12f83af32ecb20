//! [`OpenAiLm`]: any OpenAI-compatible chat-completions endpoint as an [`Lm`] — a large hosted
//! "teacher" model, vLLM, llama.cpp's server, or this crate's own `qlora serve`.
//!
//! It sends what DSPy 3.4's `dspy.LM("openai/NAME", api_base=...)` sends:
//! `POST {base_url}/chat/completions` with `model`, `messages`, `temperature` and
//! `max_completion_tokens` (when set), `n` (when more than 1), `stop` (when any), `seed` (when
//! set) and `response_format: {"type": "json_object"}` for the JSON fallback. DSPy's
//! `rollout_id` is never sent (it only tells cache entries apart, as in DSPy).
//!
//! ```no_run
//! use qlora::prompt::{Context, Module, OpenAiLm, Predict, Example};
//! // e.g. `qlora serve` on port 8000, or a hosted model with OPENAI_API_KEY set
//! let lm = OpenAiLm::new("http://127.0.0.1:8000/v1", "SmolLM2-135M-Instruct").max_tokens(64);
//! let qa = Predict::new("question -> answer")?;
//! let pred = qa.forward(&Context::new(lm), &Example::new().with("question", "What is 2+2?"))?;
//! # Ok::<(), qlora::Error>(())
//! ```

use std::fmt;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use super::lm::{Lm, LmCall, LmHistory, LmRequest, LmResponse, Usage};
use crate::{Error, Result};

/// An OpenAI-compatible chat-completions client (blocking HTTP through `ureq`, behind the
/// `openai` feature).
///
/// - `base_url`: up to and including `/v1` (`https://api.openai.com/v1`,
///   `http://127.0.0.1:8000/v1`); a trailing slash is ignored;
/// - the API key is read from an environment variable (default `OPENAI_API_KEY`) when the
///   LM is built; without it no `Authorization` header is sent (local servers need none);
/// - defaults as DSPy's `dspy.LM`: temperature and max tokens unset (the server decides)
///   unless set here or by the request; 3 retries of transient failures (connection refused
///   or reset, 408/429/5xx) with exponential backoff; a 600 s overall timeout per call.
///
/// Errors name the URL, the HTTP status and the server's own error message.
pub struct OpenAiLm {
    base_url: String,
    model: String,
    api_key: Option<String>,
    api_key_env: String,
    /// Temperature for requests that leave it unset.
    pub temperature: Option<f64>,
    /// Max tokens for requests that leave it unset.
    pub max_tokens: Option<usize>,
    /// Retries of transient failures (DSPy's `num_retries`, 3).
    pub num_retries: usize,
    timeout: Duration,
    agent: ureq::Agent,
    history: LmHistory,
}

impl fmt::Debug for OpenAiLm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiLm")
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .field("api_key_env", &self.api_key_env)
            .field("api_key_set", &self.api_key.is_some())
            .field("temperature", &self.temperature)
            .field("max_tokens", &self.max_tokens)
            .field("timeout", &self.timeout)
            .finish()
    }
}

fn make_agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .timeout_connect(Some(timeout.min(Duration::from_secs(10))))
        .http_status_as_error(false)
        .build()
        .into()
}

impl OpenAiLm {
    /// A client for `model` at `base_url`, with the key from `OPENAI_API_KEY` if set.
    pub fn new(base_url: &str, model: &str) -> Self {
        let timeout = Duration::from_secs(600);
        let mut lm = Self {
            base_url: base_url.trim_end_matches('/').to_string(),
            model: model.to_string(),
            api_key: None,
            api_key_env: String::new(),
            temperature: None,
            max_tokens: None,
            num_retries: 3,
            timeout,
            agent: make_agent(timeout),
            history: LmHistory::default(),
        };
        lm = lm.api_key_env("OPENAI_API_KEY");
        lm
    }

    /// Reads the key from the environment variable `name` (unset or empty: no key).
    pub fn api_key_env(mut self, name: &str) -> Self {
        self.api_key_env = name.to_string();
        self.api_key = std::env::var(name).ok().filter(|k| !k.is_empty());
        self
    }

    /// Uses this key (e.g. a local server's `--api-key`), whatever the environment says.
    pub fn api_key(mut self, key: &str) -> Self {
        self.api_key = Some(key.to_string());
        self.api_key_env = "(given)".into();
        self
    }

    /// Sets the default temperature.
    pub fn temperature(mut self, t: f64) -> Self {
        self.temperature = Some(t);
        self
    }

    /// Sets the default `max_completion_tokens`.
    pub fn max_tokens(mut self, n: usize) -> Self {
        self.max_tokens = Some(n);
        self
    }

    /// Sets the number of retries of transient failures.
    pub fn num_retries(mut self, n: usize) -> Self {
        self.num_retries = n;
        self
    }

    /// Sets the overall time limit of one HTTP call (connecting: at most 10 s of it).
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self.agent = make_agent(t);
        self
    }

    /// The endpoint requests go to.
    pub fn url(&self) -> String {
        format!("{}/chat/completions", self.base_url)
    }

    /// The base URL.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The JSON body sent for `request` (what DSPy sends for the same call).
    pub fn request_body(&self, request: &LmRequest) -> Value {
        let mut body = Map::new();
        body.insert("model".into(), json!(self.model));
        body.insert(
            "messages".into(),
            Value::Array(
                request
                    .messages
                    .iter()
                    .map(|m| json!({"role": m.role, "content": m.content}))
                    .collect(),
            ),
        );
        if let Some(t) = request.temperature.or(self.temperature) {
            body.insert("temperature".into(), json!(t));
        }
        if let Some(n) = request.max_tokens.or(self.max_tokens) {
            body.insert("max_completion_tokens".into(), json!(n));
        }
        if request.n > 1 {
            body.insert("n".into(), json!(request.n));
        }
        if !request.stop.is_empty() {
            body.insert("stop".into(), json!(request.stop));
        }
        if let Some(s) = request.seed {
            body.insert("seed".into(), json!(s));
        }
        if request.json_object {
            body.insert("response_format".into(), json!({"type": "json_object"}));
        }
        Value::Object(body)
    }

    /// One HTTP exchange: `Ok(Ok(body))` on 2xx, `Ok(Err((status, body)))` on an HTTP error,
    /// `Err((msg, retryable))` when no response came.
    #[allow(clippy::type_complexity)]
    fn post(
        &self,
        body: &str,
    ) -> std::result::Result<std::result::Result<String, (u16, String)>, (String, bool)> {
        let mut req = self
            .agent
            .post(&self.url())
            .header("Content-Type", "application/json");
        if let Some(key) = &self.api_key {
            req = req.header("Authorization", &format!("Bearer {key}"));
        }
        match req.send(body) {
            Ok(mut resp) => {
                let status = resp.status().as_u16();
                let text = resp
                    .body_mut()
                    .read_to_string()
                    .map_err(|e| (format!("reading the response body failed: {e}"), true))?;
                Ok(if (200..300).contains(&status) {
                    Ok(text)
                } else {
                    Err((status, text))
                })
            }
            Err(ureq::Error::Timeout(t)) => Err((
                format!(
                    "no response within {:?} ({t}); raise it with .timeout(...)",
                    self.timeout
                ),
                false,
            )),
            Err(ureq::Error::Io(e)) => Err((
                format!(
                    "cannot connect ({e}); is the server running at {}?",
                    self.base_url
                ),
                true,
            )),
            Err(ureq::Error::ConnectionFailed) | Err(ureq::Error::HostNotFound) => Err((
                format!(
                    "cannot connect; is the server running at {}?",
                    self.base_url
                ),
                true,
            )),
            Err(e) => Err((format!("request failed: {e}"), false)),
        }
    }

    fn error(&self, what: String) -> Error {
        Error::InvalidArgument(format!("LM `{}` at {}: {what}", self.model, self.url()))
    }

    fn http_error(&self, status: u16, body: &str) -> Error {
        let server_message = serde_json::from_str::<Value>(body)
            .ok()
            .and_then(|v| {
                v.pointer("/error/message")
                    .or_else(|| v.get("error"))
                    .or_else(|| v.get("detail"))
                    .or_else(|| v.get("message"))
                    .map(|m| match m {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
            })
            .unwrap_or_else(|| body.chars().take(500).collect());
        let hint = match status {
            401 | 403 => format!(
                " (API key from {}: {})",
                self.api_key_env,
                if self.api_key.is_some() {
                    "set"
                } else {
                    "not set"
                }
            ),
            404 => " (check the model name and that base_url ends in /v1)".to_string(),
            _ => String::new(),
        };
        self.error(format!("HTTP {status}: {server_message}{hint}"))
    }

    fn parse_response(&self, text: &str, request: &LmRequest) -> Result<LmResponse> {
        let bad = |m: &str| self.error(format!("unexpected response ({m}): {}", truncate(text)));
        let v: Value = serde_json::from_str(text).map_err(|_| bad("not JSON"))?;
        let choices = v
            .get("choices")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("no `choices` list"))?;
        let mut indexed: Vec<(usize, String)> = vec![];
        for (i, c) in choices.iter().enumerate() {
            let index = c
                .get("index")
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .unwrap_or(i);
            let content = match c.pointer("/message/content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(other) => other.to_string(),
            };
            indexed.push((index, content));
        }
        indexed.sort_by_key(|(i, _)| *i);
        let texts: Vec<String> = indexed.into_iter().map(|(_, c)| c).collect();
        if texts.len() < request.n.max(1) {
            return Err(bad(&format!(
                "{} choices for n = {}",
                texts.len(),
                request.n
            )));
        }
        let usage = v.get("usage");
        let count = |k: &str| {
            usage
                .and_then(|u| u.get(k))
                .and_then(Value::as_u64)
                .unwrap_or(0) as usize
        };
        Ok(LmResponse {
            choices: texts,
            usage: Usage {
                prompt_tokens: count("prompt_tokens"),
                completion_tokens: count("completion_tokens"),
            },
            model: v
                .get("model")
                .and_then(Value::as_str)
                .unwrap_or(&self.model)
                .to_string(),
            cached: false,
        })
    }
}

fn truncate(s: &str) -> String {
    let t: String = s.chars().take(300).collect();
    if t.len() < s.len() {
        format!("{t}…")
    } else {
        t
    }
}

fn transient(status: u16) -> bool {
    matches!(status, 408 | 409 | 429) || status >= 500
}

impl Lm for OpenAiLm {
    fn model_name(&self) -> String {
        self.model.clone()
    }

    fn complete(&self, request: &LmRequest) -> Result<LmResponse> {
        if request.n == 0 {
            return Err(Error::InvalidArgument(
                "n must be at least 1 completion".into(),
            ));
        }
        let start = Instant::now();
        let body = self.request_body(request).to_string();
        let mut attempt = 0;
        let text = loop {
            let outcome = self.post(&body);
            let retry = match &outcome {
                Ok(Ok(_)) => false,
                Ok(Err((status, _))) => transient(*status),
                // Refused or dropped connections are retried, as the openai SDK does;
                // a timeout is not (it already waited the whole limit).
                Err((_, retryable)) => *retryable,
            };
            if retry && attempt < self.num_retries {
                attempt += 1;
                std::thread::sleep(Duration::from_millis(250 << attempt.min(6)));
                continue;
            }
            match outcome {
                Ok(Ok(text)) => break text,
                Ok(Err((status, text))) => return Err(self.http_error(status, &text)),
                Err((msg, _)) => {
                    let tries = if attempt > 0 {
                        format!(" (after {} attempts)", attempt + 1)
                    } else {
                        String::new()
                    };
                    return Err(self.error(format!("{msg}{tries}")));
                }
            }
        };
        let response = self.parse_response(&text, request)?;
        self.history.record(LmCall {
            request: request.clone(),
            response: response.clone(),
            millis: start.elapsed().as_millis() as u64,
        });
        Ok(response)
    }

    /// Requests go out concurrently (up to 8 at a time), so a batching server such as
    /// `qlora serve` can generate them together.
    fn complete_batch(&self, requests: &[LmRequest]) -> Result<Vec<LmResponse>> {
        if requests.len() <= 1 {
            return requests.iter().map(|r| self.complete(r)).collect();
        }
        let mut out = Vec::with_capacity(requests.len());
        for chunk in requests.chunks(8) {
            let results: Vec<Result<LmResponse>> = std::thread::scope(|s| {
                let handles: Vec<_> = chunk
                    .iter()
                    .map(|r| s.spawn(move || self.complete(r)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            Err(Error::InvalidArgument(
                                "an LM request thread panicked".into(),
                            ))
                        })
                    })
                    .collect()
            });
            for r in results {
                out.push(r?);
            }
        }
        Ok(out)
    }

    fn history_log(&self) -> Option<&LmHistory> {
        Some(&self.history)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Message;

    #[test]
    fn body_is_what_dspy_sends() {
        let lm = OpenAiLm::new("http://x/v1/", "m").api_key("k");
        assert_eq!(lm.url(), "http://x/v1/chat/completions");
        let mut r = LmRequest::new(vec![Message::user("hi")]);
        assert_eq!(
            lm.request_body(&r),
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        );
        r.temperature = Some(0.0);
        r.max_tokens = Some(7);
        r.n = 2;
        r.stop = vec!["\n".into()];
        r.rollout_id = Some(3);
        r.json_object = true;
        assert_eq!(
            lm.request_body(&r),
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                   "temperature": 0.0, "max_completion_tokens": 7, "n": 2, "stop": ["\n"],
                   "response_format": {"type": "json_object"}})
        );
    }

    #[test]
    fn parses_choices_in_index_order_and_usage() {
        let lm = OpenAiLm::new("http://x/v1", "m");
        let mut r = LmRequest::new(vec![]);
        r.n = 2;
        let text = r#"{"model":"srv","choices":[{"index":1,"message":{"content":"b"}},{"index":0,"message":{"content":"a"}}],"usage":{"prompt_tokens":5,"completion_tokens":2}}"#;
        let resp = lm.parse_response(text, &r).unwrap();
        assert_eq!(resp.choices, ["a", "b"]);
        assert_eq!(resp.usage.prompt_tokens, 5);
        assert_eq!(resp.model, "srv");
        let err = lm.parse_response("{}", &r).unwrap_err().to_string();
        assert!(err.contains("no `choices`"), "{err}");
    }

    #[test]
    fn http_errors_name_url_status_and_message() {
        let lm = OpenAiLm::new("http://x/v1", "m").api_key_env("QLORA_TEST_SURELY_UNSET_KEY");
        let e = lm
            .http_error(401, r#"{"error":{"message":"bad key","type":"x"}}"#)
            .to_string();
        assert!(
            e.contains("http://x/v1/chat/completions")
                && e.contains("HTTP 401")
                && e.contains("bad key")
                && e.contains("QLORA_TEST_SURELY_UNSET_KEY: not set"),
            "{e}"
        );
        let e = lm.http_error(502, "Bad Gateway").to_string();
        assert!(e.contains("HTTP 502: Bad Gateway"), "{e}");
    }
}
