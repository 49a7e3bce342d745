//! Reconnect storm: thousands of clients, each on its own channel, come back to
//! one node at once. The node batches its Redis subscriptions, so the storm
//! costs a bounded number of Redis commands, counted by Redis itself
//! (`INFO commandstats`).

mod common;

use std::time::{Duration, Instant};

use common::redis::{RedisServer, collect_pubs, start_nodes_with};
use common::{Client, Server};
use futures_util::StreamExt;
use serde_json::json;

const CLIENTS: usize = 5000;
/// Connections opened at the same time.
const CONCURRENCY: usize = 500;

fn channel(i: usize) -> String {
    format!("storm{i}")
}

/// Opens `CLIENTS` connections (at most `CONCURRENCY` handshakes in flight),
/// each sending `connect` (anonymous) and, with `subscribe`, subscribing to
/// its own channel after the connect reply.
async fn connect_all(node: &Server, subscribe: bool) -> Vec<Client> {
    let port = node.port;
    let start = Instant::now();
    let clients: Vec<Client> = futures_util::stream::iter(0..CLIENTS)
        .map(|i| async move {
            let fut = async {
                let mut c = Client::open(port).await;
                c.timeout = Duration::from_secs(20);
                c.connect_ok("").await;
                if subscribe {
                    c.subscribe_ok(&channel(i), json!({})).await;
                }
                c
            };
            tokio::time::timeout(Duration::from_secs(30), fut)
                .await
                .unwrap_or_else(|_| panic!("client {i}: connect took over 30 s"))
        })
        .buffered(CONCURRENCY)
        .collect()
        .await;
    eprintln!("{CLIENTS} clients connected (subscribe: {subscribe}) in {:?}", start.elapsed());
    clients
}

/// Polls until Redis has `n` fanfare pub/sub channels (bounded by `within`).
fn wait_channels(redis: &RedisServer, n: usize, within: Duration) {
    let start = Instant::now();
    loop {
        let have = redis.pubsub_channels("fanfare.c.*").len();
        if have == n {
            return;
        }
        assert!(start.elapsed() < within, "redis has {have} channels, expected {n}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_storm_costs_a_bounded_number_of_redis_commands() {
    let redis = RedisServer::start();
    let nodes = start_nodes_with(
        1,
        &[redis.url()],
        false,
        "unsubscribe_delay = \"300ms\"",
        "[[namespaces]]\nname = \"\"\nallow_publish = true\n",
    );
    let node = &nodes[0];

    // Before: every client subscribed, one Redis channel each.
    let clients = connect_all(node, true).await;
    wait_channels(&redis, CLIENTS, Duration::from_secs(10));

    // The connections drop at once (no close handshake, as on a network cut);
    // once the delay passed the node left every channel in Redis.
    redis.reset_stats();
    drop(clients);
    wait_channels(&redis, 0, Duration::from_secs(20));
    let unsubscribes = redis.calls("unsubscribe");
    eprintln!("leaving: {:?}", redis.commandstats());
    assert!(
        (1..=50).contains(&unsubscribes),
        "{CLIENTS} channels left with {unsubscribes} UNSUBSCRIBE commands"
    );

    // The storm: everyone is back and resubscribes at once. The connections
    // are opened first (bounded by how fast this test can open them); then
    // every client sends its subscribe without waiting for the others.
    let mut clients = connect_all(node, false).await;
    redis.reset_stats();
    let start = Instant::now();
    let mut ids = Vec::with_capacity(CLIENTS);
    for (i, c) in clients.iter_mut().enumerate() {
        let id = c.next_id();
        c.send_json(&json!({"id": id, "subscribe": {"channel": channel(i)}})).await;
        ids.push(id);
    }
    for (c, id) in clients.iter_mut().zip(ids) {
        let r = c.reply(id).await;
        assert!(r.get("subscribe").is_some(), "resubscribe failed: {r}");
    }
    eprintln!("{CLIENTS} resubscribed in {:?}", start.elapsed());
    let live = redis.pubsub_channels("fanfare.c.*").len();
    let stats = redis.commandstats();
    eprintln!("storm: {stats:?}");
    assert_eq!(live, CLIENTS, "every channel subscribed in Redis after the storm");
    let subscribes = stats.get("subscribe").copied().unwrap_or(0);
    assert!(
        (1..=100).contains(&subscribes),
        "{CLIENTS} resubscriptions cost {subscribes} SUBSCRIBE commands"
    );
    // Nothing else per client either (no history, no presence here): the whole
    // storm is a bounded number of commands.
    let total: u64 = stats.values().sum();
    assert!(total <= 200, "{CLIENTS} resubscriptions cost {total} Redis commands: {stats:?}");

    // And the subscriptions work: publications reach their clients.
    for i in [0, CLIENTS / 2, CLIENTS - 1] {
        let data = json!({"to": i});
        let r = clients[0].publish(&channel(i), data.clone()).await;
        assert_eq!(r["publish"], json!({}), "{r}");
        let got = collect_pubs(&mut clients[i], 1).await;
        assert_eq!((got[0].channel.as_str(), &got[0].data), (channel(i).as_str(), &data));
    }
}
