//! GGUF bases in K-quant and F16 formats: a model written with Q4_K / Q5_K / Q6_K / Q8_0 linear
//! layers and an F16 embedding gives the same logits as the same (dequantised) weights loaded
//! densely from safetensors. (K-quants need rows divisible by 256, so SmolLM2 has none.)

mod common;

use std::collections::HashMap;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use qlora::model::config::ModelConfig;
use qlora::model::decoder::Decoder;
use qlora::model::weights::{GgufWeights, SafetensorsWeights, WeightSource};

const H: usize = 256;
const FF: usize = 512;
const VOCAB: usize = 300;

#[test]
fn k_quant_gguf_matches_its_dequantised_dense_twin() {
    let dev = Device::Cpu;
    let dir = tempfile::tempdir().unwrap();
    let randn = |shape: &[usize], std: f32| Tensor::randn(0f32, std, shape, &dev).unwrap();
    // (gguf name, hf name, tensor, storage format)
    let mut entries: Vec<(String, String, Tensor, GgmlDType)> = vec![
        (
            "token_embd.weight".into(),
            "model.embed_tokens.weight".into(),
            randn(&[VOCAB, H], 1.0),
            GgmlDType::F16,
        ),
        (
            "output_norm.weight".into(),
            "model.norm.weight".into(),
            (randn(&[H], 0.1) + 1.0).unwrap(),
            GgmlDType::F32,
        ),
        (
            "output.weight".into(),
            "lm_head.weight".into(),
            randn(&[VOCAB, H], 0.05),
            GgmlDType::Q8_0,
        ),
    ];
    let layer = [
        ("attn_q", "self_attn.q_proj", [H, H], GgmlDType::Q4K),
        ("attn_k", "self_attn.k_proj", [H / 2, H], GgmlDType::Q5K),
        ("attn_v", "self_attn.v_proj", [H / 2, H], GgmlDType::Q6K),
        ("attn_output", "self_attn.o_proj", [H, H], GgmlDType::Q4K),
        ("ffn_gate", "mlp.gate_proj", [FF, H], GgmlDType::Q4K),
        ("ffn_up", "mlp.up_proj", [FF, H], GgmlDType::Q6K),
        ("ffn_down", "mlp.down_proj", [H, FF], GgmlDType::Q4K),
    ];
    for (g, hf, shape, dtype) in layer {
        entries.push((
            format!("blk.0.{g}.weight"),
            format!("model.layers.0.{hf}.weight"),
            randn(&shape, 0.05),
            dtype,
        ));
    }
    for (g, hf) in [
        ("attn_norm", "input_layernorm"),
        ("ffn_norm", "post_attention_layernorm"),
    ] {
        entries.push((
            format!("blk.0.{g}.weight"),
            format!("model.layers.0.{hf}.weight"),
            (randn(&[H], 0.1) + 1.0).unwrap(),
            GgmlDType::F32,
        ));
    }
    let quantized: Vec<(String, QTensor)> = entries
        .iter()
        .map(|(g, _, t, dtype)| (g.clone(), QTensor::quantize(t, *dtype).unwrap()))
        .collect();

    // The GGUF file (qwen2 architecture: llama.cpp stores its q/k rows unpermuted).
    let s = |v: &str| gguf_file::Value::String(v.to_string());
    let u = gguf_file::Value::U32;
    let metadata: Vec<(&str, gguf_file::Value)> = vec![
        ("general.architecture", s("qwen2")),
        ("qwen2.embedding_length", u(H as u32)),
        ("qwen2.block_count", u(1)),
        ("qwen2.feed_forward_length", u(FF as u32)),
        ("qwen2.attention.head_count", u(4)),
        ("qwen2.attention.head_count_kv", u(2)),
        ("qwen2.context_length", u(128)),
        ("qwen2.vocab_size", u(VOCAB as u32)),
        ("qwen2.rope.freq_base", gguf_file::Value::F32(10000.0)),
        (
            "qwen2.attention.layer_norm_rms_epsilon",
            gguf_file::Value::F32(1e-6),
        ),
    ];
    let gguf_path = dir.path().join("tiny-kquant.gguf");
    let mut f = std::fs::File::create(&gguf_path).unwrap();
    let md: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = quantized.iter().map(|(k, q)| (k.as_str(), q)).collect();
    gguf_file::write(&mut f, &md, &ts).unwrap();
    drop(f);

    // The dense twin: the dequantised values as a Hugging Face folder.
    let dense: HashMap<String, Tensor> = entries
        .iter()
        .zip(&quantized)
        .map(|((_, hf, _, _), (_, q))| (hf.clone(), q.dequantize(&dev).unwrap()))
        .collect();
    let hf_dir = dir.path().join("dense");
    std::fs::create_dir_all(&hf_dir).unwrap();
    candle_core::safetensors::save(&dense, hf_dir.join("model.safetensors")).unwrap();
    let config = serde_json::json!({
        "architectures": ["Qwen2ForCausalLM"], "hidden_size": H, "intermediate_size": FF,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": VOCAB, "max_position_embeddings": 128, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "tie_word_embeddings": false
    });
    std::fs::write(hf_dir.join("config.json"), config.to_string()).unwrap();

    let mut gguf = GgufWeights::open(&gguf_path, &dev).unwrap();
    let mut gcfg = ModelConfig::from_gguf(&gguf_path, &gguf.content).unwrap();
    gcfg.attention_bias = false;
    gguf.set_qk_heads(4, 2);
    let from_gguf = Decoder::load(&gcfg, &mut WeightSource::Gguf(gguf), DType::F32, &dev).unwrap();
    let mut dcfg = ModelConfig::from_hf_file(&hf_dir.join("config.json")).unwrap();
    dcfg.attention_bias = false;
    let st = SafetensorsWeights::from_hf_dir(&hf_dir, &dev).unwrap();
    let from_dense =
        Decoder::load(&dcfg, &mut WeightSource::Safetensors(st), DType::F32, &dev).unwrap();

    let formats: Vec<String> = from_gguf.layers[0]
        .linears()
        .iter()
        .map(|(_, l)| l.format_name())
        .collect();
    assert_eq!(
        formats,
        ["Q4_K", "Q5_K", "Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q4_K"]
    );
    let ids = Tensor::new(&[[3u32, 77, 150, 299, 8, 42]], &dev).unwrap();
    let logits = |d: &Decoder| -> Vec<f32> {
        d.forward(&ids, None, None)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (a, b) = (logits(&from_gguf), logits(&from_dense));
    let diff = common::max_abs_diff(&a, &b);
    assert!(diff < 1e-4, "K-quant GGUF vs dense twin: {diff}");
    // Single-row decoding (the fused path) agrees too.
    let last_a = from_gguf
        .forward_last(&ids, None, None)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(common::max_abs_diff(&last_a, &b[b.len() - VOCAB..]) < 1e-4);
}
