//! `LoraConfig`: PEFT's LoRA configuration, with its field names and defaults, read from and
//! written to `adapter_config.json`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::{Error, Result};

/// Which linear layers get adapters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Module names; a module matches when its full name equals one or ends with `.name`.
    List(Vec<String>),
    /// `"all-linear"` (every linear layer but the output head), or a regular expression that
    /// must match a module's full name entirely.
    Pattern(String),
}

/// How adapter weights start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InitLoraWeights {
    /// `true`: A kaiming-uniform, B zero (the adapter starts as a no-op). `false`: both random.
    Bool(bool),
    /// `"gaussian"`: A ~ N(0, (1/r)²), B zero.
    Name(String),
}

/// An int or a list of ints (PEFT accepts both for `layers_to_transform`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Layers {
    One(usize),
    Many(Vec<usize>),
}

impl Layers {
    fn contains(&self, layer: usize) -> bool {
        match self {
            Self::One(l) => *l == layer,
            Self::Many(ls) => ls.contains(&layer),
        }
    }
}

/// PEFT's `LoraConfig`. `Default` equals PEFT's defaults (r=8, alpha=8, dropout 0); see
/// [`LoraConfig::qlora`] for the QLoRA recipe (r=16, alpha=32, q/v, dropout 0.05).
///
/// ```
/// use qlora::lora::LoraConfig;
/// let cfg = LoraConfig::qlora();
/// assert_eq!((cfg.r, cfg.lora_alpha, cfg.lora_dropout), (16, 32.0, 0.05));
/// assert_eq!(cfg.scaling(), 2.0);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    #[serde(default = "lora_str")]
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub revision: Option<String>,
    #[serde(default)]
    pub inference_mode: bool,
    /// Rank of the update.
    #[serde(default = "eight")]
    pub r: usize,
    /// The update is scaled by `lora_alpha / r` (or `/ √r` with rslora).
    #[serde(
        default = "eight_f",
        serialize_with = "number_as_written",
        deserialize_with = "any_number"
    )]
    pub lora_alpha: f64,
    /// Dropout on the adapter's input, in training only.
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// Only `"none"` is supported (biases stay frozen).
    #[serde(default = "none_str")]
    pub bias: String,
    /// Scale by `alpha / √r` instead of `alpha / r`.
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default = "init_true")]
    pub init_lora_weights: InitLoraWeights,
    /// Modules trained in full beside the adapters (PEFT's rule: every module whose name ends
    /// with one of these strings, e.g. `["lm_head", "embed_tokens"]` after adding tokens).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Only these layer indices get adapters.
    #[serde(default)]
    pub layers_to_transform: Option<Layers>,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, Value>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, Value>,
    /// Keys PEFT writes that we don't interpret; kept so a round trip loses nothing.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

fn lora_str() -> String {
    "LORA".into()
}
fn none_str() -> String {
    "none".into()
}
fn eight() -> usize {
    8
}
fn eight_f() -> f64 {
    8.0
}
fn init_true() -> InitLoraWeights {
    InitLoraWeights::Bool(true)
}

/// Writes integral values as integers, as Python does for `lora_alpha=32`.
fn number_as_written<S: Serializer>(v: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        s.serialize_i64(*v as i64)
    } else {
        s.serialize_f64(*v)
    }
}

fn any_number<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    let v = Value::deserialize(d)?;
    v.as_f64()
        .ok_or_else(|| serde::de::Error::custom(format!("expected a number, found {v}")))
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            peft_type: lora_str(),
            task_type: Some("CAUSAL_LM".into()),
            base_model_name_or_path: None,
            revision: None,
            inference_mode: false,
            r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: None,
            bias: none_str(),
            use_rslora: false,
            init_lora_weights: init_true(),
            modules_to_save: None,
            layers_to_transform: None,
            fan_in_fan_out: false,
            use_dora: false,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            extra: BTreeMap::new(),
        }
    }
}

impl LoraConfig {
    /// The QLoRA reference recipe: r=16, alpha=32, q_proj and v_proj, dropout 0.05.
    pub fn qlora() -> Self {
        Self {
            r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.05,
            target_modules: Some(TargetModules::List(vec!["q_proj".into(), "v_proj".into()])),
            ..Self::default()
        }
    }

    /// Sets the rank.
    pub fn r(mut self, r: usize) -> Self {
        self.r = r;
        self
    }
    /// Sets `lora_alpha`.
    pub fn lora_alpha(mut self, alpha: f64) -> Self {
        self.lora_alpha = alpha;
        self
    }
    /// Sets the dropout.
    pub fn lora_dropout(mut self, p: f64) -> Self {
        self.lora_dropout = p;
        self
    }
    /// Trains these modules in full beside the adapters (`["lm_head", "embed_tokens"]`).
    pub fn modules_to_save<S: Into<String>>(mut self, names: impl IntoIterator<Item = S>) -> Self {
        self.modules_to_save = Some(names.into_iter().map(Into::into).collect());
        self
    }
    /// Targets modules by name (`["q_proj", "v_proj"]`).
    pub fn target_modules<S: Into<String>>(mut self, names: impl IntoIterator<Item = S>) -> Self {
        self.target_modules = Some(TargetModules::List(
            names.into_iter().map(Into::into).collect(),
        ));
        self
    }
    /// Targets every linear layer except the output head.
    pub fn all_linear(mut self) -> Self {
        self.target_modules = Some(TargetModules::Pattern("all-linear".into()));
        self
    }
    /// Targets modules whose full name matches the regular expression entirely.
    pub fn target_regex(mut self, pattern: impl Into<String>) -> Self {
        self.target_modules = Some(TargetModules::Pattern(pattern.into()));
        self
    }
    /// Switches rank-stabilised scaling on or off.
    pub fn use_rslora(mut self, on: bool) -> Self {
        self.use_rslora = on;
        self
    }
    /// Restricts adapters to these layer indices.
    pub fn layers_to_transform(mut self, layers: Vec<usize>) -> Self {
        self.layers_to_transform = Some(Layers::Many(layers));
        self
    }
    /// Gaussian initialisation of A.
    pub fn gaussian_init(mut self) -> Self {
        self.init_lora_weights = InitLoraWeights::Name("gaussian".into());
        self
    }

    /// The factor the update `B A x` is multiplied by.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// Checks the configuration for values we cannot honour, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(format!("LoraConfig: {m}")));
        if self.peft_type != "LORA" {
            return bad(format!(
                "peft_type is `{}`, only `LORA` is supported",
                self.peft_type
            ));
        }
        if self.r == 0 {
            return bad("r must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad(format!(
                "lora_dropout must be in [0, 1), got {}",
                self.lora_dropout
            ));
        }
        if self.bias != "none" {
            return bad(format!(
                "bias `{}` is not supported; use \"none\"",
                self.bias
            ));
        }
        if self.use_dora {
            return bad("use_dora is not supported".into());
        }
        if self.fan_in_fan_out {
            return bad("fan_in_fan_out is only for GPT-2 style Conv1D layers".into());
        }
        if !self.rank_pattern.is_empty() || !self.alpha_pattern.is_empty() {
            return bad("rank_pattern / alpha_pattern are not supported yet".into());
        }
        if let Some(names) = &self.modules_to_save {
            if names.iter().any(|n| n.is_empty()) {
                return bad("modules_to_save has an empty name".into());
            }
        }
        if let InitLoraWeights::Name(n) = &self.init_lora_weights {
            if n != "gaussian" {
                return bad(format!(
                    "init_lora_weights `{n}` is not supported (true, false, \"gaussian\")"
                ));
            }
        }
        if let Some(TargetModules::Pattern(p)) = &self.target_modules {
            if p != "all-linear" {
                regex::Regex::new(p).map_err(|e| {
                    Error::InvalidArgument(format!("LoraConfig: target_modules regex: {e}"))
                })?;
            }
        }
        Ok(())
    }

    /// Whether the module `name` (e.g. `model.layers.3.self_attn.q_proj`) in layer `layer`
    /// gets an adapter. `None` targets mean PEFT's default for Llama-family models: q and v.
    pub fn targets(&self, name: &str, layer: usize) -> bool {
        if let Some(layers) = &self.layers_to_transform {
            if !layers.contains(layer) {
                return false;
            }
        }
        let short_match = |t: &str| name == t || name.ends_with(&format!(".{t}"));
        match &self.target_modules {
            None => short_match("q_proj") || short_match("v_proj"),
            Some(TargetModules::List(names)) => names.iter().any(|t| short_match(t)),
            Some(TargetModules::Pattern(p)) if p == "all-linear" => !name.ends_with("lm_head"),
            Some(TargetModules::Pattern(p)) => regex::Regex::new(&format!("^(?:{p})$"))
                .map(|re| re.is_match(name))
                .unwrap_or(false),
        }
    }

    /// Whether module `name` (e.g. `lm_head`, `model.layers.0.input_layernorm`) is trained in
    /// full: PEFT's plain suffix match, so `"norm"` selects every norm of the model.
    pub fn saves_module(&self, name: &str) -> bool {
        self.modules_to_save
            .iter()
            .flatten()
            .any(|suffix| name.ends_with(suffix.as_str()))
    }

    /// Reads `adapter_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: Self = serde_json::from_str(&text)
            .map_err(|e| Error::config(path, format!("is not a valid PEFT adapter config: {e}")))?;
        cfg.validate()
            .map_err(|e| Error::config(path, e.to_string()))?;
        Ok(cfg)
    }

    /// The JSON PEFT writes: keys sorted, two-space indent.
    pub fn to_json_string(&self) -> Result<String> {
        // serde_json's map is ordered by key, which gives json.dumps(sort_keys=True) order.
        let value =
            serde_json::to_value(self).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        serde_json::to_string_pretty(&value).map_err(|e| Error::InvalidArgument(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_recipe() {
        let d = LoraConfig::default();
        assert_eq!((d.r, d.lora_alpha, d.lora_dropout), (8, 8.0, 0.0));
        let q = LoraConfig::qlora();
        assert!(q.targets("model.layers.0.self_attn.q_proj", 0));
        assert!(!q.targets("model.layers.0.self_attn.k_proj", 0));
        assert_eq!(q.clone().use_rslora(true).scaling(), 8.0);
    }

    #[test]
    fn matching_rules() {
        let all = LoraConfig::default().all_linear();
        assert!(all.targets("model.layers.1.mlp.down_proj", 1));
        assert!(!all.targets("lm_head", 0));
        let re = LoraConfig::default().target_regex(r".*\.layers\.1\..*(q|v)_proj");
        assert!(re.targets("model.layers.1.self_attn.q_proj", 1));
        assert!(!re.targets("model.layers.11.self_attn.q_proj", 11));
        let only1 = LoraConfig::qlora().layers_to_transform(vec![1]);
        assert!(!only1.targets("model.layers.0.self_attn.q_proj", 0));
        assert!(only1.targets("model.layers.1.self_attn.q_proj", 1));
    }

    #[test]
    fn json_round_trip_keeps_unknown_keys_and_integer_alpha() {
        let text = r#"{"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"],
                      "megatron_core": "megatron.core", "task_type": "CAUSAL_LM"}"#;
        let cfg: LoraConfig = serde_json::from_str(text).unwrap();
        assert_eq!(cfg.lora_alpha, 32.0);
        let out = cfg.to_json_string().unwrap();
        assert!(out.contains("\"lora_alpha\": 32,"), "{out}");
        assert!(
            out.contains("\"megatron_core\": \"megatron.core\""),
            "{out}"
        );
        let back: LoraConfig = serde_json::from_str(&out).unwrap();
        assert_eq!(back, cfg);
    }

    #[test]
    fn unsupported_values_are_named() {
        let err = LoraConfig {
            use_dora: true,
            ..LoraConfig::qlora()
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("use_dora"));
        let err = LoraConfig::qlora()
            .lora_dropout(1.5)
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("lora_dropout"));
    }
}
