//! merge_and_unload + save_pretrained: the merged model equals the adapted one, and the folder
//! we write loads in transformers with the same logits.

mod common;

use candle_core::{Device, Tensor};
use qlora::lora::{get_peft_model, LoraConfig};
use qlora::model::{Message, Model};

#[test]
fn merged_export_loads_in_transformers_with_the_same_logits() {
    let model = Model::load(common::default_gguf().to_str().unwrap()).unwrap();
    let mut peft = get_peft_model(model, &LoraConfig::qlora().all_linear().r(4)).unwrap();
    for (name, var) in peft.trainable_parameters() {
        if name.contains("lora_B") {
            var.set(&Tensor::randn(0f32, 0.02, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let ids_rows = vec![vec![1u32, 9690, 198, 2683, 359, 253, 5356, 5646]];
    let ids = Tensor::new(ids_rows.clone(), &Device::Cpu).unwrap();
    let adapted = peft.forward(&ids, None).unwrap();
    peft.disable_adapters();
    let base = peft.forward(&ids, None).unwrap();
    peft.enable_adapters();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(
        common::max_abs_diff(&flat(&adapted), &flat(&base)) > 1e-2,
        "adapter has no effect"
    );

    let merged = peft.merge_and_unload().unwrap();
    let merged_logits = merged.decoder.forward(&ids, None, None).unwrap();
    let diff = common::max_abs_diff(&flat(&adapted), &flat(&merged_logits));
    assert!(diff < 1e-3, "merged vs adapted logits differ by {diff}");

    let dir = tempfile::tempdir().unwrap();
    merged.save_pretrained(dir.path()).unwrap();
    let ids_json = dir.path().join("ids.json");
    std::fs::write(&ids_json, serde_json::to_string(&ids_rows).unwrap()).unwrap();
    let out = dir.path().join("logits.safetensors");
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/hf_logits.py");
    let status = std::process::Command::new(common::ref_python())
        .arg(script)
        .arg(dir.path())
        .arg(&ids_json)
        .arg(&out)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "transformers could not load the exported folder"
    );
    let theirs = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let diff = common::max_abs_diff(&flat(&merged_logits), &flat(&theirs["logits"]));
    assert!(
        diff < 1e-3,
        "transformers' logits on our export differ by {diff}"
    );

    // The exported tokenizer and chat template round-trip through our own loader too.
    let reloaded = Model::load(dir.path().to_str().unwrap()).unwrap();
    let msgs = [Message::user("Hi")];
    assert_eq!(
        reloaded.apply_chat_template(&msgs, true).unwrap(),
        merged.apply_chat_template(&msgs, true).unwrap()
    );
}
