//! Chat templates: the Jinja programs that turn a list of messages into the one prompt string a
//! model was trained on.
//!
//! Models ship their template as Jinja source (in `tokenizer_config.json`, `chat_template.jinja`
//! or the GGUF key `tokenizer.chat_template`), written for Python's jinja2 as transformers runs
//! it. We render it with [minijinja], set up to behave like transformers' environment:
//!
//! * `trim_blocks` and `lstrip_blocks` on, `loop_controls` (`{% break %}`, `{% continue %}`);
//! * Python string and dict methods (`.strip()`, `.startswith()`, `.items()`, ...) through
//!   minijinja-contrib's pycompat callback;
//! * the globals transformers adds: `raise_exception(message)`, `strftime_now(format)`, and a
//!   `tojson` filter that writes JSON the way Python's `json.dumps` does (`", "` and `": "`
//!   separators, no HTML escaping, `indent=`, `sort_keys=`, `ensure_ascii=`);
//! * the variables transformers passes: `messages`, `add_generation_prompt`, `tools` and
//!   `documents` (both `none`), and the special tokens (`bos_token`, `eos_token`, and whatever
//!   [`ChatTemplate::with_variable`] adds, such as `unk_token` and `pad_token`).
//!
//! Messages keep Python's key order (`role`, then `content`), so `message.items()` and
//! `message | tojson` print the same as transformers.
//!
//! ```
//! use qlora::model::chat_template::{ChatTemplate, Message};
//!
//! let template = ChatTemplate::new(
//!     "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
//!      {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
//!     None,
//!     Some("<|im_end|>"),
//! )?;
//! let prompt = template.render(&[Message::user("Hi!")], true)?;
//! assert_eq!(prompt, "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n");
//! # Ok::<(), qlora::Error>(())
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Enumerator, Kwargs, Object, ObjectRepr, Value, ValueKind};
use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The name the template is stored under inside its minijinja environment.
const TEMPLATE_NAME: &str = "chat_template";

/// One chat message: who speaks (`system`, `user`, `assistant`, ...) and what they say.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, or whatever role the template knows.
    pub role: String,
    /// The text of the message.
    pub content: String,
}

impl Message {
    /// A message with any role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }

    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// A message as the template sees it: a map whose keys come out in Python's order (`role`,
/// `content`). Serialising through serde would give minijinja's sorted map, which changes what
/// `message.items()` and `message | tojson` print.
#[derive(Debug)]
struct MessageValue(Message);

impl Object for MessageValue {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        match key.as_str()? {
            "role" => Some(Value::from(self.0.role.as_str())),
            "content" => Some(Value::from(self.0.content.as_str())),
            _ => None,
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(&["role", "content"])
    }
}

/// The payload of an error raised by the template's own `raise_exception(...)`, so that
/// [`ChatTemplate::render`] can report the template's message as it wrote it.
#[derive(Debug)]
struct RaisedByTemplate(String);

impl fmt::Display for RaisedByTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedByTemplate {}

/// A chat template compiled once, ready to render conversations.
///
/// Cloning is cheap enough for occasional use (the environment holds the parsed template).
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    /// Variables every render sees: the special tokens, by transformers' names.
    variables: BTreeMap<String, String>,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_chars", &self.source.chars().count())
            .field("variables", &self.variables)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source`. `bos_token` and `eos_token` are the strings templates see as
    /// `bos_token` / `eos_token` (left undefined when `None`, as transformers does).
    ///
    /// Fails with [`Error::Template`] when the source does not parse.
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self> {
        let mut env = Environment::new();
        // transformers: ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
        // extensions=[loopcontrols]). jinja2 and minijinja both drop one trailing newline of the
        // source by default, so keep_trailing_newline needs no change.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| Error::Template(format!("does not parse: {}", describe(&e))))?;

        let mut variables = BTreeMap::new();
        if let Some(bos) = bos_token {
            variables.insert("bos_token".to_string(), bos.to_string());
        }
        if let Some(eos) = eos_token {
            variables.insert("eos_token".to_string(), eos.to_string());
        }
        Ok(Self {
            env,
            source: source.to_string(),
            variables,
        })
    }

    /// Adds (or replaces) a string variable every render sees, such as `unk_token` or
    /// `pad_token`, which transformers passes alongside `bos_token` and `eos_token`.
    pub fn with_variable(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.variables.insert(name.into(), value.into());
        self
    }

    /// The Jinja source this template was compiled from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The value of a variable set by [`ChatTemplate::new`] or [`ChatTemplate::with_variable`].
    pub fn variable(&self, name: &str) -> Option<&str> {
        self.variables.get(name).map(String::as_str)
    }

    /// Renders `messages`; with `add_generation_prompt` the template appends the header that
    /// starts the assistant's reply (e.g. `<|im_start|>assistant\n`).
    ///
    /// Fails with [`Error::Template`] when the template calls `raise_exception` (the error
    /// carries the template's message) or hits an error while rendering.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| Value::from_object(MessageValue(m.clone())))
            .collect();
        let mut context: BTreeMap<String, Value> = self
            .variables
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        context.insert("messages".into(), Value::from(messages));
        context.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        // transformers passes these as None when unused; templates test `tools is not none`,
        // which is true for an undefined value, so they must be defined.
        context.insert("tools".into(), Value::from(()));
        context.insert("documents".into(), Value::from(()));

        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| Error::Template(describe(&e)))?;
        template
            .render(context)
            .map_err(|e| match raised_message(&e) {
                Some(message) => Error::Template(message),
                None => Error::Template(format!("rendering failed: {}", describe(&e))),
            })
    }
}

/// The message of a `raise_exception(...)` call somewhere in `err`'s chain, if that is what it is.
fn raised_message(err: &minijinja::Error) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(err);
    while let Some(e) = source {
        if let Some(raised) = e.downcast_ref::<RaisedByTemplate>() {
            return Some(raised.0.clone());
        }
        source = e.source();
    }
    None
}

/// minijinja's message plus where in the template it happened, on one line.
fn describe(err: &minijinja::Error) -> String {
    let mut text = err.to_string();
    if let Some(line) = err.line() {
        if !text.contains("line") {
            text.push_str(&format!(" (template line {line})"));
        }
    }
    text
}

/// `raise_exception(message)`: what templates call to refuse a conversation they cannot format.
fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(
        minijinja::Error::new(ErrorKind::InvalidOperation, message.clone())
            .with_source(RaisedByTemplate(message)),
    )
}

/// `strftime_now(format)`: the current time formatted like Python's `datetime.now().strftime`.
///
/// Computed from `SystemTime` in UTC (the std library has no time zones); Llama-3 templates only
/// use it for the date line of the system prompt.
fn strftime_now(format: String) -> std::result::Result<Value, minijinja::Error> {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime(&format, seconds)
        .map(Value::from)
        .map_err(|m| minijinja::Error::new(ErrorKind::InvalidOperation, m))
}

const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// Formats `unix_seconds` (UTC) with the common C `strftime` directives.
fn strftime(format: &str, unix_seconds: i64) -> std::result::Result<String, String> {
    let days = unix_seconds.div_euclid(86_400);
    let secs_of_day = unix_seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (
        secs_of_day / 3600,
        (secs_of_day % 3600) / 60,
        secs_of_day % 60,
    );
    // 1970-01-01 was a Thursday (index 3 with Monday = 0).
    let weekday = (days + 3).rem_euclid(7) as usize;
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let month_name = MONTHS[(month - 1) as usize];
    let weekday_name = WEEKDAYS[weekday];

    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(directive) = chars.next() else {
            out.push('%');
            break;
        };
        match directive {
            'Y' => out.push_str(&year.to_string()),
            'y' => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            'm' => out.push_str(&format!("{month:02}")),
            'd' => out.push_str(&format!("{day:02}")),
            'e' => out.push_str(&format!("{day:2}")),
            'j' => out.push_str(&format!("{day_of_year:03}")),
            'B' => out.push_str(month_name),
            'b' | 'h' => out.push_str(&month_name[..3]),
            'A' => out.push_str(weekday_name),
            'a' => out.push_str(&weekday_name[..3]),
            'u' => out.push_str(&(weekday + 1).to_string()),
            'w' => out.push_str(&((weekday + 1) % 7).to_string()),
            'H' => out.push_str(&format!("{hour:02}")),
            'I' => out.push_str(&format!("{:02}", (hour + 11) % 12 + 1)),
            'M' => out.push_str(&format!("{minute:02}")),
            'S' => out.push_str(&format!("{second:02}")),
            'p' => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            'F' => out.push_str(&format!("{year}-{month:02}-{day:02}")),
            'T' => out.push_str(&format!("{hour:02}:{minute:02}:{second:02}")),
            'Z' => out.push_str("UTC"),
            'z' => out.push_str("+0000"),
            '%' => out.push('%'),
            other => return Err(format!("strftime_now: unsupported directive %{other}")),
        }
    }
    Ok(out)
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The inverse of [`civil_from_days`].
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `value | tojson(indent=None, ensure_ascii=False, sort_keys=False, separators=None)`,
/// writing what transformers' filter (`json.dumps` with those arguments) writes.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;

    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => {
            if let Some(s) = v.as_str() {
                Some(s.to_string())
            } else if let Some(n) = v.as_i64() {
                Some(" ".repeat(n.max(0) as usize))
            } else {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or a string",
                ));
            }
        }
    };
    // Python's defaults: (", ", ": ") without indent, (",", ": ") with one.
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() && !v.is_undefined() => {
            let item = v.get_item_by_index(0)?;
            let key = v.get_item_by_index(1)?;
            match (item.as_str(), key.as_str()) {
                (Some(i), Some(k)) => (i.to_string(), k.to_string()),
                _ => {
                    return Err(minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be two strings",
                    ))
                }
            }
        }
        _ => (
            if indent.is_some() { "," } else { ", " }.to_string(),
            ": ".to_string(),
        ),
    };
    let options = JsonOptions {
        indent,
        item_sep,
        key_sep,
        ensure_ascii: ensure_ascii.unwrap_or(false),
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    write_json(&value, &options, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

struct JsonOptions {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    ensure_ascii: bool,
    sort_keys: bool,
}

fn write_json(
    value: &Value,
    options: &JsonOptions,
    depth: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let Some(i) = value.as_i64() {
                out.push_str(&i.to_string());
            } else if value.is_integer() {
                // Beyond i64: minijinja prints big integers exactly, as Python does.
                out.push_str(&value.to_string());
            } else {
                let f = f64::try_from(value.clone()).unwrap_or(f64::NAN);
                out.push_str(&python_float_repr(f));
            }
        }
        ValueKind::String => write_json_string(value.as_str().unwrap_or(""), options, out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(options, depth, out, '[', ']', &items, |item, out| {
                write_json(item, options, depth + 1, out)
            })?;
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if options.sort_keys {
                keys.sort();
            }
            write_container(options, depth, out, '{', '}', &keys, |key, out| {
                let name = match key.as_str() {
                    Some(s) => s.to_string(),
                    None => key.to_string(),
                };
                write_json_string(&name, options, out);
                out.push_str(&options.key_sep);
                write_json(&value.get_item(key)?, options, depth + 1, out)
            })?;
        }
        _ => write_json_string(&value.to_string(), options, out),
    }
    Ok(())
}

/// Writes `[a, b]` / `{...}` with Python's layout for the given indent and separators.
fn write_container<F>(
    options: &JsonOptions,
    depth: usize,
    out: &mut String,
    open: char,
    close: char,
    items: &[Value],
    mut write_item: F,
) -> std::result::Result<(), minijinja::Error>
where
    F: FnMut(&Value, &mut String) -> std::result::Result<(), minijinja::Error>,
{
    out.push(open);
    if items.is_empty() {
        out.push(close);
        return Ok(());
    }
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(&options.item_sep);
        }
        if let Some(indent) = &options.indent {
            out.push('\n');
            out.push_str(&indent.repeat(depth + 1));
        }
        write_item(item, out)?;
    }
    if let Some(indent) = &options.indent {
        out.push('\n');
        out.push_str(&indent.repeat(depth));
    }
    out.push(close);
    Ok(())
}

/// A JSON string literal escaped like Python's `json.dumps`.
fn write_json_string(s: &str, options: &JsonOptions, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if options.ensure_ascii && !c.is_ascii() => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)` for the values JSON can hold (shortest round-trip digits).
fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let abs = f.abs();
    if abs != 0.0 && !(1e-4..1e16).contains(&abs) {
        // Python: 1e+16, 1.5e-05; Rust's `{:e}` gives 1e16, 1.5e-5.
        let s = format!("{f:e}");
        let (mantissa, exponent) = s.split_once('e').unwrap_or((&s, "0"));
        let (sign, digits) = match exponent.strip_prefix('-') {
            Some(d) => ("-", d),
            None => ("+", exponent),
        };
        return format!("{mantissa}e{sign}{digits:0>2}");
    }
    let s = format!("{f}");
    if s.contains('.') {
        s
    } else {
        format!("{s}.0")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    /// The Llama-2 chat template as Meta's tokenizer_config.json shipped it.
    const LLAMA2: &str = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

    #[test]
    fn chatml_inserts_default_system_prompt() {
        let t = ChatTemplate::new(CHATML, Some("<|im_start|>"), Some("<|im_end|>")).unwrap();
        let out = t.render(&[Message::user("Hi")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t
            .render(
                &[
                    Message::system("Be brief."),
                    Message::user("Hi"),
                    Message::assistant("Hello."),
                ],
                false,
            )
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\nHello.<|im_end|>\n"
        );
    }

    #[test]
    fn llama2_template_with_system_prompt_and_strip() {
        let t = ChatTemplate::new(LLAMA2, Some("<s>"), Some("</s>")).unwrap();
        let out = t
            .render(
                &[
                    Message::system("Be kind."),
                    Message::user("  Hello "),
                    Message::assistant("Hi!"),
                    Message::user("Bye"),
                ],
                false,
            )
            .unwrap();
        assert_eq!(
            out,
            "<s>[INST] <<SYS>>\nBe kind.\n<</SYS>>\n\n  Hello [/INST] Hi! </s><s>[INST] Bye [/INST]"
        );
    }

    #[test]
    fn raise_exception_becomes_template_error_with_its_message() {
        let t = ChatTemplate::new(LLAMA2, Some("<s>"), Some("</s>")).unwrap();
        let err = t
            .render(&[Message::user("a"), Message::user("b")], false)
            .unwrap_err();
        match err {
            Error::Template(m) => assert_eq!(
                m,
                "Conversation roles must alternate user/assistant/user/assistant/..."
            ),
            other => panic!("unexpected error {other:?}"),
        }
    }

    #[test]
    fn bad_template_is_an_error_not_a_panic() {
        let err =
            ChatTemplate::new("{% for m in messages %}{{ m.content }}", None, None).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("does not parse"), "{text}");

        // Parses, but fails while rendering: calling an unknown function.
        let t = ChatTemplate::new("{{ no_such_function() }}", None, None).unwrap();
        let err = t.render(&[], false).unwrap_err();
        assert!(matches!(err, Error::Template(_)), "{err:?}");
    }

    #[test]
    fn trim_and_lstrip_blocks_match_jinja2_settings() {
        let source = "{% for m in messages %}\n    {% if m.role == 'user' %}\nU:{{ m.content }}\n    {% endif %}\n{% endfor %}\n";
        let t = ChatTemplate::new(source, None, None).unwrap();
        let out = t.render(&[Message::user("x")], false).unwrap();
        assert_eq!(out, "U:x\n");
    }

    #[test]
    fn python_methods_loop_controls_and_none_variables() {
        let source =
            "{% for m in messages %}{% if m.content.startswith('skip') %}{% continue %}{% endif %}\
                      {% for k, v in m.items() %}{{ k }}={{ v.upper() }};{% endfor %}{% endfor %}\
                      {% if tools is not none %}TOOLS{% endif %}{{ unk_token }}";
        let t = ChatTemplate::new(source, None, None)
            .unwrap()
            .with_variable("unk_token", "<unk>");
        let out = t
            .render(&[Message::user("skip me"), Message::assistant("ok")], false)
            .unwrap();
        assert_eq!(out, "role=ASSISTANT;content=OK;<unk>");
    }

    #[test]
    fn tojson_writes_python_json() {
        let t = ChatTemplate::new(
            "{{ messages[0] | tojson }}|{{ messages | tojson(indent=2) }}|{{ {'b': 1.5, 'a': [1, none, true]} | tojson(sort_keys=true) }}",
            None,
            None,
        )
        .unwrap();
        let out = t.render(&[Message::user("é <b>\"q\"\n")], false).unwrap();
        assert_eq!(
            out,
            "{\"role\": \"user\", \"content\": \"é <b>\\\"q\\\"\\n\"}|[\n  {\n    \"role\": \"user\",\n    \"content\": \"é <b>\\\"q\\\"\\n\"\n  }\n]|{\"a\": [1, null, true], \"b\": 1.5}"
        );
    }

    #[test]
    fn strftime_formats_known_dates() {
        // 2024-07-26 13:05:09 UTC, a Friday.
        let t = 1_722_000_000 - 1_722_000_000 % 86_400 + 13 * 3600 + 5 * 60 + 9;
        assert_eq!(strftime("%d %b %Y", t).unwrap(), "26 Jul 2024");
        assert_eq!(
            strftime("%A %B %e %H:%M:%S %j %y %I%p %%", t).unwrap(),
            "Friday July 26 13:05:09 208 24 01PM %"
        );
        assert_eq!(strftime("%Y-%m-%d", 0).unwrap(), "1970-01-01");
        assert_eq!(strftime("%F", 951_782_400).unwrap(), "2000-02-29");
        assert!(strftime("%Q", 0).is_err());

        // And the template function runs.
        let t = ChatTemplate::new("{{ strftime_now('%Y') }}", None, None).unwrap();
        let year: i64 = t.render(&[], false).unwrap().parse().unwrap();
        assert!(year >= 2024);
    }

    #[test]
    fn python_float_repr_matches_python() {
        assert_eq!(python_float_repr(1.0), "1.0");
        assert_eq!(python_float_repr(0.1), "0.1");
        assert_eq!(python_float_repr(1e16), "1e+16");
        assert_eq!(python_float_repr(1.5e-5), "1.5e-05");
        assert_eq!(python_float_repr(-2.5), "-2.5");
    }
}
