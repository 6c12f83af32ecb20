//! Load test of `qlora serve` on loopback: C concurrent clients × R chat requests each against
//! the in-process server with the default model, once per `--max-batch` value, side by side.
//!
//! ```text
//! cargo run --release --features serve --example bench_serve -- \
//!     --clients 16 --requests 50 --max-tokens 8 --max-batch 1,16 --json target/bench-serve.json
//! ```
//!
//! Each request is a short greedy chat completion (a different question per request). Reported
//! per configuration: failures (anything but HTTP 200), wall time, requests/s, generated
//! tokens/s, latency p50/p99, and the server's batch statistics.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use qlora::model::Model;
use qlora::serve::{Backend, ServeConfig, Server};
use serde_json::{json, Value};

const USAGE: &str = "usage: bench_serve [--model default] [--clients 16] [--requests 50] \
[--max-tokens 8] [--max-batch 1,16] [--json out.json]";

struct Args {
    model: String,
    clients: usize,
    requests: usize,
    max_tokens: usize,
    batches: Vec<usize>,
    json: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        model: "default".into(),
        clients: 16,
        requests: 50,
        max_tokens: 8,
        batches: vec![1, 16],
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value\n{USAGE}"));
        let num = |v: String| v.parse::<usize>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--model" => a.model = value()?,
            "--clients" => a.clients = num(value()?)?,
            "--requests" => a.requests = num(value()?)?,
            "--max-tokens" => a.max_tokens = num(value()?)?,
            "--max-batch" => {
                a.batches = value()?
                    .split(',')
                    .map(|s| {
                        s.trim()
                            .parse::<usize>()
                            .map_err(|e| format!("--max-batch: {e}"))
                    })
                    .collect::<Result<_, _>>()?
            }
            "--json" => a.json = Some(value()?),
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    Ok(a)
}

/// One request; returns (HTTP status, completion tokens).
fn request(addr: SocketAddr, body: &str) -> std::io::Result<(u16, u64)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(900)))?;
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let tokens = raw
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str::<Value>(b).ok())
        .and_then(|v| v["usage"]["completion_tokens"].as_u64())
        .unwrap_or(0);
    Ok((status, tokens))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx]
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let model = Model::load(&args.model).unwrap_or_else(|e| {
        eprintln!("bench_serve: {e}");
        std::process::exit(1)
    });
    let name = model.name.clone();
    let mut results = Vec::new();
    for &max_batch in &args.batches {
        let config = ServeConfig::default()
            .port(0)
            .max_batch(max_batch)
            .max_queue(args.clients * 2);
        let server = Server::start(Backend::Base(model.clone()), config).expect("server");
        let addr = server.addr();
        let started = Instant::now();
        let per_client: Vec<Vec<(u16, u64, f64)>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..args.clients)
                .map(|c| {
                    let name = name.clone();
                    let (requests, max_tokens) = (args.requests, args.max_tokens);
                    s.spawn(move || {
                        (0..requests)
                            .map(|r| {
                                let body = json!({
                                    "model": name,
                                    "messages": [{"role": "user", "content": format!("Give me a fact about the number {}.", c * requests + r)}],
                                    "temperature": 0,
                                    "max_completion_tokens": max_tokens,
                                })
                                .to_string();
                                let t = Instant::now();
                                let (status, tokens) = request(addr, &body).unwrap_or((0, 0));
                                (status, tokens, t.elapsed().as_secs_f64())
                            })
                            .collect()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let wall = started.elapsed().as_secs_f64();
        let all: Vec<(u16, u64, f64)> = per_client.into_iter().flatten().collect();
        let failures = all.iter().filter(|(s, _, _)| *s != 200).count();
        let tokens: u64 = all.iter().map(|(_, t, _)| t).sum();
        let mut lat: Vec<f64> = all.iter().map(|(_, _, l)| *l).collect();
        lat.sort_by(|a, b| a.total_cmp(b));
        let stats = server.stats();
        server.shutdown();
        let row = json!({
            "max_batch": max_batch,
            "clients": args.clients,
            "requests": all.len(),
            "failures": failures,
            "wall_s": wall,
            "requests_per_s": all.len() as f64 / wall,
            "completion_tokens_per_s": tokens as f64 / wall,
            "latency_p50_s": percentile(&lat, 50.0),
            "latency_p99_s": percentile(&lat, 99.0),
            "batches": stats.batches,
            "largest_batch": stats.largest_batch,
            "mean_rows_per_batch": stats.rows as f64 / stats.batches.max(1) as f64,
        });
        eprintln!("{row}");
        results.push(row);
    }
    println!(
        "| max_batch | requests | failures | wall s | req/s | tok/s | p50 s | p99 s | mean batch |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &results {
        println!(
            "| {} | {} | {} | {:.1} | {:.2} | {:.1} | {:.2} | {:.2} | {:.1} |",
            r["max_batch"],
            r["requests"],
            r["failures"],
            r["wall_s"].as_f64().unwrap(),
            r["requests_per_s"].as_f64().unwrap(),
            r["completion_tokens_per_s"].as_f64().unwrap(),
            r["latency_p50_s"].as_f64().unwrap(),
            r["latency_p99_s"].as_f64().unwrap(),
            r["mean_rows_per_batch"].as_f64().unwrap(),
        );
    }
    let out = json!({"model": name, "max_tokens": args.max_tokens, "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1), "results": results});
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&out).unwrap() + "\n")
            .expect("writing --json");
    }
    let failed: usize = results
        .iter()
        .map(|r| r["failures"].as_u64().unwrap_or(0) as usize)
        .sum();
    if failed > 0 {
        eprintln!("bench_serve: {failed} failed requests");
        std::process::exit(1);
    }
}
