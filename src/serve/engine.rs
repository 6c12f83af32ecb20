//! The generation worker: one thread owns the model, takes queued requests, and generates them
//! in batches.
//!
//! Requests for the same model (the base, or one adapter) that are waiting when a batch starts
//! are generated together, each row with its own settings ([`Model::generate_rows`]); rows
//! leave the batch as they finish. A request whose client has gone away (its event receiver
//! dropped) is skipped if still queued and cancelled mid-generation otherwise.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};

use tokio::sync::mpsc::UnboundedSender;

use crate::generate::{BatchRow, GenerationOutput, RowControl};
use crate::lora::PeftModel;
use crate::model::Model;
use crate::Result;

/// What the server generates with: a model alone, or a base with named adapters.
#[derive(Debug)]
pub enum Backend {
    Base(Model),
    Adapters(PeftModel),
}

impl Backend {
    /// The model underneath (tokenizer, chat template, config).
    pub fn model(&self) -> &Model {
        match self {
            Backend::Base(m) => m,
            Backend::Adapters(p) => p.model(),
        }
    }

    /// Adapter names, sorted.
    pub fn adapter_names(&self) -> Vec<String> {
        match self {
            Backend::Base(_) => vec![],
            Backend::Adapters(p) => p.adapter_names(),
        }
    }

    /// Routes generation to `adapter` (`None`: the base model alone).
    fn select(&mut self, adapter: Option<&str>) -> Result<()> {
        if let Backend::Adapters(p) = self {
            match adapter {
                None => p.disable_adapters(),
                Some(name) => {
                    p.enable_adapters();
                    p.set_adapter(name)?;
                }
            }
        }
        Ok(())
    }
}

/// What a job reports back to the request handler.
#[derive(Debug)]
pub enum JobEvent {
    /// New text of choice `choice` (only for streaming jobs).
    Text { choice: usize, text: String },
    /// The finished outputs, one per choice, or why generation failed.
    Done(std::result::Result<Vec<GenerationOutput>, String>),
}

/// One request's work: `rows` are its choices (or prompts), generated with `adapter`.
#[derive(Debug)]
pub struct Job {
    pub adapter: Option<String>,
    pub rows: Vec<BatchRow>,
    pub stream: bool,
    pub events: UnboundedSender<JobEvent>,
}

/// Counters of what the worker did, for tests, benchmarks and monitoring.
#[derive(Debug, Default)]
pub struct Counters {
    /// Jobs accepted and not yet taken by the worker.
    waiting: AtomicUsize,
    batches: AtomicUsize,
    jobs: AtomicUsize,
    rows: AtomicUsize,
    largest_batch: AtomicUsize,
    cancelled_rows: AtomicUsize,
}

/// A snapshot of [`Counters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Requests waiting for the worker.
    pub waiting: usize,
    /// Batches generated.
    pub batches: usize,
    /// Requests generated (each may have several rows: `n` choices or prompts).
    pub jobs: usize,
    /// Sequences generated.
    pub rows: usize,
    /// Most rows in one batch.
    pub largest_batch: usize,
    /// Rows stopped (or never started) because their client went away or timed out.
    pub cancelled_rows: usize,
}

impl Counters {
    /// The current values.
    pub fn snapshot(&self) -> Stats {
        Stats {
            waiting: self.waiting.load(Ordering::SeqCst),
            batches: self.batches.load(Ordering::SeqCst),
            jobs: self.jobs.load(Ordering::SeqCst),
            rows: self.rows.load(Ordering::SeqCst),
            largest_batch: self.largest_batch.load(Ordering::SeqCst),
            cancelled_rows: self.cancelled_rows.load(Ordering::SeqCst),
        }
    }
}

/// The handle request handlers submit jobs through.
#[derive(Clone)]
pub struct Queue {
    tx: mpsc::Sender<Job>,
    capacity: usize,
    counters: Arc<Counters>,
}

/// Why a job was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// `capacity` jobs are already waiting.
    Full { capacity: usize },
    /// The worker has stopped.
    Stopped,
}

impl Queue {
    /// Queues `job` unless the queue is full.
    pub fn submit(&self, job: Job) -> std::result::Result<(), Rejected> {
        let waiting = &self.counters.waiting;
        let before = waiting.fetch_add(1, Ordering::SeqCst);
        if before >= self.capacity {
            waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(Rejected::Full {
                capacity: self.capacity,
            });
        }
        self.tx.send(job).map_err(|_| {
            waiting.fetch_sub(1, Ordering::SeqCst);
            Rejected::Stopped
        })
    }

    /// The worker's counters (readable after the queue is gone).
    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }
}

/// Starts the worker thread; it stops when every [`Queue`] clone is dropped. `max_batch` caps
/// the rows generated together (1: one request at a time).
pub fn start(
    backend: Backend,
    max_batch: usize,
    capacity: usize,
) -> (Queue, std::thread::JoinHandle<Backend>) {
    let (tx, rx) = mpsc::channel::<Job>();
    let counters = Arc::new(Counters::default());
    let c = counters.clone();
    let handle = std::thread::Builder::new()
        .name("qlora-generate".into())
        .spawn(move || worker(backend, rx, c, max_batch.max(1)))
        .expect("spawning the generation thread");
    (
        Queue {
            tx,
            capacity,
            counters,
        },
        handle,
    )
}

fn worker(
    mut backend: Backend,
    rx: mpsc::Receiver<Job>,
    counters: Arc<Counters>,
    max_batch: usize,
) -> Backend {
    let mut pending: VecDeque<Job> = VecDeque::new();
    loop {
        if pending.is_empty() {
            match rx.recv() {
                Ok(job) => pending.push_back(job),
                Err(_) => return backend,
            }
        }
        while let Ok(job) = rx.try_recv() {
            pending.push_back(job);
        }
        // The oldest job decides the adapter; others for the same adapter join while rows fit.
        let adapter = pending[0].adapter.clone();
        let mut batch: Vec<Job> = Vec::new();
        let mut rows = 0;
        let mut rest = VecDeque::new();
        while let Some(job) = pending.pop_front() {
            let fits = batch.is_empty() || rows + job.rows.len() <= max_batch;
            if job.adapter == adapter && fits {
                rows += job.rows.len();
                batch.push(job);
            } else {
                rest.push_back(job);
            }
        }
        pending = rest;
        counters.waiting.fetch_sub(batch.len(), Ordering::SeqCst);
        // Clients that left while their request waited: their rows are cancelled before they
        // start.
        batch.retain(|j| {
            let left = j.events.is_closed();
            if left {
                counters
                    .cancelled_rows
                    .fetch_add(j.rows.len(), Ordering::SeqCst);
            }
            !left
        });
        if batch.is_empty() {
            continue;
        }
        run_batch(&mut backend, adapter.as_deref(), batch, &counters);
    }
}

fn run_batch(backend: &mut Backend, adapter: Option<&str>, batch: Vec<Job>, counters: &Counters) {
    if let Err(e) = backend.select(adapter) {
        for job in &batch {
            let _ = job.events.send(JobEvent::Done(Err(e.to_string())));
        }
        return;
    }
    // Row r of the batch is choice `owner[r].1` of job `owner[r].0`.
    let mut owner = Vec::new();
    let mut rows = Vec::new();
    for (j, job) in batch.iter().enumerate() {
        for (c, row) in job.rows.iter().enumerate() {
            owner.push((j, c));
            rows.push(row.clone());
        }
    }
    counters.batches.fetch_add(1, Ordering::SeqCst);
    counters.jobs.fetch_add(batch.len(), Ordering::SeqCst);
    counters.rows.fetch_add(rows.len(), Ordering::SeqCst);
    counters
        .largest_batch
        .fetch_max(rows.len(), Ordering::SeqCst);
    let model = backend.model();
    // A panic in generation must not take the server down with it.
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        model.generate_rows(rows, |r, piece| {
            let (j, c) = owner[r];
            let job = &batch[j];
            if job.events.is_closed() {
                counters.cancelled_rows.fetch_add(1, Ordering::SeqCst);
                return RowControl::Cancel;
            }
            if job.stream && !piece.is_empty() {
                let _ = job.events.send(JobEvent::Text {
                    choice: c,
                    text: piece.to_string(),
                });
            }
            RowControl::Continue
        })
    }));
    match result {
        Ok(Ok(outputs)) => {
            let mut per_job: Vec<Vec<GenerationOutput>> = batch.iter().map(|_| vec![]).collect();
            for ((j, _), out) in owner.iter().zip(outputs) {
                per_job[*j].push(out);
            }
            for (job, outs) in batch.iter().zip(per_job) {
                let _ = job.events.send(JobEvent::Done(Ok(outs)));
            }
        }
        Ok(Err(e)) => {
            for job in &batch {
                let _ = job.events.send(JobEvent::Done(Err(e.to_string())));
            }
        }
        Err(_) => {
            for job in &batch {
                let _ = job
                    .events
                    .send(JobEvent::Done(Err("generation panicked".to_string())));
            }
        }
    }
}
