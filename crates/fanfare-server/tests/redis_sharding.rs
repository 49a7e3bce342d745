//! Cross-node delivery when channels are spread over several Redis servers:
//! client-side sharding over two independent servers, and a 3-master Redis
//! Cluster (sharded pub/sub). Many channels, so that every server carries
//! traffic, which is checked on the servers themselves.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::redis::{RedisCluster, RedisServer, collect_pubs, publish_pipelined, start_nodes};
use common::{Server, assert_healthy};
use serde_json::{Value, json};

const NAMESPACES: &str = r#"
[[namespaces]]
name = ""
allow_publish = true
history_size = 1000
history_ttl = "300s"
"#;

const CHANNELS: usize = 40;
const PER_CHANNEL: u64 = 10;

fn channel(i: usize) -> String {
    format!("shard{i}")
}

/// The Redis pub/sub name of every test channel.
fn pubsub_names() -> BTreeSet<String> {
    (0..CHANNELS).map(|i| format!("fanfare.c.{{{}}}", channel(i))).collect()
}

/// Subscribers on nodes B and C to every channel, a publisher on A publishing
/// `PER_CHANNEL` publications into each (interleaved); every subscriber must get
/// each channel's publications exactly once, in order, with consecutive offsets.
/// Runs `while_live` while the subscriptions exist.
async fn cross_node_many_channels(nodes: &[Server], while_live: impl FnOnce()) {
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let mut subs = Vec::new();
    for node in [b, c] {
        let mut s = node.connected("reader").await;
        for i in 0..CHANNELS {
            let r = s.subscribe_ok(&channel(i), json!({"recoverable": true})).await;
            assert_eq!(r["offset"].as_u64().unwrap_or(0), 0, "{r}");
        }
        subs.push(s);
    }
    let mut publisher = a.connected("writer").await;
    let items: Vec<(String, Value)> = (1..=PER_CHANNEL)
        .flat_map(|seq| (0..CHANNELS).map(move |i| (channel(i), json!({"seq": seq}))))
        .collect();
    publish_pipelined(&mut publisher, &items, 40).await;

    for (k, s) in subs.iter_mut().enumerate() {
        let seen = collect_pubs(s, CHANNELS * PER_CHANNEL as usize).await;
        let mut per_channel: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
        for p in seen {
            per_channel
                .entry(p.channel)
                .or_default()
                .push((p.offset, p.data["seq"].as_u64().expect("seq")));
        }
        assert_eq!(per_channel.len(), CHANNELS, "subscriber {k}: channels with publications");
        let expected: Vec<(u64, u64)> = (1..=PER_CHANNEL).map(|n| (n, n)).collect();
        for (ch, got) in &per_channel {
            assert_eq!(got, &expected, "subscriber {k}, channel {ch}: (offset, seq)");
        }
        s.assert_silent(Duration::from_millis(300)).await;
    }
    while_live();
    for n in nodes {
        assert_healthy(n).await;
    }
}

/// Asserts that the per-server channel sets partition all test channels, each
/// server holding some.
fn assert_partition(per_server: &[BTreeSet<String>]) {
    let all = pubsub_names();
    let mut union = BTreeSet::new();
    for (i, set) in per_server.iter().enumerate() {
        let ours: BTreeSet<String> = set.intersection(&all).cloned().collect();
        assert!(!ours.is_empty(), "server {i} carries none of the {CHANNELS} channels");
        assert!(union.is_disjoint(&ours), "a channel is subscribed on two servers: {per_server:?}");
        union.extend(ours);
    }
    assert_eq!(union, all, "every channel is subscribed on some server");
}

#[tokio::test]
async fn two_sharded_redis_servers_carry_disjoint_channels() {
    let r1 = RedisServer::start();
    let r2 = RedisServer::start();
    let nodes = start_nodes(3, &[r1.url(), r2.url()], false, NAMESPACES);
    cross_node_many_channels(&nodes, || {
        let sets: Vec<BTreeSet<String>> = [&r1, &r2]
            .iter()
            .map(|r| r.pubsub_channels("fanfare.c.*").into_iter().collect())
            .collect();
        assert_partition(&sets);
        for (i, r) in [&r1, &r2].iter().enumerate() {
            // The publish script runs where the channel lives and PUBLISHes there.
            let stats = r.commandstats();
            assert!(stats.get("publish").copied().unwrap_or(0) > 0, "redis {i}: {stats:?}");
            let scripts = stats.get("evalsha").copied().unwrap_or(0)
                + stats.get("eval").copied().unwrap_or(0);
            assert!(scripts > 0, "redis {i} ran no publish script: {stats:?}");
        }
        let total: u64 = [&r1, &r2].iter().map(|r| r.calls("publish")).sum();
        assert!(
            total >= (CHANNELS as u64) * PER_CHANNEL,
            "publications went through PUBLISH on the two servers: {total}"
        );
    })
    .await;
}

#[tokio::test]
async fn redis_cluster_with_three_masters_uses_sharded_pubsub_on_all() {
    let cluster = RedisCluster::start(3);
    let nodes = start_nodes(3, &cluster.urls(), true, NAMESPACES);
    cross_node_many_channels(&nodes, || {
        let sets: Vec<BTreeSet<String>> = cluster
            .masters
            .iter()
            .map(|m| m.pubsub_shardchannels("fanfare.c.*").into_iter().collect())
            .collect();
        assert_partition(&sets);
        let mut total = 0;
        for (i, m) in cluster.masters.iter().enumerate() {
            let stats = m.commandstats();
            let spublish = stats.get("spublish").copied().unwrap_or(0);
            assert!(spublish > 0, "master {i} got no SPUBLISH: {stats:?}");
            assert_eq!(stats.get("publish").copied().unwrap_or(0), 0, "master {i}: {stats:?}");
            assert!(stats.get("ssubscribe").copied().unwrap_or(0) > 0, "master {i}: {stats:?}");
            total += spublish;
        }
        assert!(total >= (CHANNELS as u64) * PER_CHANNEL, "SPUBLISH calls: {total}");
    })
    .await;
}
