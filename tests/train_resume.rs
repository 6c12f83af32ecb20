//! Crash safety of `qlora train`: a run killed with SIGKILL mid-way leaves only complete
//! checkpoints, and resuming from the newest gives exactly the loss curve of a run that was never
//! interrupted.
#![cfg(feature = "cli")]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use qlora::candle_core::Device;
use qlora::train::{list_checkpoints, load_checkpoint, TrainRun};

fn write_data(path: &Path) {
    let mut lines = String::new();
    for i in 0..24 {
        let row = serde_json::json!({
            "prompt": format!("Ticket {i}: my parcel number {} is late.", 1000 + 37 * i),
            "completion": format!("track_order {}", 1000 + 37 * i),
        });
        lines.push_str(&row.to_string());
        lines.push('\n');
    }
    std::fs::write(path, lines).unwrap();
}

fn train_command(data: &Path, out: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qlora"));
    cmd.args(["train", "--model"])
        .arg(common::reference_dir().join("llama"))
        .arg("--data")
        .arg(data)
        .arg("--output-dir")
        .arg(out)
        .args([
            "--max-steps",
            "60",
            "--batch-size",
            "2",
            "--gradient-accumulation-steps",
            "2",
            "--learning-rate",
            "1e-3",
            "--save-steps",
            "1",
            "--plain",
        ]);
    cmd
}

fn losses(run: &TrainRun) -> Vec<(usize, f64, f64)> {
    run.history
        .iter()
        .map(|r| (r.step, r.loss, r.grad_norm))
        .collect()
}

#[test]
fn sigkill_then_resume_matches_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data.jsonl");
    write_data(&data);

    let straight = tmp.path().join("straight");
    let status = train_command(&data, &straight)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "uninterrupted run failed");
    let expected = TrainRun::load(&straight).unwrap();
    assert_eq!(expected.history.len(), 60);

    // Kill the second run as soon as its third checkpoint exists.
    let killed = tmp.path().join("killed");
    let mut child = train_command(&data, &killed)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(600);
    while !killed.join("checkpoint-3").is_dir() {
        assert!(
            Instant::now() < deadline,
            "no checkpoint-3 after 10 minutes"
        );
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run ended ({status}) before it could be killed");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
    assert!(
        !killed.join("history.json").exists(),
        "the run finished before SIGKILL landed; the test proves nothing"
    );

    // Every checkpoint left behind is complete and readable.
    let checkpoints = list_checkpoints(&killed).unwrap();
    assert!(checkpoints.len() >= 3, "{checkpoints:?}");
    assert!(checkpoints.len() < 60, "{checkpoints:?}");
    for (step, dir) in &checkpoints {
        let ck = load_checkpoint(dir, &Device::Cpu)
            .unwrap_or_else(|e| panic!("checkpoint {step} is corrupt: {e}"));
        assert_eq!(ck.state.global_step, *step);
        assert_eq!(ck.state.history.len(), *step);
        // Its adapter is a PEFT folder a fresh model can load.
        let model =
            qlora::model::Model::load(common::reference_dir().join("llama").to_str().unwrap())
                .unwrap();
        qlora::lora::PeftModel::from_pretrained(model, dir).unwrap();
    }

    let status = train_command(&data, &killed)
        .arg("--resume")
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "resumed run failed");
    let resumed = TrainRun::load(&killed).unwrap();
    assert!(resumed.resumed_from_step.is_some());
    let (a, b) = (losses(&expected), losses(&resumed));
    assert_eq!(a.len(), b.len());
    for ((s, la, ga), (_, lb, gb)) in a.iter().zip(&b) {
        assert!(
            (la - lb).abs() <= 1e-6 * la.abs().max(1.0)
                && (ga - gb).abs() <= 1e-5 * ga.abs().max(1.0),
            "step {s}: uninterrupted loss {la} / grad {ga}, resumed {lb} / {gb}"
        );
    }
    // The final adapters agree too.
    let wa = qlora::candle_core::safetensors::load(
        straight.join("adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let wb = qlora::candle_core::safetensors::load(
        killed.join("adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(wa.len(), wb.len());
    for (k, ta) in &wa {
        let va: Vec<f32> = ta.flatten_all().unwrap().to_vec1().unwrap();
        let vb: Vec<f32> = wb[k].flatten_all().unwrap().to_vec1().unwrap();
        assert!(common::max_abs_diff(&va, &vb) <= 1e-6, "{k} differs");
    }
    // No temporary folder survives the resumed run.
    for entry in std::fs::read_dir(&killed).unwrap() {
        let name = entry.unwrap().file_name();
        assert!(
            !name.to_string_lossy().starts_with(".tmp"),
            "{name:?} left behind"
        );
    }
}
