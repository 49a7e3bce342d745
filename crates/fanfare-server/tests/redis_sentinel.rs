//! Redis Sentinel (`redis.sentinel_urls`, `redis.sentinel_master`): real
//! `redis-server --sentinel` processes watching a primary and its replica.
//! The primary is SIGKILLed, the sentinels promote the replica, and the
//! fanfare nodes follow: publishing and cross-node delivery resume, and a
//! subscriber told of the gap recovers every acknowledged publication (the
//! replica had them all before the kill).

mod common;

use std::time::{Duration, Instant};

use common::assert_healthy;
use common::redis::{RedisServer, Resp, collect_pubs, redis_cmd, start_nodes_with};
use common::redis_tls::Sentinel;
use serde_json::json;

const MASTER: &str = "fanfare-primary";

fn namespaces() -> String {
    common::open_namespaces(Some(1000))
}

/// `master_repl_offset` of `INFO replication` on `port`.
fn repl_offset(port: u16) -> Option<u64> {
    let Ok(Resp::Bulk(Some(b))) = redis_cmd(port, &["INFO", "replication"]) else { return None };
    String::from_utf8_lossy(&b)
        .lines()
        .find_map(|l| l.strip_prefix("master_repl_offset:")?.trim().parse().ok())
}

fn wait_until(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A primary, its replica (in sync) and three sentinels (quorum 2) ready
/// to fail over; the `[redis]` lines for fanfare nodes using them.
fn sentinel_setup() -> (RedisServer, RedisServer, Vec<Sentinel>, String) {
    let primary = RedisServer::start();
    let replica_of = primary.port.to_string();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &replica_of]);
    wait_until(
        "the replica to sync",
        Duration::from_secs(20),
        || matches!(redis_cmd(replica.port, &["INFO", "replication"]), Ok(Resp::Bulk(Some(b))) if String::from_utf8_lossy(&b).contains("master_link_status:up")),
    );
    let sentinels: Vec<Sentinel> =
        (0..3).map(|_| Sentinel::start(MASTER, primary.port, 2)).collect();
    // The sentinels found each other and the replica (hello messages, ~2 s).
    wait_until("sentinels ready to fail over", Duration::from_secs(30), || {
        sentinels.iter().all(|s| {
            let quorum = matches!(redis_cmd(s.port, &["SENTINEL", "ckquorum", MASTER]), Ok(Resp::Simple(ref r)) if r.starts_with("OK"));
            let replicas = matches!(redis_cmd(s.port, &["SENTINEL", "replicas", MASTER]), Ok(Resp::Array(Some(ref r))) if !r.is_empty());
            quorum && replicas
        })
    });

    let urls: Vec<String> = sentinels.iter().map(Sentinel::url).collect();
    let quoted: Vec<String> = urls.iter().map(|u| format!("{u:?}")).collect();
    // redis.urls gives only scheme, credentials and database here.
    let redis_extra =
        format!("sentinel_urls = [{}]\nsentinel_master = {MASTER:?}\n", quoted.join(", "));
    (primary, replica, sentinels, redis_extra)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_follow_a_sentinel_failover_and_no_acknowledged_publication_is_lost() {
    let (mut primary, replica, sentinels, redis_extra) = sentinel_setup();
    let nodes =
        start_nodes_with(2, &["redis://primary".to_string()], false, &redis_extra, &namespaces());
    let (a, b) = (&nodes[0], &nodes[1]);
    let ch = "failover";
    // Anonymous clients: a user's server-side subscription (its personal
    // channel) cannot be resubscribed by the client, so after the gap the node
    // would close a user's connection with 3010 (see redis_nodes.rs).
    let mut sub = b.client().await;
    sub.connect_ok("").await;
    let first = sub.subscribe_ok(ch, json!({"recoverable": true})).await;
    let epoch = first["epoch"].as_str().expect("epoch").to_string();
    let mut publisher = a.client().await;
    publisher.connect_ok("").await;
    for n in 1..=20 {
        let r = publisher.publish(ch, json!({"n": n})).await;
        assert_eq!(r["publish"], json!({}), "{r}");
    }
    let live = collect_pubs(&mut sub, 20).await;
    assert_eq!(live.last().map(|s| s.offset), Some(20), "{live:?}");
    assert_eq!(primary.role(), "master");
    // The replica has every acknowledged publication (asynchronous
    // replication: only then does the failover keep them all).
    wait_until("the replica to catch up", Duration::from_secs(10), || {
        let p = repl_offset(primary.port);
        p.is_some() && repl_offset(replica.port) == p
    });

    primary.kill();
    // Publishing resumes once the sentinels promoted the replica and the node
    // followed; until then publishes are refused with a temporary error.
    let started = Instant::now();
    let mut refused = 0;
    let mut acked_after: Vec<u64> = Vec::new();
    let mut n = 21;
    while acked_after.len() < 10 {
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "publishing did not resume ({refused} refused)"
        );
        let r = publisher.publish(ch, json!({"n": n})).await;
        if r["publish"] == json!({}) {
            acked_after.push(n);
            n += 1;
        } else {
            assert_eq!(r["error"]["code"], 100, "{r}");
            assert_eq!(r["error"]["temporary"], true, "{r}");
            refused += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert!(refused > 0, "publishing never paused: the kill went unnoticed?");
    let promoted = sentinels[0].primary_port(MASTER);
    assert_eq!(promoted, Some(replica.port), "the sentinels name the replica now");
    assert_eq!(replica.role(), "master");

    // The subscriber was told its stream may have a gap ...
    let push =
        sub.recv_matching("unsubscribe push", |v| v["push"].get("unsubscribe").is_some()).await;
    assert_eq!(push["push"]["unsubscribe"]["code"], 2500, "{push}");
    // ... and recovers from its position: the same stream (the replica had
    // it), nothing acknowledged missing.
    let mut seen: Vec<u64> = live.iter().map(|s| s.data["n"].as_u64().unwrap_or(0)).collect();
    let rec = sub
        .subscribe_ok(
            ch,
            json!({"recoverable": true, "recover": true, "epoch": epoch, "offset": 20}),
        )
        .await;
    assert_eq!(rec["recovered"], true, "{rec}");
    assert_eq!(rec["epoch"], epoch.as_str(), "{rec}");
    for p in rec["publications"].as_array().into_iter().flatten() {
        seen.push(p["data"]["n"].as_u64().expect("n"));
    }
    for n in acked_after.iter().chain(&(1..=20).collect::<Vec<u64>>()) {
        assert!(seen.contains(n), "acknowledged publication {n} lost; saw {seen:?}");
    }
    // Live delivery works again, cross-node.
    let r = publisher.publish(ch, json!({"n": "after"})).await;
    assert_eq!(r["publish"], json!({}), "{r}");
    let next = sub
        .recv_matching("the next publication", |v| v["push"]["pub"]["data"]["n"] == "after")
        .await;
    assert_eq!(next["push"]["channel"], ch, "{next}");
    for n in &nodes {
        assert_healthy(n).await;
    }
}

/// `SENTINEL FAILOVER`: the old primary lives on as a replica, so nothing
/// breaks our connections to it; the once-a-second check of the sentinels'
/// answer notices the new primary, and publishing moves there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_follow_a_manual_sentinel_failover_whose_old_primary_survives() {
    let (primary, replica, sentinels, redis_extra) = sentinel_setup();
    let nodes =
        start_nodes_with(2, &["redis://primary".to_string()], false, &redis_extra, &namespaces());
    let (a, b) = (&nodes[0], &nodes[1]);
    let ch = "handover";
    let mut sub = b.client().await;
    sub.connect_ok("").await;
    sub.subscribe_ok(ch, json!({"recoverable": true})).await;
    let mut publisher = a.client().await;
    publisher.connect_ok("").await;
    let r = publisher.publish(ch, json!({"n": 0})).await;
    assert_eq!(r["publish"], json!({}), "{r}");
    collect_pubs(&mut sub, 1).await;

    let r = redis_cmd(sentinels[0].port, &["SENTINEL", "FAILOVER", MASTER]);
    assert!(matches!(r, Ok(Resp::Simple(ref ok)) if ok == "OK"), "{r:?}");
    wait_until("the replica's promotion", Duration::from_secs(20), || {
        replica.role() == "master" && sentinels[0].primary_port(MASTER) == Some(replica.port)
    });
    wait_until("the old primary to follow", Duration::from_secs(20), || primary.role() == "slave");
    // Publishing works again, and lands on the new primary.
    let started = Instant::now();
    let mut acked = 0;
    let mut n = 1;
    while acked < 5 {
        assert!(started.elapsed() < Duration::from_secs(20), "publishing did not resume");
        let r = publisher.publish(ch, json!({"n": n})).await;
        n += 1;
        if r["publish"] == json!({}) {
            acked += 1;
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let on_new = redis_cmd(replica.port, &["EXISTS", "fanfare.s.{handover}"]).map(|r| r.int());
    assert_eq!(on_new.ok(), Some(1), "the stream is on the new primary");
    // The subscriber is told of the possible gap and resubscribes; the last
    // acknowledged publication reaches it live afterwards.
    let push =
        sub.recv_matching("unsubscribe push", |v| v["push"].get("unsubscribe").is_some()).await;
    assert_eq!(push["push"]["unsubscribe"]["code"], 2500, "{push}");
    sub.subscribe_ok(ch, json!({"recoverable": true})).await;
    let r = publisher.publish(ch, json!({"n": "last"})).await;
    assert_eq!(r["publish"], json!({}), "{r}");
    sub.recv_matching("the last publication", |v| v["push"]["pub"]["data"]["n"] == "last").await;
    for n in &nodes {
        assert_healthy(n).await;
        // How the node noticed (for whoever reads the output): the sentinel
        // check, or the demoted primary closing our connections.
        for l in n.log().lines().filter(|l| l.contains("sentinel names") || l.contains("lost;")) {
            eprintln!("node :{}: {l}", n.port);
        }
    }
}
