//! 4-bit models against transformers + bitsandbytes 0.50 (reference data from
//! tests/reference/bnb_reference.py, in `<reference dir>/bnb/`):
//! - `load_in_4bit` here writes byte-identical tensors to transformers' `save_pretrained` of the
//!   same model quantised by `from_pretrained(..., load_in_4bit=True)`;
//! - transformers' 4-bit folders load here with logits within 1e-4 of transformers';
//! - folders written here load in transformers (its venv python is run) with logits within 1e-4;
//! - damaged checkpoints give errors naming the tensor and the file;
//! - 4-bit linears with double quantisation hold ≈ 4.127 bits per parameter.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use qlora::model::config::ModelConfig;
use qlora::model::decoder::Decoder;
use qlora::model::weights::{SafetensorsWeights, WeightSource};
use qlora::model::{LinearWeight, LoadOptions, Model};
use qlora::quant::bnb_checkpoint::{save_quantized_decoder, save_quantized_model, torch_mean_f32};
use qlora::quant::{Quant4Config, QuantType};

/// `(transformers' 4-bit folder, its f32/bf16 source, our equivalent setting, load dtype)`.
const VARIANTS: [(&str, &str, Quant4Config, DType); 5] = [
    ("llama-nf4", "llama", QLORA, DType::F32),
    ("qwen2-nf4", "qwen2", QLORA, DType::F32),
    ("llama-tied-nf4", "llama-tied", QLORA, DType::F32),
    ("llama-fp4", "llama", FP4_PLAIN, DType::F32),
    // transformers loads a bf16 checkpoint in bf16 and quantises the bf16 values.
    ("llama-bf16-nf4", "llama-bf16", QLORA, DType::BF16),
];
const QLORA: Quant4Config = Quant4Config {
    quant_type: QuantType::Nf4,
    blocksize: 64,
    compress_statistics: true,
};
const FP4_PLAIN: Quant4Config = Quant4Config {
    quant_type: QuantType::Fp4,
    blocksize: 64,
    compress_statistics: false,
};

fn bnb_dir() -> PathBuf {
    let dir = common::reference_dir().join("bnb");
    assert!(
        dir.join("index.json").is_file(),
        "bitsandbytes reference data missing in {}: run `make reference`",
        dir.display()
    );
    dir
}

fn load_decoder(dir: &Path, quant: Option<Quant4Config>, dtype: DType) -> qlora::Result<Decoder> {
    let cfg = ModelConfig::from_hf_file(&dir.join("config.json"))?;
    let st = SafetensorsWeights::from_hf_dir(dir, &Device::Cpu)?.with_quantization(quant);
    Decoder::load(
        &cfg,
        &mut WeightSource::Safetensors(st),
        dtype,
        &Device::Cpu,
    )
}

fn reference(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn logits(d: &Decoder, input_ids: &Tensor) -> Tensor {
    d.forward(&input_ids.to_dtype(DType::U32).unwrap(), None, None)
        .unwrap()
}

/// name -> (dtype, shape, bytes) of every tensor in a safetensors file.
type RawFile = BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>;

fn read_raw(path: &Path) -> RawFile {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

fn write_raw(path: &Path, tensors: &RawFile) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, (dt, shape, data))| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*dt, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::tensor::serialize_to_file(views, Some(meta), path).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// A word-level tokenizer over the tiny models' 256 ids, for folders made before
/// make_tiny_models.py wrote tokenizers: `Model::load` needs one, these tests don't use it.
fn ensure_tokenizer(dir: &Path) {
    if dir.join("tokenizer.json").is_file() {
        return;
    }
    let vocab: serde_json::Map<String, serde_json::Value> = (0..256)
        .map(|i| (format!("t{i}"), serde_json::json!(i)))
        .collect();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
}

fn is_quant4(d: &Decoder) -> bool {
    d.layers.iter().all(|l| {
        l.linears()
            .iter()
            .all(|(_, lin)| matches!(lin.weight(), LinearWeight::Quant4(_)))
    }) && !matches!(d.lm_head.weight(), LinearWeight::Quant4(_))
}

/// (a) Quantising on load gives transformers' bytes: every tensor of the folder we write from
/// a `load_in_4bit` model equals the one transformers saved — packed codes, absmax, nested
/// state, code books, quant-state JSON, and the dense tensors it leaves alone.
#[test]
fn load_in_4bit_writes_the_bytes_transformers_writes() {
    let root = common::reference_dir();
    let bnb = bnb_dir();
    let tmp = tempfile::tempdir().unwrap();
    for (variant, source, cfg, dtype) in VARIANTS {
        let ours = load_decoder(&root.join(source), Some(cfg), dtype).unwrap();
        assert!(
            is_quant4(&ours),
            "{variant}: linears not all 4-bit / head quantised"
        );
        let out = tmp.path().join(variant);
        save_quantized_decoder(&ours, Some(&root.join(source)), &out).unwrap();
        let a = read_raw(&out.join("model.safetensors"));
        let b = read_raw(&bnb.join(variant).join("model.safetensors"));
        assert_eq!(
            a.keys().collect::<Vec<_>>(),
            b.keys().collect::<Vec<_>>(),
            "{variant}: tensor names"
        );
        let mut differing = Vec::new();
        for (name, (dt, shape, data)) in &a {
            let (dt2, shape2, data2) = &b[name];
            if (dt, shape) != (dt2, shape2) {
                differing.push(format!("{name}: {dt:?}{shape:?} vs {dt2:?}{shape2:?}"));
            } else if data != data2 {
                let what = if name.contains("quant_state") {
                    format!(
                        "{} vs {}",
                        String::from_utf8_lossy(data),
                        String::from_utf8_lossy(data2)
                    )
                } else {
                    let n = data.iter().zip(data2).filter(|(x, y)| x != y).count();
                    format!("{n} of {} bytes differ", data.len())
                };
                differing.push(format!("{name}: {what}"));
            }
        }
        assert!(
            differing.is_empty(),
            "{variant}: {} tensors differ from transformers':\n{}",
            differing.len(),
            differing.join("\n")
        );
        // config.json: transformers' quantization_config, byte for byte as a JSON value.
        let cfg_of = |p: &Path| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(p.join("config.json")).unwrap()).unwrap()
        };
        let (mut ours_q, mut theirs_q) = (
            cfg_of(&out)["quantization_config"].clone(),
            cfg_of(&bnb.join(variant))["quantization_config"].clone(),
        );
        if dtype != DType::F32 {
            // We compute in the load dtype; the reference asked bitsandbytes for f32 products.
            assert_eq!(ours_q["bnb_4bit_compute_dtype"], "bfloat16", "{variant}");
            ours_q["bnb_4bit_compute_dtype"] = theirs_q["bnb_4bit_compute_dtype"].take();
            theirs_q = ours_q.clone();
        }
        assert_eq!(ours_q, theirs_q, "{variant}: quantization_config");
        assert_eq!(
            cfg_of(&out)["dtype"],
            cfg_of(&bnb.join(variant))["dtype"],
            "{variant}"
        );
    }
}

/// (b) transformers' 4-bit folders load here (detected from their tensors) and give its logits.
#[test]
fn transformers_4bit_checkpoints_give_transformers_logits() {
    let bnb = bnb_dir();
    let root = common::reference_dir();
    let mut report = Vec::new();
    for (variant, source, cfg, dtype) in VARIANTS {
        if dtype != DType::F32 {
            // transformers keeps a bf16 checkpoint's dense weights and activations in bf16 even
            // when asked for dtype=float32 (its logits are bf16 computations, not comparable
            // at 1e-4); its bytes are checked in the test above.
            continue;
        }
        let dir = bnb.join(variant);
        let r = reference(&dir);
        let model = load_decoder(&dir, None, DType::F32).unwrap();
        assert!(is_quant4(&model), "{variant}");
        let want = flat(&r["logits"]);
        let diff = common::max_abs_diff(&flat(&logits(&model, &r["input_ids"])), &want);
        assert!(diff < 1e-4, "{variant}: max abs logit diff {diff}");
        // Quantising the f32 source on load gives the same model.
        let on_load = load_decoder(&root.join(source), Some(cfg), DType::F32).unwrap();
        let diff2 = common::max_abs_diff(&flat(&logits(&on_load, &r["input_ids"])), &want);
        assert!(
            diff2 < 1e-4,
            "{variant}: load_in_4bit logits differ by {diff2}"
        );
        report.push(format!("{variant}: {diff:.2e} (load_in_4bit {diff2:.2e})"));
    }
    eprintln!("max abs logit diffs vs transformers: {}", report.join(", "));
}

/// (c) A folder written here loads in transformers + bitsandbytes with the same logits; and
/// `Model::load` reads it back to the identical quantised weights.
#[test]
fn written_4bit_folder_loads_in_transformers() {
    let py = common::ref_python();
    let root = common::reference_dir();
    let tmp = tempfile::tempdir().unwrap();
    let mut report = Vec::new();
    for (source, cfg) in [
        ("llama", QLORA),
        ("qwen2", QLORA),
        ("llama-tied", FP4_PLAIN),
    ] {
        let src = tmp.path().join(format!("{source}-src"));
        copy_dir(&root.join(source), &src);
        ensure_tokenizer(&src);
        let opts = LoadOptions::default().load_in_4bit(cfg);
        let model = Model::load_with(src.to_str().unwrap(), &opts).unwrap();
        assert!(is_quant4(&model.decoder), "{source}");
        let out = tmp.path().join(format!("{source}-4bit"));
        save_quantized_model(&model, &out).unwrap();
        assert!(out.join("tokenizer.json").is_file(), "tokenizer not copied");

        let result = tmp.path().join(format!("{source}-check.safetensors"));
        let run = Command::new(&py)
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/bnb_reference.py"))
            .arg("--check")
            .arg(&out)
            .arg(&result)
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        assert!(
            run.status.success(),
            "transformers could not load {}:\n{}",
            out.display(),
            String::from_utf8_lossy(&run.stderr)
        );
        let theirs = candle_core::safetensors::load(&result, &Device::Cpu).unwrap();
        let ours = logits(&model.decoder, &theirs["input_ids"]);
        let diff = common::max_abs_diff(&flat(&ours), &flat(&theirs["logits"]));
        assert!(
            diff < 1e-4,
            "{source}: transformers' logits differ by {diff}"
        );

        // Round trip here: identical quantised weights and logits.
        let back = Model::load_with(out.to_str().unwrap(), &LoadOptions::default()).unwrap();
        for (l1, l2) in model.decoder.layers.iter().zip(&back.decoder.layers) {
            for ((name, a), (_, b)) in l1.linears().iter().zip(l2.linears().iter()) {
                match (a.weight(), b.weight()) {
                    (LinearWeight::Quant4(x), LinearWeight::Quant4(y)) => {
                        assert_eq!(x, y, "{source} {name}")
                    }
                    _ => panic!("{source} {name}: not 4-bit after reload"),
                }
            }
        }
        let again = logits(&back.decoder, &theirs["input_ids"]);
        assert_eq!(flat(&again), flat(&ours), "{source}: reloaded logits");
        report.push(format!("{source}: {diff:.2e}"));
    }
    eprintln!(
        "max abs logit diffs, ours vs transformers on our files: {}",
        report.join(", ")
    );
}

/// Rewrites a copy of transformers' llama-nf4 folder with `edit` and returns the load error.
fn corrupt(edit: impl FnOnce(&mut RawFile)) -> (String, PathBuf, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("broken-nf4");
    copy_dir(&bnb_dir().join("llama-nf4"), &dir);
    let file = dir.join("model.safetensors");
    let mut tensors = read_raw(&file);
    edit(&mut tensors);
    write_raw(&file, &tensors);
    let err = match load_decoder(&dir, None, DType::F32) {
        Ok(_) => panic!("the damaged checkpoint loaded"),
        Err(e) => e.to_string(),
    };
    (err, file, tmp)
}

/// A damage done to a checkpoint's tensors.
type Edit = Box<dyn FnOnce(&mut RawFile)>;

const Q: &str = "model.layers.0.self_attn.q_proj.weight";
const QS: &str = "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4";

fn set_json(t: &mut RawFile, json: &str) {
    let e = t.get_mut(QS).unwrap();
    e.1 = vec![json.len()];
    e.2 = json.as_bytes().to_vec();
}

/// (d) Damaged checkpoints: errors name the tensor and the file.
#[test]
fn damaged_4bit_checkpoints_name_tensor_and_file() {
    let cases: Vec<(&str, Edit, Vec<String>)> = vec![
        (
            "missing absmax",
            Box::new(|t: &mut RawFile| {
                t.remove(&format!("{Q}.absmax"));
            }),
            vec![format!("`{Q}.absmax` is missing")],
        ),
        (
            "quant state not JSON",
            Box::new(|t: &mut RawFile| set_json(t, "{\"quant_type\": nf4")),
            vec![format!("`{QS}`"), "not valid JSON".into()],
        ),
        (
            "shape mismatch",
            Box::new(|t: &mut RawFile| {
                set_json(
                    t,
                    r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [64, 32], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.38}"#,
                )
            }),
            vec![format!("`{QS}`"), "[64, 32]".into(), "[64, 64]".into()],
        ),
        (
            "truncated packed weight",
            Box::new(|t: &mut RawFile| {
                let e = t.get_mut(Q).unwrap();
                e.1 = vec![2000, 1];
                e.2.truncate(2000);
            }),
            vec![format!("`{Q}`"), "2000 packed bytes".into(), "2048".into()],
        ),
        (
            "absmax of the wrong length",
            Box::new(|t: &mut RawFile| {
                let e = t.get_mut(&format!("{Q}.absmax")).unwrap();
                e.1 = vec![60];
                e.2.truncate(60);
            }),
            vec![format!("`{Q}.absmax`"), "60 values".into()],
        ),
        (
            "quant state gone, packed weight left",
            Box::new(|t: &mut RawFile| {
                t.remove(QS);
            }),
            vec![format!("`{Q}` is U8")],
        ),
    ];
    for (what, edit, needles) in cases {
        let (err, file, _tmp) = corrupt(edit);
        assert!(
            err.contains(&file.display().to_string()),
            "{what}: error does not name {}: {err}",
            file.display()
        );
        for n in needles {
            assert!(err.contains(&n), "{what}: error lacks {n:?}: {err}");
        }
    }
}

/// A config.json that is not bitsandbytes 4-bit is refused with the file named.
#[test]
fn other_quantisation_configs_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("int8");
    copy_dir(&bnb_dir().join("llama-nf4"), &dir);
    ensure_tokenizer(&dir);
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["quantization_config"]["load_in_4bit"] = false.into();
    cfg["quantization_config"]["_load_in_4bit"] = false.into();
    cfg["quantization_config"]["load_in_8bit"] = true.into();
    std::fs::write(&path, cfg.to_string()).unwrap();
    let err = Model::load_with(dir.to_str().unwrap(), &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("config.json") && err.contains("8-bit"),
        "{err}"
    );
}

/// NF4 + double quantisation stores ≈ 4.127 bits per parameter in the linear layers, and the
/// model summary counts them under `nf4+dq`. A synthetic model with 512-wide layers (tiny ones
/// are dominated by the per-tensor nested absmax and offset).
#[test]
fn double_quantised_linears_hold_about_4_127_bits_per_parameter() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (h, m, v) = (512usize, 1024usize, 256usize);
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
        "intermediate_size": m, "num_hidden_layers": 1, "num_attention_heads": 8,
        "num_key_value_heads": 8, "vocab_size": v, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": false, "dtype": "float32"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    ensure_tokenizer(dir);
    let dev = Device::Cpu;
    let randn = |shape: &[usize]| Tensor::randn(0f32, 0.02, shape, &dev).unwrap();
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert("model.embed_tokens.weight".into(), randn(&[v, h]));
    t.insert("lm_head.weight".into(), randn(&[v, h]));
    t.insert(
        "model.norm.weight".into(),
        Tensor::ones(h, DType::F32, &dev).unwrap(),
    );
    let p = "model.layers.0";
    for n in ["input_layernorm", "post_attention_layernorm"] {
        t.insert(
            format!("{p}.{n}.weight"),
            Tensor::ones(h, DType::F32, &dev).unwrap(),
        );
    }
    for n in ["q_proj", "k_proj", "v_proj", "o_proj"] {
        t.insert(format!("{p}.self_attn.{n}.weight"), randn(&[h, h]));
    }
    t.insert(format!("{p}.mlp.gate_proj.weight"), randn(&[m, h]));
    t.insert(format!("{p}.mlp.up_proj.weight"), randn(&[m, h]));
    t.insert(format!("{p}.mlp.down_proj.weight"), randn(&[h, m]));
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();

    let opts = LoadOptions::default().load_in_4bit(Quant4Config::qlora());
    let model = Model::load_with(dir.to_str().unwrap(), &opts).unwrap();
    let (mut bytes, mut params) = (0usize, 0usize);
    for (name, lin) in model.decoder.layers[0].linears() {
        let bits = 8.0 * lin.storage_bytes() as f64 / lin.num_parameters() as f64;
        assert!((bits - 4.127).abs() < 0.002, "{name}: {bits} bits/param");
        bytes += lin.storage_bytes();
        params += lin.num_parameters();
    }
    let bits = 8.0 * bytes as f64 / params as f64;
    assert!((bits - 4.127).abs() < 0.001, "linears: {bits} bits/param");
    let summary = model.summary();
    assert_eq!(
        summary.linear_formats,
        BTreeMap::from([("nf4+dq".to_string(), params)]),
        "{summary}"
    );
    // The whole model: 4-bit linears plus the dense f32 embeddings, head and norms.
    let dense = (2 * v * h + 3 * h) * 4;
    assert_eq!(summary.weight_bytes, bytes + dense, "{summary}");
    eprintln!(
        "linear layers: {bits:.4} bits/param; whole model {:.3}",
        summary.bits_per_parameter()
    );
}

/// `load_in_4bit` on a GGUF keeps its GGML blocks (documented no-op).
#[test]
fn load_in_4bit_keeps_a_gguf_in_ggml() {
    let gguf = common::default_gguf();
    let opts = LoadOptions::default().load_in_4bit(Quant4Config::qlora());
    let model = Model::load_with(gguf.to_str().unwrap(), &opts).unwrap();
    for (name, lin) in model.decoder.layers[0].linears() {
        assert!(
            matches!(lin.weight(), LinearWeight::Ggml(_)),
            "{name} is {}",
            lin.format_name()
        );
    }
}

/// The double-quantisation offset is torch's f32 `mean()`; our replay of its summation order
/// agrees bit for bit at sizes that reach every level of its cascade.
#[test]
fn torch_mean_is_replayed_bit_for_bit() {
    let t =
        candle_core::safetensors::load(bnb_dir().join("means.safetensors"), &Device::Cpu).unwrap();
    let mut sizes = 0;
    for (name, x) in &t {
        let Some(n) = name.strip_prefix('x') else {
            continue;
        };
        let want = t[&format!("mean{n}")].to_vec1::<f32>().unwrap()[0];
        let got = torch_mean_f32(&x.to_vec1::<f32>().unwrap());
        assert_eq!(
            got.to_bits(),
            want.to_bits(),
            "n = {n}: {got} vs torch {want}"
        );
        sizes += 1;
    }
    assert!(sizes >= 10, "only {sizes} sizes in means.safetensors");
}
