//! Abuse from outside while 100 subscribers keep receiving every
//! publication: thousands of sockets from many addresses that never finish
//! their request (half-open WebSocket handshakes, slowloris header
//! dribbles), and one client flooding commands.

mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::api::metric_with;
use common::{Client, Server};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;

/// The `i`-th of many loopback source addresses (127.0.0.2 to 127.0.0.254).
fn source(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 2 + (i % 253) as u8)
}

/// 100 connected subscribers of `ticker:main` and a publisher.
async fn audience(server: &Server) -> (Vec<Client>, Client) {
    let mut subscribers = Vec::new();
    for i in 0..100 {
        let mut c = server.connected(&format!("s{i}")).await;
        c.subscribe_ok("ticker:main", json!({})).await;
        subscribers.push(c);
    }
    (subscribers, server.connected("publisher").await)
}

/// Publishes `n` and checks that every subscriber receives it.
async fn round(subscribers: &mut [Client], publisher: &mut Client, n: u64) {
    let r = publisher.publish("ticker:main", json!({ "n": n })).await;
    assert!(r.get("publish").is_some(), "publish {n}: {r}");
    for c in subscribers.iter_mut() {
        let push = c.recv_push().await;
        assert_eq!(push["push"]["pub"]["data"]["n"], n, "{push}");
    }
}

const NAMESPACES: &str = "[[namespaces]]\nname = \"ticker\"\nallow_publish = true\n";

/// A socket from `src` that sends `head`, then, when `dribble`, one more
/// byte every 250 ms (a slowloris client: each byte would restart a
/// per-read timeout). How long the server took to close it, or `None` when
/// it was still open after `limit`.
async fn abuser(
    port: u16,
    src: Ipv4Addr,
    head: &'static [u8],
    dribble: bool,
    limit: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind((src, 0).into()).expect("binding a loopback source address");
    let mut s = socket.connect(([127, 0, 0, 1], port).into()).await.expect("connect");
    s.write_all(head).await.expect("write");
    let (mut r, mut w) = s.split();
    let closed = async {
        let mut buf = [0u8; 512];
        loop {
            tokio::select! {
                n = r.read(&mut buf) => match n {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                },
                _ = tokio::time::sleep(Duration::from_millis(250)), if dribble => {
                    if w.write_all(b"a").await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    tokio::time::timeout(limit, closed).await.ok().map(|()| start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_half_open_handshakes_and_two_thousand_slowloris_dribbles_leave_100_subscribers_receiving()
 {
    let server =
        Server::start_with_env(NAMESPACES, &[("FANFARE__HTTP__HEADER_READ_TIMEOUT", "2s")]);
    let port = server.port;
    let (mut subscribers, mut publisher) = audience(&server).await;

    // A WebSocket handshake cut off before its end; header lines dribbled
    // byte by byte, to hyper (`/health`) and to the streaming transports'
    // own reader (`/connection/sse`).
    const HALF_HANDSHAKE: &[u8] = b"GET /connection/websocket HTTP/1.1\r\nHost: 127.0.0.1\r\n\
        Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n";
    const DRIBBLE_HYPER: &[u8] = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ";
    const DRIBBLE_BARE: &[u8] = b"GET /connection/sse HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ";
    let limit = Duration::from_secs(20);
    let mut held = Vec::new();
    for i in 0..4000 {
        let (head, dribble) = match i % 4 {
            0 | 2 => (HALF_HANDSHAKE, false),
            1 => (DRIBBLE_HYPER, true),
            _ => (DRIBBLE_BARE, true),
        };
        held.push(tokio::spawn(abuser(port, source(i), head, dribble, limit)));
    }

    // Meanwhile every subscriber receives every publication, and new
    // clients connect (the abusers never reach the connect-rate limits).
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < Duration::from_secs(3) {
        n += 1;
        round(&mut subscribers, &mut publisher, n).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut fresh = server.connected("fresh").await;
    fresh.subscribe_ok("ticker:main", json!({})).await;
    subscribers.push(fresh);

    let mut slowest = Duration::ZERO;
    for (i, h) in held.into_iter().enumerate() {
        let took = h.await.expect("abuser task");
        let took = took.unwrap_or_else(|| panic!("abuser {i} still open after {limit:?}"));
        slowest = slowest.max(took);
    }
    eprintln!("4000 abusive sockets closed; the slowest after {slowest:?}");
    // Dribbling does not extend the 2 s header deadline (bounded loosely:
    // 4000 connects on 2 busy cores take a while to be accepted).
    assert!(slowest < Duration::from_secs(12), "slowest close after {slowest:?}");
    n += 1;
    round(&mut subscribers, &mut publisher, n).await;
    assert_eq!(metric_with(port, "fanfare_limit_refusals_total", &[]), 0.0);
}

/// What a flooding client saw.
#[derive(Debug, Default)]
struct Flood {
    sent: usize,
    served: usize,
    too_many: usize,
    close: Option<u16>,
}

/// One connection sending `per_tick` publish commands every 10 ms (50 000/s
/// with 500) until the server closes it or `within` passes; it reads all
/// the while, so it is throttled by its command limit, not by its queue.
async fn flood(port: u16, per_tick: usize, within: Duration) -> Flood {
    let url = format!("ws://127.0.0.1:{port}/connection/websocket");
    let (ws, _) = tokio_tungstenite::connect_async(url).await.expect("flooder handshake");
    let (mut tx, mut rx) = ws.split();
    tx.send(Message::text(r#"{"id":1,"connect":{}}"#)).await.expect("connect");
    let reader = tokio::spawn(async move {
        let mut seen = Flood::default();
        while let Some(Ok(m)) = rx.next().await {
            match m {
                Message::Text(t) => {
                    for v in serde_json::Deserializer::from_str(&t).into_iter::<Value>() {
                        let v = v.expect("JSON from the server");
                        if v.get("publish").is_some() {
                            seen.served += 1;
                        } else if v["error"]["code"] == 111 {
                            seen.too_many += 1;
                        }
                    }
                }
                Message::Close(f) => {
                    seen.close = f.map(|f| f.code.into());
                    break;
                }
                _ => {}
            }
        }
        seen
    });
    let mut sent = 0;
    let mut id = 2u64;
    let start = Instant::now();
    while start.elapsed() < within && !reader.is_finished() {
        let frame: Vec<String> = (0..per_tick)
            .map(|_| {
                id += 1;
                json!({"id": id, "publish": {"channel": "ticker:flood", "data": {"id": id}}})
                    .to_string()
            })
            .collect();
        if tx.send(Message::text(frame.join("\n"))).await.is_err() {
            break;
        }
        sent += per_tick;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seen = tokio::time::timeout(Duration::from_secs(10), reader).await;
    let mut seen = seen.expect("the flooder's reader ends").expect("reader task");
    seen.sent = sent;
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_flooding_50_000_commands_a_second_is_closed_with_3013_while_100_subscribers_keep_receiving()
 {
    // 1000 commands/s and bursts of 2000 per connection (the defaults are
    // ten times that: a debug build on two busy cores may not even process
    // more, and a node that reads a flooder no faster than its rate never
    // needs to refuse it).
    let server = Server::start(&format!(
        "{NAMESPACES}\n[limits]\nclient_commands = 1000\nclient_command_burst = 2000\n"
    ));
    let port = server.port;
    let (mut subscribers, mut publisher) = audience(&server).await;
    let flooder = tokio::spawn(flood(port, 500, Duration::from_secs(5)));
    let start = Instant::now();
    let mut n = 0;
    while !flooder.is_finished() && start.elapsed() < Duration::from_secs(6) {
        n += 1;
        round(&mut subscribers, &mut publisher, n).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = flooder.await.expect("flooder task");
    let elapsed = start.elapsed().as_secs_f64();
    eprintln!("flooder: {seen:?} within {elapsed:.2} s; {n} rounds delivered meanwhile");
    assert_eq!(seen.close, Some(3013), "{seen:?}");
    // A burst and what the rate refilled meanwhile were served; then
    // another burst of 111s, and the close.
    assert!(seen.served >= 2000, "{seen:?}");
    assert!(seen.served as f64 <= 2000.0 + 1000.0 * elapsed + 1.0, "{seen:?}");
    assert!(seen.too_many >= 1900, "{seen:?}");
    let refused =
        metric_with(port, "fanfare_limit_refusals_total", &[("limit", "client_commands")]);
    assert_eq!(refused as usize, seen.too_many + 1, "every 111 and the close counted");
    n += 1;
    round(&mut subscribers, &mut publisher, n).await;
}
