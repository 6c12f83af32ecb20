//! Signatures: the named, typed input and output fields of a task plus its instructions —
//! DSPy's `dspy.Signature`.
//!
//! ```
//! use qlora::prompt::{FieldType, Signature};
//! let qa = Signature::parse("context, question -> answer")?;
//! assert_eq!(qa.instructions(), "Given the fields `context`, `question`, produce the fields `answer`.");
//!
//! let typed = Signature::parse("question: str, n: int -> answer: list[str], confident: bool")?;
//! assert_eq!(typed.output("answer").unwrap().ty, FieldType::ListStr);
//!
//! let intent = Signature::builder()
//!     .input_desc("text", "a customer message")
//!     .output_typed("label", FieldType::literal(["billing", "technical", "other"]), "the intent")
//!     .instructions("Classify the support ticket.")
//!     .build()?;
//! assert_eq!(intent.outputs().len(), 1);
//! # Ok::<(), qlora::Error>(())
//! ```

use std::fmt;

use serde::{Deserialize, Serialize};

use super::py::{cleandoc, str_repr};
use crate::{Error, Result};

/// The type of a field, as DSPy annotates it (`str`, `int`, `float`, `bool`, `list[str]`,
/// `Literal[...]`). Inputs of any type are shown to the LM as text; outputs are parsed back
/// into the type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldType {
    /// Free text (`str`), the default.
    Str,
    /// A whole number (`int`).
    Int,
    /// A number (`float`).
    Float,
    /// `True` or `False` (`bool`).
    Bool,
    /// A JSON list of strings (`list[str]`).
    ListStr,
    /// One of a fixed set of labels (`Literal['a', 'b']`).
    Literal(Vec<String>),
}

impl FieldType {
    /// A `Literal` of `labels`.
    pub fn literal<S: Into<String>>(labels: impl IntoIterator<Item = S>) -> Self {
        FieldType::Literal(labels.into_iter().map(Into::into).collect())
    }

    /// Parses a Python annotation: `str`, `int`, `float`, `bool`, `list[str]` (or `List[str]`),
    /// `Literal['a', "b"]`.
    pub fn parse(text: &str) -> Result<Self> {
        let t = text.trim();
        Ok(match t {
            "str" => FieldType::Str,
            "int" => FieldType::Int,
            "float" => FieldType::Float,
            "bool" => FieldType::Bool,
            "list[str]" | "List[str]" => FieldType::ListStr,
            _ if t.starts_with("Literal[") && t.ends_with(']') => {
                FieldType::Literal(parse_literal_labels(&t["Literal[".len()..t.len() - 1])?)
            }
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "unsupported field type `{t}`: use str, int, float, bool, list[str] or Literal['a', 'b']"
                )))
            }
        })
    }

    /// The annotation as DSPy prints it (`Literal['a', 'b']`, `list[str]`, ...).
    pub fn annotation_name(&self) -> String {
        match self {
            FieldType::Str => "str".into(),
            FieldType::Int => "int".into(),
            FieldType::Float => "float".into(),
            FieldType::Bool => "bool".into(),
            FieldType::ListStr => "list[str]".into(),
            FieldType::Literal(labels) => format!(
                "Literal[{}]",
                labels
                    .iter()
                    .map(|l| quoted_literal(l))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// The note DSPy appends to an output field's placeholder (`translate_field_type`).
    pub(crate) fn output_note(&self) -> Option<String> {
        match self {
            FieldType::Str => None,
            FieldType::Bool => Some("must be True or False".into()),
            FieldType::Int => Some("must be a single int value".into()),
            FieldType::Float => Some("must be a single float value".into()),
            FieldType::Literal(labels) => Some(format!(
                "must exactly match (no extra characters) one of: {}",
                labels.join("; ")
            )),
            FieldType::ListStr => Some(
                "must adhere to the JSON schema: {\"type\": \"array\", \"items\": {\"type\": \"string\"}}"
                    .into(),
            ),
        }
    }
}

/// DSPy's `_quoted_string_for_literal_type_annotation`.
fn quoted_literal(s: &str) -> String {
    let single = s.contains('\'');
    let double = s.contains('"');
    match (single, double) {
        (true, false) => format!("\"{s}\""),
        (true, true) => format!("'{}'", s.replace('\'', "\\'")),
        _ => format!("'{s}'"),
    }
}

/// Parses `'a', "b", 'c'` (Python string literals separated by commas).
fn parse_literal_labels(body: &str) -> Result<Vec<String>> {
    let bad = || {
        Error::InvalidArgument(format!(
            "cannot read Literal labels from `{body}`: write them as quoted strings, e.g. Literal['yes', 'no']"
        ))
    };
    let mut labels = Vec::new();
    let mut chars = body.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let Some(quote) = chars.next() else { break };
        if quote != '\'' && quote != '"' {
            return Err(bad());
        }
        let mut label = String::new();
        loop {
            match chars.next().ok_or_else(bad)? {
                '\\' => label.push(chars.next().ok_or_else(bad)?),
                c if c == quote => break,
                c => label.push(c),
            }
        }
        labels.push(label);
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        match chars.next() {
            None => break,
            Some(',') => continue,
            Some(_) => return Err(bad()),
        }
    }
    if labels.is_empty() {
        return Err(bad());
    }
    Ok(labels)
}

/// Whether a field is given to the LM or produced by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldRole {
    /// An input field (`dspy.InputField`).
    Input,
    /// An output field (`dspy.OutputField`).
    Output,
}

/// One field of a signature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Field {
    /// The field's name (a Python identifier).
    pub name: String,
    /// Input or output.
    pub role: FieldRole,
    /// Its type.
    pub ty: FieldType,
    /// Its description, shown after the name in the system message (`desc=`).
    pub desc: Option<String>,
    /// DSPy's legacy prefix (`Question:`), kept only for saved state.
    pub prefix: String,
}

impl Field {
    fn new(name: &str, role: FieldRole, ty: FieldType, desc: Option<String>) -> Self {
        Self {
            name: name.to_string(),
            role,
            ty,
            desc,
            prefix: format!("{}:", infer_prefix(name)),
        }
    }

    /// The description DSPy stores: the given one or `${name}`.
    pub fn description(&self) -> String {
        self.desc
            .clone()
            .unwrap_or_else(|| format!("${{{}}}", self.name))
    }
}

/// DSPy's `infer_prefix`: `camelCaseText` → `Camel Case Text`, `text2number` → `Text 2 Number`.
pub fn infer_prefix(name: &str) -> String {
    // (.)([A-Z][a-z]+) -> \1_\2
    let chars: Vec<char> = name.chars().collect();
    let mut s1 = String::new();
    let mut i = 0;
    while i < chars.len() {
        s1.push(chars[i]);
        if i + 2 < chars.len() + 1
            && i + 1 < chars.len()
            && chars[i + 1].is_ascii_uppercase()
            && chars.get(i + 2).is_some_and(|c| c.is_ascii_lowercase())
        {
            s1.push('_');
        }
        i += 1;
    }
    let chars: Vec<char> = s1.chars().collect();
    let mut s2 = String::new();
    for (i, &c) in chars.iter().enumerate() {
        s2.push(c);
        if let Some(&next) = chars.get(i + 1) {
            let lower_or_digit = c.is_ascii_lowercase() || c.is_ascii_digit();
            if lower_or_digit && next.is_ascii_uppercase() {
                s2.push('_');
            }
        }
    }
    let chars: Vec<char> = s2.chars().collect();
    let mut s3 = String::new();
    for (i, &c) in chars.iter().enumerate() {
        s3.push(c);
        if let Some(&next) = chars.get(i + 1) {
            if (c.is_ascii_alphabetic() && next.is_ascii_digit())
                || (c.is_ascii_digit() && next.is_ascii_alphabetic())
            {
                s3.push('_');
            }
        }
    }
    s3.split('_')
        .map(|w| {
            let has_cased = w.chars().any(|c| c.is_alphabetic());
            if has_cased && w.chars().all(|c| !c.is_lowercase()) {
                w.to_string()
            } else {
                let mut cs = w.chars();
                match cs.next() {
                    Some(f) => f
                        .to_uppercase()
                        .chain(cs.flat_map(char::to_lowercase))
                        .collect(),
                    None => String::new(),
                }
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A task's input and output fields and its instructions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signature {
    inputs: Vec<Field>,
    outputs: Vec<Field>,
    instructions: String,
}

/// DSPy's default instructions: ``Given the fields `a`, `b`, produce the fields `c`.``
pub fn default_instructions(inputs: &[Field], outputs: &[Field]) -> String {
    let names = |fs: &[Field]| {
        fs.iter()
            .map(|f| format!("`{}`", f.name))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "Given the fields {}, produce the fields {}.",
        names(inputs),
        names(outputs)
    )
}

fn is_identifier(s: &str) -> bool {
    let mut cs = s.chars();
    cs.next().is_some_and(|c| c == '_' || c.is_alphabetic())
        && cs.all(|c| c == '_' || c.is_alphanumeric())
}

/// Splits `a: int, b: Literal['x, y', 'z']` at top-level commas.
fn split_fields(s: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut quote: Option<char> = None;
    let mut cur = String::new();
    for c in s.chars() {
        match quote {
            Some(q) => {
                if c == q {
                    quote = None;
                }
                cur.push(c);
            }
            None => match c {
                '\'' | '"' => {
                    quote = Some(c);
                    cur.push(c);
                }
                '[' | '(' => {
                    depth += 1;
                    cur.push(c);
                }
                ']' | ')' => {
                    depth -= 1;
                    cur.push(c);
                }
                ',' if depth == 0 => parts.push(std::mem::take(&mut cur)),
                c => cur.push(c),
            },
        }
    }
    parts.push(cur);
    parts
        .into_iter()
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

fn parse_field_list(s: &str, role: FieldRole, whole: &str) -> Result<Vec<Field>> {
    split_fields(s)
        .into_iter()
        .map(|part| {
            let (name, ty) = match part.split_once(':') {
                Some((n, t)) => (n.trim().to_string(), FieldType::parse(t)?),
                None => (part.clone(), FieldType::Str),
            };
            if !is_identifier(&name) {
                return Err(Error::InvalidArgument(format!(
                    "signature `{whole}`: `{name}` is not a valid field name (letters, digits, _)"
                )));
            }
            Ok(Field::new(&name, role, ty, None))
        })
        .collect()
}

impl Signature {
    /// Parses DSPy's string form: `"question -> answer"`, `"context, question -> reasoning,
    /// answer"`, typed `"question: str, n: int -> answer: list[str]"`. Instructions default to
    /// DSPy's ``Given the fields `question`, produce the fields `answer`.``
    pub fn parse(text: &str) -> Result<Self> {
        if text.matches("->").count() != 1 {
            return Err(Error::InvalidArgument(format!(
                "invalid signature `{text}`: it must contain exactly one `->`, as in \"question -> answer\""
            )));
        }
        let (ins, outs) = text.split_once("->").unwrap();
        let inputs = parse_field_list(ins, FieldRole::Input, text)?;
        let outputs = parse_field_list(outs, FieldRole::Output, text)?;
        Self::from_fields(inputs, outputs, None)
    }

    /// A signature from fields and optional instructions (`None`: DSPy's default).
    pub fn from_fields(
        inputs: Vec<Field>,
        outputs: Vec<Field>,
        instructions: Option<&str>,
    ) -> Result<Self> {
        let mut seen = std::collections::HashSet::new();
        for f in inputs.iter().chain(&outputs) {
            if !seen.insert(f.name.clone()) {
                return Err(Error::InvalidArgument(format!(
                    "field `{}` appears twice: input and output fields must have distinct names",
                    f.name
                )));
            }
        }
        let instructions = match instructions {
            Some(i) => cleandoc(i),
            None => default_instructions(&inputs, &outputs),
        };
        Ok(Self {
            inputs,
            outputs,
            instructions,
        })
    }

    /// A builder for typed fields with descriptions.
    pub fn builder() -> SignatureBuilder {
        SignatureBuilder::default()
    }

    /// The same fields with new instructions (DSPy's `with_instructions`; cleaned with
    /// `inspect.cleandoc` as DSPy does).
    pub fn with_instructions(mut self, instructions: &str) -> Self {
        self.instructions = cleandoc(instructions);
        self
    }

    /// Sets an existing field's description (DSPy's `with_updated_fields(name, desc=...)`).
    pub fn with_desc(mut self, field: &str, desc: &str) -> Result<Self> {
        let f = self
            .inputs
            .iter_mut()
            .chain(self.outputs.iter_mut())
            .find(|f| f.name == field)
            .ok_or_else(|| Error::InvalidArgument(format!("signature has no field `{field}`")))?;
        f.desc = Some(desc.to_string());
        Ok(self)
    }

    /// A copy with an output field inserted first (DSPy's `prepend`), keeping the instructions.
    pub fn prepend_output(&self, name: &str, ty: FieldType, desc: Option<&str>) -> Result<Self> {
        let mut outputs = vec![Field::new(
            name,
            FieldRole::Output,
            ty,
            desc.map(str::to_string),
        )];
        outputs.extend(self.outputs.iter().cloned());
        Self::from_fields(self.inputs.clone(), outputs, Some(&self.instructions))
    }

    /// The instructions (the task description in the system message).
    pub fn instructions(&self) -> &str {
        &self.instructions
    }

    /// The input fields, in order.
    pub fn inputs(&self) -> &[Field] {
        &self.inputs
    }

    /// The output fields, in order.
    pub fn outputs(&self) -> &[Field] {
        &self.outputs
    }

    /// All fields, inputs first.
    pub fn fields(&self) -> impl Iterator<Item = &Field> {
        self.inputs.iter().chain(&self.outputs)
    }

    /// The input field `name`.
    pub fn input(&self, name: &str) -> Option<&Field> {
        self.inputs.iter().find(|f| f.name == name)
    }

    /// The output field `name`.
    pub fn output(&self, name: &str) -> Option<&Field> {
        self.outputs.iter().find(|f| f.name == name)
    }

    /// DSPy's saved form (`Signature.dump_state()`): instructions and each field's prefix and
    /// description.
    pub fn dump_state(&self) -> serde_json::Value {
        serde_json::json!({
            "instructions": self.instructions,
            "fields": self.fields().map(|f| serde_json::json!({
                "prefix": f.prefix,
                "description": f.description(),
            })).collect::<Vec<_>>(),
        })
    }

    /// Restores instructions, prefixes and descriptions saved by [`Signature::dump_state`]
    /// (fields are matched by position, as DSPy does).
    pub fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        let bad = |m: &str| Error::InvalidArgument(format!("saved signature state: {m}"));
        let instructions = state["instructions"]
            .as_str()
            .ok_or_else(|| bad("`instructions` is missing or not a string"))?;
        self.instructions = instructions.to_string();
        let fields = state["fields"]
            .as_array()
            .ok_or_else(|| bad("`fields` is missing or not a list"))?;
        for (f, saved) in self
            .inputs
            .iter_mut()
            .chain(self.outputs.iter_mut())
            .zip(fields)
        {
            if let Some(p) = saved["prefix"].as_str() {
                f.prefix = p.to_string();
            }
            if let Some(d) = saved["description"].as_str() {
                f.desc = (d != format!("${{{}}}", f.name)).then(|| d.to_string());
            }
        }
        Ok(())
    }
}

impl fmt::Display for Signature {
    /// `question: str -> answer: int`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |fs: &[Field]| {
            fs.iter()
                .map(|x| format!("{}: {}", x.name, x.ty.annotation_name()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        write!(f, "{} -> {}", list(&self.inputs), list(&self.outputs))
    }
}

impl std::str::FromStr for Signature {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Signature::parse(s)
    }
}

/// Builds a [`Signature`] field by field.
#[derive(Debug, Clone, Default)]
pub struct SignatureBuilder {
    inputs: Vec<Field>,
    outputs: Vec<Field>,
    instructions: Option<String>,
}

impl SignatureBuilder {
    /// Adds a `str` input field.
    pub fn input(self, name: &str) -> Self {
        self.field(name, FieldRole::Input, FieldType::Str, None)
    }
    /// Adds a `str` input field with a description.
    pub fn input_desc(self, name: &str, desc: &str) -> Self {
        self.field(name, FieldRole::Input, FieldType::Str, Some(desc))
    }
    /// Adds an input field of type `ty` with a description (empty: none).
    pub fn input_typed(self, name: &str, ty: FieldType, desc: &str) -> Self {
        let desc = (!desc.is_empty()).then_some(desc);
        self.field(name, FieldRole::Input, ty, desc)
    }
    /// Adds a `str` output field.
    pub fn output(self, name: &str) -> Self {
        self.field(name, FieldRole::Output, FieldType::Str, None)
    }
    /// Adds a `str` output field with a description.
    pub fn output_desc(self, name: &str, desc: &str) -> Self {
        self.field(name, FieldRole::Output, FieldType::Str, Some(desc))
    }
    /// Adds an output field of type `ty` with a description (empty: none).
    pub fn output_typed(self, name: &str, ty: FieldType, desc: &str) -> Self {
        let desc = (!desc.is_empty()).then_some(desc);
        self.field(name, FieldRole::Output, ty, desc)
    }
    /// Adds any field.
    pub fn field(mut self, name: &str, role: FieldRole, ty: FieldType, desc: Option<&str>) -> Self {
        let f = Field::new(name, role, ty, desc.map(str::to_string));
        match role {
            FieldRole::Input => self.inputs.push(f),
            FieldRole::Output => self.outputs.push(f),
        }
        self
    }
    /// Sets the instructions (default: DSPy's "Given the fields ..." sentence).
    pub fn instructions(mut self, text: &str) -> Self {
        self.instructions = Some(text.to_string());
        self
    }
    /// Checks the names and builds the signature.
    pub fn build(self) -> Result<Signature> {
        for f in self.inputs.iter().chain(&self.outputs) {
            if !is_identifier(&f.name) {
                return Err(Error::InvalidArgument(format!(
                    "`{}` is not a valid field name (letters, digits, _)",
                    f.name
                )));
            }
        }
        Signature::from_fields(self.inputs, self.outputs, self.instructions.as_deref())
    }
}

/// Python's quoting of a label, for messages.
pub(crate) fn label_repr(s: &str) -> String {
    str_repr(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_defaults() {
        let s = Signature::parse("context, question -> reasoning, answer").unwrap();
        assert_eq!(
            s.instructions(),
            "Given the fields `context`, `question`, produce the fields `reasoning`, `answer`."
        );
        let t = Signature::parse("s -> l: Literal['a, b', \"it's\"]").unwrap();
        assert_eq!(
            t.outputs()[0].ty,
            FieldType::Literal(vec!["a, b".into(), "it's".into()])
        );
        assert_eq!(
            t.outputs()[0].ty.annotation_name(),
            "Literal['a, b', \"it's\"]"
        );
        assert!(Signature::parse("a -> b -> c").is_err());
        assert!(Signature::parse("a -> a").is_err());
        assert!(Signature::parse("a -> b: dict").is_err());
    }

    #[test]
    fn prefixes_like_dspy() {
        for (name, want) in [
            ("question", "Question"),
            ("camelCaseText", "Camel Case Text"),
            ("snake_case_text", "Snake Case Text"),
            ("text2number", "Text 2 Number"),
            ("HTMLParser", "HTML Parser"),
            ("doc2", "Doc 2"),
        ] {
            assert_eq!(infer_prefix(name), want, "{name}");
        }
    }
}
