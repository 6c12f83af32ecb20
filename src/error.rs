//! The crate's one error type. Every variant that comes from user input names the file, field or
//! line at fault and says what to do about it.

use std::path::{Path, PathBuf};

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in qlora.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A configuration file (config.json, generation_config.json, GGUF metadata) is missing a
    /// field or holds a wrong value.
    #[error("{}: {message}", path.display())]
    Config { path: PathBuf, message: String },

    /// A weights file (safetensors, GGUF) is unreadable, truncated or lacks a tensor.
    #[error("{}: {message}", path.display())]
    Weights { path: PathBuf, message: String },

    /// A tokenizer could not be built or used.
    #[error("tokenizer ({source_name}): {message}")]
    Tokenizer {
        source_name: String,
        message: String,
    },

    /// A chat template failed to parse or render.
    #[error("chat template: {0}")]
    Template(String),

    /// The model could not be found where the user pointed.
    #[error("model `{spec}` not found: {hint}")]
    ModelNotFound { spec: String, hint: String },

    /// A dataset file or row is unreadable or does not fit the expected format; `source_name` is
    /// the file (or the name a DataFrame was given), the message names the line/row and field.
    #[error("dataset {source_name}: {message}")]
    Data {
        source_name: String,
        message: String,
    },

    /// A caller passed an argument that cannot work (wrong shape, bad range, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// Training produced a NaN or infinite loss or gradient norm; nothing was updated at that
    /// step and the last checkpoint is intact.
    #[error("{0}")]
    NonFinite(#[from] crate::train::NonFinite),

    /// A training checkpoint is unreadable, incomplete, or made for another run.
    #[error("checkpoint {}: {message}", path.display())]
    Checkpoint { path: PathBuf, message: String },

    /// An LM's completion did not fit the signature's output fields (after the JSON fallback).
    #[error("{0}")]
    AdapterParse(Box<crate::prompt::AdapterParseError>),

    /// A tensor operation failed inside candle.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// A configuration error in `path`.
    pub fn config(path: impl AsRef<Path>, message: impl Into<String>) -> Self {
        Error::Config {
            path: path.as_ref().to_path_buf(),
            message: message.into(),
        }
    }

    /// A weights error in `path`.
    pub fn weights(path: impl AsRef<Path>, message: impl Into<String>) -> Self {
        Error::Weights {
            path: path.as_ref().to_path_buf(),
            message: message.into(),
        }
    }

    /// A dataset error in `source_name` (a file or a DataFrame's name).
    pub fn data(source_name: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Data {
            source_name: source_name.into(),
            message: message.into(),
        }
    }

    /// A tokenizer error; `source_name` is the file (or "GGUF metadata of <file>").
    pub fn tokenizer(source_name: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Tokenizer {
            source_name: source_name.into(),
            message: message.into(),
        }
    }
}
