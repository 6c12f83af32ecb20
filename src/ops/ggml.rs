//! Multi-threaded CPU kernels over GGML blocks (Q4_0, Q4_1, Q8_0) that compute exactly what
//! "dequantise to f32, then multiply" computes, without materialising the f32 weight when
//! only a few rows are multiplied (token-by-token decoding).
//!
//! candle's own quantised matmul rounds the activations to 8 bits first (llama.cpp's scheme),
//! which moves logits away from transformers' dequantised reference; its dequantisation runs
//! on one thread. These kernels keep f32 activations and use every core.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Result, Tensor};
use half::f16;
use rayon::prelude::*;

/// Elements per GGML block for the formats handled here.
const BLOCK: usize = 32;
/// Independent accumulators in the dot-product kernel.
const LANES: usize = 8;

/// The block formats these kernels understand.
#[derive(Clone, Copy)]
enum Format {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl Format {
    fn of(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4_0 => Some(Self::Q4_0),
            GgmlDType::Q4_1 => Some(Self::Q4_1),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            _ => None,
        }
    }

    fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }

    /// Decodes one block into 32 floats, with the same arithmetic as ggml's `to_float`.
    #[inline(always)]
    fn decode(self, b: &[u8], out: &mut [f32; BLOCK]) {
        let half_at = |i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
        match self {
            Self::Q4_0 => {
                let d = half_at(0);
                for j in 0..16 {
                    let q = b[2 + j];
                    out[j] = ((q & 0x0F) as i16 - 8) as f32 * d;
                    out[j + 16] = ((q >> 4) as i16 - 8) as f32 * d;
                }
            }
            Self::Q4_1 => {
                let (d, m) = (half_at(0), half_at(2));
                for j in 0..16 {
                    let q = b[4 + j];
                    out[j] = (q & 0x0F) as f32 * d + m;
                    out[j + 16] = (q >> 4) as f32 * d + m;
                }
            }
            Self::Q8_0 => {
                let d = half_at(0);
                for j in 0..BLOCK {
                    out[j] = (b[2 + j] as i8) as f32 * d;
                }
            }
        }
    }
}

fn supported(q: &QTensor) -> Option<(Format, usize, usize)> {
    let format = Format::of(q.dtype())?;
    if !matches!(q.device(), Device::Cpu) {
        return None;
    }
    let &[rows, cols] = q.shape().dims() else {
        return None;
    };
    (cols % BLOCK == 0).then_some((format, rows, cols))
}

/// Dequantises `q` to f32 on all cores; `None` when the format or device isn't handled here.
pub fn dequantize(q: &QTensor) -> Result<Option<Tensor>> {
    let Some((format, rows, cols)) = supported(q) else {
        return Ok(None);
    };
    let data = q.data()?;
    let row_bytes = cols / BLOCK * format.block_bytes();
    let mut out = vec![0f32; rows * cols];
    let fast = simd_available();
    out.par_chunks_mut(cols).enumerate().for_each(|(r, dst)| {
        let src = &data[r * row_bytes..(r + 1) * row_bytes];
        if fast {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: only reached when the CPU reports AVX2, FMA and F16C.
            unsafe {
                simd::decode_row(format, src, dst)
            };
            return;
        }
        let mut block = [0f32; BLOCK];
        for (i, chunk) in src.chunks_exact(format.block_bytes()).enumerate() {
            format.decode(chunk, &mut block);
            dst[i * BLOCK..(i + 1) * BLOCK].copy_from_slice(&block);
        }
    });
    Ok(Some(Tensor::from_vec(out, (rows, cols), &Device::Cpu)?))
}

/// The dot product of one GGML-encoded weight row with `x`.
#[inline(always)]
fn dot_row(format: Format, w: &[u8], x: &[f32]) -> f32 {
    let mut block = [0f32; BLOCK];
    // LANES independent partial sums let the compiler vectorise the loop (one running sum is
    // a serial chain it may not reorder).
    let mut lanes = [0f32; LANES];
    for (chunk, xb) in w
        .chunks_exact(format.block_bytes())
        .zip(x.chunks_exact(BLOCK))
    {
        format.decode(chunk, &mut block);
        for c in 0..BLOCK / LANES {
            for l in 0..LANES {
                lanes[l] += block[c * LANES + l] * xb[c * LANES + l];
            }
        }
    }
    lanes.iter().sum()
}

/// AVX2 + FMA + F16C versions of [`Format::decode`] and of the dot products, chosen at run
/// time. A block is decoded once into four 8-float vectors with the same arithmetic as the
/// scalar decoder (so dequantised weights are bit-identical), then multiplied with up to four
/// activation rows while it sits in registers.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::{Format, BLOCK};

    pub fn available() -> bool {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }

    #[inline(always)]
    unsafe fn half_at(b: *const u8) -> f32 {
        let bits = u16::from_le_bytes([*b, *b.add(1)]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// Elements 0..8, 8..16 of 16 bytes as i32 lanes.
    #[inline(always)]
    unsafe fn widen_u8(v: __m128i) -> (__m256i, __m256i) {
        (
            _mm256_cvtepu8_epi32(v),
            _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(v)),
        )
    }

    /// One block as four vectors of eight f32 (elements 0..8, 8..16, 16..24, 24..32).
    #[inline(always)]
    pub unsafe fn decode(format: Format, b: *const u8) -> [__m256; 4] {
        match format {
            Format::Q4_0 | Format::Q4_1 => {
                let nibbles = if matches!(format, Format::Q4_0) {
                    b.add(2)
                } else {
                    b.add(4)
                };
                let q = _mm_loadu_si128(nibbles as *const __m128i);
                let mask = _mm_set1_epi8(0x0F);
                let (l0, l1) = widen_u8(_mm_and_si128(q, mask));
                let (h0, h1) = widen_u8(_mm_and_si128(_mm_srli_epi16::<4>(q), mask));
                let d = _mm256_set1_ps(half_at(b));
                if matches!(format, Format::Q4_0) {
                    let eight = _mm256_set1_epi32(8);
                    let f = |v: __m256i| {
                        _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(v, eight)), d)
                    };
                    [f(l0), f(l1), f(h0), f(h1)]
                } else {
                    // A product, then a sum, each rounded: the scalar decoder's `q * d + m`.
                    let m = _mm256_set1_ps(half_at(b.add(2)));
                    let f = |v: __m256i| _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(v), d), m);
                    [f(l0), f(l1), f(h0), f(h1)]
                }
            }
            Format::Q8_0 => {
                let d = _mm256_set1_ps(half_at(b));
                let q = b.add(2);
                let f = |i: usize| {
                    let v = _mm_loadl_epi64(q.add(8 * i) as *const __m128i);
                    _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), d)
                };
                [f(0), f(1), f(2), f(3)]
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn decode_row(format: Format, w: &[u8], out: &mut [f32]) {
        for (i, chunk) in w.chunks_exact(format.block_bytes()).enumerate() {
            let v = decode(format, chunk.as_ptr());
            let dst = out.as_mut_ptr().add(i * BLOCK);
            for (k, x) in v.iter().enumerate() {
                _mm256_storeu_ps(dst.add(8 * k), *x);
            }
        }
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }

    /// `out[r] = w · xs[r]` for `R` rows, each block decoded once. Every row sums in the same
    /// order whatever `R` is, so a row's result does not depend on the rows beside it.
    #[inline(always)]
    unsafe fn dot_rows<const R: usize>(format: Format, w: &[u8], xs: &[&[f32]], out: &mut [f32]) {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for (i, chunk) in w.chunks_exact(format.block_bytes()).enumerate() {
            let v = decode(format, chunk.as_ptr());
            for r in 0..R {
                let x = xs[r].as_ptr().add(i * BLOCK);
                acc[r][0] = _mm256_fmadd_ps(v[0], _mm256_loadu_ps(x), acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(v[1], _mm256_loadu_ps(x.add(8)), acc[r][1]);
                acc[r][0] = _mm256_fmadd_ps(v[2], _mm256_loadu_ps(x.add(16)), acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(v[3], _mm256_loadu_ps(x.add(24)), acc[r][1]);
            }
        }
        for r in 0..R {
            out[r] = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
        }
    }

    /// `out[r] = w · xs[r]` for every row, four rows per pass over `w`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_many(format: Format, w: &[u8], xs: &[&[f32]], out: &mut [f32]) {
        for (x, o) in xs.chunks(4).zip(out.chunks_mut(4)) {
            match x.len() {
                4 => dot_rows::<4>(format, w, x, o),
                3 => dot_rows::<3>(format, w, x, o),
                2 => dot_rows::<2>(format, w, x, o),
                _ => dot_rows::<1>(format, w, x, o),
            }
        }
    }
}

fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        simd::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x Wᵀ` for a few rows of `x` (`[n, in]`, f32) against GGML weight `W` (`[out, in]`),
/// decoding each block once for up to four rows at a time. `None` when not handled here.
pub fn matmul_t(x: &Tensor, q: &QTensor) -> Result<Option<Tensor>> {
    let Some((format, out_features, cols)) = supported(q) else {
        return Ok(None);
    };
    let (n, in_features) = x.dims2()?;
    if in_features != cols || x.dtype() != candle_core::DType::F32 {
        return Ok(None);
    }
    let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let data = q.data()?;
    let bb = format.block_bytes();
    let row_bytes = cols / BLOCK * bb;
    let rows: Vec<&[f32]> = xs.chunks_exact(cols).collect();
    // Output transposed ([out, n]) so each task owns a contiguous slice.
    let mut out_t = vec![0f32; out_features * n];
    let fast = simd_available();
    // Tasks of several weight rows: one row (576 floats of work per activation row) is too
    // little to be worth a task of its own.
    let per_task = (4096 / (cols * n).max(1)).clamp(1, 64);
    out_t
        .par_chunks_mut(n * per_task)
        .enumerate()
        .for_each(|(t, acc)| {
            for (k, acc) in acc.chunks_mut(n).enumerate() {
                let o = t * per_task + k;
                let w = &data[o * row_bytes..(o + 1) * row_bytes];
                if fast {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: only reached when the CPU reports AVX2, FMA and F16C.
                    unsafe {
                        simd::dot_many(format, w, &rows, acc)
                    };
                } else {
                    for (a, x) in acc.iter_mut().zip(&rows) {
                        *a = dot_row(format, w, x);
                    }
                }
            }
        });
    let t = Tensor::from_vec(out_t, (out_features, n), &Device::Cpu)?;
    Ok(Some(t.t()?.contiguous()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::max_abs_diff;

    #[test]
    fn kernels_agree_with_candle_dequantisation() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (48, 96), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (3, 96), &dev).unwrap();
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let reference = q.dequantize(&dev).unwrap();
            let ours = dequantize(&q).unwrap().unwrap();
            assert_eq!(
                max_abs_diff(&reference, &ours),
                0.0,
                "{dtype:?} dequantisation"
            );
            let expected = x.matmul(&reference.t().unwrap()).unwrap();
            let got = matmul_t(&x, &q).unwrap().unwrap();
            assert!(max_abs_diff(&expected, &got) < 1e-4, "{dtype:?} product");
        }
    }

    /// The SIMD decoder gives the scalar decoder's values bit for bit, and a row's product does
    /// not depend on how many rows share the pass over the weight (1 to 8 rows, 4 per pass).
    #[test]
    fn simd_decode_is_exact_and_rows_are_independent() {
        let dev = Device::Cpu;
        // 200 output rows: more than one task, and a last task that is not full.
        let w = Tensor::randn(0f32, 1.0, (200, 64), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (8, 64), &dev).unwrap();
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let format = Format::of(dtype).unwrap();
            let data = q.data().unwrap();
            let ours: Vec<f32> = dequantize(&q)
                .unwrap()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let mut block = [0f32; BLOCK];
            for (i, chunk) in data.chunks_exact(format.block_bytes()).enumerate() {
                format.decode(chunk, &mut block);
                assert_eq!(
                    &ours[i * BLOCK..(i + 1) * BLOCK],
                    &block[..],
                    "{dtype:?} block {i}"
                );
            }
            let reference = q.dequantize(&dev).unwrap();
            let all = matmul_t(&x, &q).unwrap().unwrap();
            for n in 1..=8 {
                let xs = x.narrow(0, 0, n).unwrap();
                let got = matmul_t(&xs, &q).unwrap().unwrap();
                let expected = xs.matmul(&reference.t().unwrap()).unwrap();
                let diff = max_abs_diff(&expected, &got);
                assert!(diff < 1e-4, "{dtype:?}, {n} rows: {diff}");
                let same = all.narrow(0, 0, n).unwrap();
                assert_eq!(
                    got.to_vec2::<f32>().unwrap(),
                    same.to_vec2::<f32>().unwrap(),
                    "{dtype:?}: the first {n} rows alone differ from the same rows among 8"
                );
            }
        }
        let k = QTensor::quantize(
            &Tensor::randn(0f32, 1.0, (4, 256), &dev).unwrap(),
            GgmlDType::Q4K,
        )
        .unwrap();
        assert!(
            dequantize(&k).unwrap().is_none(),
            "K-quants fall back to candle"
        );
    }
}
