//! Model surgery: attaching LoRA layers to a [`Model`]'s linear layers, counting and exposing
//! trainable parameters, saving and loading PEFT-format adapters, and merging.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Tensor, Var};

use super::config::LoraConfig;
use super::layer::{LoraLayer, LoraWeights, SplitMix64};
use super::modules_to_save::{in_memory_name, SavedModule};
use crate::model::linear::{LinearAdapter, LinearWeight};
use crate::model::{Model, ModuleState};
use crate::{Error, Result};

/// PEFT's name for the first adapter.
pub const DEFAULT_ADAPTER: &str = "default";

/// The file names PEFT uses.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// A base model with LoRA adapters attached — PEFT's `PeftModel`.
///
/// Only the adapters' A and B matrices are trainable; the base stays frozen (and quantised,
/// when it was).
#[derive(Debug)]
pub struct PeftModel {
    model: Model,
    /// Module path (`model.layers.3.self_attn.q_proj`) → its LoRA layer.
    layers: BTreeMap<String, Arc<LoraLayer>>,
    configs: BTreeMap<String, LoraConfig>,
    active: String,
    seed: u64,
    /// Loaded for inference only (PEFT's `is_trainable=False`): nothing is trainable.
    frozen: bool,
    /// Recompute block activations in the backward pass instead of storing them.
    gradient_checkpointing: bool,
    /// Adapter → module path → its trainable full copy (`modules_to_save`).
    saved: BTreeMap<String, BTreeMap<String, SavedModule>>,
    /// The base's own parameters of every module some adapter trains in full.
    originals: BTreeMap<String, ModuleState>,
    /// Adapters switched on (`disable_adapters` turns them off).
    enabled: bool,
}

/// `module path → (layer index)` for every adaptable linear layer of the decoder.
fn module_paths(model: &Model) -> Vec<(String, usize)> {
    model
        .decoder
        .layers
        .iter()
        .enumerate()
        .flat_map(|(i, l)| {
            l.linears()
                .into_iter()
                .map(move |(name, _)| (format!("model.layers.{i}.{name}"), i))
        })
        .collect()
}

/// Wraps `model` with a fresh adapter named `default` — PEFT's `get_peft_model`.
///
/// ```no_run
/// use qlora::lora::{get_peft_model, LoraConfig};
/// use qlora::model::Model;
/// let peft = get_peft_model(Model::load("default")?, &LoraConfig::qlora())?;
/// peft.print_trainable_parameters(); // trainable params: 921,600 || all params: ...
/// # Ok::<(), qlora::Error>(())
/// ```
pub fn get_peft_model(model: Model, config: &LoraConfig) -> Result<PeftModel> {
    let mut peft = PeftModel::wrap(model, 0);
    peft.add_adapter(DEFAULT_ADAPTER, config)?;
    Ok(peft)
}

impl PeftModel {
    fn wrap(model: Model, seed: u64) -> Self {
        Self {
            model,
            layers: BTreeMap::new(),
            configs: BTreeMap::new(),
            active: DEFAULT_ADAPTER.to_string(),
            seed,
            frozen: false,
            gradient_checkpointing: false,
            saved: BTreeMap::new(),
            originals: BTreeMap::new(),
            enabled: true,
        }
    }

    /// Like [`get_peft_model`], with `seed` driving A's initialisation and dropout masks.
    pub fn new_seeded(model: Model, config: &LoraConfig, seed: u64) -> Result<Self> {
        let mut peft = Self::wrap(model, seed);
        peft.add_adapter(DEFAULT_ADAPTER, config)?;
        Ok(peft)
    }

    /// The base model with adapters attached (its forward includes them).
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The configuration of adapter `name`.
    pub fn config(&self, name: &str) -> Option<&LoraConfig> {
        self.configs.get(name)
    }

    /// Names of all adapters.
    pub fn adapter_names(&self) -> Vec<String> {
        self.configs.keys().cloned().collect()
    }

    /// The adapter that trains and runs.
    pub fn active_adapter(&self) -> &str {
        &self.active
    }

    /// Module paths that carry adapters.
    pub fn adapted_modules(&self) -> impl Iterator<Item = &str> {
        self.layers.keys().map(String::as_str)
    }

    /// Modules the active adapter trains in full (`modules_to_save`), by path.
    pub fn saved_modules(&self) -> impl Iterator<Item = (&str, &SavedModule)> {
        self.saved
            .get(&self.active)
            .into_iter()
            .flatten()
            .map(|(p, m)| (p.as_str(), m))
    }

    /// Puts into the decoder, for every module some adapter trains in full, the active
    /// adapter's copy — or the original when that adapter has none or adapters are disabled.
    fn sync_saved_modules(&mut self) -> Result<()> {
        let copies = self.saved.get(&self.active);
        for (path, original) in &self.originals {
            let state = match copies.and_then(|c| c.get(path)) {
                Some(copy) if self.enabled => copy.state(false)?,
                _ => original.clone(),
            };
            self.model.decoder.set_module_state(path, state)?;
        }
        Ok(())
    }

    /// The leaf modules `config.modules_to_save` selects (PEFT's suffix rule), checked: each
    /// name must select something, and nothing may also carry a LoRA adapter of `config`.
    fn modules_to_save_paths(
        &self,
        config: &LoraConfig,
        lora_targets: &[String],
    ) -> Result<Vec<String>> {
        let leaves = self.model.decoder.leaf_modules();
        let mut out = Vec::new();
        for name in config.modules_to_save.iter().flatten() {
            let matched: Vec<&String> = leaves
                .iter()
                .filter(|p| p.ends_with(name.as_str()))
                .collect();
            if matched.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "modules_to_save: `{name}` matches no module of the model; name a module that holds \
                     parameters: embed_tokens, lm_head, norm, input_layernorm, \
                     post_attention_layernorm, or a linear layer such as k_proj"
                )));
            }
            for path in matched {
                if lora_targets.contains(path) {
                    return Err(Error::InvalidArgument(format!(
                        "`{path}` is both a LoRA target (target_modules) and in modules_to_save \
                         (`{name}`); a module either gets an adapter or is trained in full"
                    )));
                }
                if !out.contains(path) {
                    out.push(path.clone());
                }
            }
        }
        Ok(out)
    }

    /// Records the base's parameters of `paths` (once) and puts every original back into the
    /// decoder, so copies are made from the base and never from another adapter's copy.
    fn restore_originals(&mut self, paths: &[String]) -> Result<()> {
        for path in paths {
            if !self.originals.contains_key(path) {
                let state = self.model.decoder.module_state(path).ok_or_else(|| {
                    Error::InvalidArgument(format!("the model has no module `{path}`"))
                })?;
                self.originals.insert(path.clone(), state);
            }
        }
        for (path, original) in &self.originals {
            self.model
                .decoder
                .set_module_state(path, original.clone())?;
        }
        Ok(())
    }

    /// The LoRA layer attached to a module path, if any.
    pub fn lora_layer(&self, path: &str) -> Option<&Arc<LoraLayer>> {
        self.layers.get(path)
    }

    fn layer_for(&mut self, path: &str) -> Result<Arc<LoraLayer>> {
        if let Some(l) = self.layers.get(path) {
            return Ok(l.clone());
        }
        let (idx, name) = parse_path(path).ok_or_else(|| {
            Error::InvalidArgument(format!("`{path}` is not a decoder linear layer"))
        })?;
        let device = self.model.device().clone();
        let seed = self.seed ^ (self.layers.len() as u64 + 1).wrapping_mul(0x9E37_79B9);
        let block = self.model.decoder.layers.get_mut(idx).ok_or_else(|| {
            Error::InvalidArgument(format!("`{path}`: the model has no layer {idx}"))
        })?;
        let (_, lin) = block
            .linears_mut()
            .into_iter()
            .find(|(n, _)| *n == name)
            .ok_or_else(|| Error::InvalidArgument(format!("`{path}`: no such linear layer")))?;
        let (out_f, in_f) = lin.shape();
        let layer = Arc::new(LoraLayer::new(in_f, out_f, &device, seed));
        lin.set_adapter(Some(layer.clone() as Arc<dyn LinearAdapter>));
        self.layers.insert(path.to_string(), layer.clone());
        Ok(layer)
    }

    /// Adds a new adapter and makes it the active one.
    pub fn add_adapter(&mut self, name: &str, config: &LoraConfig) -> Result<()> {
        config.validate()?;
        if self.configs.contains_key(name) {
            return Err(Error::InvalidArgument(format!(
                "adapter `{name}` already exists"
            )));
        }
        let targets: Vec<String> = module_paths(&self.model)
            .into_iter()
            .filter(|(p, i)| config.targets(p, *i))
            .map(|(p, _)| p)
            .collect();
        if targets.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "target_modules {:?} match no linear layer of the model (its layers are named \
                 like model.layers.0.self_attn.q_proj, ...mlp.down_proj)",
                config.target_modules
            )));
        }
        // New adapter matrices must not share ids with the base's tensors (notebooks).
        self.model.decoder.reserve_tensor_ids();
        let to_save = self.modules_to_save_paths(config, &targets)?;
        let mut rng = SplitMix64::new(self.seed.wrapping_add(self.configs.len() as u64 * 7919));
        for path in &targets {
            self.layer_for(path)?.add(name, config, &mut rng)?;
        }
        if !to_save.is_empty() {
            self.restore_originals(&to_save)?;
            let mut copies = BTreeMap::new();
            for path in &to_save {
                let dense = self.model.decoder.module_parameters(path)?;
                copies.insert(
                    path.clone(),
                    SavedModule::copy_of(&self.originals[path], dense)?,
                );
            }
            self.saved.insert(name.to_string(), copies);
        }
        let mut cfg = config.clone();
        cfg.base_model_name_or_path
            .get_or_insert_with(|| self.model.name.clone());
        self.configs.insert(name.to_string(), cfg);
        self.set_adapter(name)
    }

    /// Makes `name` the only active adapter.
    pub fn set_adapter(&mut self, name: &str) -> Result<()> {
        if !self.configs.contains_key(name) {
            return Err(Error::InvalidArgument(format!(
                "no adapter named `{name}` (have: {:?})",
                self.adapter_names()
            )));
        }
        for l in self.layers.values() {
            l.set_active(&[name.to_string()]);
        }
        self.active = name.to_string();
        self.sync_saved_modules()
    }

    /// Removes adapter `name`.
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        if self.configs.remove(name).is_none() {
            return Err(Error::InvalidArgument(format!("no adapter named `{name}`")));
        }
        for l in self.layers.values() {
            l.remove(name);
        }
        self.saved.remove(name);
        self.sync_saved_modules()
    }

    /// Runs the base model alone (originals in place of modules trained in full) until
    /// [`PeftModel::enable_adapters`].
    pub fn disable_adapters(&mut self) {
        self.layers.values().for_each(|l| l.set_enabled(false));
        self.enabled = false;
        // Shapes were checked when each copy was made, so swapping cannot fail.
        self.sync_saved_modules()
            .expect("modules_to_save copies match their originals");
    }

    /// Undoes [`PeftModel::disable_adapters`].
    pub fn enable_adapters(&mut self) {
        self.layers.values().for_each(|l| l.set_enabled(true));
        self.enabled = true;
        self.sync_saved_modules()
            .expect("modules_to_save copies match their originals");
    }

    /// Training mode: adapter dropout on.
    pub fn train(&self) {
        self.layers.values().for_each(|l| l.set_training(true));
    }

    /// Evaluation mode: adapter dropout off.
    pub fn eval(&self) {
        self.layers.values().for_each(|l| l.set_training(false));
    }

    /// Turns gradient checkpointing on or off (transformers' `gradient_checkpointing_enable`).
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.gradient_checkpointing = on;
    }

    /// Whether gradient checkpointing is on.
    pub fn is_gradient_checkpointing(&self) -> bool {
        self.gradient_checkpointing
    }

    /// One forward and backward pass: `loss_fn` maps final-norm hidden states to a scalar
    /// loss. With gradient checkpointing on, block activations are recomputed during the
    /// backward pass instead of being stored (same gradients, less memory).
    pub fn forward_backward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        loss_fn: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, candle_core::backprop::GradStore)> {
        let decoder = &self.model.decoder;
        if self.gradient_checkpointing {
            decoder.checkpointed_backward(input_ids, attention_mask, loss_fn)
        } else {
            let hidden = decoder.hidden_states(input_ids, attention_mask, None)?;
            let loss = loss_fn(&hidden)?;
            let grads = loss.backward()?;
            Ok((loss, grads))
        }
    }

    /// Logits for every position (see [`crate::model::Decoder::forward`]).
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        self.model.decoder.forward(input_ids, attention_mask, None)
    }

    /// The active adapter's trainable matrices with PEFT's in-memory names
    /// (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight`), in layer order.
    pub fn trainable_parameters(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        if self.frozen {
            return out;
        }
        for (path, _) in module_paths(&self.model) {
            if let Some(w) = self.layers.get(&path).and_then(|l| l.weights(&self.active)) {
                let p = format!("base_model.model.{path}");
                out.push((format!("{p}.lora_A.{}.weight", self.active), w.a));
                out.push((format!("{p}.lora_B.{}.weight", self.active), w.b));
            }
        }
        for (path, module) in self.saved_modules() {
            for (param, var) in module.parameters() {
                out.push((in_memory_name(path, &self.active, param), var.clone()));
            }
        }
        out
    }

    /// `(trainable, all)` parameter counts as PEFT counts them (4-bit weights count as their
    /// unpacked number; every adapter counts toward "all").
    pub fn parameter_counts(&self) -> (usize, usize) {
        let trainable: usize = self
            .trainable_parameters()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum();
        let adapters: usize = self
            .layers
            .values()
            .flat_map(|l| {
                l.adapter_names()
                    .into_iter()
                    .filter_map(|n| l.weights(&n))
                    .map(|w| w.a.elem_count() + w.b.elem_count())
                    .collect::<Vec<_>>()
            })
            .sum();
        // PEFT counts each adapter's full copy beside the original it keeps.
        let copies: usize = self
            .saved
            .values()
            .flat_map(|m| m.values())
            .map(SavedModule::num_parameters)
            .sum();
        (
            trainable,
            self.model.decoder.num_parameters() + adapters + copies,
        )
    }

    /// PEFT's `print_trainable_parameters()` line.
    pub fn trainable_parameters_line(&self) -> String {
        let (t, all) = self.parameter_counts();
        format!(
            "trainable params: {} || all params: {} || trainable%: {:.4}",
            crate::display::thousands(t),
            crate::display::thousands(all),
            100.0 * t as f64 / all.max(1) as f64
        )
    }

    /// Prints [`PeftModel::trainable_parameters_line`].
    pub fn print_trainable_parameters(&self) {
        println!("{}", self.trainable_parameters_line());
    }

    /// Saves every adapter in PEFT's format: `default` into `dir`, others into `dir/<name>/`
    /// (`adapter_config.json` + `adapter_model.safetensors`).
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        for name in self.configs.keys() {
            let target = if name == DEFAULT_ADAPTER {
                dir.as_ref().to_path_buf()
            } else {
                dir.as_ref().join(name)
            };
            self.save_adapter(name, &target)?;
        }
        Ok(())
    }

    /// Saves one adapter into `dir`.
    pub fn save_adapter(&self, name: &str, dir: &Path) -> Result<()> {
        let config = self
            .configs
            .get(name)
            .ok_or_else(|| Error::InvalidArgument(format!("no adapter named `{name}`")))?;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        // Every saved tensor as f32 little-endian bytes, under PEFT's file key.
        let mut named: Vec<(String, Var)> = Vec::new();
        for (path, layer) in &self.layers {
            if let Some(w) = layer.weights(name) {
                named.push((format!("base_model.model.{path}.lora_A.weight"), w.a));
                named.push((format!("base_model.model.{path}.lora_B.weight"), w.b));
            }
        }
        for (path, module) in self.saved.get(name).into_iter().flatten() {
            for (param, var) in module.parameters() {
                named.push((format!("base_model.model.{path}.{param}"), var.clone()));
            }
        }
        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (key, var) in named {
            let t = var.as_tensor().to_dtype(DType::F32)?;
            let bytes: Vec<u8> = t
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            tensors.push((key, t.dims().to_vec(), bytes));
        }
        let views = tensors
            .iter()
            .map(|(k, shape, bytes)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .map(|v| (k.clone(), v))
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let weights_path = dir.join(ADAPTER_WEIGHTS_FILE);
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        write_atomically(&weights_path, |tmp| {
            safetensors::tensor::serialize_to_file(views, Some(metadata), tmp)
                .map_err(|e| Error::weights(tmp, e.to_string()))
        })?;
        let mut saved = config.clone();
        saved.inference_mode = true;
        let json = saved.to_json_string()?;
        write_atomically(&dir.join(ADAPTER_CONFIG_FILE), |tmp| {
            std::fs::write(tmp, json.as_bytes()).map_err(|e| Error::io(tmp, e))
        })
    }

    /// Loads a PEFT adapter folder onto `model` as adapter `default`, for inference — PEFT's
    /// `PeftModel.from_pretrained(model, dir)` (frozen: no trainable parameters).
    pub fn from_pretrained(model: Model, dir: impl AsRef<Path>) -> Result<Self> {
        let mut peft = Self::wrap(model, 0);
        peft.load_adapter(dir, DEFAULT_ADAPTER)?;
        peft.frozen = true;
        Ok(peft)
    }

    /// Like [`PeftModel::from_pretrained`] with PEFT's `is_trainable=True`: the loaded adapter
    /// trains further (resuming, or fine-tuning an existing adapter).
    pub fn from_pretrained_trainable(model: Model, dir: impl AsRef<Path>) -> Result<Self> {
        let mut peft = Self::wrap(model, 0);
        peft.load_adapter(dir, DEFAULT_ADAPTER)?;
        Ok(peft)
    }

    /// Loads several PEFT adapter folders onto `model`, each under its own name, for inference
    /// (PEFT's `from_pretrained` followed by `load_adapter`); the first one is active.
    pub fn with_adapters(model: Model, adapters: &[(String, std::path::PathBuf)]) -> Result<Self> {
        let mut peft = Self::wrap(model, 0);
        for (name, dir) in adapters {
            peft.load_adapter(dir, name)?;
        }
        if let Some((first, _)) = adapters.first() {
            peft.set_adapter(first)?;
        }
        peft.frozen = true;
        Ok(peft)
    }

    /// Whether the adapters are frozen (loaded for inference).
    pub fn is_frozen(&self) -> bool {
        self.frozen
    }

    /// Loads another adapter folder under `name` and makes it active.
    pub fn load_adapter(&mut self, dir: impl AsRef<Path>, name: &str) -> Result<()> {
        let dir = dir.as_ref();
        if self.configs.contains_key(name) {
            return Err(Error::InvalidArgument(format!(
                "adapter `{name}` already exists"
            )));
        }
        let config = LoraConfig::from_file(&dir.join(ADAPTER_CONFIG_FILE))?;
        self.model.decoder.reserve_tensor_ids();
        let weights_path = dir.join(ADAPTER_WEIGHTS_FILE);
        if !weights_path.is_file() {
            return Err(Error::weights(
                &weights_path,
                "missing (an adapter folder needs adapter_model.safetensors)",
            ));
        }
        let tensors =
            candle_core::safetensors::load(&weights_path, self.model.device()).map_err(|e| {
                Error::weights(
                    &weights_path,
                    format!(
                        "not a readable safetensors file ({}); re-save the adapter",
                        crate::model::weights::root_cause(&e)
                    ),
                )
            })?;
        // Group A and B by module path, rejecting anything we can't place.
        let known: BTreeMap<String, usize> = module_paths(&self.model).into_iter().collect();
        let lora_targets: Vec<String> = known
            .iter()
            .filter(|(p, i)| config.targets(p, **i))
            .map(|(p, _)| p.clone())
            .collect();
        let to_save = self
            .modules_to_save_paths(&config, &lora_targets)
            .map_err(|e| Error::weights(&weights_path, e.to_string()))?;
        let mut pairs: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
        let mut full: BTreeMap<String, BTreeMap<String, Tensor>> = BTreeMap::new();
        for (key, t) in tensors {
            let saved_param = key
                .strip_prefix("base_model.model.")
                .and_then(|k| k.rsplit_once('.'))
                .filter(|(path, _)| to_save.iter().any(|p| p == path));
            if let Some((path, param)) = saved_param {
                full.entry(path.to_string())
                    .or_default()
                    .insert(param.to_string(), t);
                continue;
            }
            let (path, kind) = parse_adapter_key(&key).ok_or_else(|| {
                Error::weights(
                    &weights_path,
                    format!(
                        "tensor `{key}` is neither a LoRA A/B weight of a decoder linear layer nor \
                         a parameter of a module in modules_to_save {:?}",
                        config.modules_to_save.as_deref().unwrap_or_default()
                    ),
                )
            })?;
            if !known.contains_key(&path) {
                return Err(Error::weights(
                    &weights_path,
                    format!("tensor `{key}` belongs to module `{path}`, which the base model `{}` does not have (adapter made for another architecture?)", self.model.name),
                ));
            }
            let entry = pairs.entry(path).or_default();
            let t = t.to_dtype(DType::F32)?;
            if kind == 'A' {
                entry.0 = Some(t);
            } else {
                entry.1 = Some(t);
            }
        }
        for (path, layer) in &known {
            if config.targets(path, *layer) && !pairs.contains_key(path) {
                return Err(Error::weights(
                    &weights_path,
                    format!("adapter_config.json targets `{path}` but the file has no `base_model.model.{path}.lora_A.weight`"),
                ));
            }
        }
        let scaling = config.scaling();
        for (path, (a, b)) in pairs {
            let (Some(a), Some(b)) = (a, b) else {
                return Err(Error::weights(
                    &weights_path,
                    format!("module `{path}` has only one of lora_A / lora_B"),
                ));
            };
            if a.dim(0)? != config.r {
                return Err(Error::weights(
                    &weights_path,
                    format!("tensor `base_model.model.{path}.lora_A.weight` has rank {} but adapter_config.json says r={}", a.dim(0)?, config.r),
                ));
            }
            let weights = LoraWeights {
                a: Var::from_tensor(&a)?,
                b: Var::from_tensor(&b)?,
                scaling,
                dropout: config.lora_dropout,
            };
            self.layer_for(&path)?.insert(name, weights).map_err(|e| {
                Error::weights(
                    &weights_path,
                    format!("module `{path}`: {}", crate::model::weights::root_cause(&e)),
                )
            })?;
        }
        if !to_save.is_empty() {
            self.restore_originals(&to_save)?;
            let mut copies = BTreeMap::new();
            for path in &to_save {
                let dense = self.model.decoder.module_parameters(path)?;
                let loaded = full.remove(path).unwrap_or_default();
                let copy = SavedModule::from_loaded(path, &self.originals[path], dense, &loaded)
                    .map_err(|m| Error::weights(&weights_path, m))?;
                copies.insert(path.clone(), copy);
            }
            self.saved.insert(name.to_string(), copies);
        }
        self.configs.insert(name.to_string(), config);
        self.set_adapter(name)
    }

    /// Folds the active adapter into the base weights and returns the plain model
    /// (PEFT's `merge_and_unload`). Quantised bases are dequantised: the merged weights are
    /// dense in the compute dtype, ready to export as a Hugging Face folder.
    pub fn merge_and_unload(mut self) -> Result<Model> {
        let active = self.active.clone();
        for layer in self.layers.values() {
            layer.set_active(std::slice::from_ref(&active));
        }
        // Modules trained in full: the active adapter's copy replaces the module, as plain
        // tensors (PEFT's merge keeps the trained copy).
        for (path, original) in &self.originals {
            let state = match self.saved.get(&active).and_then(|c| c.get(path)) {
                Some(copy) => copy.state(true)?,
                None => original.clone(),
            };
            self.model.decoder.set_module_state(path, state)?;
        }
        for (i, block) in self.model.decoder.layers.iter_mut().enumerate() {
            for (name, lin) in block.linears_mut() {
                let path = format!("model.layers.{i}.{name}");
                let Some(layer) = self.layers.get(&path) else {
                    continue;
                };
                if let Some(delta) = layer.merged_delta()? {
                    let w = lin.dense_weight()?;
                    let merged =
                        (w.to_dtype(DType::F32)? + delta)?.to_dtype(lin.compute_dtype())?;
                    lin.set_weight(LinearWeight::Dense(merged));
                }
                lin.set_adapter(None);
            }
        }
        Ok(self.model)
    }
}

/// `model.layers.3.self_attn.q_proj` → (3, "self_attn.q_proj").
fn parse_path(path: &str) -> Option<(usize, &str)> {
    let rest = path.strip_prefix("model.layers.")?;
    let (idx, name) = rest.split_once('.')?;
    Some((idx.parse().ok()?, name))
}

/// `base_model.model.<path>.lora_A.weight` (optionally `.lora_A.<adapter>.weight`) → (path, 'A').
fn parse_adapter_key(key: &str) -> Option<(String, char)> {
    let rest = key
        .strip_prefix("base_model.model.")?
        .strip_suffix(".weight")?;
    for (marker, kind) in [(".lora_A", 'A'), (".lora_B", 'B')] {
        if let Some(at) = rest.rfind(marker) {
            let tail = &rest[at + marker.len()..];
            if tail.is_empty() || (tail.starts_with('.') && !tail[1..].contains('.')) {
                return Some((rest[..at].to_string(), kind));
            }
        }
    }
    None
}

/// Writes through a temporary file in the same folder, synced, then renamed into place, so a
/// crash never leaves a half-written file under the final name.
pub(crate) fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    write(&tmp)?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_keys_parse() {
        assert_eq!(
            parse_adapter_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
            Some(("model.layers.0.self_attn.q_proj".into(), 'A'))
        );
        assert_eq!(
            parse_adapter_key("base_model.model.model.layers.2.mlp.up_proj.lora_B.default.weight"),
            Some(("model.layers.2.mlp.up_proj".into(), 'B'))
        );
        assert_eq!(
            parse_adapter_key("model.layers.0.self_attn.q_proj.weight"),
            None
        );
        assert_eq!(
            parse_path("model.layers.12.mlp.down_proj"),
            Some((12, "mlp.down_proj"))
        );
    }
}
