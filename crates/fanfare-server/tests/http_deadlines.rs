//! Deadlines on the public HTTP port (`http.header_read_timeout`,
//! `http.body_read_timeout`): sockets that never finish a request are closed,
//! so they cannot pile up until the node runs out of file descriptors, while
//! WebSocket clients (no longer HTTP once upgraded) are untouched.

mod common;

use std::time::{Duration, Instant};

use common::{Server, http_get};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Open file descriptors of a process.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// Sends `prefix`, then waits until the server ends the connection: the time
/// it took and what the server sent before closing.
async fn held_until_closed(
    port: u16,
    prefix: &'static [u8],
    limit: Duration,
) -> (Duration, String) {
    // Before connecting: the server's clock starts at accept, which is later.
    let start = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    if !prefix.is_empty() {
        s.write_all(prefix).await.expect("write");
    }
    let mut got = Vec::new();
    let read = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 1024];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "socket sending {prefix:?} still open after {limit:?}");
    (start.elapsed(), String::from_utf8_lossy(&got).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_requests_are_closed_within_the_deadlines_while_subscribers_keep_receiving() {
    let server = Server::start_with_env(
        r#"
[[namespaces]]
name = ""
allow_publish = true
"#,
        &[("FANFARE__HTTP__HEADER_READ_TIMEOUT", "1s"), ("FANFARE__HTTP__BODY_READ_TIMEOUT", "1s")],
    );
    let port = server.port;
    let fds_before = open_fds(server.pid());

    let mut subscribers = Vec::new();
    for i in 0..100 {
        let mut c = server.connected(&format!("s{i}")).await;
        c.subscribe_ok("ticker", json!({})).await;
        subscribers.push(c);
    }
    let mut publisher = server.connected("pub").await;

    // 2 000 sockets that never finish a request: silent, half a header line,
    // a head whose declared body never fully arrives.
    const SILENT: &[u8] = b"";
    const HALF_HEADER: &[u8] = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: aaa";
    const HALF_BODY: &[u8] =
        b"POST /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{";
    let limit = Duration::from_secs(15);
    let mut held = Vec::new();
    for i in 0..2000 {
        let prefix = [SILENT, HALF_HEADER, HALF_BODY][i % 3];
        held.push(tokio::spawn(held_until_closed(port, prefix, limit)));
    }

    // Meanwhile every subscriber receives every publication, and keeps its
    // WebSocket well past the HTTP deadlines.
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < Duration::from_millis(2500) {
        n += 1;
        publisher.publish("ticker", json!({ "n": n })).await;
        for c in &mut subscribers {
            let push = c.recv_push().await;
            assert_eq!(push["push"]["pub"]["data"]["n"], n, "{push}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut slowest = Duration::ZERO;
    let mut timeouts_408 = 0;
    for (i, h) in held.into_iter().enumerate() {
        let (took, answer) = h.await.expect("held socket task");
        // Each closes after its deadline (1 s), and not much later.
        assert!(took >= Duration::from_millis(900), "socket {i} closed early: {took:?}");
        slowest = slowest.max(took);
        if i % 3 == 2 {
            assert!(answer.starts_with("HTTP/1.1 408"), "half body: {answer:?}");
            assert!(answer.contains("http.body_read_timeout"), "{answer}");
            timeouts_408 += 1;
        }
    }
    eprintln!("2000 unfinished requests closed; the slowest after {slowest:?}");
    assert!(slowest < Duration::from_secs(5), "slowest close after {slowest:?}");
    assert_eq!(timeouts_408, 666);

    // Nothing is left holding descriptors, and the node still serves HTTP.
    let deadline = Instant::now() + Duration::from_secs(5);
    while open_fds(server.pid()) > fds_before + 110 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        open_fds(server.pid()) <= fds_before + 110,
        "descriptors: {} before, {} after",
        fds_before,
        open_fds(server.pid())
    );
    assert_eq!(http_get(port, "/health").expect("health").0, 200);
    n += 1;
    publisher.publish("ticker", json!({ "n": n })).await;
    for c in &mut subscribers {
        assert_eq!(c.recv_push().await["push"]["pub"]["data"]["n"], n);
    }
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_header_timeout() {
    let server = Server::start_with_env("", &[("FANFARE__HTTP__HEADER_READ_TIMEOUT", "1s")]);
    let (took, answer) = held_until_closed(
        server.port,
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "kept-alive connection closed after {took:?}"
    );
}

#[test]
fn deadlines_outside_their_range_are_refused_naming_the_key() {
    for (key, value) in
        [("FANFARE__HTTP__HEADER_READ_TIMEOUT", "0s"), ("FANFARE__HTTP__BODY_READ_TIMEOUT", "2h")]
    {
        let (status, _, err) = common::run_cli(&["check-config"], &[(key, value)]);
        assert!(!status.success());
        let name = key.trim_start_matches("FANFARE__").to_lowercase().replace("__", ".");
        assert!(err.contains(&name), "{err}");
    }
}
