//! Examples (DSPy's `dspy.Example`): named values, some of them marked as inputs; and
//! predictions (`dspy.Prediction`): the output fields a program produced.
//!
//! ```
//! use qlora::prompt::Example;
//! let ex = Example::new()
//!     .with("question", "What is 2+2?")
//!     .with("answer", "4")
//!     .with_inputs(&["question"]);
//! assert_eq!(ex.inputs().keys(), ["question"]);
//! assert_eq!(ex.labels().get_str("answer").as_deref(), Some("4"));
//! ```

use std::fmt;

use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use super::py::py_str;
use crate::display::{emit_html, escape_html};
use crate::{Error, Result};

/// Named values in insertion order, with an optional set of input keys.
///
/// Two examples are equal when they hold the same keys and values (in any order), as DSPy's
/// `Example.__eq__` compares its store; the input keys do not take part.
#[derive(Debug, Clone, Default)]
pub struct Example {
    fields: Vec<(String, Value)>,
    input_keys: Option<Vec<String>>,
}

impl PartialEq for Example {
    fn eq(&self, other: &Self) -> bool {
        self.fields.len() == other.fields.len()
            && self
                .fields
                .iter()
                .all(|(k, v)| other.get(k).is_some_and(|o| o == v))
    }
}

impl Example {
    /// An empty example.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) `key`, builder style.
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.set(key, value);
        self
    }

    /// Sets `key` to `value`, keeping its position when it already exists.
    pub fn set(&mut self, key: &str, value: impl Into<Value>) {
        let value = value.into();
        match self.fields.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.fields.push((key.to_string(), value)),
        }
    }

    /// Removes `key`, returning its value.
    pub fn remove(&mut self, key: &str) -> Option<Value> {
        let i = self.fields.iter().position(|(k, _)| k == key)?;
        Some(self.fields.remove(i).1)
    }

    /// Marks `keys` as the inputs (DSPy's `with_inputs`).
    pub fn with_inputs(mut self, keys: &[&str]) -> Self {
        self.input_keys = Some(keys.iter().map(|k| k.to_string()).collect());
        self
    }

    /// The keys marked as inputs, if any were.
    pub fn input_keys(&self) -> Option<&[String]> {
        self.input_keys.as_deref()
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.fields.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The value of `key` as text (strings as they are, other values as Python's `str()`).
    pub fn get_str(&self, key: &str) -> Option<String> {
        self.get(key).map(py_str)
    }

    /// Whether `key` is present.
    pub fn contains(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// The keys, in order.
    pub fn keys(&self) -> Vec<&str> {
        self.fields.iter().map(|(k, _)| k.as_str()).collect()
    }

    /// The (key, value) pairs, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.fields.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Number of fields.
    pub fn len(&self) -> usize {
        self.fields.len()
    }

    /// Whether there are no fields.
    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// Only the input fields (DSPy's `inputs()`), still marked as inputs. It is an error in
    /// DSPy to ask for inputs before `with_inputs`; here that returns an empty example, and
    /// optimisers and `Evaluate` check it for you with a clear message.
    pub fn inputs(&self) -> Example {
        let keys = self.input_keys.clone().unwrap_or_default();
        Example {
            fields: self
                .fields
                .iter()
                .filter(|(k, _)| keys.contains(k))
                .cloned()
                .collect(),
            input_keys: Some(keys),
        }
    }

    /// Everything but the inputs (DSPy's `labels()`).
    pub fn labels(&self) -> Example {
        let keys = self.input_keys.clone().unwrap_or_default();
        Example {
            fields: self
                .fields
                .iter()
                .filter(|(k, _)| !keys.contains(k))
                .cloned()
                .collect(),
            input_keys: None,
        }
    }

    pub(crate) fn require_inputs(&self, what: &str, index: usize) -> Result<()> {
        if self.input_keys.is_none() {
            return Err(Error::InvalidArgument(format!(
                "{what} example {index} has no input keys: call .with_inputs(&[\"question\"]) on it"
            )));
        }
        Ok(())
    }

    /// The example as a JSON object (DSPy's `toDict()`; keys in order when written).
    pub fn to_json(&self) -> Value {
        Value::Object(self.fields.iter().cloned().collect())
    }

    /// An example from a JSON object.
    pub fn from_json(v: &Value) -> Result<Self> {
        let map = v.as_object().ok_or_else(|| {
            Error::InvalidArgument(format!("an example must be a JSON object, got {v}"))
        })?;
        Ok(Self {
            fields: map.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            input_keys: None,
        })
    }

    fn html(&self) -> String {
        let mut html = String::from("<table style=\"border-collapse:collapse\">");
        for (k, v) in &self.fields {
            let input = self.input_keys.as_ref().is_some_and(|ks| ks.contains(k));
            html.push_str(&format!(
                "<tr><th style=\"text-align:left;padding:2px 12px 2px 0;vertical-align:top\">{}{}</th>\
                 <td style=\"text-align:left;white-space:pre-wrap\">{}</td></tr>",
                escape_html(k),
                if input { " (input)" } else { "" },
                escape_html(&py_str(v))
            ));
        }
        html.push_str("</table>");
        html
    }

    /// Shows the example as a table in a notebook.
    pub fn evcxr_display(&self) {
        emit_html(&self.html());
    }
}

impl<K: Into<String>, V: Into<Value>> FromIterator<(K, V)> for Example {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut ex = Example::new();
        for (k, v) in iter {
            ex.set(&k.into(), v);
        }
        ex
    }
}

impl Serialize for Example {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.fields.len()))?;
        for (k, v) in &self.fields {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Example {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        Example::from_json(&v).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Example {
    /// `Example({'question': 'What is 2+2?', 'answer': '4'}) (input_keys={'question'})`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let body = self
            .fields
            .iter()
            .map(|(k, v)| format!("{}: {}", super::py::str_repr(k), super::py::py_repr(v)))
            .collect::<Vec<_>>()
            .join(", ");
        write!(f, "Example({{{body}}})")?;
        if let Some(keys) = &self.input_keys {
            write!(f, " (input_keys={keys:?})")?;
        }
        Ok(())
    }
}

/// What a program returned: its output fields (from the first completion) and every
/// completion when several were asked for (`n > 1`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Prediction {
    /// The output fields of the first completion.
    pub fields: Example,
    /// All completions, parsed (the first equals `fields`).
    pub completions: Vec<Example>,
}

impl Prediction {
    /// A prediction from parsed completions (DSPy's `Prediction.from_completions`).
    pub fn from_completions(completions: Vec<Example>) -> Self {
        Self {
            fields: completions.first().cloned().unwrap_or_default(),
            completions,
        }
    }

    /// A prediction holding `fields` only.
    pub fn from_fields(fields: Example) -> Self {
        Self {
            completions: vec![fields.clone()],
            fields,
        }
    }

    /// The output `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.fields.get(key)
    }

    /// The output `key` as text.
    pub fn get_str(&self, key: &str) -> Option<String> {
        self.fields.get_str(key)
    }

    /// Shows the prediction as a table in a notebook.
    pub fn evcxr_display(&self) {
        emit_html(&self.fields.html());
    }
}

impl fmt::Display for Prediction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let body = self
            .fields
            .iter()
            .map(|(k, v)| format!("    {k}={}", super::py::py_repr(v)))
            .collect::<Vec<_>>()
            .join(",\n");
        write!(f, "Prediction(\n{body}\n)")
    }
}
