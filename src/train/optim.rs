//! AdamW over the adapter parameters, step for step what `torch.optim.AdamW` does.
//!
//! The update replicates torch's single-tensor implementation (`_single_tensor_adam` with
//! `decoupled_weight_decay=True`) operation by operation in f32, with the scalar factors computed
//! in f64 and rounded to f32 where torch rounds them, and torch's fused multiply-adds emulated
//! (measured on torch 2.15's AVX-512 CPU kernels: lerp and addcmul round once, addcdiv is
//! `p + (s·m)/d`, the scalar division is a true division):
//!
//! ```text
//! step += 1
//! p  *= 1 - lr·wd                                   (decoupled weight decay, before the update)
//! m   = fma(1 - β1, g - m, m)                       (torch: exp_avg.lerp_(g, 1 - β1))
//! v   = fma((1 - β2)·g, g, v·β2)                    (exp_avg_sq.mul_(β2).addcmul_(g, g, 1 - β2))
//! denom = sqrt(v) / sqrt(1 - β2^step) + eps          (a true division, then eps)
//! p  += (-(lr / (1 - β1^step))·m) / denom            (param.addcdiv_(m, denom, value=-step_size))
//! ```
//!
//! State is kept in f32 whatever the parameter dtype, like torch's `state_dict` for f32 params.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// AdamW hyper-parameters; `Default` is transformers' Trainer default (β 0.9/0.999, eps 1e-8,
/// no weight decay).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamWConfig {
    /// β1, the first-moment decay.
    pub beta1: f64,
    /// β2, the second-moment decay.
    pub beta2: f64,
    /// Added to the bias-corrected root second moment.
    pub eps: f64,
    /// Decoupled weight decay (`p *= 1 - lr·wd` each step).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

impl AdamWConfig {
    /// Sets β1 and β2.
    pub fn betas(mut self, beta1: f64, beta2: f64) -> Self {
        self.beta1 = beta1;
        self.beta2 = beta2;
        self
    }

    /// Sets eps.
    pub fn eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        self
    }

    /// Sets the weight decay.
    pub fn weight_decay(mut self, weight_decay: f64) -> Self {
        self.weight_decay = weight_decay;
        self
    }
}

/// Multiplicands for [`fma_f32`]: a tensor or an f32 scalar (given as f64).
trait Factor {
    fn times(&self, a: &Tensor) -> Result<Tensor>;
}

impl Factor for f64 {
    fn times(&self, a: &Tensor) -> Result<Tensor> {
        Ok(a.affine(*self, 0.0)?)
    }
}

impl Factor for &Tensor {
    fn times(&self, a: &Tensor) -> Result<Tensor> {
        Ok((a * self.to_dtype(DType::F64)?)?)
    }
}

/// `a·b + c` rounded once to f32, as torch's CPU kernels compute lerp and addcmul (with a fused
/// multiply-add): the f32×f32 product is exact in f64, so only the final sum rounds (twice, which
/// differs from a true FMA only in rare halfway cases).
fn fma_f32(a: Tensor, b: impl Factor, c: &Tensor) -> Result<Tensor> {
    let prod = b.times(&a.to_dtype(DType::F64)?)?;
    Ok((prod + c.to_dtype(DType::F64)?)?.to_dtype(DType::F32)?)
}

/// One parameter's optimiser state.
#[derive(Debug)]
struct ParamState {
    name: String,
    var: Var,
    /// First moment (`exp_avg`), f32.
    m: Tensor,
    /// Second moment (`exp_avg_sq`), f32.
    v: Tensor,
    /// Steps this parameter has taken (torch keeps one count per parameter: a parameter without
    /// a gradient in some step is not stepped).
    step: u64,
}

/// AdamW over named variables (the LoRA matrices from `PeftModel::trainable_parameters`).
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    params: Vec<ParamState>,
}

impl AdamW {
    /// An optimiser over `params` with zeroed state (torch initialises lazily to zeros, which is
    /// the same thing).
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let mut seen = std::collections::HashSet::new();
        let params = params
            .into_iter()
            .map(|(name, var)| {
                if !seen.insert(name.clone()) {
                    return Err(Error::InvalidArgument(format!(
                        "AdamW: parameter name `{name}` appears twice"
                    )));
                }
                let zeros = Tensor::zeros(var.shape(), DType::F32, var.device())?;
                Ok(ParamState {
                    name,
                    m: zeros.clone(),
                    v: zeros,
                    var,
                    step: 0,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { config, params })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// The optimised parameters, in the order given.
    pub fn params(&self) -> Vec<(String, Var)> {
        self.params
            .iter()
            .map(|p| (p.name.clone(), p.var.clone()))
            .collect()
    }

    /// Steps taken so far (the largest per-parameter count).
    pub fn step_count(&self) -> u64 {
        self.params.iter().map(|p| p.step).max().unwrap_or(0)
    }

    /// One update at learning rate `lr`. Parameters without a gradient in `grads` are left alone,
    /// as torch skips parameters whose `.grad` is `None`.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        let c = self.config;
        for p in &mut self.params {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            // Detached: the update must not extend any autograd graph.
            let g = g.detach().to_dtype(DType::F32)?;
            p.step += 1;
            let mut param = p.var.as_tensor().detach().to_dtype(DType::F32)?;
            if c.weight_decay != 0.0 {
                param = param.affine(1.0 - lr * c.weight_decay, 0.0)?;
            }
            // exp_avg.lerp_(grad, w = 1 - β1): torch computes fma(w, g - m, m) for w < 0.5,
            // fma(w - 1, g - m, g) otherwise.
            let w1 = (1.0 - c.beta1) as f32;
            let diff = (&g - &p.m)?;
            let m = if w1 < 0.5 {
                fma_f32(diff, f64::from(w1), &p.m)?
            } else {
                fma_f32(diff, f64::from(w1 - 1.0), &g)?
            };
            // exp_avg_sq.mul_(β2).addcmul_(g, g, value=1 - β2): fma((1-β2)·g, g, v·β2).
            let wg = g.affine(1.0 - c.beta2, 0.0)?;
            let v = fma_f32(wg, &g, &p.v.affine(c.beta2, 0.0)?)?;
            let t = p.step as f64;
            let bias_correction1 = 1.0 - c.beta1.powf(t);
            let bias_correction2 = 1.0 - c.beta2.powf(t);
            let step_size = lr / bias_correction1;
            let bias_correction2_sqrt = bias_correction2.powf(0.5);
            // A true division by the scalar (candle's `tensor / f64` multiplies by the reciprocal,
            // torch divides), then eps.
            let divisor = Tensor::new(bias_correction2_sqrt as f32, g.device())?;
            let denom = v.sqrt()?.broadcast_div(&divisor)?.affine(1.0, c.eps)?;
            let update = (m.affine(-step_size, 0.0)? / &denom)?;
            let param = (param + update)?;
            p.var.set(&param.to_dtype(p.var.dtype())?)?;
            p.m = m;
            p.v = v;
        }
        Ok(())
    }

    /// The state as named tensors for a checkpoint: `{name}.exp_avg`, `{name}.exp_avg_sq` (f32)
    /// and `{name}.step` (a 1-element I64 tensor).
    pub fn state_dict(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(3 * self.params.len());
        for p in &self.params {
            out.push((format!("{}.exp_avg", p.name), p.m.clone()));
            out.push((format!("{}.exp_avg_sq", p.name), p.v.clone()));
            out.push((
                format!("{}.step", p.name),
                Tensor::new(&[p.step as i64], p.var.device())?,
            ));
        }
        Ok(out)
    }

    /// Restores [`AdamW::state_dict`]'s output. Every parameter's three entries must be present
    /// with matching shapes; the error names the first one that is not.
    pub fn load_state_dict(&mut self, state: Vec<(String, Tensor)>) -> Result<()> {
        let mut map: HashMap<String, Tensor> = state.into_iter().collect();
        let mut take = |key: String, shape: &[usize]| -> Result<Tensor> {
            let t = map.remove(&key).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "optimizer state lacks `{key}`: the checkpoint was made for other parameters"
                ))
            })?;
            if t.dims() != shape {
                return Err(Error::InvalidArgument(format!(
                    "optimizer state `{key}` has shape {:?}, the parameter needs {shape:?}",
                    t.dims()
                )));
            }
            Ok(t)
        };
        let mut loaded = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let dims = p.var.dims().to_vec();
            let dev = p.var.device();
            let m = take(format!("{}.exp_avg", p.name), &dims)?
                .to_dtype(DType::F32)?
                .to_device(dev)?;
            let v = take(format!("{}.exp_avg_sq", p.name), &dims)?
                .to_dtype(DType::F32)?
                .to_device(dev)?;
            let step = take(format!("{}.step", p.name), &[1])?
                .to_dtype(DType::I64)?
                .to_vec1::<i64>()?[0];
            if step < 0 {
                return Err(Error::InvalidArgument(format!(
                    "optimizer state `{}.step` is negative ({step})",
                    p.name
                )));
            }
            loaded.push((m, v, step as u64));
        }
        if let Some(extra) = map.keys().min() {
            return Err(Error::InvalidArgument(format!(
                "optimizer state has `{extra}`, which belongs to no parameter of this optimizer"
            )));
        }
        for (p, (m, v, step)) in self.params.iter_mut().zip(loaded) {
            p.m = m;
            p.v = v;
            p.step = step;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn setup() -> (Var, AdamW) {
        let var =
            Var::from_tensor(&Tensor::new(&[1.0f32, -2.0, 3.0], &Device::Cpu).unwrap()).unwrap();
        let opt = AdamW::new(
            vec![("w".into(), var.clone())],
            AdamWConfig::default().weight_decay(0.1),
        )
        .unwrap();
        (var, opt)
    }

    #[test]
    fn first_step_moves_by_lr_against_the_gradient_sign() {
        let (var, mut opt) = setup();
        let loss = (var.as_tensor() * 2.0).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        opt.step(&grads, 0.1).unwrap();
        // Step 1: m̂ = g, v̂ = g², so the update is lr·g/(|g| + eps) ≈ lr, after decay.
        let got = var.as_tensor().to_vec1::<f32>().unwrap();
        for (x, x0) in got.iter().zip([1.0f32, -2.0, 3.0]) {
            let want = x0 * (1.0 - 0.01) - 0.1;
            assert!((x - want).abs() < 1e-6, "{x} vs {want}");
        }
        assert_eq!(opt.step_count(), 1);
    }

    #[test]
    fn state_round_trip_and_mismatch_errors() {
        let (var, mut opt) = setup();
        let grads = var
            .as_tensor()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        opt.step(&grads, 0.1).unwrap();
        let state = opt.state_dict().unwrap();
        assert_eq!(state.len(), 3);
        let (_, mut fresh) = setup();
        fresh.load_state_dict(state.clone()).unwrap();
        assert_eq!(fresh.step_count(), 1);
        let mut missing = state.clone();
        missing.retain(|(k, _)| !k.ends_with("exp_avg_sq"));
        let err = fresh.load_state_dict(missing).unwrap_err().to_string();
        assert!(err.contains("w.exp_avg_sq"), "{err}");
        let mut extra = state;
        extra.push(("z.step".into(), Tensor::new(&[1i64], &Device::Cpu).unwrap()));
        assert!(fresh.load_state_dict(extra).is_err());
    }
}
