//! Adapters turn (signature, demos, inputs) into chat messages and completions back into typed
//! output fields — DSPy 3.4's `ChatAdapter` (the `[[ ## field ## ]]` format, byte-identical
//! messages) and `JSONAdapter` (its fallback when the markers are missing).
//!
//! ```
//! use qlora::prompt::{ChatAdapter, Example, Signature};
//! let sig = Signature::parse("question -> answer")?;
//! let messages = ChatAdapter::new().format(&sig, &[], &Example::new().with("question", "What is 2+2?"));
//! assert_eq!(messages[0].role, "system");
//! assert!(messages[1].content.starts_with("[[ ## question ## ]]\nWhat is 2+2?"));
//! let parsed = ChatAdapter::new().parse(&sig, "[[ ## answer ## ]]\n4\n\n[[ ## completed ## ]]")?;
//! assert_eq!(parsed.get_str("answer").as_deref(), Some("4"));
//! # Ok::<(), qlora::Error>(())
//! ```
//!
//! Small models often break the format. Every parse failure is an [`AdapterParseError`]
//! (an [`Error::AdapterParse`]) and is counted in [`ParseStats`]; nothing is silently
//! replaced by an empty answer.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};

use regex::Regex;
use serde_json::Value;

use super::example::Example;
use super::lm::{Lm, LmRequest};
use super::py::{json_dumps, json_dumps_pairs, py_splitlines, py_str, py_strip};
use super::signature::{Field, FieldRole, FieldType, Signature};
use crate::model::Message;
use crate::{Error, Result};

/// A completion that could not be turned into the signature's output fields (DSPy's
/// `AdapterParseError`).
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterParseError {
    /// `ChatAdapter` or `JSONAdapter`.
    pub adapter: String,
    /// The signature, as `question: str -> answer: str`.
    pub signature: String,
    /// The LM's text.
    pub lm_response: String,
    /// What went wrong.
    pub message: String,
    /// The fields that did parse.
    pub parsed: Example,
}

impl fmt::Display for AdapterParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} failed to parse the LM response for `{}`: {}. Parsed fields: [{}]. LM response: {:?}",
            self.adapter,
            self.signature,
            self.message,
            self.parsed.keys().join(", "),
            self.lm_response
        )
    }
}

impl std::error::Error for AdapterParseError {}

impl From<AdapterParseError> for Error {
    fn from(e: AdapterParseError) -> Self {
        Error::AdapterParse(Box::new(e))
    }
}

/// Counts of how completions parsed, shared by every call made with one
/// [`Context`](super::Context) (so `Evaluate` and optimisers can report them).
#[derive(Debug, Default)]
pub struct ParseStats {
    calls: AtomicUsize,
    chat_failures: AtomicUsize,
    json_recovered: AtomicUsize,
    failures: AtomicUsize,
}

/// A snapshot of [`ParseStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ParseCounts {
    /// Adapter calls (one per predictor call).
    pub calls: usize,
    /// Calls whose `[[ ## field ## ]]` completion did not parse.
    pub chat_failures: usize,
    /// Of those, how many the JSON fallback recovered.
    pub json_recovered: usize,
    /// Calls that ended in an [`AdapterParseError`].
    pub failures: usize,
}

impl ParseStats {
    pub(crate) fn add_call(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
    }

    /// The counts so far.
    pub fn counts(&self) -> ParseCounts {
        ParseCounts {
            calls: self.calls.load(Ordering::Relaxed),
            chat_failures: self.chat_failures.load(Ordering::Relaxed),
            json_recovered: self.json_recovered.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
        }
    }
}

/// Which format the adapter speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    Chat,
    Json,
}

/// DSPy's `ChatAdapter`: `[[ ## field ## ]]` sections, demos as user/assistant turns, and a
/// retry in JSON ([`JsonAdapter`]) when a completion lacks the markers.
#[derive(Debug, Clone)]
pub struct ChatAdapter {
    /// On a parse failure, ask again with JSONAdapter's messages (DSPy's default: true).
    pub use_json_adapter_fallback: bool,
}

impl Default for ChatAdapter {
    fn default() -> Self {
        Self {
            use_json_adapter_fallback: true,
        }
    }
}

/// DSPy's `JSONAdapter`: the same system message with a JSON output structure; the LM
/// answers with one JSON object.
#[derive(Debug, Clone, Default)]
pub struct JsonAdapter;

const INCOMPLETE_DEMO_PREFIX: &str =
    "This is an example of the task, though some input or output fields are not supplied.";
const MISSING_IN_INCOMPLETE_DEMO: &str = "Not supplied for this particular example. ";
const MISSING_IN_COMPLETE_DEMO: &str = "Not supplied for this conversation history message. ";

/// DSPy's `format_field_value`: lists given to a `str` field become a numbered list, other
/// lists and objects JSON, everything else Python's `str()`.
pub fn format_field_value(field: &Field, value: &Value) -> String {
    match value {
        Value::Array(items) if field.ty == FieldType::Str => format_input_list(items),
        Value::Array(_) | Value::Object(_) => json_dumps(value, None),
        other => py_str(other),
    }
}

fn format_input_list(items: &[Value]) -> String {
    match items.len() {
        0 => "N/A".into(),
        1 => format_blob(&py_str(&items[0])),
        _ => items
            .iter()
            .enumerate()
            .map(|(i, v)| format!("[{}] {}", i + 1, format_blob(&py_str(v))))
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

fn format_blob(blob: &str) -> String {
    if !blob.contains('\n') && !blob.contains('«') && !blob.contains('»') {
        return format!("«{blob}»");
    }
    format!("«««\n    {}\n»»»", blob.replace('\n', "\n    "))
}

fn field_placeholder(field: &Field) -> String {
    let note = match field.role {
        FieldRole::Input => None,
        FieldRole::Output => field.ty.output_note(),
    };
    match note {
        Some(n) => format!(
            "{{{}}}        # note: the value you produce {n}",
            field.name
        ),
        None => format!("{{{}}}", field.name),
    }
}

fn field_description_list(fields: &[Field]) -> String {
    let lines: Vec<String> = fields
        .iter()
        .enumerate()
        .map(|(i, f)| {
            format!(
                "{}. `{}` ({}): {}",
                i + 1,
                f.name,
                f.ty.annotation_name(),
                f.desc.clone().unwrap_or_default()
            )
        })
        .collect();
    py_strip(&lines.join("\n")).to_string()
}

/// `[[ ## name ## ]]\nvalue` blocks joined by blank lines (stripped, as DSPy does).
fn sections(pairs: &[(&Field, String)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .map(|(f, v)| format!("[[ ## {} ## ]]\n{v}", f.name))
        .collect();
    py_strip(&parts.join("\n\n")).to_string()
}

fn type_info(f: &Field) -> String {
    if f.ty == FieldType::Str {
        String::new()
    } else {
        format!(
            " (must be formatted as a valid Python {})",
            f.ty.annotation_name()
        )
    }
}

impl Style {
    fn name(self) -> &'static str {
        match self {
            Style::Chat => "ChatAdapter",
            Style::Json => "JSONAdapter",
        }
    }

    fn field_structure(self, sig: &Signature) -> String {
        fn placeholders(fs: &[Field]) -> Vec<(&Field, String)> {
            fs.iter().map(|f| (f, field_placeholder(f))).collect()
        }
        let intro =
            "All interactions will be structured in the following way, with the appropriate values filled in."
                .to_string();
        let parts = match self {
            Style::Chat => vec![
                intro,
                sections(&placeholders(sig.inputs())),
                sections(&placeholders(sig.outputs())),
                "[[ ## completed ## ]]\n".to_string(),
            ],
            Style::Json => {
                let outputs: Vec<(String, Value)> = sig
                    .outputs()
                    .iter()
                    .map(|f| (f.name.clone(), Value::String(field_placeholder(f))))
                    .collect();
                vec![
                    intro,
                    "Inputs will have the following structure:".into(),
                    sections(&placeholders(sig.inputs())),
                    "Outputs will be a JSON object with the following fields.".into(),
                    json_dumps_pairs(&outputs, Some(2)),
                ]
            }
        };
        py_strip(&parts.join("\n\n")).to_string()
    }

    fn system_message(self, sig: &Signature) -> String {
        let description = format!(
            "Your input fields are:\n{}\nYour output fields are:\n{}",
            field_description_list(sig.inputs()),
            field_description_list(sig.outputs())
        );
        let instructions = super::py::dedent(sig.instructions());
        let objective: String = py_splitlines(&instructions)
            .iter()
            .map(|l| format!("\n        {l}"))
            .collect();
        format!(
            "{description}\n{}\nIn adhering to this structure, your objective is: {objective}",
            self.field_structure(sig)
        )
    }

    fn output_requirements(self, sig: &Signature) -> String {
        let fields = |marker: fn(&str) -> String| {
            sig.outputs()
                .iter()
                .map(|f| format!("`{}`{}", marker(&f.name), type_info(f)))
                .collect::<Vec<_>>()
                .join(", then ")
        };
        match self {
            Style::Chat => format!(
                "Respond with the corresponding output fields, starting with the field {}, and then ending with the marker for `[[ ## completed ## ]]`.",
                fields(|name| format!("[[ ## {name} ## ]]"))
            ),
            Style::Json => format!(
                "Respond with a JSON object in the following order of fields: {}.",
                fields(str::to_string)
            ),
        }
    }

    fn user_content(self, sig: &Signature, inputs: &Example, prefix: &str, main: bool) -> String {
        let mut parts = vec![prefix.to_string()];
        for f in sig.inputs() {
            if let Some(v) = inputs.get(&f.name) {
                parts.push(format!(
                    "[[ ## {} ## ]]\n{}",
                    f.name,
                    format_field_value(f, v)
                ));
            }
        }
        if main {
            parts.push(self.output_requirements(sig));
        }
        parts.push(String::new());
        py_strip(&parts.join("\n\n")).to_string()
    }

    fn assistant_content(self, sig: &Signature, outputs: &Example, missing: &str) -> String {
        let missing = Value::String(missing.to_string());
        match self {
            Style::Chat => {
                let pairs: Vec<(&Field, String)> = sig
                    .outputs()
                    .iter()
                    .map(|f| {
                        (
                            f,
                            format_field_value(f, outputs.get(&f.name).unwrap_or(&missing)),
                        )
                    })
                    .collect();
                format!("{}\n\n[[ ## completed ## ]]\n", sections(&pairs))
            }
            Style::Json => {
                let pairs: Vec<(String, Value)> = sig
                    .outputs()
                    .iter()
                    .map(|f| {
                        (
                            f.name.clone(),
                            outputs.get(&f.name).unwrap_or(&missing).clone(),
                        )
                    })
                    .collect();
                json_dumps_pairs(&pairs, Some(2))
            }
        }
    }

    fn format(self, sig: &Signature, demos: &[Example], inputs: &Example) -> Vec<Message> {
        let mut messages = vec![Message::system(self.system_message(sig))];
        let mut complete = Vec::new();
        let mut incomplete = Vec::new();
        for demo in demos {
            let is_complete = sig
                .fields()
                .all(|f| demo.get(&f.name).is_some_and(|v| !v.is_null()));
            let has_input = sig.inputs().iter().any(|f| demo.contains(&f.name));
            let has_output = sig.outputs().iter().any(|f| demo.contains(&f.name));
            if is_complete {
                complete.push(demo);
            } else if has_input && has_output {
                incomplete.push(demo);
            }
        }
        for demo in incomplete {
            messages.push(Message::user(self.user_content(
                sig,
                demo,
                INCOMPLETE_DEMO_PREFIX,
                false,
            )));
            messages.push(Message::assistant(self.assistant_content(
                sig,
                demo,
                MISSING_IN_INCOMPLETE_DEMO,
            )));
        }
        for demo in complete {
            messages.push(Message::user(self.user_content(sig, demo, "", false)));
            messages.push(Message::assistant(self.assistant_content(
                sig,
                demo,
                MISSING_IN_COMPLETE_DEMO,
            )));
        }
        let content = self.user_content(sig, inputs, "", true);
        if !content.is_empty() {
            messages.push(Message::user(content));
        }
        messages
    }

    fn error(self, sig: &Signature, completion: &str, message: String, parsed: Example) -> Error {
        Error::AdapterParse(Box::new(AdapterParseError {
            adapter: self.name().into(),
            signature: sig.to_string(),
            lm_response: completion.to_string(),
            message,
            parsed,
        }))
    }

    fn check_complete(self, sig: &Signature, completion: &str, fields: Example) -> Result<Example> {
        let missing: Vec<&str> = sig
            .outputs()
            .iter()
            .filter(|f| !fields.contains(&f.name))
            .map(|f| f.name.as_str())
            .collect();
        if missing.is_empty() {
            // In signature order.
            Ok(sig
                .outputs()
                .iter()
                .map(|f| (f.name.clone(), fields.get(&f.name).cloned().unwrap()))
                .collect())
        } else {
            Err(self.error(
                sig,
                completion,
                format!("missing output field(s): {}", missing.join(", ")),
                fields,
            ))
        }
    }
}

fn header_regex() -> &'static Regex {
    static RE: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
    RE.get_or_init(|| Regex::new(r"^\[\[ ## (\w+) ## \]\]").unwrap())
}

impl ChatAdapter {
    /// A ChatAdapter with DSPy's defaults (JSON fallback on).
    pub fn new() -> Self {
        Self::default()
    }

    /// The messages for one call: system message, demos as user/assistant pairs (incomplete
    /// demos first, as DSPy orders them), then the inputs with the output reminder —
    /// `dspy.ChatAdapter().format(signature, demos, inputs)`.
    pub fn format(&self, sig: &Signature, demos: &[Example], inputs: &Example) -> Vec<Message> {
        Style::Chat.format(sig, demos, inputs)
    }

    /// The assistant turn DSPy would expect for `outputs` (used for demos and fine-tuning data).
    pub fn format_assistant(&self, sig: &Signature, outputs: &Example) -> String {
        Style::Chat.assistant_content(sig, outputs, MISSING_IN_COMPLETE_DEMO)
    }

    /// Parses a completion's `[[ ## field ## ]]` sections into typed output fields (the first
    /// section of each name counts; text before the first header is ignored).
    pub fn parse(&self, sig: &Signature, completion: &str) -> Result<Example> {
        let mut sections: Vec<(Option<String>, Vec<String>)> = vec![(None, vec![])];
        for line in py_splitlines(completion) {
            let stripped = py_strip(line);
            if let Some(m) = header_regex().captures(stripped) {
                let header = m[1].to_string();
                // DSPy slices the *unstripped* line at the match's end in the stripped one.
                let end_chars = stripped[..m.get(0).unwrap().end()].chars().count();
                let rest: String = line.chars().skip(end_chars).collect();
                let rest = py_strip(&rest).to_string();
                sections.push((
                    Some(header),
                    if rest.is_empty() { vec![] } else { vec![rest] },
                ));
            } else {
                sections.last_mut().unwrap().1.push(line.to_string());
            }
        }
        let mut fields = Example::new();
        for (name, lines) in sections {
            let Some(name) = name else { continue };
            if fields.contains(&name) {
                continue;
            }
            let Some(field) = sig.output(&name) else {
                continue;
            };
            let text = py_strip(&lines.join("\n")).to_string();
            match parse_value(&Value::String(text.clone()), &field.ty) {
                Ok(v) => fields.set(&name, v),
                Err(e) => {
                    return Err(Style::Chat.error(
                        sig,
                        completion,
                        format!("field `{name}` with value {text:?}: {e}"),
                        fields,
                    ))
                }
            }
        }
        Style::Chat.check_complete(sig, completion, fields)
    }

    /// Formats, calls the LM, parses each completion; on a parse failure (and
    /// `use_json_adapter_fallback`) calls again with [`JsonAdapter`]'s messages, as DSPy does.
    /// Returns one parsed example per completion.
    pub fn call(
        &self,
        lm: &dyn Lm,
        request: &LmRequest,
        sig: &Signature,
        demos: &[Example],
        inputs: &Example,
        stats: &ParseStats,
    ) -> Result<Vec<Example>> {
        stats.calls.fetch_add(1, Ordering::Relaxed);
        let mut req = request.clone();
        req.messages = self.format(sig, demos, inputs);
        let response = lm.complete(&req)?;
        let parsed: Result<Vec<Example>> = response
            .choices
            .iter()
            .map(|c| {
                if c.is_empty() {
                    Err(Style::Chat.error(
                        sig,
                        c,
                        "the LM returned an empty response".into(),
                        Example::new(),
                    ))
                } else {
                    self.parse(sig, c)
                }
            })
            .collect();
        let err = match parsed {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        stats.chat_failures.fetch_add(1, Ordering::Relaxed);
        if !self.use_json_adapter_fallback {
            stats.failures.fetch_add(1, Ordering::Relaxed);
            return Err(err);
        }
        match JsonAdapter.call_once(lm, request, sig, demos, inputs) {
            Ok(v) => {
                stats.json_recovered.fetch_add(1, Ordering::Relaxed);
                Ok(v)
            }
            Err(e) => {
                stats.failures.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }
}

impl JsonAdapter {
    /// `dspy.JSONAdapter().format(signature, demos, inputs)`.
    pub fn format(&self, sig: &Signature, demos: &[Example], inputs: &Example) -> Vec<Message> {
        Style::Json.format(sig, demos, inputs)
    }

    /// Parses a JSON object (the whole completion, a fenced block, or the first `{...}` in it)
    /// into typed output fields; extra keys are ignored, missing ones are an error.
    pub fn parse(&self, sig: &Signature, completion: &str) -> Result<Example> {
        let Some(Value::Object(map)) = find_json_object(completion) else {
            return Err(Style::Json.error(
                sig,
                completion,
                "LM response cannot be serialized to a JSON object".into(),
                Example::new(),
            ));
        };
        let mut fields = Example::new();
        for f in sig.outputs() {
            if let Some(v) = map.get(&f.name) {
                match parse_value(v, &f.ty) {
                    Ok(p) => fields.set(&f.name, p),
                    Err(e) => {
                        return Err(Style::Json.error(
                            sig,
                            completion,
                            format!("failed to parse field `{}`: {e}", f.name),
                            fields,
                        ))
                    }
                }
            }
        }
        Style::Json.check_complete(sig, completion, fields)
    }

    /// One JSON-format call (with `response_format` JSON object requested).
    pub fn call_once(
        &self,
        lm: &dyn Lm,
        request: &LmRequest,
        sig: &Signature,
        demos: &[Example],
        inputs: &Example,
    ) -> Result<Vec<Example>> {
        let mut req = request.clone();
        req.messages = self.format(sig, demos, inputs);
        req.json_object = true;
        let response = lm.complete(&req)?;
        response
            .choices
            .iter()
            .map(|c| self.parse(sig, c))
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Values: DSPy's `parse_value` (json_repair + ast.literal_eval + pydantic's lax validation)

/// Converts a field's text (or a JSON value from the JSON adapter) to the field's type, the
/// way DSPy's `parse_value` does: exact and quoted labels for `Literal`; JSON, Python
/// literals (`True`, `'a'`) and lightly broken JSON (`[a, b]`, fenced blocks) for the rest,
/// then pydantic's lax rules (`"4"` and `4.0` are ints, `"yes"`/`1` are `True`).
pub fn parse_value(value: &Value, ty: &FieldType) -> std::result::Result<Value, String> {
    if *ty == FieldType::Str {
        return Ok(Value::String(py_str(value)));
    }
    let mut value = value.clone();
    if let FieldType::Literal(labels) = ty {
        if let Value::String(s) = &value {
            if labels.contains(s) {
                return Ok(value);
            }
            let mut v = py_strip(s).to_string();
            if (v.starts_with("Literal[") || v.starts_with("str[")) && v.ends_with(']') {
                let open = v.find('[').unwrap();
                v = v[open + 1..v.len() - 1].to_string();
            }
            let cs: Vec<char> = v.chars().collect();
            if cs.len() > 1 && cs[0] == cs[cs.len() - 1] && (cs[0] == '"' || cs[0] == '\'') {
                v = cs[1..cs.len() - 1].iter().collect();
            }
            if labels.contains(&v) {
                return Ok(Value::String(v));
            }
            value = Value::String(v);
        }
    }
    let candidate = match &value {
        Value::String(s) => decode_candidate(s),
        other => other.clone(),
    };
    validate(&candidate, ty)
}

/// json_repair.loads, then ast.literal_eval, then the text itself.
fn decode_candidate(s: &str) -> Value {
    if let Some(v) = lenient_json(s) {
        return v;
    }
    if !s.is_empty() {
        if let Some(v) = PyLiteral::parse_all(py_strip(s)) {
            return v;
        }
    }
    Value::String(s.to_string())
}

fn validate(v: &Value, ty: &FieldType) -> std::result::Result<Value, String> {
    let fail = || {
        Err(format!(
            "{} is not a valid {}",
            super::py::py_repr(v),
            ty.annotation_name()
        ))
    };
    match ty {
        FieldType::Str => Ok(Value::String(py_str(v))),
        FieldType::Int => match v {
            Value::Bool(b) => Ok(Value::from(*b as i64)),
            Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    Ok(Value::from(i))
                } else {
                    match n.as_f64() {
                        Some(f) if f.fract() == 0.0 && f.is_finite() => Ok(Value::from(f as i64)),
                        _ => fail(),
                    }
                }
            }
            Value::String(s) => match py_strip(s).parse::<i64>() {
                Ok(i) => Ok(Value::from(i)),
                Err(_) => fail(),
            },
            _ => fail(),
        },
        FieldType::Float => {
            let f = match v {
                Value::Bool(b) => Some(*b as i64 as f64),
                Value::Number(n) => n.as_f64(),
                Value::String(s) => py_strip(s).parse::<f64>().ok(),
                _ => None,
            };
            match f.and_then(serde_json::Number::from_f64) {
                Some(n) => Ok(Value::Number(n)),
                None => fail(),
            }
        }
        FieldType::Bool => match v {
            Value::Bool(b) => Ok(Value::Bool(*b)),
            Value::Number(n) => match n.as_f64() {
                Some(0.0) => Ok(Value::Bool(false)),
                Some(1.0) => Ok(Value::Bool(true)),
                _ => fail(),
            },
            Value::String(s) => match py_strip(s).to_lowercase().as_str() {
                "0" | "off" | "f" | "false" | "n" | "no" => Ok(Value::Bool(false)),
                "1" | "on" | "t" | "true" | "y" | "yes" => Ok(Value::Bool(true)),
                _ => fail(),
            },
            _ => fail(),
        },
        FieldType::ListStr => match v {
            Value::Array(items) if items.iter().all(Value::is_string) => Ok(v.clone()),
            _ => fail(),
        },
        FieldType::Literal(labels) => match v {
            Value::String(s) if labels.contains(s) => Ok(v.clone()),
            _ => Err(format!(
                "{} is not one of {}",
                super::py::py_repr(v),
                labels
                    .iter()
                    .map(|l| super::signature::label_repr(l))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        },
    }
}

/// The end (exclusive, in bytes) of the bracketed span opening at `start`, skipping quoted text.
fn balanced_end(s: &str, start: usize) -> Option<usize> {
    let mut depth = 0i32;
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for (i, c) in s[start..].char_indices() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '"' | '\'' => quote = Some(c),
            '[' | '{' => depth += 1,
            ']' | '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(start + i + 1);
                }
            }
            _ => {}
        }
    }
    None
}

fn strip_fence(t: &str) -> Option<&str> {
    let rest = t.strip_prefix("```")?;
    let body_start = rest.find('\n')? + 1;
    let body = &rest[body_start..];
    let end = body.rfind("```").unwrap_or(body.len());
    Some(py_strip(&body[..end]))
}

/// Parses a bracketed span as JSON, as a Python literal, or as a list of bare words.
fn parse_span(span: &str) -> Option<Value> {
    if let Ok(v) = serde_json::from_str::<Value>(span) {
        return Some(v);
    }
    if let Some(v) = PyLiteral::parse_all(span) {
        return Some(v);
    }
    let inner = span.strip_prefix('[')?.strip_suffix(']')?;
    if inner.contains(['[', ']', '{', '}']) {
        return None;
    }
    let items: Vec<Value> = if py_strip(inner).is_empty() {
        vec![]
    } else {
        inner
            .split(',')
            .map(|w| {
                let w = py_strip(w).trim_matches(['"', '\'']);
                serde_json::from_str::<Value>(w)
                    .ok()
                    .filter(|v| v.is_number() || v.is_boolean())
                    .unwrap_or_else(|| Value::String(w.to_string()))
            })
            .collect()
    };
    Some(Value::Array(items))
}

/// An approximation of `json_repair.loads`: strict JSON, a fenced block, or the first
/// bracketed `[...]`/`{...}` span (JSON, Python literal, or bare words). `None` where
/// json_repair returns `""`.
fn lenient_json(s: &str) -> Option<Value> {
    let t = py_strip(s);
    if t.is_empty() {
        return None;
    }
    if let Ok(v) = serde_json::from_str::<Value>(t) {
        return Some(v);
    }
    if let Some(body) = strip_fence(t) {
        return lenient_json(body);
    }
    let start = t.find(['[', '{'])?;
    let end = balanced_end(t, start)?;
    parse_span(&t[start..end])
}

/// The JSON object in a completion: the whole text, a fenced block, or the first balanced
/// `{...}`.
fn find_json_object(s: &str) -> Option<Value> {
    let t = py_strip(s);
    if let Ok(v @ Value::Object(_)) = serde_json::from_str::<Value>(t) {
        return Some(v);
    }
    if let Some(body) = strip_fence(t) {
        if let Some(v) = find_json_object(body) {
            return Some(v);
        }
    }
    let mut from = 0;
    while let Some(off) = t[from..].find('{') {
        let start = from + off;
        if let Some(end) = balanced_end(t, start) {
            if let Some(v @ Value::Object(_)) = parse_span(&t[start..end]) {
                return Some(v);
            }
        }
        from = start + 1;
    }
    None
}

/// A small reader of Python literals (`ast.literal_eval` for strings, numbers, True/False/None,
/// lists, tuples and dicts).
struct PyLiteral<'a> {
    s: &'a [u8],
    text: &'a str,
    i: usize,
}

impl<'a> PyLiteral<'a> {
    fn parse_all(text: &'a str) -> Option<Value> {
        let mut p = PyLiteral {
            s: text.as_bytes(),
            text,
            i: 0,
        };
        let v = p.value()?;
        p.ws();
        (p.i == p.s.len()).then_some(v)
    }

    fn ws(&mut self) {
        while self.i < self.s.len() && (self.s[self.i] as char).is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn value(&mut self) -> Option<Value> {
        self.ws();
        let c = *self.s.get(self.i)?;
        match c {
            b'\'' | b'"' => self.string().map(Value::String),
            b'[' | b'(' => {
                let close = if c == b'[' { b']' } else { b')' };
                self.i += 1;
                let mut items = vec![];
                loop {
                    self.ws();
                    if self.s.get(self.i) == Some(&close) {
                        self.i += 1;
                        break;
                    }
                    items.push(self.value()?);
                    self.ws();
                    match self.s.get(self.i)? {
                        b',' => self.i += 1,
                        x if *x == close => {}
                        _ => return None,
                    }
                }
                Some(Value::Array(items))
            }
            b'{' => {
                self.i += 1;
                let mut map = serde_json::Map::new();
                loop {
                    self.ws();
                    if self.s.get(self.i) == Some(&b'}') {
                        self.i += 1;
                        break;
                    }
                    let k = match self.value()? {
                        Value::String(k) => k,
                        other => py_str(&other),
                    };
                    self.ws();
                    if self.s.get(self.i) != Some(&b':') {
                        return None;
                    }
                    self.i += 1;
                    let v = self.value()?;
                    map.insert(k, v);
                    self.ws();
                    match self.s.get(self.i)? {
                        b',' => self.i += 1,
                        b'}' => {}
                        _ => return None,
                    }
                }
                Some(Value::Object(map))
            }
            _ => {
                let start = self.i;
                while self.i < self.s.len()
                    && (self.s[self.i].is_ascii_alphanumeric() || b"+-._".contains(&self.s[self.i]))
                {
                    self.i += 1;
                }
                let word = &self.text[start..self.i];
                match word {
                    "True" => Some(Value::Bool(true)),
                    "False" => Some(Value::Bool(false)),
                    "None" => Some(Value::Null),
                    w => {
                        let w2 = w.replace('_', "");
                        if let Ok(i) = w2.parse::<i64>() {
                            Some(Value::from(i))
                        } else if w2
                            .chars()
                            .next()
                            .is_some_and(|c| c.is_ascii_digit() || c == '-' || c == '+' || c == '.')
                        {
                            w2.parse::<f64>()
                                .ok()
                                .and_then(serde_json::Number::from_f64)
                                .map(Value::Number)
                        } else {
                            None
                        }
                    }
                }
            }
        }
    }

    fn string(&mut self) -> Option<String> {
        let quote = self.s[self.i];
        self.i += 1;
        let mut out = String::new();
        let rest = &self.text[self.i..];
        let mut chars = rest.char_indices();
        while let Some((off, c)) = chars.next() {
            if c as u32 == quote as u32 {
                self.i += off + 1;
                return Some(out);
            }
            if c == '\\' {
                let (_, e) = chars.next()?;
                out.push(match e {
                    'n' => '\n',
                    't' => '\t',
                    'r' => '\r',
                    other => other,
                });
            } else {
                out.push(c);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parse_values_like_dspy() {
        let s = |x: &str| Value::String(x.into());
        assert_eq!(parse_value(&s(" 4 "), &FieldType::Int), Ok(json!(4)));
        assert_eq!(parse_value(&s("4.0"), &FieldType::Int), Ok(json!(4)));
        assert!(parse_value(&s("4.5"), &FieldType::Int).is_err());
        assert_eq!(parse_value(&s("True"), &FieldType::Int), Ok(json!(1)));
        assert_eq!(parse_value(&s("yes"), &FieldType::Bool), Ok(json!(true)));
        assert_eq!(
            parse_value(&s("[a, b]"), &FieldType::ListStr),
            Ok(json!(["a", "b"]))
        );
        assert_eq!(
            parse_value(&s("['a', 'b']"), &FieldType::ListStr),
            Ok(json!(["a", "b"]))
        );
        assert!(parse_value(&s("[1, 2]"), &FieldType::ListStr).is_err());
        let lit = FieldType::literal(["positive", "negative"]);
        assert_eq!(parse_value(&s("'positive'"), &lit), Ok(json!("positive")));
        assert_eq!(
            parse_value(&s("Literal[positive]"), &lit),
            Ok(json!("positive"))
        );
        assert!(parse_value(&s("Positive"), &lit).is_err());
        assert_eq!(parse_value(&json!(4), &FieldType::Str), Ok(json!("4")));
    }
}
