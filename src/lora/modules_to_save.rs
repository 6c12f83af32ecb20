//! Modules trained in full beside the adapters — PEFT's `modules_to_save`.
//!
//! PEFT wraps each such module in a `ModulesToSaveWrapper`: the original stays untouched and
//! every adapter gets its own trainable copy, used while that adapter is active. Here the copy
//! is a set of variables (`weight`, and `bias` for a linear layer with one) that
//! [`super::PeftModel`] swaps into the decoder in place of the original's stored parameters.

use candle_core::{Tensor, Var};

use crate::model::{LinearWeight, ModuleState};
use crate::{Error, Result};

/// One adapter's trainable copy of one module.
#[derive(Debug, Clone)]
pub struct SavedModule {
    /// Whether the module is a linear layer (else an embedding table or a norm: one `weight`).
    linear: bool,
    /// `("weight", var)` and, for a linear layer with a bias, `("bias", var)`.
    params: Vec<(&'static str, Var)>,
}

impl SavedModule {
    /// A trainable copy of `original`, whose parameters as dense tensors are `dense`
    /// ([`crate::model::Decoder::module_parameters`]).
    pub(crate) fn copy_of(
        original: &ModuleState,
        dense: Vec<(&'static str, Tensor)>,
    ) -> Result<Self> {
        let params = dense
            .into_iter()
            // `copy` so the variable owns its storage: training must not write into the base.
            .map(|(name, t)| Ok((name, Var::from_tensor(&t.copy()?)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            linear: matches!(original, ModuleState::Linear { .. }),
            params,
        })
    }

    /// A copy holding `loaded` values (from an adapter file), checked against the original's
    /// parameter names and shapes; values take the original's dtype.
    pub(crate) fn from_loaded(
        path: &str,
        original: &ModuleState,
        dense: Vec<(&'static str, Tensor)>,
        loaded: &std::collections::BTreeMap<String, Tensor>,
    ) -> std::result::Result<Self, String> {
        let mut params = Vec::new();
        for (name, base) in dense {
            let key = format!("base_model.model.{path}.{name}");
            let t = loaded.get(name).ok_or_else(|| {
                format!("modules_to_save names `{path}` but the file has no `{key}`")
            })?;
            if t.dims() != base.dims() {
                return Err(format!(
                    "tensor `{key}` has shape {:?}, the model's module needs {:?}",
                    t.dims(),
                    base.dims()
                ));
            }
            let t = t.to_dtype(base.dtype()).map_err(|e| e.to_string())?;
            params.push((name, Var::from_tensor(&t).map_err(|e| e.to_string())?));
        }
        if let Some(extra) = loaded.keys().find(|k| !params.iter().any(|(n, _)| n == k)) {
            return Err(format!(
                "tensor `base_model.model.{path}.{extra}` is not a parameter of module `{path}`"
            ));
        }
        Ok(Self {
            linear: matches!(original, ModuleState::Linear { .. }),
            params,
        })
    }

    /// The trainable parameters, named as transformers names them.
    pub fn parameters(&self) -> &[(&'static str, Var)] {
        &self.params
    }

    /// Number of values held.
    pub fn num_parameters(&self) -> usize {
        self.params.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// The copy as the decoder stores a module; `detached` gives plain tensors (for merging)
    /// instead of the variables.
    pub(crate) fn state(&self, detached: bool) -> Result<ModuleState> {
        let get = |name: &str| -> Option<Tensor> {
            self.params.iter().find(|(n, _)| *n == name).map(|(_, v)| {
                if detached {
                    v.as_tensor().detach()
                } else {
                    v.as_tensor().clone()
                }
            })
        };
        let weight = get("weight").ok_or_else(|| {
            Error::InvalidArgument("a module trained in full has no weight".into())
        })?;
        Ok(if self.linear {
            ModuleState::Linear {
                weight: LinearWeight::Dense(weight),
                bias: get("bias"),
            }
        } else {
            ModuleState::Tensor(weight)
        })
    }
}

/// PEFT's in-memory parameter name of a module trained in full:
/// `base_model.model.lm_head.modules_to_save.default.weight`.
pub fn in_memory_name(path: &str, adapter: &str, param: &str) -> String {
    format!("base_model.model.{path}.modules_to_save.{adapter}.{param}")
}

/// The key PEFT's `save_pretrained` writes for an in-memory parameter name of adapter
/// `adapter`: the adapter name (and `modules_to_save`) stripped.
///
/// ```
/// use qlora::lora::saved_key;
/// assert_eq!(
///     saved_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", "default"),
///     "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
/// );
/// assert_eq!(
///     saved_key("base_model.model.lm_head.modules_to_save.default.weight", "default"),
///     "base_model.model.lm_head.weight"
/// );
/// ```
pub fn saved_key(name: &str, adapter: &str) -> String {
    let stripped = name.replace(&format!(".modules_to_save.{adapter}."), ".");
    if stripped != name {
        return stripped;
    }
    name.replace(&format!(".{adapter}.weight"), ".weight")
}
