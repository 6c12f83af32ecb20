//! Rows interpreted as examples: format detection, column mapping, ShareGPT roles, and the
//! checks that name the row and field at fault.

use serde_json::{Map, Value};

use super::config::{quoted, ColumnMap, Format};
use super::read::json_kind;
use crate::model::Message;

/// One training example before tokenisation, in one of the supported formats. Build them in
/// Rust and pass them to [`SftDataset::from_records`](super::SftDataset::from_records).
///
/// ```
/// use qlora::data::Record;
/// use qlora::model::Message;
/// let records = vec![
///     Record::chat(vec![Message::user("2+2?"), Message::assistant("4")]),
///     Record::prompt_completion("Capital of France?", "Paris"),
///     Record::alpaca("Translate to German.", "cat", "Katze"),
///     Record::text("Plain text is trained on every token."),
/// ];
/// assert_eq!(records.len(), 4);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A conversation; the loss is on every assistant message.
    Chat(Vec<Message>),
    /// A prompt and its completion; the loss is on the completion.
    PromptCompletion { prompt: String, completion: String },
    /// An Alpaca row: the user message is `instruction`, plus `"\n\n" + input` when the input is
    /// not empty; the loss is on `output`.
    Alpaca {
        instruction: String,
        input: String,
        output: String,
    },
    /// Plain text; the loss is on every token.
    Text(String),
}

impl Record {
    /// A conversation.
    pub fn chat(messages: Vec<Message>) -> Self {
        Record::Chat(messages)
    }

    /// A prompt/completion pair.
    pub fn prompt_completion(prompt: impl Into<String>, completion: impl Into<String>) -> Self {
        Record::PromptCompletion {
            prompt: prompt.into(),
            completion: completion.into(),
        }
    }

    /// An Alpaca row (`input` may be empty).
    pub fn alpaca(
        instruction: impl Into<String>,
        input: impl Into<String>,
        output: impl Into<String>,
    ) -> Self {
        Record::Alpaca {
            instruction: instruction.into(),
            input: input.into(),
            output: output.into(),
        }
    }

    /// Plain text.
    pub fn text(text: impl Into<String>) -> Self {
        Record::Text(text.into())
    }

    /// The record as one JSON object in the column layout [`SftDataset::load`] reads back:
    /// `{"messages": [...]}`, `{"prompt", "completion"}`, `{"instruction", "input", "output"}`
    /// or `{"text"}`.
    ///
    /// [`SftDataset::load`]: super::SftDataset::load
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Record::Chat(messages) => serde_json::json!({ "messages": messages }),
            Record::PromptCompletion { prompt, completion } => {
                serde_json::json!({ "prompt": prompt, "completion": completion })
            }
            Record::Alpaca {
                instruction,
                input,
                output,
            } => {
                serde_json::json!({ "instruction": instruction, "input": input, "output": output })
            }
            Record::Text(text) => serde_json::json!({ "text": text }),
        }
    }

    /// The format this record belongs to.
    pub fn format(&self) -> Format {
        match self {
            Record::Chat(_) => Format::Chat,
            Record::PromptCompletion { .. } => Format::PromptCompletion,
            Record::Alpaca { .. } => Format::Alpaca,
            Record::Text(_) => Format::Text,
        }
    }

    /// Checks that the record has something to train on; the error names the field.
    pub(crate) fn validate(&self) -> std::result::Result<(), String> {
        let empty = |field: &str, what: &str| {
            format!("field `{field}` is empty; {what} — fill it in or remove the row")
        };
        match self {
            Record::Chat(messages) => {
                if messages.is_empty() {
                    return Err(empty("messages", "a conversation needs messages"));
                }
                for (i, m) in messages.iter().enumerate() {
                    if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
                        return Err(format!(
                            "message {} has role `{}`; roles are system, user, assistant \
                             (ShareGPT: system, human, gpt)",
                            i + 1,
                            m.role
                        ));
                    }
                    if m.role == "assistant" && m.content.is_empty() {
                        return Err(format!(
                            "message {} (assistant) has empty content; there is nothing to \
                             train on in it — fill it in or remove the row",
                            i + 1
                        ));
                    }
                }
                if !messages.iter().any(|m| m.role == "assistant") {
                    return Err(
                        "the conversation has no assistant message, so nothing to train \
                                on; add the answer as an assistant message"
                            .to_string(),
                    );
                }
                Ok(())
            }
            Record::PromptCompletion { completion, .. } if completion.is_empty() => Err(empty(
                "completion",
                "the completion is what the model learns",
            )),
            Record::Alpaca { instruction, .. } if instruction.is_empty() => Err(empty(
                "instruction",
                "the instruction becomes the user message",
            )),
            Record::Alpaca { output, .. } if output.is_empty() => {
                Err(empty("output", "the output is what the model learns"))
            }
            Record::Text(text) if text.is_empty() => {
                Err(empty("text", "there is nothing to train on"))
            }
            _ => Ok(()),
        }
    }
}

/// Picks the format from the columns, or checks a forced one; the error lists what was found.
pub(crate) fn resolve_format(
    forced: Format,
    columns: &[String],
    map: &ColumnMap,
) -> std::result::Result<Format, String> {
    let has = |ours: &str| columns.iter().any(|c| c == map.get(ours));
    let has_chat = has("messages") || (!map.is_mapped("messages") && has_conversations(columns));
    let found = || {
        if columns.is_empty() {
            "the dataset has no columns (is it empty?)".to_string()
        } else {
            format!("columns found: {}", quoted(columns))
        }
    };
    if forced == Format::Auto {
        let detected = if has_chat {
            Format::Chat
        } else if has("prompt") && has("completion") {
            Format::PromptCompletion
        } else if has("instruction") && has("output") {
            Format::Alpaca
        } else if has("text") {
            Format::Text
        } else {
            return Err(format!(
                "cannot tell the dataset's format: {}; expected `messages` (chat), \
                 `conversations` (ShareGPT), `prompt` + `completion`, `instruction` + `output` \
                 (Alpaca) or `text`. Name your columns with DataConfig::columns, e.g. \
                 ColumnMap::prompt_completion(\"question\", \"answer\")",
                found()
            ));
        };
        return Ok(detected);
    }
    let missing: Vec<&str> = forced
        .required_columns()
        .iter()
        .filter(|ours| !(has(ours) || (**ours == "messages" && has_chat)))
        .map(|ours| map.get(ours))
        .collect();
    if missing.is_empty() {
        Ok(forced)
    } else {
        Err(format!(
            "missing column {} needed by the {forced} format; {}. Map your column names with \
             DataConfig::columns (e.g. ColumnMap::new().with(\"{}\", \"your_column\"))",
            quoted(&missing),
            found(),
            forced.required_columns()[0]
        ))
    }
}

fn has_conversations(columns: &[String]) -> bool {
    columns.iter().any(|c| c == "conversations")
}

/// The column chat rows are read from.
pub(crate) fn messages_column<'a>(columns: &[String], map: &'a ColumnMap) -> &'a str {
    let ours = map.get("messages");
    if map.is_mapped("messages") || columns.iter().any(|c| c == ours) {
        ours
    } else {
        "conversations"
    }
}

/// One row as a record plus its optional per-row system prompt. Errors name the field.
pub(crate) fn row_to_record(
    row: &Map<String, Value>,
    format: Format,
    columns: &[String],
    map: &ColumnMap,
) -> std::result::Result<(Record, Option<String>), String> {
    let system = optional_string(row, map.get("system"))?.filter(|s| !s.is_empty());
    let record = match format {
        Format::Chat => {
            let col = messages_column(columns, map);
            Record::Chat(messages(row, col, map)?)
        }
        Format::PromptCompletion => Record::PromptCompletion {
            prompt: required_string(row, map.get("prompt"))?,
            completion: required_string(row, map.get("completion"))?,
        },
        Format::Alpaca => Record::Alpaca {
            instruction: required_string(row, map.get("instruction"))?,
            input: optional_string(row, map.get("input"))?.unwrap_or_default(),
            output: required_string(row, map.get("output"))?,
        },
        Format::Text => Record::Text(required_string(row, map.get("text"))?),
        Format::Auto => unreachable!("the format is resolved before rows are read"),
    };
    record.validate()?;
    Ok((record, system))
}

fn required_string(row: &Map<String, Value>, col: &str) -> std::result::Result<String, String> {
    match row.get(col) {
        None => Err(format!(
            "field `{col}` is missing; add it to the row (or map another column to it)"
        )),
        Some(Value::Null) => Err(format!(
            "field `{col}` is null (an empty cell); fill it in or remove the row"
        )),
        Some(v) => scalar_string(v)
            .ok_or_else(|| format!("field `{col}` must be a string, found {}", json_kind(v))),
    }
}

fn optional_string(
    row: &Map<String, Value>,
    col: &str,
) -> std::result::Result<Option<String>, String> {
    match row.get(col) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => scalar_string(v)
            .map(Some)
            .ok_or_else(|| format!("field `{col}` must be a string, found {}", json_kind(v))),
    }
}

/// Strings as they are; numbers and booleans as written (a numeric label is still a label).
fn scalar_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The message list of a chat row: OpenAI `{role, content}` or ShareGPT `{from, value}`
/// (human → user, gpt → assistant). A CSV cell holding the list as a JSON string is accepted.
fn messages(
    row: &Map<String, Value>,
    col: &str,
    map: &ColumnMap,
) -> std::result::Result<Vec<Message>, String> {
    let parsed;
    let list = match row.get(col) {
        None => {
            return Err(format!(
                "field `{col}` is missing; add the conversation as a list of messages"
            ))
        }
        Some(Value::Null) => return Err(format!("field `{col}` is null; add the conversation")),
        Some(Value::Array(list)) => list,
        Some(Value::String(s)) => {
            parsed = serde_json::from_str::<Value>(s).map_err(|e| {
                format!("field `{col}` is a string but not a JSON list of messages: {e}")
            })?;
            match &parsed {
                Value::Array(list) => list,
                other => {
                    return Err(format!(
                        "field `{col}` must be a list of messages, found {}",
                        json_kind(other)
                    ))
                }
            }
        }
        Some(other) => {
            return Err(format!(
                "field `{col}` must be a list of messages, found {}",
                json_kind(other)
            ))
        }
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let Value::Object(m) = m else {
            return Err(format!(
                "message {} of `{col}` must be an object with `role` and `content`, found {}",
                i + 1,
                json_kind(m)
            ));
        };
        let key = |ours: &'static str, sharegpt: &'static str| -> &str {
            if map.is_mapped(ours) || m.contains_key(ours) {
                map.get(ours)
            } else if m.contains_key(sharegpt) {
                sharegpt
            } else {
                map.get(ours)
            }
        };
        let (role_key, content_key) = (key("role", "from"), key("content", "value"));
        let role = match m.get(role_key) {
            Some(Value::String(r)) => r.as_str(),
            _ => {
                return Err(format!(
                    "message {} of `{col}` has no string `{role_key}` (keys found: {})",
                    i + 1,
                    quoted(&m.keys().collect::<Vec<_>>())
                ))
            }
        };
        let role = match role {
            "human" => "user",
            "gpt" => "assistant",
            other => other,
        };
        let content = match m.get(content_key) {
            Some(Value::String(c)) => c.clone(),
            Some(Value::Null) | None => {
                return Err(format!(
                    "message {} of `{col}` ({role}) has no `{content_key}`",
                    i + 1
                ))
            }
            Some(other) => {
                return Err(format!(
                    "message {} of `{col}` ({role}): `{content_key}` must be a string, found {}",
                    i + 1,
                    json_kind(other)
                ))
            }
        };
        out.push(Message::new(role, content));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cols(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn formats_are_detected_from_columns() {
        let m = ColumnMap::new();
        let detect = |c: &[&str]| resolve_format(Format::Auto, &cols(c), &m);
        assert_eq!(detect(&["messages"]), Ok(Format::Chat));
        assert_eq!(detect(&["conversations", "id"]), Ok(Format::Chat));
        assert_eq!(
            detect(&["prompt", "completion"]),
            Ok(Format::PromptCompletion)
        );
        assert_eq!(
            detect(&["instruction", "input", "output"]),
            Ok(Format::Alpaca)
        );
        assert_eq!(detect(&["text", "id"]), Ok(Format::Text));
        let err = detect(&["question", "answer"]).unwrap_err();
        assert!(err.contains("`question`, `answer`"), "{err}");
        let mapped = ColumnMap::prompt_completion("question", "answer");
        assert_eq!(
            resolve_format(Format::Auto, &cols(&["question", "answer"]), &mapped),
            Ok(Format::PromptCompletion)
        );
        let err =
            resolve_format(Format::PromptCompletion, &cols(&["prompt", "x"]), &m).unwrap_err();
        assert!(
            err.contains("missing column `completion`") && err.contains("`x`"),
            "{err}"
        );
    }

    #[test]
    fn rows_become_records_with_field_errors() {
        let m = ColumnMap::new();
        let c = cols(&["conversations"]);
        let row = json!({"conversations": [{"from": "system", "value": "s"},
            {"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]});
        let (rec, sys) = row_to_record(row.as_object().unwrap(), Format::Chat, &c, &m).unwrap();
        assert_eq!(
            rec,
            Record::Chat(vec![
                Message::system("s"),
                Message::user("hi"),
                Message::assistant("yo")
            ])
        );
        assert_eq!(sys, None);

        let c = cols(&["prompt", "completion"]);
        let row = json!({"prompt": "p", "completion": ""});
        let err =
            row_to_record(row.as_object().unwrap(), Format::PromptCompletion, &c, &m).unwrap_err();
        assert!(err.contains("`completion` is empty"), "{err}");
        let row = json!({"prompt": null, "completion": "c"});
        let err =
            row_to_record(row.as_object().unwrap(), Format::PromptCompletion, &c, &m).unwrap_err();
        assert!(err.contains("`prompt` is null"), "{err}");
        let row = json!({"prompt": "p", "completion": 7});
        let (rec, _) =
            row_to_record(row.as_object().unwrap(), Format::PromptCompletion, &c, &m).unwrap();
        assert_eq!(rec, Record::prompt_completion("p", "7"));

        let row = json!({"instruction": "i", "output": "o", "system": "be kind"});
        let (rec, sys) = row_to_record(
            row.as_object().unwrap(),
            Format::Alpaca,
            &cols(&["instruction", "output", "system"]),
            &m,
        )
        .unwrap();
        assert_eq!(rec, Record::alpaca("i", "", "o"));
        assert_eq!(sys.as_deref(), Some("be kind"));

        let row = json!({"messages": "[{\"role\": \"user\", \"content\": \"q\"}]"});
        let err = row_to_record(
            row.as_object().unwrap(),
            Format::Chat,
            &cols(&["messages"]),
            &m,
        )
        .unwrap_err();
        assert!(err.contains("no assistant message"), "{err}");
        let row = json!({"messages": [{"role": "tool", "content": "q"}]});
        let err = row_to_record(
            row.as_object().unwrap(),
            Format::Chat,
            &cols(&["messages"]),
            &m,
        )
        .unwrap_err();
        assert!(err.contains("role `tool`"), "{err}");
    }
}
