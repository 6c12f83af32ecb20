//! The code books bitsandbytes 0.50 quantises against: NF4, FP4 and the signed 8-bit dynamic map.
//!
//! Every value here was checked bit for bit against bitsandbytes itself (see
//! tests/reference/nf4_reference.py and tests/nf4_parity.rs).

use std::sync::OnceLock;

/// NF4 (NormalFloat4) code book, index 0..15, as `bitsandbytes.functional.get_4bit_type("nf4")`.
/// Sorted ascending, so the 4-bit code of a value is its bucket among the midpoints.
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// FP4 (1 sign, 2 exponent, 1 mantissa bit, bias 2) code book in bit-pattern order, as
/// `get_4bit_type("fp4")`: `[0, 0.0625, 8, 12, 4, 6, 2, 3, -0, ...] / 12` in f32.
///
/// Index 8 is +0.0, not -0.0: Python's `-0` in that list is the integer zero, and bitsandbytes'
/// AVX-512 CPU kernel and its PyTorch fallback both decode it as +0.0. (Its scalar C fallback
/// decodes it as -0.0; the parity test therefore treats the two zeros as equal.)
pub const FP4_CODE: [f32; 16] = [
    0.0,
    0.0625 / 12.0,
    8.0 / 12.0,
    1.0,
    4.0 / 12.0,
    6.0 / 12.0,
    2.0 / 12.0,
    3.0 / 12.0,
    0.0,
    -0.0625 / 12.0,
    -8.0 / 12.0,
    -1.0,
    -4.0 / 12.0,
    -6.0 / 12.0,
    -2.0 / 12.0,
    -3.0 / 12.0,
];

/// `torch.argsort(FP4_CODE)` as bitsandbytes computes it: the FP4 index of each sorted slot.
/// The two zeros sort as index 0 then index 8, so an input of exactly zero (or a tiny negative)
/// gets code 0 and a tiny positive input gets code 8; verified against bitsandbytes.
pub const FP4_SORTED_ORDER: [u8; 16] = [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3];

/// Decision boundaries between consecutive sorted codes, `(c[i] + c[i+1]) / 2` in f32 as torch
/// computes them. A value exactly on a boundary goes to the lower slot (`torch.bucketize` with
/// `right=False`).
pub(crate) fn midpoints(sorted: &[f32; 16]) -> [f32; 15] {
    std::array::from_fn(|i| (sorted[i] + sorted[i + 1]) / 2.0)
}

/// The FP4 code book in ascending order (the values of [`FP4_SORTED_ORDER`]).
pub(crate) fn fp4_sorted() -> [f32; 16] {
    std::array::from_fn(|i| FP4_CODE[FP4_SORTED_ORDER[i] as usize])
}

/// bitsandbytes' signed 8-bit dynamic map, `create_dynamic_map(signed=True)`: 256 sorted f32
/// values in [-0.9929688, 1.0], used to quantise the absmax statistics in double quantisation.
pub fn dynamic_map_signed() -> &'static [f32; 256] {
    static MAP: OnceLock<[f32; 256]> = OnceLock::new();
    MAP.get_or_init(build_dynamic_map_signed)
}

/// `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`, step for step.
fn build_dynamic_map_signed() -> [f32; 256] {
    const MAX_EXPONENT_BITS: i32 = 7;
    const NON_SIGN_BITS: i32 = 7;
    // Python writes `10 ** (-(max_exponent_bits - 1) + i)`, a double, which torch rounds to f32
    // before multiplying the f32 means.
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..MAX_EXPONENT_BITS {
        let fraction_items = (1usize << (i + NON_SIGN_BITS - MAX_EXPONENT_BITS)) + 1;
        let boundaries = torch_linspace_f32(0.1, 1.0, fraction_items);
        let scale = 10f64.powi(-(MAX_EXPONENT_BITS - 1) + i) as f32;
        let means: Vec<f32> = boundaries.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        data.extend(means.iter().map(|m| scale * m));
        data.extend(means.iter().map(|m| -scale * m));
    }
    // `additional_items` is 2^(7-7) - 1 = 0 for these parameters: no extra entries.
    data.push(0.0);
    data.push(1.0);
    debug_assert_eq!(data.len(), 256);
    data.sort_by(f32::total_cmp);
    let mut map = [0f32; 256];
    map.copy_from_slice(&data);
    map
}

/// `torch.linspace(start, end, steps, dtype=float32)` on CPU: the first half counts up from
/// `start`, the second half down from `end`, each value one fused multiply-add of the f32 step
/// (that is what torch's compiled kernel does; plain f32 arithmetic differs in the last bit).
fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - i - 1) as f32, end)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nf4_code_is_sorted_and_spans_minus_one_to_one() {
        assert!(NF4_CODE.windows(2).all(|w| w[0] < w[1]));
        assert_eq!((NF4_CODE[0], NF4_CODE[7], NF4_CODE[15]), (-1.0, 0.0, 1.0));
    }

    #[test]
    fn fp4_sorted_order_sorts_the_code() {
        let s = fp4_sorted();
        assert!(s.windows(2).all(|w| w[0] <= w[1]));
        let mut seen = [false; 16];
        FP4_SORTED_ORDER
            .iter()
            .for_each(|&i| seen[i as usize] = true);
        assert!(seen.iter().all(|&b| b));
    }

    #[test]
    fn dynamic_map_has_bitsandbytes_extremes() {
        let m = dynamic_map_signed();
        assert_eq!(m[255], 1.0);
        assert!(m[0] > -0.993 && m[0] < -0.992);
        assert!(m.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(m.iter().filter(|&&v| v == 0.0).count(), 1);
    }
}
