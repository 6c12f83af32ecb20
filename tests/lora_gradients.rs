//! Every adapter matrix of every adapted layer receives gradient through the frozen, quantised
//! base — candle's fused ops would stop it silently, so this guards the whole decoder path.

mod common;

use candle_core::{Device, Tensor};
use qlora::lora::{get_peft_model, LoraConfig, PeftModel};
use qlora::model::Model;

fn check(config: &LoraConfig, expected_modules: usize) -> (usize, usize) {
    let model = Model::load(common::default_gguf().to_str().unwrap()).unwrap();
    let peft = get_peft_model(model, config).unwrap();
    assert_every_adapter_gets_gradient(&peft, expected_modules);
    peft.parameter_counts()
}

/// One next-token loss over a short chat-like sequence, backward, and every A and B matrix must
/// hold a finite, nonzero gradient.
fn assert_every_adapter_gets_gradient(peft: &PeftModel, expected_modules: usize) {
    // B starts at zero, so A's gradient is zero at init; give B values first.
    for (name, var) in peft.trainable_parameters() {
        if name.contains("lora_B") {
            let t = Tensor::randn(0f32, 0.01, var.shape(), &Device::Cpu).unwrap();
            var.set(&t).unwrap();
        }
    }
    let ids = Tensor::new(
        &[[1u32, 9690, 198, 2683, 359, 253, 5356, 5646]],
        &Device::Cpu,
    )
    .unwrap();
    let logits = peft.forward(&ids, None).unwrap();
    let loss = candle_nn::loss::cross_entropy(
        &logits.squeeze(0).unwrap().narrow(0, 0, 7).unwrap(),
        &ids.squeeze(0).unwrap().narrow(0, 1, 7).unwrap(),
    )
    .unwrap();
    let grads = loss.backward().unwrap();
    let params = peft.trainable_parameters();
    assert_eq!(params.len(), 2 * expected_modules);
    for (name, var) in params {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient reaches {name}"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            norm > 0.0 && norm.is_finite(),
            "{name}: gradient norm² {norm}"
        );
    }
}

#[test]
fn gradient_reaches_every_q_v_adapter() {
    let (trainable, all) = check(&LoraConfig::qlora(), 2 * 30);
    // 30 layers × (q: 16·(576+576) + v: 16·(576+192)).
    assert_eq!(trainable, 921_600);
    assert_eq!(all, 134_515_008 + 921_600);
}

#[test]
fn gradient_reaches_every_all_linear_adapter() {
    check(&LoraConfig::qlora().all_linear().r(4), 7 * 30);
}

#[test]
fn training_mode_with_dropout_backpropagates_on_the_gguf_base() {
    let model = Model::load(common::default_gguf().to_str().unwrap()).unwrap();
    let peft = qlora::setup_qlora(model, &LoraConfig::qlora()).unwrap();
    assert_every_adapter_gets_gradient(&peft, 2 * 30);
}

/// Generation with a trainable adapter runs inside `no_grad`: the same logits, no graph (so no
/// activation stays alive through the key/value cache), and gradients flow again afterwards.
#[test]
fn no_grad_records_nothing_and_changes_no_logit() {
    let model = Model::load(common::default_gguf().to_str().unwrap()).unwrap();
    let config = LoraConfig::qlora().modules_to_save(["lm_head"]);
    let peft = get_peft_model(model, &config).unwrap();
    let ids = Tensor::new(&[[1u32, 9690, 198, 2683, 359, 253]], &Device::Cpu).unwrap();
    // lora_B starts at zero, so these are the base model's logits.
    let base = qlora::ops::no_grad(|| peft.forward(&ids, None).unwrap());
    for (name, var) in peft.trainable_parameters() {
        if name.contains("lora_B") {
            let t = Tensor::randn(0f32, 0.01, var.shape(), &Device::Cpu).unwrap();
            var.set(&t).unwrap();
        }
    }
    let tracked = peft.forward(&ids, None).unwrap();
    assert!(
        tracked.track_op(),
        "outside no_grad the adapter records a graph"
    );
    let untracked = qlora::ops::no_grad(|| peft.forward(&ids, None).unwrap());
    assert!(!untracked.track_op(), "inside no_grad nothing is recorded");
    // The tolerance must sit far below what the adapters change, or the comparison proves nothing.
    let adapted_by = common::max_abs_diff_t(&tracked, &base);
    assert!(
        adapted_by > 0.05,
        "the adapters moved logits by only {adapted_by}"
    );
    // Under no_grad the frozen linears take the fused quantised kernel instead of
    // dequantise-then-gemm: another summation order, so f32 noise of ~1e-4 on logits near 20.
    let diff = common::max_abs_diff_t(&tracked, &untracked);
    assert!(diff < 1e-3, "logits differ by {diff}");
    // Decoding a single row takes the fused kernels under no_grad; it must agree as well.
    let last = ids.narrow(1, 5, 1).unwrap();
    let mut cache = qlora::model::KvCache::new(peft.model().config().num_hidden_layers);
    let step = qlora::ops::no_grad(|| {
        peft.model()
            .decoder
            .forward(&ids.narrow(1, 0, 5).unwrap(), None, Some(&mut cache))
            .unwrap();
        peft.model()
            .decoder
            .forward(&last, None, Some(&mut cache))
            .unwrap()
    });
    let want = tracked.narrow(1, 5, 1).unwrap();
    let diff = common::max_abs_diff_t(&want, &step);
    assert!(diff < 1e-3, "cached decoding step differs by {diff}");
    assert!(qlora::ops::grad_enabled());
    assert!(peft.forward(&ids, None).unwrap().track_op());
}
