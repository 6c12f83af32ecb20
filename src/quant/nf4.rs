//! 4-bit blockwise quantisation (NF4 and FP4, optional double quantisation) with the numerics of
//! `bitsandbytes.functional.quantize_4bit` / `dequantize_4bit` 0.50 on CPU.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::codes::{FP4_CODE, NF4_CODE};
use super::{blockwise4, dynamic8};
use crate::{Error, Result};

/// Block sizes bitsandbytes accepts for 4-bit quantisation.
pub const SUPPORTED_BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// Block size of the second (8-bit) quantisation of the absmax statistics; fixed in bitsandbytes.
pub const NESTED_BLOCKSIZE: usize = 256;

/// Which 4-bit code book to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantType {
    /// NormalFloat4, the QLoRA data type (quantiles of a standard normal).
    Nf4,
    /// 4-bit float (1 sign, 2 exponent, 1 mantissa bit); bitsandbytes' default.
    Fp4,
}

impl QuantType {
    /// The 16-entry code book, indexed by the 4-bit code.
    pub fn code(self) -> &'static [f32; 16] {
        match self {
            QuantType::Nf4 => &NF4_CODE,
            QuantType::Fp4 => &FP4_CODE,
        }
    }

    /// bitsandbytes' name: `"nf4"` or `"fp4"`.
    pub fn name(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }
}

impl std::fmt::Display for QuantType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for QuantType {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "nf4" => Ok(QuantType::Nf4),
            "fp4" => Ok(QuantType::Fp4),
            other => Err(Error::InvalidArgument(format!(
                "4-bit quant type `{other}` is not supported; use \"nf4\" or \"fp4\""
            ))),
        }
    }
}

/// How to quantise to 4 bits. `Default` is `quantize_4bit`'s own default (FP4, blocks of 64, no
/// double quantisation); [`Quant4Config::qlora`] is the QLoRA recipe (NF4 + double quantisation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quant4Config {
    /// The code book.
    pub quant_type: QuantType,
    /// Values per absmax block; one of [`SUPPORTED_BLOCKSIZES`].
    pub blocksize: usize,
    /// Double quantisation: store the absmax statistics in 8 bits (bitsandbytes'
    /// `compress_statistics`, transformers' `bnb_4bit_use_double_quant`).
    pub compress_statistics: bool,
}

impl Default for Quant4Config {
    fn default() -> Self {
        Quant4Config {
            quant_type: QuantType::Fp4,
            blocksize: 64,
            compress_statistics: false,
        }
    }
}

impl Quant4Config {
    /// NF4, blocks of 64, no double quantisation.
    pub fn nf4() -> Self {
        Quant4Config {
            quant_type: QuantType::Nf4,
            ..Self::default()
        }
    }

    /// The QLoRA paper's setting: NF4, blocks of 64, double quantisation (≈ 4.127 bits/param).
    pub fn qlora() -> Self {
        Quant4Config {
            quant_type: QuantType::Nf4,
            blocksize: 64,
            compress_statistics: true,
        }
    }

    /// This config with another code book.
    pub fn with_quant_type(mut self, quant_type: QuantType) -> Self {
        self.quant_type = quant_type;
        self
    }

    /// This config with another block size (checked when quantising).
    pub fn with_blocksize(mut self, blocksize: usize) -> Self {
        self.blocksize = blocksize;
        self
    }

    /// This config with double quantisation switched on or off.
    pub fn with_double_quant(mut self, on: bool) -> Self {
        self.compress_statistics = on;
        self
    }

    /// Fails, naming the accepted sizes, when the block size is not one bitsandbytes supports.
    pub fn validate(&self) -> Result<()> {
        check_blocksize(self.blocksize)
    }
}

fn check_blocksize(blocksize: usize) -> Result<()> {
    if SUPPORTED_BLOCKSIZES.contains(&blocksize) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "4-bit blocksize {blocksize} is not supported; use one of {SUPPORTED_BLOCKSIZES:?}"
        )))
    }
}

/// Double-quantised absmax statistics: `absmax - offset` in blocks of [`NESTED_BLOCKSIZE`], one
/// byte each against the signed dynamic map, plus one f32 absmax per nested block.
#[derive(Debug, Clone, PartialEq)]
pub struct NestedAbsmax {
    /// One dynamic-map code per 4-bit block (bitsandbytes' `quant_state.absmax`, U8).
    pub quantized: Vec<u8>,
    /// One f32 per nested block (`quant_state.state2.absmax`, `nested_absmax` on disk).
    pub absmax: Vec<f32>,
    /// The mean of the original absmax values, subtracted before quantising (`nested_offset`).
    pub offset: f32,
    /// Nested block size; bitsandbytes always uses [`NESTED_BLOCKSIZE`].
    pub blocksize: usize,
}

impl NestedAbsmax {
    /// Compresses absmax statistics as `quantize_4bit(compress_statistics=True)` does, with
    /// `offset = mean(absmax)`.
    ///
    /// The mean is the correctly rounded f32 sum divided by the count in f32. torch sums in f32
    /// in an order that depends on the CPU's vector width and thread count, so its offset can
    /// differ from ours in the last bit or two; [`NestedAbsmax::quantize_with_offset`] takes a
    /// given offset when bit-identical state is needed.
    pub fn quantize(absmax: &[f32]) -> Self {
        // torch's own f32 summation order, so the offset (and everything quantised around it)
        // is bit-identical to bitsandbytes'.
        let offset = super::bnb_checkpoint::torch_mean_f32(absmax);
        Self::quantize_with_offset(absmax, offset)
    }

    /// Compresses absmax statistics around a given offset.
    pub fn quantize_with_offset(absmax: &[f32], offset: f32) -> Self {
        let centred: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
        let (quantized, absmax) = dynamic8::quantize_blockwise(&centred, NESTED_BLOCKSIZE);
        NestedAbsmax {
            quantized,
            absmax,
            offset,
            blocksize: NESTED_BLOCKSIZE,
        }
    }

    /// The absmax statistics back in f32: `dynamic_map[q] * nested_absmax + offset`.
    pub fn dequantize(&self) -> Vec<f32> {
        dynamic8::dequantize_blockwise(&self.quantized, &self.absmax, self.blocksize)
            .into_iter()
            .map(|a| a + self.offset)
            .collect()
    }

    /// Bytes held: one per code, four per nested absmax, four for the offset.
    pub fn storage_bytes(&self) -> usize {
        self.quantized.len() + 4 * self.absmax.len() + 4
    }
}

/// Per-block scales of a 4-bit tensor, plain or double-quantised.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    /// One f32 per block.
    Plain(Vec<f32>),
    /// Compressed to 8 bits per block.
    Nested(NestedAbsmax),
}

impl Absmax {
    /// Number of 4-bit blocks these statistics cover.
    pub fn len(&self) -> usize {
        match self {
            Absmax::Plain(v) => v.len(),
            Absmax::Nested(n) => n.quantized.len(),
        }
    }

    /// True when there are no blocks.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The scales as the dequantiser uses them (the nested ones dequantised).
    pub fn values(&self) -> Vec<f32> {
        match self {
            Absmax::Plain(v) => v.clone(),
            Absmax::Nested(n) => n.dequantize(),
        }
    }

    /// Bytes held by the statistics (shared code books not counted).
    pub fn storage_bytes(&self) -> usize {
        match self {
            Absmax::Plain(v) => 4 * v.len(),
            Absmax::Nested(n) => n.storage_bytes(),
        }
    }
}

/// Everything besides the packed codes needed to dequantise: bitsandbytes' `QuantState`.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantState4 {
    /// Per-block scales.
    pub absmax: Absmax,
    /// Values per block.
    pub blocksize: usize,
    /// Code book.
    pub quant_type: QuantType,
    /// dtype of the original tensor, and of the dequantised one (F32, F16 or BF16).
    pub dtype: DType,
    /// Shape of the original tensor.
    pub shape: Vec<usize>,
}

impl QuantState4 {
    /// Number of quantised values.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A tensor quantised to 4 bits: two codes per byte plus its [`QuantState4`].
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized4bit {
    packed: Vec<u8>,
    state: QuantState4,
}

impl Quantized4bit {
    /// Quantises `t` (F32, F16 or BF16, any shape, any device) as
    /// `bitsandbytes.functional.quantize_4bit(t, blocksize, compress_statistics, quant_type)`.
    pub fn quantize(t: &Tensor, cfg: Quant4Config) -> Result<Self> {
        let dtype = t.dtype();
        check_dtype(dtype)?;
        let values = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        Self::quantize_values(&values, t.dims(), dtype, cfg)
    }

    /// Quantises row-major `values` of `shape`; `dtype` is recorded as the original dtype (the
    /// values should be representable in it, as they are when widened from it).
    pub fn quantize_values(
        values: &[f32],
        shape: &[usize],
        dtype: DType,
        cfg: Quant4Config,
    ) -> Result<Self> {
        cfg.validate()?;
        check_dtype(dtype)?;
        let numel: usize = shape.iter().product();
        if numel != values.len() {
            return Err(Error::InvalidArgument(format!(
                "4-bit quantisation: shape {shape:?} holds {numel} values but {} were given",
                values.len()
            )));
        }
        if values.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "4-bit quantisation: cannot quantise an empty tensor (shape {shape:?})"
            )));
        }
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "4-bit quantisation: value {} at flat index {i} is not finite; \
                 bitsandbytes would silently produce garbage for its block",
                values[i]
            )));
        }
        let (packed, absmax) = blockwise4::quantize(values, cfg.blocksize, cfg.quant_type);
        let absmax = if cfg.compress_statistics {
            Absmax::Nested(NestedAbsmax::quantize(&absmax))
        } else {
            Absmax::Plain(absmax)
        };
        Ok(Quantized4bit {
            packed,
            state: QuantState4 {
                absmax,
                blocksize: cfg.blocksize,
                quant_type: cfg.quant_type,
                dtype,
                shape: shape.to_vec(),
            },
        })
    }

    /// Rebuilds a quantised tensor from stored parts (e.g. a bitsandbytes checkpoint), checking
    /// that their sizes agree.
    pub fn from_parts(packed: Vec<u8>, state: QuantState4) -> Result<Self> {
        check_blocksize(state.blocksize)?;
        check_dtype(state.dtype)?;
        let n = state.numel();
        let bad = |what: String| {
            Err(Error::InvalidArgument(format!(
                "4-bit tensor parts: {what}"
            )))
        };
        if n == 0 {
            return bad(format!("shape {:?} is empty", state.shape));
        }
        if packed.len() != n.div_ceil(2) {
            return bad(format!(
                "{} packed bytes for shape {:?}, expected {}",
                packed.len(),
                state.shape,
                n.div_ceil(2)
            ));
        }
        let blocks = n.div_ceil(state.blocksize);
        if state.absmax.len() != blocks {
            return bad(format!(
                "{} absmax values for {n} values in blocks of {}, expected {blocks}",
                state.absmax.len(),
                state.blocksize
            ));
        }
        if let Absmax::Nested(nested) = &state.absmax {
            if nested.blocksize == 0 || nested.absmax.len() != blocks.div_ceil(nested.blocksize) {
                return bad(format!(
                    "{} nested absmax values for {blocks} blocks in nested blocks of {}",
                    nested.absmax.len(),
                    nested.blocksize
                ));
            }
        }
        Ok(Quantized4bit { packed, state })
    }

    /// The packed codes, `(numel + 1) / 2` bytes (bitsandbytes stores them as `[bytes, 1]` U8).
    pub fn packed(&self) -> &[u8] {
        &self.packed
    }

    /// The quantisation state.
    pub fn state(&self) -> &QuantState4 {
        &self.state
    }

    /// Packed codes and state, by value.
    pub fn into_parts(self) -> (Vec<u8>, QuantState4) {
        (self.packed, self.state)
    }

    /// Shape of the original tensor.
    pub fn shape(&self) -> &[usize] {
        &self.state.shape
    }

    /// Number of quantised values.
    pub fn numel(&self) -> usize {
        self.state.numel()
    }

    /// The dequantised values in f32, row-major (before rounding to the original dtype).
    pub fn dequantize_f32(&self) -> Vec<f32> {
        let absmax = self.state.absmax.values();
        blockwise4::dequantize(
            &self.packed,
            &absmax,
            self.state.blocksize,
            self.state.quant_type.code(),
            self.numel(),
        )
    }

    /// The tensor back, in the original dtype and shape, on `device`: each value is
    /// `code[q] * absmax` in f32 rounded to the dtype, as bitsandbytes' CPU kernel computes it.
    /// (bitsandbytes returns 1-D tensors as `[1, n]`; we keep the original shape.)
    pub fn dequantize(&self, device: &Device) -> Result<Tensor> {
        let values = self.dequantize_f32();
        let shape = self.state.shape.as_slice();
        let t = match self.state.dtype {
            DType::F16 => Tensor::from_vec(
                values.into_iter().map(half::f16::from_f32).collect(),
                shape,
                device,
            )?,
            DType::BF16 => Tensor::from_vec(
                values.into_iter().map(half::bf16::from_f32).collect(),
                shape,
                device,
            )?,
            _ => Tensor::from_vec(values, shape, device)?,
        };
        Ok(t)
    }

    /// Bytes held: packed codes plus statistics (shared code books not counted).
    pub fn storage_bytes(&self) -> usize {
        self.packed.len() + self.state.absmax.storage_bytes()
    }

    /// Storage bits per quantised value: 4.5 for blocks of 64 with f32 absmax, ≈ 4.127 with
    /// double quantisation.
    pub fn bits_per_parameter(&self) -> f64 {
        8.0 * self.storage_bytes() as f64 / self.numel() as f64
    }
}

fn check_dtype(dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => Ok(()),
        other => Err(Error::InvalidArgument(format!(
            "4-bit quantisation needs an F32, F16 or BF16 tensor, got {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 97.0)
            .collect()
    }

    #[test]
    fn round_trip_error_is_bounded_by_the_code_spacing() {
        for qt in [QuantType::Nf4, QuantType::Fp4] {
            for bs in SUPPORTED_BLOCKSIZES {
                let v = ramp(1000);
                let cfg = Quant4Config::default()
                    .with_quant_type(qt)
                    .with_blocksize(bs);
                let q = Quantized4bit::quantize_values(&v, &[10, 100], DType::F32, cfg).unwrap();
                let d = q.dequantize_f32();
                let absmax = q.state().absmax.values();
                let code = qt.code();
                // Half the largest gap between neighbouring codes, times the block's scale.
                let mut sorted = *code;
                sorted.sort_by(f32::total_cmp);
                let gap = sorted.windows(2).map(|w| w[1] - w[0]).fold(0f32, f32::max);
                for (i, (a, b)) in v.iter().zip(&d).enumerate() {
                    let tol = gap / 2.0 * absmax[i / bs] * 1.0001;
                    assert!((a - b).abs() <= tol, "{qt} bs {bs} [{i}]: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn requantising_dequantised_values_is_stable() {
        let v = ramp(4096 + 33);
        let cfg = Quant4Config::nf4();
        let q = Quantized4bit::quantize_values(&v, &[v.len()], DType::F32, cfg).unwrap();
        let q2 = Quantized4bit::quantize_values(&q.dequantize_f32(), &[v.len()], DType::F32, cfg)
            .unwrap();
        assert_eq!(q.packed(), q2.packed());
    }

    #[test]
    fn tensor_round_trip_keeps_dtype_and_shape() {
        let dev = Device::Cpu;
        let t = Tensor::from_vec(ramp(7 * 13), (7, 13), &dev).unwrap();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let td = t.to_dtype(dtype).unwrap();
            let q = Quantized4bit::quantize(&td, Quant4Config::qlora()).unwrap();
            let d = q.dequantize(&dev).unwrap();
            assert_eq!(d.dtype(), dtype);
            assert_eq!(d.dims(), &[7, 13]);
            assert_eq!(q.packed().len(), 46);
        }
    }

    #[test]
    fn double_quant_storage_is_about_4_127_bits() {
        let v = ramp(64 * 256 * 4);
        let q = Quantized4bit::quantize_values(&v, &[v.len()], DType::F32, Quant4Config::qlora())
            .unwrap();
        let bits = q.bits_per_parameter();
        assert!((bits - 4.127).abs() < 0.001, "{bits}");
        let plain = Quantized4bit::quantize_values(&v, &[v.len()], DType::F32, Quant4Config::nf4())
            .unwrap();
        assert_eq!(plain.bits_per_parameter(), 4.5);
    }

    #[test]
    fn nested_absmax_is_close_to_plain() {
        let v = ramp(64 * 300);
        let plain = Quantized4bit::quantize_values(&v, &[v.len()], DType::F32, Quant4Config::nf4())
            .unwrap();
        let nested =
            Quantized4bit::quantize_values(&v, &[v.len()], DType::F32, Quant4Config::qlora())
                .unwrap();
        assert_eq!(plain.packed(), nested.packed());
        let (a, b) = (
            plain.state().absmax.values(),
            nested.state().absmax.values(),
        );
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 0.01 * x.abs().max(1e-3), "{x} vs {y}");
        }
    }

    #[test]
    fn bad_inputs_give_clear_errors() {
        let err = |r: Result<Quantized4bit>| r.unwrap_err().to_string();
        let e = err(Quantized4bit::quantize_values(
            &[1.0; 64],
            &[64],
            DType::F32,
            Quant4Config::nf4().with_blocksize(48),
        ));
        assert!(e.contains("blocksize 48") && e.contains("4096"), "{e}");
        let e = err(Quantized4bit::quantize_values(
            &[],
            &[0, 4],
            DType::F32,
            Quant4Config::nf4(),
        ));
        assert!(e.contains("empty"), "{e}");
        let e = err(Quantized4bit::quantize_values(
            &[1.0; 3],
            &[4],
            DType::F32,
            Quant4Config::nf4(),
        ));
        assert!(e.contains("holds 4 values"), "{e}");
        let e = err(Quantized4bit::quantize_values(
            &[1.0, f32::NAN],
            &[2],
            DType::F32,
            Quant4Config::nf4(),
        ));
        assert!(e.contains("not finite"), "{e}");
        let t = Tensor::new(&[1u32, 2], &Device::Cpu).unwrap();
        let e = err(Quantized4bit::quantize(&t, Quant4Config::nf4()));
        assert!(e.contains("U32"), "{e}");
        let e = "int4".parse::<QuantType>().unwrap_err().to_string();
        assert!(e.contains("nf4"), "{e}");
    }

    #[test]
    fn from_parts_checks_sizes() {
        let q =
            Quantized4bit::quantize_values(&ramp(130), &[130], DType::F16, Quant4Config::qlora())
                .unwrap();
        let (packed, state) = q.clone().into_parts();
        assert_eq!(
            Quantized4bit::from_parts(packed.clone(), state.clone()).unwrap(),
            q
        );
        let e = Quantized4bit::from_parts(packed[1..].to_vec(), state.clone()).unwrap_err();
        assert!(e.to_string().contains("64 packed bytes"), "{e}");
        let mut bad = state;
        bad.blocksize = 128;
        let e = Quantized4bit::from_parts(packed, bad).unwrap_err();
        assert!(e.to_string().contains("expected 2"), "{e}");
    }

    #[test]
    fn all_zero_blocks_dequantise_to_zero() {
        let mut v = vec![0f32; 64 * 2 + 10];
        v[0] = 3.0;
        for cfg in [
            Quant4Config::nf4(),
            Quant4Config::default(),
            Quant4Config::qlora(),
        ] {
            let q = Quantized4bit::quantize_values(&v, &[v.len()], DType::F32, cfg).unwrap();
            let d = q.dequantize_f32();
            assert!((d[0] - 3.0).abs() < 0.05, "{cfg:?}: {}", d[0]);
            assert!(d[1..].iter().all(|&x| x == 0.0), "{cfg:?}");
        }
    }
}
