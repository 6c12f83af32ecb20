//! The LoRA layer math: `delta(x) = B (A (dropout(x))) · scaling`, summed over the active
//! adapters, attached to a base [`Linear`](crate::model::Linear) through
//! [`LinearAdapter`](crate::model::linear::LinearAdapter).

use std::collections::BTreeMap;
use std::sync::{Mutex, RwLock};

use candle_core::{DType, Device, Result, Tensor, Var};

use super::config::{InitLoraWeights, LoraConfig};
use crate::model::linear::LinearAdapter;
pub use crate::rng::SplitMix64;

/// One adapter's matrices on one linear layer.
#[derive(Debug, Clone)]
pub struct LoraWeights {
    /// `[r, in_features]`.
    pub a: Var,
    /// `[out_features, r]`.
    pub b: Var,
    pub scaling: f64,
    pub dropout: f64,
}

#[derive(Debug)]
struct State {
    adapters: BTreeMap<String, LoraWeights>,
    active: Vec<String>,
    enabled: bool,
    training: bool,
}

/// The adapters living on one linear layer (possibly several, by name; some active).
#[derive(Debug)]
pub struct LoraLayer {
    in_features: usize,
    out_features: usize,
    device: Device,
    state: RwLock<State>,
    rng: Mutex<SplitMix64>,
}

impl LoraLayer {
    /// An empty layer for a `[out, in]` base; `seed` drives its dropout masks.
    pub fn new(in_features: usize, out_features: usize, device: &Device, seed: u64) -> Self {
        Self {
            in_features,
            out_features,
            device: device.clone(),
            state: RwLock::new(State {
                adapters: BTreeMap::new(),
                active: vec![],
                enabled: true,
                training: false,
            }),
            rng: Mutex::new(SplitMix64::new(seed)),
        }
    }

    /// `(in_features, out_features)` of the base layer.
    pub fn shape(&self) -> (usize, usize) {
        (self.in_features, self.out_features)
    }

    /// Adds adapter `name` initialised as `config` says (A from `init_rng`, B zeros unless
    /// `init_lora_weights` is false). It becomes active.
    pub fn add(&self, name: &str, config: &LoraConfig, init_rng: &mut SplitMix64) -> Result<()> {
        let (r, inp, out) = (config.r, self.in_features, self.out_features);
        let a: Vec<f32> = match &config.init_lora_weights {
            InitLoraWeights::Name(_) => {
                // PEFT: normal_(std=1/r).
                let std = 1.0 / r as f32;
                (0..r * inp).map(|_| init_rng.next_normal() * std).collect()
            }
            _ => {
                // kaiming_uniform_(a=√5) on [r, in] is U(-1/√in, 1/√in).
                let bound = 1.0 / (inp as f32).sqrt();
                (0..r * inp)
                    .map(|_| (2.0 * init_rng.next_f32() - 1.0) * bound)
                    .collect()
            }
        };
        let b: Vec<f32> = match config.init_lora_weights {
            InitLoraWeights::Bool(false) => {
                let bound = 1.0 / (r as f32).sqrt();
                (0..out * r)
                    .map(|_| (2.0 * init_rng.next_f32() - 1.0) * bound)
                    .collect()
            }
            _ => vec![0.0; out * r],
        };
        let weights = LoraWeights {
            a: Var::from_tensor(&Tensor::from_vec(a, (r, inp), &self.device)?)?,
            b: Var::from_tensor(&Tensor::from_vec(b, (out, r), &self.device)?)?,
            scaling: config.scaling(),
            dropout: config.lora_dropout,
        };
        self.insert(name, weights)
    }

    /// Adds adapter `name` with given matrices (checked against the base shape).
    pub fn insert(&self, name: &str, weights: LoraWeights) -> Result<()> {
        let (ad, bd) = (weights.a.dims().to_vec(), weights.b.dims().to_vec());
        if ad.len() != 2
            || bd.len() != 2
            || ad[1] != self.in_features
            || bd[0] != self.out_features
            || ad[0] != bd[1]
        {
            candle_core::bail!(
                "adapter `{name}`: lora_A {ad:?} / lora_B {bd:?} do not fit a [{}, {}] layer \
                 (expected A [r, {}] and B [{}, r])",
                self.out_features,
                self.in_features,
                self.in_features,
                self.out_features
            );
        }
        let mut s = self.state.write().unwrap();
        s.adapters.insert(name.to_string(), weights);
        if !s.active.iter().any(|a| a == name) {
            s.active.push(name.to_string());
        }
        Ok(())
    }

    /// The matrices of adapter `name`.
    pub fn weights(&self, name: &str) -> Option<LoraWeights> {
        self.state.read().unwrap().adapters.get(name).cloned()
    }

    /// Names of the adapters on this layer.
    pub fn adapter_names(&self) -> Vec<String> {
        self.state
            .read()
            .unwrap()
            .adapters
            .keys()
            .cloned()
            .collect()
    }

    /// Removes adapter `name`.
    pub fn remove(&self, name: &str) {
        let mut s = self.state.write().unwrap();
        s.adapters.remove(name);
        s.active.retain(|a| a != name);
    }

    /// Makes exactly these adapters active (those present on this layer).
    pub fn set_active(&self, names: &[String]) {
        let mut s = self.state.write().unwrap();
        let present: Vec<String> = names
            .iter()
            .filter(|n| s.adapters.contains_key(*n))
            .cloned()
            .collect();
        s.active = present;
    }

    /// Turns all adapters on or off (off: the base layer alone).
    pub fn set_enabled(&self, on: bool) {
        self.state.write().unwrap().enabled = on;
    }

    /// Training mode applies dropout; evaluation mode doesn't.
    pub fn set_training(&self, on: bool) {
        self.state.write().unwrap().training = on;
    }

    /// `B A · scaling` summed over the active adapters, `[out, in]` in f32: what merging adds.
    pub fn merged_delta(&self) -> Result<Option<Tensor>> {
        let s = self.state.read().unwrap();
        let mut total: Option<Tensor> = None;
        for name in &s.active {
            let w = &s.adapters[name];
            let d = (w.b.as_tensor().matmul(w.a.as_tensor())? * w.scaling)?;
            total = Some(match total {
                Some(t) => (t + d)?,
                None => d,
            });
        }
        Ok(total)
    }

    fn dropout(&self, x: &Tensor, p: f64) -> Result<Tensor> {
        let n = x.elem_count();
        let keep = 1.0 - p as f32;
        let scale = 1.0 / keep;
        let mask: Vec<f32> = {
            let mut rng = self.rng.lock().unwrap();
            (0..n)
                .map(|_| if rng.next_f32() < keep { scale } else { 0.0 })
                .collect()
        };
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x * mask
    }
}

impl LinearAdapter for LoraLayer {
    fn rng_state(&self) -> Option<u64> {
        Some(self.rng.lock().unwrap().state())
    }

    fn set_rng_state(&self, state: u64) {
        *self.rng.lock().unwrap() = SplitMix64::new(state);
    }

    fn tensors(&self) -> Vec<Tensor> {
        let s = self.state.read().unwrap();
        s.adapters
            .values()
            .flat_map(|w| [w.a.as_tensor().clone(), w.b.as_tensor().clone()])
            .collect()
    }

    fn delta(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let s = self.state.read().unwrap();
        if !s.enabled || s.active.is_empty() {
            return Ok(None);
        }
        // This code may run on another cell's copy of candle than the caller (notebooks):
        // new ids must come after the caller's newest one (see crate::ops::ids).
        crate::ops::ids::reserve_ids_above(crate::ops::ids::tensor_id_value(x));
        let in_dtype = x.dtype();
        // Adapters train in f32 whatever the base computes in, as PEFT keeps them.
        let x32 = x.to_dtype(DType::F32)?;
        let mut total: Option<Tensor> = None;
        for name in &s.active {
            let w = &s.adapters[name];
            let xin = if s.training && w.dropout > 0.0 {
                self.dropout(&x32, w.dropout)?
            } else {
                x32.clone()
            };
            // Inside no_grad the weights are used detached, so nothing records a graph.
            let (a, b) = if crate::ops::grad_enabled() {
                (w.a.as_tensor().clone(), w.b.as_tensor().clone())
            } else {
                (w.a.as_tensor().detach(), w.b.as_tensor().detach())
            };
            let h = xin.matmul(&a.t()?)?;
            let d = (h.matmul(&b.t()?)? * w.scaling)?;
            total = Some(match total {
                Some(t) => (t + d)?,
                None => d,
            });
        }
        total.map(|t| t.to_dtype(in_dtype)).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_adapter_is_a_no_op_and_b_gets_gradient() {
        let dev = Device::Cpu;
        let layer = LoraLayer::new(16, 8, &dev, 0);
        layer
            .add(
                "default",
                &LoraConfig::qlora().r(4),
                &mut SplitMix64::new(1),
            )
            .unwrap();
        let x = Tensor::randn(0f32, 1.0, (3, 16), &dev).unwrap();
        let d = layer.delta(&x).unwrap().unwrap();
        assert_eq!(d.dims(), &[3, 8]);
        assert_eq!(
            d.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        let w = layer.weights("default").unwrap();
        let a =
            w.a.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
        assert!(a.iter().all(|v| v.abs() <= 0.25) && a.iter().any(|v| v.abs() > 0.1));
        let grads = d.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(w.b.as_tensor()).is_some());
    }

    #[test]
    fn dropout_only_in_training_and_reproducible() {
        let dev = Device::Cpu;
        let mk = || {
            let l = LoraLayer::new(32, 4, &dev, 7);
            let cfg = LoraConfig {
                init_lora_weights: InitLoraWeights::Bool(false),
                ..LoraConfig::qlora().r(2).lora_dropout(0.5)
            };
            l.add("x", &cfg, &mut SplitMix64::new(3)).unwrap();
            l
        };
        let (l1, l2) = (mk(), mk());
        let x = Tensor::ones((2, 32), DType::F32, &dev).unwrap();
        let eval1 = l1.delta(&x).unwrap().unwrap();
        let eval2 = l1.delta(&x).unwrap().unwrap();
        let diff = crate::ops::max_abs_diff;
        assert_eq!(diff(&eval1, &eval2), 0.0);
        l1.set_training(true);
        l2.set_training(true);
        let t1 = l1.delta(&x).unwrap().unwrap();
        let t2 = l2.delta(&x).unwrap().unwrap();
        assert_eq!(diff(&t1, &t2), 0.0, "same seed, same mask");
        assert!(
            diff(&t1, &eval1) > 0.0,
            "dropout changes the training output"
        );
        l1.set_enabled(false);
        assert!(l1.delta(&x).unwrap().is_none());
    }

    #[test]
    fn shape_mismatch_is_an_error() {
        let dev = Device::Cpu;
        let layer = LoraLayer::new(16, 8, &dev, 0);
        let w = LoraWeights {
            a: Var::zeros((4, 15), DType::F32, &dev).unwrap(),
            b: Var::zeros((8, 4), DType::F32, &dev).unwrap(),
            scaling: 1.0,
            dropout: 0.0,
        };
        assert!(layer
            .insert("bad", w)
            .unwrap_err()
            .to_string()
            .contains("lora_A"));
    }
}
