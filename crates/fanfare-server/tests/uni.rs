//! Unidirectional transports (`/connection/uni_sse`, `/connection/uni_http_stream`)
//! read as a plain HTTP client would, without an SDK.

mod common;

use std::time::Duration;

use common::stream::{Stream, cf_connect_uri};
use common::{SECRET, Server, sign, unix_now};
use serde_json::{Value, json};

fn node() -> Server {
    Server::start_with_env(
        &format!(
            r#"
[auth]
hmac_secret = "{SECRET}"
allow_anonymous = true

[client]
ping_interval = "1s"
pong_timeout = "500ms"

[transports]
uni_sse = true
uni_http_stream = true
uni_websocket = true

[[namespaces]]
name = ""
allow_publish = true
history_size = 100
history_ttl = "300s"

[[namespaces]]
name = "secret"
private = true
"#
        ),
        &[],
    )
}

fn sse_uri(connect: &Value) -> String {
    cf_connect_uri("/connection/uni_sse", connect)
}

async fn publish(server: &Server, channel: &str, data: Value) {
    let body = json!({"channel": channel, "data": data}).to_string();
    let r = Stream::open(server.port, "POST", "/api/publish", &[], &body).await;
    let status = r.status;
    assert_eq!(status, 200, "{}", r.text().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uni_sse_delivers_and_an_event_source_resumes_with_last_event_id_exactly_once() {
    let server = node();
    let uri = sse_uri(&json!({"subs": {"news": {}}}));
    let mut sse = Stream::open(server.port, "GET", &uri, &[], "").await;
    assert_eq!(sse.status, 200);
    assert_eq!(sse.content_type, "text/event-stream");
    let (_, connect) = sse.message().await;
    assert_eq!(connect["connect"]["subs"]["news"]["recoverable"], true, "{connect}");

    for n in 1..=3 {
        publish(&server, "news", json!({ "n": n })).await;
    }
    let mut last_id = None;
    for n in 1..=3 {
        let (id, msg) = sse.message().await;
        assert_eq!(msg["channel"], "news");
        assert_eq!(msg["pub"]["data"]["n"], n, "{msg}");
        assert!(id.is_some(), "publication events carry an id");
        last_id = id;
    }
    // Pings keep coming and the connection stays (no pong is expected).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    drop(sse);

    // Missed while away: 4 and 5. The EventSource sends the last id back.
    for n in 4..=5 {
        publish(&server, "news", json!({ "n": n })).await;
    }
    let id = last_id.expect("an id");
    let mut sse =
        Stream::open(server.port, "GET", &uri, &[("last-event-id", id.as_str())], "").await;
    let (_, connect) = sse.message().await;
    assert_eq!(connect["connect"]["subs"]["news"]["recovered"], true, "{connect}");
    for n in 4..=5 {
        let (id, msg) = sse.message().await;
        assert_eq!(msg["pub"]["data"]["n"], n, "recovered in order, once: {msg}");
        assert!(id.is_some());
    }
    publish(&server, "news", json!({ "n": 6 })).await;
    let (_, msg) = sse.message().await;
    assert_eq!(msg["pub"]["data"]["n"], 6, "then live, no duplicate: {msg}");
    assert_eq!(transport_connects(&server, "uni_sse"), 2.0);
}

/// `fanfare_transport_connects_total` of one transport (JSON encoding).
fn transport_connects(server: &Server, transport: &str) -> f64 {
    let (_, body) = common::http_get(server.port, "/metrics").expect("metrics");
    body.lines()
        .filter(|l| l.starts_with("fanfare_transport_connects_total{"))
        .filter(|l| l.contains(&format!("transport=\"{transport}\"")))
        .filter(|l| l.contains("encoding=\"json\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn uni_http_stream_delivers_newline_delimited_pushes_to_a_token_channel() {
    let server = node();
    let token = sign(SECRET, &json!({"sub": "42", "channels": ["feed"], "exp": unix_now() + 60}));
    let body = json!({ "token": token }).to_string();
    let mut s = Stream::open(server.port, "POST", "/connection/uni_http_stream", &[], &body).await;
    assert_eq!(s.status, 200);
    let connect: Value = serde_json::from_str(&s.next(b"\n").await.expect("connect")).unwrap();
    assert!(connect["connect"]["subs"]["feed"].is_object(), "{connect}");
    assert!(connect["connect"]["subs"]["#42"].is_object(), "personal channel: {connect}");
    publish(&server, "feed", json!({"x": 1})).await;
    loop {
        let line = s.next(b"\n").await.expect("a message");
        let msg: Value = serde_json::from_str(&line).unwrap();
        if msg == json!({}) {
            continue;
        }
        assert_eq!(msg, json!({"channel": "feed", "pub": {"data": {"x": 1}, "offset": 1}}));
        break;
    }
}

#[tokio::test]
async fn unidirectional_connects_are_refused_with_specific_statuses() {
    let server = node();
    let port = server.port;
    let bad_json =
        Stream::open(port, "GET", "/connection/uni_sse?cf_connect=%7Bnot", &[], "").await;
    assert_eq!(bad_json.status, 400);
    let private =
        Stream::open(port, "GET", &sse_uri(&json!({"subs": {"secret:x": {}}})), &[], "").await;
    let status = private.status;
    assert_eq!(status, 403, "{}", private.text().await);
    let bad_token = Stream::open(port, "GET", &sse_uri(&json!({"token": "nope"})), &[], "").await;
    assert_eq!(bad_token.status, 401);
    assert!(bad_token.text().await.contains("3500"));
    let post = Stream::open(port, "POST", "/connection/uni_sse", &[], "").await;
    assert_eq!(post.status, 405);
    let big = format!("{{\"data\":\"{}\"}}", "x".repeat(70_000));
    let too_big = Stream::open(port, "POST", "/connection/uni_http_stream", &[], &big).await;
    assert_eq!(too_big.status, 413);
    common::assert_healthy(&server).await;
}

#[tokio::test]
async fn a_draining_node_ends_unidirectional_streams_with_3001() {
    let mut server = node();
    let uri = sse_uri(&json!({"subs": {"news": {}}}));
    let mut sse = Stream::open(server.port, "GET", &uri, &[], "").await;
    sse.message().await;
    server.send_sigterm();
    let (_, msg) = sse.message().await;
    assert_eq!(msg, json!({"disconnect": {"code": 3001, "reason": "shutdown"}}));
    assert!(server.wait_exit(Duration::from_secs(10)).success());
}

#[tokio::test]
async fn unidirectional_transports_are_off_unless_switched_on() {
    let server = Server::start("");
    for (method, path) in [("GET", "/connection/uni_sse"), ("POST", "/connection/uni_http_stream")]
    {
        let r = Stream::open(server.port, method, path, &[], "").await;
        assert_eq!(r.status, 404, "{path}");
    }
}

#[tokio::test]
async fn uni_websocket_takes_the_connect_request_first_then_sends_one_push_per_message() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let server = node();
    let url = format!("ws://127.0.0.1:{}/connection/uni_websocket", server.port);
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.expect("upgrade");
    ws.send(Message::text(json!({"subs": {"news": {}}}).to_string())).await.unwrap();
    let next = |m: Option<Result<Message, _>>| -> Value {
        match m {
            Some(Ok(Message::Text(t))) => serde_json::from_str(t.as_str()).expect("one JSON value"),
            other => panic!("expected a text message, got {other:?}"),
        }
    };
    let connect = next(ws.next().await);
    assert!(connect["connect"]["client"].is_string(), "{connect}");
    assert_eq!(connect["connect"]["subs"]["news"]["recoverable"], true, "{connect}");
    publish(&server, "news", json!({"a": 1})).await;
    publish(&server, "news", json!({"a": 2})).await;
    let mut got = Vec::new();
    while got.len() < 2 {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("a push");
        let v = next(msg);
        if v != json!({}) {
            got.push(v["pub"]["data"]["a"].as_u64().unwrap());
        }
    }
    assert_eq!(got, vec![1, 2], "each push in its own message, in order");
    assert_eq!(transport_connects(&server, "uni_websocket"), 1.0);
    // A connect request that is not JSON closes with 3501.
    let (mut bad, _) = tokio_tungstenite::connect_async(url.as_str()).await.expect("upgrade");
    bad.send(Message::text("hello")).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(5), bad.next()).await.expect("a close") {
        Some(Ok(Message::Close(Some(f)))) => assert_eq!(u16::from(f.code), 3501),
        other => panic!("expected close 3501, got {other:?}"),
    }
}
