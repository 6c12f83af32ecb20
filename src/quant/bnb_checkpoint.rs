//! transformers' serialised bitsandbytes 4-bit checkpoints: reading and writing them.
//!
//! `model.save_pretrained(dir)` after `from_pretrained(..., quantization_config=
//! BitsAndBytesConfig(load_in_4bit=True, ...))` writes, for every quantised linear `P`:
//!
//! | tensor | dtype, shape | holds |
//! |---|---|---|
//! | `P.weight` | U8 `[ceil(n/2), 1]` | two 4-bit codes per byte, first in the high nibble |
//! | `P.weight.absmax` | F32 `[blocks]`, or U8 when double-quantised | per-block scales |
//! | `P.weight.quant_map` | F32 `[16]` | the NF4 / FP4 code book |
//! | `P.weight.nested_absmax` | F32 `[ceil(blocks/256)]` | (double quant) scales of the scales |
//! | `P.weight.nested_quant_map` | F32 `[256]` | (double quant) the signed dynamic map |
//! | `P.weight.quant_state.bitsandbytes__nf4` | U8 `[len]` | UTF-8 JSON, see [`PackedQuantState`] |
//!
//! and config.json gains a `quantization_config` object ([`BnbQuantizationConfig`]). Everything
//! else (embeddings, norms, biases, the output head) stays dense in the model's dtype.
//!
//! Reading happens inside the model loader (`Model::load` detects such a folder by itself);
//! [`save_quantized_model`] writes a folder that transformers + bitsandbytes load back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use serde_json::{json, Map, Value};

use super::codes::dynamic_map_signed;
use super::nf4::{Absmax, NestedAbsmax, Quant4Config, QuantState4, QuantType, Quantized4bit};
use super::NESTED_BLOCKSIZE;
use crate::model::decoder::Decoder;
use crate::model::linear::{Linear, LinearWeight};
use crate::model::weights::SafetensorsWeights;
use crate::model::Model;
use crate::{Error, Result};

/// The suffix, after `P.weight.`, of the tensor holding the JSON quant state (`nf4`/`fp4` follow).
pub const QUANT_STATE_KEY: &str = "quant_state.bitsandbytes__";

/// Files copied from the source folder next to a saved checkpoint, when present, so that the
/// result is a complete model folder (transformers' `save_pretrained` leaves them to the
/// tokenizer's own `save_pretrained`).
pub const COPIED_FILES: [&str; 9] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json",
];

/// Parameters of the second quantisation of the absmax statistics, as serialised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NestedParams {
    /// Nested block size (`nested_blocksize`; bitsandbytes always writes 256).
    pub blocksize: usize,
    /// The mean subtracted before quantising (`nested_offset`).
    pub offset: f32,
}

/// The non-tensor part of bitsandbytes' `QuantState.as_dict(packed=True)`: the JSON stored as
/// bytes in `P.weight.quant_state.bitsandbytes__{nf4,fp4}`, e.g.
/// `{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [64, 64],
/// "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.3835109174251556}`.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedQuantState {
    /// Code book.
    pub quant_type: QuantType,
    /// Values per absmax block.
    pub blocksize: usize,
    /// dtype of the original (and dequantised) tensor.
    pub dtype: DType,
    /// Shape of the original tensor, `[out, in]` for a linear weight.
    pub shape: Vec<usize>,
    /// Present when the absmax statistics are double-quantised.
    pub nested: Option<NestedParams>,
}

impl PackedQuantState {
    /// The packed state describing `q`.
    pub fn of(q: &Quantized4bit) -> Self {
        let s = q.state();
        Self {
            quant_type: s.quant_type,
            blocksize: s.blocksize,
            dtype: s.dtype,
            shape: s.shape.clone(),
            nested: match &s.absmax {
                Absmax::Plain(_) => None,
                Absmax::Nested(n) => Some(NestedParams {
                    blocksize: n.blocksize,
                    offset: n.offset,
                }),
            },
        }
    }

    /// Parses the JSON bytes; the error says which field is wrong (callers add tensor and file).
    pub fn parse(bytes: &[u8]) -> std::result::Result<Self, String> {
        let text = std::str::from_utf8(bytes).map_err(|e| format!("is not UTF-8 ({e})"))?;
        let v: Value =
            serde_json::from_str(text).map_err(|e| format!("is not valid JSON ({e}): {text:?}"))?;
        let obj = v
            .as_object()
            .ok_or_else(|| format!("is not a JSON object: {text}"))?;
        let field = |k: &str| {
            obj.get(k)
                .ok_or_else(|| format!("has no `{k}` field: {text}"))
        };
        let uint = |k: &str| -> std::result::Result<usize, String> {
            field(k)?
                .as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| format!("`{k}` must be a non-negative integer: {text}"))
        };
        let string = |k: &str| -> std::result::Result<&str, String> {
            field(k)?
                .as_str()
                .ok_or_else(|| format!("`{k}` must be a string: {text}"))
        };
        let quant_type = string("quant_type")?
            .parse::<QuantType>()
            .map_err(|e| e.to_string())?;
        let dtype = parse_torch_dtype(string("dtype")?)
            .ok_or_else(|| format!("`dtype` must be float32, float16 or bfloat16: {text}"))?;
        let shape = field("shape")?
            .as_array()
            .and_then(|a| {
                a.iter()
                    .map(|d| d.as_u64().map(|d| d as usize))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| format!("`shape` must be a list of integers: {text}"))?;
        let nested_keys = ["nested_blocksize", "nested_dtype", "nested_offset"];
        let nested = match nested_keys.iter().filter(|k| obj.contains_key(**k)).count() {
            0 => None,
            3 => {
                let nested_dtype = string("nested_dtype")?;
                if nested_dtype != "float32" {
                    return Err(format!(
                        "`nested_dtype` is {nested_dtype:?}; only float32 nested statistics \
                         are supported (bitsandbytes always writes float32)"
                    ));
                }
                let offset = field("nested_offset")?
                    .as_f64()
                    .ok_or_else(|| format!("`nested_offset` must be a number: {text}"))?;
                Some(NestedParams {
                    blocksize: uint("nested_blocksize")?,
                    // bitsandbytes stores an f32 tensor's `.item()`: the f64 is exact in f32.
                    offset: offset as f32,
                })
            }
            _ => {
                return Err(format!(
                    "has only some of {nested_keys:?}; a double-quantised state needs all three: \
                     {text}"
                ))
            }
        };
        Ok(Self {
            quant_type,
            blocksize: uint("blocksize")?,
            dtype,
            shape,
            nested,
        })
    }

    /// The JSON exactly as bitsandbytes writes it (`json.dumps` of the dict in its key order,
    /// Python's float repr for the offset), so files we write are byte-identical to its own.
    pub fn to_json(&self) -> String {
        let shape = self
            .shape
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let mut s = format!(
            "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{shape}]",
            self.quant_type.name(),
            self.blocksize,
            torch_dtype_name(self.dtype)
        );
        if let Some(n) = &self.nested {
            s.push_str(&format!(
                ", \"nested_blocksize\": {}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
                n.blocksize,
                python_float_repr(f64::from(n.offset))
            ));
        }
        s.push('}');
        s
    }

    /// The tensor name suffix this state is stored under: `quant_state.bitsandbytes__nf4`.
    pub fn key_suffix(&self) -> String {
        format!("{QUANT_STATE_KEY}{}", self.quant_type.name())
    }
}

/// `"float32"` / `"float16"` / `"bfloat16"` (also with a `torch.` prefix) as a candle dtype.
pub fn parse_torch_dtype(name: &str) -> Option<DType> {
    match name.strip_prefix("torch.").unwrap_or(name) {
        "float32" => Some(DType::F32),
        "float16" => Some(DType::F16),
        "bfloat16" => Some(DType::BF16),
        _ => None,
    }
}

/// torch's name of a float dtype (`float32`, `float16`, `bfloat16`).
pub fn torch_dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

/// Python's `repr(float)`: the shortest round-tripping digits, fixed notation for decimal
/// exponents in -4..16, otherwise `d.ddde±XX`.
fn python_float_repr(x: f64) -> String {
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    // Rust's `{:e}` gives the same shortest digits as Python: "3.8351091742515564e-1".
    let sci = format!("{:e}", x.abs());
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("{:e} exponent is an integer");
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let sign = if x < 0.0 { "-" } else { "" };
    let body = if (-4..16).contains(&exp) {
        if exp < 0 {
            format!("0.{}{digits}", "0".repeat((-exp - 1) as usize))
        } else {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                format!("{digits}{}.0", "0".repeat(int_len - digits.len()))
            } else {
                format!("{}.{}", &digits[..int_len], &digits[int_len..])
            }
        }
    } else {
        let m = if digits.len() == 1 {
            digits.clone()
        } else {
            format!("{}.{}", &digits[..1], &digits[1..])
        };
        format!(
            "{m}e{}{:02}",
            if exp < 0 { '-' } else { '+' },
            exp.unsigned_abs()
        )
    };
    format!("{sign}{body}")
}

/// transformers' `quantization_config` for bitsandbytes 4-bit, as stored in config.json.
#[derive(Debug, Clone, PartialEq)]
pub struct BnbQuantizationConfig {
    /// Code book and double quantisation (`bnb_4bit_quant_type`, `bnb_4bit_use_double_quant`);
    /// the block size is always 64 in transformers.
    pub quant: Quant4Config,
    /// `bnb_4bit_compute_dtype`: the dtype Linear4bit multiplies in.
    pub compute_dtype: DType,
    /// `llm_int8_skip_modules`: modules left unquantised (`None`: transformers' default, the
    /// output head and tied weights).
    pub skip_modules: Option<Vec<String>>,
}

impl BnbQuantizationConfig {
    /// The config for a quantisation setting, computing in `compute_dtype`.
    pub fn new(quant: Quant4Config, compute_dtype: DType) -> Self {
        Self {
            quant,
            compute_dtype,
            skip_modules: None,
        }
    }

    /// Reads `quantization_config` from a config.json: `Ok(None)` when there is none, an error
    /// (naming the file) when it is a quantisation we cannot load.
    pub fn from_config_file(path: &Path) -> Result<Option<Self>> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::config(path, format!("is not valid JSON ({e})")))?;
        match v.get("quantization_config") {
            None | Some(Value::Null) => Ok(None),
            Some(q) => Self::from_json(q)
                .map(Some)
                .map_err(|m| Error::config(path, format!("`quantization_config`: {m}"))),
        }
    }

    /// Parses the `quantization_config` object.
    pub fn from_json(q: &Value) -> std::result::Result<Self, String> {
        let obj = q.as_object().ok_or("must be an object")?;
        let method = obj
            .get("quant_method")
            .and_then(Value::as_str)
            .unwrap_or("bitsandbytes");
        if method != "bitsandbytes" {
            return Err(format!(
                "quant_method `{method}` is not supported; only bitsandbytes 4-bit checkpoints \
                 load here (or load the unquantised model with LoadOptions::load_in_4bit)"
            ));
        }
        let flag = |k: &str| obj.get(k).and_then(Value::as_bool).unwrap_or(false);
        if flag("load_in_8bit") || flag("_load_in_8bit") {
            return Err(
                "8-bit bitsandbytes (LLM.int8) checkpoints are not supported; \
                        save the model in 4 bits or unquantised"
                    .into(),
            );
        }
        if !(flag("load_in_4bit") || flag("_load_in_4bit")) {
            return Err("neither load_in_4bit nor load_in_8bit is set".into());
        }
        let text = |k: &str| obj.get(k).and_then(Value::as_str);
        let quant_type = text("bnb_4bit_quant_type")
            .unwrap_or("fp4")
            .parse::<QuantType>()
            .map_err(|e| format!("`bnb_4bit_quant_type`: {e}"))?;
        let compute_dtype = match obj.get("bnb_4bit_compute_dtype") {
            None | Some(Value::Null) => DType::F32,
            Some(Value::String(s)) => parse_torch_dtype(s)
                .ok_or_else(|| format!("`bnb_4bit_compute_dtype` {s:?} is not a float dtype"))?,
            Some(other) => {
                return Err(format!(
                    "`bnb_4bit_compute_dtype` must be a string, found {other}"
                ))
            }
        };
        if let Some(storage) = text("bnb_4bit_quant_storage") {
            if storage != "uint8" {
                return Err(format!(
                    "`bnb_4bit_quant_storage` {storage:?} is not supported; only uint8 storage"
                ));
            }
        }
        let skip_modules = match obj.get("llm_int8_skip_modules") {
            None | Some(Value::Null) => None,
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|m| m.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or("`llm_int8_skip_modules` must be a list of names")?,
            ),
            Some(other) => {
                return Err(format!(
                    "`llm_int8_skip_modules` must be a list, found {other}"
                ))
            }
        };
        Ok(Self {
            quant: Quant4Config {
                quant_type,
                blocksize: 64,
                compress_statistics: flag("bnb_4bit_use_double_quant"),
            },
            compute_dtype,
            skip_modules,
        })
    }

    /// The object transformers 5.24 writes (`BitsAndBytesConfig.to_dict()`), keys sorted.
    pub fn to_json(&self) -> Value {
        json!({
            "_load_in_4bit": true,
            "_load_in_8bit": false,
            "bnb_4bit_compute_dtype": torch_dtype_name(self.compute_dtype),
            "bnb_4bit_quant_storage": "uint8",
            "bnb_4bit_quant_type": self.quant.quant_type.name(),
            "bnb_4bit_use_double_quant": self.quant.compress_statistics,
            "llm_int8_enable_fp32_cpu_offload": false,
            "llm_int8_has_fp16_weight": false,
            "llm_int8_skip_modules": self.skip_modules,
            "llm_int8_threshold": 6.0,
            "load_in_4bit": true,
            "load_in_8bit": false,
            "quant_method": "bitsandbytes",
        })
    }
}

/// Quantises a weight exactly as transformers' `load_in_4bit` does through
/// `bitsandbytes.functional.quantize_4bit` on CPU, double-quantisation offset included.
///
/// The offset is `absmax.mean()`, which torch computes in f32 in its own summation order;
/// [`torch_mean_f32`] replays that order, so the nested state is bit-identical too (torch
/// splits sums of more than 32768 values — tensors above ~2M weights — across threads, where
/// the last bit of the offset can still differ).
pub fn quantize_like_bitsandbytes(w: &Tensor, cfg: Quant4Config) -> Result<Quantized4bit> {
    if !cfg.compress_statistics {
        return Quantized4bit::quantize(w, cfg);
    }
    let (packed, mut state) =
        Quantized4bit::quantize(w, cfg.with_double_quant(false))?.into_parts();
    let Absmax::Plain(absmax) = &state.absmax else {
        unreachable!("quantised without double quantisation")
    };
    let offset = torch_mean_f32(absmax);
    state.absmax = Absmax::Nested(NestedAbsmax::quantize_with_offset(absmax, offset));
    Quantized4bit::from_parts(packed, state)
}

/// `torch.Tensor.mean()` of a contiguous f32 vector on CPU, single-threaded: ATen's
/// `cascade_sum` (`vectorized_inner_sum` over 8-float vectors — the sum kernel runs its AVX2 /
/// NEON build even on AVX-512 machines — four interleaved accumulators summed in levels), then
/// the sum divided by the count in f32.
pub fn torch_mean_f32(values: &[f32]) -> f32 {
    const LANES: usize = 8;
    let n = values.len();
    if n == 0 {
        return f32::NAN;
    }
    let sum = if n >= LANES {
        let vectors = n / LANES;
        let acc = row_sum::<LANES>(vectors, |i| std::array::from_fn(|l| values[i * LANES + l]));
        let mut total = 0f32;
        for &v in &values[vectors * LANES..] {
            total += v;
        }
        for lane in acc {
            total += lane;
        }
        total
    } else {
        row_sum::<1>(n, |i| [values[i]])[0]
    };
    // The output starts at zero and the sum is accumulated into it (CastStoreAccumulate).
    (0f32 + sum) / n as f32
}

/// ATen's `row_sum`: `size` elements (vectors of `W` lanes) read as rows of four, summed by
/// `multi_row_sum`, the leftover elements added to the first partial, then the partials added.
// Index loops mirror ATen's loops one for one, which is what makes the order auditable.
#[allow(clippy::needless_range_loop)]
fn row_sum<const W: usize>(size: usize, load: impl Fn(usize) -> [f32; W]) -> [f32; W] {
    const ILP: usize = 4;
    const LEVELS: usize = 4;
    let add = |a: &mut [f32; W], b: &[f32; W]| {
        for (x, y) in a.iter_mut().zip(b) {
            *x += *y;
        }
    };
    let rows = size / ILP;
    let ceil_log2 = if rows <= 1 {
        0
    } else {
        usize::BITS - (rows - 1).leading_zeros()
    } as usize;
    let level_power = (ceil_log2 / LEVELS).max(4);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[[0f32; W]; ILP]; LEVELS];
    let mut i = 0usize;
    while i + level_step <= rows {
        for _ in 0..level_step {
            for k in 0..ILP {
                add(&mut acc[0][k], &load(i * ILP + k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            for k in 0..ILP {
                let lower = acc[j - 1][k];
                add(&mut acc[j][k], &lower);
                acc[j - 1][k] = [0f32; W];
            }
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    for i in i..rows {
        for k in 0..ILP {
            add(&mut acc[0][k], &load(i * ILP + k));
        }
    }
    for j in 1..LEVELS {
        for k in 0..ILP {
            let upper = acc[j][k];
            add(&mut acc[0][k], &upper);
        }
    }
    let mut partial = acc[0];
    for i in rows * ILP..size {
        add(&mut partial[0], &load(i));
    }
    let mut out = partial[0];
    for p in &partial[1..] {
        add(&mut out, p);
    }
    out
}

/// Reads the 4-bit weight `weight_name` (e.g. `model.layers.0.self_attn.q_proj.weight`) from a
/// bitsandbytes checkpoint. `Ok(None)` when the checkpoint holds no quant state for it (a dense
/// weight). Every inconsistency is an error naming the tensor and its file.
pub fn read_quantized(
    st: &SafetensorsWeights,
    weight_name: &str,
    expected_shape: &[usize],
) -> Result<Option<Quantized4bit>> {
    let keys: Vec<String> = [QuantType::Nf4, QuantType::Fp4]
        .iter()
        .map(|t| format!("{weight_name}.{QUANT_STATE_KEY}{}", t.name()))
        .filter(|k| st.has(k))
        .collect();
    let qs_key = match keys.as_slice() {
        [] => return Ok(None),
        [k] => k.clone(),
        _ => {
            return Err(Error::weights(
                st.file_of(&keys[0]).unwrap_or(Path::new("")),
                format!("tensor `{weight_name}` has both an nf4 and an fp4 quant state: {keys:?}"),
            ))
        }
    };
    let (qs_tensor, qs_file) = st.raw(&qs_key)?;
    let bad = |file: &Path, name: &str, msg: String| {
        Error::weights(file, format!("tensor `{name}`: {msg}"))
    };
    let packed_state = PackedQuantState::parse(&u8s(&qs_tensor, &qs_key, &qs_file)?)
        .map_err(|m| bad(&qs_file, &qs_key, format!("quant state {m}")))?;
    if !qs_key.ends_with(packed_state.quant_type.name()) {
        return Err(bad(
            &qs_file,
            &qs_key,
            format!(
                "the name says one quant type but the JSON says `{}`",
                packed_state.quant_type
            ),
        ));
    }
    if packed_state.shape != expected_shape {
        return Err(bad(
            &qs_file,
            &qs_key,
            format!(
                "quant state shape {:?} does not match the {expected_shape:?} that config.json \
                 implies for `{weight_name}`",
                packed_state.shape
            ),
        ));
    }
    let numel: usize = expected_shape.iter().product();

    // A required companion tensor, read from whichever shard holds it.
    let need = |suffix: &str| -> Result<(Tensor, PathBuf, String)> {
        let name = format!("{weight_name}{suffix}");
        if !st.has(&name) {
            return Err(Error::weights(
                &qs_file,
                format!(
                    "tensor `{name}` is missing; `{qs_key}` needs it (the checkpoint is \
                     incomplete: re-save it with save_pretrained)"
                ),
            ));
        }
        let (t, file) = st.raw(&name)?;
        Ok((t, file, name))
    };

    let (w, w_file, w_name) = need("")?;
    let packed = u8s(&w, &w_name, &w_file)?;
    if packed.len() != numel.div_ceil(2) {
        return Err(bad(
            &w_file,
            &w_name,
            format!(
                "{} packed bytes (shape {:?}) but shape {expected_shape:?} needs {}",
                packed.len(),
                w.dims(),
                numel.div_ceil(2)
            ),
        ));
    }

    let (qmap, qmap_file, qmap_name) = need(".quant_map")?;
    let code = f32s(&qmap, &qmap_name, &qmap_file)?;
    if code.as_slice() != packed_state.quant_type.code().as_slice() {
        return Err(bad(
            &qmap_file,
            &qmap_name,
            format!(
                "is not bitsandbytes' {} code book; custom code books are not supported",
                packed_state.quant_type
            ),
        ));
    }

    let blocks = numel.div_ceil(packed_state.blocksize.max(1));
    let (am, am_file, am_name) = need(".absmax")?;
    let absmax = match packed_state.nested {
        None => {
            if am.dtype() != DType::F32 {
                return Err(bad(
                    &am_file,
                    &am_name,
                    format!(
                        "is {:?} but a state without nested_* fields needs F32 absmax",
                        am.dtype()
                    ),
                ));
            }
            Absmax::Plain(f32s(&am, &am_name, &am_file)?)
        }
        Some(n) => {
            if am.dtype() != DType::U8 {
                return Err(bad(
                    &am_file,
                    &am_name,
                    format!(
                        "is {:?} but a double-quantised state needs U8 codes",
                        am.dtype()
                    ),
                ));
            }
            let (nmap, nmap_file, nmap_name) = need(".nested_quant_map")?;
            if f32s(&nmap, &nmap_name, &nmap_file)?.as_slice() != dynamic_map_signed().as_slice() {
                return Err(bad(
                    &nmap_file,
                    &nmap_name,
                    "is not bitsandbytes' signed dynamic map; other maps are not supported".into(),
                ));
            }
            let (nabs, nabs_file, nabs_name) = need(".nested_absmax")?;
            let nested_absmax = f32s(&nabs, &nabs_name, &nabs_file)?;
            if n.blocksize != NESTED_BLOCKSIZE {
                return Err(bad(
                    &qs_file,
                    &qs_key,
                    format!(
                        "nested_blocksize {} is not supported (bitsandbytes uses {NESTED_BLOCKSIZE})",
                        n.blocksize
                    ),
                ));
            }
            if nested_absmax.len() != blocks.div_ceil(n.blocksize) {
                return Err(bad(
                    &nabs_file,
                    &nabs_name,
                    format!(
                        "{} values, expected {} for {blocks} blocks",
                        nested_absmax.len(),
                        blocks.div_ceil(n.blocksize)
                    ),
                ));
            }
            Absmax::Nested(NestedAbsmax {
                quantized: u8s(&am, &am_name, &am_file)?,
                absmax: nested_absmax,
                offset: n.offset,
                blocksize: n.blocksize,
            })
        }
    };
    if absmax.len() != blocks {
        return Err(bad(
            &am_file,
            &am_name,
            format!(
                "{} values but {numel} values in blocks of {} need {blocks}",
                absmax.len(),
                packed_state.blocksize
            ),
        ));
    }
    let state = QuantState4 {
        absmax,
        blocksize: packed_state.blocksize,
        quant_type: packed_state.quant_type,
        dtype: packed_state.dtype,
        shape: packed_state.shape,
    };
    Quantized4bit::from_parts(packed, state)
        .map(Some)
        .map_err(|e| bad(&qs_file, &qs_key, e.to_string()))
}

fn u8s(t: &Tensor, name: &str, file: &Path) -> Result<Vec<u8>> {
    if t.dtype() != DType::U8 {
        return Err(Error::weights(
            file,
            format!("tensor `{name}` is {:?}, expected U8", t.dtype()),
        ));
    }
    Ok(t.flatten_all()?.to_vec1::<u8>()?)
}

fn f32s(t: &Tensor, name: &str, file: &Path) -> Result<Vec<f32>> {
    if t.dtype() != DType::F32 {
        return Err(Error::weights(
            file,
            format!("tensor `{name}` is {:?}, expected F32", t.dtype()),
        ));
    }
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// The tensors bitsandbytes serialises for one 4-bit weight, keyed by full name.
pub fn quantized_tensors(weight_name: &str, q: &Quantized4bit) -> Result<Vec<(String, RawTensor)>> {
    let s = q.state();
    let packed_state = PackedQuantState::of(q);
    let mut out = vec![(
        weight_name.to_string(),
        RawTensor::u8(q.packed().to_vec(), vec![q.packed().len(), 1]),
    )];
    let name = |suffix: &str| format!("{weight_name}.{suffix}");
    match &s.absmax {
        Absmax::Plain(a) => out.push((name("absmax"), RawTensor::f32(a, vec![a.len()]))),
        Absmax::Nested(n) => {
            out.push((
                name("absmax"),
                RawTensor::u8(n.quantized.clone(), vec![n.quantized.len()]),
            ));
            out.push((
                name("nested_absmax"),
                RawTensor::f32(&n.absmax, vec![n.absmax.len()]),
            ));
            out.push((
                name("nested_quant_map"),
                RawTensor::f32(dynamic_map_signed(), vec![256]),
            ));
        }
    }
    out.push((
        name("quant_map"),
        RawTensor::f32(s.quant_type.code(), vec![16]),
    ));
    let json = packed_state.to_json().into_bytes();
    let len = json.len();
    out.push((
        name(&packed_state.key_suffix()),
        RawTensor::u8(json, vec![len]),
    ));
    Ok(out)
}

/// A tensor's little-endian bytes, ready for a safetensors file.
#[derive(Debug, Clone)]
pub struct RawTensor {
    /// safetensors dtype.
    pub dtype: safetensors::Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Little-endian data.
    pub data: Vec<u8>,
}

impl RawTensor {
    fn u8(data: Vec<u8>, shape: Vec<usize>) -> Self {
        Self {
            dtype: safetensors::Dtype::U8,
            shape,
            data,
        }
    }

    fn f32(values: &[f32], shape: Vec<usize>) -> Self {
        Self {
            dtype: safetensors::Dtype::F32,
            shape,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// A dense candle tensor (F32, F16 or BF16) in its own dtype.
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let flat = t.flatten_all()?;
        let shape = t.dims().to_vec();
        let (dtype, data) = match t.dtype() {
            DType::F32 => (
                safetensors::Dtype::F32,
                flat.to_vec1::<f32>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            DType::F16 => (
                safetensors::Dtype::F16,
                flat.to_vec1::<half::f16>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            DType::BF16 => (
                safetensors::Dtype::BF16,
                flat.to_vec1::<half::bf16>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            other => {
                return Err(Error::InvalidArgument(format!(
                    "cannot save a {other:?} tensor in a 4-bit checkpoint (F32/F16/BF16 only)"
                )))
            }
        };
        Ok(Self { dtype, shape, data })
    }
}

/// Writes `model` as transformers' `save_pretrained` writes a bitsandbytes 4-bit model:
/// config.json with `quantization_config`, model.safetensors with transformers' key names and
/// the quant-state tensors, and the source folder's tokenizer / generation files.
///
/// Every linear layer of the decoder blocks must be 4-bit (load with
/// [`LoadOptions::load_in_4bit`](crate::model::LoadOptions::load_in_4bit) or from a 4-bit
/// checkpoint); the output head, embeddings and norms are written dense in the model's dtype.
///
/// ```no_run
/// use qlora::model::{LoadOptions, Model};
/// use qlora::quant::{bnb_checkpoint, Quant4Config};
/// let model = Model::load_with("path/to/hf-folder", &LoadOptions::default().load_in_4bit(Quant4Config::qlora()))?;
/// bnb_checkpoint::save_quantized_model(&model, "out/model-nf4")?;
/// # Ok::<(), qlora::Error>(())
/// ```
pub fn save_quantized_model(model: &Model, dir: impl AsRef<Path>) -> Result<()> {
    let source = model.source.path();
    let source_dir = source.is_dir().then_some(source);
    save_quantized_decoder(&model.decoder, source_dir, dir.as_ref())
}

/// [`save_quantized_model`] for a bare decoder; `source_dir` (an HF folder) supplies the base
/// config.json and the tokenizer files, otherwise config.json is written from the decoder's
/// config.
pub fn save_quantized_decoder(
    decoder: &Decoder,
    source_dir: Option<&Path>,
    dir: &Path,
) -> Result<()> {
    let c = &decoder.config;
    let dtype = decoder.dtype();
    let mut tensors: BTreeMap<String, RawTensor> = BTreeMap::new();
    let mut dense = |name: String, t: &Tensor| -> Result<()> {
        tensors.insert(name, RawTensor::from_tensor(&t.to_dtype(dtype)?)?);
        Ok(())
    };
    dense("model.embed_tokens.weight".into(), &decoder.embed_tokens)?;
    dense("model.norm.weight".into(), &decoder.norm)?;
    if !c.tie_word_embeddings {
        // transformers keeps the output head in full precision (get_keys_to_not_convert).
        dense("lm_head.weight".into(), &decoder.lm_head.dense_weight()?)?;
    }
    let mut setting: Option<(QuantType, bool)> = None;
    let mut quantized = Vec::new();
    for (i, layer) in decoder.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        dense(
            format!("{p}.input_layernorm.weight"),
            &layer.input_layernorm,
        )?;
        dense(
            format!("{p}.post_attention_layernorm.weight"),
            &layer.post_attention_layernorm,
        )?;
        for (name, lin) in layer.linears() {
            let prefix = format!("{p}.{name}");
            if let Some(b) = lin.bias() {
                dense(format!("{prefix}.bias"), b)?;
            }
            let q = quant4_of(lin, &prefix)?;
            let s = (
                q.state().quant_type,
                matches!(q.state().absmax, Absmax::Nested(_)),
            );
            match setting {
                None => setting = Some(s),
                Some(first) if first != s => {
                    return Err(Error::InvalidArgument(format!(
                        "`{prefix}` is {}{} but earlier layers are {}{}; a bitsandbytes \
                         checkpoint has one quant type and double-quant setting",
                        s.0,
                        if s.1 { "+dq" } else { "" },
                        first.0,
                        if first.1 { "+dq" } else { "" },
                    )))
                }
                _ => {}
            }
            quantized.extend(quantized_tensors(&format!("{prefix}.weight"), q)?);
        }
    }
    tensors.extend(quantized);
    let (quant_type, double_quant) = setting
        .ok_or_else(|| Error::InvalidArgument("the model has no decoder layers to save".into()))?;
    let qcfg = BnbQuantizationConfig::new(
        Quant4Config {
            quant_type,
            blocksize: 64,
            compress_statistics: double_quant,
        },
        dtype,
    );

    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let config = config_json(decoder, source_dir, &qcfg)?;
    let config_path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&config).expect("JSON values serialise") + "\n";
    std::fs::write(&config_path, text).map_err(|e| Error::io(&config_path, e))?;

    let weights_path = dir.join("model.safetensors");
    let views = tensors
        .iter()
        .map(|(name, t)| {
            safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.data)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::weights(&weights_path, format!("tensor `{name}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    // transformers refuses safetensors files without `format` metadata.
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::tensor::serialize_to_file(views, Some(metadata), &weights_path)
        .map_err(|e| Error::weights(&weights_path, format!("cannot write: {e}")))?;

    if let Some(src) = source_dir {
        if src != dir {
            for f in COPIED_FILES {
                let from = src.join(f);
                if from.is_file() {
                    std::fs::copy(&from, dir.join(f)).map_err(|e| Error::io(&from, e))?;
                }
            }
        }
    }
    Ok(())
}

fn quant4_of<'a>(lin: &'a Linear, prefix: &str) -> Result<&'a Quantized4bit> {
    match lin.weight() {
        LinearWeight::Quant4(q) => Ok(q),
        _ => Err(Error::InvalidArgument(format!(
            "`{prefix}` is stored as {}, not 4-bit; load the model with \
             LoadOptions::load_in_4bit(Quant4Config::qlora()) before saving a 4-bit checkpoint",
            lin.format_name()
        ))),
    }
}

/// The source's config.json (if any) with `quantization_config` and `dtype` set, else one built
/// from the decoder's config.
fn config_json(
    decoder: &Decoder,
    source_dir: Option<&Path>,
    qcfg: &BnbQuantizationConfig,
) -> Result<Value> {
    let c = &decoder.config;
    let mut obj: Map<String, Value> = match source_dir.map(|d| d.join("config.json")) {
        Some(p) if p.is_file() => {
            let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
            match serde_json::from_str(&text) {
                Ok(Value::Object(o)) => o,
                _ => return Err(Error::config(&p, "is not a JSON object")),
            }
        }
        _ => {
            let o = c.to_hf_json(decoder.dtype());
            match o {
                Value::Object(m) => m,
                _ => unreachable!("json! object"),
            }
        }
    };
    let dtype = json!(torch_dtype_name(decoder.dtype()));
    if obj.contains_key("torch_dtype") {
        obj.insert("torch_dtype".into(), dtype.clone());
    }
    obj.insert("dtype".into(), dtype);
    obj.insert("quantization_config".into(), qcfg.to_json());
    Ok(Value::Object(obj))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_float_repr_matches_python() {
        for (x, s) in [
            (0.38351091742515564, "0.38351091742515564"),
            (1e-5, "1e-05"),
            (1.5e-5, "1.5e-05"),
            (0.0001, "0.0001"),
            (123.0, "123.0"),
            (1e16, "1e+16"),
            (1.2345e17, "1.2345e+17"),
            (-0.5, "-0.5"),
            (0.0, "0.0"),
            (6.0, "6.0"),
            (1234567890123456.0, "1234567890123456.0"),
        ] {
            assert_eq!(python_float_repr(x), s, "{x}");
        }
    }

    #[test]
    fn packed_state_json_round_trips_and_matches_bitsandbytes_bytes() {
        let bnb = r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [64, 128], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.3743133544921875}"#;
        let s = PackedQuantState::parse(bnb.as_bytes()).unwrap();
        assert_eq!(s.shape, vec![64, 128]);
        assert_eq!(s.nested.unwrap().offset, 0.374_313_35);
        assert_eq!(s.to_json(), bnb);
        let plain =
            r#"{"quant_type": "fp4", "blocksize": 64, "dtype": "bfloat16", "shape": [32, 64]}"#;
        let s = PackedQuantState::parse(plain.as_bytes()).unwrap();
        assert_eq!(
            (s.quant_type, s.dtype, s.nested),
            (QuantType::Fp4, DType::BF16, None)
        );
        assert_eq!(s.to_json(), plain);
    }

    #[test]
    fn bad_quant_state_json_names_the_field() {
        let e = |j: &str| PackedQuantState::parse(j.as_bytes()).unwrap_err();
        assert!(e("{not json").contains("not valid JSON"));
        assert!(
            e(r#"{"quant_type": "nf4", "dtype": "float32", "shape": [2]}"#)
                .contains("has no `blocksize`")
        );
        assert!(
            e(r#"{"quant_type": "int4", "blocksize": 64, "dtype": "float32", "shape": [2]}"#)
                .contains("int4")
        );
        assert!(
            e(r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "int8", "shape": [2]}"#)
                .contains("`dtype`")
        );
        assert!(e(
            r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [2], "nested_offset": 0.1}"#
        )
        .contains("all three"));
    }

    #[test]
    fn quantization_config_round_trips_and_rejects_others() {
        let c = BnbQuantizationConfig::new(Quant4Config::qlora(), DType::BF16);
        let back = BnbQuantizationConfig::from_json(&c.to_json()).unwrap();
        assert_eq!(back, c);
        let e = BnbQuantizationConfig::from_json(&json!({"quant_method": "gptq"})).unwrap_err();
        assert!(e.contains("gptq"), "{e}");
        let e = BnbQuantizationConfig::from_json(
            &json!({"quant_method": "bitsandbytes", "load_in_8bit": true}),
        )
        .unwrap_err();
        assert!(e.contains("8-bit"), "{e}");
        // transformers' defaults: fp4, no double quant, f32 compute.
        let d = BnbQuantizationConfig::from_json(&json!({"load_in_4bit": true})).unwrap();
        assert_eq!(d.quant, Quant4Config::default());
        assert_eq!(d.compute_dtype, DType::F32);
    }

    #[test]
    fn serialised_tensors_have_bitsandbytes_names_and_shapes() {
        let v: Vec<f32> = (0..64 * 8).map(|i| (i as f32 * 0.37).sin()).collect();
        let q = Quantized4bit::quantize_values(&v, &[8, 64], DType::F32, Quant4Config::qlora())
            .unwrap();
        let t = quantized_tensors("m.weight", &q).unwrap();
        let names: Vec<(&str, &[usize])> = t
            .iter()
            .map(|(n, r)| (n.as_str(), r.shape.as_slice()))
            .collect();
        assert_eq!(
            names,
            vec![
                ("m.weight", &[256, 1][..]),
                ("m.weight.absmax", &[8][..]),
                ("m.weight.nested_absmax", &[1][..]),
                ("m.weight.nested_quant_map", &[256][..]),
                ("m.weight.quant_map", &[16][..]),
                (
                    "m.weight.quant_state.bitsandbytes__nf4",
                    &[t[5].1.data.len()][..]
                ),
            ]
        );
    }
}
