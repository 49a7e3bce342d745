//! Bidirectional emulation (`/connection/http_stream`, `/connection/sse`,
//! `POST /emulation`) read and written as centrifuge-js does it, by a plain
//! HTTP client. The SDKs themselves run in tests/sdk (Node) and
//! tests/browser (Chromium).

mod common;

use common::api::{Redis, redis_node_toml};
use common::stream::{Stream, cf_connect_uri};
use common::{SECRET, Server, user_token};
use serde_json::{Value, json};

fn node() -> Server {
    Server::start(&format!(
        r#"
[auth]
hmac_secret = "{SECRET}"

[client]
ping_interval = "1s"
pong_timeout = "500ms"

[[namespaces]]
name = ""
allow_publish = true
presence = true
history_size = 10
history_ttl = "300s"
"#
    ))
}

/// `/connection/sse?cf_connect=` for these commands.
fn sse_uri(commands: &Value) -> String {
    cf_connect_uri("/connection/sse", commands)
}

fn connect_command(user: &str) -> Value {
    json!({"id": 1, "connect": {"token": user_token(user)}})
}

/// Posts commands to `/emulation` as centrifuge-js does (`data` is the
/// commands as one newline-joined string); the status and body.
async fn emulate(port: u16, session: &str, node: &str, commands: &[Value]) -> (u16, String) {
    let data: Vec<String> = commands.iter().map(Value::to_string).collect();
    let body = json!({"session": session, "node": node, "data": data.join("\n")}).to_string();
    let r =
        Stream::open(port, "POST", "/emulation", &[("content-type", "application/json")], &body)
            .await;
    let status = r.status;
    (status, r.text().await)
}

/// The next reply on an emulated stream that is not a ping (`{}`).
async fn next_reply(s: &mut Stream, sse: bool) -> Value {
    loop {
        let v = if sse {
            s.event().await.1
        } else {
            serde_json::from_str(&s.next(b"\n").await.expect("a reply within 5 s")).unwrap()
        };
        if v != json!({}) {
            return v;
        }
    }
}

/// The connect reply's session key and node id.
fn session_of(reply: &Value) -> (String, String) {
    let c = &reply["connect"];
    assert_eq!(reply["id"], 1, "{reply}");
    assert_eq!(c["pong"], Value::Null, "no pong is expected over an emulated transport: {reply}");
    let session = c["session"].as_str().expect("session in the connect reply").to_string();
    let node = c["node"].as_str().expect("node in the connect reply").to_string();
    assert!(session.len() >= 32 && session != c["client"], "{reply}");
    (session, node)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_stream_streams_replies_and_emulation_requests_carry_the_commands() {
    let server = node();
    let body = connect_command("alice").to_string();
    let mut s = Stream::open(
        server.port,
        "POST",
        "/connection/http_stream",
        &[("content-type", "application/json")],
        &body,
    )
    .await;
    assert_eq!((s.status, s.content_type.as_str()), (200, "application/json"));
    let (session, node) = session_of(&next_reply(&mut s, false).await);

    let cmds = [
        json!({"id": 2, "subscribe": {"channel": "room", "recoverable": true}}),
        json!({"id": 3, "publish": {"channel": "room", "data": {"n": 1}}}),
    ];
    assert_eq!(emulate(server.port, &session, &node, &cmds).await.0, 200);
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(next_reply(&mut s, false).await);
    }
    assert!(seen.iter().any(|r| r["id"] == 2 && r["subscribe"]["recoverable"] == true), "{seen:?}");
    assert!(seen.iter().any(|r| r["id"] == 3 && r.get("error").is_none()), "{seen:?}");
    assert!(
        seen.iter()
            .any(|r| r["push"]["channel"] == "room" && r["push"]["pub"]["data"] == json!({"n": 1})),
        "{seen:?}"
    );

    let cmds = [
        json!({"id": 4, "presence": {"channel": "room"}}),
        json!({"id": 5, "history": {"channel": "room", "limit": 10}}),
    ];
    assert_eq!(emulate(server.port, &session, &node, &cmds).await.0, 200);
    let (a, b) = (next_reply(&mut s, false).await, next_reply(&mut s, false).await);
    let (presence, history) = if a["id"] == 4 { (a, b) } else { (b, a) };
    let clients: Vec<&Value> =
        presence["presence"]["presence"].as_object().unwrap().values().collect();
    assert_eq!(clients.len(), 1, "{presence}");
    assert_eq!(clients[0]["user"], "alice");
    assert_eq!(history["history"]["publications"][0]["data"], json!({"n": 1}), "{history}");
    assert_eq!(
        common::api::metric_with(
            server.port,
            "fanfare_transport_connects_total",
            &[("transport", "http_stream")]
        ),
        1.0
    );
    let open = |t: &str| {
        common::api::metric_with(server.port, "fanfare_transport_connections", &[("transport", t)])
    };
    assert_eq!((open("http_stream"), open("websocket")), (1.0, 0.0));
    drop(s);
    common::api::eventually("the stream's connection to be gone", common::TIMEOUT, || async {
        open("http_stream") == 0.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_connects_with_cf_connect_and_refuses_what_it_cannot_use() {
    let server = node();
    let mut s = Stream::open(server.port, "GET", &sse_uri(&connect_command("bob")), &[], "").await;
    assert_eq!((s.status, s.content_type.as_str()), (200, "text/event-stream"));
    let (session, node) = session_of(&next_reply(&mut s, true).await);
    let cmd = [json!({"id": 2, "rpc": {"method": "nothing"}})];
    assert_eq!(emulate(server.port, &session, &node, &cmd).await.0, 200);
    let r = next_reply(&mut s, true).await;
    assert_eq!((r["id"].clone(), r["error"]["code"].clone()), (json!(2), json!(108)), "{r}");

    // Refusals, each with its own status; the stream above is unaffected.
    let r = Stream::open(server.port, "GET", "/connection/sse", &[], "").await;
    assert_eq!(r.status, 400);
    assert!(r.text().await.contains("cf_connect"));
    let (status, body) = emulate(server.port, "no-such-session", &node, &cmd).await;
    assert_eq!(status, 404, "{body}");
    let r = Stream::open(server.port, "POST", "/emulation", &[], "{not json").await;
    assert_eq!(r.status, 400);
    let r = Stream::open(server.port, "POST", "/emulation", &[], r#"{"session":"x"}"#).await;
    assert_eq!(r.status, 400);
    let big = json!({"session": session, "node": node, "data": "x".repeat(70_000)}).to_string();
    let r = Stream::open(server.port, "POST", "/emulation", &[], &big).await;
    assert_eq!(r.status, 413, "commands past websocket.max_message_size (64 KiB)");
    let big = "x".repeat(200_000);
    let r = Stream::open(server.port, "POST", "/connection/http_stream", &[], &big).await;
    assert_eq!(r.status, 413);
    let r = Stream::open(server.port, "GET", "/connection/http_stream", &[], "").await;
    assert_eq!(r.status, 405);

    let cmd = [json!({"id": 3, "publish": {"channel": "x", "data": 1}})];
    assert_eq!(emulate(server.port, &session, &node, &cmd).await.0, 200);
    assert_eq!(next_reply(&mut s, true).await["id"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_connect_over_http_stream_ends_the_stream_with_a_disconnect_push() {
    let server = node();
    let body = json!({"id": 1, "connect": {"token": "not-a-token"}}).to_string();
    let s = Stream::open(server.port, "POST", "/connection/http_stream", &[], &body).await;
    assert_eq!(s.status, 200);
    let text = s.text().await;
    let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last["push"]["disconnect"]["code"], 3500, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emulation_requests_reach_a_session_held_by_another_node() {
    let redis = Redis::start();
    let a = Server::start(&redis_node_toml(&redis, "a"));
    let b = Server::start(&redis_node_toml(&redis, "b"));
    let mut s = Stream::open(a.port, "GET", &sse_uri(&connect_command("carol")), &[], "").await;
    let (session, node) = session_of(&next_reply(&mut s, true).await);

    // Posted to node B: forwarded to A through Redis, applied there.
    let cmds = [
        json!({"id": 2, "subscribe": {"channel": "hall"}}),
        json!({"id": 3, "publish": {"channel": "hall", "data": {"via": "b"}}}),
    ];
    let (status, body) = emulate(b.port, &session, &node, &cmds).await;
    assert_eq!(status, 200, "{body}");
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(next_reply(&mut s, true).await);
    }
    assert!(seen.iter().any(|r| r["id"] == 2 && r.get("subscribe").is_some()), "{seen:?}");
    assert!(seen.iter().any(|r| r["push"]["pub"]["data"] == json!({"via": "b"})), "{seen:?}");

    // A session that does not exist, asked of either node: 404.
    let cmd = [json!({"id": 4, "presence": {"channel": "hall"}})];
    assert_eq!(emulate(b.port, "0123456789abcdef0123456789abcdef", &node, &cmd).await.0, 404);
    assert_eq!(emulate(a.port, "0123456789abcdef0123456789abcdef", &node, &cmd).await.0, 404);

    // The session's node does not answer (stopped): after the 2 s delivery
    // wait, 404, as for a node that is gone (the SDK then reconnects).
    a.signal("STOP");
    let started = std::time::Instant::now();
    let frozen = emulate(b.port, &session, &node, &cmd).await;
    let waited = started.elapsed();
    a.signal("CONT");
    assert_eq!(frozen.0, 404, "{}", frozen.1);
    // Not before the delivery wait; bounded well under the client's own timeouts.
    assert!(waited >= std::time::Duration::from_millis(1900), "answered after {waited:?}");
    assert!(waited < std::time::Duration::from_secs(6), "answered after {waited:?}");
    // Node A resumes: the session is still there and takes commands again.
    let ok = [json!({"id": 5, "presence": {"channel": "hall"}})];
    assert_eq!(emulate(b.port, &session, &node, &ok).await.0, 200);
    // (The stopped node may still apply id 4 once it reads its control
    // channel: the SDK takes a 404 as "reconnect", not as "not applied".)
    while next_reply(&mut s, true).await["id"] != 5 {}
    // Once the client is gone, its session is too.
    drop(s);
    let mut gone = false;
    for _ in 0..50 {
        if emulate(b.port, &session, &node, &cmd).await.0 == 404 {
            gone = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(gone, "the session of a closed stream must be gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_ends_emulated_streams_with_a_3001_disconnect_push() {
    let mut server = node();
    let body = connect_command("dave").to_string();
    let mut h = Stream::open(server.port, "POST", "/connection/http_stream", &[], &body).await;
    let mut e = Stream::open(server.port, "GET", &sse_uri(&connect_command("erin")), &[], "").await;
    session_of(&next_reply(&mut h, false).await);
    session_of(&next_reply(&mut e, true).await);
    server.send_sigterm();
    assert_eq!(next_reply(&mut h, false).await["push"]["disconnect"]["code"], 3001);
    assert_eq!(next_reply(&mut e, true).await["push"]["disconnect"]["code"], 3001);
    assert!(server.wait_exit(std::time::Duration::from_secs(10)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_on_other_origins_get_cors_answers_and_switched_off_transports_are_404() {
    let server = Server::start(
        r#"
[websocket]
allowed_origins = ["http://app.example"]
"#,
    );
    let preflight = [
        ("origin", "http://app.example"),
        ("access-control-request-method", "POST"),
        ("access-control-request-headers", "content-type"),
    ];
    for path in ["/emulation", "/connection/http_stream"] {
        let r = Stream::open(server.port, "OPTIONS", path, &preflight, "").await;
        assert_eq!(r.status, 204, "{path}");
        let h = |k: &str| r.headers.get(k).map(|v| v.to_str().unwrap().to_string());
        assert_eq!(h("access-control-allow-origin").as_deref(), Some("http://app.example"));
        assert_eq!(h("access-control-allow-headers").as_deref(), Some("content-type"));
        assert!(h("access-control-allow-methods").unwrap().contains("POST"));
    }
    let evil = [("origin", "http://evil.example")];
    let r = Stream::open(server.port, "POST", "/emulation", &evil, "{}").await;
    assert_eq!(r.status, 403);
    assert!(r.headers.get("access-control-allow-origin").is_none());

    let off = Server::start_with_env(
        "",
        &[("FANFARE__TRANSPORTS__SSE", "false"), ("FANFARE__TRANSPORTS__HTTP_STREAM", "false")],
    );
    for (method, path) in
        [("GET", "/connection/sse"), ("POST", "/connection/http_stream"), ("POST", "/emulation")]
    {
        assert_eq!(Stream::open(off.port, method, path, &[], "").await.status, 404, "{path}");
    }
}

/// Reads from a raw socket until `needle` was seen (bounded), returns all.
async fn read_until(s: &mut tokio::net::TcpStream, needle: &str) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + common::TIMEOUT;
    while !String::from_utf8_lossy(&got).contains(needle) {
        let mut buf = [0u8; 4096];
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => panic!("{needle:?} not received; got {:?}", String::from_utf8_lossy(&got)),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_works_as_first_request_on_the_bare_socket_and_after_another_request_via_hyper() {
    use tokio::io::AsyncWriteExt;
    let server = node();
    let uri = sse_uri(&connect_command("frank"));
    // First request of its connection: served on the bare socket, chunked.
    let mut a = tokio::net::TcpStream::connect(("127.0.0.1", server.port)).await.unwrap();
    a.write_all(format!("GET {uri} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes()).await.unwrap();
    let got = read_until(&mut a, "\"session\"").await;
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
    assert!(got.contains("transfer-encoding: chunked"), "{got}");
    assert!(got.contains("content-type: text/event-stream"), "{got}");
    assert!(!got.contains("date:"), "hyper writes a date header, the bare path does not: {got}");
    // After a /health on the same kept-alive connection: hyper serves it.
    let mut b = tokio::net::TcpStream::connect(("127.0.0.1", server.port)).await.unwrap();
    b.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    read_until(&mut b, "ok\n").await;
    b.write_all(format!("GET {uri} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes()).await.unwrap();
    let got = read_until(&mut b, "\"session\"").await;
    assert!(got.contains("text/event-stream") && got.contains("date:"), "{got}");
    // A chunked request body is refused on the bare path with 411.
    let mut c = tokio::net::TcpStream::connect(("127.0.0.1", server.port)).await.unwrap();
    c.write_all(
        b"POST /connection/http_stream HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    assert!(read_until(&mut c, "\r\n").await.starts_with("HTTP/1.1 411"));
    // A client that asks before sending its body (curl, over 1 KiB) is told
    // to go on at once.
    let mut d = tokio::net::TcpStream::connect(("127.0.0.1", server.port)).await.unwrap();
    let body = connect_command("gina").to_string();
    let head = format!(
        "POST /connection/http_stream HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    d.write_all(head.as_bytes()).await.unwrap();
    assert!(read_until(&mut d, "\r\n\r\n").await.starts_with("HTTP/1.1 100 Continue"));
    d.write_all(body.as_bytes()).await.unwrap();
    read_until(&mut d, "\"session\"").await;
    // Both streams are alive: pings arrive on each.
    read_until(&mut a, "data: {}").await;
    read_until(&mut b, "data: {}").await;
}
