//! Writing a model as a Hugging Face folder that transformers loads: `config.json`
//! (transformers 5 layout), `generation_config.json`, `model.safetensors`, and the tokenizer
//! with its chat template. Quantised weights are written dequantised (dense, compute dtype).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use serde_json::{json, Value};

use super::config::RopeScaling;
use super::Model;
use crate::{Error, Result};

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
}

impl super::config::ModelConfig {
    /// transformers 5's `config.json` for this configuration, declaring `dtype`.
    pub fn to_hf_json(&self, dtype: DType) -> Value {
        let c = self;
        let mut rope = json!({"rope_theta": c.rope_theta, "rope_type": "default"});
        match &c.rope_scaling {
            None => {}
            Some(RopeScaling::Linear { factor }) => {
                rope["rope_type"] = "linear".into();
                rope["factor"] = (*factor).into();
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                rope["rope_type"] = "llama3".into();
                rope["factor"] = (*factor).into();
                rope["low_freq_factor"] = (*low_freq_factor).into();
                rope["high_freq_factor"] = (*high_freq_factor).into();
                rope["original_max_position_embeddings"] =
                    (*original_max_position_embeddings).into();
            }
        }
        let mut cfg = json!({
            "architectures": [c.architecture.hf_class()],
            "model_type": c.architecture.model_type(),
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads,
            "head_dim": c.head_dim,
            "vocab_size": c.vocab_size,
            "max_position_embeddings": c.max_position_embeddings,
            "rms_norm_eps": c.rms_norm_eps,
            "rope_parameters": rope,
            "tie_word_embeddings": c.tie_word_embeddings,
            "hidden_act": "silu",
            "dtype": dtype_name(dtype),
            "bos_token_id": c.bos_token_id,
            "eos_token_id": match c.eos_token_ids.as_slice() {
                [one] => json!(one),
                many => json!(many),
            },
        });
        // Qwen2's q/k/v biases are implied by the architecture; the others declare them.
        if c.architecture != super::Architecture::Qwen2 {
            cfg["attention_bias"] = c.attention_bias.into();
            cfg["mlp_bias"] = false.into();
        }
        if let Some(w) = c.sliding_window {
            cfg["sliding_window"] = w.into();
        }
        cfg
    }
}

impl Model {
    /// transformers' `config.json` for this model.
    pub fn hf_config_json(&self) -> Value {
        let mut cfg = self.config().to_hf_json(self.decoder.dtype());
        cfg["eos_token_id"] = match self.eos_token_ids.as_slice() {
            [one] => json!(one),
            many => json!(many),
        };
        cfg
    }

    /// Every weight under its transformers name, dense, in the compute dtype.
    pub fn hf_state_dict(&self) -> Result<Vec<(String, Tensor)>> {
        let d = &self.decoder;
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            d.embed_tokens.clone(),
        )];
        for (i, layer) in d.layers.iter().enumerate() {
            for (name, lin) in layer.linears() {
                out.push((
                    format!("model.layers.{i}.{name}.weight"),
                    lin.dense_weight()?,
                ));
                if let Some(b) = lin.bias() {
                    out.push((format!("model.layers.{i}.{name}.bias"), b.clone()));
                }
            }
            out.push((
                format!("model.layers.{i}.input_layernorm.weight"),
                layer.input_layernorm.clone(),
            ));
            out.push((
                format!("model.layers.{i}.post_attention_layernorm.weight"),
                layer.post_attention_layernorm.clone(),
            ));
        }
        out.push(("model.norm.weight".to_string(), d.norm.clone()));
        if !d.config.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), d.lm_head.dense_weight()?));
        }
        Ok(out)
    }

    /// Writes the model as a Hugging Face folder (`AutoModelForCausalLM.from_pretrained(dir)`
    /// and `AutoTokenizer.from_pretrained(dir)` load it). Adapters still attached are not
    /// included: merge them first ([`crate::lora::PeftModel::merge_and_unload`]).
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let write_json = |name: &str, v: &Value| -> Result<()> {
            let path = dir.join(name);
            let text = serde_json::to_string_pretty(v)
                .map_err(|e| Error::InvalidArgument(e.to_string()))?;
            std::fs::write(&path, text + "\n").map_err(|e| Error::io(&path, e))
        };
        write_json("config.json", &self.hf_config_json())?;
        write_json(
            "generation_config.json",
            &json!({"bos_token_id": self.config().bos_token_id, "eos_token_id": self.eos_token_ids}),
        )?;

        let tensors: HashMap<String, Tensor> = self
            .hf_state_dict()?
            .into_iter()
            .map(|(k, t)| t.contiguous().map(|t| (k, t)))
            .collect::<candle_core::Result<_>>()?;
        let weights = dir.join("model.safetensors");
        candle_core::safetensors::save(&tensors, &weights)
            .map_err(|e| Error::weights(&weights, e.to_string()))?;

        let tok = dir.join("tokenizer.json");
        self.tokenizer
            .inner()
            .save(&tok, false)
            .map_err(|e| Error::tokenizer(tok.display().to_string(), e.to_string()))?;
        let mut tok_cfg = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.tokenizer.bos_token(),
            "eos_token": self.tokenizer.eos_token(),
            "pad_token": self.tokenizer.pad_token(),
            "add_bos_token": self.tokenizer.add_bos_token(),
        });
        if let Some(t) = self.tokenizer.chat_template() {
            tok_cfg["chat_template"] = t.source().into();
        }
        write_json("tokenizer_config.json", &tok_cfg)
    }
}
