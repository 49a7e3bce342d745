//! A Redis Cluster of 3 masters + 3 replicas loses the master of a busy
//! channel's slot, by SIGKILL and by a manual `CLUSTER FAILOVER` on its
//! replica. Publishing through one node resumes soon after the promotion, and
//! a subscriber on another node that recovers when told to (unsubscribe push
//! 2500, as the SDKs do) ends with every acknowledged publication exactly once,
//! in order. The same with the real SDK, three nodes and timings:
//! tests/sdk/redis-cluster-failover.mjs.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Client;
use common::redis::{RedisCluster, Resp, redis_cmd, start_nodes};
use serde_json::{Value, json};

const NAMESPACES: &str = r#"
[[namespaces]]
name = ""
allow_publish = true
history_size = 10000
history_ttl = "300s"
"#;

const CHANNEL: &str = "busy";
/// The goal is 1 s (measured: ~0.1-0.2 s); room for a loaded 2-core machine.
const RESUME_LIMIT: Duration = Duration::from_secs(3);

/// One publish attempt.
struct Sent {
    seq: u64,
    ok: bool,
    start: Instant,
    end: Instant,
}

/// Publishes `{"seq": n}` for n = 1, 2, ... through `client`, one at a time,
/// 5 ms apart, until `stop`; a failed publish is not retried.
async fn publish_loop(mut client: Client, sent: Arc<Mutex<Vec<Sent>>>, stop: Arc<Mutex<bool>>) {
    for seq in 1.. {
        if *stop.lock().expect("stop flag") {
            return;
        }
        let start = Instant::now();
        let r = client.publish(CHANNEL, json!({ "seq": seq })).await;
        let ok = r.get("publish").is_some();
        sent.lock().expect("sent list").push(Sent { seq, ok, start, end: Instant::now() });
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// What a recovering subscriber saw: `(offset, seq)` in arrival order.
struct Subscriber {
    client: Client,
    epoch: String,
    items: Vec<(u64, u64)>,
    resubscribes: usize,
}

impl Subscriber {
    /// Reads pushes until `done` holds; an unsubscribe push (code 2500) is
    /// answered the way SDKs do: resubscribe, recovering from the last offset.
    async fn pump_until(&mut self, within: Duration, done: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + within;
        while !done(self) {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = match self.client.try_recv_json(left).await {
                Ok(v) => v,
                Err(e) => panic!("subscriber: {e:?} after {:?}", self.items.last()),
            };
            let push = &v["push"];
            if let Some(p) = push.get("pub") {
                self.record(p);
            } else if let Some(u) = push.get("unsubscribe") {
                assert_eq!(u["code"], 2500, "{v}");
                self.resubscribes += 1;
                let offset = self.items.last().map_or(0, |i| i.0);
                let sub = self
                    .client
                    .subscribe_ok(
                        CHANNEL,
                        json!({"recoverable": true, "recover": true, "epoch": self.epoch, "offset": offset}),
                    )
                    .await;
                assert_eq!(sub["recovered"], true, "recovery after the failover: {sub}");
                for p in sub["publications"].as_array().into_iter().flatten() {
                    self.record(p);
                }
            }
        }
    }

    fn record(&mut self, p: &Value) {
        let offset = p["offset"].as_u64().expect("publication offset");
        let seq = p["data"]["seq"].as_u64().expect("publication seq");
        self.items.push((offset, seq));
    }
}

/// The first element of `ROLE` on `port`, if it answers.
fn role(port: u16) -> Option<String> {
    match redis_cmd(port, &["ROLE"]).ok()? {
        Resp::Array(Some(items)) => items.first().map(Resp::text),
        _ => None,
    }
}

async fn failover(kill: bool) {
    let mut cluster = RedisCluster::start_with_replicas(3);
    let nodes = start_nodes(2, &cluster.urls(), true, NAMESPACES);
    let (master, replica) = cluster.owner(&format!("fanfare.c.{{{CHANNEL}}}"));

    let mut client = nodes[1].connected("sub").await;
    let first = client.subscribe_ok(CHANNEL, json!({"recoverable": true})).await;
    let epoch = first["epoch"].as_str().expect("epoch").to_string();
    let mut sub = Subscriber { client, epoch, items: Vec::new(), resubscribes: 0 };

    let sent = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(Mutex::new(false));
    let publisher = nodes[0].connected("pub").await;
    let task = tokio::spawn(publish_loop(publisher, sent.clone(), stop.clone()));
    sub.pump_until(Duration::from_secs(10), |s| s.items.len() >= 100).await;

    let event = Instant::now();
    if kill {
        cluster.server_mut(master).kill();
    } else {
        let r = redis_cmd(replica, &["CLUSTER", "FAILOVER"]).expect("CLUSTER FAILOVER");
        assert_eq!(r, Resp::Simple("OK".into()));
    }
    let promoted = loop {
        if role(replica).as_deref() == Some("master") {
            break Instant::now();
        }
        assert!(event.elapsed() < Duration::from_secs(20), "replica :{replica} not promoted");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let resumed = loop {
        let first_ok = sent
            .lock()
            .expect("sent list")
            .iter()
            .find(|s| s.ok && s.start >= event)
            .map(|s| s.end);
        if let Some(t) = first_ok {
            break t;
        }
        assert!(event.elapsed() < Duration::from_secs(20), "publishing did not resume");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    *stop.lock().expect("stop flag") = true;
    task.await.expect("publisher task");

    let sent = std::mem::take(&mut *sent.lock().expect("sent list"));
    let acked: Vec<u64> = sent.iter().filter(|s| s.ok).map(|s| s.seq).collect();
    let last = *acked.last().expect("acknowledged publications");
    sub.pump_until(Duration::from_secs(20), |s| s.items.iter().any(|i| i.1 == last)).await;
    sub.client.assert_silent(Duration::from_millis(300)).await;

    for w in sub.items.windows(2) {
        assert_eq!(w[1].0, w[0].0 + 1, "offsets not consecutive: {w:?}");
        assert!(w[1].1 > w[0].1, "seq duplicated or out of order: {w:?}");
    }
    let seen: std::collections::HashSet<u64> = sub.items.iter().map(|i| i.1).collect();
    let missing: Vec<u64> = acked.iter().copied().filter(|s| !seen.contains(s)).collect();
    assert!(missing.is_empty(), "acknowledged publications missing: {missing:?}");
    assert!(sub.resubscribes >= 1, "the subscriber was never told to recover");
    let after_promotion = resumed.saturating_duration_since(promoted);
    eprintln!(
        "{}: promoted after {:?}, publishing resumed {:?} after the event, {:?} after the promotion; {} acknowledged, {} failed",
        if kill { "SIGKILL" } else { "CLUSTER FAILOVER" },
        promoted - event,
        resumed - event,
        after_promotion,
        acked.len(),
        sent.len() - acked.len()
    );
    assert!(after_promotion <= RESUME_LIMIT, "resumed {after_promotion:?} after the promotion");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_sigkilled_replica_promoted_publishing_resumes_nothing_acknowledged_lost() {
    failover(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_cluster_failover_publishing_resumes_nothing_acknowledged_lost() {
    failover(false).await;
}
