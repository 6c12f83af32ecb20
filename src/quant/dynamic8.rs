//! Blockwise 8-bit quantisation against the signed dynamic map, as bitsandbytes 0.50's CPU
//! kernel (`quantize_blockwise` / `dequantize_blockwise`, csrc/cpu_ops.cpp) does it. Double
//! quantisation uses it for the 4-bit absmax statistics.
//!
//! The CPU kernel does not search for the nearest code: it maps the normalised value to one of
//! 65536 evenly spaced bins on [-1, 1] and looks the bin up in a table of nearest codes. That can
//! differ from a true nearest-code search near midpoints, so we build the same table.

use std::sync::OnceLock;

use super::codes::dynamic_map_signed;

const LUT_SIZE: usize = 65536;

/// `build_quantize_lut`: bin `i` stands for `-1 + 2i/65535` and holds the first code whose upper
/// midpoint is not below it (a value on a midpoint takes the lower code).
fn dynamic_lut() -> &'static [u8; LUT_SIZE] {
    static LUT: OnceLock<Box<[u8; LUT_SIZE]>> = OnceLock::new();
    LUT.get_or_init(|| {
        let code = dynamic_map_signed();
        let mid: Vec<f32> = code.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
        let mut lut = Box::new([0u8; LUT_SIZE]);
        let mut idx = 0usize;
        for (i, slot) in lut.iter_mut().enumerate() {
            let val = -1.0f32 + (2.0f32 * i as f32) / (LUT_SIZE - 1) as f32;
            while idx < mid.len() && mid[idx] < val {
                idx += 1;
            }
            *slot = idx as u8;
        }
        lut
    })
}

/// `norm_to_lut_index`: round the clamped value to its bin (truncation after adding 0.5).
fn lut_index(val: f32) -> usize {
    let v = val.clamp(-1.0, 1.0);
    ((v + 1.0) * 0.5 * (LUT_SIZE - 1) as f32 + 0.5) as usize
}

/// Quantise `values` in blocks of `blocksize`: one f32 absmax per block and one byte per value.
/// An all-zero block gets absmax 0 and bytes 0 (the kernel skips it).
pub(crate) fn quantize_blockwise(values: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let lut = dynamic_lut();
    let mut out = Vec::with_capacity(values.len());
    let mut absmax = Vec::with_capacity(values.len().div_ceil(blocksize));
    for block in values.chunks(blocksize) {
        let am = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        absmax.push(am);
        if am == 0.0 {
            out.extend(std::iter::repeat_n(0u8, block.len()));
            continue;
        }
        let inv = 1.0 / am;
        out.extend(block.iter().map(|&v| lut[lut_index(v * inv)]));
    }
    (out, absmax)
}

/// `dequantize_blockwise`: `code[q] * absmax[block]` in f32.
pub(crate) fn dequantize_blockwise(q: &[u8], absmax: &[f32], blocksize: usize) -> Vec<f32> {
    let code = dynamic_map_signed();
    q.chunks(blocksize)
        .zip(absmax)
        .flat_map(|(block, &am)| block.iter().map(move |&b| code[b as usize] * am))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_through_the_table() {
        let code = dynamic_map_signed();
        // Codes further apart than a table bin (2/65535) quantise back to themselves; the ones
        // packed tighter near zero cannot, in bitsandbytes either.
        let (q, am) = quantize_blockwise(&code[..], 256);
        assert_eq!(am, vec![1.0]);
        for (i, &b) in q.iter().enumerate().filter(|(i, _)| code[*i].abs() >= 0.01) {
            assert_eq!(b as usize, i, "code {i} = {}", code[i]);
        }
    }

    #[test]
    fn zero_block_is_all_zero_bytes() {
        let (q, am) = quantize_blockwise(&[0.0; 300], 256);
        assert_eq!(am, vec![0.0, 0.0]);
        assert!(q.iter().all(|&b| b == 0));
    }

    #[test]
    fn dequantised_values_are_close() {
        let v: Vec<f32> = (0..1000)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let (q, am) = quantize_blockwise(&v, 256);
        let d = dequantize_blockwise(&q, &am, 256);
        for (a, b) in v.iter().zip(&d) {
            assert!((a - b).abs() <= 0.02 * 50.0 / 7.0, "{a} vs {b}");
        }
    }
}
