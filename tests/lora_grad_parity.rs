//! LoRA gradient parity with PyTorch autograd (issue 3, "Proof: gradients"): for one batch, our
//! dL/dA and dL/dB of every adapter of every layer equal torch's within 1e-4 relative
//! (max |ours − torch| / max |torch| per tensor), with gradient checkpointing off and on, and the
//! loss equals transformers' causal-LM loss within 1e-5 relative. A test fails when any adapter
//! gets no gradient (or an all-zero one), or when the set of adapters differs from PEFT's.
//!
//! Data: `make reference` (target/reference/grad/, written by
//! `tests/reference/grad_reference.py` over the tiny checkpoints in target/reference/): a PEFT
//! adapter with nonzero B per case, the batch (ids, labels with -100), torch's loss and every
//! adapter matrix's gradient, and the same in float64 (printed for context: the f32 noise floor).

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use qlora::lora::PeftModel;
use qlora::model::Model;
use qlora::train::{causal_lm_loss, LossOptions};

/// Per-tensor gradient tolerance: max |ours − torch| / max |torch|.
const GRAD_TOL: f32 = 1e-4;
/// Loss tolerance, relative.
const LOSS_TOL: f64 = 1e-5;

/// The cases grad_reference.py writes; each is one test below.
const CASES: [&str; 9] = [
    "llama-qv",
    "llama-all-rslora",
    "qwen2-qv",
    "qwen2-all",
    "mistral-all",
    "llama-tied-qv",
    "llama3-rope-all",
    "llama-mts-head-norm",
    "qwen2-mts-embed-k",
];

fn grad_dir() -> PathBuf {
    let dir = common::reference_dir().join("grad");
    assert!(
        dir.join("index.json").is_file(),
        "gradient reference data missing in {}: run `make reference` first",
        dir.display()
    );
    dir
}

fn read_json(path: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e} (run `make reference`)", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn load_tensors(path: &std::path::Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e} (run `make reference`)", path.display()))
}

fn to_f32_vec(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, x| m.max(x.abs()))
}

/// max |a − b| / max |b|.
fn rel_diff(ours: &[f32], reference: &[f32]) -> f32 {
    common::max_abs_diff(ours, reference) / max_abs(reference)
}

/// Our loss and `saved key → gradient` for the case's batch.
fn ours(peft: &PeftModel, ids: &Tensor, labels: &Tensor) -> (f32, BTreeMap<String, Tensor>) {
    let head = &peft.model().decoder.lm_head;
    let (loss, grads) = peft
        .forward_backward(ids, None, |hidden| {
            causal_lm_loss(hidden, head, labels, &LossOptions::default()).map(|l| l.loss)
        })
        .unwrap();
    let mut out = BTreeMap::new();
    for (name, var) in peft.trainable_parameters() {
        let key = qlora::lora::saved_key(&name, "default");
        assert_ne!(
            key, name,
            "{name}: expected PEFT's in-memory `.default.` name"
        );
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient reaches {name}"));
        assert_eq!(g.dims(), var.dims(), "{name}: gradient shape");
        out.insert(key, g.clone());
    }
    (loss.to_scalar::<f32>().unwrap(), out)
}

fn check(case: &str) {
    let dir = grad_dir();
    let index = read_json(&dir.join("index.json"));
    let meta = &index["cases"][case];
    let base = meta["base"]
        .as_str()
        .unwrap_or_else(|| panic!("grad/index.json has no case `{case}`: run `make reference`"));
    let case_dir = dir.join(case);
    let reference = load_tensors(&case_dir.join("reference.safetensors"));
    let reference64 = load_tensors(&case_dir.join("reference_f64.safetensors"));
    let ids = &reference["input_ids"];
    let labels = &reference["labels"];
    assert_eq!(labels.dtype(), DType::I64);
    let torch_loss = reference["loss"].to_scalar::<f32>().unwrap() as f64;
    let torch_keys: BTreeSet<&str> = reference
        .keys()
        .map(String::as_str)
        .filter(|k| k.starts_with("base_model.model."))
        .collect();
    assert!(
        !torch_keys.is_empty(),
        "{case}: no gradients in the reference"
    );

    let model_dir = common::reference_dir().join(base);
    let model = Model::load(model_dir.to_str().unwrap()).unwrap();
    let mut peft = PeftModel::from_pretrained_trainable(model, case_dir.join("adapter")).unwrap();
    peft.train();

    for checkpointing in [false, true] {
        peft.set_gradient_checkpointing(checkpointing);
        let start = std::time::Instant::now();
        let (loss, grads) = ours(&peft, ids, labels);
        let elapsed = start.elapsed();
        let label = format!("{case} (gradient checkpointing {checkpointing})");

        let our_keys: BTreeSet<&str> = grads.keys().map(String::as_str).collect();
        assert_eq!(
            our_keys, torch_keys,
            "{label}: adapter matrices differ from PEFT's"
        );

        let loss_rel = (loss as f64 - torch_loss).abs() / torch_loss.abs();
        assert!(
            loss_rel <= LOSS_TOL,
            "{label}: loss {loss} vs torch {torch_loss} (rel {loss_rel:.2e})"
        );

        let mut worst = (0f32, String::new());
        let mut worst64 = 0f32;
        let mut torch_noise = 0f32;
        let mut failures = Vec::new();
        for (key, g) in &grads {
            let g = to_f32_vec(g);
            let t = to_f32_vec(&reference[key]);
            let t64 = to_f32_vec(&reference64[key]);
            let norm = max_abs(&g);
            if !(norm > 0.0 && norm.is_finite()) {
                failures.push(format!("{key}: gradient max |g| = {norm} (no gradient)"));
                continue;
            }
            let rel = rel_diff(&g, &t);
            if rel > GRAD_TOL || rel.is_nan() {
                failures.push(format!(
                    "{key}: rel diff {rel:.3e} (max |torch| {:.3e})",
                    max_abs(&t)
                ));
            }
            if rel > worst.0 {
                worst = (rel, key.clone());
            }
            worst64 = worst64.max(rel_diff(&g, &t64));
            torch_noise = torch_noise.max(rel_diff(&t, &t64));
        }
        println!(
            "{label}: {} tensors, loss {loss:.6} (torch {torch_loss:.6}, rel {loss_rel:.1e}); \
             max rel grad diff vs torch f32 {:.2e} ({}), vs torch f64 {worst64:.2e}; \
             torch f32 vs f64 {torch_noise:.2e}; forward+backward {elapsed:.1?}",
            grads.len(),
            worst.0,
            worst.1
        );
        assert!(
            failures.is_empty(),
            "{label}: gradients differ from torch autograd beyond {GRAD_TOL} relative:\n  {}",
            failures.join("\n  ")
        );
    }
}

#[test]
fn reference_lists_exactly_the_tested_cases() {
    let index = read_json(&grad_dir().join("index.json"));
    let listed: BTreeSet<&str> = index["cases"]
        .as_object()
        .expect("grad/index.json: cases")
        .keys()
        .map(String::as_str)
        .collect();
    let tested: BTreeSet<&str> = CASES.into_iter().collect();
    assert_eq!(
        listed, tested,
        "grad_reference.py's cases and this test's differ (stale data: run `make reference`)"
    );
}

#[test]
fn llama_q_v() {
    check("llama-qv");
}

#[test]
fn llama_all_linear_rslora() {
    check("llama-all-rslora");
}

#[test]
fn qwen2_q_v_with_biases() {
    check("qwen2-qv");
}

#[test]
fn qwen2_all_linear() {
    check("qwen2-all");
}

#[test]
fn mistral_all_linear() {
    check("mistral-all");
}

#[test]
fn llama_tied_embeddings_q_v() {
    check("llama-tied-qv");
}

#[test]
fn llama3_rope_all_linear() {
    check("llama3-rope-all");
}

#[test]
fn llama_modules_to_save_head_and_norms() {
    check("llama-mts-head-norm");
}

#[test]
fn qwen2_modules_to_save_embeddings_and_k_proj() {
    check("qwen2-mts-embed-k");
}
