//! Tokenizer and chat-template parity with transformers on the default GGUF model.
//!
//! `make reference` runs tests/reference/gguf_reference.py, which loads the same GGUF with
//! `AutoTokenizer.from_pretrained(dir, gguf_file=...)` and writes, into the reference directory:
//! `tokens.json` (ids, tokens and decoded text of tricky strings), `chat.json` (the chat
//! template, rendered conversations and their ids), `meta.json` (special tokens) and
//! `tokenizer.json` (transformers' tokenizer for the GGUF). Everything here must match exactly.
//!
//! Missing reference data or model is a failure that says what to run, never a silent pass.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::quantized::gguf_file::{self, Value};
use qlora::model::chat_template::Message;
use qlora::model::tokenizer::Tokenizer;
use serde_json::Value as Json;

/// A reference file, or a failure telling how to make it.
fn reference_file(name: &str) -> PathBuf {
    let dir = common::reference_dir();
    // The GGUF references may sit in the root or in a `gguf/` subfolder.
    let path = [dir.join(name), dir.join("gguf").join(name)]
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "reference file {name} missing in {}: run `make reference` first",
                dir.display()
            )
        });
    path
}

fn read_json(path: &Path) -> Json {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()))
}

fn ids_of(value: &Json) -> Vec<u32> {
    value
        .as_array()
        .expect("ids array")
        .iter()
        .map(|v| v.as_u64().expect("id") as u32)
        .collect()
}

/// The default model's tokenizer, built once for all tests.
fn gguf_tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let path = common::default_gguf();
        Tokenizer::from_gguf_file(&path)
            .unwrap_or_else(|e| panic!("cannot build the tokenizer of {}: {e}", path.display()))
    })
}

/// Decodes `ids` one at a time through the streaming decoder.
fn stream_decode(tok: &Tokenizer, ids: &[u32], skip_special_tokens: bool) -> String {
    let mut stream = tok.stream(skip_special_tokens);
    let mut out = String::new();
    for &id in ids {
        let piece = stream.step(id).unwrap();
        assert!(
            !piece.contains('\u{FFFD}'),
            "broken UTF-8 streamed: {piece:?}"
        );
        out.push_str(&piece);
    }
    out.push_str(&stream.finish().unwrap());
    out
}

#[test]
fn gguf_tokenizer_ids_and_decoding_match_transformers() {
    let tok = gguf_tokenizer();
    let cases = read_json(&reference_file("tokens.json"));
    let cases = cases.as_array().expect("tokens.json is a list");
    assert!(!cases.is_empty());
    let mut failures = Vec::new();
    for case in cases {
        let text = case["text"].as_str().expect("text");
        let want_ids = ids_of(&case["ids"]);
        let want_decoded = case["decoded"].as_str().expect("decoded");

        let ids = tok.encode(text, false).unwrap();
        if ids != want_ids {
            failures.push(format!(
                "encode({text:?}): got {ids:?}, transformers {want_ids:?}"
            ));
            continue;
        }
        if let Some(tokens) = case["tokens"].as_array() {
            let ours: Vec<String> = ids.iter().map(|&i| tok.id_to_token(i).unwrap()).collect();
            let theirs: Vec<&str> = tokens.iter().map(|t| t.as_str().unwrap()).collect();
            if ours != theirs {
                failures.push(format!(
                    "tokens of {text:?}: got {ours:?}, transformers {theirs:?}"
                ));
            }
        }
        let decoded = tok.decode(&ids, false).unwrap();
        if decoded != want_decoded {
            failures.push(format!(
                "decode of {text:?}: got {decoded:?}, transformers {want_decoded:?}"
            ));
        }
        let streamed = stream_decode(tok, &ids, false);
        if streamed != want_decoded {
            failures.push(format!(
                "streamed decode of {text:?}: got {streamed:?}, transformers {want_decoded:?}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn gguf_batch_encoding_equals_single_encoding() {
    let tok = gguf_tokenizer();
    let cases = read_json(&reference_file("tokens.json"));
    let texts: Vec<&str> = cases
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap())
        .collect();
    let batch = tok.encode_batch(&texts, false).unwrap();
    for (text, ids) in texts.iter().zip(&batch) {
        assert_eq!(ids, &tok.encode(text, false).unwrap(), "{text:?}");
    }
}

#[test]
fn chat_template_renders_and_tokenizes_like_transformers() {
    let tok = gguf_tokenizer();
    let chat = read_json(&reference_file("chat.json"));
    let template = tok.require_chat_template().unwrap();
    assert_eq!(Some(template.source()), chat["chat_template"].as_str());
    assert_eq!(tok.bos_token(), chat["bos_token"].as_str());
    assert_eq!(tok.eos_token(), chat["eos_token"].as_str());

    let conversations = chat["conversations"].as_array().expect("conversations");
    assert!(!conversations.is_empty());
    for conv in conversations {
        let messages: Vec<Message> =
            serde_json::from_value(conv["messages"].clone()).expect("messages");
        let add_generation_prompt = conv["add_generation_prompt"].as_bool().unwrap();
        let want = conv["rendered"].as_str().unwrap();
        let rendered = template.render(&messages, add_generation_prompt).unwrap();
        assert_eq!(
            rendered, want,
            "rendering {messages:?} (agp={add_generation_prompt})"
        );
        assert_eq!(
            tok.encode(&rendered, false).unwrap(),
            ids_of(&conv["ids"]),
            "ids of {rendered:?}"
        );
    }
}

#[test]
fn special_tokens_match_transformers() {
    let tok = gguf_tokenizer();
    let meta = read_json(&reference_file("meta.json"));
    let id = |key: &str| meta[key].as_u64().map(|v| v as u32);
    assert_eq!(tok.bos_token(), meta["bos_token"].as_str());
    assert_eq!(tok.bos_token_id(), id("bos_token_id"));
    assert_eq!(tok.eos_token(), meta["eos_token"].as_str());
    assert_eq!(tok.eos_token_id(), id("eos_token_id"));
    assert_eq!(tok.pad_token(), meta["pad_token"].as_str());
    assert_eq!(tok.pad_token_id(), id("pad_token_id"));
    assert_eq!(tok.unk_token(), meta["unk_token"].as_str());
    assert_eq!(
        tok.vocab_size() as u64,
        meta["tokenizer_vocab_size"].as_u64().unwrap()
    );
    assert_eq!(
        tok.encode("hi", true).unwrap(),
        ids_of(&meta["encode_hi_with_special_tokens"])
    );
    assert_eq!(
        tok.encode("hi", false).unwrap(),
        ids_of(&meta["encode_hi_without_special_tokens"])
    );
}

#[test]
fn gguf_pipeline_equals_transformers_tokenizer_json() {
    // The tokenizer we build from GGUF metadata, serialised, against the one transformers
    // builds: same added tokens, normalizer, pre-tokenizer, decoder and BPE settings.
    let tok = gguf_tokenizer();
    let ours: Json = serde_json::from_str(&tok.inner().to_string(false).unwrap()).unwrap();
    let theirs = read_json(&reference_file("tokenizer.json"));
    for key in ["added_tokens", "normalizer", "pre_tokenizer", "decoder"] {
        assert_eq!(ours[key], theirs[key], "`{key}` differs");
    }
    for key in [
        "type",
        "unk_token",
        "continuing_subword_prefix",
        "end_of_word_suffix",
        "fuse_unk",
        "byte_fallback",
        "ignore_merges",
    ] {
        assert_eq!(
            ours["model"][key], theirs["model"][key],
            "model.{key} differs"
        );
    }
    assert_eq!(
        ours["model"]["vocab"], theirs["model"]["vocab"],
        "vocab differs"
    );
    assert_eq!(
        ours["model"]["merges"], theirs["model"]["merges"],
        "merges differ"
    );
}

#[test]
fn transformers_tokenizer_json_loads_with_from_file() {
    // The reference tokenizer.json is an ordinary HF tokenizer file: from_file must read it
    // and agree with our GGUF tokenizer.
    let from_json = Tokenizer::from_file(reference_file("tokenizer.json")).unwrap();
    let from_gguf = gguf_tokenizer();
    for text in [
        "Hello, world!",
        "<|im_start|>user\nhi<|im_end|>",
        "café 12345 🦀",
    ] {
        assert_eq!(
            from_json.encode(text, false).unwrap(),
            from_gguf.encode(text, false).unwrap(),
            "{text:?}"
        );
    }
}

#[test]
fn unparsable_tokenizer_json_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, "{\"version\": \"1.0\", \"model\": [truncated").unwrap();
    let err = Tokenizer::from_file(&path).unwrap_err().to_string();
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(
        err.contains("does not parse") && err.contains("re-download"),
        "{err}"
    );

    let err = Tokenizer::from_hf_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains(&path.display().to_string()), "{err}");
}

#[test]
fn gguf_without_tokens_is_an_error_naming_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-vocab.gguf");
    let model = Value::String("gpt2".into());
    let arch = Value::String("llama".into());
    {
        let mut file = std::fs::File::create(&path).unwrap();
        gguf_file::write(
            &mut file,
            &[
                ("general.architecture", &arch),
                ("tokenizer.ggml.model", &model),
            ],
            &[],
        )
        .unwrap();
    }
    let err = Tokenizer::from_gguf_file(&path).unwrap_err().to_string();
    assert!(err.contains("tokenizer.ggml.tokens"), "{err}");
    assert!(err.contains("no-vocab.gguf"), "{err}");
}
