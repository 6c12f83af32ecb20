//! The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers on the same file:
//! config, first-step logits, 32-token greedy continuations; plus generation behaviour.

mod common;

use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use qlora::generate::{FinishReason, GenerationConfig};
use qlora::model::{KvCache, Message, Model};
use serde_json::Value;

fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| Model::load(common::default_gguf().to_str().unwrap()).unwrap())
}

fn json(name: &str) -> Value {
    let path = common::reference_dir().join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn config_matches_what_transformers_derives() {
    let meta = json("meta.json");
    let c = &meta["config"];
    let ours = model().config();
    assert_eq!(ours.hidden_size as u64, c["hidden_size"].as_u64().unwrap());
    assert_eq!(
        ours.num_hidden_layers as u64,
        c["num_hidden_layers"].as_u64().unwrap()
    );
    assert_eq!(
        ours.num_attention_heads as u64,
        c["num_attention_heads"].as_u64().unwrap()
    );
    assert_eq!(
        ours.num_key_value_heads as u64,
        c["num_key_value_heads"].as_u64().unwrap()
    );
    assert_eq!(
        ours.intermediate_size as u64,
        c["intermediate_size"].as_u64().unwrap()
    );
    assert_eq!(ours.head_dim as u64, c["head_dim"].as_u64().unwrap());
    assert_eq!(ours.vocab_size as u64, c["vocab_size"].as_u64().unwrap());
    assert_eq!(ours.rope_theta, c["rope_theta"].as_f64().unwrap());
    assert_eq!(ours.rms_norm_eps, c["rms_norm_eps"].as_f64().unwrap());
    assert_eq!(
        ours.tie_word_embeddings,
        c["tie_word_embeddings"].as_bool().unwrap()
    );
    assert_eq!(
        model().eos_token_ids,
        vec![meta["eos_token_id"].as_u64().unwrap() as u32]
    );
    let summary = model().summary();
    assert_eq!(summary.parameters, 134_515_008);
    // Q4_1 stores 32 weights in 20 bytes: 5 bits per weight for the linear layers.
    assert!(
        summary.linear_formats.contains_key("Q4_1"),
        "{:?}",
        summary.linear_formats
    );
}

#[test]
fn greedy_continuations_match_transformers() {
    let greedy = json("greedy.json");
    let m = model();
    for case in greedy["results"].as_array().unwrap() {
        let prompt = ids(&case["prompt_ids"]);
        let expected = ids(&case["generated_ids"]);
        let gaps: Vec<f64> = case["top2_gap"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g.as_f64().unwrap())
            .collect();
        // Our chat template + tokenizer produce the same prompt ids.
        let rendered = case["rendered"].as_str().unwrap();
        assert_eq!(m.tokenizer.encode(rendered, false).unwrap(), prompt);

        let mut cache = KvCache::new(m.decoder.layers.len());
        let mut input = Tensor::new(prompt.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        for (step, &want) in expected.iter().enumerate() {
            let logits = m
                .decoder
                .forward_last(&input, None, Some(&mut cache))
                .unwrap();
            let row: Vec<f32> = logits.squeeze(0).unwrap().to_vec1().unwrap();
            if step == 0 {
                let top = &case["logits_first_step_top10"];
                for (id, val) in ids(&top["ids"])
                    .iter()
                    .zip(top["values"].as_array().unwrap())
                {
                    let diff = (row[*id as usize] as f64 - val.as_f64().unwrap()).abs();
                    assert!(
                        diff < 2e-3,
                        "first-step logit of token {id} differs by {diff}"
                    );
                }
            }
            let next = row
                .iter()
                .enumerate()
                .fold(
                    (0, f32::MIN),
                    |best, (i, &v)| if v > best.1 { (i, v) } else { best },
                )
                .0 as u32;
            if next != want {
                assert!(
                    gaps[step] < 1e-3,
                    "step {step}: we chose {next}, transformers {want}, their top-2 gap {}",
                    gaps[step]
                );
                break;
            }
            input = Tensor::new(&[next], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
        }
    }
}

#[test]
fn chat_generation_answers_and_stops_at_eos() {
    let greedy = json("greedy.json");
    let case = &greedy["results"][0];
    let out = model()
        .generate_chat(
            &[Message::user(case["prompt"].as_str().unwrap())],
            &GenerationConfig::greedy(32),
        )
        .unwrap();
    assert_eq!(out.text, case["generated_text_until_eos"].as_str().unwrap());
    assert_eq!(out.finish_reason, FinishReason::Stop);
    assert_eq!(
        out.token_ids.len() as u64,
        case["first_eos_index"].as_u64().unwrap()
    );
}

#[test]
fn batched_streamed_and_stopped_generation_agree_with_single_runs() {
    let m = model();
    let prompts: Vec<String> = [
        "Name a primary color.",
        "What is 2 + 3? Explain briefly.",
        "Hi",
    ]
    .iter()
    .map(|q| m.apply_chat_template(&[Message::user(*q)], true).unwrap())
    .collect();
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let config = GenerationConfig::greedy(12);
    let batch = m.generate_batch(&refs, &config).unwrap();
    for (p, b) in refs.iter().zip(&batch) {
        let single = m.generate(p, &config).unwrap();
        assert_eq!(
            single.token_ids, b.token_ids,
            "batched differs from single for {p:?}"
        );
    }

    let mut pieces = Vec::new();
    let streamed = m
        .generate_stream(refs[1], &config, |t| pieces.push(t.to_string()))
        .unwrap();
    assert_eq!(pieces.concat(), streamed.text);
    assert!(pieces.len() > 1);

    // A stop string cuts the text before it and ends generation.
    let words: Vec<&str> = streamed.text.split_whitespace().collect();
    let stop = words[words.len() / 2];
    let cut = m.generate(refs[1], &config.clone().stop(stop)).unwrap();
    assert!(
        !cut.text.contains(stop) && streamed.text.starts_with(&cut.text),
        "{cut:?}"
    );
    assert_eq!(cut.finish_reason, FinishReason::Stop);

    // Sampling is reproducible from its seed and differs across seeds.
    let s1 = m
        .generate(refs[1], &GenerationConfig::sampled(12, 1.0, 1))
        .unwrap();
    let s1b = m
        .generate(refs[1], &GenerationConfig::sampled(12, 1.0, 1))
        .unwrap();
    assert_eq!(s1.token_ids, s1b.token_ids);
    let differs = (2..6).any(|seed| {
        m.generate(refs[1], &GenerationConfig::sampled(12, 1.0, seed))
            .unwrap()
            .token_ids
            != s1.token_ids
    });
    assert!(differs, "sampling ignores its seed");
}

#[test]
fn bad_generation_requests_are_errors() {
    let m = model();
    let err = m
        .generate("hi", &GenerationConfig::greedy(4).top_p(1.5))
        .unwrap_err();
    assert!(err.to_string().contains("top_p"), "{err}");
    let err = m.generate("", &GenerationConfig::greedy(4)).unwrap_err();
    assert!(err.to_string().contains("no tokens"), "{err}");
    let err = m
        .decoder
        .forward(
            &Tensor::new(&[[60000u32]], &Device::Cpu).unwrap(),
            None,
            None,
        )
        .unwrap_err();
    assert!(err.to_string().contains("vocabulary"), "{err}");
}

/// DSPy-style prompts share a long beginning (system message, demos). Starting from the cached
/// keys and values of that beginning gives the logits and the greedy output of a fresh run.
#[test]
fn prefix_cache_reuses_a_shared_prompt_beginning() {
    let m = model();
    let system = Message::system(
        "Your input fields are:\n1. `text` (str)\nYour output fields are:\n1. `intent` (str)\n\
         Classify the bank customer's message into one of: card_arrival, lost_or_stolen_card, \
         exchange_rate, pin_blocked. Answer with the intent only.",
    );
    let ask = |text: &str| vec![system.clone(), Message::user(text)];
    let first = ask("My card still has not arrived after two weeks.");
    let second = ask("What exchange rate do you use for euros?");
    let config = GenerationConfig::greedy(16);

    // Logits: the first prompt's cache cut to the shared part, then the rest of the second
    // prompt, against the second prompt run whole.
    let tokens = |c: &[Message]| {
        m.tokenizer
            .encode(&m.apply_chat_template(c, true).unwrap(), true)
            .unwrap()
    };
    let (a, b) = (tokens(&first), tokens(&second));
    let shared = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    assert!(shared > 40, "the prompts share {shared} tokens");
    let row = |t: &[u32]| Tensor::new(t, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let mut cache = KvCache::new(m.config().num_hidden_layers);
    m.decoder
        .forward_last(&row(&a), None, Some(&mut cache))
        .unwrap();
    cache.truncate(shared).unwrap();
    assert_eq!(cache.seq_len(), shared);
    let reused = m
        .decoder
        .forward_last(&row(&b[shared..]), None, Some(&mut cache))
        .unwrap();
    let fresh = m.decoder.forward_last(&row(&b), None, None).unwrap();
    let diff = common::max_abs_diff_t(&reused, &fresh);
    assert!(diff < 1e-3, "logits differ by {diff}");

    // Generation: the second prompt after the first, with the cache, equals a fresh run.
    let prefixes = qlora::generate::PrefixCache::new(2);
    let fresh_first = m.generate_chat(&first, &config).unwrap();
    let fresh_second = m.generate_chat(&second, &config).unwrap();
    let cached_first = m.generate_chat_reusing(&first, &config, &prefixes).unwrap();
    let cached_second = m
        .generate_chat_reusing(&second, &config, &prefixes)
        .unwrap();
    let again = m
        .generate_chat_reusing(&second, &config, &prefixes)
        .unwrap();
    assert_eq!(cached_first, fresh_first);
    assert_eq!(cached_second, fresh_second);
    assert_eq!(again, fresh_second);
    let stats = prefixes.stats();
    assert_eq!((stats.lookups, stats.hits), (3, 2));
    assert_eq!(stats.reused_tokens, shared + b.len() - 1);
}
