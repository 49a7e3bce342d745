//! TLS on the node's listeners (`http.tls_*`, `grpc.tls_*`): real rustls
//! clients trusting a CA made at test time, WebSocket and gRPC through TLS,
//! and certificate reload on SIGHUP with live connections.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::api::{API_KEY, API_KEY_TOML};
use common::tls::{Issued, TestCa, grpc_call, presented_certificate};
use common::{Bystander, Client, SECRET, Server, assert_survived};
use fanfare_server::pb;
use prost::Message;
use serde_json::json;

/// A node with TLS on both ports, its certificate files copies of `issued`
/// in `dir` (returned), so that a test can replace them.
fn start_tls_node(ca: &TestCa, issued: &Issued, dir: &std::path::Path) -> (Server, Issued) {
    let live = Issued { cert: dir.join("live.pem"), key: dir.join("live.key") };
    std::fs::copy(&issued.cert, &live.cert).unwrap();
    std::fs::copy(&issued.key, &live.key).unwrap();
    let tls = live.listener_toml();
    let extra = format!("[auth]\nhmac_secret = \"{SECRET}\"\n\n{API_KEY_TOML}");
    (Server::start_tls(&tls, &tls, &extra, ca.client_config(&[])), live)
}

/// HTTP/1.1 over TLS: a raw request, the whole answer back.
async fn https_request(server: &Server, request: &str) -> String {
    let config = server.tls.clone().expect("a TLS node");
    let tls = common::tls::connect(config, server.port).await.expect("TLS handshake");
    let mut tls = tls;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn info_request() -> Vec<u8> {
    pb::InfoRequest {}.encode_to_vec()
}

#[tokio::test]
async fn websocket_http_api_and_grpc_speak_tls_and_cleartext_is_refused() {
    let ca = TestCa::new();
    let a = ca.issue("fanfare-a");
    let dir = tempfile::tempdir().unwrap();
    let (server, _live) = start_tls_node(&ca, &a, dir.path());
    let mut bystander = Bystander::join(&server).await;

    // WebSocket over TLS: connect with a token, subscribe, publish, receive.
    common::assert_healthy(&server).await;

    // A cleartext WebSocket handshake on the TLS port gets no HTTP answer.
    let refused = Client::try_open(server.port, None, None).await;
    assert!(refused.is_err(), "a cleartext handshake on a TLS port must fail");
    let plain = std::net::TcpStream::connect(("127.0.0.1", server.port)).and_then(|mut s| {
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")?;
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        Ok(buf)
    });
    let answer = plain.unwrap_or_default();
    assert!(!answer.starts_with(b"HTTP/"), "cleartext answered: {answer:?}");

    // The HTTP API over TLS echoes the caller's request id.
    let body = "{}";
    let r = https_request(
        &server,
        &format!(
            "POST /api/info HTTP/1.1\r\nHost: localhost\r\nAuthorization: apikey {API_KEY}\r\n\
             X-Request-Id: req-tls.1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.to_ascii_lowercase().contains("x-request-id: req-tls.1\r\n"), "{r}");

    // gRPC over TLS (ALPN h2): Info answers, the request id comes back, a
    // generated one when the caller sent none.
    let grpc = ca.client_config(&[b"h2"]);
    let auth = format!("apikey {API_KEY}");
    let (headers, trailers, data) = grpc_call(
        grpc.clone(),
        server.grpc_port,
        "/fanfare.v1.ControlService/Info",
        &info_request(),
        &[("authorization", &auth), ("x-request-id", "grpc-req-7")],
    )
    .await;
    assert_eq!(trailers.get("grpc-status").map(|v| v.as_bytes()), Some(&b"0"[..]));
    assert_eq!(headers.get("x-request-id").map(|v| v.as_bytes()), Some(&b"grpc-req-7"[..]));
    let info = pb::InfoResponse::decode(&data[5..]).expect("an InfoResponse");
    assert_eq!(info.nodes.len(), 1, "{info:?}");
    let (headers, trailers, _) = grpc_call(
        grpc.clone(),
        server.grpc_port,
        "/fanfare.v1.ControlService/Info",
        &info_request(),
        &[("authorization", "apikey wrong")],
    )
    .await;
    // UNAUTHENTICATED (16), and still an id to quote in a support ticket.
    assert_eq!(headers.get("grpc-status").map(|v| v.as_bytes()), Some(&b"16"[..]));
    assert_eq!(trailers.get("grpc-status").map(|v| v.as_bytes()), Some(&b"16"[..]));
    assert!(headers.get("x-request-id").is_some_and(|v| !v.is_empty()), "{headers:?}");

    assert_survived(&server, &mut bystander).await;
}

#[tokio::test]
async fn sighup_serves_the_new_certificate_to_new_handshakes_and_open_connections_keep_receiving() {
    let ca = TestCa::new();
    let (a, b, c) = (ca.issue("fanfare-a"), ca.issue("fanfare-b"), ca.issue("fanfare-c"));
    let dir = tempfile::tempdir().unwrap();
    let (server, live) = start_tls_node(&ca, &a, dir.path());
    let ws_config = server.tls.clone().unwrap();
    let grpc = ca.client_config(&[b"h2"]);
    assert_eq!(presented_certificate(ws_config.clone(), server.port).await, a.der());
    assert_eq!(presented_certificate(grpc.clone(), server.grpc_port).await, a.der());

    // A live TLS connection, subscribed, made with certificate A.
    let mut old = server.connected("old").await;
    old.subscribe_ok("health:reload", json!({})).await;

    std::fs::copy(&b.cert, &live.cert).unwrap();
    std::fs::copy(&b.key, &live.key).unwrap();
    server.send_sighup();
    wait_for_log(&server, "TLS certificate reloaded", 2).await;

    assert_eq!(presented_certificate(ws_config.clone(), server.port).await, b.der());
    assert_eq!(presented_certificate(grpc.clone(), server.grpc_port).await, b.der());
    let mut publisher = server.connected("publisher").await;
    let r = publisher.publish("health:reload", json!({"after": "reload"})).await;
    assert!(r.get("publish").is_some(), "{r}");
    let push = old.recv_push().await;
    assert_eq!(push["push"]["pub"]["data"], json!({"after": "reload"}), "{push}");

    // A key that does not belong to the certificate: the reload is refused,
    // naming the key, and B stays in use; the old connection is untouched.
    std::fs::copy(&c.key, &live.key).unwrap();
    server.send_sighup();
    wait_for_log(&server, "previous certificate stays in use", 2).await;
    let log = server.log();
    assert!(log.contains("http.tls_key") && log.contains("grpc.tls_key"), "{log}");
    assert_eq!(presented_certificate(ws_config.clone(), server.port).await, b.der());
    assert_eq!(presented_certificate(grpc, server.grpc_port).await, b.der());
    let r = publisher.publish("health:reload", json!({"after": "bad reload"})).await;
    assert!(r.get("publish").is_some(), "{r}");
    let push = old.recv_push().await;
    assert_eq!(push["push"]["pub"]["data"], json!({"after": "bad reload"}), "{push}");
    common::assert_healthy(&server).await;
}

#[tokio::test]
async fn a_node_refuses_to_start_with_a_missing_certificate_naming_the_key() {
    let port = common::free_port();
    let config = format!(
        "[http]\nlisten = \"127.0.0.1:{port}\"\ntls_cert = \"/nonexistent/cert.pem\"\ntls_key = \"/nonexistent/key.pem\"\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fanfare.toml");
    std::fs::write(&path, config).unwrap();
    let (status, _out, err) = common::run_cli(&["--config", path.to_str().unwrap()], &[]);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("http.tls_cert") && err.contains("/nonexistent/cert.pem"), "{err}");
}

/// Waits (bounded) until `needle` occurs `times` times in the node's log.
async fn wait_for_log(server: &Server, needle: &str, times: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.log().matches(needle).count() < times {
        assert!(Instant::now() < deadline, "no {needle:?} x{times} in the log:\n{}", server.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
