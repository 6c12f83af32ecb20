//! The 4-bit kernels on plain f32 slices, step for step as bitsandbytes 0.50 on CPU:
//! `quantize_4bit` (its PyTorch "default" backend; there is no C kernel for it) and
//! `dequantize_4bit` (its C kernel, whose arithmetic is one f32 product per value).
//!
//! Blocks are independent, so large tensors are split over threads by whole blocks; the result
//! does not depend on the split.

use super::codes::{fp4_sorted, midpoints, FP4_SORTED_ORDER, NF4_CODE};
use super::QuantType;

/// torch clamps a zero absmax to this before dividing by it (`absmax.clamp(min=1e-38)`).
const ABSMAX_FLOOR: f32 = 1e-38;

/// Below this many values one thread is faster than spawning several.
const PARALLEL_MIN: usize = 1 << 20;

/// The sorted code book's decision boundaries and, for FP4, the index of each sorted slot.
struct Buckets {
    bounds: [f32; 15],
    order: Option<[u8; 16]>,
}

impl Buckets {
    fn new(qt: QuantType) -> Self {
        match qt {
            QuantType::Nf4 => Buckets {
                bounds: midpoints(&NF4_CODE),
                order: None,
            },
            QuantType::Fp4 => Buckets {
                bounds: midpoints(&fp4_sorted()),
                order: Some(FP4_SORTED_ORDER),
            },
        }
    }

    /// `torch.bucketize(x, bounds)` (right=False): the number of bounds strictly below `x`, so a
    /// value exactly on a midpoint takes the lower code.
    fn code(&self, x: f32) -> u8 {
        let slot = self.bounds.iter().filter(|&&b| b < x).count();
        match &self.order {
            None => slot as u8,
            Some(order) => order[slot],
        }
    }
}

/// Quantise `values` (row-major) in blocks: returns the packed codes (first value of each pair
/// in the high nibble; an odd count is padded with the code of 0.0) and one f32 absmax per block.
pub(crate) fn quantize(values: &[f32], blocksize: usize, qt: QuantType) -> (Vec<u8>, Vec<f32>) {
    let n = values.len();
    let mut packed = vec![0u8; n.div_ceil(2)];
    let mut absmax = vec![0f32; n.div_ceil(blocksize)];
    let buckets = Buckets::new(qt);
    let full_blocks = n / blocksize;
    for_each_chunk(
        n,
        blocksize,
        &mut packed,
        &mut absmax,
        |first_block, packed, absmax| {
            let start = first_block * blocksize;
            let len = (absmax.len() * blocksize).min(n - start);
            quantize_chunk(
                &values[start..start + len],
                blocksize,
                first_block,
                full_blocks,
                &buckets,
                packed,
                absmax,
            );
        },
    );
    (packed, absmax)
}

fn quantize_chunk(
    values: &[f32],
    blocksize: usize,
    first_block: usize,
    full_blocks: usize,
    buckets: &Buckets,
    packed: &mut [u8],
    absmax: &mut [f32],
) {
    let mut codes = Vec::with_capacity(blocksize + 1);
    for (b, block) in values.chunks(blocksize).enumerate() {
        let am = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        codes.clear();
        if first_block + b < full_blocks {
            // Full blocks: `x * (1 / absmax.clamp(min=1e-38))`, absmax stored unclamped.
            let inv = 1.0 / am.max(ABSMAX_FLOOR);
            absmax[b] = am;
            codes.extend(
                block
                    .iter()
                    .map(|&x| buckets.code((x * inv).clamp(-1.0, 1.0))),
            );
        } else {
            // The trailing partial block: `x / absmax.clamp(min=1e-38)`, absmax stored clamped.
            let am = am.max(ABSMAX_FLOOR);
            absmax[b] = am;
            codes.extend(
                block
                    .iter()
                    .map(|&x| buckets.code((x / am).clamp(-1.0, 1.0))),
            );
        }
        if codes.len() % 2 == 1 {
            codes.push(buckets.code(0.0));
        }
        let bytes = &mut packed[b * blocksize / 2..][..codes.len() / 2];
        for (byte, pair) in bytes.iter_mut().zip(codes.chunks_exact(2)) {
            *byte = (pair[0] << 4) | pair[1];
        }
    }
}

/// `code[q] * absmax[block]` in f32 for the first `n` codes of `packed`.
pub(crate) fn dequantize(
    packed: &[u8],
    absmax: &[f32],
    blocksize: usize,
    code: &[f32; 16],
    n: usize,
) -> Vec<f32> {
    let mut out = vec![0f32; n];
    let mut chunk_starts = Vec::new();
    split_blocks(n, absmax.len(), |first_block, blocks| {
        chunk_starts.push((first_block, blocks))
    });
    let work = |first_block: usize, out: &mut [f32]| {
        for (b, block) in out.chunks_mut(blocksize).enumerate() {
            let am = absmax[first_block + b];
            let bytes = &packed[(first_block + b) * blocksize / 2..];
            for (i, v) in block.iter_mut().enumerate() {
                let byte = bytes[i / 2];
                let q = if i % 2 == 0 { byte >> 4 } else { byte & 0x0f };
                *v = code[q as usize] * am;
            }
        }
    };
    if chunk_starts.len() == 1 {
        work(0, &mut out);
        return out;
    }
    std::thread::scope(|s| {
        let mut rest = out.as_mut_slice();
        for &(first_block, blocks) in &chunk_starts {
            let len = (blocks * blocksize).min(rest.len());
            let (head, tail) = rest.split_at_mut(len);
            rest = tail;
            s.spawn(move || work(first_block, head));
        }
    });
    out
}

/// Calls `f(first_block, block_count)` for consecutive runs of blocks, one per worker thread
/// (a single run for small inputs).
fn split_blocks(n: usize, blocks: usize, mut f: impl FnMut(usize, usize)) {
    let threads = if n < PARALLEL_MIN {
        1
    } else {
        std::thread::available_parallelism().map_or(1, |t| t.get())
    };
    let per = blocks.div_ceil(threads).max(1);
    let mut first = 0;
    while first < blocks {
        let count = per.min(blocks - first);
        f(first, count);
        first += count;
    }
    if blocks == 0 {
        f(0, 0);
    }
}

/// Runs `work(first_block, packed_chunk, absmax_chunk)` over runs of whole blocks, in parallel
/// for large inputs. Blocks hold an even number of values, so runs start on byte boundaries.
fn for_each_chunk(
    n: usize,
    blocksize: usize,
    packed: &mut [u8],
    absmax: &mut [f32],
    work: impl Fn(usize, &mut [u8], &mut [f32]) + Sync,
) {
    let mut runs = Vec::new();
    split_blocks(n, absmax.len(), |first, count| runs.push((first, count)));
    if runs.len() == 1 {
        work(0, packed, absmax);
        return;
    }
    std::thread::scope(|s| {
        let (mut packed, mut absmax) = (packed, absmax);
        for &(first, count) in &runs {
            let bytes = (count * blocksize / 2).min(packed.len());
            let (p_head, p_tail) = packed.split_at_mut(bytes);
            let (a_head, a_tail) = absmax.split_at_mut(count);
            packed = p_tail;
            absmax = a_tail;
            let work = &work;
            s.spawn(move || work(first, p_head, a_head));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn midpoint_goes_to_the_lower_code() {
        let b = Buckets::new(QuantType::Nf4);
        for i in 0..15 {
            let mid = (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0;
            assert_eq!(b.code(mid), i as u8);
            // The next f32 above the midpoint (towards +inf).
            let above = if mid > 0.0 {
                f32::from_bits(mid.to_bits() + 1)
            } else {
                f32::from_bits(mid.to_bits() - 1)
            };
            assert_eq!(b.code(above), i as u8 + 1);
        }
    }

    #[test]
    fn fp4_zeros_split_by_sign() {
        let b = Buckets::new(QuantType::Fp4);
        assert_eq!(b.code(0.0), 0);
        assert_eq!(b.code(-1e-6), 0);
        assert_eq!(b.code(1e-6), 8);
        assert_eq!(b.code(1.0), 3);
        assert_eq!(b.code(-1.0), 11);
    }

    #[test]
    fn first_value_in_high_nibble_and_odd_padding() {
        let (p, am) = quantize(&[1.0, -1.0, 0.0], 64, QuantType::Nf4);
        assert_eq!(am, vec![1.0]);
        assert_eq!(p, vec![0xf0, 0x77]);
    }

    #[test]
    fn split_runs_cover_all_blocks() {
        let v: Vec<f32> = (0..PARALLEL_MIN + 100)
            .map(|i| (i % 97) as f32 - 48.0)
            .collect();
        let (p, am) = quantize(&v, 64, QuantType::Nf4);
        let (p1, am1) = {
            let mut p1 = vec![0u8; v.len().div_ceil(2)];
            let mut am1 = vec![0f32; v.len().div_ceil(64)];
            quantize_chunk(
                &v,
                64,
                0,
                v.len() / 64,
                &Buckets::new(QuantType::Nf4),
                &mut p1,
                &mut am1,
            );
            (p1, am1)
        };
        assert_eq!(p, p1);
        assert_eq!(am, am1);
        let d = dequantize(&p, &am, 64, &NF4_CODE, v.len());
        assert_eq!(d.len(), v.len());
        assert_eq!(
            d[v.len() - 1],
            NF4_CODE[(p[p.len() - 1] & 0x0f) as usize] * am[am.len() - 1]
        );
    }
}
