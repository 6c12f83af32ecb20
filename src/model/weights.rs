//! Where a model's tensors come from: safetensors files (single or sharded) or a GGUF file.
//!
//! The decoder asks for tensors by their Hugging Face names (`model.layers.0.self_attn.q_proj`);
//! each source maps those names onto its own layout and checks shapes, so a wrong or damaged
//! file is reported with the file and tensor at fault.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType, QStorage, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use super::linear::Linear;
use crate::quant::{bnb_checkpoint, Quant4Config};
use crate::{Error, Result};

/// A source of named tensors, in transformers' naming.
pub enum WeightSource {
    Safetensors(SafetensorsWeights),
    Gguf(GgufWeights),
}

impl WeightSource {
    /// A dense tensor, checked against `shape`, converted to `dtype`.
    pub fn tensor(&mut self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        match self {
            Self::Safetensors(s) => s.tensor(name, shape, dtype),
            Self::Gguf(g) => g.dense(name, shape, dtype),
        }
    }

    /// Whether a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        match self {
            Self::Safetensors(s) => s.routing.contains_key(name),
            Self::Gguf(g) => g
                .gguf_name(name)
                .is_some_and(|n| g.content.tensor_infos.contains_key(&n)),
        }
    }

    /// The linear layer `prefix` (`prefix.weight` `[out, in]` and, if asked, `prefix.bias`).
    pub fn linear(
        &mut self,
        prefix: &str,
        out_features: usize,
        in_features: usize,
        bias: bool,
        dtype: DType,
    ) -> Result<Linear> {
        let bias = if bias {
            Some(self.tensor(&format!("{prefix}.bias"), &[out_features], dtype)?)
        } else {
            None
        };
        let name = format!("{prefix}.weight");
        match self {
            Self::Safetensors(s) => {
                s.linear_weight(prefix, &name, out_features, in_features, bias, dtype)
            }
            Self::Gguf(g) => {
                let q = g.quantized(&name, &[out_features, in_features])?;
                Ok(Linear::ggml(Arc::new(q), bias, dtype))
            }
        }
    }
}

/// One or more safetensors files, memory-mapped.
///
/// Linear weights come out dense, 4-bit from a bitsandbytes checkpoint (detected per tensor by
/// its `.weight.quant_state.bitsandbytes__*` companion), or quantised to 4 bits on load when
/// [`SafetensorsWeights::with_quantization`] asked for it.
pub struct SafetensorsWeights {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    routing: HashMap<String, usize>,
    device: Device,
    quantize: Option<Quant4Config>,
}

impl SafetensorsWeights {
    /// Opens the weights of a Hugging Face model folder: `model.safetensors`, or the shards named
    /// by `model.safetensors.index.json`.
    pub fn from_hf_dir(dir: &Path, device: &Device) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let paths = if index.exists() {
            shard_paths(&index)?
        } else if single.exists() {
            vec![single]
        } else {
            return Err(Error::weights(
                dir,
                "no model.safetensors or model.safetensors.index.json in this folder \
                 (PyTorch .bin checkpoints are not supported: convert them with \
                 `model.save_pretrained(dir, safe_serialization=True)`)",
            ));
        };
        Self::open(&paths, device)
    }

    /// Opens the given safetensors files.
    pub fn open(paths: &[PathBuf], device: &Device) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut routing = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            if !p.exists() {
                return Err(Error::weights(p, "file not found (a shard is missing?)"));
            }
            // SAFETY: the file is mapped read-only; like every mmap-based loader we rely on it
            // not being modified while the model is alive.
            let st = unsafe { MmapedSafetensors::new(p) }.map_err(|e| {
                Error::weights(
                    p,
                    format!(
                        "not a readable safetensors file ({}); it may be truncated or corrupt: \
                         re-download or re-save it",
                        root_cause(&e)
                    ),
                )
            })?;
            for (name, _) in st.tensors() {
                routing.insert(name, i);
            }
            files.push((p.clone(), st));
        }
        Ok(Self {
            files,
            routing,
            device: device.clone(),
            quantize: None,
        })
    }

    /// Quantise every linear layer except the output head to 4 bits as it is loaded, as
    /// transformers' `load_in_4bit` does (`None`: keep them dense). Weights already stored in
    /// 4 bits (a bitsandbytes checkpoint) are read as they are either way.
    pub fn with_quantization(mut self, quantize: Option<Quant4Config>) -> Self {
        self.quantize = quantize;
        self
    }

    /// Whether a tensor of that name exists.
    pub fn has(&self, name: &str) -> bool {
        self.routing.contains_key(name)
    }

    /// The file holding tensor `name`.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.routing.get(name).map(|&i| self.files[i].0.as_path())
    }

    /// A tensor as stored (no dtype conversion, no shape check) and the file it came from.
    pub fn raw(&self, name: &str) -> Result<(Tensor, PathBuf)> {
        let (path, st) = self.locate(name)?;
        let t = st.load(name, &self.device).map_err(|e| {
            Error::weights(
                path,
                format!("cannot read tensor `{name}`: {}", root_cause(&e)),
            )
        })?;
        Ok((t, path.clone()))
    }

    fn locate(&self, name: &str) -> Result<&(PathBuf, MmapedSafetensors)> {
        match self.routing.get(name) {
            Some(&i) => Ok(&self.files[i]),
            None => {
                let where_ = self
                    .files
                    .iter()
                    .map(|(p, _)| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                Err(Error::weights(
                    &self.files[0].0,
                    format!("tensor `{name}` is missing (looked in {where_}); the checkpoint does not match its config.json"),
                ))
            }
        }
    }

    /// The weight of linear layer `prefix`: 4-bit from the checkpoint, quantised on load, or
    /// dense in `dtype`.
    fn linear_weight(
        &self,
        prefix: &str,
        name: &str,
        out_features: usize,
        in_features: usize,
        bias: Option<Tensor>,
        dtype: DType,
    ) -> Result<Linear> {
        let shape = [out_features, in_features];
        if let Some(q) = bnb_checkpoint::read_quantized(self, name, &shape)? {
            return Ok(Linear::quant4(Arc::new(q), bias, dtype, &self.device));
        }
        let w = self.tensor(name, &shape, dtype)?;
        match self.quantize {
            // transformers keeps the output embeddings (and anything tied to them) in full
            // precision: `get_keys_to_not_convert`.
            Some(cfg) if prefix != "lm_head" && prefix != "model.embed_tokens" => {
                // Quantised from the checkpoint values cast to the load dtype, as transformers
                // casts to the model dtype before `Params4bit` quantises: same bytes, and the
                // state records that dtype.
                let q = bnb_checkpoint::quantize_like_bitsandbytes(&w, cfg).map_err(|e| {
                    Error::weights(
                        self.file_of(name).unwrap_or(Path::new("")),
                        format!("cannot quantise tensor `{name}` to 4 bits: {e}"),
                    )
                })?;
                Ok(Linear::quant4(Arc::new(q), bias, dtype, &self.device))
            }
            _ => Ok(Linear::dense(w, bias)),
        }
    }

    /// Names of all tensors.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.routing.keys().map(String::as_str)
    }

    /// A tensor by name, checked against `shape` (when non-empty) and converted to `dtype`.
    pub fn tensor(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let (t, path) = self.raw(name)?;
        let path = &path;
        if t.dtype() == DType::U8 {
            // A packed 4-bit weight whose quant state is gone would otherwise load as garbage.
            return Err(Error::weights(
                path,
                format!(
                    "tensor `{name}` is U8 (packed 4-bit?) but there is no \
                     `{name}.quant_state.bitsandbytes__nf4` (or __fp4) tensor describing it; \
                     the bitsandbytes checkpoint is incomplete"
                ),
            ));
        }
        if !shape.is_empty() && t.dims() != shape {
            return Err(Error::weights(
                path,
                format!(
                    "tensor `{name}` has shape {:?} but the config implies {shape:?}",
                    t.dims()
                ),
            ));
        }
        Ok(t.to_dtype(dtype)?)
    }
}

fn shard_paths(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::weights(index, format!("is not valid JSON ({e})")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::weights(index, "missing the `weight_map` object"))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<String> = map
        .values()
        .map(|f| {
            f.as_str().map(str::to_string).ok_or_else(|| {
                Error::weights(
                    index,
                    format!("`weight_map` values must be file names, found {f}"),
                )
            })
        })
        .collect::<Result<_>>()?;
    files.sort();
    files.dedup();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// The innermost message of a candle error (drops backtraces and wrappers).
pub(crate) fn root_cause(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithPath { inner, .. } => root_cause(inner),
        candle_core::Error::WithBacktrace { inner, .. } => root_cause(inner),
        candle_core::Error::Context { inner, .. } => root_cause(inner),
        other => other.to_string(),
    }
}

/// A GGUF file: metadata plus tensors read on demand, kept in their GGML quantisation.
pub struct GgufWeights {
    pub path: PathBuf,
    pub content: gguf_file::Content,
    file: File,
    device: Device,
    /// llama.cpp stores Llama's q/k rows permuted for its interleaved RoPE; we undo that so
    /// the weights (and adapters trained on them) have transformers' layout.
    unpermute_qk: Option<(usize, usize)>,
}

impl GgufWeights {
    /// Opens and parses a GGUF file; a wrong magic or a truncated header is an error naming it.
    pub fn open(path: &Path, device: &Device) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| {
            Error::weights(
                path,
                format!(
                    "not a readable GGUF file ({}); check that it is a complete .gguf download",
                    root_cause(&e)
                ),
            )
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
            file,
            device: device.clone(),
            unpermute_qk: None,
        })
    }

    /// Tells the loader the head counts, so that Llama-architecture q/k weights are un-permuted.
    pub fn set_qk_heads(&mut self, heads: usize, kv_heads: usize) {
        let arch = self
            .content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        // convert_hf_to_gguf.py permutes q/k only for the llama family (Mistral included).
        self.unpermute_qk =
            matches!(arch.as_str(), "llama" | "mistral").then_some((heads, kv_heads));
    }

    /// Maps a transformers tensor name onto llama.cpp's.
    fn gguf_name(&self, hf: &str) -> Option<String> {
        let (stem, suffix) = hf.rsplit_once('.')?;
        let mapped = match stem {
            "model.embed_tokens" => "token_embd".to_string(),
            "model.norm" => "output_norm".to_string(),
            "lm_head" => "output".to_string(),
            _ => {
                let rest = stem.strip_prefix("model.layers.")?;
                let (layer, module) = rest.split_once('.')?;
                let short = match module {
                    "self_attn.q_proj" => "attn_q",
                    "self_attn.k_proj" => "attn_k",
                    "self_attn.v_proj" => "attn_v",
                    "self_attn.o_proj" => "attn_output",
                    "mlp.gate_proj" => "ffn_gate",
                    "mlp.up_proj" => "ffn_up",
                    "mlp.down_proj" => "ffn_down",
                    "input_layernorm" => "attn_norm",
                    "post_attention_layernorm" => "ffn_norm",
                    _ => return None,
                };
                format!("blk.{layer}.{short}")
            }
        };
        Some(format!("{mapped}.{suffix}"))
    }

    fn read(&mut self, hf: &str, shape: &[usize]) -> Result<QTensor> {
        let name = self.gguf_name(hf).ok_or_else(|| {
            Error::weights(
                &self.path,
                format!("no GGUF name is known for tensor `{hf}`"),
            )
        })?;
        let q = self
            .content
            .tensor(&mut self.file, &name, &self.device)
            .map_err(|e| {
                Error::weights(
                    &self.path,
                    format!("cannot read tensor `{name}` ({hf}): {}", root_cause(&e)),
                )
            })?;
        if q.shape().dims() != shape {
            return Err(Error::weights(
                &self.path,
                format!(
                    "tensor `{name}` has shape {:?} but the metadata implies {shape:?}",
                    q.shape().dims()
                ),
            ));
        }
        let heads = match (self.unpermute_qk, hf) {
            (Some((h, _)), n) if n.ends_with("q_proj.weight") || n.ends_with("q_proj.bias") => h,
            (Some((_, kv)), n) if n.ends_with("k_proj.weight") || n.ends_with("k_proj.bias") => kv,
            _ => return Ok(q),
        };
        unpermute_rows(&q, heads)
            .map_err(|e| Error::weights(&self.path, format!("tensor `{name}`: {}", root_cause(&e))))
    }

    /// A weight kept quantised.
    pub fn quantized(&mut self, hf: &str, shape: &[usize]) -> Result<QTensor> {
        self.read(hf, shape)
    }

    /// A tensor dequantised to `dtype` (norms, embeddings, biases).
    pub fn dense(&mut self, hf: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let q = self.read(hf, shape)?;
        Ok(q.dequantize(&self.device)?.to_dtype(dtype)?)
    }
}

/// Reorders the rows of a q/k projection from llama.cpp's interleaved-RoPE layout back to
/// transformers' half-split layout. Quantisation blocks run along rows, so whole rows move
/// as raw bytes and the data stays bit-identical.
///
/// Within each head of `d` rows, GGUF row `2i + j` holds transformers' row `j*d/2 + i`.
fn unpermute_rows(q: &QTensor, heads: usize) -> candle_core::Result<QTensor> {
    let dims = q.shape().dims().to_vec();
    let rows = dims[0];
    let head_dim = rows / heads;
    let data = q.data()?;
    let row_bytes = data.len() / rows;
    let mut out = vec![0u8; data.len()];
    for h in 0..heads {
        for i in 0..head_dim / 2 {
            for j in 0..2 {
                let src = h * head_dim + 2 * i + j;
                let dst = h * head_dim + j * (head_dim / 2) + i;
                out[dst * row_bytes..(dst + 1) * row_bytes]
                    .copy_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    let dtype: GgmlDType = q.dtype();
    let storage = QStorage::from_data(std::borrow::Cow::Owned(out), &q.device(), dtype)?;
    QTensor::new(storage, dims)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        let dev = Device::Cpu;
        let (heads, head_dim, cols) = (2usize, 8usize, 32usize);
        let rows = heads * head_dim;
        // Row r of the "transformers" weight is filled with r.
        let hf: Vec<f32> = (0..rows).flat_map(|r| vec![r as f32; cols]).collect();
        // llama.cpp's permute: reshape(h, 2, d/2, cols).swapaxes(1, 2).
        let mut gguf = vec![0f32; rows * cols];
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..head_dim / 2 {
                    let src = h * head_dim + j * head_dim / 2 + i;
                    let dst = h * head_dim + 2 * i + j;
                    gguf[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        let t = Tensor::from_vec(gguf, (rows, cols), &dev).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
        let back = unpermute_rows(&q, heads).unwrap().dequantize(&dev).unwrap();
        let firsts: Vec<f32> = back
            .narrow(1, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let expected: Vec<f32> = (0..rows).map(|r| r as f32).collect();
        for (a, b) in firsts.iter().zip(&expected) {
            assert!((a - b).abs() < 0.1, "{firsts:?}");
        }
    }

    #[test]
    fn bad_magic_and_truncated_safetensors_are_named_errors() {
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("bad.gguf");
        std::fs::write(&gguf, b"NOPE0000000000000000000000").unwrap();
        let err = GgufWeights::open(&gguf, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("bad.gguf") && err.contains("GGUF"), "{err}");

        let st = dir.path().join("model.safetensors");
        let t = Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap();
        candle_core::safetensors::save(&HashMap::from([("w", t)]), &st).unwrap();
        let bytes = std::fs::read(&st).unwrap();
        std::fs::write(&st, &bytes[..bytes.len() - 10]).unwrap();
        let err = SafetensorsWeights::open(std::slice::from_ref(&st), &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("model.safetensors") && err.contains("truncated"),
            "{err}"
        );
    }
}
