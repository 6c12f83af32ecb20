//! Training checkpoints that survive a crash.
//!
//! A checkpoint is a folder `checkpoint-{step}` holding the adapter in PEFT's format
//! (`adapter_config.json`, `adapter_model.safetensors` — loadable by PEFT or
//! [`PeftModel::from_pretrained`]), the optimiser state (`optimizer.safetensors`) and
//! `trainer_state.json` (step, data position, dropout RNG states, history, early-stopping state).
//!
//! Writes are atomic: everything goes into a hidden temporary folder, every file is fsynced, then
//! the folder is renamed into place and its parent fsynced. A process killed at any moment leaves
//! either no `checkpoint-{step}` or a complete one; stale temporary folders are removed on the
//! next save or resume.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::history::StepRecord;
use crate::lora::model::{ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE};
use crate::lora::PeftModel;
use crate::{Error, Result};

/// The optimiser state file inside a checkpoint.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The trainer state file inside a checkpoint (written last).
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";
const PREFIX: &str = "checkpoint-";
const TMP_PREFIX: &str = ".tmp-checkpoint-";

/// What must agree between a checkpoint and the run resuming from it for the data order and the
/// schedule to continue where they stopped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunFingerprint {
    /// Training examples.
    pub num_examples: usize,
    /// Micro-batch size.
    pub batch_size: usize,
    /// Micro-batches per optimiser step.
    pub gradient_accumulation_steps: usize,
    /// Shuffling seed.
    pub seed: u64,
    /// Optimiser steps the run was planned for.
    pub total_steps: usize,
    /// Trainable parameters (names in order).
    pub num_parameters: usize,
}

/// Everything besides tensors that a resumed run needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimiser steps taken.
    pub global_step: usize,
    /// The epoch the next micro-batch belongs to (0-based).
    pub epoch: usize,
    /// Micro-batches of `epoch` already consumed.
    pub micro_batch_in_epoch: usize,
    /// Dropout RNG state of every adapter, per decoder layer.
    pub adapter_rng_states: Vec<Vec<Option<u64>>>,
    /// One record per optimiser step so far.
    pub history: Vec<StepRecord>,
    /// Best evaluation loss so far and its step.
    pub best_eval: Option<(f64, usize)>,
    /// Evaluations since the best one (early stopping).
    pub evals_without_improvement: usize,
    /// Real (non-padding) tokens processed.
    pub tokens_seen: u64,
    /// Wall time spent training before this checkpoint, in seconds.
    pub train_seconds: f64,
    /// Must match the resuming run.
    pub fingerprint: RunFingerprint,
}

/// A checkpoint read back from disk.
#[derive(Debug)]
pub struct LoadedCheckpoint {
    /// Its folder.
    pub dir: PathBuf,
    /// Trainer state.
    pub state: TrainerState,
    /// AdamW state (see [`super::AdamW::state_dict`]).
    pub optimizer: Vec<(String, Tensor)>,
    /// Adapter matrices by PEFT's saved key (`base_model.model.….lora_A.weight`).
    pub adapter: HashMap<String, Tensor>,
}

fn checkpoint_err(path: &Path, message: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn fsync(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

/// The step of a `checkpoint-{step}` folder name.
fn step_of(name: &str) -> Option<usize> {
    name.strip_prefix(PREFIX)?.parse().ok()
}

/// Complete checkpoints in `output_dir`, oldest first.
pub fn list_checkpoints(output_dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    if !output_dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(output_dir).map_err(|e| Error::io(output_dir, e))? {
        let entry = entry.map_err(|e| Error::io(output_dir, e))?;
        let name = entry.file_name();
        if let Some(step) = name.to_str().and_then(step_of) {
            if entry.path().join(TRAINER_STATE_FILE).is_file() {
                out.push((step, entry.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The newest complete checkpoint in `output_dir`, if any.
pub fn latest_checkpoint(output_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(list_checkpoints(output_dir)?.pop().map(|(_, p)| p))
}

/// Removes temporary folders left by a save that was interrupted.
fn remove_stale_temporaries(output_dir: &Path) -> Result<()> {
    if !output_dir.is_dir() {
        return Ok(());
    }
    for entry in std::fs::read_dir(output_dir).map_err(|e| Error::io(output_dir, e))? {
        let entry = entry.map_err(|e| Error::io(output_dir, e))?;
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(TMP_PREFIX))
        {
            std::fs::remove_dir_all(entry.path()).map_err(|e| Error::io(entry.path(), e))?;
        }
    }
    Ok(())
}

/// Writes `checkpoint-{step}` atomically and returns its path.
pub(crate) fn save_checkpoint(
    output_dir: &Path,
    peft: &PeftModel,
    optimizer: &[(String, Tensor)],
    state: &TrainerState,
) -> Result<PathBuf> {
    std::fs::create_dir_all(output_dir).map_err(|e| Error::io(output_dir, e))?;
    remove_stale_temporaries(output_dir)?;
    let step = state.global_step;
    let tmp = output_dir.join(format!("{TMP_PREFIX}{step}-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;

    peft.save_adapter(peft.active_adapter(), &tmp)?;
    let optimizer_path = tmp.join(OPTIMIZER_FILE);
    let tensors: HashMap<String, Tensor> = optimizer.iter().cloned().collect();
    candle_core::safetensors::save(&tensors, &optimizer_path)
        .map_err(|e| checkpoint_err(&optimizer_path, e.to_string()))?;
    let state_path = tmp.join(TRAINER_STATE_FILE);
    let json = serde_json::to_string_pretty(state)
        .map_err(|e| checkpoint_err(&state_path, e.to_string()))?;
    std::fs::write(&state_path, json).map_err(|e| Error::io(&state_path, e))?;
    for file in [
        ADAPTER_CONFIG_FILE,
        ADAPTER_WEIGHTS_FILE,
        OPTIMIZER_FILE,
        TRAINER_STATE_FILE,
    ] {
        fsync(&tmp.join(file))?;
    }
    fsync(&tmp)?;

    let target = output_dir.join(format!("{PREFIX}{step}"));
    if target.exists() {
        // A rerun of the same step (e.g. a run restarted without resuming) replaces it.
        std::fs::remove_dir_all(&target).map_err(|e| Error::io(&target, e))?;
    }
    std::fs::rename(&tmp, &target).map_err(|e| Error::io(&target, e))?;
    fsync(output_dir)?;
    Ok(target)
}

/// Keeps the newest `limit` checkpoints (and `keep`, the best one, if given); removes the rest.
pub(crate) fn rotate_checkpoints(
    output_dir: &Path,
    limit: usize,
    keep: Option<usize>,
) -> Result<()> {
    let all = list_checkpoints(output_dir)?;
    let excess = all.len().saturating_sub(limit);
    for (step, path) in all.into_iter().take(excess) {
        if Some(step) != keep {
            std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}

/// Reads a checkpoint folder, checking that every part is present and readable.
pub fn load_checkpoint(dir: &Path, device: &Device) -> Result<LoadedCheckpoint> {
    if !dir.is_dir() {
        return Err(checkpoint_err(
            dir,
            "not a folder (pass a `checkpoint-N` folder or the run's output folder)",
        ));
    }
    let state_path = dir.join(TRAINER_STATE_FILE);
    let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
    let state: TrainerState = serde_json::from_str(&text).map_err(|e| {
        checkpoint_err(
            &state_path,
            format!("not a trainer state written by qlora ({e})"),
        )
    })?;
    let read = |name: &str| -> Result<HashMap<String, Tensor>> {
        let path = dir.join(name);
        if !path.is_file() {
            return Err(checkpoint_err(dir, format!("`{name}` is missing")));
        }
        candle_core::safetensors::load(&path, device).map_err(|e| {
            checkpoint_err(
                &path,
                format!(
                    "unreadable ({}); resume from an earlier checkpoint",
                    crate::model::weights::root_cause(&e)
                ),
            )
        })
    };
    let optimizer = read(OPTIMIZER_FILE)?.into_iter().collect();
    let adapter = read(ADAPTER_WEIGHTS_FILE)?;
    Ok(LoadedCheckpoint {
        dir: dir.to_path_buf(),
        state,
        optimizer,
        adapter,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_names_parse() {
        assert_eq!(step_of("checkpoint-12"), Some(12));
        assert_eq!(step_of("checkpoint-x"), None);
        assert_eq!(step_of(".tmp-checkpoint-3-99"), None);
    }
}
