//! Differentiable building blocks of the decoder.
//!
//! candle's fused `rms_norm`, `rope` and `softmax_last_dim` have no backward pass and raise no
//! error when one is needed: gradients silently stop at them. Each op here has a backward: on
//! f32 CPU tensors it runs our fused kernel with a hand-written backward ([`fused`]); anything
//! else (bf16/f16 compute, CUDA) takes the version composed from candle primitives
//! ([`composed`]), which candle differentiates itself.

pub mod composed;
pub(crate) mod fused;
pub mod ggml;
mod grad;
pub mod ids;

pub use grad::{grad_enabled, no_grad};

use candle_core::{DType, Result, Tensor};

/// RMSNorm as transformers computes it: in f32, then cast back, then scaled by `weight`.
///
/// `y = weight * (x / sqrt(mean(x², last dim) + eps))`
pub fn rms_norm(xs: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if fused::supports(xs) && fused::supports(weight) {
        fused::rms_norm(xs, weight, eps)
    } else {
        composed::rms_norm(xs, weight, eps)
    }
}

/// The attention weights `softmax(scores · scale + mask)` over the last dimension, in f32 as
/// transformers' eager attention computes them whatever the model's dtype (the f32 mask value
/// would overflow f16).
///
/// `scores` is `q·kᵀ`, `[batch, heads, queries, keys]`; `mask` is additive (0 where a key may be
/// seen, the most negative f32 where not), `[batch, 1, queries, keys]`.
pub fn attention_softmax(scores: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Tensor> {
    if fused::supports(scores) && mask.is_none_or(fused::supports) {
        fused::attention_softmax(scores, scale as f32, mask)
    } else {
        let scores = (scores * scale)?.to_dtype(DType::F32)?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        composed::softmax_last_dim(&scores)
    }
}

/// Rotary position embedding in the "rotate half" layout of transformers' Llama.
///
/// `xs` is `[batch, heads, seq, head_dim]`; `cos` and `sin` are `[batch, 1, seq, head_dim]`
/// (already gathered for each row's positions, so left-padded batches work).
pub fn apply_rope(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if fused::supports(xs) && fused::supports(cos) && fused::supports(sin) {
        fused::rope(xs, cos, sin)
    } else {
        composed::apply_rope(xs, cos, sin)
    }
}

/// SwiGLU's gate: `silu(gate) * up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if fused::supports(gate) && fused::supports(up) {
        fused::swiglu(gate, up)
    } else {
        composed::swiglu(gate, up)
    }
}

/// Largest absolute difference between two tensors of the same shape (unit tests).
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
        .expect("tensors of the same shape")
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn assert_close(a: &Tensor, b: &Tensor, tol: f32) {
        let diff = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff <= tol, "max abs diff {diff} > {tol}");
    }

    #[test]
    fn rms_norm_matches_candle_fused_forward_and_has_gradient() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 8), &dev).unwrap()).unwrap();
        let w = Tensor::randn(1f32, 0.1, 8, &dev).unwrap();
        let ours = rms_norm(x.as_tensor(), &w, 1e-5).unwrap();
        let fused = candle_nn::ops::rms_norm(x.as_tensor(), &w, 1e-5).unwrap();
        assert_close(&ours, &fused, 1e-5);
        let grads = ours.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let g = grads
            .get(x.as_tensor())
            .expect("gradient reaches the input");
        assert!(
            g.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        );
    }

    #[test]
    fn rope_matches_candle_fused_forward_and_has_gradient() {
        let dev = Device::Cpu;
        let (b, h, t, d) = (1, 2, 5, 8);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, h, t, d), &dev).unwrap()).unwrap();
        let cos_half = Tensor::randn(0f32, 1.0, (t, d / 2), &dev).unwrap();
        let sin_half = Tensor::randn(0f32, 1.0, (t, d / 2), &dev).unwrap();
        let cos = Tensor::cat(&[&cos_half, &cos_half], 1)
            .unwrap()
            .reshape((1, 1, t, d))
            .unwrap();
        let sin = Tensor::cat(&[&sin_half, &sin_half], 1)
            .unwrap()
            .reshape((1, 1, t, d))
            .unwrap();
        let ours = apply_rope(x.as_tensor(), &cos, &sin).unwrap();
        let fused = candle_nn::rotary_emb::rope(x.as_tensor(), &cos_half, &sin_half).unwrap();
        assert_close(&ours, &fused, 1e-5);
        let grads = ours.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(x.as_tensor()).is_some());
    }

    #[test]
    fn softmax_rows_sum_to_one_and_has_gradient() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 3.0, (4, 7), &dev).unwrap()).unwrap();
        let p = composed::softmax_last_dim(x.as_tensor()).unwrap();
        let sums = p.sum(1).unwrap();
        assert_close(&sums, &Tensor::ones(4, DType::F32, &dev).unwrap(), 1e-6);
        let w = Tensor::randn(0f32, 1.0, (4, 7), &dev).unwrap();
        let grads = (p * w).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(grads.get(x.as_tensor()).is_some());
    }
}
