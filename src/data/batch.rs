//! Batches for the trainer: right-padded tensors, and the order of examples in an epoch
//! (shuffled, optionally grouped by length as transformers' `LengthGroupedSampler` does).

use candle_core::{Device, Tensor};

use super::tokenize::TokenizedExample;
use crate::rng::SplitMix64;
use crate::train::IGNORE_INDEX;
use crate::{Error, Result};

/// A padded batch of examples.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[B, T]` u32 token ids, right-padded with the pad id.
    pub input_ids: Tensor,
    /// `[B, T]` i64 labels, [`IGNORE_INDEX`] on padding and untrained tokens.
    pub labels: Tensor,
    /// `[B, T]` u32: 1 on real tokens, 0 on padding.
    pub attention_mask: Tensor,
    /// Real (non-padding) tokens in the batch.
    pub num_tokens: usize,
    /// Tokens the loss counts (see [`TokenizedExample::num_target_tokens`]).
    pub num_target_tokens: usize,
}

/// Pads `examples` on the right to the longest one: ids with `pad_token_id`, labels with
/// [`IGNORE_INDEX`], attention mask 0 on the padding.
pub fn collate(
    examples: &[&TokenizedExample],
    pad_token_id: u32,
    device: &Device,
) -> Result<Batch> {
    if examples.is_empty() {
        return Err(Error::InvalidArgument(
            "collate: a batch needs at least one example".into(),
        ));
    }
    let b = examples.len();
    let t = examples.iter().map(|e| e.len()).max().unwrap_or(0);
    let mut ids = vec![pad_token_id; b * t];
    let mut labels = vec![IGNORE_INDEX; b * t];
    let mut mask = vec![0u32; b * t];
    let (mut num_tokens, mut num_target_tokens) = (0, 0);
    for (i, e) in examples.iter().enumerate() {
        if e.labels.len() != e.input_ids.len() {
            return Err(Error::InvalidArgument(format!(
                "collate: example from row {} has {} ids but {} labels",
                e.row,
                e.input_ids.len(),
                e.labels.len()
            )));
        }
        let row = i * t;
        ids[row..row + e.len()].copy_from_slice(&e.input_ids);
        labels[row..row + e.len()].copy_from_slice(&e.labels);
        mask[row..row + e.len()].fill(1);
        num_tokens += e.len();
        num_target_tokens += e.num_target_tokens();
    }
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (b, t), device)?,
        labels: Tensor::from_vec(labels, (b, t), device)?,
        attention_mask: Tensor::from_vec(mask, (b, t), device)?,
        num_tokens,
        num_target_tokens,
    })
}

/// The generator of one epoch's order: the same for the same `(seed, epoch)`.
fn epoch_rng(seed: u64, epoch: usize) -> SplitMix64 {
    let mut base = SplitMix64::new(seed);
    SplitMix64::new(base.next_u64() ^ (epoch as u64).wrapping_mul(0xD1B5_4A32_D192_ED03))
}

/// A uniformly random permutation of `0..n` (Fisher–Yates).
pub(crate) fn permutation(n: usize, rng: &mut SplitMix64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    v
}

/// The batches of one epoch as lists of example indices (into `lengths`); every index appears
/// exactly once and the last batch may be smaller. `batch_size` 0 is taken as 1.
///
/// - `shuffle`: a random order, the same for the same `(seed, epoch)`; otherwise `0..n`.
/// - `group_by_length`: transformers' `get_length_grouped_indices` — the order is cut into
///   megabatches of `min(n / (4 · batch_size), 50)` (at least 1) batches, each sorted by
///   length, longest first, and the longest example overall is swapped to the very front so a
///   run that runs out of memory does so at once. Batches then hold similar lengths and waste
///   little padding.
pub fn epoch_batches(
    lengths: &[usize],
    batch_size: usize,
    seed: u64,
    epoch: usize,
    shuffle: bool,
    group_by_length: bool,
) -> Vec<Vec<usize>> {
    let n = lengths.len();
    let batch_size = batch_size.max(1);
    let mut order = if shuffle {
        permutation(n, &mut epoch_rng(seed, epoch))
    } else {
        (0..n).collect()
    };
    if group_by_length && n > 0 {
        let mult = (n / (batch_size * 4)).clamp(1, 50);
        let mut megabatches: Vec<Vec<usize>> = order
            .chunks(mult * batch_size)
            .map(|c| {
                let mut c = c.to_vec();
                // Stable, like Python's sorted(..., reverse=True).
                c.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]));
                c
            })
            .collect();
        // The first megabatch holding the overall maximum (torch.argmax picks the first).
        let mut max_idx = 0;
        for (i, m) in megabatches.iter().enumerate() {
            if lengths[m[0]] > lengths[megabatches[max_idx][0]] {
                max_idx = i;
            }
        }
        let longest = megabatches[max_idx][0];
        megabatches[max_idx][0] = megabatches[0][0];
        megabatches[0][0] = longest;
        order = megabatches.concat();
    }
    order.chunks(batch_size).map(<[usize]>::to_vec).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(ids: &[u32], labels: &[i64]) -> TokenizedExample {
        TokenizedExample {
            input_ids: ids.to_vec(),
            labels: labels.to_vec(),
            row: 1,
        }
    }

    #[test]
    fn collate_pads_right() {
        let a = ex(&[1, 2, 3], &[-100, 2, 3]);
        let b = ex(&[4], &[4]);
        let batch = collate(&[&a, &b], 0, &Device::Cpu).unwrap();
        assert_eq!(
            batch.input_ids.to_vec2::<u32>().unwrap(),
            vec![vec![1, 2, 3], vec![4, 0, 0]]
        );
        assert_eq!(
            batch.labels.to_vec2::<i64>().unwrap(),
            vec![vec![-100, 2, 3], vec![4, -100, -100]]
        );
        assert_eq!(
            batch.attention_mask.to_vec2::<u32>().unwrap(),
            vec![vec![1, 1, 1], vec![1, 0, 0]]
        );
        assert_eq!((batch.num_tokens, batch.num_target_tokens), (4, 2));
        assert!(collate(&[], 0, &Device::Cpu).is_err());
    }

    #[test]
    fn grouping_matches_transformers_on_a_fixed_order() {
        // get_length_grouped_indices with indices = arange (no shuffle), batch 2, n = 8:
        // mult = max(8 // 8, 1) = 1, megabatches of 2 sorted desc, longest swapped to front.
        let lengths = [3, 9, 4, 4, 10, 1, 2, 8];
        let b = epoch_batches(&lengths, 2, 0, 0, false, true);
        assert_eq!(b, vec![vec![4, 0], vec![2, 3], vec![1, 5], vec![7, 6]]);
    }
}
