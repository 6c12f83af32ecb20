//! The `qlora` binary end to end (built with the `cli` feature).
#![cfg(feature = "cli")]

mod common;

use std::process::Command;

fn qlora() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qlora"))
}

#[test]
fn generate_streams_a_chat_answer() {
    let out = qlora()
        .args(["generate", "--chat", "--max-new-tokens", "16", "--model"])
        .arg(common::default_gguf())
        .args([
            "--prompt",
            "What is the capital of France? Answer in one word.",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("Paris"), "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("tok/s"));
}

#[test]
fn info_describes_the_model() {
    let out = qlora()
        .args(["info", "--model"])
        .arg(common::default_gguf())
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("LlamaForCausalLM") && stdout.contains("134,515,008"),
        "{stdout}"
    );
}

#[test]
fn a_missing_model_is_a_clear_error() {
    let out = qlora()
        .args([
            "generate",
            "--model",
            "/nonexistent/model.gguf",
            "--prompt",
            "hi",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/model.gguf"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
