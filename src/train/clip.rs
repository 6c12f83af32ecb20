//! Global-norm gradient clipping, as `torch.nn.utils.clip_grad_norm_`, and the finiteness check
//! that turns a NaN/inf norm into a "stop at step N" error instead of a corrupted update.
//!
//! torch computes each gradient's L2 norm, then the L2 norm of those norms, then
//! `coef = max_norm / (total + 1e-6)` clamped to at most 1, and multiplies every gradient by it
//! (all in f32). Here each per-tensor sum of squares is accumulated in f64 (torch's vectorised
//! reduction is more accurate than a naive f32 sum; f64 keeps us within an ulp or so of it) and
//! rounded to an f32 norm, after which the arithmetic is torch's.

use candle_core::backprop::GradStore;
use candle_core::{DType, Var};

use crate::Result;

/// What [`clip_grad_norm`] measured and did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradNorm {
    /// The total L2 norm of all gradients before clipping (what the Trainer logs as
    /// `grad_norm`).
    pub norm: f32,
    /// The factor the gradients were multiplied by (1 when they were within `max_norm`; NaN when
    /// the norm was not finite, in which case the gradients were left untouched).
    pub clip_coef: f32,
}

impl GradNorm {
    /// Whether the norm is a finite number (an optimiser step is safe).
    pub fn is_finite(&self) -> bool {
        self.norm.is_finite()
    }

    /// The norm, or a [`NonFinite`] error naming `step` when it is NaN or infinite.
    pub fn check(&self, step: usize) -> std::result::Result<f32, NonFinite> {
        NonFinite::check("gradient norm", self.norm, step)
    }
}

/// A loss or gradient norm that became NaN or infinite: training must stop before the optimiser
/// writes it into the weights. The trainer turns it into its error ("NaN at step N").
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[error("{quantity} is {value} at step {step}: training stopped before the update (lower the learning rate, enable gradient clipping, or check the data of this step)")]
pub struct NonFinite {
    /// What was measured: "loss" or "gradient norm".
    pub quantity: &'static str,
    /// The offending value.
    pub value: f32,
    /// The optimiser step (0-based) it happened at.
    pub step: usize,
}

impl NonFinite {
    /// `Ok(value)` when finite, else the error for `quantity` at `step`.
    pub fn check(
        quantity: &'static str,
        value: f32,
        step: usize,
    ) -> std::result::Result<f32, Self> {
        if value.is_finite() {
            Ok(value)
        } else {
            Err(Self {
                quantity,
                value,
                step,
            })
        }
    }
}

/// Per-parameter L2 norms of the gradients in `grads` (parameters without a gradient are
/// skipped, as torch skips `None` grads), in the order of `params`.
pub fn grad_norms(grads: &GradStore, params: &[(String, Var)]) -> Result<Vec<(String, f32)>> {
    let mut out = Vec::with_capacity(params.len());
    for (name, var) in params {
        if let Some(g) = grads.get(var.as_tensor()) {
            let sq = g
                .detach()
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
            out.push((name.clone(), sq.sqrt() as f32));
        }
    }
    Ok(out)
}

/// The total L2 norm over all gradients of `params` (torch's `get_total_norm`).
pub fn total_grad_norm(grads: &GradStore, params: &[(String, Var)]) -> Result<f32> {
    Ok(total_of(&grad_norms(grads, params)?))
}

/// torch stacks the f32 per-tensor norms and takes their norm.
fn total_of(norms: &[(String, f32)]) -> f32 {
    norms
        .iter()
        .map(|(_, n)| f64::from(*n) * f64::from(*n))
        .sum::<f64>()
        .sqrt() as f32
}

/// Scales the gradients of `params` in place so their global L2 norm is at most `max_norm`
/// (`torch.nn.utils.clip_grad_norm_`), returning the pre-clip norm.
///
/// A non-finite norm is returned as is (check it with [`GradNorm::check`]) and the gradients are
/// not touched: the trainer must not step on them.
pub fn clip_grad_norm(
    grads: &mut GradStore,
    params: &[(String, Var)],
    max_norm: f64,
) -> Result<GradNorm> {
    let norm = total_grad_norm(grads, params)?;
    if !norm.is_finite() {
        return Ok(GradNorm {
            norm,
            clip_coef: f32::NAN,
        });
    }
    let clip_coef = (max_norm as f32 / (norm + 1e-6f32)).min(1.0);
    // torch multiplies by the clamped coefficient unconditionally; × 1.0 is exact, so skip it.
    if clip_coef < 1.0 {
        for (_, var) in params {
            if let Some(g) = grads.get(var.as_tensor()) {
                let scaled = g.detach().affine(f64::from(clip_coef), 0.0)?;
                grads.insert(var.as_tensor(), scaled);
            }
        }
    }
    Ok(GradNorm { norm, clip_coef })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn setup(values: &[f32]) -> (Vec<(String, Var)>, GradStore) {
        let a = Var::new(&[0f32, 0.0], &Device::Cpu).unwrap();
        let b = Var::new(&[0f32], &Device::Cpu).unwrap();
        let w = Tensor::new(values, &Device::Cpu).unwrap();
        let both = Tensor::cat(&[a.as_tensor(), b.as_tensor()], 0).unwrap();
        let grads = (both * w).unwrap().sum_all().unwrap().backward().unwrap();
        (vec![("a".into(), a), ("b".into(), b)], grads)
    }

    #[test]
    fn clips_to_max_norm_and_reports_pre_clip_norm() {
        let (params, mut grads) = setup(&[3.0, 0.0, 4.0]);
        let r = clip_grad_norm(&mut grads, &params, 1.0).unwrap();
        assert_eq!(r.norm, 5.0);
        let after = total_grad_norm(&grads, &params).unwrap();
        assert!((after - 1.0).abs() < 1e-6, "{after}");
        // Within the limit: untouched.
        let (params, mut grads) = setup(&[0.3, 0.0, 0.4]);
        let r = clip_grad_norm(&mut grads, &params, 1.0).unwrap();
        assert_eq!(r.clip_coef, 1.0);
        assert_eq!(
            grads
                .get(params[1].1.as_tensor())
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            [0.4]
        );
    }

    #[test]
    fn nan_gradient_is_reported_with_its_step() {
        let (params, mut grads) = setup(&[f32::NAN, 0.0, 1.0]);
        let r = clip_grad_norm(&mut grads, &params, 1.0).unwrap();
        assert!(!r.is_finite());
        let err = r.check(7).unwrap_err();
        assert_eq!(err.step, 7);
        assert!(
            err.to_string()
                .starts_with("gradient norm is NaN at step 7"),
            "{err}"
        );
    }
}
