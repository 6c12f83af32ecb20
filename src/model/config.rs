//! The decoder's configuration, read from a Hugging Face `config.json` (transformers 4 or 5
//! layout) or from GGUF metadata.

use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::DType;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Error, Result};

/// The model families our decoder implements. They share one block layout (pre-norm, GQA
/// attention with RoPE, SwiGLU MLP) and differ in details the config carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

impl Architecture {
    /// The names accepted in `config.json`'s `architectures` / `model_type`.
    pub const SUPPORTED: &'static str =
        "LlamaForCausalLM (llama), MistralForCausalLM (mistral), Qwen2ForCausalLM (qwen2)";

    fn from_hf_name(name: &str) -> Option<Self> {
        match name {
            "LlamaForCausalLM" | "llama" => Some(Self::Llama),
            "MistralForCausalLM" | "mistral" => Some(Self::Mistral),
            "Qwen2ForCausalLM" | "qwen2" => Some(Self::Qwen2),
            _ => None,
        }
    }

    /// transformers' class name for this architecture.
    pub fn hf_class(&self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Mistral => "MistralForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
        }
    }

    /// transformers' `model_type`.
    pub fn model_type(&self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
        }
    }
}

/// How RoPE frequencies are adjusted for long contexts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Llama 3.x: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// Positions divided by `factor`.
    Linear { factor: f64 },
}

/// Everything the decoder needs to know about the shapes and constants of a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2, or Llama with `attention_bias`).
    pub attention_bias: bool,
    /// Tokens beyond this distance are not attended to (Mistral); `None` means unlimited.
    pub sliding_window: Option<usize>,
    /// The dtype the checkpoint declares (`dtype` / `torch_dtype`), if any.
    pub stored_dtype: Option<String>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// Reads typed fields out of a JSON object, naming the file and field in every error.
struct Fields<'a> {
    path: &'a Path,
    obj: &'a serde_json::Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn usize(&self, key: &str) -> Result<usize> {
        let v = self
            .get(key)
            .ok_or_else(|| Error::config(self.path, format!("missing required field `{key}`")))?;
        v.as_u64().map(|x| x as usize).ok_or_else(|| {
            Error::config(
                self.path,
                format!("field `{key}` must be a non-negative integer, found {v}"),
            )
        })
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.usize(key).map(Some),
        }
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                Error::config(
                    self.path,
                    format!("field `{key}` must be a number, found {v}"),
                )
            }),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| {
                Error::config(
                    self.path,
                    format!("field `{key}` must be true or false, found {v}"),
                )
            }),
        }
    }

    fn opt_str(&self, key: &str) -> Option<&'a str> {
        self.get(key).and_then(|v| v.as_str())
    }

    /// `eos_token_id` may be an integer or a list of integers.
    fn token_ids(&self, key: &str) -> Result<Vec<u32>> {
        let bad = |v: &Value| {
            Error::config(
                self.path,
                format!("field `{key}` must be a token id or a list of token ids, found {v}"),
            )
        };
        match self.get(key) {
            None => Ok(vec![]),
            Some(Value::Array(items)) => items
                .iter()
                .map(|x| x.as_u64().map(|x| x as u32).ok_or_else(|| bad(x)))
                .collect(),
            Some(v) => v.as_u64().map(|x| vec![x as u32]).ok_or_else(|| bad(v)),
        }
    }
}

fn read_json_object(path: &Path) -> Result<serde_json::Map<String, Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(obj)) => Ok(obj),
        Ok(_) => Err(Error::config(
            path,
            "expected a JSON object at the top level",
        )),
        Err(e) => Err(Error::config(
            path,
            format!("is not valid JSON ({e}); re-download or regenerate the file"),
        )),
    }
}

impl ModelConfig {
    /// Parses a Hugging Face `config.json`.
    ///
    /// Accepts transformers 5's layout (`rope_parameters`, `dtype`) and the older one
    /// (top-level `rope_theta` / `rope_scaling`, `torch_dtype`).
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let obj = read_json_object(path)?;
        Self::from_hf_json(path, &obj)
    }

    fn from_hf_json(path: &Path, obj: &serde_json::Map<String, Value>) -> Result<Self> {
        let f = Fields { path, obj };
        let arch_name = f
            .get("architectures")
            .and_then(|a| a.as_array())
            .and_then(|a| a.first())
            .and_then(|a| a.as_str())
            .or_else(|| f.opt_str("model_type"))
            .ok_or_else(|| {
                Error::config(
                    path,
                    "missing `architectures` and `model_type`: cannot tell which model this is",
                )
            })?;
        let architecture = Architecture::from_hf_name(arch_name).ok_or_else(|| {
            Error::config(
                path,
                format!(
                    "unknown architecture `{arch_name}`; supported: {}",
                    Architecture::SUPPORTED
                ),
            )
        })?;

        let hidden_size = f.usize("hidden_size")?;
        let num_attention_heads = f.usize("num_attention_heads")?;
        if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
            return Err(Error::config(
                path,
                format!(
                    "`hidden_size` ({hidden_size}) must be a positive multiple of \
                     `num_attention_heads` ({num_attention_heads})"
                ),
            ));
        }
        let num_key_value_heads = f
            .opt_usize("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(Error::config(
                path,
                format!(
                    "`num_attention_heads` ({num_attention_heads}) must be a multiple of \
                     `num_key_value_heads` ({num_key_value_heads})"
                ),
            ));
        }
        let head_dim = f
            .opt_usize("head_dim")?
            .unwrap_or(hidden_size / num_attention_heads);

        // transformers 5 nests rope settings in `rope_parameters`; older files keep
        // `rope_theta` at the top level and scaling in `rope_scaling`.
        let rope_params = f.get("rope_parameters").and_then(|v| v.as_object());
        let rope_theta = match rope_params.and_then(|p| p.get("rope_theta")) {
            Some(v) => v.as_f64().ok_or_else(|| {
                Error::config(
                    path,
                    format!("`rope_parameters.rope_theta` must be a number, found {v}"),
                )
            })?,
            None => f.opt_f64("rope_theta")?.unwrap_or(10_000.0),
        };
        let scaling_obj = rope_params
            .cloned()
            .or_else(|| f.get("rope_scaling").and_then(|v| v.as_object()).cloned());
        let rope_scaling = match scaling_obj {
            Some(s) => parse_rope_scaling(path, &s)?,
            None => None,
        };

        let stored_dtype = f
            .opt_str("dtype")
            .or_else(|| f.opt_str("torch_dtype"))
            .map(str::to_string);
        let attention_bias = match architecture {
            Architecture::Qwen2 => true,
            _ => f.opt_bool("attention_bias")?.unwrap_or(false),
        };
        let sliding_window = match architecture {
            Architecture::Mistral => f.opt_usize("sliding_window")?,
            // Qwen2 declares a window but only applies it with `use_sliding_window: true`.
            Architecture::Qwen2 if f.opt_bool("use_sliding_window")?.unwrap_or(false) => {
                f.opt_usize("sliding_window")?
            }
            _ => None,
        };
        if f.opt_bool("mlp_bias")?.unwrap_or(false) {
            return Err(Error::config(path, "`mlp_bias: true` is not supported yet"));
        }

        let cfg = Self {
            architecture,
            hidden_size,
            intermediate_size: f.usize("intermediate_size")?,
            num_hidden_layers: f.usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: f.usize("vocab_size")?,
            max_position_embeddings: f.opt_usize("max_position_embeddings")?.unwrap_or(4096),
            rms_norm_eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            attention_bias,
            sliding_window,
            stored_dtype,
            bos_token_id: f.token_ids("bos_token_id")?.first().copied(),
            eos_token_ids: f.token_ids("eos_token_id")?,
        };
        Ok(cfg)
    }

    /// Reads `generation_config.json` beside a config and takes its eos/bos ids, which
    /// transformers prefers over config.json's.
    pub fn apply_generation_config(&mut self, path: &Path) -> Result<()> {
        let obj = read_json_object(path)?;
        let f = Fields { path, obj: &obj };
        let eos = f.token_ids("eos_token_id")?;
        if !eos.is_empty() {
            self.eos_token_ids = eos;
        }
        if let Some(bos) = f.token_ids("bos_token_id")?.first() {
            self.bos_token_id = Some(*bos);
        }
        Ok(())
    }

    /// Builds the config from GGUF metadata (`general.architecture` = llama | mistral | qwen2).
    pub fn from_gguf(path: &Path, content: &gguf_file::Content) -> Result<Self> {
        let md = &content.metadata;
        let missing = |key: &str| {
            Error::config(
                path,
                format!(
                    "GGUF metadata lacks `{key}`; the file is incomplete or not a language model"
                ),
            )
        };
        let get_str = |key: &str| -> Result<String> {
            md.get(key)
                .ok_or_else(|| missing(key))?
                .to_string()
                .cloned()
                .map_err(|e| Error::config(path, format!("GGUF metadata `{key}`: {e}")))
        };
        let arch_name = get_str("general.architecture")?;
        let architecture = Architecture::from_hf_name(&arch_name).ok_or_else(|| {
            Error::config(
                path,
                format!(
                    "unknown GGUF architecture `{arch_name}`; supported: llama, mistral, qwen2"
                ),
            )
        })?;
        let get_u = |key: &str| -> Result<usize> {
            let full = format!("{arch_name}.{key}");
            let v = md.get(&full).ok_or_else(|| missing(&full))?;
            v.to_u64()
                .or_else(|_| v.to_u32().map(u64::from))
                .or_else(|_| v.to_i32().map(|x| x.max(0) as u64))
                .map(|x| x as usize)
                .map_err(|e| Error::config(path, format!("GGUF metadata `{full}`: {e}")))
        };
        let get_f = |key: &str| -> Result<Option<f64>> {
            let full = format!("{arch_name}.{key}");
            match md.get(&full) {
                None => Ok(None),
                Some(v) => v
                    .to_f32()
                    .map(f64::from)
                    .or_else(|_| v.to_f64())
                    .map(Some)
                    .map_err(|e| Error::config(path, format!("GGUF metadata `{full}`: {e}"))),
            }
        };
        let hidden_size = get_u("embedding_length")?;
        let num_attention_heads = get_u("attention.head_count")?;
        let num_key_value_heads = get_u("attention.head_count_kv").unwrap_or(num_attention_heads);
        if num_attention_heads == 0 || num_key_value_heads == 0 {
            return Err(Error::config(
                path,
                "GGUF metadata declares zero attention heads",
            ));
        }
        let head_dim = get_u("attention.key_length")
            .or_else(|_| get_u("rope.dimension_count"))
            .unwrap_or(hidden_size / num_attention_heads);
        let vocab_size = match get_u("vocab_size") {
            Ok(v) => v,
            Err(_) => md
                .get("tokenizer.ggml.tokens")
                .and_then(|t| t.to_vec().ok())
                .map(|t| t.len())
                .ok_or_else(|| missing(&format!("{arch_name}.vocab_size")))?,
        };
        let tied = !content.tensor_infos.contains_key("output.weight");
        let rope_scaling = match md
            .get(&format!("{arch_name}.rope.scaling.type"))
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
        {
            Some("linear") => {
                get_f("rope.scaling.factor")?.map(|factor| RopeScaling::Linear { factor })
            }
            _ => None,
        };
        let token_id = |key: &str| {
            md.get(key).and_then(|v| {
                v.to_u32()
                    .ok()
                    .or_else(|| v.to_i32().ok().map(|x| x as u32))
            })
        };
        Ok(Self {
            architecture,
            hidden_size,
            intermediate_size: get_u("feed_forward_length")?,
            num_hidden_layers: get_u("block_count")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            max_position_embeddings: get_u("context_length").unwrap_or(4096),
            rms_norm_eps: get_f("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
            rope_theta: get_f("rope.freq_base")?.unwrap_or(10_000.0),
            rope_scaling,
            tie_word_embeddings: tied,
            attention_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            sliding_window: None,
            stored_dtype: None,
            bos_token_id: token_id("tokenizer.ggml.bos_token_id"),
            eos_token_ids: token_id("tokenizer.ggml.eos_token_id")
                .into_iter()
                .collect(),
        })
    }

    /// The dtype named by `dtype` / `torch_dtype`, if candle knows it.
    pub fn stored_candle_dtype(&self) -> Option<DType> {
        match self.stored_dtype.as_deref()? {
            "float32" => Some(DType::F32),
            "float16" => Some(DType::F16),
            "bfloat16" => Some(DType::BF16),
            _ => None,
        }
    }

    /// Inverse frequencies of RoPE, `head_dim / 2` of them, after any scaling.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim;
        let base: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / d as f64))
            .collect();
        match &self.rope_scaling {
            None => base,
            Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let old_len = *original_max_position_embeddings as f64;
                let low_freq_wavelen = old_len / low_freq_factor;
                let high_freq_wavelen = old_len / high_freq_factor;
                base.iter()
                    .map(|&freq| {
                        let wavelen = 2.0 * std::f64::consts::PI / freq;
                        if wavelen < high_freq_wavelen {
                            freq
                        } else if wavelen > low_freq_wavelen {
                            freq / factor
                        } else {
                            let smooth = (old_len / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * freq / factor + smooth * freq
                        }
                    })
                    .collect()
            }
        }
    }

    /// Number of parameters the architecture implies (embeddings counted once when tied).
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let bias = if self.attention_bias { q + 2 * kv } else { 0 };
        let attn = h * q + 2 * h * kv + q * h + bias;
        let mlp = 3 * h * self.intermediate_size;
        let per_layer = attn + mlp + 2 * h;
        let embed = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + head + h + per_layer * self.num_hidden_layers
    }
}

fn parse_rope_scaling(
    path: &Path,
    s: &serde_json::Map<String, Value>,
) -> Result<Option<RopeScaling>> {
    let f = Fields { path, obj: s };
    let kind = f
        .opt_str("rope_type")
        .or_else(|| f.opt_str("type"))
        .unwrap_or("default");
    let factor = || {
        f.opt_f64("factor")?
            .ok_or_else(|| Error::config(path, format!("rope scaling `{kind}` needs `factor`")))
    };
    Ok(match kind {
        "default" => None,
        "linear" => Some(RopeScaling::Linear { factor: factor()? }),
        "llama3" => Some(RopeScaling::Llama3 {
            factor: factor()?,
            low_freq_factor: f.opt_f64("low_freq_factor")?.unwrap_or(1.0),
            high_freq_factor: f.opt_f64("high_freq_factor")?.unwrap_or(4.0),
            original_max_position_embeddings: f
                .opt_usize("original_max_position_embeddings")?
                .unwrap_or(8192),
        }),
        other => {
            return Err(Error::config(
                path,
                format!(
                "rope scaling type `{other}` is not supported (supported: default, linear, llama3)"
            ),
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ModelConfig> {
        let obj: serde_json::Map<String, Value> = serde_json::from_str(json).unwrap();
        ModelConfig::from_hf_json(Path::new("config.json"), &obj)
    }

    const BASE: &str = r#""hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256"#;

    #[test]
    fn transformers_5_and_4_layouts_agree() {
        let v5 = parse(&format!(
            r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, "dtype": "bfloat16",
               "rope_parameters": {{"rope_theta": 500000.0, "rope_type": "default"}}}}"#
        ))
        .unwrap();
        let v4 = parse(&format!(
            r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, "torch_dtype": "bfloat16",
               "rope_theta": 500000.0}}"#
        ))
        .unwrap();
        assert_eq!(v5, v4);
        assert_eq!(v5.rope_theta, 500000.0);
        assert_eq!(v5.head_dim, 16);
        assert_eq!(v5.stored_candle_dtype(), Some(DType::BF16));
    }

    #[test]
    fn missing_and_wrong_fields_are_named() {
        let err = parse(r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64}"#)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("config.json") && err.contains("num_attention_heads"),
            "{err}"
        );
        let err = parse(&format!(
            r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, "rms_norm_eps": "small"}}"#
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("rms_norm_eps") && err.contains("number"),
            "{err}"
        );
        let err = parse(&format!(
            r#"{{"architectures": ["GPT2LMHeadModel"], {BASE}}}"#
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("GPT2LMHeadModel") && err.contains("supported"),
            "{err}"
        );
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let cfg = parse(&format!(
            r#"{{"model_type": "llama", {BASE}, "rope_parameters": {{"rope_theta": 500000.0,
               "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}}}"#
        ))
        .unwrap();
        let scaled = cfg.rope_inv_freq();
        let plain = ModelConfig {
            rope_scaling: None,
            ..cfg.clone()
        }
        .rope_inv_freq();
        assert_eq!(scaled[0], plain[0]);
        let last = scaled.len() - 1;
        assert!((scaled[last] - plain[last] / 8.0).abs() < 1e-15);
    }

    #[test]
    fn eos_may_be_a_list_and_qwen2_has_bias() {
        let cfg = parse(&format!(
            r#"{{"architectures": ["Qwen2ForCausalLM"], {BASE}, "eos_token_id": [1, 2]}}"#
        ))
        .unwrap();
        assert_eq!(cfg.eos_token_ids, vec![1, 2]);
        assert!(cfg.attention_bias);
    }
}
