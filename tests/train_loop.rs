//! The training loop on a tiny random Llama: it learns, gradient accumulation equals one big
//! batch, resuming reproduces the uninterrupted run, NaN stops the run and spares the last
//! checkpoint, early stopping restores the best adapter, checkpoints rotate.

mod common;

use qlora::data::{DataConfig, Record, SftDataset};
use qlora::lora::{LoraConfig, PeftModel};
use qlora::model::Model;
use qlora::train::{
    latest_checkpoint, list_checkpoints, load_checkpoint, train, Progress, ResumeFrom, StopReason,
    TrainConfig,
};
use qlora::Error;

fn tiny_model() -> Model {
    let dir = common::reference_dir().join("llama");
    Model::load(dir.to_str().unwrap()).expect("tiny llama from make reference")
}

fn records(n: usize) -> Vec<Record> {
    (0..n)
        .map(|i| Record::PromptCompletion {
            prompt: format!("count {i} and"),
            completion: format!(" {} {} {}", i + 1, i + 2, i + 3),
        })
        .collect()
}

fn dataset(model: &Model, n: usize, validation: f64) -> SftDataset {
    let config = DataConfig::default().validation_split(validation);
    SftDataset::from_records(records(n), model, &config).unwrap()
}

fn peft(dropout: f64) -> (PeftModel, SftDataset) {
    let model = tiny_model();
    let data = dataset(&model, 24, 0.0);
    let config = LoraConfig {
        lora_dropout: dropout,
        ..LoraConfig::qlora().all_linear()
    };
    (PeftModel::new_seeded(model, &config, 7).unwrap(), data)
}

fn quiet() -> TrainConfig {
    TrainConfig::default().progress(Progress::Silent)
}

fn adapter_values(p: &PeftModel) -> Vec<f32> {
    p.trainable_parameters()
        .iter()
        .flat_map(|(_, v)| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

#[test]
fn the_loss_falls_when_overfitting_a_small_set() {
    let (mut p, data) = peft(0.0);
    let run = train(
        &mut p,
        &data,
        &quiet().epochs(6.0).batch_size(4).learning_rate(5e-3),
    )
    .unwrap();
    assert_eq!(run.total_steps, 36);
    assert_eq!(run.history.len(), 36);
    let first = run.history[0].loss;
    let last = run.final_loss().unwrap();
    assert!(last < 0.6 * first, "loss {first} → {last}");
    assert_eq!(run.stop_reason, StopReason::Completed);
    let frame = run.history_frame().unwrap();
    assert_eq!(frame.height(), 36);
    assert_eq!(
        frame
            .get_column_names()
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>(),
        [
            "step",
            "epoch",
            "loss",
            "eval_loss",
            "lr",
            "grad_norm",
            "tokens_per_sec"
        ]
    );
    assert!(run.loss_plot_svg().starts_with("<svg"));
}

#[test]
fn gradient_accumulation_equals_one_big_batch() {
    let (mut a, data) = peft(0.0);
    let (mut b, _) = peft(0.0);
    let base = quiet().max_steps(3).learning_rate(1e-3).max_grad_norm(None);
    let ra = train(&mut a, &data, &base.clone().batch_size(8)).unwrap();
    let rb = train(
        &mut b,
        &data,
        &base.batch_size(2).gradient_accumulation_steps(4),
    )
    .unwrap();
    for (x, y) in ra.history.iter().zip(&rb.history) {
        assert!((x.loss - y.loss).abs() < 1e-5, "{x:?} vs {y:?}");
        assert!((x.grad_norm - y.grad_norm).abs() < 1e-4 * x.grad_norm.max(1.0));
    }
    let diff = common::max_abs_diff(&adapter_values(&a), &adapter_values(&b));
    assert!(diff < 1e-5, "adapters differ by {diff}");
}

#[test]
fn resuming_from_a_checkpoint_reproduces_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut a, data) = peft(0.1);
    let config = quiet()
        .max_steps(6)
        .batch_size(4)
        .learning_rate(2e-3)
        .save_steps(2)
        .output_dir(tmp.path().join("a"));
    let full = train(&mut a, &data, &config).unwrap();

    // A fresh model resumes from step 2's checkpoint of the first run.
    let (mut b, _) = peft(0.1);
    let ck = tmp.path().join("a/checkpoint-2");
    let resumed_config = config
        .clone()
        .output_dir(tmp.path().join("b"))
        .resume_from(ResumeFrom::Path(ck));
    let resumed = train(&mut b, &data, &resumed_config).unwrap();
    assert_eq!(resumed.resumed_from_step, Some(2));
    assert_eq!(resumed.history.len(), 6);
    for (x, y) in full.history.iter().zip(&resumed.history) {
        assert!(
            (x.loss - y.loss).abs() < 1e-6,
            "step {}: {} vs {}",
            x.step,
            x.loss,
            y.loss
        );
    }
    let diff = common::max_abs_diff(&adapter_values(&a), &adapter_values(&b));
    assert!(diff < 1e-6, "adapters differ by {diff}");

    // Another run's checkpoint is refused with a reason.
    let (mut c, _) = peft(0.1);
    let other = config
        .clone()
        .batch_size(2)
        .output_dir(tmp.path().join("c"))
        .resume_from(ResumeFrom::Path(tmp.path().join("a/checkpoint-4")));
    let err = train(&mut c, &data, &other).unwrap_err();
    assert!(matches!(err, Error::Checkpoint { .. }), "{err}");
    assert!(err.to_string().contains("batch_size"), "{err}");
}

#[test]
fn a_nan_loss_stops_naming_the_step_and_spares_the_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut p, data) = peft(0.0);
    // A learning rate this large overflows the adapters after the first update.
    let config = quiet()
        .max_steps(10)
        .learning_rate(1e30)
        .max_grad_norm(None)
        .save_steps(1)
        .output_dir(tmp.path());
    let err = train(&mut p, &data, &config).unwrap_err();
    let Error::NonFinite(nf) = &err else {
        panic!("expected a non-finite error, got {err}");
    };
    assert!(nf.step >= 2, "{err}");
    assert!(
        err.to_string().contains(&format!("step {}", nf.step)),
        "{err}"
    );
    let last = latest_checkpoint(tmp.path())
        .unwrap()
        .expect("a checkpoint");
    let ck = load_checkpoint(&last, &qlora::candle_core::Device::Cpu).unwrap();
    assert_eq!(ck.state.global_step, nf.step - 1);
    assert!(ck.state.history.iter().all(|r| r.loss.is_finite()));
}

#[test]
fn early_stopping_restores_the_best_adapter() {
    let model = tiny_model();
    let data = dataset(&model, 30, 0.2);
    assert!(!data.validation.is_empty());
    let mut p = PeftModel::new_seeded(model, &LoraConfig::qlora(), 3).unwrap();
    // Diverging on purpose: the evaluation loss gets worse after the first steps.
    let config = quiet()
        .max_steps(40)
        .batch_size(4)
        .learning_rate(0.5)
        .max_grad_norm(None)
        .eval_steps(1)
        .early_stopping(2);
    let run = train(&mut p, &data, &config).unwrap();
    let StopReason::EarlyStopped { step, best_step } = run.stop_reason else {
        panic!("did not stop early: {:?}", run.eval_losses());
    };
    assert_eq!(step, best_step + 2);
    let (best, at) = run.best_eval.unwrap();
    assert_eq!(at, best_step);
    // The restored adapter gives the best evaluation loss again.
    let again = qlora::train::evaluate_loss(&p, &data.validation, data.pad_token_id, 8).unwrap();
    assert!((again - best).abs() < 1e-6, "{again} vs best {best}");
}

#[test]
fn checkpoints_rotate_and_bad_configs_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut p, data) = peft(0.0);
    let config = quiet()
        .max_steps(5)
        .save_steps(1)
        .save_total_limit(2)
        .output_dir(tmp.path());
    train(&mut p, &data, &config).unwrap();
    let steps: Vec<usize> = list_checkpoints(tmp.path())
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(steps, [4, 5]);
    for name in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "history.csv",
        "history.json",
        "loss.svg",
    ] {
        assert!(tmp.path().join(name).is_file(), "{name} missing");
    }

    let bad = [
        quiet().batch_size(0),
        quiet().gradient_accumulation_steps(0),
        quiet().save_steps(3),     // no output_dir
        quiet().early_stopping(2), // no validation split
        quiet().learning_rate(f64::NAN),
    ];
    for config in bad {
        let err = train(&mut p, &data, &config).unwrap_err();
        assert!(err.to_string().contains("TrainConfig."), "{err}");
    }
}

/// PEFT's `modules_to_save`: the head and the final norm are trained in full beside the LoRA
/// matrices, resume restores them, the saved adapter reproduces the trained model, and the
/// base's own parameters never change.
#[test]
fn modules_to_save_train_resume_and_leave_the_base_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let config = LoraConfig::qlora()
        .r(4)
        .modules_to_save(["lm_head", "model.norm"]);
    let make = || {
        let model = tiny_model();
        let data = dataset(&model, 24, 0.0);
        (PeftModel::new_seeded(model, &config, 7).unwrap(), data)
    };
    let ids =
        candle_core::Tensor::new(&[[5u32, 17, 99, 200, 3, 64]], &candle_core::Device::Cpu).unwrap();
    let logits = |m: &PeftModel| -> Vec<f32> {
        m.forward(&ids, None)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let base_logits = {
        let model = tiny_model();
        model
            .decoder
            .forward(&ids, None, None)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };

    let (mut a, data) = make();
    let names: Vec<String> = a
        .trainable_parameters()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(names.contains(&"base_model.model.lm_head.modules_to_save.default.weight".into()));
    assert!(names.contains(&"base_model.model.model.norm.modules_to_save.default.weight".into()));
    let head_before = a
        .saved_modules()
        .find(|(p, _)| *p == "lm_head")
        .map(|(_, m)| m.parameters()[0].1.as_tensor().copy().unwrap())
        .expect("lm_head is trained in full");
    let train_config = quiet()
        .max_steps(6)
        .batch_size(4)
        .learning_rate(2e-3)
        .save_steps(2)
        .output_dir(tmp.path().join("a"));
    train(&mut a, &data, &train_config).unwrap();
    let head_after = a
        .saved_modules()
        .find(|(p, _)| *p == "lm_head")
        .map(|(_, m)| m.parameters()[0].1.as_tensor().clone())
        .unwrap();
    let moved = (head_after - head_before)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        moved > 1e-4,
        "the lm_head copy did not train (moved {moved})"
    );

    // With adapters disabled the model is exactly the base: its originals were never written.
    let trained = logits(&a);
    a.disable_adapters();
    assert_eq!(logits(&a), base_logits);
    a.enable_adapters();
    assert_eq!(logits(&a), trained);

    // The saved adapter (with the full copies) reproduces the trained model.
    let reloaded = PeftModel::from_pretrained(tiny_model(), tmp.path().join("a")).unwrap();
    let d = common::max_abs_diff(&logits(&reloaded), &trained);
    assert!(d < 1e-5, "reloaded logits differ by {d}");

    // Resuming from step 2 restores the copies and their optimiser state too.
    let (mut b, _) = make();
    let resumed = train_config
        .clone()
        .output_dir(tmp.path().join("b"))
        .resume_from(ResumeFrom::Path(tmp.path().join("a/checkpoint-2")));
    train(&mut b, &data, &resumed).unwrap();
    let diff = common::max_abs_diff(&adapter_values(&a), &adapter_values(&b));
    assert!(diff < 1e-6, "resumed run differs by {diff}");
}

#[test]
fn bad_modules_to_save_are_named() {
    let err = PeftModel::new_seeded(
        tiny_model(),
        &LoraConfig::qlora().modules_to_save(["mlp"]),
        0,
    )
    .unwrap_err();
    assert!(err.to_string().contains("`mlp` matches no module"), "{err}");
    let err = PeftModel::new_seeded(
        tiny_model(),
        &LoraConfig::qlora().modules_to_save(["q_proj"]),
        0,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("both a LoRA target")
            && err.to_string().contains("model.layers.0.self_attn.q_proj"),
        "{err}"
    );
}
