//! The OpenAI wire format: requests read field by field (so every error names its `param`),
//! responses and errors shaped as OpenAI's clients expect.

use serde_json::{json, Map, Value};

use crate::model::Message;

/// An error as OpenAI returns it: HTTP status + `{"error": {message, type, param, code}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400 for a bad field.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.into()),
            code: None,
        }
    }

    /// An error with no particular field.
    pub fn new(
        status: u16,
        kind: &'static str,
        code: Option<&'static str>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// The generation parameters both endpoints share, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// `max_completion_tokens`, else `max_tokens`; `None`: until the context is full.
    pub max_tokens: Option<usize>,
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub n: usize,
    pub stop: Vec<String>,
    pub seed: Option<u64>,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk carrying `usage`.
    pub include_usage: bool,
}

/// A parsed `POST /v1/chat/completions` body.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<Message>,
    pub sampling: Sampling,
}

/// A parsed `POST /v1/completions` body (text prompts; token-id prompts are not supported).
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    pub model: String,
    pub prompts: Vec<String>,
    pub sampling: Sampling,
}

/// Most choices one request may ask for.
pub const MAX_N: usize = 16;

/// Reads `body` as a JSON object, naming the position of a syntax error.
pub fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    if body.is_empty() {
        return Err(ApiError::invalid(
            "body",
            "the request body is empty; send a JSON object",
        ));
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid("body", format!("the request body is not valid JSON: {e}"))
    })?;
    match value {
        Value::Object(map) => Ok(map),
        other => Err(ApiError::invalid(
            "body",
            format!(
                "the request body must be a JSON object, got {}",
                kind_of(&other)
            ),
        )),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Typed access to optional fields, each error naming the field.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn string(&self, key: &str) -> Result<Option<String>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(ApiError::invalid(
                key,
                format!("`{key}` must be a string, got {}", kind_of(v)),
            )),
        }
    }

    fn int(&self, key: &str) -> Result<Option<i64>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_i64().map(Some).ok_or_else(|| {
                ApiError::invalid(key, format!("`{key}` must be an integer, got {v}"))
            }),
        }
    }

    fn number(&self, key: &str) -> Result<Option<f64>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                ApiError::invalid(key, format!("`{key}` must be a number, got {v}"))
            }),
        }
    }

    fn boolean(&self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(ApiError::invalid(
                key,
                format!("`{key}` must be true or false, got {v}"),
            )),
        }
    }
}

fn model_field(f: &Fields) -> Result<String, ApiError> {
    match f.string("model")? {
        Some(m) if !m.is_empty() => Ok(m),
        _ => Err(ApiError::invalid(
            "model",
            "`model` is required: the base model's name or an adapter's (see GET /v1/models)",
        )),
    }
}

fn sampling(f: &Fields, default_max_tokens: Option<usize>) -> Result<Sampling, ApiError> {
    let tokens = |key: &str| -> Result<Option<usize>, ApiError> {
        match f.int(key)? {
            None => Ok(None),
            Some(n) if n >= 1 => Ok(Some(n as usize)),
            Some(n) => Err(ApiError::invalid(
                key,
                format!("`{key}` must be at least 1, got {n}"),
            )),
        }
    };
    // DSPy 3.4 sends max_completion_tokens; older clients max_tokens. Both are checked.
    let max_completion = tokens("max_completion_tokens")?;
    let max_tokens = tokens("max_tokens")?;
    let temperature = f.number("temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            "temperature",
            format!("`temperature` must be between 0 and 2, got {temperature}"),
        ));
    }
    let top_p = f.number("top_p")?;
    if let Some(p) = top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::invalid(
                "top_p",
                format!("`top_p` must be in (0, 1], got {p}"),
            ));
        }
    }
    let n = match f.int("n")? {
        None => 1,
        Some(n) if (1..=MAX_N as i64).contains(&n) => n as usize,
        Some(n) => {
            return Err(ApiError::invalid(
                "n",
                format!("`n` must be between 1 and {MAX_N}, got {n}"),
            ))
        }
    };
    let stop = match f.get("stop") {
        None => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => {
            if items.len() > 4 {
                return Err(ApiError::invalid(
                    "stop",
                    format!("`stop` takes at most 4 sequences, got {}", items.len()),
                ));
            }
            items
                .iter()
                .map(|v| {
                    v.as_str().map(str::to_string).ok_or_else(|| {
                        ApiError::invalid("stop", format!("`stop` items must be strings, got {v}"))
                    })
                })
                .collect::<Result<_, _>>()?
        }
        Some(v) => {
            return Err(ApiError::invalid(
                "stop",
                format!(
                    "`stop` must be a string or a list of strings, got {}",
                    kind_of(v)
                ),
            ))
        }
    };
    let seed = f.int("seed")?.map(|s| s as u64);
    let stream = f.boolean("stream")?.unwrap_or(false);
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(Value::Object(o)) => Fields(o).boolean("include_usage")?.unwrap_or(false),
        Some(v) => {
            return Err(ApiError::invalid(
                "stream_options",
                format!("`stream_options` must be an object, got {}", kind_of(v)),
            ))
        }
    };
    Ok(Sampling {
        max_tokens: max_completion.or(max_tokens).or(default_max_tokens),
        temperature,
        top_p,
        n,
        stop,
        seed,
        stream,
        include_usage,
    })
}

/// The text of a message's `content`: a string, or a list of parts of which only `text` parts
/// are supported.
fn content_text(v: Option<&Value>, at: usize) -> Result<String, ApiError> {
    let param = format!("messages[{at}].content");
    match v {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (i, part) in parts.iter().enumerate() {
                match (part.get("type").and_then(Value::as_str), part.get("text")) {
                    (Some("text"), Some(Value::String(t))) => text.push_str(t),
                    (kind, _) => {
                        return Err(ApiError::invalid(
                            format!("{param}[{i}]"),
                            format!(
                                "only text content parts are supported, got type {}",
                                kind.unwrap_or("(none)")
                            ),
                        ))
                    }
                }
            }
            Ok(text)
        }
        Some(other) => Err(ApiError::invalid(
            param,
            format!(
                "`content` must be a string or a list of parts, got {}",
                kind_of(other)
            ),
        )),
    }
}

/// Reads a chat request.
pub fn chat_request(
    body: &[u8],
    default_max_tokens: Option<usize>,
) -> Result<ChatRequest, ApiError> {
    let map = parse_object(body)?;
    let f = Fields(&map);
    let model = model_field(&f)?;
    let raw = match f.get("messages") {
        Some(Value::Array(items)) if !items.is_empty() => items,
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid(
                "messages",
                "`messages` is empty; send at least one message",
            ))
        }
        Some(v) => {
            return Err(ApiError::invalid(
                "messages",
                format!("`messages` must be a list of messages, got {}", kind_of(v)),
            ))
        }
        None => return Err(ApiError::invalid("messages", "`messages` is required")),
    };
    let mut messages = Vec::with_capacity(raw.len());
    for (i, m) in raw.iter().enumerate() {
        let Value::Object(obj) = m else {
            return Err(ApiError::invalid(
                format!("messages[{i}]"),
                format!("each message must be an object, got {}", kind_of(m)),
            ));
        };
        let role = match obj.get("role").and_then(Value::as_str) {
            Some("system") | Some("developer") => "system",
            Some("user") => "user",
            Some("assistant") => "assistant",
            Some(other) => {
                return Err(ApiError::invalid(
                    format!("messages[{i}].role"),
                    format!("role `{other}` is not supported (system, developer, user, assistant)"),
                ))
            }
            None => {
                return Err(ApiError::invalid(
                    format!("messages[{i}].role"),
                    "each message needs a `role`",
                ))
            }
        };
        messages.push(Message::new(role, content_text(obj.get("content"), i)?));
    }
    Ok(ChatRequest {
        model,
        messages,
        sampling: sampling(&f, default_max_tokens)?,
    })
}

/// Reads a (legacy) completions request. OpenAI's default `max_tokens` here is 16.
pub fn completion_request(body: &[u8]) -> Result<CompletionRequest, ApiError> {
    let map = parse_object(body)?;
    let f = Fields(&map);
    let model = model_field(&f)?;
    let prompts = match f.get("prompt") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(|v| {
                v.as_str().map(str::to_string).ok_or_else(|| {
                    ApiError::invalid(
                        "prompt",
                        "`prompt` must be a string or a list of strings (token-id prompts are not supported)",
                    )
                })
            })
            .collect::<Result<_, _>>()?,
        None => return Err(ApiError::invalid("prompt", "`prompt` is required")),
        Some(v) => {
            return Err(ApiError::invalid(
                "prompt",
                format!("`prompt` must be a string or a list of strings, got {}", kind_of(v)),
            ))
        }
    };
    if f.boolean("echo")? == Some(true) {
        return Err(ApiError::invalid("echo", "`echo` is not supported"));
    }
    Ok(CompletionRequest {
        model,
        prompts,
        sampling: sampling(&f, Some(16))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_requests_parse_with_openai_defaults() {
        let r = chat_request(
            br#"{"model":"m","messages":[{"role":"developer","content":"be brief"},{"role":"user","content":[{"type":"text","text":"hi"}]}],"max_completion_tokens":5,"max_tokens":9,"stop":"\n"}"#,
            None,
        )
        .unwrap();
        assert_eq!(r.messages[0], Message::system("be brief"));
        assert_eq!(r.messages[1], Message::user("hi"));
        assert_eq!(r.sampling.max_tokens, Some(5), "max_completion_tokens wins");
        assert_eq!(r.sampling.temperature, 1.0);
        assert_eq!(r.sampling.n, 1);
        assert_eq!(r.sampling.stop, vec!["\n".to_string()]);
    }

    #[test]
    fn bad_fields_are_named() {
        let cases: [(&[u8], &str); 9] = [
            (b"{not json", "body"),
            (b"[1]", "body"),
            (br#"{"messages":[{"role":"user","content":"x"}]}"#, "model"),
            (br#"{"model":"m"}"#, "messages"),
            (br#"{"model":"m","messages":[]}"#, "messages"),
            (
                br#"{"model":"m","messages":[{"role":"tool","content":"x"}]}"#,
                "messages[0].role",
            ),
            (
                br#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":-3}"#,
                "max_tokens",
            ),
            (
                br#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":"hot"}"#,
                "temperature",
            ),
            (
                br#"{"model":"m","messages":[{"role":"user","content":"x"}],"n":100}"#,
                "n",
            ),
        ];
        for (body, param) in cases {
            let e = chat_request(body, None).unwrap_err();
            assert_eq!(e.status, 400);
            assert_eq!(
                e.param.as_deref(),
                Some(param),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn completion_requests_default_to_16_tokens() {
        let r = completion_request(br#"{"model":"m","prompt":["a","b"]}"#).unwrap();
        assert_eq!(r.prompts, vec!["a", "b"]);
        assert_eq!(r.sampling.max_tokens, Some(16));
        let e = completion_request(br#"{"model":"m","prompt":[[1,2]]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("prompt"));
    }
}
