//! Locating reference data and the default model for integration tests. Missing data is a
//! test failure with instructions, never a silent pass.
#![allow(dead_code)]

use std::path::PathBuf;

/// Where `make reference` writes the Python stack's outputs.
pub fn reference_dir() -> PathBuf {
    let dir = std::env::var_os("QLORA_REFERENCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/reference"));
    assert!(
        dir.join("manifest.json").is_file(),
        "reference data missing in {}: run `make reference` first",
        dir.display()
    );
    dir
}

/// The default model's GGUF file.
pub fn default_gguf() -> PathBuf {
    let p = std::env::var_os("QLORA_DEFAULT_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    assert!(
        p.is_file(),
        "default model missing at {}: run `make fetch-model`",
        p.display()
    );
    p
}

/// Largest absolute difference between two f32 slices of equal length.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff_t(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
        .expect("tensors of the same shape")
}

/// The reference venv's Python (`make reference` builds it).
pub fn ref_python() -> PathBuf {
    let venv = std::env::var_os("QLORA_REF_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
                .join(".cache/qlora/ref-venv")
        });
    let py = venv.join("bin/python");
    assert!(
        py.is_file(),
        "reference venv missing at {}: run `make reference`",
        venv.display()
    );
    py
}
