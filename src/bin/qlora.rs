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
    /// Fine-tune a LoRA adapter (QLoRA over the frozen, quantised base) on a dataset.
    ///
    /// The data file is JSONL, CSV or Parquet with `messages`, `prompt`/`completion`,
    /// `instruction`/`input`/`output` or `text` columns. Checkpoints go to
    /// OUTPUT_DIR/checkpoint-N; the final adapter (PEFT format), history.csv/json and loss.svg to
    /// OUTPUT_DIR.
    Train(Box<TrainArgs>),
    /// The main job: teach the default model to turn support tickets into strict JSON, and show
    /// the before/after scores (writes runs/demo/report.html).
    Demo {
        #[arg(long, default_value = "default")]
        model: String,
        #[arg(long, default_value = "runs/demo")]
        output_dir: std::path::PathBuf,
        /// Generated training tickets.
        #[arg(long, default_value_t = 96)]
        train_examples: usize,
        /// Held-out tickets.
        #[arg(long, default_value_t = 40)]
        test_examples: usize,
        #[arg(long, default_value_t = 1.0)]
        epochs: f64,
        #[arg(long, default_value_t = 1e-3)]
        learning_rate: f64,
    },
    /// Serve the model and its adapters over an OpenAI-compatible HTTP API.
    ///
    /// Endpoints: GET /v1/models, POST /v1/chat/completions (stream: true for server-sent
    /// events), POST /v1/completions. The base model answers under its name (see /v1/models or
    /// --model-name), each adapter under the name given with --adapter. From Python DSPy:
    /// dspy.LM("openai/NAME", api_base="http://127.0.0.1:PORT/v1", api_key="KEY or anything").
    /// Stops on SIGTERM or Ctrl-C after finishing the requests in flight.
    Serve(ServeArgs),
    /// Print the model's architecture and size.
    Info {
        #[arg(long, default_value = "default")]
        model: String,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Base model: `default`, a .gguf file, a HF folder, or a hub id.
    #[arg(long, default_value = "default")]
    model: String,
    /// A PEFT adapter folder served under NAME: `--adapter support=runs/demo/adapter`
    /// (repeatable).
    #[arg(long = "adapter", value_name = "NAME=PATH")]
    adapters: Vec<String>,
    /// The name the base model is served under (default: the model's own name).
    #[arg(long)]
    model_name: Option<String>,
    /// Address to bind. The default keeps the server on this machine; use 0.0.0.0 only on a
    /// trusted network, with --api-key.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer KEY` (also read from QLORA_API_KEY).
    #[arg(long, env = "QLORA_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Most sequences generated together in one batch (1: one request at a time).
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// Most requests waiting; more are answered 503.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Seconds before an unanswered request gets 504 and its generation is cancelled.
    #[arg(long, default_value_t = 300)]
    request_timeout: u64,
    /// Largest accepted request body in bytes (larger: 413).
    #[arg(long, default_value_t = 1 << 20)]
    max_body_bytes: usize,
    /// Chat completions without max_tokens / max_completion_tokens stop after this many tokens
    /// (0: only when the context is full).
    #[arg(long, default_value_t = 512)]
    default_max_tokens: usize,
}

fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    let adapters = args
        .adapters
        .iter()
        .map(|a| {
            let (name, path) = a.split_once('=').with_context(|| {
                format!("--adapter `{a}`: expected NAME=PATH, e.g. support=runs/demo/adapter")
            })?;
            anyhow::ensure!(!name.is_empty(), "--adapter `{a}`: the name is empty");
            Ok((name.to_string(), std::path::PathBuf::from(path)))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let model = Model::load(&args.model).context("loading the model")?;
    let backend =
        qlora::serve::backend_with_adapters(model, &adapters).context("loading the adapters")?;
    let mut config = qlora::serve::ServeConfig::default()
        .host(args.host)
        .port(args.port)
        .max_batch(args.max_batch)
        .max_queue(args.max_queue)
        .request_timeout(std::time::Duration::from_secs(args.request_timeout))
        .max_body_bytes(args.max_body_bytes);
    config.api_key = args.api_key.filter(|k| !k.is_empty());
    config.model_name = args.model_name;
    config.default_max_tokens = (args.default_max_tokens > 0).then_some(args.default_max_tokens);
    qlora::serve::Server::run_until_signal(backend, config)?;
    Ok(())
}

#[derive(clap::Args)]
struct TrainArgs {
    /// Base model: `default`, a .gguf file, a HF folder (add --load-in-4bit for NF4), or a hub id.
    #[arg(long, default_value = "default")]
    model: String,
    /// Dataset file (.jsonl, .json, .csv, .parquet).
    #[arg(long)]
    data: std::path::PathBuf,
    /// Where checkpoints and the final adapter go.
    #[arg(long)]
    output_dir: std::path::PathBuf,
    /// Quantise a HF model's linear layers to NF4 with double quantisation on load.
    #[arg(long)]
    load_in_4bit: bool,
    /// Truncate examples to this many tokens.
    #[arg(long, default_value_t = 512)]
    max_seq_len: usize,
    /// Share of examples held out for evaluation loss (0 = none).
    #[arg(long, default_value_t = 0.0)]
    validation_split: f64,
    /// Skip malformed rows (with a warning each) instead of stopping.
    #[arg(long)]
    skip_invalid_rows: bool,
    #[arg(long, default_value_t = 1.0)]
    epochs: f64,
    /// Optimiser steps (overrides --epochs).
    #[arg(long)]
    max_steps: Option<usize>,
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    #[arg(long, default_value_t = 1)]
    gradient_accumulation_steps: usize,
    #[arg(long, default_value_t = 2e-4)]
    learning_rate: f64,
    /// constant, constant_with_warmup, linear or cosine.
    #[arg(long, default_value = "linear")]
    scheduler: String,
    /// Warmup: a step count (≥ 1) or a ratio of all steps (< 1).
    #[arg(long, default_value_t = 0.0)]
    warmup: f64,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Global gradient-norm clip (0 = off).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[arg(long)]
    group_by_length: bool,
    #[arg(long, default_value_t = 10)]
    logging_steps: usize,
    #[arg(long)]
    eval_steps: Option<usize>,
    #[arg(long)]
    save_steps: Option<usize>,
    #[arg(long)]
    save_total_limit: Option<usize>,
    /// Stop after this many evaluations without improvement.
    #[arg(long)]
    early_stopping_patience: Option<usize>,
    /// Resume from the newest checkpoint in --output-dir.
    #[arg(long)]
    resume: bool,
    /// Resume from this checkpoint folder.
    #[arg(long)]
    resume_from: Option<std::path::PathBuf>,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    lora_r: usize,
    #[arg(long, default_value_t = 32.0)]
    lora_alpha: f64,
    #[arg(long, default_value_t = 0.05)]
    lora_dropout: f64,
    /// Comma-separated module names (q_proj,v_proj) or `all-linear`.
    #[arg(long, default_value = "q_proj,v_proj")]
    target_modules: String,
    /// Store block activations instead of recomputing them (faster, more memory).
    #[arg(long)]
    no_gradient_checkpointing: bool,
    /// Seed of the adapters' initialisation and dropout.
    #[arg(long, default_value_t = 0)]
    adapter_seed: u64,
    /// Print progress lines instead of a progress bar.
    #[arg(long)]
    plain: bool,
}

fn run_train(args: TrainArgs) -> anyhow::Result<()> {
    use qlora::data::{DataConfig, SftDataset};
    use qlora::lora::{LoraConfig, PeftModel, TargetModules};
    use qlora::train::{Progress, ResumeFrom, SchedulerType, TrainConfig, TrainEvent, Warmup};

    let mut options = qlora::model::LoadOptions::default();
    if args.load_in_4bit {
        options = options.load_in_4bit(qlora::quant::Quant4Config::default());
    }
    let model = Model::load_with(&args.model, &options).context("loading the model")?;
    let data_config = DataConfig::default()
        .max_seq_len(args.max_seq_len)
        .validation_split(args.validation_split)
        .seed(args.seed)
        .skip_invalid_rows(args.skip_invalid_rows);
    let data = SftDataset::load(&args.data, &model, &data_config)?;
    eprintln!("{}", data.report);

    let targets = if args.target_modules == "all-linear" {
        TargetModules::Pattern("all-linear".into())
    } else {
        TargetModules::List(
            args.target_modules
                .split(',')
                .map(|s| s.trim().to_string())
                .collect(),
        )
    };
    let lora = LoraConfig {
        r: args.lora_r,
        lora_alpha: args.lora_alpha,
        lora_dropout: args.lora_dropout,
        target_modules: Some(targets),
        ..LoraConfig::qlora()
    };
    let mut peft = PeftModel::new_seeded(model, &lora, args.adapter_seed)?;
    peft.set_gradient_checkpointing(!args.no_gradient_checkpointing);
    eprintln!("{}", peft.trainable_parameters_line());

    let scheduler: SchedulerType = serde_json::from_value(serde_json::Value::String(
        args.scheduler.clone(),
    ))
    .with_context(|| {
        format!(
            "--scheduler `{}`: use constant, constant_with_warmup, linear or cosine",
            args.scheduler
        )
    })?;
    let mut config = TrainConfig::default()
        .output_dir(&args.output_dir)
        .epochs(args.epochs)
        .batch_size(args.batch_size)
        .gradient_accumulation_steps(args.gradient_accumulation_steps)
        .learning_rate(args.learning_rate)
        .scheduler(scheduler)
        .warmup(Warmup::from_hf(args.warmup))
        .weight_decay(args.weight_decay)
        .max_grad_norm((args.max_grad_norm > 0.0).then_some(args.max_grad_norm))
        .seed(args.seed)
        .group_by_length(args.group_by_length)
        .logging_steps(args.logging_steps);
    config.max_steps = args.max_steps;
    config.eval_steps = args.eval_steps;
    config.save_steps = args.save_steps;
    config.save_total_limit = args.save_total_limit;
    config.early_stopping_patience = args.early_stopping_patience;
    config.resume_from_checkpoint = match (args.resume, args.resume_from) {
        (_, Some(p)) => Some(ResumeFrom::Path(p)),
        (true, None) => Some(ResumeFrom::Latest),
        (false, None) => None,
    };
    let use_bar = !args.plain && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let run = if use_bar {
        config.progress = Progress::Silent;
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
            )
            .expect("valid template"),
        );
        let run = qlora::train::train_with(&mut peft, &data, &config, |event| match event {
            TrainEvent::Started {
                total_steps,
                start_step,
                ..
            } => {
                bar.set_length(*total_steps as u64);
                bar.set_position(*start_step as u64);
            }
            TrainEvent::Step(r) => {
                bar.set_position(r.step as u64);
                bar.set_message(format!(
                    "loss {:.4}  lr {:.2e}  {:.0} tok/s",
                    r.loss, r.lr, r.tokens_per_sec
                ));
            }
            TrainEvent::Evaluated {
                step, eval_loss, ..
            } => {
                bar.println(format!("step {step}: eval_loss {eval_loss:.4}"));
            }
            TrainEvent::Saved { path, .. } => bar.println(format!("saved {}", path.display())),
        });
        bar.finish_and_clear();
        run?
    } else {
        // Lines on stdout, flushed per line (the SIGKILL test reads them from a pipe).
        qlora::train::train(&mut peft, &data, &config)?
    };
    println!("{run}");
    Ok(())
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
        Command::Train(args) => run_train(*args)?,
        Command::Demo {
            model,
            output_dir,
            train_examples,
            test_examples,
            epochs,
            learning_rate,
        } => {
            let mut config = qlora::demo::DemoConfig {
                model,
                output_dir,
                train_examples,
                test_examples,
                ..Default::default()
            };
            config.train = config.train.epochs(epochs).learning_rate(learning_rate);
            let report = qlora::demo::run_demo(&config)?;
            println!("\n{report}");
            println!(
                "adapter, history and loss plot: {}/adapter; report: {}/report.html",
                config.output_dir.display(),
                config.output_dir.display()
            );
        }
        Command::Serve(args) => run_serve(args)?,
        Command::Info { model } => {
            let model = Model::load(&model).context("loading the model")?;
            println!("{}", model.summary());
        }
    }
    Ok(())
}
