//! Generation speed on the default model (SmolLM2-135M-Instruct, Q4_1 GGUF), in the two shapes
//! a DSPy user meets:
//!
//! - **one long prompt**: a chat prompt of a few hundred tokens, then greedy decoding; reported
//!   as prefill tokens/s (prompt tokens / time to the first new token) and decode tokens/s;
//! - **few-shot evaluation**: `--requests` Banking77 messages, each formatted by the
//!   ChatAdapter with the same `--demos` demos (DSPy's prompt after BootstrapFewShot), answered
//!   one after another through `LocalLm` as `Evaluate` does, with the prefix cache on and off.
//!
//! ```text
//! cargo run --release --example bench_generate -- --json out.json --workload workload.json
//! ```
//!
//! `--workload` writes both workloads' chat messages as JSON, so that
//! `tests/reference/bench_generate_torch.py` runs transformers on exactly the same prompts;
//! `scripts/bench-generate.sh` runs the two back to back.

#[path = "../tests/common/banking77.rs"]
mod banking77;
#[path = "common/flags.rs"]
mod flags;

use std::path::PathBuf;
use std::time::Instant;

use qlora::generate::{BatchRow, GenerationConfig, RowControl};
use qlora::model::{Message, Model};
use qlora::prompt::{ChatAdapter, Example, FieldType, Lm, LmRequest, LocalLm, Signature};

const USAGE: &str = "\
usage: bench_generate [--model default] [--decode-tokens 64] [--requests 10] [--demos 16]
                      [--max-tokens 16] [--json out.json] [--workload workload.json]";

struct Args {
    model: String,
    decode_tokens: usize,
    requests: usize,
    demos: usize,
    max_tokens: usize,
    json: Option<PathBuf>,
    workload: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        model: "default".into(),
        decode_tokens: 64,
        requests: 10,
        demos: 16,
        max_tokens: 16,
        json: None,
        workload: None,
    };
    flags::parse(USAGE, &[], |flag, v| {
        match flag {
            "--model" => a.model = v.to_string(),
            "--decode-tokens" => a.decode_tokens = flags::value(flag, v)?,
            "--requests" => a.requests = flags::value(flag, v)?,
            "--demos" => a.demos = flags::value(flag, v)?,
            "--max-tokens" => a.max_tokens = flags::value(flag, v)?,
            "--json" => a.json = Some(PathBuf::from(v)),
            "--workload" => a.workload = Some(PathBuf::from(v)),
            _ => return Err(format!("unknown flag {flag}")),
        }
        Ok(())
    })?;
    Ok(a)
}

/// The long prompt: a support conversation of a few hundred tokens.
fn long_prompt() -> Vec<Message> {
    let story = "I ordered a new debit card three weeks ago after my old one expired. The app \
        said it was dispatched, but nothing has arrived, and yesterday I noticed a payment I do \
        not recognise on my statement. I am travelling abroad next week and need to know \
        whether I can still top up my account, which exchange rate you will use, and whether \
        my PIN will work with the replacement card. ";
    vec![
        Message::system("You are a helpful banking assistant. Answer politely and precisely."),
        Message::user(format!(
            "{}Please explain, step by step, what I should do first.",
            story.repeat(3)
        )),
    ]
}

/// `requests` few-shot prompts over Banking77 messages with the same `demos` demos.
fn few_shot_prompts(requests: usize, demos: usize) -> Vec<Vec<Message>> {
    let intents = &banking77::INTENTS[..4];
    let per_intent = demos.div_ceil(intents.len()).max(1);
    let train = banking77::subset("train.csv", intents, 0, per_intent);
    let test = banking77::subset("test.csv", intents, 0, requests.div_ceil(intents.len()));
    let pairs = |f: &qlora::polars::prelude::DataFrame| {
        banking77::strings(f, "text")
            .into_iter()
            .zip(banking77::strings(f, "category"))
            .collect::<Vec<_>>()
    };
    let demos: Vec<Example> = pairs(&train)
        .into_iter()
        .take(demos)
        .map(|(t, c)| Example::new().with("text", t).with("intent", c))
        .collect();
    let signature = Signature::builder()
        .input_desc("text", "a bank customer's message")
        .output_typed("intent", FieldType::literal(intents.iter().copied()), "")
        .instructions("Classify the intent of the bank customer's message.")
        .build()
        .expect("a valid signature");
    pairs(&test)
        .into_iter()
        .take(requests)
        .map(|(t, _)| {
            ChatAdapter::default().format(&signature, &demos, &Example::new().with("text", t))
        })
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2)
    });
    let model = Model::load(&args.model)?;

    // 1. One long prompt: time to the first token, then the rest.
    let long = long_prompt();
    let ids = model
        .tokenizer
        .encode(&model.apply_chat_template(&long, true)?, true)?;
    let prompt_tokens = ids.len();
    // Warm-up (first allocations, thread pool), as the PyTorch side does.
    model.generate_rows(
        vec![BatchRow {
            prompt: ids.clone(),
            config: GenerationConfig::greedy(2),
        }],
        |_, _| RowControl::Continue,
    )?;
    let config = GenerationConfig::greedy(args.decode_tokens);
    let mut first: Option<Instant> = None;
    let t0 = Instant::now();
    let out = model.generate_rows(
        vec![BatchRow {
            prompt: ids,
            config,
        }],
        |_, _| {
            first.get_or_insert_with(Instant::now);
            RowControl::Continue
        },
    )?;
    let end = Instant::now();
    let first = first.unwrap_or(end);
    let prefill_s = (first - t0).as_secs_f64();
    let new_tokens = out[0].token_ids.len();
    let decode_tok_s = (new_tokens.saturating_sub(1)) as f64 / (end - first).as_secs_f64();
    println!(
        "long prompt: {prompt_tokens} tokens, prefill {:.2} s ({:.0} tok/s); decode {new_tokens} tokens at {decode_tok_s:.1} tok/s",
        prefill_s,
        prompt_tokens as f64 / prefill_s
    );

    // 2. Few-shot evaluation, one request after another, prefix cache on and off.
    let prompts = few_shot_prompts(args.requests, args.demos);
    let model = std::sync::Arc::new(model);
    let mut runs = vec![];
    let mut reused = 0.0;
    for cached in [true, false] {
        let this = LocalLm::from_arc(model.clone())
            .max_tokens(args.max_tokens)
            .prefix_cache(cached);
        let t0 = Instant::now();
        let mut tokens = 0;
        let mut texts = vec![];
        for messages in &prompts {
            let r = this.complete(&LmRequest::new(messages.clone()))?;
            tokens += r.usage.prompt_tokens;
            texts.push(r.choices[0].clone());
        }
        let seconds = t0.elapsed().as_secs_f64();
        if let Some(s) = this.prefix_cache_stats() {
            reused = s.reused_tokens as f64 / s.prompt_tokens.max(1) as f64;
        }
        println!(
            "few-shot, prefix cache {}: {} requests ({} prompt tokens in all) in {seconds:.1} s, {:.2} s/request",
            if cached { "on " } else { "off" },
            prompts.len(),
            tokens,
            seconds / prompts.len() as f64
        );
        runs.push((seconds, tokens, texts));
    }
    let same = runs[0]
        .2
        .iter()
        .zip(&runs[1].2)
        .filter(|(a, b)| a == b)
        .count();
    println!(
        "prefix cache: {:.0}% of prompt tokens reused; {same}/{} answers identical with and without it",
        100.0 * reused,
        prompts.len()
    );

    if let Some(path) = &args.workload {
        let json = serde_json::json!({
            "long_prompt": long,
            "decode_tokens": args.decode_tokens,
            "few_shot": prompts,
            "max_tokens": args.max_tokens,
        });
        std::fs::write(path, serde_json::to_string(&json)?)?;
    }
    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "impl": "qlora",
            "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "long_prompt_tokens": prompt_tokens,
            "prefill_seconds": prefill_s,
            "prefill_tok_s": prompt_tokens as f64 / prefill_s,
            "decode_tokens": new_tokens,
            "decode_tok_s": decode_tok_s,
            "few_shot_requests": prompts.len(),
            "few_shot_prompt_tokens": runs[0].1,
            "few_shot_seconds_prefix_cache": runs[0].0,
            "few_shot_seconds_no_cache": runs[1].0,
            "prefix_tokens_reused": reused,
            "answers_identical_with_and_without_cache": same,
            "answers": runs[0].2,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    Ok(())
}
