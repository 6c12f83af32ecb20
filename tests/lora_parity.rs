//! LoRA parity with PEFT, both ways (issue 3, "Proof"):
//! - adapters trained a few steps by PEFT (`tests/reference/peft_reference.py`) load here and
//!   give PEFT's logits within 1e-4, before and after `merge_and_unload`;
//! - adapters made here (nonzero B) load in PEFT (`peft_reference.py check`), PEFT's logits
//!   match ours and the tensors PEFT actually holds equal the ones we saved (a key PEFT
//!   silently ignores would leave its B at zero and show up here);
//! - `adapter_config.json` round-trips in both directions;
//! - `print_trainable_parameters()` lines equal PEFT's (tiny models and the SmolLM2 shape);
//! - a mismatched adapter is a clear error naming the tensor.
//!
//! Data: `make reference` (target/reference/peft/, tiny checkpoints in target/reference/);
//! Python: `$QLORA_REF_VENV` (default ~/.cache/qlora/ref-venv). Missing either fails.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use candle_core::{DType, Device, Tensor};
use qlora::lora::{get_peft_model, LoraConfig, PeftModel};
use qlora::model::Model;
use serde_json::Value;

const TOL: f32 = 1e-4;

// ---------------------------------------------------------------------------------------------
// Locating data and Python

fn peft_dir() -> PathBuf {
    let dir = common::reference_dir().join("peft");
    assert!(
        dir.join("index.json").is_file(),
        "PEFT reference data missing in {}: run `make reference` first",
        dir.display()
    );
    dir
}

fn python() -> PathBuf {
    let venv = std::env::var_os("QLORA_REF_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is not set"))
                .join(".cache/qlora/ref-venv")
        });
    let py = venv.join("bin/python");
    assert!(
        py.is_file(),
        "reference venv missing ({} not found): run `make reference` first (or set QLORA_REF_VENV)",
        py.display()
    );
    py
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference/peft_reference.py")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e} (run `make reference`)", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every case of index.json: name → meta.json. The cases the issue requires must be there.
fn cases() -> BTreeMap<String, Value> {
    let dir = peft_dir();
    let index = read_json(&dir.join("index.json"));
    let names: Vec<String> = index["cases"]
        .as_object()
        .expect("index.json: cases")
        .keys()
        .cloned()
        .collect();
    for want in [
        "llama-qv",
        "llama-all-rslora",
        "qwen2-qv",
        "qwen2-all",
        "llama-layers",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "PEFT case `{want}` missing: re-run `make reference`"
        );
    }
    names
        .into_iter()
        .map(|n| {
            let meta = read_json(&dir.join(&n).join("meta.json"));
            (n, meta)
        })
        .collect()
}

fn load_base(name: &str) -> Model {
    let dir = common::reference_dir().join(name);
    Model::load(dir.to_str().unwrap()).unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()))
}

fn load_tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn ids_u32(t: &Tensor) -> Tensor {
    t.to_dtype(DType::U32).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn logits(model: &Model, ids: &Tensor) -> Vec<f32> {
    flat(
        &model
            .decoder
            .forward(&ids_u32(ids), None, None)
            .expect("forward"),
    )
}

/// The LoraConfig of a case, built from the kwargs PEFT's LoraConfig was called with (PEFT's
/// field names, so serde reads them directly).
fn config_from_kwargs(meta: &Value) -> LoraConfig {
    serde_json::from_value(meta["lora_config_kwargs"].clone())
        .unwrap_or_else(|e| panic!("LoraConfig from {}: {e}", meta["lora_config_kwargs"]))
}

/// Deterministic values in [-scale, scale).
fn pseudo_random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn check_failures(failures: Vec<String>) {
    assert!(
        failures.is_empty(),
        "{} failure(s):\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

// ---------------------------------------------------------------------------------------------
// (a) PEFT → here

#[test]
fn peft_trained_adapters_load_and_match_peft_logits() {
    let dir = peft_dir();
    let mut failures = Vec::new();
    for (case, meta) in cases() {
        let base = meta["base"].as_str().unwrap();
        let refs = load_tensors(&dir.join(&case).join("reference.safetensors"));
        let ids = &refs["input_ids"];
        let want = flat(&refs["logits"]);
        let want_merged = flat(&refs["merged_logits"]);

        let mut peft =
            match PeftModel::from_pretrained(load_base(base), dir.join(&case).join("adapter")) {
                Ok(p) => p,
                Err(e) => {
                    failures.push(format!("{case}: loading PEFT's adapter failed: {e}"));
                    continue;
                }
            };
        peft.eval();

        // Every tensor in the file is attached somewhere, and nothing else is: LoRA pairs to
        // adapted modules, other tensors to modules trained in full (modules_to_save).
        let keys: Vec<&str> = meta["adapter_tensors"]
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.strip_prefix("base_model.model.").unwrap())
            .collect();
        let file_modules: BTreeSet<String> = keys
            .iter()
            .filter_map(|k| k.rfind(".lora_").map(|at| k[..at].to_string()))
            .collect();
        let file_saved: BTreeSet<String> = keys
            .iter()
            .filter(|k| !k.contains(".lora_"))
            .map(|k| k.to_string())
            .collect();
        let ours: BTreeSet<String> = peft.adapted_modules().map(str::to_string).collect();
        if ours != file_modules {
            failures.push(format!(
                "{case}: adapted modules {ours:?} != the file's {file_modules:?}"
            ));
        }
        let ours_saved: BTreeSet<String> = peft
            .saved_modules()
            .flat_map(|(path, m)| {
                m.parameters()
                    .iter()
                    .map(move |(p, _)| format!("{path}.{p}"))
            })
            .collect();
        if ours_saved != file_saved {
            failures.push(format!(
                "{case}: modules trained in full {ours_saved:?} != the file's {file_saved:?}"
            ));
        }

        let got = logits(peft.model(), ids);
        let d = common::max_abs_diff(&got, &want);
        if d > TOL {
            failures.push(format!(
                "{case}: adapter logits differ from PEFT's by {d:.3e}"
            ));
        }
        // The comparison means something only if the adapter moves the logits.
        peft.disable_adapters();
        let base_logits = logits(peft.model(), ids);
        peft.enable_adapters();
        let effect = common::max_abs_diff(&base_logits, &want);
        if effect < 1e-2 {
            failures.push(format!("{case}: with adapters disabled the logits are within {effect:.3e} of PEFT's: the test is vacuous"));
        }

        let merged = match peft.merge_and_unload() {
            Ok(m) => m,
            Err(e) => {
                failures.push(format!("{case}: merge_and_unload failed: {e}"));
                continue;
            }
        };
        let got_merged = logits(&merged, ids);
        let d = common::max_abs_diff(&got_merged, &want_merged);
        if d > TOL {
            failures.push(format!(
                "{case}: merged logits differ from PEFT's merged logits by {d:.3e}"
            ));
        }
        let d = common::max_abs_diff(&got_merged, &got);
        if d > TOL {
            failures.push(format!(
                "{case}: merged logits differ from our adapter logits by {d:.3e}"
            ));
        }
        eprintln!("{case}: ok-so-far (adapter effect {effect:.3})");
    }
    check_failures(failures);
}

// ---------------------------------------------------------------------------------------------
// (b) here → PEFT, and (c) the config as PEFT reads it

struct Ours {
    name: &'static str,
    base: &'static str,
    dir: PathBuf,
    logits: Vec<f32>,
    tensors: BTreeMap<String, Vec<f32>>,
}

fn our_cases() -> Vec<(&'static str, &'static str, LoraConfig)> {
    vec![
        (
            "llama-qv",
            "llama",
            LoraConfig::default()
                .r(4)
                .lora_alpha(8.0)
                .target_modules(["q_proj", "v_proj"]),
        ),
        (
            "llama-all-rslora",
            "llama",
            LoraConfig::default()
                .r(4)
                .lora_alpha(16.0)
                .all_linear()
                .use_rslora(true),
        ),
        (
            "qwen2-qv",
            "qwen2",
            LoraConfig::default()
                .r(4)
                .lora_alpha(8.0)
                .target_modules(["q_proj", "v_proj"]),
        ),
        (
            "qwen2-all",
            "qwen2",
            LoraConfig::default().r(8).lora_alpha(16.0).all_linear(),
        ),
        (
            "llama-layers",
            "llama",
            LoraConfig::default()
                .r(4)
                .lora_alpha(8.0)
                .target_modules(["q_proj", "v_proj"])
                .layers_to_transform(vec![1]),
        ),
        (
            "llama-regex",
            "llama",
            LoraConfig::default()
                .r(2)
                .lora_alpha(4.0)
                .target_regex(r".*\.layers\.0\.self_attn\.(k_proj|o_proj)|.*\.mlp\.down_proj"),
        ),
        (
            "llama-tied-qv-gaussian",
            "llama-tied",
            LoraConfig::default()
                .r(4)
                .lora_alpha(8.0)
                .target_modules(["q_proj", "v_proj"])
                .gaussian_init(),
        ),
        // Modules trained in full beside the adapters (PEFT's suffix rule: "norm" is every norm).
        (
            "llama-mts-head-norm",
            "llama",
            LoraConfig::default()
                .r(4)
                .lora_alpha(8.0)
                .target_modules(["q_proj", "v_proj"])
                .modules_to_save(["lm_head", "norm"]),
        ),
        (
            "qwen2-mts-embed-k",
            "qwen2",
            LoraConfig::default()
                .r(4)
                .lora_alpha(8.0)
                .target_modules(["q_proj", "v_proj"])
                .modules_to_save(["embed_tokens", "k_proj"]),
        ),
        (
            "llama-tied-mts-head",
            "llama-tied",
            LoraConfig::default()
                .r(4)
                .lora_alpha(8.0)
                .target_modules(["q_proj", "v_proj"])
                .modules_to_save(["lm_head"]),
        ),
        // QLoRA recipe (dropout 0.05: eval mode must switch it off on both sides).
        ("llama-qlora-recipe", "llama", LoraConfig::qlora()),
    ]
}

/// Makes each adapter here with random nonzero B and saves it; returns them with the
/// `peft_reference.py check` arguments that load them all in one Python process.
fn make_ours(tmp: &Path) -> (Vec<Ours>, Vec<PathBuf>) {
    let ids = Tensor::new(
        &[[5i64, 17, 99, 200, 3, 64], [250, 1, 42, 7, 128, 31]],
        &Device::Cpu,
    )
    .unwrap();
    let ids_path = tmp.join("ids.safetensors");
    candle_core::safetensors::save(
        &HashMap::from([("input_ids".to_string(), ids.clone())]),
        &ids_path,
    )
    .unwrap();

    let mut out = Vec::new();
    let mut args = Vec::new();
    for (i, (name, base, config)) in our_cases().into_iter().enumerate() {
        let peft = PeftModel::new_seeded(load_base(base), &config, 100 + i as u64)
            .unwrap_or_else(|e| panic!("{name}: get_peft_model: {e}"));
        peft.eval();
        let mut tensors = BTreeMap::new();
        for (j, (key, var)) in peft.trainable_parameters().into_iter().enumerate() {
            if key.contains(".lora_B.") {
                let vals = pseudo_random(var.elem_count(), (i * 1000 + j) as u64, 0.3);
                var.set(&Tensor::from_vec(vals, var.shape(), var.device()).unwrap())
                    .unwrap();
            }
            // A module trained in full starts as the base's copy: move it, so that PEFT must
            // really load our values to agree.
            if key.contains(".modules_to_save.") {
                let vals = pseudo_random(var.elem_count(), (i * 1000 + j) as u64, 0.1);
                let noise = Tensor::from_vec(vals, var.shape(), var.device()).unwrap();
                var.set(&(var.as_tensor() + noise).unwrap()).unwrap();
            }
            // PEFT's file key: the adapter name is stripped on save.
            let file_key = qlora::lora::saved_key(&key, "default");
            tensors.insert(file_key, flat(var.as_tensor()));
        }
        assert!(!tensors.is_empty(), "{name}: no trainable parameters");
        let logits = logits(peft.model(), &ids);
        let dir = tmp.join(name);
        peft.save_pretrained(&dir)
            .unwrap_or_else(|e| panic!("{name}: save_pretrained: {e}"));
        args.extend([
            common::reference_dir().join(base),
            dir.clone(),
            ids_path.clone(),
            tmp.join(format!("{name}.out.safetensors")),
        ]);
        out.push(Ours {
            name,
            base,
            dir,
            logits,
            tensors,
        });
    }
    (out, args)
}

#[test]
fn our_adapters_load_in_peft_with_equal_logits_tensors_and_config() {
    let tmp = tempfile::tempdir().unwrap();
    let (ours, args) = make_ours(tmp.path());
    let result = Command::new(python())
        .arg(script())
        .arg("check")
        .args(&args)
        .env("HF_HUB_OFFLINE", "1")
        .env("TOKENIZERS_PARALLELISM", "false")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("starting the reference python");
    let stdout = String::from_utf8_lossy(&result.stdout);
    let stderr = String::from_utf8_lossy(&result.stderr);
    let mut failures = Vec::new();
    if !result.status.success() {
        let tail: Vec<&str> = stderr.lines().rev().take(30).collect();
        failures.push(format!(
            "PEFT check failed ({}):\n{}\n{}",
            result.status,
            stdout.trim(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ));
    }
    for o in &ours {
        let name = o.name;
        let out_path = tmp.path().join(format!("{name}.out.safetensors"));
        let summary_path = PathBuf::from(format!("{}.json", out_path.display()));
        if !summary_path.is_file() {
            failures.push(format!(
                "{name} (base {}): PEFT produced no output (see the error above)",
                o.base
            ));
            continue;
        }
        let peft_out = load_tensors(&out_path);
        let summary = read_json(&summary_path);

        // Logits.
        let d = common::max_abs_diff(&flat(&peft_out["logits"]), &o.logits);
        if d > TOL {
            failures.push(format!(
                "{name}: PEFT's logits on our adapter differ from ours by {d:.3e}"
            ));
        }
        // What PEFT actually loaded equals what we hold, key for key.
        let loaded: BTreeSet<&str> = peft_out
            .keys()
            .map(String::as_str)
            .filter(|k| k.starts_with("base_model.model."))
            .collect();
        let held: BTreeSet<&str> = o.tensors.keys().map(String::as_str).collect();
        if loaded != held {
            failures.push(format!("{name}: PEFT holds {loaded:?}, we hold {held:?}"));
        }
        for (k, v) in &o.tensors {
            if let Some(t) = peft_out.get(k) {
                let d = common::max_abs_diff(&flat(t), v);
                if d != 0.0 {
                    failures.push(format!("{name}: PEFT's `{k}` differs from ours by {d:.3e}"));
                }
            }
        }
        for k in ["missing_keys", "unexpected_keys", "value_mismatch_keys"] {
            if summary[k].as_array().is_some_and(|a| !a.is_empty()) {
                failures.push(format!("{name}: PEFT reports {k} {}", summary[k]));
            }
        }
        for (k, dt) in summary["file_dtypes"].as_object().unwrap() {
            if dt != "float32" {
                failures.push(format!(
                    "{name}: `{k}` saved as {dt}, PEFT saves f32 adapters as float32"
                ));
            }
        }

        // (c) The config as PEFT re-reads it (LoraConfig.from_pretrained(...).to_dict()).
        let ours_json = read_json(&o.dir.join("adapter_config.json"));
        let peft_cfg = &summary["config"];
        for key in [
            "peft_type",
            "task_type",
            "r",
            "lora_alpha",
            "lora_dropout",
            "bias",
            "use_rslora",
            "init_lora_weights",
            "layers_to_transform",
            "inference_mode",
            "base_model_name_or_path",
        ] {
            let (a, b) = (&ours_json[key], &peft_cfg[key]);
            let same = a == b || (a.is_number() && b.is_number() && a.as_f64() == b.as_f64());
            if !same {
                failures.push(format!(
                    "{name}: adapter_config `{key}`: ours {a}, PEFT reads {b}"
                ));
            }
        }
        let sorted = |v: &Value| -> Value {
            match v {
                Value::Array(a) => {
                    let mut s: Vec<String> = a
                        .iter()
                        .map(|x| x.as_str().unwrap_or_default().to_string())
                        .collect();
                    s.sort();
                    Value::from(s)
                }
                other => other.clone(),
            }
        };
        if sorted(&ours_json["target_modules"]) != sorted(&peft_cfg["target_modules"]) {
            failures.push(format!(
                "{name}: target_modules ours {}, PEFT reads {}",
                ours_json["target_modules"], peft_cfg["target_modules"]
            ));
        }
        eprintln!(
            "{name}: PEFT check done, logits diff {d:.2e}",
            d = common::max_abs_diff(&flat(&peft_out["logits"]), &o.logits)
        );
    }
    check_failures(failures);
}

/// (c) Our adapter_config.json has the keys PEFT writes for the fields we model, with
/// PEFT's spelling and types, sorted, two-space indented.
#[test]
fn our_adapter_config_has_peft_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let peft = get_peft_model(load_base("llama"), &LoraConfig::qlora()).unwrap();
    peft.save_pretrained(tmp.path()).unwrap();
    let text = std::fs::read_to_string(tmp.path().join("adapter_config.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["peft_type"], "LORA", "{text}");
    assert_eq!(v["task_type"], "CAUSAL_LM", "{text}");
    assert!(
        v["base_model_name_or_path"].is_string(),
        "base_model_name_or_path: {text}"
    );
    assert_eq!(v["r"], 16, "{text}");
    assert_eq!(
        v["lora_alpha"], 32,
        "lora_alpha must be written as an integer like Python: {text}"
    );
    assert_eq!(v["lora_dropout"], 0.05, "{text}");
    assert_eq!(v["bias"], "none", "{text}");
    assert_eq!(
        v["inference_mode"], true,
        "PEFT saves inference_mode true: {text}"
    );
    assert_eq!(v["use_rslora"], false, "{text}");
    assert_eq!(v["init_lora_weights"], true, "{text}");
    let mut tm: Vec<&str> = v["target_modules"]
        .as_array()
        .expect("target_modules list")
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    tm.sort();
    assert_eq!(tm, ["q_proj", "v_proj"]);
    // Every key PEFT writes for these fields is present.
    for key in [
        "alpha_pattern",
        "rank_pattern",
        "fan_in_fan_out",
        "layers_to_transform",
        "modules_to_save",
        "revision",
        "use_dora",
    ] {
        assert!(
            v.get(key).is_some(),
            "adapter_config.json lacks `{key}`: {text}"
        );
    }
    // json.dumps(indent=2, sort_keys=True).
    let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    let mut sorted_keys = keys.clone();
    sorted_keys.sort();
    assert_eq!(keys, sorted_keys);
    assert!(text.starts_with("{\n  \""), "two-space indent: {text}");
    // The weights file carries PEFT's metadata.
    let bytes = std::fs::read(tmp.path().join("adapter_model.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        meta.metadata()
            .as_ref()
            .and_then(|m| m.get("format"))
            .map(String::as_str),
        Some("pt"),
        "adapter_model.safetensors metadata must be {{\"format\": \"pt\"}}"
    );
}

/// (c) Every adapter_config.json PEFT wrote parses here and re-serialises to the same JSON
/// value (unknown keys kept), and to the same text PEFT wrote.
#[test]
fn peft_adapter_configs_round_trip_here() {
    let dir = peft_dir();
    let mut failures = Vec::new();
    for (case, _) in cases() {
        let path = dir.join(&case).join("adapter/adapter_config.json");
        let text = std::fs::read_to_string(&path).unwrap();
        let cfg = match LoraConfig::from_file(&path) {
            Ok(c) => c,
            Err(e) => {
                failures.push(format!("{case}: {e}"));
                continue;
            }
        };
        let original: Value = serde_json::from_str(&text).unwrap();
        let back: Value = serde_json::from_str(&cfg.to_json_string().unwrap()).unwrap();
        if back != original {
            let (o, b) = (original.as_object().unwrap(), back.as_object().unwrap());
            let diffs: Vec<String> = o
                .keys()
                .chain(b.keys())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .filter(|k| o.get(*k) != b.get(*k))
                .map(|k| format!("{k}: PEFT {:?} / ours {:?}", o.get(k), b.get(k)))
                .collect();
            failures.push(format!("{case}: round trip changes {}", diffs.join("; ")));
        } else if cfg.to_json_string().unwrap().trim_end() != text.trim_end() {
            failures.push(format!("{case}: same JSON value but different text than PEFT's json.dumps(indent=2, sort_keys=True)"));
        }
    }
    check_failures(failures);
}

// ---------------------------------------------------------------------------------------------
// (d) print_trainable_parameters

#[test]
fn trainable_parameter_lines_match_peft_on_tiny_models() {
    let mut failures = Vec::new();
    for (case, meta) in cases() {
        let want = meta["print_trainable_parameters"].as_str().unwrap();
        let config = config_from_kwargs(&meta);
        let peft = match get_peft_model(load_base(meta["base"].as_str().unwrap()), &config) {
            Ok(p) => p,
            Err(e) => {
                failures.push(format!("{case}: get_peft_model: {e}"));
                continue;
            }
        };
        let got = peft.trainable_parameters_line();
        if got != want {
            failures.push(format!("{case}: ours `{got}` vs PEFT `{want}`"));
        }
    }
    check_failures(failures);
}

/// PEFT's `PeftModel.from_pretrained` loads for inference (is_trainable=False): the adapter is
/// frozen and print_trainable_parameters() reports 0 trainable.
#[test]
fn loaded_adapter_parameter_line_matches_peft() {
    let dir = peft_dir();
    let mut failures = Vec::new();
    for (case, meta) in cases() {
        let want = meta["print_trainable_parameters_after_from_pretrained"]
            .as_str()
            .expect("re-run `make reference`");
        let peft = PeftModel::from_pretrained(
            load_base(meta["base"].as_str().unwrap()),
            dir.join(&case).join("adapter"),
        )
        .unwrap_or_else(|e| panic!("{case}: {e}"));
        let got = peft.trainable_parameters_line();
        if got != want {
            failures.push(format!(
                "{case}: after from_pretrained ours `{got}` vs PEFT `{want}`"
            ));
        }
    }
    check_failures(failures);
}

#[test]
fn trainable_parameter_lines_match_peft_on_smollm2_shape() {
    let counts = read_json(&peft_dir().join("counts.json"));
    let model = Model::load(common::default_gguf().to_str().unwrap()).unwrap();
    let qv = &counts["cases"]["r16-qv"];
    let all = &counts["cases"]["r16-all-linear"];
    assert_eq!(qv["trainable_params"], 921_600);

    let cfg_qv = LoraConfig::default()
        .r(16)
        .lora_alpha(32.0)
        .target_modules(["q_proj", "v_proj"]);
    let peft = get_peft_model(model.clone(), &cfg_qv).unwrap();
    let got_qv = peft.trainable_parameters_line();
    let cfg_all = LoraConfig::default().r(16).lora_alpha(32.0).all_linear();
    let got_all = get_peft_model(model, &cfg_all)
        .unwrap()
        .trainable_parameters_line();
    assert_eq!(
        (got_qv.as_str(), got_all.as_str()),
        (
            qv["print_trainable_parameters"].as_str().unwrap(),
            all["print_trainable_parameters"].as_str().unwrap()
        ),
        "SmolLM2-135M shape, r=16 q,v and r=16 all-linear: ours vs PEFT"
    );
}

// ---------------------------------------------------------------------------------------------
// (e) mismatches are clear errors naming the tensor

/// Copies PEFT's llama-qv adapter to a temp dir, lets `edit` change its tensors / config.
fn edited_adapter(
    tmp: &Path,
    edit_tensors: impl FnOnce(&mut HashMap<String, Tensor>),
    edit_config: impl FnOnce(&mut Value),
) -> PathBuf {
    let src = peft_dir().join("llama-qv/adapter");
    let dst = tmp.join("adapter");
    std::fs::create_dir_all(&dst).unwrap();
    let mut tensors = load_tensors(&src.join("adapter_model.safetensors"));
    edit_tensors(&mut tensors);
    candle_core::safetensors::save(&tensors, dst.join("adapter_model.safetensors")).unwrap();
    let mut cfg = read_json(&src.join("adapter_config.json"));
    edit_config(&mut cfg);
    std::fs::write(
        dst.join("adapter_config.json"),
        serde_json::to_string_pretty(&cfg).unwrap(),
    )
    .unwrap();
    dst
}

fn load_error(dir: &Path) -> String {
    match PeftModel::from_pretrained(load_base("llama"), dir) {
        Ok(p) => panic!(
            "a mismatched adapter loaded without error (modules: {:?})",
            p.adapted_modules().collect::<Vec<_>>()
        ),
        Err(e) => e.to_string(),
    }
}

const Q0: &str = "base_model.model.model.layers.0.self_attn.q_proj";

#[test]
fn wrong_shape_is_an_error_naming_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    // lora_B of q_proj with 32 rows (the layer has 64 outputs).
    let dir = edited_adapter(
        tmp.path(),
        |t| {
            let b = t[&format!("{Q0}.lora_B.weight")]
                .narrow(0, 0, 32)
                .unwrap()
                .contiguous()
                .unwrap();
            t.insert(format!("{Q0}.lora_B.weight"), b);
        },
        |_| {},
    );
    let err = load_error(&dir);
    assert!(
        err.contains("model.layers.0.self_attn.q_proj") && err.contains("lora_B"),
        "unclear error: {err}"
    );

    // lora_A with the wrong input width.
    let tmp = tempfile::tempdir().unwrap();
    let dir = edited_adapter(
        tmp.path(),
        |t| {
            let a = Tensor::zeros((4, 128), DType::F32, &Device::Cpu).unwrap();
            t.insert(format!("{Q0}.lora_A.weight"), a);
        },
        |_| {},
    );
    let err = load_error(&dir);
    assert!(
        err.contains("model.layers.0.self_attn.q_proj") && err.contains("lora_A"),
        "unclear error: {err}"
    );
}

#[test]
fn rank_disagreeing_with_config_is_an_error_naming_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = edited_adapter(tmp.path(), |_| {}, |c| c["r"] = Value::from(8));
    let err = load_error(&dir);
    assert!(
        err.contains("lora_A") && err.contains("self_attn") && err.contains('8'),
        "unclear error: {err}"
    );
}

#[test]
fn unknown_module_is_an_error_naming_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = "base_model.model.model.layers.0.self_attn.qkv_proj";
    let dir = edited_adapter(
        tmp.path(),
        |t| {
            let a = t.remove(&format!("{Q0}.lora_A.weight")).unwrap();
            let b = t.remove(&format!("{Q0}.lora_B.weight")).unwrap();
            t.insert(format!("{bad}.lora_A.weight"), a);
            t.insert(format!("{bad}.lora_B.weight"), b);
        },
        |_| {},
    );
    let err = load_error(&dir);
    assert!(err.contains("qkv_proj"), "unclear error: {err}");

    // A layer the base does not have (an adapter for a deeper model).
    let tmp = tempfile::tempdir().unwrap();
    let deep = "base_model.model.model.layers.7.self_attn.q_proj";
    let dir = edited_adapter(
        tmp.path(),
        |t| {
            let a = t[&format!("{Q0}.lora_A.weight")].clone();
            let b = t[&format!("{Q0}.lora_B.weight")].clone();
            t.insert(format!("{deep}.lora_A.weight"), a);
            t.insert(format!("{deep}.lora_B.weight"), b);
        },
        |_| {},
    );
    let err = load_error(&dir);
    assert!(err.contains("layers.7"), "unclear error: {err}");

    // Not a LoRA tensor at all.
    let tmp = tempfile::tempdir().unwrap();
    let dir = edited_adapter(
        tmp.path(),
        |t| {
            t.insert(
                "base_model.model.lm_head.weight".into(),
                Tensor::zeros((256, 64), DType::F32, &Device::Cpu).unwrap(),
            );
        },
        |_| {},
    );
    let err = load_error(&dir);
    assert!(err.contains("lm_head"), "unclear error: {err}");
}

#[test]
fn half_a_pair_is_an_error_naming_the_module() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = edited_adapter(
        tmp.path(),
        |t| {
            t.remove(&format!("{Q0}.lora_B.weight"));
        },
        |_| {},
    );
    let err = load_error(&dir);
    assert!(
        err.contains("model.layers.0.self_attn.q_proj") && err.contains("lora_B"),
        "unclear error: {err}"
    );
}
