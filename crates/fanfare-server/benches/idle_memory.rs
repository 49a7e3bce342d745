//! Idle memory per WebSocket connection, plain and over TLS (issue 16;
//! docs/BENCHMARKS.md, "TLS listeners and logs"): N clients connect, each
//! subscribes to one of 1 000 channels and stays idle; the node's RSS growth
//! after 2 s, divided by N. A node with TLS on its HTTP port and one without,
//! each fresh per run, runs alternating; one line per run, then the medians
//! side by side.
//!
//! `cargo bench -p fanfare-server --bench idle_memory` (the release binary the
//! bench profile builds). `FANFARE_IDLE_N` connections (default 2 000),
//! `FANFARE_IDLE_RUNS` runs of each kind (default 3); `FANFARE_TEST_BIN` for
//! another build, with `FANFARE_IDLE_PLAIN_ONLY=1` when it has no TLS (a
//! baseline). The WebSocket client is the tests' (tokio-tungstenite, rustls
//! trusting a CA made at start), not the loadtest harness: compare within this
//! bench's figures only.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::Server;
use common::tls::TestCa;
use serde_json::json;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// One run on a fresh node: bytes of RSS per idle connection, and the node's
/// log line giving the connection task future's size.
async fn per_connection(server: &Server, n: usize) -> (f64, String) {
    // Warm up allocator arenas and lazily made state with a few first.
    let mut clients = Vec::with_capacity(n + 50);
    for i in 0..50 {
        let mut c = server.connected("warm").await;
        c.subscribe_ok(&format!("idle:w{i}"), json!({})).await;
        clients.push(c);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = common::rss_bytes(server.pid());
    for i in 0..n {
        let mut c = server.connected("idle").await;
        c.subscribe_ok(&format!("idle:{}", i % 1000), json!({})).await;
        clients.push(c);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = common::rss_bytes(server.pid());
    let log = server.log();
    let size = log.lines().find(|l| l.contains("connection task future")).unwrap_or_default();
    let size = size.find("connection task future").map_or("", |i| &size[i..]).to_string();
    ((after as f64 - before as f64) / n as f64, size)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n = env_or("FANFARE_IDLE_N", 2000).max(1);
    let runs = env_or("FANFARE_IDLE_RUNS", 3).max(1);
    let with_tls = std::env::var_os("FANFARE_IDLE_PLAIN_ONLY").is_none();
    let ca = TestCa::new();
    let cert = ca.issue("fanfare-a");
    // One trace line per connection gives the task future's size.
    let extra = "[log]\nlevel = \"info,fanfare::transport::websocket=trace\"\n\
                 [[namespaces]]\nname = \"idle\"\nallow_subscribe = true\n";
    println!("binary: {}; {n} idle connections per run", common::server_bin());
    let kinds: &[&str] = if with_tls { &["plain", "TLS"] } else { &["plain"] };
    let mut figures = vec![Vec::new(); kinds.len()];
    for run in 1..=runs {
        for (k, kind) in kinds.iter().enumerate() {
            let server = match *kind {
                "plain" => Server::start(extra),
                _ => Server::start_tls(&cert.listener_toml(), "", extra, ca.client_config(&[])),
            };
            let (bytes, size) = per_connection(&server, n).await;
            println!("run {run}, {kind}: {bytes:.0} B per connection ({size})");
            figures[k].push(bytes);
        }
    }
    // Every run gives a figure (runs >= 1).
    let medians: Vec<f64> = figures.iter().filter_map(|f| common::median(f)).collect();
    print!("median of {runs} runs: plain {:.0} B per connection", medians[0]);
    if let Some(tls) = medians.get(1) {
        print!(", TLS {tls:.0} B (+{:.0} B, {:.1}×)", tls - medians[0], tls / medians[0]);
    }
    println!();
}
