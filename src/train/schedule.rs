//! Learning-rate schedules, as transformers' `get_scheduler` builds them.
//!
//! transformers wraps a lambda in torch's `LambdaLR`, so the rate is `learning_rate × factor(step)`
//! computed in f64; [`LrSchedule::lr_at`] replicates each lambda's arithmetic in the same order so
//! the rates agree to the last bit or two. The Trainer calls `optimizer.step()` before
//! `scheduler.step()`, so optimiser step `k` (0-based) uses `lr_at(k)` — with warmup the very first
//! step runs at rate 0, as it does in transformers.

use serde::{Deserialize, Serialize};

/// Which curve the learning rate follows (transformers' `SchedulerType` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerType {
    /// The base rate throughout (warmup is ignored, as in transformers).
    Constant,
    /// Linear warmup from 0, then the base rate.
    ConstantWithWarmup,
    /// Linear warmup, then linear decay to 0 at `total_steps` (transformers' default).
    #[default]
    Linear,
    /// Linear warmup, then a cosine from the base rate to 0 (`num_cycles` 0.5 = half a cosine).
    Cosine,
}

/// How long the warmup lasts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Warmup {
    /// An exact number of optimiser steps.
    Steps(usize),
    /// A fraction of the total steps, rounded up (`ceil(total × ratio)`, as transformers does).
    Ratio(f64),
}

impl Default for Warmup {
    fn default() -> Self {
        Warmup::Steps(0)
    }
}

impl Warmup {
    /// transformers 5's single `warmup_steps: float` argument: values ≥ 1 are steps (truncated),
    /// values below 1 are a ratio of the total.
    pub fn from_hf(warmup_steps: f64) -> Self {
        if warmup_steps >= 1.0 {
            Warmup::Steps(warmup_steps as usize)
        } else {
            Warmup::Ratio(warmup_steps)
        }
    }

    /// Warmup length in steps for a run of `total_steps` (TrainingArguments.get_warmup_steps).
    pub fn steps(&self, total_steps: usize) -> usize {
        match *self {
            Warmup::Steps(n) => n,
            Warmup::Ratio(r) => (total_steps as f64 * r).ceil().max(0.0) as usize,
        }
    }
}

fn default_num_cycles() -> f64 {
    0.5
}

fn default_learning_rate() -> f64 {
    5e-5
}

/// A complete schedule: curve, base rate, warmup and run length. `Default` is transformers'
/// TrainingArguments default (linear, 5e-5, no warmup) with `total_steps` still to be set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    /// The curve.
    #[serde(default)]
    pub kind: SchedulerType,
    /// The peak (base) learning rate.
    #[serde(default = "default_learning_rate")]
    pub learning_rate: f64,
    /// Warmup length.
    #[serde(default)]
    pub warmup: Warmup,
    /// Number of optimiser steps in the run (the decay reaches 0 there).
    #[serde(default)]
    pub total_steps: usize,
    /// Cosine only: number of cosine waves over the decay (0.5 = decay to 0 once).
    #[serde(default = "default_num_cycles")]
    pub num_cycles: f64,
}

impl Default for LrSchedule {
    fn default() -> Self {
        Self {
            kind: SchedulerType::default(),
            learning_rate: default_learning_rate(),
            warmup: Warmup::default(),
            total_steps: 0,
            num_cycles: default_num_cycles(),
        }
    }
}

impl LrSchedule {
    /// A schedule of `kind` peaking at `learning_rate` over `total_steps` steps, no warmup.
    pub fn new(kind: SchedulerType, learning_rate: f64, total_steps: usize) -> Self {
        Self {
            kind,
            learning_rate,
            total_steps,
            ..Self::default()
        }
    }

    /// Sets the warmup.
    pub fn warmup(mut self, warmup: Warmup) -> Self {
        self.warmup = warmup;
        self
    }

    /// Sets the number of cosine cycles.
    pub fn num_cycles(mut self, num_cycles: f64) -> Self {
        self.num_cycles = num_cycles;
        self
    }

    /// Warmup length in steps.
    pub fn warmup_steps(&self) -> usize {
        self.warmup.steps(self.total_steps)
    }

    /// The multiplier of the base rate at `step` (transformers' lr lambdas, same operation order).
    pub fn factor(&self, step: usize) -> f64 {
        let w = self.warmup_steps() as i64;
        let n = self.total_steps as i64;
        let s = step as i64;
        // Python's `float(max(1, num_warmup_steps))`: the warmup denominator is never 0.
        let warming = |s: i64| s as f64 / (w.max(1)) as f64;
        match self.kind {
            SchedulerType::Constant => 1.0,
            SchedulerType::ConstantWithWarmup => {
                if s < w {
                    warming(s)
                } else {
                    1.0
                }
            }
            SchedulerType::Linear => {
                if s < w {
                    warming(s)
                } else {
                    let f = (n - s) as f64 / ((n - w).max(1)) as f64;
                    f.max(0.0)
                }
            }
            SchedulerType::Cosine => {
                if s < w {
                    warming(s)
                } else {
                    let progress = (s - w) as f64 / ((n - w).max(1)) as f64;
                    let f = 0.5
                        * (1.0 + (std::f64::consts::PI * self.num_cycles * 2.0 * progress).cos());
                    f.max(0.0)
                }
            }
        }
    }

    /// The learning rate optimiser step `step` (0-based) runs at.
    pub fn lr_at(&self, step: usize) -> f64 {
        self.learning_rate * self.factor(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_of_the_curves() {
        let lin = LrSchedule::new(SchedulerType::Linear, 1.0, 10).warmup(Warmup::Steps(2));
        assert_eq!(lin.lr_at(0), 0.0);
        assert_eq!(lin.lr_at(1), 0.5);
        assert_eq!(lin.lr_at(2), 1.0);
        assert_eq!(lin.lr_at(6), 0.5);
        assert_eq!(lin.lr_at(10), 0.0);
        assert_eq!(lin.lr_at(12), 0.0);
        let cos = LrSchedule::new(SchedulerType::Cosine, 1.0, 10).warmup(Warmup::Ratio(0.1));
        assert_eq!(cos.warmup_steps(), 1);
        assert!((cos.lr_at(1) - 1.0).abs() < 1e-15);
        assert!(cos.lr_at(10).abs() < 1e-15);
        let c = LrSchedule::new(SchedulerType::Constant, 3.0, 10).warmup(Warmup::Steps(5));
        assert_eq!(c.lr_at(0), 3.0);
        // ceil: 0.15 × 10 = 1.5 → 2 warmup steps.
        assert_eq!(Warmup::Ratio(0.15).steps(10), 2);
        assert_eq!(Warmup::from_hf(0.1), Warmup::Ratio(0.1));
        assert_eq!(Warmup::from_hf(3.0), Warmup::Steps(3));
    }

    #[test]
    fn serde_round_trip_and_defaults() {
        let s = LrSchedule::new(SchedulerType::ConstantWithWarmup, 2e-4, 100)
            .warmup(Warmup::Ratio(0.03));
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains("\"constant_with_warmup\""), "{json}");
        assert_eq!(serde_json::from_str::<LrSchedule>(&json).unwrap(), s);
        let d: LrSchedule = serde_json::from_str("{}").unwrap();
        assert_eq!(d, LrSchedule::default());
    }
}
