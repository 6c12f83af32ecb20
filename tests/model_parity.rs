//! Our decoder against transformers on tiny random checkpoints (made by
//! tests/reference/make_tiny_models.py): logits within 1e-4, padded batches, greedy decoding.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use qlora::model::config::ModelConfig;
use qlora::model::decoder::{Decoder, KvCache};
use qlora::model::weights::{SafetensorsWeights, WeightSource};

fn load(dir: &Path) -> Decoder {
    let mut cfg = ModelConfig::from_hf_file(&dir.join("config.json")).unwrap();
    let gen = dir.join("generation_config.json");
    if gen.exists() {
        cfg.apply_generation_config(&gen).unwrap();
    }
    let st = SafetensorsWeights::from_hf_dir(dir, &Device::Cpu).unwrap();
    Decoder::load(
        &cfg,
        &mut WeightSource::Safetensors(st),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

fn reference(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap()
}

fn ids(t: &Tensor) -> Tensor {
    t.to_dtype(DType::U32).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

const VARIANTS: [&str; 8] = [
    "llama",
    "llama-tied",
    "llama3-rope",
    "llama-legacy",
    "llama-sharded",
    "llama-bf16",
    "mistral",
    "qwen2",
];

#[test]
fn logits_match_transformers_for_every_variant() {
    let root = common::reference_dir();
    for name in VARIANTS {
        let dir = root.join(name);
        let model = load(&dir);
        let r = reference(&dir);
        let logits = model.forward(&ids(&r["input_ids"]), None, None).unwrap();
        assert_eq!(logits.dims(), r["logits"].dims(), "{name}");
        let diff = common::max_abs_diff(&flat(&logits), &flat(&r["logits"]));
        assert!(diff < 1e-4, "{name}: max abs logit diff {diff}");
    }
}

#[test]
fn left_padded_batch_matches_transformers_on_real_tokens() {
    let root = common::reference_dir();
    for name in ["llama", "qwen2", "mistral"] {
        let dir = root.join(name);
        let model = load(&dir);
        let r = reference(&dir);
        let mask = &r["padded_attention_mask"];
        let logits = model
            .forward(&ids(&r["padded_input_ids"]), Some(mask), None)
            .unwrap();
        let m: Vec<Vec<i64>> = mask.to_vec2().unwrap();
        let (b, t, v) = logits.dims3().unwrap();
        let ours = flat(&logits);
        let theirs = flat(&r["padded_logits"]);
        for (row, row_mask) in m.iter().enumerate().take(b) {
            for (pos, &real) in row_mask.iter().enumerate().take(t) {
                if real == 0 {
                    continue;
                }
                let at = (row * t + pos) * v;
                let diff = common::max_abs_diff(&ours[at..at + v], &theirs[at..at + v]);
                assert!(diff < 1e-4, "{name} row {row} pos {pos}: diff {diff}");
            }
        }
    }
}

#[test]
fn kv_cache_decoding_equals_full_forward_and_greedy_matches_transformers() {
    let root = common::reference_dir();
    for name in ["llama", "llama3-rope", "qwen2"] {
        let dir = root.join(name);
        let model = load(&dir);
        let r = reference(&dir);
        let prompt: Vec<u32> = ids(&r["greedy_prompt"])
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let expected: Vec<u32> = ids(&r["greedy_output"])
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let gaps: Vec<f32> = flat(&r["greedy_top2_gap"]);
        let mut cache = KvCache::new(model.layers.len());
        let mut seq = prompt.clone();
        let mut input = Tensor::new(prompt.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        while seq.len() < expected.len() {
            let logits = model.forward_last(&input, None, Some(&mut cache)).unwrap();
            // The cached step must agree with a full forward over the whole sequence.
            let full_in = Tensor::new(seq.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let full = model.forward_last(&full_in, None, None).unwrap();
            let diff = common::max_abs_diff(&flat(&logits), &flat(&full));
            assert!(
                diff < 1e-4,
                "{name}: cached vs full diff {diff} at len {}",
                seq.len()
            );
            let next = logits.argmax(1).unwrap().to_vec1::<u32>().unwrap()[0];
            let step = seq.len() - prompt.len();
            if next != expected[seq.len()] {
                assert!(
                    gaps[step] < 1e-3,
                    "{name}: greedy step {step} chose {next}, transformers {} (gap {})",
                    expected[seq.len()],
                    gaps[step]
                );
                break;
            }
            seq.push(next);
            input = Tensor::new(&[next], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
        }
    }
}

#[test]
fn bad_checkpoints_give_errors_naming_the_file() {
    let root = common::reference_dir();
    let tmp = tempfile::tempdir().unwrap();
    // Truncated weights.
    let bytes = std::fs::read(root.join("llama/model.safetensors")).unwrap();
    std::fs::copy(
        root.join("llama/config.json"),
        tmp.path().join("config.json"),
    )
    .unwrap();
    std::fs::write(
        tmp.path().join("model.safetensors"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    let err = SafetensorsWeights::from_hf_dir(tmp.path(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("truncated"),
        "{err}"
    );

    // Shapes that disagree with the config.
    std::fs::write(tmp.path().join("model.safetensors"), &bytes).unwrap();
    let cfg_text = std::fs::read_to_string(root.join("llama/config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&cfg_text).unwrap();
    cfg["intermediate_size"] = 96.into();
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    let cfg = ModelConfig::from_hf_file(&tmp.path().join("config.json")).unwrap();
    let st = SafetensorsWeights::from_hf_dir(tmp.path(), &Device::Cpu).unwrap();
    let err = Decoder::load(
        &cfg,
        &mut WeightSource::Safetensors(st),
        DType::F32,
        &Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("mlp"),
        "{err}"
    );

    // A config.json with a missing field and one with an unknown architecture.
    std::fs::write(
        tmp.path().join("config.json"),
        r#"{"architectures": ["LlamaForCausalLM"]}"#,
    )
    .unwrap();
    let err = ModelConfig::from_hf_file(&tmp.path().join("config.json"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("config.json") && err.contains("hidden_size"),
        "{err}"
    );
    std::fs::write(
        tmp.path().join("config.json"),
        r#"{"architectures": ["BertModel"]}"#,
    )
    .unwrap();
    let err = ModelConfig::from_hf_file(&tmp.path().join("config.json"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("BertModel") && err.contains("supported"),
        "{err}"
    );
    std::fs::write(tmp.path().join("config.json"), "{not json").unwrap();
    let err = ModelConfig::from_hf_file(&tmp.path().join("config.json"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("config.json") && err.contains("JSON"), "{err}");
}

#[test]
fn bf16_and_f16_compute_stay_close_to_f32() {
    let root = common::reference_dir();
    let dir = root.join("llama");
    let cfg = ModelConfig::from_hf_file(&dir.join("config.json")).unwrap();
    let r = reference(&dir);
    for (dtype, tol) in [(DType::BF16, 0.25f32), (DType::F16, 0.05)] {
        let st = SafetensorsWeights::from_hf_dir(&dir, &Device::Cpu).unwrap();
        let model = Decoder::load(
            &cfg,
            &mut WeightSource::Safetensors(st),
            dtype,
            &Device::Cpu,
        )
        .unwrap();
        let logits = model.forward(&ids(&r["input_ids"]), None, None).unwrap();
        assert_eq!(logits.dtype(), dtype);
        let ours = flat(&logits.to_dtype(DType::F32).unwrap());
        let diff = common::max_abs_diff(&ours, &flat(&r["logits"]));
        assert!(
            diff < tol,
            "{dtype:?}: max abs diff {diff} vs f32 reference"
        );
        assert!(ours.iter().all(|v| v.is_finite()));
    }
}
