//! Training throughput and peak memory on the default model (SmolLM2-135M-Instruct, Q4_1 GGUF).
//!
//! ```text
//! cargo run --release --example bench_train -- --model default --batch 4 --seq 128 \
//!     --targets q,v --steps 5 --warmup 2 --checkpointing off --json out.json
//! ```
//!
//! One step is what a trainer does: `PeftModel::forward_backward` with the chunked causal-LM
//! loss, `clip_grad_norm` (1.0) and `AdamW::step`, on random token ids (fixed seed) with the
//! ids as labels. Reported: tokens/s over the timed steps (`batch·seq·steps / seconds`),
//! seconds per step, the time split into phases, and peak RSS (`VmHWM`) — for the whole
//! process, and for training alone (the high-water mark is reset through
//! `/proc/self/clear_refs` after loading, where the kernel allows it).
//!
//! `scripts/bench-train.sh` runs this next to `tests/reference/bench_train_torch.py`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use qlora::candle_core::{Device, Tensor};
use qlora::lora::{get_peft_model, LoraConfig};
use qlora::model::Model;
use qlora::train::{causal_lm_loss, clip_grad_norm, AdamW, AdamWConfig, LossOptions};

const USAGE: &str = "\
usage: bench_train [--model default] [--batch 4] [--seq 128] [--targets q,v|all-linear]
                   [--steps 5] [--warmup 2] [--checkpointing on|off] [--r 16] [--seed 0]
                   [--json out.json]";

/// The system allocator, counting live heap bytes and their high-water mark, so peak RSS can be
/// split into what tensors really hold and what the allocator keeps around.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn count_alloc(size: usize) {
    let now = LIVE.fetch_add(size, Ordering::Relaxed) + size;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            count_alloc(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            count_alloc(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            count_alloc(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live_heap() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// Resets the heap high-water mark to the current live bytes.
fn reset_heap_peak() {
    PEAK.store(live_heap(), Ordering::Relaxed);
}

struct Args {
    model: String,
    batch: usize,
    seq: usize,
    targets: String,
    steps: usize,
    warmup: usize,
    checkpointing: bool,
    r: usize,
    seed: u64,
    json: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        model: "default".into(),
        batch: 4,
        seq: 128,
        targets: "q,v".into(),
        steps: 5,
        warmup: 2,
        checkpointing: false,
        r: 16,
        seed: 0,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let num = |v: &str| -> Result<usize, String> {
            v.parse()
                .map_err(|_| format!("{flag}: `{v}` is not a whole number"))
        };
        match flag.as_str() {
            "--model" => a.model = value,
            "--batch" => a.batch = num(&value)?,
            "--seq" => a.seq = num(&value)?,
            "--targets" => a.targets = value,
            "--steps" => a.steps = num(&value)?,
            "--warmup" => a.warmup = num(&value)?,
            "--r" => a.r = num(&value)?,
            "--seed" => a.seed = num(&value)? as u64,
            "--json" => a.json = Some(value),
            "--checkpointing" => {
                a.checkpointing = match value.as_str() {
                    "on" | "true" | "1" => true,
                    "off" | "false" | "0" => false,
                    v => return Err(format!("--checkpointing: `{v}` is not on/off")),
                }
            }
            f => return Err(format!("unknown flag {f}\n{USAGE}")),
        }
    }
    if a.steps == 0 || a.batch == 0 || a.seq < 2 {
        return Err("--steps and --batch must be at least 1, --seq at least 2".into());
    }
    Ok(a)
}

/// `VmHWM` / `VmRSS` from /proc/self/status, in bytes.
fn proc_status_kb(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// User + system CPU seconds of this process so far (`/proc/self/stat`, clock ticks of 1/100 s).
fn cpu_seconds() -> f64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// Resets VmHWM to the current RSS (Linux ≥ 4.0); false where the kernel refuses.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[derive(Default, Clone, Copy)]
struct Phases {
    /// Decoder forward up to the final-norm hidden states (without graph when checkpointing).
    forward: f64,
    /// The chunked loss: output head forward, softmax, and its gradient w.r.t. the hidden rows.
    loss: f64,
    /// Backward through the decoder (with checkpointing: the recomputed forward included).
    backward: f64,
    clip: f64,
    optimizer: f64,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("bench_train: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    // As `train` does (QLORA_KEEP_FREED_MEMORY=0 measures without it).
    let keep_freed = qlora::train::keep_freed_memory();
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });

    let t_load = Instant::now();
    let model = Model::load(&args.model)?;
    let vocab = model.decoder.config.vocab_size;
    let config = match args.targets.as_str() {
        "all-linear" | "all" => LoraConfig::qlora().all_linear(),
        list => LoraConfig::qlora().target_modules(
            list.split(',')
                .map(|s| match s.trim() {
                    "q" | "k" | "v" | "o" => format!("{}_proj", s.trim()),
                    "gate" | "up" | "down" => format!("{}_proj", s.trim()),
                    other => other.to_string(),
                })
                .collect::<Vec<_>>(),
        ),
    }
    .r(args.r)
    .lora_alpha(2.0 * args.r as f64);
    let mut peft = get_peft_model(model, &config)?;
    peft.set_gradient_checkpointing(args.checkpointing);
    peft.train();
    let params = peft.trainable_parameters();
    let trainable: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
    let mut opt = AdamW::new(params.clone(), AdamWConfig::default())?;
    let load_s = t_load.elapsed().as_secs_f64();
    let rss_after_load = proc_status_kb("VmRSS:").unwrap_or(0);
    let peak_after_load = proc_status_kb("VmHWM:").unwrap_or(0);
    let reset_ok = reset_peak_rss();
    let heap_after_load = live_heap();
    reset_heap_peak();

    let mut rng = args.seed ^ 0x5EED;
    let n = args.batch * args.seq;
    let ids: Vec<u32> = (0..n)
        .map(|_| (splitmix(&mut rng) % vocab as u64) as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (args.batch, args.seq), &Device::Cpu)?;
    let labels = ids.clone();
    let loss_opts = LossOptions::for_vocab(vocab);
    let decoder = &peft.model().decoder;
    let lr = 2e-4;

    let mut phases = Phases::default();
    let mut cpu_timed = 0.0;
    // Live heap bytes at the loss (the decoder's forward graph, or the checkpoints) and the
    // gradient store handed back by forward_backward (tensor count, bytes, trainable share).
    let mut heap_at_loss = 0usize;
    // Heap high-water mark within each phase of the last step: forward, loss, backward, rest.
    let mut heap_peaks = [0usize; 4];
    // Live heap right after forward_backward returns, after the gradient store is dropped, and
    // after the loss tensor (and whatever graph it holds) is dropped.
    let mut heap_after = [0usize; 3];
    let mut grad_store = (0usize, 0usize, 0usize);
    let trainable_ids: std::collections::HashSet<_> =
        params.iter().map(|(_, v)| v.as_tensor().id()).collect();
    let mut step_secs = Vec::new();
    let mut losses = Vec::new();
    let total_steps = args.warmup + args.steps;
    for step in 0..total_steps {
        let cpu0 = cpu_seconds();
        reset_heap_peak();
        let t0 = Instant::now();
        let mut t_in = t0;
        let mut t_out = t0;
        let (loss, mut grads) = peft.forward_backward(&ids, None, |hidden| {
            t_in = Instant::now();
            heap_at_loss = live_heap();
            heap_peaks[0] = PEAK.load(Ordering::Relaxed);
            reset_heap_peak();
            let l = causal_lm_loss(hidden, &decoder.lm_head, &labels, &loss_opts).map(|l| l.loss);
            t_out = Instant::now();
            heap_peaks[1] = PEAK.load(Ordering::Relaxed);
            reset_heap_peak();
            l
        })?;
        let t_fb = Instant::now();
        heap_peaks[2] = PEAK.load(Ordering::Relaxed);
        heap_after[0] = live_heap();
        reset_heap_peak();
        grad_store = grads.get_ids().fold((0, 0, 0), |(n, bytes, kept), id| {
            let t = grads.get_id(*id).expect("id from the store");
            let b = t.elem_count() * t.dtype().size_in_bytes();
            (
                n + 1,
                bytes + b,
                kept + if trainable_ids.contains(id) { b } else { 0 },
            )
        });
        let norm = clip_grad_norm(&mut grads, &params, 1.0)?;
        let t_clip = Instant::now();
        opt.step(&grads, lr)?;
        drop(grads);
        let t_end = Instant::now();
        heap_peaks[3] = PEAK.load(Ordering::Relaxed);
        heap_after[1] = live_heap();
        let loss_tensor = loss;
        let loss = loss_tensor.to_scalar::<f32>()?;
        drop(loss_tensor);
        heap_after[2] = live_heap();
        let secs = (t_end - t0).as_secs_f64();
        eprintln!(
            "step {step:>2}{} {secs:6.2} s  loss {loss:.4}  grad norm {:.3}",
            if step < args.warmup { " (warmup)" } else { "" },
            norm.norm
        );
        if step >= args.warmup {
            cpu_timed += cpu_seconds() - cpu0;
            step_secs.push(secs);
            losses.push(loss);
            phases.forward += (t_in - t0).as_secs_f64();
            phases.loss += (t_out - t_in).as_secs_f64();
            phases.backward += (t_fb - t_out).as_secs_f64();
            phases.clip += (t_clip - t_fb).as_secs_f64();
            phases.optimizer += (t_end - t_clip).as_secs_f64();
        }
    }
    let timed: f64 = step_secs.iter().sum();
    let k = args.steps as f64;
    let tokens_per_s = (n * args.steps) as f64 / timed;
    let mut sorted = step_secs.clone();
    sorted.sort_by(f64::total_cmp);
    let median = if sorted.len() % 2 == 1 {
        sorted[sorted.len() / 2]
    } else {
        0.5 * (sorted[sorted.len() / 2 - 1] + sorted[sorted.len() / 2])
    };
    let peak_rss = proc_status_kb("VmHWM:").unwrap_or(0);
    let peak_total = peak_rss.max(peak_after_load);
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;

    let malloc_env: Vec<String> = [
        "MALLOC_MMAP_THRESHOLD_",
        "MALLOC_TRIM_THRESHOLD_",
        "MALLOC_TOP_PAD_",
        "MALLOC_ARENA_MAX",
    ]
    .iter()
    .filter_map(|k| std::env::var(k).ok().map(|v| format!("{k}={v}")))
    .collect();
    let out = serde_json::json!({
        "impl": "qlora (candle)",
        "model": args.model,
        "precision": "f32 compute, Q4_1 frozen base",
        "batch": args.batch,
        "seq": args.seq,
        "targets": args.targets,
        "r": args.r,
        "trainable_params": trainable,
        "gradient_checkpointing": args.checkpointing,
        "threads": threads,
        "candle_num_threads": std::env::var("CANDLE_NUM_THREADS").ok(),
        "warmup": args.warmup,
        "steps": args.steps,
        "load_s": load_s,
        "tokens_per_s": tokens_per_s,
        "s_per_step": timed / k,
        "tokens_per_s_median": n as f64 / median,
        "cpu_s_per_step": cpu_timed / k,
        "tokens_per_cpu_s": (n * args.steps) as f64 / cpu_timed,
        "step_s": step_secs,
        "losses": losses,
        "phases_s_per_step": {
            "forward": phases.forward / k,
            "loss": phases.loss / k,
            "backward": phases.backward / k,
            "clip": phases.clip / k,
            "optimizer": phases.optimizer / k,
        },
        "rss_after_load_mib": mib(rss_after_load),
        "heap_after_load_mib": mib(heap_after_load as u64),
        "heap_peak_mib": mib(heap_peaks.iter().copied().max().unwrap_or(0) as u64),
        "heap_peak_by_phase_mib": {
            "forward": mib(heap_peaks[0] as u64),
            "loss": mib(heap_peaks[1] as u64),
            "backward": mib(heap_peaks[2] as u64),
            "clip_and_optimizer": mib(heap_peaks[3] as u64),
        },
        "heap_at_loss_mib": mib(heap_at_loss as u64),
        "heap_live_after_backward_mib": mib(heap_after[0] as u64),
        "heap_live_after_dropping_grads_mib": mib(heap_after[1] as u64),
        "heap_live_after_dropping_loss_mib": mib(heap_after[2] as u64),
        "grad_store": {
            "tensors": grad_store.0,
            "mib": mib(grad_store.1 as u64),
            "trainable_mib": mib(grad_store.2 as u64),
        },
        "peak_rss_mib": mib(peak_total),
        "peak_rss_train_mib": if reset_ok { Some(mib(peak_rss)) } else { None },
        "malloc_env": malloc_env,
        "keep_freed_memory": keep_freed,
    });
    let text = serde_json::to_string_pretty(&out)?;
    println!("{text}");
    if let Some(path) = &args.json {
        std::fs::write(path, text + "\n")?;
    }
    Ok(())
}
