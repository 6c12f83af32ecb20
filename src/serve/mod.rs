//! An OpenAI-compatible HTTP server for a model and its adapters (`qlora serve`), so Python DSPy,
//! the `openai` client, LangChain or our own [`crate::prompt`] client can use a fine-tuned model
//! the way they use vLLM.
//!
//! - `GET /v1/models`: the base model (under its name) and every adapter (under its name).
//! - `POST /v1/chat/completions`: the model's chat template; `stream: true` sends server-sent
//!   events ending in `[DONE]`. `max_tokens` and `max_completion_tokens` (what DSPy 3.4 sends),
//!   `temperature`, `top_p`, `n`, `stop`, `seed`, `stream_options.include_usage`; `usage` counts.
//! - `POST /v1/completions`: plain text prompts.
//!
//! Requests wait in a bounded queue; one worker thread generates them in batches (requests for
//! the same model that are waiting when a batch starts run together, each with its own
//! settings). A full queue answers 503, a request over its time 504, a client that disconnects
//! has its generation cancelled. Errors are OpenAI-shaped JSON with 4xx codes for client
//! mistakes. It binds 127.0.0.1 unless told otherwise, takes an optional bearer key, limits
//! body size, logs one line per request to stderr, and shuts down gracefully (in-flight
//! requests finish).
//!
//! ```no_run
//! use qlora::model::Model;
//! use qlora::serve::{Backend, ServeConfig, Server};
//! let server = Server::start(Backend::Base(Model::load("default")?), ServeConfig::default().port(0))?;
//! println!("OpenAI base URL: {}", server.base_url()); // http://127.0.0.1:PORT/v1
//! server.shutdown();
//! # Ok::<(), qlora::Error>(())
//! ```

pub mod api;
pub mod engine;
mod http;

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

pub use engine::{Backend, Stats};

use crate::lora::PeftModel;
use crate::model::Model;
use crate::{Error, Result};

/// How the server listens and schedules.
#[derive(Debug, Clone, PartialEq)]
pub struct ServeConfig {
    /// Address to bind; `127.0.0.1` keeps the server local.
    pub host: String,
    /// Port (0: any free port; [`Server::addr`] tells which).
    pub port: u16,
    /// When set, every `/v1` request needs `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Most sequences generated together.
    pub max_batch: usize,
    /// Most requests waiting; more get 503.
    pub max_queue: usize,
    /// A request still unanswered after this gets 504 (and its generation is cancelled).
    pub request_timeout: Duration,
    /// Larger request bodies get 413.
    pub max_body_bytes: usize,
    /// Chat completions without `max_tokens`/`max_completion_tokens` stop after this many
    /// tokens (`None`: when the context is full, as OpenAI does).
    pub default_max_tokens: Option<usize>,
    /// The name the base model is served under (default: the model's name).
    pub model_name: Option<String>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8000,
            api_key: None,
            max_batch: 8,
            max_queue: 64,
            request_timeout: Duration::from_secs(300),
            max_body_bytes: 1 << 20,
            default_max_tokens: Some(512),
            model_name: None,
        }
    }
}

impl ServeConfig {
    /// Sets the port (0: any free one).
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }
    /// Sets the address to bind.
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.host = host.into();
        self
    }
    /// Requires this bearer key.
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }
    /// Most sequences generated together (1: one request at a time).
    pub fn max_batch(mut self, n: usize) -> Self {
        self.max_batch = n;
        self
    }
    /// Most requests waiting.
    pub fn max_queue(mut self, n: usize) -> Self {
        self.max_queue = n;
        self
    }
    /// Per-request time limit.
    pub fn request_timeout(mut self, t: Duration) -> Self {
        self.request_timeout = t;
        self
    }
    /// Largest accepted request body.
    pub fn max_body_bytes(mut self, n: usize) -> Self {
        self.max_body_bytes = n;
        self
    }
    /// The base model's served name.
    pub fn model_name(mut self, name: impl Into<String>) -> Self {
        self.model_name = Some(name.into());
        self
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::InvalidArgument(format!("ServeConfig: {m}")));
        if self.max_batch == 0 {
            return bad("max_batch must be at least 1");
        }
        if self.max_queue == 0 {
            return bad("max_queue must be at least 1");
        }
        if self.request_timeout.is_zero() {
            return bad("request_timeout must be positive");
        }
        Ok(())
    }
}

/// A base model with adapters loaded from PEFT folders, each served under its name:
/// `adapters = [("support", "runs/demo/adapter")]`.
pub fn backend_with_adapters(
    model: Model,
    adapters: &[(String, std::path::PathBuf)],
) -> Result<Backend> {
    if adapters.is_empty() {
        return Ok(Backend::Base(model));
    }
    let mut names = std::collections::BTreeSet::new();
    for (name, _) in adapters {
        if !names.insert(name) {
            return Err(Error::InvalidArgument(format!(
                "adapter name `{name}` is given twice"
            )));
        }
        if name == &model.name {
            return Err(Error::InvalidArgument(format!(
                "adapter name `{name}` is the base model's name; pick another"
            )));
        }
    }
    Ok(Backend::Adapters(PeftModel::with_adapters(
        model, adapters,
    )?))
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    counters: Arc<engine::Counters>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Server {
    /// Binds and starts serving in background threads; returns once the port is open.
    pub fn start(backend: Backend, config: ServeConfig) -> Result<Self> {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        Self::start_until(backend, config, async move {
            let _ = rx.await;
        })
        .map(|(addr, queue, thread)| Server {
            addr,
            counters: queue.counters(),
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    /// Serves until SIGTERM or Ctrl-C, then finishes in-flight requests and returns
    /// (`qlora serve`).
    pub fn run_until_signal(backend: Backend, config: ServeConfig) -> Result<()> {
        let signal = async {
            let ctrl_c = tokio::signal::ctrl_c();
            #[cfg(unix)]
            {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("installing the SIGTERM handler");
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            #[cfg(not(unix))]
            {
                let _ = ctrl_c.await;
            }
            eprintln!("qlora serve: shutting down; finishing in-flight requests");
        };
        let (addr, queue, thread) = Self::start_until(backend, config, signal)?;
        drop(queue);
        eprintln!("qlora serve: listening on http://{addr}/v1");
        thread
            .join()
            .map_err(|_| Error::InvalidArgument("the server thread panicked".into()))?
    }

    fn start_until(
        backend: Backend,
        config: ServeConfig,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(
        SocketAddr,
        engine::Queue,
        std::thread::JoinHandle<Result<()>>,
    )> {
        config.validate()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| Error::InvalidArgument(format!("starting the async runtime: {e}")))?;
        let bind = format!("{}:{}", config.host, config.port);
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(&bind))
            .map_err(|e| Error::InvalidArgument(format!("cannot listen on {bind}: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::InvalidArgument(format!("listening socket: {e}")))?;
        let model = Arc::new(backend.model().clone());
        let base_name = config
            .model_name
            .clone()
            .unwrap_or_else(|| model.name.clone());
        let adapters = backend.adapter_names();
        let (queue, worker) = engine::start(backend, config.max_batch, config.max_queue);
        let state = Arc::new(http::AppState {
            queue: queue.clone(),
            config,
            base_name,
            adapters,
            model,
            started: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            counter: AtomicU64::new(0),
        });
        let app = http::router(state);
        let thread = std::thread::Builder::new()
            .name("qlora-serve".into())
            .spawn(move || {
                let served = runtime.block_on(async move {
                    axum::serve(listener, app)
                        .with_graceful_shutdown(stop)
                        .await
                });
                // The router (and with it the last queue handle) is gone: the worker ends.
                let _ = worker.join();
                served.map_err(|e| Error::InvalidArgument(format!("server error: {e}")))
            })
            .map_err(|e| Error::InvalidArgument(format!("starting the server thread: {e}")))?;
        Ok((addr, queue, thread))
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What the generation worker has done so far.
    pub fn stats(&self) -> Stats {
        self.counters.snapshot()
    }

    /// The OpenAI base URL: `http://ADDR/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Stops accepting connections, finishes in-flight requests, and waits for both.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}
