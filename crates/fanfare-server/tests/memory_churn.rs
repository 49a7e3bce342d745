//! Channel churn on a single node with the memory broker: the state of
//! channels nobody uses any more is freed, and the process's memory (VmRSS)
//! comes back once the TTLs passed and a sweep ran.

mod common;

use std::time::{Duration, Instant};

use common::{Client, Server, metric, rss_bytes};
use serde_json::{Value, json};

const MIB: f64 = 1024.0 * 1024.0;

const CONFIG: &str = r#"
[log]
level = "info,fanfare::heap=debug"

# The churn goes over one connection as fast as the node answers: past the
# default command limits (10 000/s per connection and per user), which this
# test is not about.
[limits]
client_commands = 0
user_commands = 0

[memory]
history_meta_ttl = "1s"
sweep_interval = "100ms"

[[namespaces]]
name = "r"
presence = true
history_size = 10
history_ttl = "2s"

[[namespaces]]
name = "big"
allow_publish = true
history_size = 10
history_ttl = "5s"
"#;

/// Sends `commands` (bodies without ids) in frames of `per_frame`, then
/// reads their replies; every reply must be a success.
async fn pipeline(c: &mut Client, commands: &[Value], per_frame: usize) {
    for chunk in commands.chunks(per_frame) {
        let mut frame = String::new();
        for body in chunk {
            let mut cmd = body.as_object().expect("command body").clone();
            cmd.insert("id".into(), c.next_id().into());
            frame.push_str(&Value::Object(cmd).to_string());
            frame.push('\n');
        }
        c.send_text(&frame).await;
    }
    for _ in commands {
        let r = c.recv_json().await;
        assert!(r.get("error").is_none() && r.get("id").is_some(), "{r}");
    }
}

/// Subscribe to and leave `n` distinct recoverable channels `r:{tag}-{i}`,
/// sampling the node's RSS; returns the highest sample.
async fn subscribe_churn(server: &Server, c: &mut Client, tag: &str, n: usize) -> u64 {
    let mut peak = 0;
    for start in (0..n).step_by(1_000) {
        let commands: Vec<Value> = (start..(start + 1_000).min(n))
            .flat_map(|i| {
                let ch = format!("r:{tag}-{i}");
                [
                    json!({"subscribe": {"channel": ch, "recoverable": true}}),
                    json!({"unsubscribe": {"channel": ch}}),
                ]
            })
            .collect();
        pipeline(c, &commands, 200).await;
        peak = peak.max(rss_bytes(server.pid()));
    }
    peak
}

/// Publishes `n` publications of `size` bytes into distinct channels
/// `big:{tag}-{i}`, sampling the node's RSS; returns the highest sample.
async fn publish_churn(server: &Server, c: &mut Client, tag: &str, n: usize, size: usize) -> u64 {
    let data = json!({"s": "x".repeat(size)});
    let mut peak = 0;
    for start in (0..n).step_by(50) {
        let commands: Vec<Value> = (start..(start + 50).min(n))
            .map(|i| json!({"publish": {"channel": format!("big:{tag}-{i}"), "data": data}}))
            .collect();
        pipeline(c, &commands, 1).await;
        peak = peak.max(rss_bytes(server.pid()));
    }
    peak
}

/// Waits (bounded) until the memory broker keeps no channel, then long
/// enough for the heap trim that follows (at most one per second).
async fn wait_until_swept(server: &Server, within: Duration) {
    let deadline = Instant::now() + within;
    // The gauge is set by each sweep; give it one to run.
    tokio::time::sleep(Duration::from_millis(300)).await;
    while metric(server.port, "fanfare_broker_channels") > 0.0 {
        assert!(
            Instant::now() < deadline,
            "the broker still keeps {} channels after {within:?}",
            metric(server.port, "fanfare_broker_channels")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB
}

#[tokio::test]
async fn channel_churn_gives_the_memory_back_after_the_ttls_and_a_sweep() {
    let server = Server::start(CONFIG);
    let mut c = server.connected("churn").await;
    // Warm-up: thread arenas, metric series, buffers of one connection.
    subscribe_churn(&server, &mut c, "warm", 2_000).await;
    publish_churn(&server, &mut c, "warm", 50, 60_000).await;
    wait_until_swept(&server, Duration::from_secs(15)).await;
    let start = rss_bytes(server.pid());

    // 100 000 distinct recoverable channels (with presence) subscribed and left.
    let t = Instant::now();
    let sub_peak = subscribe_churn(&server, &mut c, "a", 100_000).await;
    let sub_took = t.elapsed();
    wait_until_swept(&server, Duration::from_secs(15)).await;
    let after_subs = rss_bytes(server.pid());
    assert_eq!(metric(server.port, "fanfare_channels"), 0.0, "the hub keeps no channel");

    // 2 000 publications of 60 KB into distinct channels, history TTL 5 s.
    let pub_peak = publish_churn(&server, &mut c, "b", 2_000, 60_000).await;
    // Up to 117 MiB of publications, fewer held at once when publishing takes
    // longer than their TTL (a debug build on a busy machine).
    assert!(
        pub_peak > start + 32 * 1024 * 1024,
        "the publications were held ({:.1} MiB at the peak, {:.1} at the start): \
         otherwise this test proves nothing",
        mib(pub_peak),
        mib(start)
    );
    let t = Instant::now();
    wait_until_swept(&server, Duration::from_secs(20)).await;
    let swept_after = t.elapsed();
    let after_pubs = rss_bytes(server.pid());
    assert!(metric(server.port, "fanfare_broker_channels_swept_total") >= 2_000.0);

    eprintln!(
        "RSS: start {:.1} MiB; 100 000 subscribe/unsubscribe ({sub_took:.1?}): peak {:.1} MiB, \
         after {:.1} MiB; 2 000 x 60 KB publications: peak {:.1} MiB, after {:.1} MiB \
         ({swept_after:.1?} after the last publish)",
        mib(start),
        mib(sub_peak),
        mib(after_subs),
        mib(pub_peak),
        mib(after_pubs),
    );
    for line in server.log().lines().filter(|l| l.contains("heap trimmed")) {
        eprintln!("{line}");
    }
    let bound = start + 8 * 1024 * 1024;
    assert!(after_subs <= bound, "subscribe churn kept {:.1} MiB", mib(after_subs) - mib(start));
    assert!(after_pubs <= bound, "publication churn kept {:.1} MiB", mib(after_pubs) - mib(start));
    c.close().await;
    common::assert_healthy(&server).await;
}
