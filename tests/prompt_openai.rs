//! `OpenAiLm` against the crate's own OpenAI-compatible server (`qlora::serve`) on the default
//! model: the same greedy text as the in-process `LocalLm`, `Predict` over HTTP, and clear
//! errors for a wrong key, an unknown model and a port nobody listens on.
#![cfg(feature = "openai")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use qlora::model::{Message, Model};
use qlora::prompt::{Context, Example, Lm, LmRequest, LocalLm, Module, OpenAiLm, Predict};
use qlora::serve::{Backend, ServeConfig, Server};

fn load() -> Model {
    Model::load(common::default_gguf().to_str().unwrap()).unwrap()
}

#[test]
fn openai_lm_against_qlora_serve() {
    let server = Server::start(
        Backend::Base(load()),
        ServeConfig::default()
            .port(0)
            .api_key("sesame")
            .model_name("smol"),
    )
    .unwrap();
    let base = server.base_url();
    let local = Arc::new(LocalLm::new(load()));
    let http = Arc::new(
        OpenAiLm::new(&base, "smol")
            .api_key("sesame")
            .timeout(Duration::from_secs(120)),
    );

    // Greedy text and token counts equal the in-process model's.
    let mut req = LmRequest::new(vec![Message::user("What is the capital of France?")]);
    req.temperature = Some(0.0);
    req.max_tokens = Some(12);
    let a = http.complete(&req).unwrap();
    let b = local.complete(&req).unwrap();
    assert_eq!(a.choices, b.choices);
    assert_eq!(a.usage, b.usage);
    assert_eq!(a.model, "smol");
    assert_eq!(http.history(1).calls[0].response, a);

    // Predict over HTTP: the same DSPy messages, the same completion, the same prediction.
    let qa = Predict::new("question -> answer").unwrap();
    let x = Example::new().with("question", "What is 2+2?");
    let config = qlora::prompt::LmConfig {
        temperature: Some(0.0),
        max_tokens: Some(20),
        ..Default::default()
    };
    let over_http = qa.forward(
        &Context::from_arc(http.clone()).with_lm_config(config.clone()),
        &x,
    );
    let in_process = qa.forward(&Context::from_arc(local.clone()).with_lm_config(config), &x);
    match (over_http, in_process) {
        (Ok(p), Ok(q)) => assert_eq!(p, q),
        // The small model may break the format; then both must fail the same way.
        (Err(e), Err(f)) => assert_eq!(e.to_string(), f.to_string()),
        (p, q) => panic!("HTTP and local disagree: {p:?} vs {q:?}"),
    }

    // Concurrent requests (the server batches them) still give each one's greedy text.
    let batch: Vec<LmRequest> = ["Name a colour.", "What is 2+2?", "Say hello in French."]
        .iter()
        .map(|q| LmRequest {
            temperature: Some(0.0),
            max_tokens: Some(8),
            ..LmRequest::new(vec![Message::user(*q)])
        })
        .collect();
    let over_http = http.complete_batch(&batch).unwrap();
    for (r, got) in batch.iter().zip(&over_http) {
        assert_eq!(
            got.choices,
            local.complete(r).unwrap().choices,
            "{:?}",
            r.messages
        );
    }

    // Stop strings cut the text as the in-process model cuts it.
    let stopped = LmRequest {
        stop: vec![" ".into()],
        ..req.clone()
    };
    assert_eq!(
        http.complete(&stopped).unwrap().choices,
        local.complete(&stopped).unwrap().choices
    );

    // n sampled completions.
    let sampled = LmRequest {
        n: 2,
        temperature: Some(0.8),
        seed: Some(5),
        max_tokens: Some(8),
        ..req.clone()
    };
    let two = http.complete(&sampled).unwrap();
    assert_eq!(two.choices.len(), 2);
    assert!(two.usage.completion_tokens <= 16 && two.usage.completion_tokens > 0);

    // A wrong key: 401, named with the URL and the server's message.
    let wrong = OpenAiLm::new(&base, "smol").api_key("nope");
    let e = wrong.complete(&req).unwrap_err().to_string();
    assert!(
        e.contains(&format!("{base}/chat/completions")) && e.contains("HTTP 401"),
        "{e}"
    );
    // No key at all (an unset variable).
    let none = OpenAiLm::new(&base, "smol").api_key_env("QLORA_TEST_NO_SUCH_KEY_VAR");
    let e = none.complete(&req).unwrap_err().to_string();
    assert!(
        e.contains("HTTP 401") && e.contains("QLORA_TEST_NO_SUCH_KEY_VAR: not set"),
        "{e}"
    );

    // An unknown model: 404 with the server's message naming it.
    let unknown = OpenAiLm::new(&base, "gpt-17").api_key("sesame");
    let e = unknown.complete(&req).unwrap_err().to_string();
    assert!(
        e.contains("HTTP 404") && e.contains("gpt-17") && e.contains("/chat/completions"),
        "{e}"
    );
    server.shutdown();

    // Nobody listening: a connection error naming the URL, after the retries.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}/v1");
    let gone = OpenAiLm::new(&url, "smol").num_retries(1);
    let e = gone.complete(&req).unwrap_err().to_string();
    assert!(
        e.contains(&format!("{url}/chat/completions"))
            && e.contains("cannot connect")
            && e.contains("after 2 attempts"),
        "{e}"
    );
}
