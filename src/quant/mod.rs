//! 4-bit and 8-bit quantisation of frozen base weights, faithful to bitsandbytes 0.50.
//!
//! - [`Quantized4bit`]: blockwise NF4 / FP4 with optional double quantisation, the packed bytes
//!   and statistics identical to `bitsandbytes.functional.quantize_4bit` on CPU.
//! - [`Int8Tensor`]: row-wise absmax int8, as `bnb.nn.Int8Params` quantises a weight.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use qlora::quant::{Quant4Config, Quantized4bit};
//! let w = Tensor::randn(0f32, 1.0, (256, 128), &Device::Cpu)?;
//! let q = Quantized4bit::quantize(&w, Quant4Config::qlora())?;
//! assert!((q.bits_per_parameter() - 4.127).abs() < 0.01);
//! let back = q.dequantize(&Device::Cpu)?; // same shape and dtype as `w`
//! # Ok::<(), qlora::Error>(())
//! ```

mod blockwise4;
pub mod bnb_checkpoint;
pub mod codes;
mod dynamic8;
mod int8;
mod nf4;

pub use codes::{dynamic_map_signed, FP4_CODE, NF4_CODE};
pub use int8::Int8Tensor;
pub use nf4::{
    Absmax, NestedAbsmax, Quant4Config, QuantState4, QuantType, Quantized4bit, NESTED_BLOCKSIZE,
    SUPPORTED_BLOCKSIZES,
};
