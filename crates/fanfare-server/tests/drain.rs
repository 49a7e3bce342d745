//! Graceful drain on SIGTERM (`shutdown.*`): `/ready` turns 503 at once,
//! clients keep working for `drain_delay`, are then closed with 3001 spread
//! over `drain_period`, API calls are served and finish, the node exits 0;
//! clients that recover on another node lose nothing.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::api::http_request;
use common::redis::{RedisServer, broker_toml};
use common::{Bystander, Client, ReadEnd, Server, http_get};
use futures_util::future::join_all;
use serde_json::{Value, json};

const CLIENTS: usize = 1000;
const DELAY: Duration = Duration::from_secs(2);
const PERIOD: Duration = Duration::from_secs(4);

fn history_namespace() -> String {
    common::open_namespaces(Some(1000))
}

/// Polls `/ready` until it answers `status` (bounded by `within`).
fn wait_ready_status(node: &Server, status: u16, within: Duration) {
    let start = Instant::now();
    loop {
        let got = http_get(node.port, "/ready").map(|(s, _)| s).unwrap_or(0);
        if got == status {
            return;
        }
        assert!(start.elapsed() < within, "/ready did not answer {status} within {within:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What one drained client saw on the draining node.
struct Drained {
    client: Client,
    /// Publication offsets received, in order.
    offsets: Vec<u64>,
    close: (u16, String),
    closed_at: Instant,
}

/// Reads publications until the node closes the connection (bounded).
async fn until_closed(mut client: Client, mut offsets: Vec<u64>) -> Drained {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.try_recv_json(left).await {
            Ok(v) => {
                if let Some(o) = v["push"]["pub"]["offset"].as_u64() {
                    offsets.push(o);
                }
            }
            Err(ReadEnd::Closed(code, reason)) => {
                return Drained {
                    client,
                    offsets,
                    close: (code, reason),
                    closed_at: Instant::now(),
                };
            }
            Err(e) => panic!("expected publications then a close, got {e:?}"),
        }
    }
}

/// Connects and subscribes `n` clients to `channel` (recoverable), 50 at a time.
async fn subscribers(node: &Server, n: usize, channel: &str) -> Vec<(Client, String)> {
    let mut out = Vec::with_capacity(n);
    for batch in 0..n.div_ceil(50) {
        let size = 50.min(n - batch * 50);
        out.extend(
            join_all((0..size).map(|_| async {
                let mut c = node.client().await;
                c.connect_ok("").await;
                let sub = c.subscribe_ok(channel, json!({"recoverable": true})).await;
                let epoch = sub["epoch"].as_str().expect("epoch").to_string();
                (c, epoch)
            }))
            .await,
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_1000_clients_with_3001_spread_over_the_period_and_recovering_on_another_node_loses_nothing()
 {
    let redis = RedisServer::start();
    let broker = broker_toml(&[redis.url()], false, "");
    let a = Server::start(&format!(
        "{broker}\n[shutdown]\ndrain_delay = \"2s\"\ndrain_period = \"4s\"\ndrain_timeout = \"5s\"\n{}",
        history_namespace()
    ));
    let mut a = a;
    let b = Server::start(&format!("{broker}\n{}", history_namespace()));
    let ch = "news";

    let subs = subscribers(&a, CLIENTS, ch).await;
    let epoch = subs[0].1.clone();
    assert!(subs.iter().all(|(_, e)| *e == epoch), "one stream, one epoch");
    let mut bystander = Bystander::join(&a).await;
    // Publications go through the other node (and Redis).
    let mut publisher = b.connected("publisher").await;
    let mut published = 0u64;
    for _ in 0..3 {
        published += 1;
        let r = publisher.publish(ch, json!({"n": published})).await;
        assert_eq!(r["publish"], json!({}), "{r}");
    }
    let watchers: Vec<_> =
        subs.into_iter().map(|(c, _)| tokio::spawn(until_closed(c, Vec::new()))).collect();

    let sigterm = Instant::now();
    a.send_sigterm();
    wait_ready_status(&a, 503, Duration::from_secs(2));
    assert_eq!(http_get(a.port, "/health").expect("/health").0, 200, "alive while draining");
    // Clients keep working during the delay ...
    bystander.check().await;
    for _ in 0..3 {
        published += 1;
        publisher.publish(ch, json!({"n": published})).await;
    }
    // ... new ones are sent elsewhere ...
    match Client::try_open(a.port, None, None).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 503),
        Err(e) => panic!("a new client during the drain: {e}"),
        Ok(_) => panic!("a new client was accepted during the drain"),
    }
    // ... and the API is served.
    let r = http_request(
        a.port,
        "POST",
        "/api/publish",
        &[("Content-Type", "application/json")],
        json!({"channel": "health:api", "data": {}}).to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "API call during the drain: {:?}", String::from_utf8_lossy(&r.body));

    // Publishing goes on through the period, while clients are closed.
    let publishing = tokio::spawn(async move {
        let until = sigterm + DELAY + PERIOD + Duration::from_secs(1);
        while Instant::now() < until {
            published += 1;
            let r = publisher.publish(ch, json!({"n": published})).await;
            assert_eq!(r["publish"], json!({}), "{r}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (publisher, published)
    });
    let drained: Vec<Drained> =
        join_all(watchers).await.into_iter().map(|r| r.expect("watcher")).collect();
    let status = a.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM: {status}");

    // Every client was closed with 3001, none during the delay, and the
    // closes are spread over the period: 8 slices of it, most of them used,
    // none with half of all closes.
    let mut slices = [0usize; 8];
    for d in &drained {
        assert_eq!(d.close, (3001, "shutdown".to_string()));
        let after = d.closed_at.duration_since(sigterm);
        assert!(after >= DELAY, "a client was closed {after:?} after SIGTERM, within the delay");
        let slice = ((after - DELAY).as_secs_f64() / PERIOD.as_secs_f64() * 8.0) as usize;
        slices[slice.min(7)] += 1;
    }
    eprintln!("closes per eighth of the drain period: {slices:?}");
    let used = slices.iter().filter(|&&n| n > 0).count();
    assert!(used >= 6, "closes not spread over the period: {slices:?}");
    assert!(
        slices.iter().all(|&n| n < CLIENTS / 2),
        "half of the closes in one eighth of the period: {slices:?}"
    );
    assert!(
        slices[0] < CLIENTS / 4,
        "the first eighth of the period closed a quarter of the clients: {slices:?}"
    );

    // Each client comes back on the other node and recovers from where it was.
    let mut back = Vec::with_capacity(CLIENTS);
    for chunk in drained.chunks(50) {
        back.extend(
            join_all(chunk.iter().map(|d| {
                let (b, epoch) = (&b, &epoch);
                let last = d.offsets.last().copied().unwrap_or(0);
                async move {
                    let mut c = b.client().await;
                    c.connect_ok("").await;
                    let sub = c
                        .subscribe_ok(
                            ch,
                            json!({"recoverable": true, "recover": true, "epoch": epoch, "offset": last}),
                        )
                        .await;
                    assert_eq!(sub["recovered"], true, "{sub}");
                    let recovered: Vec<u64> = sub["publications"]
                        .as_array()
                        .map(|a| a.iter().map(|p| p["offset"].as_u64().expect("offset")).collect())
                        .unwrap_or_default();
                    (c, recovered)
                }
            }))
            .await,
        );
    }
    let (mut publisher, published) = publishing.await.expect("publisher");
    published_through(&mut publisher, ch, published + 1).await;
    let top = published + 1;
    for (d, (mut c, recovered)) in drained.into_iter().zip(back) {
        let mut seen = d.offsets.clone();
        seen.extend(recovered);
        while seen.last().copied().unwrap_or(0) < top {
            let v = c.recv_push().await;
            if let Some(o) = v["push"]["pub"]["offset"].as_u64() {
                seen.push(o);
            }
        }
        assert_eq!(
            seen,
            (1..=top).collect::<Vec<u64>>(),
            "a recovering client lost or repeated publications"
        );
        drop(d.client);
    }
}

/// Publishes the last publication (offset `n`) and checks its reply.
async fn published_through(publisher: &mut Client, ch: &str, n: u64) {
    let r = publisher.publish(ch, json!({"n": n})).await;
    assert_eq!(r["publish"], json!({}), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_call_in_flight_at_sigterm_finishes_after_the_clients_are_gone_then_exit_0() {
    let mut server = Server::start(
        r#"
[shutdown]
drain_delay = "2s"
drain_period = "500ms"
drain_timeout = "5s"

[[namespaces]]
name = ""
allow_publish = true
"#,
    );
    // The delay is long enough for the readiness check and the bystander's
    // round trip below on a loaded machine: both must fit inside it.
    let mut bystander = Bystander::join(&server).await;
    let mut reader = server.connected("reader").await;
    reader.subscribe_ok("late", json!({})).await;
    // A publish whose body is still arriving when SIGTERM comes.
    let body = json!({"channel": "late", "data": {"in": "flight"}}).to_string();
    let (first, rest) = body.as_bytes().split_at(10);
    let mut call = std::net::TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    write!(
        call,
        "POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .expect("head");
    call.write_all(first).expect("first part");
    std::thread::sleep(Duration::from_millis(100));
    server.send_sigterm();
    wait_ready_status(&server, 503, Duration::from_secs(2));
    bystander.check().await;
    let start = Instant::now();
    assert_eq!(bystander.client.expect_close().await, (3001, "shutdown".to_string()));
    assert_eq!(reader.expect_close().await, (3001, "shutdown".to_string()));
    // Closed at the end of delay and period: by 2.5 s after the SIGTERM.
    assert!(start.elapsed() < Duration::from_secs(4), "closed after {:?}", start.elapsed());
    // The clients are gone; the call in flight is still answered.
    call.write_all(rest).expect("rest of the body");
    let mut answer = String::new();
    call.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    call.read_to_string(&mut answer).expect("answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let status = server.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM: {status}");
}

#[tokio::test]
async fn a_second_sigterm_cuts_the_drain_short() {
    let mut server = Server::start(
        r#"
[shutdown]
drain_delay = "60s"
drain_period = "60s"
"#,
    );
    let mut c = server.connected("patient").await;
    server.send_sigterm();
    wait_ready_status(&server, 503, Duration::from_secs(2));
    // Still served during the delay.
    let r: Value = c.publish("health:x", json!({})).await;
    assert_eq!(r["publish"], json!({}), "{r}");
    server.send_sigterm();
    assert_eq!(c.expect_close().await, (3001, "shutdown".to_string()));
    let status = server.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "exit status after two SIGTERMs: {status}");
}
