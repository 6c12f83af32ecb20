//! Choosing the next token from logits: transformers' warpers (repetition penalty,
//! temperature, top-k, top-p) followed by greedy choice or seeded multinomial sampling.

use crate::rng::SplitMix64;

/// Picks next tokens for one sequence.
#[derive(Debug, Clone)]
pub struct Sampler {
    rng: SplitMix64,
    temperature: f64,
    top_k: Option<usize>,
    top_p: Option<f64>,
    repetition_penalty: f32,
}

impl Sampler {
    /// `temperature` 0 means greedy (top-k / top-p are then irrelevant).
    pub fn new(
        seed: u64,
        temperature: f64,
        top_k: Option<usize>,
        top_p: Option<f64>,
        repetition_penalty: f32,
    ) -> Self {
        Self {
            rng: SplitMix64::new(seed),
            temperature,
            top_k,
            top_p,
            repetition_penalty,
        }
    }

    /// The next token given the last position's logits and the ids seen so far.
    pub fn sample(&mut self, logits: &mut [f32], context: &[u32]) -> u32 {
        if self.repetition_penalty != 1.0 {
            apply_repetition_penalty(logits, context, self.repetition_penalty);
        }
        if self.temperature < 1e-7 {
            return argmax(logits);
        }
        let t = self.temperature as f32;
        let mut order: Vec<usize> = (0..logits.len()).collect();
        // Descending by logit; ties keep the lower id first, as a stable sort in torch would.
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if let Some(k) = self.top_k {
            order.truncate(k.max(1));
        }
        let max = logits[order[0]] / t;
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| ((logits[i] / t - max) as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if let Some(p) = self.top_p {
            // Keep the smallest prefix whose mass reaches p (at least one token).
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (n, q) in probs.iter().enumerate() {
                cum += q;
                if cum >= p {
                    keep = n + 1;
                    break;
                }
            }
            probs.truncate(keep);
            order.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut u = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * total;
        for (n, q) in probs.iter().enumerate() {
            if u < *q {
                return order[n] as u32;
            }
            u -= q;
        }
        order[probs.len() - 1] as u32
    }
}

/// Index of the largest logit (the first one on ties, as `torch.argmax`).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// transformers' rule: a seen token's logit is divided by `penalty` when positive and
/// multiplied by it when negative.
pub fn apply_repetition_penalty(logits: &mut [f32], context: &[u32], penalty: f32) {
    let mut seen = vec![false; logits.len()];
    for &id in context {
        let i = id as usize;
        if i < logits.len() && !seen[i] {
            seen[i] = true;
            let l = &mut logits[i];
            *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(0, 0.0, None, None, 1.0);
        assert_eq!(s.sample(&mut [1.0, 3.0, 3.0, -1.0], &[]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_cuts_the_tail() {
        let mut s = Sampler::new(5, 1.0, Some(1), None, 1.0);
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [0.0, 2.0, 1.9, 0.5], &[]), 1);
        }
        // Probabilities ≈ [0.84, 0.11, 0.04, ...]: top_p 0.8 keeps only the first.
        let mut s = Sampler::new(5, 1.0, None, Some(0.8), 1.0);
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [5.0, 3.0, 2.0, 0.0], &[]), 0);
        }
    }

    #[test]
    fn sampling_follows_the_distribution_and_the_seed() {
        let draw = |seed| {
            let mut s = Sampler::new(seed, 1.0, None, None, 1.0);
            (0..4000)
                .map(|_| s.sample(&mut [0.0, (3f32).ln()], &[]))
                .collect::<Vec<_>>()
        };
        let a = draw(1);
        assert_eq!(a, draw(1));
        assert_ne!(a, draw(2));
        let ones = a.iter().filter(|&&t| t == 1).count() as f64 / a.len() as f64;
        assert!((ones - 0.75).abs() < 0.03, "{ones}");
    }

    #[test]
    fn repetition_penalty_matches_transformers_rule() {
        let mut l = [2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut l, &[0, 1, 1], 2.0);
        assert_eq!(l, [1.0, -4.0, 1.0]);
    }
}
