//! The `qlora` command line: a thin front end over the library.

use std::io::Write;

use anyhow::Context;
use clap::{Parser, Subcommand};
use qlora::generate::GenerationConfig;
use qlora::model::{Message, Model};

#[derive(Parser)]
#[command(
    name = "qlora",
    version,
    about = "QLoRA fine-tuning and DSPy-style programs for small causal LMs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt, streaming it to stdout.
    Generate {
        /// `default` (SmolLM2-135M-Instruct Q4_1), a .gguf file, a HF model folder, or a hub id.
        #[arg(long, default_value = "default")]
        model: String,
        /// The prompt text.
        #[arg(long)]
        prompt: String,
        /// Wrap the prompt as a user message in the model's chat template.
        #[arg(long)]
        chat: bool,
        /// An optional system message (with --chat).
        #[arg(long)]
        system: Option<String>,
        /// Tokens to generate at most.
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        /// 0 = greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        #[arg(long)]
        top_k: Option<usize>,
        #[arg(long)]
        top_p: Option<f64>,
        #[arg(long, default_value_t = 1.0)]
        repetition_penalty: f32,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Stop before this string (repeatable).
        #[arg(long)]
        stop: Vec<String>,
    },
    /// Print the model's architecture and size.
    Info {
        #[arg(long, default_value = "default")]
        model: String,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Generate {
            model,
            prompt,
            chat,
            system,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            seed,
            stop,
        } => {
            let model = Model::load(&model).context("loading the model")?;
            let text = if chat {
                let mut messages = Vec::new();
                if let Some(s) = system {
                    messages.push(Message::system(s));
                }
                messages.push(Message::user(prompt));
                model.apply_chat_template(&messages, true)?
            } else {
                prompt
            };
            let config = GenerationConfig {
                max_new_tokens,
                temperature,
                top_k,
                top_p,
                repetition_penalty,
                seed,
                stop,
                ..GenerationConfig::default()
            };
            let started = std::time::Instant::now();
            let mut stdout = std::io::stdout();
            let out = model.generate_stream(&text, &config, |piece| {
                let _ = stdout.write_all(piece.as_bytes());
                let _ = stdout.flush();
            })?;
            let secs = started.elapsed().as_secs_f64();
            println!();
            eprintln!(
                "[{} prompt + {} generated tokens in {secs:.2} s, {:.1} tok/s, finish: {:?}]",
                out.prompt_tokens,
                out.token_ids.len(),
                out.token_ids.len() as f64 / secs,
                out.finish_reason
            );
        }
        Command::Info { model } => {
            let model = Model::load(&model).context("loading the model")?;
            println!("{}", model.summary());
        }
    }
    Ok(())
}
