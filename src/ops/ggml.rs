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
    out.par_chunks_mut(cols).enumerate().for_each(|(r, dst)| {
        let src = &data[r * row_bytes..(r + 1) * row_bytes];
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

/// [`dot_row`] compiled for AVX2 (8-wide vectors); chosen at run time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_row_avx2(format: Format, w: &[u8], x: &[f32]) -> f32 {
    dot_row(format, w, x)
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dot_row_avx2(format: Format, w: &[u8], x: &[f32]) -> f32 {
    dot_row(format, w, x)
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x Wᵀ` for a few rows of `x` (`[n, in]`, f32) against GGML weight `W` (`[out, in]`),
/// decoding each block once and reusing it for every row. `None` when not handled here.
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
    // Output transposed ([out, n]) so each task owns a contiguous slice.
    let mut out_t = vec![0f32; out_features * n];
    let avx2 = has_avx2();
    out_t.par_chunks_mut(n).enumerate().for_each(|(o, acc)| {
        let w = &data[o * row_bytes..(o + 1) * row_bytes];
        for (r, a) in acc.iter_mut().enumerate() {
            let x = &xs[r * cols..(r + 1) * cols];
            *a = if avx2 {
                // SAFETY: only reached when the CPU reports AVX2.
                unsafe { dot_row_avx2(format, w, x) }
            } else {
                dot_row(format, w, x)
            };
        }
    });
    let t = Tensor::from_vec(out_t, (out_features, n), &Device::Cpu)?;
    Ok(Some(t.t()?.contiguous()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_agree_with_candle_dequantisation() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (48, 96), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (3, 96), &dev).unwrap();
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let reference = q.dequantize(&dev).unwrap();
            let ours = dequantize(&q).unwrap().unwrap();
            let diff = (&reference - &ours)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert_eq!(
                diff.to_scalar::<f32>().unwrap(),
                0.0,
                "{dtype:?} dequantisation"
            );
            let expected = x.matmul(&reference.t().unwrap()).unwrap();
            let got = matmul_t(&x, &q).unwrap().unwrap();
            let diff = (&expected - &got)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-4, "{dtype:?} product");
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
