//! The training core against PyTorch/transformers (reference data from
//! tests/reference/train_reference.py): AdamW parameter trajectories, learning-rate schedules,
//! `clip_grad_norm_`, and `ForCausalLMLoss` values and gradients — plus chunking invariance and a
//! few real optimiser steps on the default model that lower its loss.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use qlora::lora::{get_peft_model, LoraConfig};
use qlora::model::{Linear, Model};
use qlora::train::{
    causal_lm_loss, clip_grad_norm, AdamW, AdamWConfig, LossOptions, LrSchedule, SchedulerType,
    Warmup,
};
use serde_json::Value;

/// The reference data, or a failure that says how to make it.
fn reference() -> (HashMap<String, Tensor>, Value) {
    let dir: PathBuf = common::reference_dir().join("train");
    assert!(
        dir.join("index.json").is_file(),
        "training reference data missing in {}: run `make reference`",
        dir.display()
    );
    let tensors = candle_core::safetensors::load(dir.join("train.safetensors"), &Device::Cpu)
        .expect("train.safetensors readable");
    let meta = serde_json::from_str(&std::fs::read_to_string(dir.join("train.json")).unwrap())
        .expect("train.json parses");
    (tensors, meta)
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Largest `|a − b| / max(|b|, floor)`.
fn max_rel_diff(a: &[f32], b: &[f32], floor: f32) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(floor))
        .fold(0.0, f32::max)
}

/// A gradient store holding exactly `grads[i]` for `vars[i]`: the gradient of Σ⟨var, g⟩.
fn store(vars: &[Var], grads: &[Tensor]) -> GradStore {
    let mut total = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
    for (v, g) in vars.iter().zip(grads) {
        total = (total + (v.as_tensor() * g).unwrap().sum_all().unwrap()).unwrap();
    }
    let store = total.backward().unwrap();
    for (v, g) in vars.iter().zip(grads) {
        assert_eq!(f32s(store.get(v.as_tensor()).unwrap()), f32s(g));
    }
    store
}

fn schedule_of(cfg: &Value, steps: usize) -> LrSchedule {
    let kind: SchedulerType = serde_json::from_value(cfg["schedule"]["kind"].clone()).unwrap();
    let warmup = cfg["schedule"]["warmup_steps"].as_u64().unwrap() as usize;
    LrSchedule::new(kind, cfg["lr"].as_f64().unwrap(), steps).warmup(Warmup::Steps(warmup))
}

#[test]
fn adamw_matches_torch_step_for_step() {
    let (t, meta) = reference();
    for (case, cfg) in meta["adam"].as_object().unwrap() {
        let steps = cfg["steps"].as_u64().unwrap() as usize;
        let n = cfg["num_params"].as_u64().unwrap() as usize;
        let config = AdamWConfig::default()
            .betas(
                cfg["beta1"].as_f64().unwrap(),
                cfg["beta2"].as_f64().unwrap(),
            )
            .eps(cfg["eps"].as_f64().unwrap())
            .weight_decay(cfg["weight_decay"].as_f64().unwrap());
        let schedule = schedule_of(cfg, steps);
        let vars: Vec<Var> = (0..n)
            .map(|i| Var::from_tensor(&t[&format!("adam.{case}.init.{i}")]).unwrap())
            .collect();
        let named = |vars: &[Var]| -> Vec<(String, Var)> {
            vars.iter()
                .enumerate()
                .map(|(i, v)| (format!("p{i}"), v.clone()))
                .collect()
        };
        let mut opt = AdamW::new(named(&vars), config).unwrap();
        let (mut worst, mut worst_fused) = (0f32, 0f32);
        for k in 0..steps {
            let lr = schedule.lr_at(k);
            let torch_lr = cfg["lrs"][k].as_f64().unwrap();
            assert!(
                (lr - torch_lr).abs() <= 1e-12 * torch_lr.abs(),
                "{case} lr {k}"
            );
            let grads: Vec<Tensor> = (0..n)
                .map(|i| t[&format!("adam.{case}.grad.{k}.{i}")].clone())
                .collect();
            opt.step(&store(&vars, &grads), lr).unwrap();
            for (i, v) in vars.iter().enumerate() {
                let ours = f32s(v.as_tensor());
                let theirs = f32s(&t[&format!("adam.{case}.param.{k}.{i}")]);
                let fused = f32s(&t[&format!("adam.{case}.fused.{k}.{i}")]);
                worst = worst.max(max_rel_diff(&ours, &theirs, 1e-3));
                worst_fused = worst_fused.max(max_rel_diff(&ours, &fused, 1e-3));
            }
            // Mid-run: a checkpointed state restored into a fresh optimiser continues
            // bit-identically.
            if k == 1 {
                let state = opt.state_dict().unwrap();
                let mut resumed = AdamW::new(named(&vars), config).unwrap();
                resumed.load_state_dict(state).unwrap();
                opt = resumed;
            }
        }
        println!("adamw {case}: max rel diff vs torch {worst:e} (vs fused {worst_fused:e})");
        assert!(worst <= 1e-6, "{case}: {worst}");
        assert!(worst_fused <= 1e-5, "{case} fused: {worst_fused}");
    }
}

#[test]
fn schedules_match_transformers() {
    let (_, meta) = reference();
    let cases = meta["schedules"].as_array().unwrap();
    assert!(cases.len() >= 16);
    let mut worst = 0f64;
    for c in cases {
        let schedule = LrSchedule::new(
            serde_json::from_value(c["kind"].clone()).unwrap(),
            c["learning_rate"].as_f64().unwrap(),
            c["total_steps"].as_u64().unwrap() as usize,
        )
        .warmup(serde_json::from_value(c["warmup"].clone()).unwrap())
        .num_cycles(c["num_cycles"].as_f64().unwrap());
        assert_eq!(
            schedule.warmup_steps() as u64,
            c["warmup_steps"].as_u64().unwrap(),
            "{c}"
        );
        for (step, lr) in c["lrs"].as_array().unwrap().iter().enumerate() {
            let want = lr.as_f64().unwrap();
            let got = schedule.lr_at(step);
            let rel = (got - want).abs() / want.abs().max(f64::MIN_POSITIVE);
            if want == 0.0 {
                assert!(got.abs() < 1e-20, "{} step {step}: {got} vs 0", c["kind"]);
            } else {
                worst = worst.max(rel);
            }
        }
    }
    println!("schedules: {} cases, max rel diff {worst:e}", cases.len());
    assert!(worst <= 1e-12, "{worst}");
}

#[test]
fn clip_grad_norm_matches_torch() {
    let (t, meta) = reference();
    for (case, cfg) in meta["clip"].as_object().unwrap() {
        let n = cfg["num_params"].as_u64().unwrap() as usize;
        let grads: Vec<Tensor> = (0..n)
            .map(|i| t[&format!("clip.{case}.grad.{i}")].clone())
            .collect();
        let params: Vec<(String, Var)> = grads
            .iter()
            .enumerate()
            .map(|(i, g)| {
                (
                    format!("p{i}"),
                    Var::zeros(g.shape(), DType::F32, &Device::Cpu).unwrap(),
                )
            })
            .collect();
        let vars: Vec<Var> = params.iter().map(|(_, v)| v.clone()).collect();
        let mut store = store(&vars, &grads);
        let max_norm = cfg["max_norm"].as_f64().unwrap();
        let out = clip_grad_norm(&mut store, &params, max_norm).unwrap();
        let want = cfg["norm"].as_f64().unwrap() as f32;
        let norm_rel = (out.norm - want).abs() / want;
        let mut worst = 0f32;
        for (i, v) in vars.iter().enumerate() {
            let ours = f32s(store.get(v.as_tensor()).unwrap());
            let theirs = f32s(&t[&format!("clip.{case}.clipped.{i}")]);
            worst = worst.max(max_rel_diff(&ours, &theirs, 1e-6));
        }
        println!(
            "clip {case}: norm {} vs torch {want} (rel {norm_rel:e}), coef {}, grads max rel {worst:e}",
            out.norm, out.clip_coef
        );
        assert!(norm_rel <= 1e-6, "{case}: norm {} vs {want}", out.norm);
        assert!(worst <= 1e-6, "{case}: clipped grads differ by {worst}");
    }
}

#[test]
fn causal_lm_loss_matches_transformers_value_and_gradient() {
    let (t, meta) = reference();
    for (case, cfg) in meta["loss"].as_object().unwrap() {
        let hidden = Var::from_tensor(&t[&format!("loss.{case}.hidden")]).unwrap();
        let head = Linear::dense(t[&format!("loss.{case}.weight")].clone(), None);
        let labels = &t[&format!("loss.{case}.labels")];
        let count = cfg["count"].as_u64().unwrap() as usize;
        for key in ["mean", "items"] {
            let items = cfg[format!("num_items_{key}")].as_u64().map(|n| n as usize);
            let want = cfg[format!("loss_{key}")].as_f64().unwrap() as f32;
            let want_g = f32s(&t[&format!("loss.{case}.grad_{key}")]);
            for rows in [1, 5, 4096] {
                let opts = LossOptions::default()
                    .chunk_rows(rows)
                    .num_items_in_batch(items);
                let out = causal_lm_loss(hidden.as_tensor(), &head, labels, &opts).unwrap();
                assert_eq!(out.num_tokens, count);
                let grads = out.loss.backward().unwrap();
                let g = f32s(grads.get(hidden.as_tensor()).unwrap());
                let gd = common::max_abs_diff(&g, &want_g);
                let gmax = want_g.iter().fold(0f32, |m, x| m.max(x.abs()));
                if rows == 5 {
                    println!(
                        "loss {case}/{key}: {} vs {want} (diff {:e}); grad max abs diff {gd:e} (max |g| {gmax:e})",
                        out.value,
                        (out.value - want).abs()
                    );
                }
                assert!(
                    (out.value - want).abs() <= 1e-5,
                    "{case}/{key}/{rows}: {} vs {want}",
                    out.value
                );
                assert!(gd <= 1e-5, "{case}/{key}/{rows}: grad diff {gd}");
            }
        }
    }
}

#[test]
fn chunked_loss_equals_unchunked_composition() {
    let (t, _) = reference();
    let case = "vocab49k";
    let hidden = Var::from_tensor(&t[&format!("loss.{case}.hidden")]).unwrap();
    let w = t[&format!("loss.{case}.weight")].clone();
    let labels = &t[&format!("loss.{case}.labels")];
    // The plain way: full logits, candle's cross_entropy, autograd end to end.
    let (b, tt, h) = hidden.as_tensor().dims3().unwrap();
    let lab = labels.to_vec2::<i64>().unwrap();
    let (mut pos, mut tgt) = (vec![], vec![]);
    for (bi, row) in lab.iter().enumerate() {
        for (ti, &y) in row.iter().enumerate().skip(1) {
            if y != -100 {
                pos.push((bi * tt + ti - 1) as u32);
                tgt.push(y as u32);
            }
        }
    }
    let rows = hidden
        .as_tensor()
        .reshape((b * tt, h))
        .unwrap()
        .index_select(&Tensor::new(pos.as_slice(), &Device::Cpu).unwrap(), 0)
        .unwrap();
    let logits = rows.matmul(&w.t().unwrap()).unwrap();
    let plain = candle_nn::loss::cross_entropy(
        &logits,
        &Tensor::new(tgt.as_slice(), &Device::Cpu).unwrap(),
    )
    .unwrap();
    let plain_v = plain.to_scalar::<f32>().unwrap();
    let plain_g = f32s(plain.backward().unwrap().get(hidden.as_tensor()).unwrap());
    let head = Linear::dense(w, None);
    let mut values = vec![];
    for rows in [1, 7, 10_000] {
        let out = causal_lm_loss(
            hidden.as_tensor(),
            &head,
            labels,
            &LossOptions::default().chunk_rows(rows),
        )
        .unwrap();
        let g = f32s(
            out.loss
                .backward()
                .unwrap()
                .get(hidden.as_tensor())
                .unwrap(),
        );
        assert!(
            (out.value - plain_v).abs() <= 1e-5,
            "{rows}: {} vs {plain_v}",
            out.value
        );
        assert!(common::max_abs_diff(&g, &plain_g) <= 1e-6, "{rows}");
        values.push(out.value);
    }
    // Chunking changes only the order of an f64 sum.
    assert!((values[0] - values[2]).abs() <= 1e-6, "{values:?}");
}

#[test]
fn a_few_steps_on_the_default_model_lower_the_loss() {
    let model = Model::load(common::default_gguf().to_str().unwrap()).unwrap();
    let mut peft = get_peft_model(model, &LoraConfig::qlora()).unwrap();
    peft.set_gradient_checkpointing(true);
    let params = peft.trainable_parameters();
    let mut opt = AdamW::new(params.clone(), AdamWConfig::default().weight_decay(0.01)).unwrap();
    let ids = Tensor::new(
        &[[
            1u32, 9690, 198, 2683, 359, 253, 5356, 5646, 30, 2683, 359, 3593, 28, 30,
        ]],
        &Device::Cpu,
    )
    .unwrap();
    // Mask the first few positions, as completion-only training masks the prompt.
    let mut lab: Vec<i64> = ids.to_vec2::<u32>().unwrap()[0]
        .iter()
        .map(|&x| x as i64)
        .collect();
    lab[..4].fill(-100);
    let labels = Tensor::new(lab.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let opts = LossOptions::for_vocab(peft.model().config().vocab_size).chunk_rows(4);
    let head = &peft.model().decoder.lm_head;
    let eval_loss = |peft: &qlora::lora::PeftModel| {
        peft.eval();
        let h = peft
            .model()
            .decoder
            .hidden_states(&ids, None, None)
            .unwrap();
        causal_lm_loss(&h, head, &labels, &opts).unwrap().value
    };
    let before = eval_loss(&peft);
    let schedule = LrSchedule::new(SchedulerType::Constant, 2e-3, 4);
    let start = std::time::Instant::now();
    for step in 0..4 {
        peft.train();
        let mut count = 0;
        let (loss, mut grads) = peft
            .forward_backward(&ids, None, |h| {
                let out = causal_lm_loss(h, head, &labels, &opts)?;
                count = out.num_tokens;
                Ok(out.loss)
            })
            .unwrap();
        assert_eq!(count, 10);
        let value = loss.to_scalar::<f32>().unwrap();
        let norm = clip_grad_norm(&mut grads, &params, 1.0).unwrap();
        norm.check(step).unwrap();
        println!("step {step}: loss {value:.4}, grad norm {:.4}", norm.norm);
        opt.step(&grads, schedule.lr_at(step)).unwrap();
    }
    let elapsed = start.elapsed();
    let after = eval_loss(&peft);
    println!("default model: loss {before:.4} -> {after:.4} in 4 steps ({elapsed:.1?})");
    assert!(after < before - 0.1, "{before} -> {after}");
    assert_eq!(opt.step_count(), 4);
}
