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
