//! Metrics: how good a prediction is for an example, as a number (1.0/0.0 for pass/fail).
//! The built-ins follow DSPy's: [`ExactMatch`] (`example.answer == pred.answer`),
//! [`AnswerExactMatch`] (`dspy.evaluate.answer_exact_match`, normalised), [`AnswerF1`]
//! (token F1), and any closure through [`metric_fn`].
//!
//! ```
//! use qlora::prompt::{metric_fn, normalize_text, AnswerExactMatch, Example, Metric, Prediction};
//! assert_eq!(normalize_text("The,  Eiffel  Tower!"), "eiffel tower");
//! let ex = Example::new().with("answer", "Eiffel Tower");
//! let pred = Prediction::from_fields(Example::new().with("answer", "the eiffel tower"));
//! assert_eq!(AnswerExactMatch::new("answer").score(&ex, &pred, None), 1.0);
//! let short = metric_fn("short", |_ex, pred| (pred.get_str("answer").unwrap_or_default().len() < 20) as u8 as f64);
//! assert_eq!(short.score(&ex, &pred, None), 1.0);
//! ```

use std::collections::HashMap;

use serde_json::Value;

use super::example::{Example, Prediction};
use super::predict::TraceStep;

/// Scores a prediction against an example. `trace` holds the predictor calls when an
/// optimiser is bootstrapping (DSPy passes it so a metric can be stricter then).
pub trait Metric: Send + Sync {
    /// The score (bool metrics: 1.0 or 0.0).
    fn score(&self, example: &Example, prediction: &Prediction, trace: Option<&[TraceStep]>)
        -> f64;

    /// The metric's name (the score column of `Evaluate`'s table).
    fn name(&self) -> String;
}

/// A metric from a closure over (example, prediction) (cloneable when the closure is).
#[derive(Clone)]
pub struct MetricFn<F> {
    name: String,
    f: F,
}

/// Wraps `f(example, prediction) -> score` as a [`Metric`] called `name`.
pub fn metric_fn<F>(name: &str, f: F) -> MetricFn<F>
where
    F: Fn(&Example, &Prediction) -> f64 + Send + Sync,
{
    MetricFn {
        name: name.to_string(),
        f,
    }
}

impl<F> Metric for MetricFn<F>
where
    F: Fn(&Example, &Prediction) -> f64 + Send + Sync,
{
    fn score(
        &self,
        example: &Example,
        prediction: &Prediction,
        _trace: Option<&[TraceStep]>,
    ) -> f64 {
        (self.f)(example, prediction)
    }
    fn name(&self) -> String {
        self.name.clone()
    }
}

/// `example[field] == prediction[field]` as text, after trimming whitespace.
#[derive(Debug, Clone)]
pub struct ExactMatch {
    /// The field compared.
    pub field: String,
}

impl ExactMatch {
    /// Compares `field`.
    pub fn new(field: &str) -> Self {
        Self {
            field: field.to_string(),
        }
    }
}

impl Metric for ExactMatch {
    fn score(
        &self,
        example: &Example,
        prediction: &Prediction,
        _trace: Option<&[TraceStep]>,
    ) -> f64 {
        match (
            example.get_str(&self.field),
            prediction.get_str(&self.field),
        ) {
            (Some(a), Some(b)) => (a.trim() == b.trim()) as u8 as f64,
            _ => 0.0,
        }
    }
    fn name(&self) -> String {
        format!("exact_match({})", self.field)
    }
}

/// DSPy's `normalize_text`: Unicode NFD, lower case, ASCII punctuation removed, the articles
/// a/an/the removed, whitespace collapsed.
pub fn normalize_text(s: &str) -> String {
    let mut n = tokenizers::NormalizedString::from(s);
    n.nfd();
    let lower = n.get().to_lowercase();
    let no_punct: String = lower
        .chars()
        .filter(|c| !c.is_ascii_punctuation())
        .collect();
    let no_articles = remove_articles(&no_punct);
    no_articles
        .split(super::py::is_py_space)
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `re.sub(r"\b(a|an|the)\b", " ", text)` with Python's idea of word characters
/// (alphanumerics and `_`; combining marks are not word characters, unlike in Rust's regex).
fn remove_articles(text: &str) -> String {
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    'outer: while i < chars.len() {
        if i == 0 || !is_word(chars[i - 1]) {
            for alt in ["a", "an", "the"] {
                let alt: Vec<char> = alt.chars().collect();
                let end = i + alt.len();
                if chars.get(i..end) == Some(&alt[..])
                    && chars.get(end).is_none_or(|c| !is_word(*c))
                {
                    out.push(' ');
                    i = end;
                    continue 'outer;
                }
            }
        }
        out.push(chars[i]);
        i += 1;
    }
    out
}

/// DSPy's `f1_score`: token-level F1 of the normalised texts (0 when nothing overlaps).
pub fn f1_score(prediction: &str, ground_truth: &str) -> f64 {
    let p = normalize_text(prediction);
    let g = normalize_text(ground_truth);
    let pt: Vec<&str> = p.split(' ').filter(|w| !w.is_empty()).collect();
    let gt: Vec<&str> = g.split(' ').filter(|w| !w.is_empty()).collect();
    let mut counts: HashMap<&str, (usize, usize)> = HashMap::new();
    for w in &pt {
        counts.entry(w).or_default().0 += 1;
    }
    for w in &gt {
        counts.entry(w).or_default().1 += 1;
    }
    let same: usize = counts.values().map(|(a, b)| (*a).min(*b)).sum();
    if same == 0 {
        return 0.0;
    }
    let precision = same as f64 / pt.len() as f64;
    let recall = same as f64 / gt.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// DSPy's `em_score`: the normalised texts are equal.
pub fn em_score(prediction: &str, ground_truth: &str) -> bool {
    normalize_text(prediction) == normalize_text(ground_truth)
}

/// The reference answers of a field: a string, or any of a list of strings.
fn references(v: &Value) -> Vec<String> {
    match v {
        Value::Array(items) => items.iter().map(super::py::py_str).collect(),
        other => vec![super::py::py_str(other)],
    }
}

/// The best `score(predicted, reference)` over the example's reference(s) in `field`; 0 when
/// either side lacks the field.
fn best_over_references(
    example: &Example,
    prediction: &Prediction,
    field: &str,
    score: impl Fn(&str, &str) -> f64,
) -> f64 {
    let (Some(gold), Some(pred)) = (example.get(field), prediction.get_str(field)) else {
        return 0.0;
    };
    references(gold)
        .iter()
        .map(|r| score(&pred, r))
        .fold(0.0, f64::max)
}

/// DSPy's `answer_exact_match`: with `frac >= 1`, normalised exact match against the answer
/// (or any of a list of answers); otherwise the best token F1 must reach `frac`.
#[derive(Debug, Clone)]
pub struct AnswerExactMatch {
    /// The field compared (DSPy: `answer`).
    pub field: String,
    /// 1.0: exact match; lower: F1 threshold.
    pub frac: f64,
}

impl AnswerExactMatch {
    /// Normalised exact match on `field`.
    pub fn new(field: &str) -> Self {
        Self {
            field: field.to_string(),
            frac: 1.0,
        }
    }

    /// Accepts a token F1 of at least `frac` instead.
    pub fn frac(mut self, frac: f64) -> Self {
        self.frac = frac;
        self
    }
}

impl Metric for AnswerExactMatch {
    fn score(
        &self,
        example: &Example,
        prediction: &Prediction,
        _trace: Option<&[TraceStep]>,
    ) -> f64 {
        let ok = if self.frac >= 1.0 {
            best_over_references(example, prediction, &self.field, |p, r| {
                em_score(p, r) as u8 as f64
            }) == 1.0
        } else {
            best_over_references(example, prediction, &self.field, f1_score) >= self.frac
        };
        ok as u8 as f64
    }
    fn name(&self) -> String {
        "answer_exact_match".into()
    }
}

/// The best token F1 of the prediction's `field` against the example's answer(s) (DSPy's `F1`).
#[derive(Debug, Clone)]
pub struct AnswerF1 {
    /// The field compared.
    pub field: String,
}

impl AnswerF1 {
    /// F1 on `field`.
    pub fn new(field: &str) -> Self {
        Self {
            field: field.to_string(),
        }
    }
}

impl Metric for AnswerF1 {
    fn score(
        &self,
        example: &Example,
        prediction: &Prediction,
        _trace: Option<&[TraceStep]>,
    ) -> f64 {
        best_over_references(example, prediction, &self.field, f1_score)
    }
    fn name(&self) -> String {
        "f1".into()
    }
}
