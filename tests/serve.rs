//! `qlora::serve` over real HTTP on loopback with the default model: answers equal the
//! library's own generation (chat, completions, streaming, adapters, concurrent batches), and
//! client mistakes get OpenAI-shaped 4xx errors; a full queue, a timeout and a disconnect behave.
#![cfg(feature = "serve")]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use qlora::candle_core::Tensor;
use qlora::generate::GenerationConfig;
use qlora::lora::{get_peft_model, LoraConfig, PeftModel};
use qlora::model::{Message, Model};
use qlora::serve::{backend_with_adapters, Backend, ServeConfig, Server};
use serde_json::{json, Value};

/// One HTTP/1.1 exchange (`Connection: close`): status and body (chunked bodies decoded).
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(600))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\nContent-Type: application/json\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    // The server may answer (e.g. 413) before reading a large body; a failed write is fine.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, rest) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    (status, body)
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&tail[..n]);
        rest = &tail[n + 2..];
    }
    out
}

fn post(addr: SocketAddr, path: &str, body: &Value) -> (u16, Value) {
    let (status, text) = http(addr, "POST", path, &[], body.to_string().as_bytes());
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")),
    )
}

/// The `data:` payloads of a server-sent-event body.
fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(str::to_string)
        .collect()
}

fn model() -> Model {
    Model::load("default").expect("the default model (make fetch-model)")
}

fn chat(content: &str, max_tokens: usize) -> Value {
    json!({"model": "SmolLM2-135M-Instruct.Q4_1", "messages": [{"role": "user", "content": content}],
           "temperature": 0, "max_completion_tokens": max_tokens})
}

#[test]
fn served_answers_equal_the_library_and_stream_the_same_text() {
    let base = model();
    assert_eq!(base.name, "SmolLM2-135M-Instruct.Q4_1");
    let question = "What is the capital of France? Answer in one word.";
    let want = base
        .generate_chat(&[Message::user(question)], &GenerationConfig::greedy(12))
        .unwrap();
    let server =
        Server::start(Backend::Base(base.clone()), ServeConfig::default().port(0)).unwrap();
    let addr = server.addr();

    let (status, models) = {
        let (s, t) = http(addr, "GET", "/v1/models", &[], b"");
        (s, serde_json::from_str::<Value>(&t).unwrap())
    };
    assert_eq!(status, 200);
    assert_eq!(models["data"][0]["id"], "SmolLM2-135M-Instruct.Q4_1");

    let (status, r) = post(addr, "/v1/chat/completions", &chat(question, 12));
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(r["choices"][0]["message"]["role"], "assistant");
    assert_eq!(r["choices"][0]["message"]["content"], want.text.as_str());
    assert_eq!(r["usage"]["prompt_tokens"], want.prompt_tokens);
    assert_eq!(r["usage"]["completion_tokens"], want.token_ids.len());
    assert!(want.text.contains("Paris"), "{}", want.text);

    // max_tokens works as max_completion_tokens does.
    let mut old_style = chat(question, 12);
    old_style
        .as_object_mut()
        .unwrap()
        .remove("max_completion_tokens");
    old_style["max_tokens"] = json!(3);
    let (_, r3) = post(addr, "/v1/chat/completions", &old_style);
    assert_eq!(r3["usage"]["completion_tokens"], 3);
    assert_eq!(r3["choices"][0]["finish_reason"], "length");

    // Streaming: the deltas add up to the same text, then [DONE].
    let mut req = chat(question, 12);
    req["stream"] = json!(true);
    req["stream_options"] = json!({"include_usage": true});
    let (status, body) = http(
        addr,
        "POST",
        "/v1/chat/completions",
        &[],
        req.to_string().as_bytes(),
    );
    assert_eq!(status, 200);
    let data = sse_data(&body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{body}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| {
            c["choices"].get(0)?["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(text, want.text);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks.iter().any(|c| c["choices"]
        .get(0)
        .is_some_and(|ch| ch["finish_reason"] == "stop")));
    assert_eq!(
        chunks.last().unwrap()["usage"]["completion_tokens"],
        want.token_ids.len()
    );

    // Plain completions.
    let prompt = "The capital of France is";
    let want = base.generate(prompt, &GenerationConfig::greedy(6)).unwrap();
    let (status, r) = post(
        addr,
        "/v1/completions",
        &json!({"model": "SmolLM2-135M-Instruct.Q4_1", "prompt": prompt, "max_tokens": 6, "temperature": 0}),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["object"], "text_completion");
    assert_eq!(r["choices"][0]["text"], want.text.as_str());
    server.shutdown();
}

#[test]
fn concurrent_requests_are_batched_and_each_equals_its_own_generation() {
    let base = model();
    let questions = [
        "Name a colour.",
        "What is 2 + 2?",
        "Say hello in French.",
        "Name a fruit that is yellow.",
        "What is the largest planet?",
        "Write one word about the sea.",
    ];
    let wants: Vec<String> = questions
        .iter()
        .map(|q| {
            base.generate_chat(&[Message::user(*q)], &GenerationConfig::greedy(10))
                .unwrap()
                .text
        })
        .collect();
    let server = Server::start(
        Backend::Base(base),
        ServeConfig::default().port(0).max_batch(8),
    )
    .unwrap();
    let addr = server.addr();
    let answers: Vec<(u16, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = questions
            .iter()
            .map(|q| s.spawn(move || post(addr, "/v1/chat/completions", &chat(q, 10))))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for ((status, r), want) in answers.iter().zip(&wants) {
        assert_eq!(*status, 200, "{r}");
        assert_eq!(r["choices"][0]["message"]["content"], want.as_str());
    }
    let stats = server.stats();
    assert_eq!(stats.jobs, questions.len());
    assert!(
        stats.largest_batch > 1,
        "six simultaneous requests never shared a batch: {stats:?}"
    );
    server.shutdown();
}

#[test]
fn adapters_are_served_under_their_names_and_the_base_under_its_own() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tuned");
    {
        let peft = get_peft_model(model(), &LoraConfig::qlora()).unwrap();
        for (i, (name, var)) in peft.trainable_parameters().into_iter().enumerate() {
            if name.contains("lora_B") {
                let vals = pseudo_random(var.elem_count(), i as u64, 0.5);
                var.set(&Tensor::from_vec(vals, var.shape(), var.device()).unwrap())
                    .unwrap();
            }
        }
        peft.save_pretrained(&dir).unwrap();
    }
    let messages = [Message::user("Tell me about cats.")];
    let config = GenerationConfig::greedy(10);
    let want_base = model().generate_chat(&messages, &config).unwrap().text;
    let want_tuned = PeftModel::from_pretrained(model(), &dir)
        .unwrap()
        .model()
        .generate_chat(&messages, &config)
        .unwrap()
        .text;
    assert_ne!(
        want_base, want_tuned,
        "the adapter must change the answer for this test to mean anything"
    );

    let backend = backend_with_adapters(model(), &[("tuned".to_string(), dir.clone())]).unwrap();
    let server = Server::start(backend, ServeConfig::default().port(0)).unwrap();
    let addr = server.addr();
    let (_, models) = http(addr, "GET", "/v1/models", &[], b"");
    let ids: Vec<String> = serde_json::from_str::<Value>(&models).unwrap()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["SmolLM2-135M-Instruct.Q4_1", "tuned"]);
    // Alternate so the worker switches adapters between requests.
    for _ in 0..2 {
        let mut req = chat("Tell me about cats.", 10);
        req["model"] = json!("tuned");
        let (_, r) = post(addr, "/v1/chat/completions", &req);
        assert_eq!(r["choices"][0]["message"]["content"], want_tuned.as_str());
        let (_, r) = post(
            addr,
            "/v1/chat/completions",
            &chat("Tell me about cats.", 10),
        );
        assert_eq!(r["choices"][0]["message"]["content"], want_base.as_str());
    }
    server.shutdown();
}

#[test]
fn client_mistakes_get_openai_shaped_4xx_errors() {
    let server = Server::start(
        Backend::Base(model()),
        ServeConfig::default()
            .port(0)
            .api_key("sekrit")
            .max_body_bytes(4096),
    )
    .unwrap();
    let addr = server.addr();
    let auth = [("Authorization", "Bearer sekrit")];
    let ask = |body: &[u8], headers: &[(&str, &str)]| -> (u16, Value) {
        let (s, t) = http(addr, "POST", "/v1/chat/completions", headers, body);
        (
            s,
            serde_json::from_str(&t).unwrap_or_else(|e| panic!("not JSON ({e}): {t}")),
        )
    };
    let good = chat("hi", 2).to_string();
    type Case<'a> = (
        &'a str,
        Vec<u8>,
        &'a [(&'a str, &'a str)],
        u16,
        Option<&'a str>,
    );
    let cases: Vec<Case> = vec![
        ("no key", good.clone().into_bytes(), &[], 401, None),
        (
            "wrong key",
            good.clone().into_bytes(),
            &[("Authorization", "Bearer nope")],
            401,
            None,
        ),
        (
            "malformed JSON",
            b"{\"model\": ".to_vec(),
            &auth,
            400,
            Some("body"),
        ),
        (
            "missing messages",
            br#"{"model":"SmolLM2-135M-Instruct.Q4_1"}"#.to_vec(),
            &auth,
            400,
            Some("messages"),
        ),
        (
            "negative max_tokens",
            chat("hi", 2)
                .as_object()
                .map(|o| {
                    let mut o = o.clone();
                    o.insert("max_tokens".into(), json!(-1));
                    o.remove("max_completion_tokens");
                    Value::Object(o).to_string().into_bytes()
                })
                .unwrap(),
            &auth,
            400,
            Some("max_tokens"),
        ),
        (
            "unknown model",
            json!({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]})
                .to_string()
                .into_bytes(),
            &auth,
            404,
            Some("model"),
        ),
        ("huge body", vec![b' '; 100_000], &auth, 413, None),
    ];
    for (what, body, headers, status, param) in cases {
        let (s, v) = ask(&body, headers);
        assert_eq!(s, status, "{what}: {v}");
        let err = &v["error"];
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {v}"
        );
        assert!(err["type"].is_string(), "{what}: {v}");
        if let Some(p) = param {
            assert_eq!(err["param"], p, "{what}: {v}");
        }
    }
    let (s, t) = http(addr, "GET", "/nowhere", &auth, b"");
    assert_eq!(s, 404);
    assert!(t.contains("\"error\""), "{t}");
    // The right key works.
    let (s, v) = ask(good.as_bytes(), &auth);
    assert_eq!(s, 200, "{v}");
    server.shutdown();
}

#[test]
fn full_queue_timeout_and_disconnect_behave() {
    let server = Server::start(
        Backend::Base(model()),
        ServeConfig::default()
            .port(0)
            .max_batch(1)
            .max_queue(1)
            .request_timeout(Duration::from_secs(2)),
    )
    .unwrap();
    let addr = server.addr();
    // A long request times out (504) and its generation is cancelled.
    let (s, v) = post(
        addr,
        "/v1/chat/completions",
        &chat("Write a very long story about a dragon.", 400),
    );
    assert_eq!(s, 504, "{v}");
    assert_eq!(v["error"]["code"], "timeout");
    wait_for(
        || server.stats().cancelled_rows >= 1,
        "the timed-out row to be cancelled",
    );

    // Several at once with room for one waiting request: some are turned away with 503.
    let results: Vec<u16> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(move || post(addr, "/v1/chat/completions", &chat("Count to twenty.", 30)).0)
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(results.contains(&503), "{results:?}");
    assert!(
        results.iter().all(|s| [200, 503, 504].contains(s)),
        "{results:?}"
    );

    // A streaming client that hangs up mid-answer has its generation cancelled.
    wait_for(|| server.stats().waiting == 0, "the queue to drain");
    let before = server.stats().cancelled_rows;
    {
        let mut stream = TcpStream::connect(addr).unwrap();
        let mut req = chat("Write a very long story about a dragon.", 400);
        req["stream"] = json!(true);
        let body = req.to_string();
        write!(
            stream,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nContent-Type: application/json\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut first = [0u8; 256];
        let n = stream.read(&mut first).unwrap();
        let head = String::from_utf8_lossy(&first[..n]).to_string();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    }
    wait_for(
        || server.stats().cancelled_rows > before,
        "the abandoned stream to be cancelled",
    );
    server.shutdown();
}

/// Deterministic values in [-scale, scale).
fn pseudo_random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn wait_for(cond: impl Fn() -> bool, what: &str) {
    for _ in 0..600 {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("waited 60 s for {what}");
}
