//! The model core: configuration, the decoder, weights, tokenizer and chat template, and
//! [`Model`], which loads them together from a GGUF file, a Hugging Face folder or a hub id.

pub mod chat_template;
pub mod config;
pub mod decoder;
pub mod export;
pub mod linear;
pub mod source;
pub mod tokenizer;
pub mod weights;

use std::path::Path;

use candle_core::{DType, Device, Tensor};

pub use chat_template::{ChatTemplate, Message};
pub use config::{Architecture, ModelConfig, RopeScaling};
pub use decoder::{Decoder, KvCache, ModuleState};
pub use linear::{Linear, LinearWeight};
pub use source::{ModelSource, DEFAULT_MODEL_FILE};
pub use tokenizer::Tokenizer;
use weights::{GgufWeights, SafetensorsWeights, WeightSource};

use crate::quant::bnb_checkpoint::BnbQuantizationConfig;
use crate::quant::Quant4Config;
use crate::{Error, Result};

/// How to load a model.
///
/// ```no_run
/// use qlora::model::{LoadOptions, Model};
/// use qlora::quant::Quant4Config;
/// // transformers: from_pretrained(dir, quantization_config=BitsAndBytesConfig(load_in_4bit=True,
/// //     bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True))
/// let opts = LoadOptions::default().load_in_4bit(Quant4Config::qlora());
/// let model = Model::load_with("path/to/hf-folder", &opts)?;
/// # Ok::<(), qlora::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The dtype activations and dense weights use. `None`: f32 on CPU (fast and exact there),
    /// the checkpoint's own dtype on a GPU.
    pub dtype: Option<DType>,
    /// Where the weights go.
    pub device: Device,
    /// Quantise the linear layers of the decoder blocks to 4 bits while loading (transformers'
    /// `load_in_4bit`); `None` keeps them as stored. See [`LoadOptions::load_in_4bit`].
    pub quantization: Option<Quant4Config>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: None,
            device: Device::Cpu,
            quantization: None,
        }
    }
}

impl LoadOptions {
    /// Sets the compute dtype.
    pub fn dtype(mut self, dtype: DType) -> Self {
        self.dtype = Some(dtype);
        self
    }

    /// Sets the device.
    pub fn device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// Loads a Hugging Face (f32/f16/bf16 safetensors) model with every linear layer of its
    /// decoder blocks (q, k, v, o, gate, up, down) quantised to 4 bits, as transformers +
    /// bitsandbytes do with `BitsAndBytesConfig(load_in_4bit=True, ...)`:
    ///
    /// - embeddings, norms, biases and the output head stay dense in the load dtype
    ///   (transformers never converts the output embeddings or weights tied to them);
    /// - each weight is quantised from the checkpoint's values cast to the load dtype
    ///   ([`LoadOptions::dtype`]), as transformers quantises after casting to its `dtype`, so the
    ///   packed bytes and statistics are bitsandbytes' own; the quant state records that dtype
    ///   and products run in it (bitsandbytes' `bnb_4bit_compute_dtype`);
    /// - a folder that already is a bitsandbytes 4-bit checkpoint is read as stored (its own
    ///   settings win, as in transformers);
    /// - a GGUF base keeps its GGML quantisation (Q4_0, Q4_1, Q8_0, K-quants): it is already
    ///   quantised, and re-quantising it to NF4 would only add error, so this option does
    ///   nothing there.
    pub fn load_in_4bit(mut self, config: Quant4Config) -> Self {
        self.quantization = Some(config);
        self
    }
}

/// A loaded causal language model: decoder, tokenizer and chat template.
///
/// ```no_run
/// use qlora::model::{Model, Message};
/// let model = Model::load("default")?; // SmolLM2-135M-Instruct, Q4_1 GGUF
/// let prompt = model.apply_chat_template(&[Message::user("Hi!")], true)?;
/// # Ok::<(), qlora::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Model {
    /// The network.
    pub decoder: Decoder,
    /// Text ⇄ token ids, with the chat template.
    pub tokenizer: Tokenizer,
    /// Where it was loaded from.
    pub source: ModelSource,
    /// A short name for display (`SmolLM2-135M-Instruct.Q4_1`, a folder or hub id).
    pub name: String,
    /// Token ids that end generation (generation_config.json, else the tokenizer's eos).
    pub eos_token_ids: Vec<u32>,
}

impl Model {
    /// Loads a model on the CPU in f32; see [`ModelSource::resolve`] for what `spec` may be.
    pub fn load(spec: &str) -> Result<Self> {
        Self::load_with(spec, &LoadOptions::default())
    }

    /// Loads a model with explicit options.
    pub fn load_with(spec: &str, options: &LoadOptions) -> Result<Self> {
        let source = ModelSource::resolve(spec)?;
        let name = if spec == "default" || spec.is_empty() {
            source
                .path()
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| spec.to_string())
        } else {
            spec.to_string()
        };
        match &source {
            ModelSource::Gguf(path) => Self::load_gguf(path, name, source.clone(), options),
            ModelSource::HfDir(dir) => Self::load_hf_dir(dir, name, source.clone(), options),
        }
    }

    fn load_gguf(path: &Path, name: String, source: ModelSource, o: &LoadOptions) -> Result<Self> {
        // `o.quantization` is deliberately ignored: a GGUF's linears stay in their GGML blocks
        // (see `LoadOptions::load_in_4bit`).
        let gguf = GgufWeights::open(path, &o.device)?;
        let config = ModelConfig::from_gguf(path, &gguf.content)?;
        let tokenizer = Tokenizer::from_gguf(path, &gguf.content)?;
        let dtype = o.dtype.unwrap_or(DType::F32);
        let mut weights = WeightSource::Gguf(gguf);
        let decoder = Decoder::load(&config, &mut weights, dtype, &o.device)?;
        Ok(Self::assemble(decoder, tokenizer, source, name))
    }

    fn load_hf_dir(dir: &Path, name: String, source: ModelSource, o: &LoadOptions) -> Result<Self> {
        let mut config = ModelConfig::from_hf_file(&dir.join("config.json"))?;
        let gen_cfg = dir.join("generation_config.json");
        if gen_cfg.is_file() {
            config.apply_generation_config(&gen_cfg)?;
        }
        let tokenizer = Tokenizer::from_hf_dir(dir)?;
        let dtype = o.dtype.unwrap_or(match o.device {
            Device::Cpu => DType::F32,
            _ => config.stored_candle_dtype().unwrap_or(DType::F32),
        });
        if let Some(q) = &o.quantization {
            q.validate()?;
        }
        // A bitsandbytes 4-bit checkpoint is read as stored (the loader recognises each 4-bit
        // weight by its quant state); weights it keeps dense (`llm_int8_skip_modules`) stay
        // dense, as in transformers. Reading the config here refuses other quantisations.
        let quantization = match BnbQuantizationConfig::from_config_file(&dir.join("config.json"))?
        {
            Some(_) => None,
            None => o.quantization,
        };
        let mut weights = WeightSource::Safetensors(
            SafetensorsWeights::from_hf_dir(dir, &o.device)?.with_quantization(quantization),
        );
        let decoder = Decoder::load(&config, &mut weights, dtype, &o.device)?;
        Ok(Self::assemble(decoder, tokenizer, source, name))
    }

    fn assemble(decoder: Decoder, tokenizer: Tokenizer, source: ModelSource, name: String) -> Self {
        let mut eos_token_ids = decoder.config.eos_token_ids.clone();
        if eos_token_ids.is_empty() {
            eos_token_ids.extend(tokenizer.eos_token_id());
        }
        Self {
            decoder,
            tokenizer,
            source,
            name,
            eos_token_ids,
        }
    }

    /// The architecture and shapes.
    pub fn config(&self) -> &ModelConfig {
        &self.decoder.config
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        self.decoder.device()
    }

    /// Renders a conversation with the model's chat template, as transformers'
    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` does.
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.tokenizer.chat_template().ok_or_else(|| {
            Error::Template(format!(
                "model `{}` has no chat template; pass a plain prompt instead",
                self.name
            ))
        })?;
        template.render(messages, add_generation_prompt)
    }

    /// Logits for every position of one text: `[1, seq, vocab]`.
    pub fn logits(&self, text: &str) -> Result<Tensor> {
        let ids = self.tokenizer.encode(text, true)?;
        let input = Tensor::new(ids.as_slice(), self.device())?.unsqueeze(0)?;
        self.decoder.forward(&input, None, None)
    }
}
