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

#[test]
fn train_reports_bad_data_by_line_and_trains_on_good_data() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"c\", \"completion\": \n",
    )
    .unwrap();
    let tiny = common::reference_dir().join("llama");
    let out = qlora()
        .args(["train", "--plain", "--max-steps", "2", "--model"])
        .arg(&tiny)
        .arg("--data")
        .arg(&bad)
        .arg("--output-dir")
        .arg(tmp.path().join("run-bad"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.jsonl") && stderr.contains("line 2"),
        "{stderr}"
    );

    // The same file with --skip-invalid-rows trains on the good row and writes the run.
    let out = qlora()
        .args([
            "train",
            "--plain",
            "--max-steps",
            "2",
            "--skip-invalid-rows",
            "--model",
        ])
        .arg(&tiny)
        .arg("--data")
        .arg(&bad)
        .arg("--output-dir")
        .arg(tmp.path().join("run"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("step     2/2"), "{stdout}");
    for name in ["adapter_model.safetensors", "history.csv", "loss.svg"] {
        assert!(tmp.path().join("run").join(name).is_file(), "{name}");
    }
}
