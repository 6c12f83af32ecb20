//! The HTTP side: routes, authentication, request handling, streaming.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::api::{self, ApiError, Sampling};
use super::engine::{Job, JobEvent, Queue, Rejected};
use super::ServeConfig;
use crate::generate::{BatchRow, FinishReason, GenerationConfig, GenerationOutput};

/// What every handler shares.
pub(crate) struct AppState {
    pub queue: Queue,
    pub config: ServeConfig,
    /// The name the base model is served under.
    pub base_name: String,
    pub adapters: Vec<String>,
    /// Tokenizer, chat template and context length, read without the worker.
    pub model: Arc<crate::model::Model>,
    pub started: u64,
    pub counter: AtomicU64,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_REQUEST);
        (status, Json(self.body())).into_response()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The router over `state`.
pub(crate) fn router(state: Arc<AppState>) -> Router {
    let limit = state.config.max_body_bytes;
    let v1 = Router::new()
        .route("/models", get(list_models))
        .route("/chat/completions", post(chat_completions))
        .route("/completions", post(completions))
        .layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .nest("/v1", v1)
        .route("/health", get(|| async { "ok" }))
        .fallback(|req: Request| async move {
            ApiError::new(
                404,
                "invalid_request_error",
                Some("not_found"),
                format!(
                    "no route {} {}; the API is under /v1 (GET /v1/models, POST /v1/chat/completions, POST /v1/completions)",
                    req.method(),
                    req.uri().path()
                ),
            )
        })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn authenticate(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.config.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            let e = ApiError::new(
                401,
                "invalid_request_error",
                Some("invalid_api_key"),
                "missing or incorrect API key: send `Authorization: Bearer <key>` with the key the server was started with",
            );
            log_line(&req_line(&req), "-", 0, 0, e.status, Instant::now());
            return e.into_response();
        }
    }
    next.run(req).await
}

fn req_line(req: &Request) -> String {
    format!("{} {}", req.method(), req.uri().path())
}

fn log_line(
    what: &str,
    model: &str,
    tokens_in: usize,
    tokens_out: usize,
    status: u16,
    start: Instant,
) {
    eprintln!(
        "qlora serve: {what} model={model} tokens_in={tokens_in} tokens_out={tokens_out} status={status} latency_ms={}",
        start.elapsed().as_millis()
    );
}

async fn list_models(State(state): State<Arc<AppState>>) -> Json<Value> {
    let data: Vec<Value> = std::iter::once(&state.base_name)
        .chain(&state.adapters)
        .map(|id| json!({"id": id, "object": "model", "created": state.started, "owned_by": "qlora"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// The request body, with axum's rejections (too large, unreadable) as OpenAI-shaped errors.
fn body_bytes(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        let status = rejection.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                413,
                "invalid_request_error",
                Some("request_too_large"),
                format!("the request body is larger than the server's limit of {limit} bytes"),
            )
        } else {
            ApiError::new(
                status.as_u16(),
                "invalid_request_error",
                None,
                format!("could not read the request body: {rejection}"),
            )
        }
    })
}

/// Which adapter serves `model` (`None`: the base).
fn route_model(state: &AppState, model: &str) -> Result<Option<String>, ApiError> {
    if model == state.base_name {
        Ok(None)
    } else if state.adapters.iter().any(|a| a == model) {
        Ok(Some(model.to_string()))
    } else {
        let mut e = ApiError::new(
            404,
            "invalid_request_error",
            Some("model_not_found"),
            format!(
                "the model `{model}` does not exist here; served models: {}",
                std::iter::once(&state.base_name)
                    .chain(&state.adapters)
                    .map(|s| format!("`{s}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
        e.param = Some("model".into());
        Err(e)
    }
}

/// One row per choice of each prompt, with the request's settings; checks the context length.
fn rows_for(
    state: &AppState,
    prompts: &[Vec<u32>],
    sampling: &Sampling,
    param: &str,
) -> Result<Vec<BatchRow>, ApiError> {
    let context = state.model.config().max_position_embeddings;
    let seed = sampling.seed.unwrap_or_else(|| {
        // No seed: a different one per request, as OpenAI's sampling is not reproducible.
        unix_now()
            ^ state
                .counter
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
    });
    let mut rows = Vec::new();
    for prompt in prompts {
        let room = context.saturating_sub(prompt.len());
        let max_new = match sampling.max_tokens {
            Some(n) if n > room => {
                return Err(ApiError::invalid(
                    param,
                    format!(
                        "this model's maximum context length is {context} tokens; the prompt uses {} and {n} more were requested",
                        prompt.len()
                    ),
                ))
            }
            Some(n) => n,
            None => room,
        };
        if room == 0 {
            return Err(ApiError::invalid(
                param,
                format!(
                    "the prompt ({} tokens) fills the model's context of {context} tokens",
                    prompt.len()
                ),
            ));
        }
        for choice in 0..sampling.n {
            rows.push(BatchRow {
                prompt: prompt.clone(),
                config: GenerationConfig {
                    max_new_tokens: max_new,
                    temperature: sampling.temperature,
                    top_p: sampling.top_p,
                    seed: seed.wrapping_add(choice as u64),
                    stop: sampling.stop.clone(),
                    ..GenerationConfig::default()
                },
            });
        }
    }
    Ok(rows)
}

fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length | FinishReason::Cancelled => "length",
    }
}

fn usage(outputs: &[GenerationOutput], prompt_tokens: usize) -> Value {
    let completion: usize = outputs.iter().map(|o| o.token_ids.len()).sum();
    json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion})
}

fn submit(state: &AppState, job: Job) -> Result<(), ApiError> {
    state.queue.submit(job).map_err(|r| match r {
        Rejected::Full { capacity } => ApiError::new(
            503,
            "server_error",
            Some("queue_full"),
            format!("the server is at capacity ({capacity} requests waiting); retry shortly"),
        ),
        Rejected::Stopped => ApiError::new(
            503,
            "server_error",
            Some("shutting_down"),
            "the server is shutting down",
        ),
    })
}

/// Waits for the job's result within the request timeout.
async fn outputs(
    state: &AppState,
    mut events: UnboundedReceiver<JobEvent>,
) -> Result<Vec<GenerationOutput>, ApiError> {
    let wait = async {
        while let Some(ev) = events.recv().await {
            if let JobEvent::Done(result) = ev {
                return result.map_err(|m| {
                    ApiError::new(500, "server_error", None, format!("generation failed: {m}"))
                });
            }
        }
        Err(ApiError::new(
            500,
            "server_error",
            None,
            "the generation worker stopped",
        ))
    };
    match tokio::time::timeout(state.config.request_timeout, wait).await {
        Ok(r) => r,
        // Returning drops `events`, which cancels the generation.
        Err(_) => Err(ApiError::new(
            504,
            "server_error",
            Some("timeout"),
            format!(
                "the request took longer than the server's timeout of {} s",
                state.config.request_timeout.as_secs()
            ),
        )),
    }
}

/// A request's model name, tokenised prompts and settings.
type Parsed = (String, Vec<Vec<u32>>, Sampling);

/// The two generation endpoints: they differ in how a request becomes prompts and how a choice
/// is shaped, and share everything else.
#[derive(Clone, Copy)]
enum Endpoint {
    Chat,
    Completions,
}

impl Endpoint {
    fn route(self) -> &'static str {
        match self {
            Endpoint::Chat => "POST /v1/chat/completions",
            Endpoint::Completions => "POST /v1/completions",
        }
    }

    fn id_prefix(self) -> &'static str {
        match self {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completions => "cmpl",
        }
    }

    fn object(self, stream: bool) -> &'static str {
        match (self, stream) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completions, _) => "text_completion",
        }
    }

    fn choice(self, index: usize, out: &GenerationOutput) -> Value {
        let finish = finish_reason(out.finish_reason);
        match self {
            Endpoint::Chat => {
                json!({"index": index, "message": {"role": "assistant", "content": out.text},
                                     "logprobs": null, "finish_reason": finish})
            }
            Endpoint::Completions => {
                json!({"index": index, "text": out.text, "logprobs": null, "finish_reason": finish})
            }
        }
    }

    /// The request's model name, tokenised prompts (the parameter they came from) and settings.
    fn parse(self, state: &AppState, body: &[u8]) -> Result<Parsed, (ApiError, String)> {
        let no_model = |e| (e, "-".to_string());
        let tokenize_error = |param: &str, model: &str, e: crate::Error| {
            (ApiError::invalid(param, e.to_string()), model.to_string())
        };
        match self {
            Endpoint::Chat => {
                let req =
                    api::chat_request(body, state.config.default_max_tokens).map_err(no_model)?;
                let prompt = state
                    .model
                    .apply_chat_template(&req.messages, true)
                    .and_then(|p| state.model.tokenizer.encode(&p, true))
                    .map_err(|e| tokenize_error("messages", &req.model, e))?;
                Ok((req.model, vec![prompt], req.sampling))
            }
            Endpoint::Completions => {
                let req = api::completion_request(body).map_err(no_model)?;
                let prompts = req
                    .prompts
                    .iter()
                    .map(|p| state.model.tokenizer.encode(p, true))
                    .collect::<crate::Result<Vec<_>>>()
                    .map_err(|e| tokenize_error("prompt", &req.model, e))?;
                if prompts.iter().any(|p| p.is_empty()) {
                    return Err((ApiError::invalid("prompt", "`prompt` is empty"), req.model));
                }
                Ok((req.model, prompts, req.sampling))
            }
        }
    }

    fn prompt_param(self) -> &'static str {
        match self {
            Endpoint::Chat => "messages",
            Endpoint::Completions => "prompt",
        }
    }
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    handle(Endpoint::Chat, &state, body).await
}

async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    handle(Endpoint::Completions, &state, body).await
}

async fn handle(
    endpoint: Endpoint,
    state: &Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let start = Instant::now();
    match generate(endpoint, state, body, start).await {
        Ok(r) => r,
        Err((e, model)) => {
            log_line(endpoint.route(), &model, 0, 0, e.status, start);
            e.into_response()
        }
    }
}

async fn generate(
    endpoint: Endpoint,
    state: &Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
    start: Instant,
) -> Result<Response, (ApiError, String)> {
    let body = body_bytes(body, state.config.max_body_bytes).map_err(|e| (e, "-".to_string()))?;
    let (model, prompts, sampling) = endpoint.parse(state, &body)?;
    let with_model = |e| (e, model.clone());
    let adapter = route_model(state, &model).map_err(with_model)?;
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
    let rows = rows_for(state, &prompts, &sampling, endpoint.prompt_param()).map_err(with_model)?;
    let (tx, rx) = unbounded_channel();
    submit(
        state,
        Job {
            adapter,
            rows,
            stream: sampling.stream,
            events: tx,
        },
    )
    .map_err(with_model)?;
    let id = format!(
        "{}-{:016x}",
        endpoint.id_prefix(),
        state.counter.fetch_add(1, Ordering::Relaxed) ^ unix_now() << 20
    );
    let created = unix_now();
    if sampling.stream {
        return Ok(stream_response(
            state.clone(),
            rx,
            Streaming {
                id,
                created,
                model,
                object: endpoint.object(true),
                chat: matches!(endpoint, Endpoint::Chat),
                n: sampling.n * prompts.len(),
                prompt_tokens,
                include_usage: sampling.include_usage,
                start,
            },
        ));
    }
    let outs = outputs(state, rx).await.map_err(with_model)?;
    let choices: Vec<Value> = outs
        .iter()
        .enumerate()
        .map(|(i, o)| endpoint.choice(i, o))
        .collect();
    let usage = usage(&outs, prompt_tokens);
    log_line(
        endpoint.route(),
        &model,
        prompt_tokens,
        usage["completion_tokens"].as_u64().unwrap_or(0) as usize,
        200,
        start,
    );
    let mut response = json!({
        "id": id, "object": endpoint.object(false), "created": created, "model": model,
        "choices": choices, "usage": usage,
    });
    if let Endpoint::Chat = endpoint {
        response["system_fingerprint"] = Value::Null;
    }
    Ok(Json(response).into_response())
}

/// What a streamed response needs to shape its chunks.
struct Streaming {
    id: String,
    created: u64,
    model: String,
    object: &'static str,
    chat: bool,
    n: usize,
    prompt_tokens: usize,
    include_usage: bool,
    start: Instant,
}

impl Streaming {
    fn chunk(&self, choices: Vec<Value>, usage: Option<Value>) -> Value {
        let mut v = json!({"id": self.id, "object": self.object, "created": self.created,
                           "model": self.model, "choices": choices});
        if let Some(u) = usage {
            v["usage"] = u;
        }
        v
    }

    fn delta(&self, index: usize, text: &str, role: bool, finish: Option<&str>) -> Value {
        if self.chat {
            let mut delta = json!({"content": text});
            if role {
                delta["role"] = json!("assistant");
            }
            json!({"index": index, "delta": delta, "logprobs": null, "finish_reason": finish})
        } else {
            json!({"index": index, "text": text, "logprobs": null, "finish_reason": finish})
        }
    }
}

/// Server-sent events: a first chunk per choice (the role, for chat), text deltas as they are
/// generated, a last chunk per choice with its finish reason, the usage chunk when asked for,
/// then `[DONE]`. Dropping the stream (the client left) cancels the generation.
fn stream_response(
    state: Arc<AppState>,
    rx: UnboundedReceiver<JobEvent>,
    s: Streaming,
) -> Response {
    let first: Vec<Event> = if s.chat {
        (0..s.n)
            .map(|i| {
                Event::default().data(s.chunk(vec![s.delta(i, "", true, None)], None).to_string())
            })
            .collect()
    } else {
        vec![]
    };
    let timeout = tokio::time::Instant::now() + state.config.request_timeout;
    struct Ctx {
        rx: UnboundedReceiver<JobEvent>,
        s: Streaming,
        done: bool,
        deadline: tokio::time::Instant,
    }
    let ctx = Ctx {
        rx,
        s,
        done: false,
        deadline: timeout,
    };
    let rest = stream::unfold(ctx, |mut ctx| async move {
        if ctx.done {
            return None;
        }
        let ev = tokio::time::timeout_at(ctx.deadline, ctx.rx.recv()).await;
        let events: Vec<Event> = match ev {
            Ok(Some(JobEvent::Text { choice, text })) => {
                vec![Event::default().data(
                    ctx.s
                        .chunk(vec![ctx.s.delta(choice, &text, false, None)], None)
                        .to_string(),
                )]
            }
            Ok(Some(JobEvent::Done(Ok(outs)))) => {
                ctx.done = true;
                let mut evs: Vec<Event> = outs
                    .iter()
                    .enumerate()
                    .map(|(i, o)| {
                        Event::default().data(
                            ctx.s
                                .chunk(
                                    vec![ctx.s.delta(
                                        i,
                                        "",
                                        false,
                                        Some(finish_reason(o.finish_reason)),
                                    )],
                                    None,
                                )
                                .to_string(),
                        )
                    })
                    .collect();
                let u = usage(&outs, ctx.s.prompt_tokens);
                if ctx.s.include_usage {
                    evs.push(
                        Event::default().data(ctx.s.chunk(vec![], Some(u.clone())).to_string()),
                    );
                }
                log_line(
                    &format!("POST (stream) {}", ctx.s.object),
                    &ctx.s.model,
                    ctx.s.prompt_tokens,
                    u["completion_tokens"].as_u64().unwrap_or(0) as usize,
                    200,
                    ctx.s.start,
                );
                evs.push(Event::default().data("[DONE]"));
                evs
            }
            Ok(Some(JobEvent::Done(Err(m)))) => {
                ctx.done = true;
                let e = ApiError::new(500, "server_error", None, format!("generation failed: {m}"));
                vec![
                    Event::default().data(e.body().to_string()),
                    Event::default().data("[DONE]"),
                ]
            }
            Ok(None) => {
                ctx.done = true;
                let e = ApiError::new(500, "server_error", None, "the generation worker stopped");
                vec![
                    Event::default().data(e.body().to_string()),
                    Event::default().data("[DONE]"),
                ]
            }
            Err(_) => {
                ctx.done = true;
                let e = ApiError::new(
                    504,
                    "server_error",
                    Some("timeout"),
                    "the request took longer than the server's timeout",
                );
                vec![
                    Event::default().data(e.body().to_string()),
                    Event::default().data("[DONE]"),
                ]
            }
        };
        let events: Vec<Result<Event, Infallible>> = events.into_iter().map(Ok).collect();
        Some((stream::iter(events), ctx))
    });
    let head = stream::iter(vec![stream::iter(
        first
            .into_iter()
            .map(Ok::<Event, Infallible>)
            .collect::<Vec<_>>(),
    )]);
    let all = head.chain(rest).flatten();
    Sse::new(all)
        .keep_alive(KeepAlive::default())
        .into_response()
}
