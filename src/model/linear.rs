//! The one linear layer every projection of the decoder goes through.
//!
//! Its weight is either a dense tensor or a block of GGML-quantised data (from a GGUF file) that
//! stays quantised in memory and is dequantised for each product. Later layers of the crate
//! (4-bit NF4 bases, LoRA adapters) extend this type, so the decoder never changes when they
//! arrive.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor};

use crate::quant::Quantized4bit;

/// Above this many input rows, dequantising once and running a GEMM is faster than the
/// fused block kernel.
const FUSED_MAX_ROWS: usize = 8;

/// Storage of a linear layer's `[out_features, in_features]` weight.
#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// A plain tensor in the model's compute dtype.
    Dense(Tensor),
    /// GGML blocks (Q4_0, Q4_1, Q8_0, K-quants, F16, ...), dequantised per call.
    Ggml(Arc<QTensor>),
    /// bitsandbytes-style 4-bit blocks (NF4 / FP4, optionally double-quantised), dequantised
    /// per call.
    Quant4(Arc<Quantized4bit>),
}

/// A trainable term added to a linear layer's output (a LoRA adapter, for instance).
///
/// The model core only knows this trait; `crate::lora` implements it, so adapters attach to any
/// projection without the decoder changing.
pub trait LinearAdapter: Send + Sync + std::fmt::Debug {
    /// The term added to the base output for input rows `x` (`[rows, in_features]`, in the
    /// layer's compute dtype), or `None` when the adapter is currently disabled.
    fn delta(&self, x: &Tensor) -> Result<Option<Tensor>>;

    /// The state of the adapter's random generator (dropout), if it has one; gradient
    /// checkpointing restores it so a recomputed forward draws the same masks.
    fn rng_state(&self) -> Option<u64> {
        None
    }

    /// Restores a state from [`LinearAdapter::rng_state`].
    fn set_rng_state(&self, _state: u64) {}

    /// The long-lived tensors the adapter holds (see [`crate::ops::ids`]).
    fn tensors(&self) -> Vec<Tensor> {
        vec![]
    }
}

/// `y = x Wᵀ + b (+ adapter(x))`, with `W` dense or quantised.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    /// The dtype products are computed in (inputs are expected in it).
    compute_dtype: DType,
    device: Device,
    adapter: Option<Arc<dyn LinearAdapter>>,
}

impl Linear {
    /// A linear layer over a dense `[out, in]` weight.
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Self {
        let compute_dtype = weight.dtype();
        let device = weight.device().clone();
        Self {
            weight: LinearWeight::Dense(weight),
            bias,
            compute_dtype,
            device,
            adapter: None,
        }
    }

    /// A linear layer over GGML-quantised data; products run in `compute_dtype`.
    pub fn ggml(weight: Arc<QTensor>, bias: Option<Tensor>, compute_dtype: DType) -> Self {
        let device = weight.device();
        Self {
            weight: LinearWeight::Ggml(weight),
            bias,
            compute_dtype,
            device,
            adapter: None,
        }
    }

    /// A linear layer over 4-bit (NF4/FP4) data, computing in `compute_dtype` on `device`.
    pub fn quant4(
        weight: Arc<Quantized4bit>,
        bias: Option<Tensor>,
        compute_dtype: DType,
        device: &Device,
    ) -> Self {
        Self {
            weight: LinearWeight::Quant4(weight),
            bias,
            compute_dtype,
            device: device.clone(),
            adapter: None,
        }
    }

    /// The dtype products are computed in.
    pub fn compute_dtype(&self) -> DType {
        self.compute_dtype
    }

    /// Attaches (or, with `None`, removes) an adapter.
    pub fn set_adapter(&mut self, adapter: Option<Arc<dyn LinearAdapter>>) {
        self.adapter = adapter;
    }

    /// The attached adapter, if any.
    pub fn adapter(&self) -> Option<&Arc<dyn LinearAdapter>> {
        self.adapter.as_ref()
    }

    /// Replaces the stored weight (same shape), e.g. with adapters merged into it.
    pub fn set_weight(&mut self, weight: LinearWeight) {
        if let LinearWeight::Dense(w) = &weight {
            self.compute_dtype = w.dtype();
        }
        self.weight = weight;
    }

    /// The weight and bias when they are trainable variables (a module trained in full), for
    /// code that computes their gradient apart from the graph (the chunked loss).
    pub fn variables(&self) -> Vec<Tensor> {
        let mut out = Vec::new();
        if let LinearWeight::Dense(w) = &self.weight {
            if w.is_variable() {
                out.push(w.clone());
            }
        }
        out.extend(self.bias.iter().filter(|b| b.is_variable()).cloned());
        out
    }

    /// Replaces the bias (or removes it with `None`).
    pub fn set_bias(&mut self, bias: Option<Tensor>) {
        self.bias = bias;
    }

    /// The long-lived tensors of this layer: dense weight, bias, adapter matrices.
    pub fn tensors(&self) -> Vec<Tensor> {
        let mut out: Vec<Tensor> = self.bias.iter().cloned().collect();
        if let LinearWeight::Dense(w) = &self.weight {
            out.push(w.clone());
        }
        if let Some(a) = &self.adapter {
            out.extend(a.tensors());
        }
        out
    }

    /// The stored weight.
    pub fn weight(&self) -> &LinearWeight {
        &self.weight
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `(out_features, in_features)`.
    pub fn shape(&self) -> (usize, usize) {
        let dims = match &self.weight {
            LinearWeight::Dense(w) => w.dims().to_vec(),
            LinearWeight::Ggml(q) => q.shape().dims().to_vec(),
            LinearWeight::Quant4(q) => q.shape().to_vec(),
        };
        (dims[0], dims[1])
    }

    /// The weight as a dense tensor in the compute dtype (dequantised when quantised).
    pub fn dense_weight(&self) -> Result<Tensor> {
        match &self.weight {
            LinearWeight::Dense(w) => Ok(w.clone()),
            LinearWeight::Ggml(q) => {
                let w = match crate::ops::ggml::dequantize(q)? {
                    Some(w) => w,
                    None => q.dequantize(&q.device())?,
                };
                w.to_dtype(self.compute_dtype)
            }
            LinearWeight::Quant4(q) => q
                .dequantize(&self.device)
                .map_err(candle_core::Error::wrap)?
                .to_dtype(self.compute_dtype),
        }
    }

    /// The same layer (adapter and bias included) with its weight dequantised once, for a caller
    /// that multiplies by it many times in a row (the chunked loss runs the output head forward
    /// and backward per chunk). A dense layer is returned as it is.
    pub fn dequantized(&self) -> Result<Linear> {
        let mut layer = self.clone();
        if !matches!(self.weight, LinearWeight::Dense(_)) {
            layer.weight = LinearWeight::Dense(self.dense_weight()?);
        }
        Ok(layer)
    }

    /// Whether the weight takes no gradient (quantised weights never do; a dense one does when it
    /// is a variable).
    fn weight_is_frozen(&self) -> bool {
        match &self.weight {
            LinearWeight::Dense(w) => !w.track_op(),
            LinearWeight::Ggml(_) | LinearWeight::Quant4(_) => true,
        }
    }

    /// The device the layer computes on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Number of parameters (weight and bias).
    pub fn num_parameters(&self) -> usize {
        let (o, i) = self.shape();
        o * i + self.bias.as_ref().map_or(0, |b| b.elem_count())
    }

    /// Bytes the weight and bias occupy in memory.
    pub fn storage_bytes(&self) -> usize {
        let w = match &self.weight {
            LinearWeight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            LinearWeight::Ggml(q) => q.storage_size_in_bytes(),
            LinearWeight::Quant4(q) => q.storage_bytes(),
        };
        w + self
            .bias
            .as_ref()
            .map_or(0, |b| b.elem_count() * b.dtype().size_in_bytes())
    }

    /// A short name of the weight's storage format: `f32`, `bf16`, `Q4_1`, ...
    pub fn format_name(&self) -> String {
        match &self.weight {
            LinearWeight::Dense(w) => w.dtype().as_str().to_string(),
            LinearWeight::Ggml(q) => ggml_dtype_name(q.dtype()).to_string(),
            LinearWeight::Quant4(q) => {
                let s = q.state();
                let dq = if matches!(s.absmax, crate::quant::Absmax::Nested(_)) {
                    "+dq"
                } else {
                    ""
                };
                format!("{}{dq}", s.quant_type.name())
            }
        }
    }
}

/// The conventional spelling of a GGML dtype (`Q4_1`, `Q4K`→`Q4_K`, ...).
pub fn ggml_dtype_name(dtype: GgmlDType) -> &'static str {
    match dtype {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
        #[allow(unreachable_patterns)]
        _ => "GGML",
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        // Flatten leading dims so the product is one 2-D matmul against the transposed weight
        // (candle's CPU gemm reads the transposed layout without a copy).
        let dims = xs.dims().to_vec();
        let Some(&in_features) = dims.last() else {
            candle_core::bail!(
                "a linear layer needs an input with at least one dimension, got a scalar"
            );
        };
        let rows = xs.elem_count() / in_features.max(1);
        let x2 = xs.reshape((rows, in_features))?;
        // The adapter runs first: in a notebook its code (a trait object) may come from another
        // cell's copy of candle, with its own tensor-id counter. Each side moves its counter
        // past the other's newest id so the two never hand out the same id (see ops::ids).
        let delta = match &self.adapter {
            Some(a) => a.delta(&x2)?,
            None => None,
        };
        if let Some(d) = &delta {
            crate::ops::ids::reserve_ids_above(crate::ops::ids::tensor_id_value(d));
        }
        let no_grad = !crate::ops::grad_enabled();
        let fused = match &self.weight {
            // Decoding a few rows without gradient: multiply straight from the blocks instead
            // of writing out the whole f32 weight (same numbers, ~an order of magnitude less
            // memory traffic).
            LinearWeight::Ggml(q) if rows <= FUSED_MAX_ROWS && (no_grad || !xs.track_op()) => {
                crate::ops::ggml::matmul_t(&x2, q)?
            }
            _ => None,
        };
        let y = match fused {
            Some(y) => y,
            // Training: the weight is frozen, so only the input needs a gradient.
            None if !no_grad
                && x2.track_op()
                && x2.device().is_cpu()
                && self.weight_is_frozen() =>
            {
                FrozenMatmul::apply(&x2, self)?
            }
            None => x2.matmul(&self.dense_weight()?.t()?)?,
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let y = match delta {
            Some(delta) => (y + delta)?,
            None => y,
        };
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = y.dim(1)?;
        let y = y.reshape(out_dims)?;
        // A trainable copy (modules_to_save) or bias would otherwise start a graph here.
        Ok(if no_grad { y.detach() } else { y })
    }
}

/// `x·Wᵀ` for a frozen `W`, differentiable in `x` only.
///
/// candle's own matmul backward also computes `∂L/∂W` (a second product as large as the forward
/// one) and keeps the dense weight alive in the graph until the backward pass. Here the product
/// is computed off the graph and re-attached through a custom op whose backward is `grad·W`, with
/// `W` dequantised again from the layer's compact storage: no weight gradient, and no dense copy
/// of the model held between forward and backward.
struct FrozenMatmul {
    weight: Linear,
    /// The product, handed over once to `cpu_fwd` (taken, so the graph does not hold it twice).
    output: std::sync::Mutex<Option<Tensor>>,
}

impl FrozenMatmul {
    fn apply(x: &Tensor, layer: &Linear) -> Result<Tensor> {
        let product = x
            .detach()
            .matmul(&layer.dense_weight()?.t()?)?
            .contiguous()?;
        let op = FrozenMatmul {
            // A weight-only twin of the layer: no adapter or bias to keep alive.
            weight: Linear {
                weight: layer.weight.clone(),
                bias: None,
                adapter: None,
                compute_dtype: layer.compute_dtype,
                device: layer.device.clone(),
            },
            output: std::sync::Mutex::new(Some(product)),
        };
        x.apply_op1_arc(Arc::new(Box::new(op)))
    }
}

impl candle_core::CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        _storage: &candle_core::CpuStorage,
        _layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let product = self
            .output
            .lock()
            .map_err(|_| candle_core::Error::Msg("frozen-linear: poisoned lock".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("frozen-linear: forward ran twice".into()))?;
        let (storage, layout) = product.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cpu(cpu) if layout.start_offset() == 0 => {
                Ok((cpu.clone(), layout.shape().clone()))
            }
            _ => candle_core::bail!("frozen-linear: expected a contiguous CPU product"),
        }
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let w = self.weight.dense_weight()?;
        Ok(Some(grad.matmul(&w)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn quantised_and_dense_agree_and_gradient_reaches_input() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.5, (8, 64), &dev).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let wq = q.dequantize(&dev).unwrap();
        let dense = Linear::dense(wq, None);
        let quant = Linear::ggml(Arc::new(q), None, DType::F32);
        assert_eq!(quant.shape(), (8, 64));
        assert_eq!(quant.format_name(), "Q8_0");
        assert!(quant.storage_bytes() < dense.storage_bytes() / 3);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 64), &dev).unwrap()).unwrap();
        let a = dense.forward(x.as_tensor()).unwrap();
        let b = quant.forward(x.as_tensor()).unwrap();
        assert_eq!(a.dims(), &[2, 3, 8]);
        let diff = crate::ops::max_abs_diff(&a, &b);
        assert!(diff < 1e-5, "{diff}");
        let grads = b.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(x.as_tensor()).is_some());
    }
}
