//! The real Python clients against `qlora::serve` on loopback with the default model: the
//! `openai` SDK (plain, streamed, legacy completions, a 404) and DSPy 3.4 with both of its
//! engines (Predict with demos, a BootstrapFewShot compile). tests/reference/serve_clients.py
//! does the calls and writes what it saw; the answers are checked against the library's own
//! generation.
#![cfg(feature = "serve")]

mod common;

use std::process::Command;

use qlora::generate::GenerationConfig;
use qlora::model::{Message, Model};
use qlora::serve::{Backend, ServeConfig, Server};
use serde_json::Value;

#[test]
fn openai_sdk_and_dspy_work_against_the_server() {
    let model = Model::load("default").expect("the default model (make fetch-model)");
    let want_chat = model
        .generate_chat(
            &[Message::user(
                "What is the capital of France? Answer in one word.",
            )],
            &GenerationConfig::greedy(12),
        )
        .unwrap();
    let want_completion = model
        .generate("The capital of France is", &GenerationConfig::greedy(6))
        .unwrap();
    let name = model.name.clone();
    let server = Server::start(
        Backend::Base(model),
        ServeConfig::default().port(0).api_key("test-key"),
    )
    .unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("clients.json");
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/serve_clients.py");
    let status = Command::new(common::ref_python())
        .arg(&script)
        .args([&server.base_url(), &name, "test-key"])
        .arg(&out)
        .env("DSPY_CACHEDIR", tmp.path().join("dspy-cache"))
        .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        .env("HF_HUB_OFFLINE", "1")
        .status()
        .expect("running the reference venv's python");
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    assert!(status.success(), "serve_clients.py failed: {text}");
    let r: Value = serde_json::from_str(&text).unwrap();

    // openai SDK: the same text as the library, streamed or not.
    assert_eq!(r["openai"]["chat"]["text"], want_chat.text.as_str(), "{r}");
    assert_eq!(
        r["openai"]["chat"]["prompt_tokens"],
        want_chat.prompt_tokens
    );
    assert_eq!(r["openai"]["chat"]["finish_reason"], "stop");
    assert_eq!(
        r["openai"]["stream"]["text"],
        want_chat.text.as_str(),
        "{r}"
    );
    assert_eq!(r["openai"]["stream"]["finish_reason"], "stop");
    assert!(r["openai"]["stream"]["chunks"].as_u64().unwrap() > 2);
    assert_eq!(
        r["openai"]["completion"]["text"],
        want_completion.text.as_str()
    );
    assert_eq!(r["openai"]["unknown_model"]["raised"], "NotFoundError");
    assert_eq!(r["openai"]["unknown_model"]["status"], 404);

    // DSPy, both engines: a parsed answer from Predict and a compiled program whose demos were
    // bootstrapped from the served model's own (parsed) answers.
    for engine in ["dspy_auto", "dspy_litellm"] {
        let d = &r[engine];
        let answer = d["answer"]
            .as_str()
            .unwrap_or_else(|| panic!("{engine}: {d}"));
        assert!(!answer.trim().is_empty(), "{engine}: empty answer: {d}");
        assert_eq!(d["compiled_demos"], 2, "{engine}: {d}");
        assert!(
            d["augmented_demos"].as_u64().unwrap() >= 1,
            "{engine}: nothing bootstrapped: {d}"
        );
    }
    let stats = server.stats();
    assert_eq!(stats.cancelled_rows, 0, "{stats:?}");
    server.shutdown();
}
