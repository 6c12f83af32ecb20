//! The decoder of the Llama family (Llama, Mistral, Qwen2): pre-norm blocks of grouped-query
//! attention with rotary positions and a SwiGLU MLP.
//!
//! Unlike candle-transformers' models it returns logits for every position (training needs
//! them), exposes its layers, and uses only differentiable ops (see [`crate::ops`]).

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Module, Tensor, Var};

use super::config::ModelConfig;
use super::linear::{Linear, LinearWeight};
use super::weights::WeightSource;
use crate::ops;
use crate::{Error, Result};

/// Keys and values of earlier positions, one pair per layer, for incremental decoding.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// An empty cache for a model with `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
        }
    }

    /// Number of positions already cached.
    pub fn seq_len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }

    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let kv = match &self.layers[layer] {
            None => (k.clone(), v.clone()),
            Some((pk, pv)) => (Tensor::cat(&[pk, k], 2)?, Tensor::cat(&[pv, v], 2)?),
        };
        self.layers[layer] = Some(kv.clone());
        Ok(kv)
    }

    /// The same keys and values without the graph that computed them (kept caches must not
    /// keep a sequence's activations alive).
    pub fn detached(&self) -> Self {
        Self {
            layers: self
                .layers
                .iter()
                .map(|l| l.as_ref().map(|(k, v)| (k.detach(), v.detach())))
                .collect(),
        }
    }

    /// Keeps the first `len` positions, e.g. the part of a cached prompt that a new prompt
    /// shares.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        for (k, v) in self.layers.iter_mut().flatten() {
            if len < k.dim(2)? {
                *k = k.narrow(2, 0, len)?.contiguous()?;
                *v = v.narrow(2, 0, len)?.contiguous()?;
            }
        }
        Ok(())
    }

    /// Keeps only the batch rows in `rows` (generation drops finished sequences).
    pub fn select_rows(&mut self, rows: &[u32]) -> Result<()> {
        if self.layers.iter().all(|l| l.is_none()) {
            return Ok(());
        }
        let device = self
            .layers
            .iter()
            .flatten()
            .next()
            .unwrap()
            .0
            .device()
            .clone();
        let idx = Tensor::new(rows, &device)?;
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.index_select(&idx, 0)?;
            *v = v.index_select(&idx, 0)?;
        }
        Ok(())
    }
}

/// Grouped-query self-attention.
#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

/// The SwiGLU feed-forward block: `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

/// One transformer block.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub self_attn: Attention,
    pub mlp: Mlp,
    pub input_layernorm: Tensor,
    pub post_attention_layernorm: Tensor,
}

/// Per-call inputs shared by every layer: rotary tables and the attention mask.
struct Context {
    cos: Tensor,
    sin: Tensor,
    mask: Option<Tensor>,
}

/// How one leaf module stores its parameters: a linear layer (weight in any storage, optional
/// bias) or a single `weight` tensor (embeddings, norms). Saved and restored as is, so a module
/// trained in full (PEFT's `modules_to_save`) can be swapped in and out of the decoder without
/// touching its quantised original.
#[derive(Debug, Clone)]
pub enum ModuleState {
    Linear {
        weight: LinearWeight,
        bias: Option<Tensor>,
    },
    Tensor(Tensor),
}

enum ModuleRef<'a> {
    Linear(&'a Linear),
    Tensor(&'a Tensor),
}

enum ModuleMut<'a> {
    Linear(&'a mut Linear),
    Tensor(&'a mut Tensor),
}

/// The whole decoder: embeddings, blocks, final norm and output head.
#[derive(Debug, Clone)]
pub struct Decoder {
    pub config: ModelConfig,
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: Tensor,
    pub lm_head: Linear,
    inv_freq: Vec<f32>,
    dtype: DType,
    device: Device,
}

/// Adds the gradients of `more` for the tensors in `keep` into `into` (summing where both have
/// one).
fn add_grads(
    into: &mut GradStore,
    more: &GradStore,
    keep: &std::collections::HashSet<candle_core::TensorId>,
) -> Result<()> {
    let ids: Vec<_> = more
        .get_ids()
        .filter(|id| keep.contains(id))
        .copied()
        .collect();
    for id in ids {
        let g = more.get_id(id).expect("listed id").clone();
        let sum = match into.get_id(id) {
            Some(prev) => (prev + &g)?,
            None => g,
        };
        into.insert_id(id, sum);
    }
    Ok(())
}

/// Repeats each key/value head `groups` times so grouped-query attention can use a plain
/// batched matmul: `[b, kv, t, d]` → `[b, kv·groups, t, d]`.
fn repeat_kv(xs: Tensor, groups: usize) -> candle_core::Result<Tensor> {
    if groups == 1 {
        return Ok(xs);
    }
    let (b, kv, t, d) = xs.dims4()?;
    xs.unsqueeze(2)?
        .broadcast_as((b, kv, groups, t, d))?
        .reshape((b, kv * groups, t, d))
}

impl Attention {
    fn forward(
        &self,
        xs: &Tensor,
        ctx: &Context,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        let (b, t, _) = xs.dims3()?;
        let split = |x: Tensor, heads: usize| -> Result<Tensor> {
            Ok(x.reshape((b, t, heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = split(self.q_proj.forward(xs)?, self.num_heads)?;
        let k = split(self.k_proj.forward(xs)?, self.num_kv_heads)?;
        let v = split(self.v_proj.forward(xs)?, self.num_kv_heads)?;
        let q = ops::apply_rope(&q, &ctx.cos, &ctx.sin)?;
        let k = ops::apply_rope(&k, &ctx.cos, &ctx.sin)?;
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, &k, &v)?,
            None => (k, v),
        };
        let groups = self.num_heads / self.num_kv_heads;
        let k = repeat_kv(k, groups)?.contiguous()?;
        let v = repeat_kv(v, groups)?.contiguous()?;

        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let probs = ops::attention_softmax(&q.matmul(&k.t()?)?, scale, ctx.mask.as_ref())?
            .to_dtype(q.dtype())?;
        let out = probs.matmul(&v)?;
        let out = out
            .transpose(1, 2)?
            .reshape((b, t, self.num_heads * self.head_dim))?;
        Ok(self.o_proj.forward(&out)?)
    }
}

impl Mlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = ops::swiglu(&self.gate_proj.forward(xs)?, &self.up_proj.forward(xs)?)?;
        Ok(self.down_proj.forward(&h)?)
    }
}

impl DecoderLayer {
    fn forward(
        &self,
        xs: &Tensor,
        ctx: &Context,
        eps: f64,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        let h = ops::rms_norm(xs, &self.input_layernorm, eps)?;
        let xs = (xs + self.self_attn.forward(&h, ctx, cache)?)?;
        let h = ops::rms_norm(&xs, &self.post_attention_layernorm, eps)?;
        Ok((&xs + self.mlp.forward(&h)?)?)
    }

    /// The random-generator states of this block's adapters (dropout), in linear order.
    pub fn adapter_rng_states(&self) -> Vec<Option<u64>> {
        self.linears()
            .iter()
            .map(|(_, l)| l.adapter().and_then(|a| a.rng_state()))
            .collect()
    }

    /// Restores states from [`Self::adapter_rng_states`].
    pub fn set_adapter_rng_states(&self, states: &[Option<u64>]) {
        for ((_, l), s) in self.linears().iter().zip(states) {
            if let (Some(a), Some(s)) = (l.adapter(), s) {
                a.set_rng_state(*s);
            }
        }
    }

    /// Mutable access to every linear layer of the block, named as in [`Self::linears`].
    pub fn linears_mut(&mut self) -> [(&'static str, &mut Linear); 7] {
        let Attention {
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            ..
        } = &mut self.self_attn;
        let Mlp {
            gate_proj,
            up_proj,
            down_proj,
        } = &mut self.mlp;
        [
            ("self_attn.q_proj", q_proj),
            ("self_attn.k_proj", k_proj),
            ("self_attn.v_proj", v_proj),
            ("self_attn.o_proj", o_proj),
            ("mlp.gate_proj", gate_proj),
            ("mlp.up_proj", up_proj),
            ("mlp.down_proj", down_proj),
        ]
    }

    /// Every linear layer of the block with its transformers name relative to the block.
    pub fn linears(&self) -> [(&'static str, &Linear); 7] {
        [
            ("self_attn.q_proj", &self.self_attn.q_proj),
            ("self_attn.k_proj", &self.self_attn.k_proj),
            ("self_attn.v_proj", &self.self_attn.v_proj),
            ("self_attn.o_proj", &self.self_attn.o_proj),
            ("mlp.gate_proj", &self.mlp.gate_proj),
            ("mlp.up_proj", &self.mlp.up_proj),
            ("mlp.down_proj", &self.mlp.down_proj),
        ]
    }
}

impl Decoder {
    /// Builds the decoder from `weights`, computing in `dtype` on `device`.
    pub fn load(
        config: &ModelConfig,
        weights: &mut WeightSource,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let c = config;
        let h = c.hidden_size;
        let q_out = c.num_attention_heads * c.head_dim;
        let kv_out = c.num_key_value_heads * c.head_dim;
        if let WeightSource::Gguf(g) = weights {
            g.set_qk_heads(c.num_attention_heads, c.num_key_value_heads);
        }
        let embed_tokens =
            weights.tensor("model.embed_tokens.weight", &[c.vocab_size, h], dtype)?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let bias = c.attention_bias;
            let self_attn = Attention {
                q_proj: weights.linear(&format!("{p}.self_attn.q_proj"), q_out, h, bias, dtype)?,
                k_proj: weights.linear(&format!("{p}.self_attn.k_proj"), kv_out, h, bias, dtype)?,
                v_proj: weights.linear(&format!("{p}.self_attn.v_proj"), kv_out, h, bias, dtype)?,
                o_proj: weights.linear(&format!("{p}.self_attn.o_proj"), h, q_out, false, dtype)?,
                num_heads: c.num_attention_heads,
                num_kv_heads: c.num_key_value_heads,
                head_dim: c.head_dim,
            };
            let m = c.intermediate_size;
            let mlp = Mlp {
                gate_proj: weights.linear(&format!("{p}.mlp.gate_proj"), m, h, false, dtype)?,
                up_proj: weights.linear(&format!("{p}.mlp.up_proj"), m, h, false, dtype)?,
                down_proj: weights.linear(&format!("{p}.mlp.down_proj"), h, m, false, dtype)?,
            };
            layers.push(DecoderLayer {
                self_attn,
                mlp,
                input_layernorm: weights.tensor(
                    &format!("{p}.input_layernorm.weight"),
                    &[h],
                    dtype,
                )?,
                post_attention_layernorm: weights.tensor(
                    &format!("{p}.post_attention_layernorm.weight"),
                    &[h],
                    dtype,
                )?,
            });
        }
        let norm = weights.tensor("model.norm.weight", &[h], dtype)?;
        let lm_head = if c.tie_word_embeddings || !weights.contains("lm_head.weight") {
            match weights {
                // Keep a GGUF's tied head quantised rather than reusing the dense embedding.
                WeightSource::Gguf(_) => {
                    weights.linear("model.embed_tokens", c.vocab_size, h, false, dtype)?
                }
                WeightSource::Safetensors(_) => Linear::dense(embed_tokens.clone(), None),
            }
        } else {
            weights.linear("lm_head", c.vocab_size, h, false, dtype)?
        };
        let inv_freq = c.rope_inv_freq().iter().map(|&f| f as f32).collect();
        Ok(Self {
            config: c.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq,
            dtype,
            device: device.clone(),
        })
    }

    /// Every leaf module that holds parameters, with transformers' names, in the order
    /// transformers lists them: `model.embed_tokens`, each block's linear layers and norms,
    /// `model.norm`, `lm_head`.
    pub fn leaf_modules(&self) -> Vec<String> {
        let mut out = vec!["model.embed_tokens".to_string()];
        for i in 0..self.layers.len() {
            out.extend(
                self.layers[i]
                    .linears()
                    .iter()
                    .map(|(name, _)| format!("model.layers.{i}.{name}")),
            );
            out.push(format!("model.layers.{i}.input_layernorm"));
            out.push(format!("model.layers.{i}.post_attention_layernorm"));
        }
        out.push("model.norm".to_string());
        out.push("lm_head".to_string());
        out
    }

    fn module_mut(&mut self, path: &str) -> Option<ModuleMut<'_>> {
        match path {
            "model.embed_tokens" => return Some(ModuleMut::Tensor(&mut self.embed_tokens)),
            "model.norm" => return Some(ModuleMut::Tensor(&mut self.norm)),
            "lm_head" => return Some(ModuleMut::Linear(&mut self.lm_head)),
            _ => {}
        }
        let rest = path.strip_prefix("model.layers.")?;
        let (idx, name) = rest.split_once('.')?;
        let layer = self.layers.get_mut(idx.parse::<usize>().ok()?)?;
        match name {
            "input_layernorm" => Some(ModuleMut::Tensor(&mut layer.input_layernorm)),
            "post_attention_layernorm" => {
                Some(ModuleMut::Tensor(&mut layer.post_attention_layernorm))
            }
            _ => layer
                .linears_mut()
                .into_iter()
                .find(|(n, _)| *n == name)
                .map(|(_, l)| ModuleMut::Linear(l)),
        }
    }

    fn module_ref(&self, path: &str) -> Option<ModuleRef<'_>> {
        match path {
            "model.embed_tokens" => return Some(ModuleRef::Tensor(&self.embed_tokens)),
            "model.norm" => return Some(ModuleRef::Tensor(&self.norm)),
            "lm_head" => return Some(ModuleRef::Linear(&self.lm_head)),
            _ => {}
        }
        let rest = path.strip_prefix("model.layers.")?;
        let (idx, name) = rest.split_once('.')?;
        let layer = self.layers.get(idx.parse::<usize>().ok()?)?;
        match name {
            "input_layernorm" => Some(ModuleRef::Tensor(&layer.input_layernorm)),
            "post_attention_layernorm" => Some(ModuleRef::Tensor(&layer.post_attention_layernorm)),
            _ => layer
                .linears()
                .into_iter()
                .find(|(n, _)| *n == name)
                .map(|(_, l)| ModuleRef::Linear(l)),
        }
    }

    /// The stored parameters of leaf module `path` (see [`Self::leaf_modules`]), or `None` when
    /// the decoder has no such module.
    pub fn module_state(&self, path: &str) -> Option<ModuleState> {
        self.module_ref(path).map(|m| match m {
            ModuleRef::Linear(l) => ModuleState::Linear {
                weight: l.weight().clone(),
                bias: l.bias().cloned(),
            },
            ModuleRef::Tensor(t) => ModuleState::Tensor(t.clone()),
        })
    }

    /// The parameters of leaf module `path` as dense tensors in the compute dtype, named as
    /// transformers names them (`weight`, `bias`); quantised weights are dequantised.
    pub fn module_parameters(&self, path: &str) -> Result<Vec<(&'static str, Tensor)>> {
        match self.module_ref(path) {
            None => Err(Error::InvalidArgument(format!(
                "the model has no module `{path}`"
            ))),
            Some(ModuleRef::Tensor(t)) => Ok(vec![("weight", t.clone())]),
            Some(ModuleRef::Linear(l)) => {
                let mut out = vec![("weight", l.dense_weight()?)];
                out.extend(l.bias().map(|b| ("bias", b.clone())));
                Ok(out)
            }
        }
    }

    /// Replaces the parameters of leaf module `path`; shapes must match and a linear layer keeps
    /// its adapter.
    pub fn set_module_state(&mut self, path: &str, state: ModuleState) -> Result<()> {
        let bad = |what: String| Error::InvalidArgument(format!("module `{path}`: {what}"));
        match (self.module_mut(path), state) {
            (None, _) => Err(bad("the model has no such module".into())),
            (Some(ModuleMut::Tensor(slot)), ModuleState::Tensor(t)) => {
                if t.dims() != slot.dims() {
                    return Err(bad(format!(
                        "weight has shape {:?}, the model needs {:?}",
                        t.dims(),
                        slot.dims()
                    )));
                }
                *slot = t;
                Ok(())
            }
            (Some(ModuleMut::Linear(lin)), ModuleState::Linear { weight, bias }) => {
                let before = lin.shape();
                let old = lin.weight().clone();
                lin.set_weight(weight);
                if lin.shape() != before {
                    let after = lin.shape();
                    lin.set_weight(old);
                    return Err(bad(format!(
                        "weight has shape {after:?}, the model needs {before:?}"
                    )));
                }
                lin.set_bias(bias);
                Ok(())
            }
            (Some(_), _) => Err(bad(
                "a linear layer needs a linear state, a norm or embedding a tensor".into(),
            )),
        }
    }

    /// The dtype activations are computed in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Logits for every position: `[batch, seq, vocab]`.
    ///
    /// `input_ids` is `[batch, seq]` (u32). `attention_mask`, if given, is `[batch, past + seq]`
    /// with 1 for real tokens and 0 for padding (left padding), covering the cached positions
    /// too; positions are then counted from each row's first real token, as transformers'
    /// `generate` does. With a `cache`, keys and values are appended to it.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let hidden = self.hidden_states(input_ids, attention_mask, cache)?;
        Ok(self.lm_head.forward(&hidden)?)
    }

    /// Logits of the last position only: `[batch, vocab]` (what generation needs).
    pub fn forward_last(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let hidden = self.hidden_states(input_ids, attention_mask, cache)?;
        let t = hidden.dim(1)?;
        let last = hidden.narrow(1, t - 1, 1)?.squeeze(1)?;
        Ok(self.lm_head.forward(&last)?)
    }

    /// Final-norm hidden states `[batch, seq, hidden]`, before the output head (a chunked loss
    /// applies the head piece by piece).
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        if let Some(c) = cache.as_ref() {
            if c.layers.len() != self.layers.len() {
                return Err(Error::InvalidArgument(format!(
                    "KV cache has {} layers, model has {}",
                    c.layers.len(),
                    self.layers.len()
                )));
            }
        }
        self.reserve_tensor_ids();
        let past = cache.as_ref().map_or(0, |c| c.seq_len());
        let (mut xs, ctx) = self.embed(input_ids, attention_mask, past)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let c = cache.as_deref_mut().map(|c| (c, i));
            xs = layer.forward(&xs, &ctx, self.config.rms_norm_eps, c)?;
        }
        Ok(ops::rms_norm(&xs, &self.norm, self.config.rms_norm_eps)?)
    }

    /// Every long-lived tensor of the model (weights, biases, adapter matrices).
    pub fn tensors(&self) -> Vec<Tensor> {
        let mut out = vec![self.embed_tokens.clone(), self.norm.clone()];
        for layer in &self.layers {
            out.push(layer.input_layernorm.clone());
            out.push(layer.post_attention_layernorm.clone());
            for (_, lin) in layer.linears() {
                out.extend(lin.tensors());
            }
        }
        out.extend(self.lm_head.tensors());
        out
    }

    /// Makes tensors created from now on get ids above every model tensor's (needed in
    /// notebooks; see [`crate::ops::ids`]).
    pub fn reserve_tensor_ids(&self) {
        ops::ids::reserve_ids_above(ops::ids::max_id(&self.tensors()));
    }

    /// Token embeddings and the per-call context (rotary tables, mask), after checking ids.
    fn embed(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        past: usize,
    ) -> Result<(Tensor, Context)> {
        let (b, t) = input_ids.dims2().map_err(|_| {
            Error::InvalidArgument(format!(
                "input_ids must be [batch, seq], got shape {:?}",
                input_ids.dims()
            ))
        })?;
        if t == 0 {
            return Err(Error::InvalidArgument("input_ids has no positions".into()));
        }
        let ctx = self.context(b, t, past, attention_mask)?;
        let ids = input_ids.to_dtype(DType::U32)?;
        let max_id = ids.max_all()?.to_scalar::<u32>()? as usize;
        if max_id >= self.config.vocab_size {
            return Err(Error::InvalidArgument(format!(
                "token id {max_id} is outside the vocabulary ({} tokens)",
                self.config.vocab_size
            )));
        }
        let xs = self
            .embed_tokens
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, self.config.hidden_size))?;
        Ok((xs, ctx))
    }

    /// Forward and backward with gradient checkpointing: block activations are not kept during
    /// the forward pass; each block is recomputed in the backward pass from its saved input.
    /// Peak memory holds one block's activations instead of all of them, for one extra forward.
    ///
    /// `loss_fn` maps the final-norm hidden states `[batch, seq, hidden]` to a scalar loss
    /// (apply the output head inside it, e.g. in chunks). Returns the loss and the gradients of
    /// every trainable tensor (adapters) the blocks and `loss_fn` use — the same gradients a
    /// plain `loss.backward()` gives.
    pub fn checkpointed_backward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        loss_fn: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, GradStore)> {
        let eps = self.config.rms_norm_eps;
        self.reserve_tensor_ids();
        let (embedded, ctx) = self.embed(input_ids, attention_mask, 0)?;
        let mut xs = embedded.detach();
        // Forward without graphs, saving each block's input and its adapters' RNG state so the
        // recomputation draws the same dropout masks.
        let mut saved = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let rng = layer.adapter_rng_states();
            let input = xs.detach();
            xs = layer.forward(&input, &ctx, eps, None)?.detach();
            saved.push((input, rng));
        }
        let last = Var::from_tensor(&xs)?;
        let hidden = ops::rms_norm(last.as_tensor(), &self.norm, eps)?;
        let loss = loss_fn(&hidden)?;
        let mut grads = loss.backward()?;
        // A block's backward yields gradients for every tensor of its graph; only the model's
        // own long-lived tensors (adapters, modules trained in full) are worth keeping — the
        // rest would pile up to the very activation memory checkpointing exists to save.
        let keep: std::collections::HashSet<candle_core::TensorId> =
            self.tensors().iter().map(|t| t.id()).collect();
        let mut upstream = grads.remove(last.as_tensor()).ok_or_else(|| {
            Error::InvalidArgument("the loss does not depend on the model output".into())
        })?;
        for (layer, (input, rng)) in self.layers.iter().zip(saved).rev() {
            layer.set_adapter_rng_states(&rng);
            let x = Var::from_tensor(&input)?;
            let y = layer.forward(x.as_tensor(), &ctx, eps, None)?;
            // d(sum(y * g))/dθ = gᵀ dy/dθ: the chain rule through this block alone.
            let mut block_grads = (y * &upstream)?.sum_all()?.backward()?;
            let next = block_grads.remove(x.as_tensor());
            add_grads(&mut grads, &block_grads, &keep)?;
            match next {
                Some(g) => upstream = g,
                // Nothing below this block is trainable through it.
                None => return Ok((loss, grads)),
            }
        }
        // A trainable embedding table (PEFT's modules_to_save) takes the rest of the chain.
        if embedded.track_op() {
            let embed_grads = (embedded * &upstream)?.sum_all()?.backward()?;
            add_grads(&mut grads, &embed_grads, &keep)?;
        }
        Ok((loss, grads))
    }

    /// Rotary tables for each row's positions and the additive attention mask.
    fn context(&self, b: usize, t: usize, past: usize, mask: Option<&Tensor>) -> Result<Context> {
        let total = past + t;
        let mask_rows: Option<Vec<Vec<f32>>> = match mask {
            None => None,
            Some(m) => {
                let dims = m.dims();
                if dims != [b, total] {
                    return Err(Error::InvalidArgument(format!(
                        "attention_mask must be [batch, past + seq] = [{b}, {total}], got {dims:?}"
                    )));
                }
                Some(m.to_dtype(DType::F32)?.to_vec2::<f32>()?)
            }
        };
        // Positions: counted from each row's first real token when a mask is given.
        let positions: Vec<Vec<usize>> = match &mask_rows {
            None => vec![(past..total).collect(); b],
            Some(rows) => rows
                .iter()
                .map(|row| {
                    let mut count = 0usize;
                    let all: Vec<usize> = row
                        .iter()
                        .map(|&m| {
                            if m > 0.5 {
                                count += 1;
                            }
                            count.saturating_sub(1)
                        })
                        .collect();
                    all[past..].to_vec()
                })
                .collect(),
        };
        let half = self.inv_freq.len();
        let d = 2 * half;
        let mut cos = Vec::with_capacity(b * t * d);
        let mut sin = Vec::with_capacity(b * t * d);
        for row in &positions {
            for &p in row {
                // f32 products as transformers computes them, so tables agree to the last bit
                // at small positions.
                let angles: Vec<f32> = self.inv_freq.iter().map(|&f| p as f32 * f).collect();
                for _ in 0..2 {
                    cos.extend(angles.iter().map(|a| a.cos()));
                    sin.extend(angles.iter().map(|a| a.sin()));
                }
            }
        }
        let cos = Tensor::from_vec(cos, (b, 1, t, d), &self.device)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, (b, 1, t, d), &self.device)?.to_dtype(self.dtype)?;

        // A single new token with no padding needs no mask: it may see everything cached.
        let window = self.config.sliding_window;
        let needs_mask = t > 1 || mask_rows.is_some() || window.is_some_and(|w| total > w);
        let mask = if needs_mask {
            let mut data = Vec::with_capacity(b * t * total);
            for r in 0..b {
                for i in 0..t {
                    let q = past + i;
                    for k in 0..total {
                        let causal = k <= q;
                        let in_window = window.is_none_or(|w| q - k.min(q) < w);
                        let real = mask_rows.as_ref().is_none_or(|rows| rows[r][k] > 0.5);
                        // The dtype's most negative value, as transformers uses, keeps rows
                        // that see only padding finite instead of NaN.
                        data.push(if causal && in_window && real {
                            0.0
                        } else {
                            f32::MIN
                        });
                    }
                }
            }
            let m = Tensor::from_vec(data, (b, 1, t, total), &self.device)?;
            Some(m)
        } else {
            None
        };
        Ok(Context { cos, sin, mask })
    }

    /// Number of parameters actually held (embeddings counted once when tied).
    pub fn num_parameters(&self) -> usize {
        let per_layer: usize = self
            .layers
            .iter()
            .map(|l| {
                l.linears()
                    .iter()
                    .map(|(_, lin)| lin.num_parameters())
                    .sum::<usize>()
                    + l.input_layernorm.elem_count()
                    + l.post_attention_layernorm.elem_count()
            })
            .sum();
        let head = if self.config.tie_word_embeddings {
            0
        } else {
            self.lm_head.num_parameters()
        };
        self.embed_tokens.elem_count() + per_layer + self.norm.elem_count() + head
    }
}
