//! LoRA adapters with PEFT's semantics: configuration ([`LoraConfig`]), the layer math
//! ([`LoraLayer`]), and model surgery, saving, loading and merging ([`PeftModel`]).
//!
//! ```no_run
//! use qlora::lora::{setup_qlora, LoraConfig};
//! use qlora::model::Model;
//! // The seed's recipe: frozen 4-bit base, r=16, alpha=32 on q_proj/v_proj, dropout 0.05.
//! let peft = setup_qlora(Model::load("default")?, &LoraConfig::qlora())?;
//! peft.print_trainable_parameters();
//! peft.save_pretrained("my-adapter")?;
//! # Ok::<(), qlora::Error>(())
//! ```

pub mod config;
pub mod layer;
pub mod model;
pub mod modules_to_save;

pub use config::{InitLoraWeights, LoraConfig, TargetModules};
pub use layer::{LoraLayer, LoraWeights};
pub use model::{get_peft_model, PeftModel, DEFAULT_ADAPTER};
pub use modules_to_save::{saved_key, SavedModule};

use crate::model::Model;
use crate::Result;

/// `prepare_model_for_kbit_training` + `get_peft_model`: the base is frozen (only adapter
/// matrices are ever trainable here), norms compute in f32, gradient checkpointing is on (as
/// `prepare_model_for_kbit_training` turns it on by default), and the adapters are put in
/// training mode.
pub fn setup_qlora(model: Model, config: &LoraConfig) -> Result<PeftModel> {
    let mut peft = get_peft_model(model, config)?;
    peft.set_gradient_checkpointing(true);
    peft.train();
    Ok(peft)
}
