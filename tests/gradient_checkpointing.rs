//! Gradient checkpointing recomputes each block in the backward pass; the gradients it returns
//! must equal a plain backward's, dropout included.

mod common;

use candle_core::{Device, Module, Tensor, D};
use qlora::lora::{get_peft_model, LoraConfig};
use qlora::model::Model;

#[test]
fn checkpointed_gradients_equal_plain_gradients() {
    let dir = common::reference_dir().join("llama");
    let model = Model::load(dir.to_str().unwrap()).unwrap();
    let peft = get_peft_model(
        model,
        &LoraConfig::qlora().all_linear().r(4).lora_dropout(0.1),
    )
    .unwrap();
    for (name, var) in peft.trainable_parameters() {
        if name.contains("lora_B") {
            var.set(&Tensor::randn(0f32, 0.05, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    peft.train();
    let decoder = &peft.model().decoder;
    let ids = Tensor::new(
        &[[5u32, 17, 99, 3, 250, 41, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8]],
        &Device::Cpu,
    )
    .unwrap();
    let targets = ids.narrow(1, 1, 7).unwrap().flatten_all().unwrap();
    let loss_of = |hidden: &Tensor| -> qlora::Result<Tensor> {
        let logits = decoder.lm_head.forward(&hidden.narrow(1, 0, 7)?)?;
        let v = logits.dim(D::Minus1)?;
        Ok(candle_nn::loss::cross_entropy(
            &logits.reshape(((), v))?,
            &targets,
        )?)
    };
    let rng: Vec<_> = decoder
        .layers
        .iter()
        .map(|l| l.adapter_rng_states())
        .collect();

    let plain_loss = loss_of(&decoder.hidden_states(&ids, None, None).unwrap()).unwrap();
    let plain = plain_loss.backward().unwrap();

    for (layer, states) in decoder.layers.iter().zip(&rng) {
        layer.set_adapter_rng_states(states);
    }
    let (ck_loss, ck) = decoder.checkpointed_backward(&ids, None, loss_of).unwrap();
    let l1 = plain_loss.to_scalar::<f32>().unwrap();
    let l2 = ck_loss.to_scalar::<f32>().unwrap();
    assert!((l1 - l2).abs() < 1e-6, "losses {l1} vs {l2}");
    let params = peft.trainable_parameters();
    assert_eq!(params.len(), 2 * 7 * 2);
    for (name, var) in params {
        let a = plain
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("plain: no grad for {name}"));
        let b = ck
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("checkpointed: no grad for {name}"));
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let diff = common::max_abs_diff(&flat(a), &flat(b));
        let scale = flat(a).iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.0, "{name}: zero gradient");
        assert!(
            diff <= 1e-5 * scale.max(1.0),
            "{name}: gradients differ by {diff} (scale {scale})"
        );
    }
}

#[test]
fn the_switch_selects_checkpointing_and_gives_the_same_step() {
    let dir = common::reference_dir().join("llama");
    let mut peft = qlora::setup_qlora(
        Model::load(dir.to_str().unwrap()).unwrap(),
        &LoraConfig::qlora().r(2),
    )
    .unwrap();
    assert!(
        peft.is_gradient_checkpointing(),
        "setup_qlora turns checkpointing on, as PEFT does"
    );
    peft.eval();
    for (name, var) in peft.trainable_parameters() {
        if name.contains("lora_B") {
            var.set(&Tensor::randn(0f32, 0.05, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let ids = Tensor::new(&[[5u32, 17, 99, 3, 250, 41]], &Device::Cpu).unwrap();
    let run = |peft: &qlora::lora::PeftModel| {
        let head = &peft.model().decoder.lm_head;
        let (loss, grads) = peft
            .forward_backward(&ids, None, |h| Ok(head.forward(h)?.sqr()?.mean_all()?))
            .unwrap();
        let (_, b) = &peft.trainable_parameters()[1];
        (
            loss.to_scalar::<f32>().unwrap(),
            grads
                .get(b.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        )
    };
    let (l_ck, g_ck) = run(&peft);
    peft.set_gradient_checkpointing(false);
    let (l_plain, g_plain) = run(&peft);
    assert!((l_ck - l_plain).abs() < 1e-6);
    assert!(common::max_abs_diff(&g_ck, &g_plain) < 1e-6);
}
