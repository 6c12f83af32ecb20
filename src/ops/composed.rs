//! The decoder's element-wise ops composed from candle primitives, which candle differentiates
//! itself: the path for dtypes and devices the fused kernels do not take, and the reference the
//! fused kernels are tested against.

use candle_core::{DType, Result, Tensor, D};

/// RMSNorm as transformers computes it: in f32, then cast back, then scaled by `weight`.
pub fn rms_norm(xs: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = xs.dtype();
    let xs32 = xs.to_dtype(DType::F32)?;
    let variance = xs32.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xs32.broadcast_div(&(variance + eps)?.sqrt()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(weight)
}

/// Softmax over the last dimension, built from primitives (max-subtracted for stability).
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax(xs, D::Minus1)
}

/// `x[..., :d/2]` and `x[..., d/2:]` swapped with the first half negated: `[-x2, x1]`.
fn rotate_half(xs: &Tensor) -> Result<Tensor> {
    let half = xs.dim(D::Minus1)? / 2;
    let x1 = xs.narrow(D::Minus1, 0, half)?;
    let x2 = xs.narrow(D::Minus1, half, half)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// Rotary position embedding: `x·cos + rotate_half(x)·sin`.
pub fn apply_rope(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    xs.broadcast_mul(cos)? + rotate_half(xs)?.broadcast_mul(sin)?
}

/// SwiGLU's gate: `silu(gate) * up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}
