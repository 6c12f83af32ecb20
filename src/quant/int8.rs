//! 8-bit row-wise absmax quantisation (LLM.int8 weights), as `bitsandbytes.nn.Int8Params`
//! quantises a weight: cast to f16, then `int8_vectorwise_quant` (one scale per row, `SCB`).

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// `int8_vectorwise_dequant` multiplies by this Python float (rounded to f32) instead of dividing
/// by 127.
const INV_127: f32 = 7.874_015_718_698_502e-3_f64 as f32;

/// A weight quantised to int8 with one f32 scale (the row's absmax) per row.
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Tensor {
    data: Vec<i8>,
    scb: Vec<f32>,
    shape: Vec<usize>,
}

impl Int8Tensor {
    /// Quantises `t` (F32, F16 or BF16; rows are all dimensions but the last) as
    /// `bnb.nn.Int8Params` does: the values are first rounded to f16, then each row gets
    /// `SCB = max |x|` and `q = round_half_even(x * (127 * (1 / SCB)))`.
    pub fn quantize(t: &Tensor) -> Result<Self> {
        match t.dtype() {
            DType::F32 | DType::F16 | DType::BF16 => {}
            other => {
                return Err(Error::InvalidArgument(format!(
                    "8-bit quantisation needs an F32, F16 or BF16 tensor, got {other:?}"
                )))
            }
        }
        let values = t
            .flatten_all()?
            .to_dtype(DType::F16)?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        Self::quantize_f16_values(&values, t.dims())
    }

    /// Quantises row-major `values` that are already f16-representable (as f32).
    pub fn quantize_f16_values(values: &[f32], shape: &[usize]) -> Result<Self> {
        let numel: usize = shape.iter().product();
        let cols = shape.last().copied().unwrap_or(0);
        if shape.is_empty() || numel == 0 {
            return Err(Error::InvalidArgument(format!(
                "8-bit quantisation: cannot quantise an empty or scalar tensor (shape {shape:?})"
            )));
        }
        if numel != values.len() {
            return Err(Error::InvalidArgument(format!(
                "8-bit quantisation: shape {shape:?} holds {numel} values but {} were given",
                values.len()
            )));
        }
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "8-bit quantisation: value {} at flat index {i} is not finite (in f16)",
                values[i]
            )));
        }
        let mut data = Vec::with_capacity(numel);
        let mut scb = Vec::with_capacity(numel / cols);
        for row in values.chunks(cols) {
            let am = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            scb.push(am);
            // torch evaluates `127.0 / row_stats` as `row_stats.reciprocal() * 127`. A zero row
            // makes that 0 * inf = NaN in bitsandbytes, whose int8 cast then yields 0.
            let scale = (1.0 / am) * 127.0;
            data.extend(row.iter().map(|&x| {
                let q = (x * scale).round_ties_even();
                if q.is_nan() {
                    0
                } else {
                    q.clamp(-127.0, 127.0) as i8
                }
            }));
        }
        Ok(Int8Tensor {
            data,
            scb,
            shape: shape.to_vec(),
        })
    }

    /// Rebuilds from stored parts (`weight` I8 and `SCB` F32 of a bitsandbytes checkpoint).
    pub fn from_parts(data: Vec<i8>, scb: Vec<f32>, shape: Vec<usize>) -> Result<Self> {
        let numel: usize = shape.iter().product();
        let cols = shape.last().copied().unwrap_or(0);
        if numel == 0 || data.len() != numel || scb.len() != numel / cols {
            return Err(Error::InvalidArgument(format!(
                "int8 tensor parts: {} values and {} row scales do not fit shape {shape:?}",
                data.len(),
                scb.len()
            )));
        }
        Ok(Int8Tensor { data, scb, shape })
    }

    /// The int8 codes, row-major.
    pub fn data(&self) -> &[i8] {
        &self.data
    }

    /// One scale per row: the row's absmax in f16, widened to f32 (bitsandbytes' `SCB`).
    pub fn scb(&self) -> &[f32] {
        &self.scb
    }

    /// Shape of the original tensor.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Dequantised values, `f32(q) * SCB * (1/127)` in f32 as `int8_vectorwise_dequant`.
    pub fn dequantize_f32(&self) -> Vec<f32> {
        let cols = self.shape.last().copied().unwrap_or(1);
        self.data
            .chunks(cols)
            .zip(&self.scb)
            .flat_map(|(row, &s)| row.iter().map(move |&q| f32::from(q) * s * INV_127))
            .collect()
    }

    /// Dequantised tensor (F32, as bitsandbytes returns it) on `device`.
    pub fn dequantize(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_vec(
            self.dequantize_f32(),
            self.shape.as_slice(),
            device,
        )?)
    }

    /// Bytes held: one per value plus four per row.
    pub fn storage_bytes(&self) -> usize {
        self.data.len() + 4 * self.scb.len()
    }

    /// Storage bits per value (8 plus the row scale's share).
    pub fn bits_per_parameter(&self) -> f64 {
        8.0 * self.storage_bytes() as f64 / self.data.len() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_scale_to_127() {
        let t = Tensor::new(&[[1.0f32, -0.5, 0.25], [0.0, 0.0, 0.0]], &Device::Cpu).unwrap();
        let q = Int8Tensor::quantize(&t).unwrap();
        assert_eq!(q.data(), &[127, -64, 32, 0, 0, 0]);
        assert_eq!(q.scb(), &[1.0, 0.0]);
        let d = q.dequantize_f32();
        assert!((d[0] - 1.0).abs() < 1e-6 && (d[1] + 0.503_937).abs() < 1e-5);
        assert!(d[3..].iter().all(|&x| x == 0.0));
        assert!((q.bits_per_parameter() - (8.0 + 64.0 / 6.0)).abs() < 1e-9);
    }

    #[test]
    fn errors_are_clear() {
        let e = Int8Tensor::quantize_f16_values(&[], &[0, 3]).unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
        let t = Tensor::new(&[1i64], &Device::Cpu).unwrap();
        let e = Int8Tensor::quantize(&t).unwrap_err();
        assert!(e.to_string().contains("I64"), "{e}");
        let e = Int8Tensor::from_parts(vec![0; 6], vec![1.0], vec![2, 3]).unwrap_err();
        assert!(e.to_string().contains("row scales"), "{e}");
    }
}
