//! What a dataset looks like (format, column names) and how to turn it into training examples.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The layout of a dataset's rows.
///
/// | format | columns | trained on |
/// |---|---|---|
/// | [`Format::Chat`] | `messages`: a list of `{role, content}` (OpenAI roles) — or ShareGPT's `conversations`: `{from: human\|gpt\|system, value}` | every assistant turn |
/// | [`Format::PromptCompletion`] | `prompt`, `completion` (strings) | the completion |
/// | [`Format::Alpaca`] | `instruction`, `input` (optional, may be empty), `output` | the output |
/// | [`Format::Text`] | `text` | every token |
///
/// An optional `system` column (any format but text) adds a per-row system message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// Detected from the column names (in the order chat, prompt/completion, Alpaca, text).
    #[default]
    Auto,
    /// Conversations.
    Chat,
    /// Prompt and completion strings (TRL's prompt-completion datasets).
    PromptCompletion,
    /// Instruction, optional input, output (the Alpaca layout).
    Alpaca,
    /// Plain text, trained on entirely (continued pre-training).
    Text,
}

impl Format {
    /// The columns (by our names) a row of this format must have.
    pub fn required_columns(self) -> &'static [&'static str] {
        match self {
            Format::Auto => &[],
            Format::Chat => &["messages"],
            Format::PromptCompletion => &["prompt", "completion"],
            Format::Alpaca => &["instruction", "output"],
            Format::Text => &["text"],
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Auto => "auto",
            Format::Chat => "chat",
            Format::PromptCompletion => "prompt/completion",
            Format::Alpaca => "alpaca",
            Format::Text => "text",
        })
    }
}

/// The names [`ColumnMap`] can map, with what they mean.
pub const COLUMN_ROLES: &[(&str, &str)] = &[
    (
        "messages",
        "chat: list of messages (ShareGPT's `conversations` is found on its own)",
    ),
    ("prompt", "prompt/completion: the prompt"),
    ("completion", "prompt/completion: the completion"),
    ("instruction", "alpaca: the instruction"),
    ("input", "alpaca: the optional input"),
    ("output", "alpaca: the answer"),
    ("text", "text: the text"),
    ("system", "any format: a per-row system prompt"),
    (
        "role",
        "chat: the key of a message's role (default `role`, or ShareGPT's `from`)",
    ),
    (
        "content",
        "chat: the key of a message's text (default `content`, or ShareGPT's `value`)",
    ),
];

/// Which column of the dataset holds which part of an example: our name → the dataset's name,
/// as TRL's and Axolotl's column mappings do. Names not mapped are looked up as they are.
///
/// ```
/// use qlora::data::ColumnMap;
/// let map = ColumnMap::prompt_completion("question", "answer").with("system", "persona");
/// assert_eq!(map.get("prompt"), "question");
/// assert_eq!(map.get("text"), "text");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ColumnMap(BTreeMap<String, String>);

impl ColumnMap {
    /// No renaming.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps our name `ours` (see [`COLUMN_ROLES`]) to the dataset's column `theirs`.
    pub fn with(mut self, ours: impl Into<String>, theirs: impl Into<String>) -> Self {
        self.0.insert(ours.into(), theirs.into());
        self
    }

    /// Chat rows whose messages are in column `messages`.
    pub fn chat(messages: &str) -> Self {
        Self::new().with("messages", messages)
    }

    /// Prompt/completion rows from columns `prompt` and `completion`.
    pub fn prompt_completion(prompt: &str, completion: &str) -> Self {
        Self::new()
            .with("prompt", prompt)
            .with("completion", completion)
    }

    /// Alpaca rows from columns `instruction`, `input` and `output`.
    pub fn alpaca(instruction: &str, input: &str, output: &str) -> Self {
        Self::new()
            .with("instruction", instruction)
            .with("input", input)
            .with("output", output)
    }

    /// Plain-text rows from column `text`.
    pub fn text(text: &str) -> Self {
        Self::new().with("text", text)
    }

    /// The dataset's name for our name `ours`.
    pub fn get<'a>(&'a self, ours: &'a str) -> &'a str {
        self.0.get(ours).map(String::as_str).unwrap_or(ours)
    }

    /// Whether `ours` was mapped explicitly.
    pub fn is_mapped(&self, ours: &str) -> bool {
        self.0.contains_key(ours)
    }

    /// The explicit mappings, ours → theirs.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Our names that are not in [`COLUMN_ROLES`] (a typo such as `"completions"`).
    pub(crate) fn unknown_names(&self) -> Vec<&str> {
        self.0
            .keys()
            .map(String::as_str)
            .filter(|k| !COLUMN_ROLES.iter().any(|(name, _)| name == k))
            .collect()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for ColumnMap {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Self(
            iter.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

/// How to read a dataset and turn it into training examples.
///
/// ```
/// use qlora::data::{ColumnMap, DataConfig, Format};
/// let config = DataConfig::default()
///     .columns(ColumnMap::prompt_completion("question", "answer"))
///     .max_seq_len(256)
///     .validation_split(0.1)
///     .skip_invalid_rows(true);
/// assert_eq!(config.format, Format::Auto);
/// assert_eq!(config.seed, 42);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DataConfig {
    /// The row layout; [`Format::Auto`] detects it from the column names.
    pub format: Format,
    /// Renamed columns.
    pub columns: ColumnMap,
    /// Longer examples are cut from the right to this many tokens (and counted). Default 512
    /// (TRL's `max_length` is 1024; 512 keeps CPU training of small models quick).
    pub max_seq_len: usize,
    /// Render chat, prompt/completion and Alpaca rows with the model's chat template (when it
    /// has one) and train on the assistant's tokens only. Default true, as TRL does for
    /// conversational data. Without a template, prompt and completion are joined as plain text.
    pub use_chat_template: bool,
    /// A system message put before every conversation that has none.
    pub system_prompt: Option<String>,
    /// The share of examples held out for validation, in [0, 1). Default 0.
    pub validation_split: f64,
    /// Seed of the train/validation split.
    pub seed: u64,
    /// Skip rows that cannot be used (malformed JSON, missing or empty fields), counting each
    /// as a warning in the report, instead of failing on the first. Default false.
    pub skip_invalid_rows: bool,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            format: Format::Auto,
            columns: ColumnMap::default(),
            max_seq_len: 512,
            use_chat_template: true,
            system_prompt: None,
            validation_split: 0.0,
            seed: 42,
            skip_invalid_rows: false,
        }
    }
}

impl DataConfig {
    /// Forces the row layout.
    pub fn format(mut self, format: Format) -> Self {
        self.format = format;
        self
    }

    /// Sets the column mapping.
    pub fn columns(mut self, columns: ColumnMap) -> Self {
        self.columns = columns;
        self
    }

    /// Sets the maximum sequence length in tokens.
    pub fn max_seq_len(mut self, max_seq_len: usize) -> Self {
        self.max_seq_len = max_seq_len;
        self
    }

    /// Whether to use the model's chat template.
    pub fn use_chat_template(mut self, use_chat_template: bool) -> Self {
        self.use_chat_template = use_chat_template;
        self
    }

    /// Sets a system message for conversations that have none.
    pub fn system_prompt(mut self, system_prompt: impl Into<String>) -> Self {
        self.system_prompt = Some(system_prompt.into());
        self
    }

    /// Holds out this share of the examples for validation.
    pub fn validation_split(mut self, share: f64) -> Self {
        self.validation_split = share;
        self
    }

    /// Sets the split seed.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Skips unusable rows with a warning instead of failing.
    pub fn skip_invalid_rows(mut self, skip: bool) -> Self {
        self.skip_invalid_rows = skip;
        self
    }

    /// Checks the values that can be wrong on their own.
    pub(crate) fn validate(&self) -> crate::Result<()> {
        if self.max_seq_len < 2 {
            return Err(crate::Error::InvalidArgument(format!(
                "DataConfig::max_seq_len is {}; it must be at least 2 (one input and one target \
                 token)",
                self.max_seq_len
            )));
        }
        if !(0.0..1.0).contains(&self.validation_split) {
            return Err(crate::Error::InvalidArgument(format!(
                "DataConfig::validation_split is {}; it must be in [0, 1), e.g. 0.1 for 10 %",
                self.validation_split
            )));
        }
        let unknown = self.columns.unknown_names();
        if !unknown.is_empty() {
            let known: Vec<&str> = COLUMN_ROLES.iter().map(|(n, _)| *n).collect();
            return Err(crate::Error::InvalidArgument(format!(
                "ColumnMap maps unknown name(s) {}: the names it maps from are ours ({}), \
                 the names it maps to are the dataset's columns",
                quoted(&unknown),
                known.join(", ")
            )));
        }
        Ok(())
    }
}

/// `a`, `b`, `c` — names in backquotes, comma-separated.
pub(crate) fn quoted<S: AsRef<str>>(names: &[S]) -> String {
    names
        .iter()
        .map(|n| format!("`{}`", n.as_ref()))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_serde_round_trip_and_validation() {
        let c = DataConfig::default()
            .format(Format::Alpaca)
            .columns(ColumnMap::alpaca("q", "ctx", "a"))
            .system_prompt("Be brief.")
            .validation_split(0.2);
        let json = serde_json::to_string(&c).unwrap();
        assert!(json.contains("\"alpaca\""), "{json}");
        let back: DataConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, c);
        let partial: DataConfig = serde_json::from_str("{\"max_seq_len\": 64}").unwrap();
        assert_eq!(partial.max_seq_len, 64);
        assert!(partial.use_chat_template);

        assert!(DataConfig::default().validate().is_ok());
        let err = DataConfig::default()
            .validation_split(1.0)
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("validation_split"), "{err}");
        let err = DataConfig::default()
            .columns(ColumnMap::new().with("completions", "answer"))
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("`completions`"), "{err}");
    }
}
