//! Several fanfare nodes sharing one real `redis-server`: cross-node delivery,
//! presence and join/leave, history and recovery across nodes, and what clients
//! and `/ready` see when Redis dies and comes back.

mod common;

use std::time::{Duration, Instant};

use common::redis::{RedisServer, Seen, collect_pubs, publish_pipelined, start_nodes};
use common::{Server, assert_error, assert_healthy, http_get};
use serde_json::{Value, json};

/// [`common::open_namespaces`] with history, and `room:` with presence.
fn namespaces() -> String {
    let room = r#"
[[namespaces]]
name = "room"
allow_publish = true
presence = true
join_leave = true
"#;
    format!("{}{room}", common::open_namespaces(Some(1000)))
}

/// Polls `/ready` of `node` until it answers `status` (bounded by `within`).
fn wait_ready_status(node: &Server, status: u16, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let got = http_get(node.port, "/ready").map(|(s, _)| s).unwrap_or(0);
        if got == status {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "/ready on :{} did not answer {status} within {within:?} (last {got})",
            node.port
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn three_nodes_deliver_every_publication_once_in_order() {
    let redis = RedisServer::start();
    let nodes = start_nodes(3, &[redis.url()], false, &namespaces());
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let ch = "feed";

    // Subscribers on every node (two on B), publishers on A and B.
    let mut subs = Vec::new();
    for (node, name) in [(b, "b1"), (b, "b2"), (c, "c1"), (a, "a1")] {
        let mut s = node.connected(name).await;
        let r = s.subscribe_ok(ch, json!({"recoverable": true})).await;
        assert_eq!(r["offset"].as_u64().unwrap_or(0), 0, "fresh stream: {r}");
        subs.push((name, s));
    }
    // One Redis subscription per node, however many local subscribers it has.
    let numsub = redis.cmd(&["PUBSUB", "NUMSUB", "fanfare.c.{feed}"]);
    assert_eq!(numsub.texts().get(1).map(String::as_str), Some("3"), "{numsub:?}");

    let mut pub_a = a.connected("pa").await;
    let mut pub_b = b.connected("pb").await;
    let items = |who: &str| -> Vec<(String, Value)> {
        (1..=250).map(|seq| (ch.to_string(), json!({"from": who, "seq": seq}))).collect()
    };
    let (from_a, from_b) = (items("a"), items("b"));
    tokio::join!(
        publish_pipelined(&mut pub_a, &from_a, 25),
        publish_pipelined(&mut pub_b, &from_b, 25),
    );

    let mut first: Option<Vec<Seen>> = None;
    for (name, s) in &mut subs {
        let seen = collect_pubs(s, 500).await;
        // Offsets 1..500 without gap or repeat: every publication exactly once,
        // in the stream's order.
        let offsets: Vec<u64> = seen.iter().map(|p| p.offset).collect();
        assert_eq!(offsets, (1..=500).collect::<Vec<u64>>(), "{name}: offsets");
        for who in ["a", "b"] {
            let seqs: Vec<u64> = seen
                .iter()
                .filter(|p| p.data["from"] == who)
                .map(|p| p.data["seq"].as_u64().expect("seq"))
                .collect();
            assert_eq!(seqs, (1..=250).collect::<Vec<u64>>(), "{name}: publisher {who}'s order");
        }
        // Every node delivers the same total order.
        match &first {
            None => first = Some(seen),
            Some(f) => assert!(*f == seen, "{name} saw another order than the first subscriber"),
        }
    }
    for (_, s) in &mut subs {
        s.assert_silent(Duration::from_millis(300)).await;
    }
    for n in &nodes {
        assert_healthy(n).await;
    }
}

/// The next push of `client` as `"join:<user>"`, `"leave:<user>"` or `"pub"`.
async fn next_event(client: &mut common::Client) -> String {
    let v = client.recv_push().await;
    let push = &v["push"];
    if let Some(j) = push.get("join") {
        format!("join:{}", j["info"]["user"].as_str().unwrap_or("?"))
    } else if let Some(l) = push.get("leave") {
        format!("leave:{}", l["info"]["user"].as_str().unwrap_or("?"))
    } else {
        format!("other:{v}")
    }
}

#[tokio::test]
async fn presence_and_join_leave_cross_nodes() {
    let redis = RedisServer::start();
    let nodes = start_nodes(3, &[redis.url()], false, &namespaces());
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let ch = "room:lobby";

    // x on A, y on B, z on C join one after the other; everyone already in the
    // room sees each join (its own included) exactly once, in order.
    let mut x = a.connected("x").await;
    x.subscribe_ok(ch, json!({})).await;
    assert_eq!(next_event(&mut x).await, "join:x");
    let mut y = b.connected("y").await;
    y.subscribe_ok(ch, json!({})).await;
    assert_eq!(next_event(&mut y).await, "join:y");
    assert_eq!(next_event(&mut x).await, "join:y", "x (node A) sees y join on node B");
    let mut z = c.connected("z").await;
    z.subscribe_ok(ch, json!({})).await;
    for (who, cl) in [("z", &mut z), ("x", &mut x), ("y", &mut y)] {
        assert_eq!(next_event(cl).await, "join:z", "{who} sees z join on node C");
    }

    // Presence read on any node lists the clients of every node.
    let p = z.presence(ch).await;
    let map = p["presence"]["presence"].as_object().unwrap_or_else(|| panic!("no presence: {p}"));
    assert_eq!(map.len(), 3, "{p}");
    for cl in [&x, &y, &z] {
        assert!(map.contains_key(&cl.client_id), "{} missing from presence: {p}", cl.client_id);
    }
    assert_eq!(map[&x.client_id]["user"], "x", "{p}");
    assert_eq!(map[&y.client_id]["client"], y.client_id.as_str(), "{p}");
    let s = x.presence_stats(ch).await;
    assert_eq!(s["presence_stats"], json!({"num_clients": 3, "num_users": 3}), "{s}");

    // y (node B) disconnects: x (A) and z (C) are told once, presence shrinks.
    let y_id = y.client_id.clone();
    y.close().await;
    for cl in [&mut x, &mut z] {
        let v = cl.recv_push().await;
        assert_eq!(v["push"]["leave"]["info"]["client"], y_id.as_str(), "{v}");
        assert_eq!(v["push"]["leave"]["info"]["user"], "y", "{v}");
    }
    let s = x.presence_stats(ch).await;
    assert_eq!(s["presence_stats"], json!({"num_clients": 2, "num_users": 2}), "{s}");
    let p = z.presence(ch).await;
    assert!(!p["presence"]["presence"].as_object().expect("map").contains_key(&y_id), "{p}");
    // Nothing more: no duplicated join/leave through the other nodes.
    x.assert_silent(Duration::from_millis(300)).await;
    z.assert_silent(Duration::from_millis(300)).await;
}

/// Presence entries in Redis expire after `client.presence_ttl` unless the
/// owning node writes them again: a client that stays longer stays listed.
#[tokio::test]
async fn presence_outlives_its_ttl_while_the_client_stays() {
    let redis = RedisServer::start();
    let extra = format!("[client]\npresence_ttl = \"2s\"\n{}", namespaces());
    let nodes = start_nodes(2, &[redis.url()], false, &extra);
    let ch = "room:long";
    let mut x = nodes[0].connected("x").await;
    x.subscribe_ok(ch, json!({})).await;
    let mut y = nodes[1].connected("y").await;
    y.subscribe_ok(ch, json!({})).await;
    // Three TTLs later both are still there, read from either node.
    tokio::time::sleep(Duration::from_secs(6)).await;
    for reader in [&mut x, &mut y] {
        let s = reader.presence_stats(ch).await;
        assert_eq!(s["presence_stats"], json!({"num_clients": 2, "num_users": 2}), "{s}");
    }
    // Gone once the client is gone: the node removes it on the close, not
    // at expiry. Asked again until then, for at most 1.2 s after the close
    // began: an entry whose removal was lost would still be listed, as it
    // expires at least 1.33 s after it (TTL 2 s less the 0.67 s refresh).
    let closing = Instant::now();
    y.close().await;
    let one = json!({"num_clients": 1, "num_users": 1});
    let s = x.presence_stats_until(ch, &one, closing + Duration::from_millis(1200)).await;
    assert_eq!(s["presence_stats"], one, "{s}");
}

#[tokio::test]
async fn history_and_recovery_cross_nodes() {
    let redis = RedisServer::start();
    let nodes = start_nodes(3, &[redis.url()], false, &namespaces());
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let ch = "news";

    let mut p = a.connected("publisher").await;
    let mut reader = b.connected("reader").await;
    let sub = reader.subscribe_ok(ch, json!({"recoverable": true})).await;
    let epoch = sub["epoch"].as_str().expect("epoch").to_string();
    assert!(!epoch.is_empty(), "{sub}");
    for n in 1..=3 {
        let r = p.publish(ch, json!({"n": n})).await;
        assert_eq!(r["publish"], json!({}), "{r}");
    }
    let seen = collect_pubs(&mut reader, 3).await;
    assert_eq!(seen.iter().map(|s| s.offset).collect::<Vec<_>>(), [1, 2, 3]);
    reader.close().await;

    // Published on A while the reader is away.
    for n in 4..=8 {
        p.publish(ch, json!({"n": n})).await;
    }

    // The reader comes back through another node (C) and recovers.
    let mut back = c.connected("reader").await;
    let sub = back
        .subscribe_ok(
            ch,
            json!({"recoverable": true, "recover": true, "epoch": epoch, "offset": 3}),
        )
        .await;
    assert_eq!(sub["recovered"], true, "{sub}");
    assert_eq!(sub["epoch"], epoch.as_str(), "the epoch is the stream's, not the node's: {sub}");
    assert_eq!(sub["offset"], 8, "{sub}");
    let recovered: Vec<(u64, u64)> = sub["publications"]
        .as_array()
        .expect("recovered publications")
        .iter()
        .map(|p| (p["offset"].as_u64().expect("offset"), p["data"]["n"].as_u64().expect("n")))
        .collect();
    assert_eq!(recovered, [(4, 4), (5, 5), (6, 6), (7, 7), (8, 8)], "{sub}");
    // Live again on C, no duplicate of a recovered one.
    p.publish(ch, json!({"n": 9})).await;
    let live = collect_pubs(&mut back, 1).await;
    assert_eq!((live[0].offset, live[0].data["n"].as_u64()), (9, Some(9)), "{live:?}");
    back.assert_silent(Duration::from_millis(200)).await;

    // History read on B covers what A published.
    let mut h_client = b.connected("h").await;
    h_client.subscribe_ok(ch, json!({})).await;
    let h = h_client.history(ch, json!({"limit": -1})).await;
    let ns: Vec<u64> = h["history"]["publications"]
        .as_array()
        .expect("history")
        .iter()
        .map(|p| p["data"]["n"].as_u64().expect("n"))
        .collect();
    assert_eq!(ns, (1..=9).collect::<Vec<u64>>(), "{h}");
    assert_eq!(h["history"]["epoch"], epoch.as_str(), "{h}");

    // A stale epoch cannot be recovered, on any node.
    let mut stale = a.connected("stale").await;
    let sub = stale.subscribe_ok(ch, json!({"recover": true, "epoch": "other", "offset": 3})).await;
    assert!(sub.get("recovered").is_none() || sub["recovered"] == false, "{sub}");
    assert!(sub.get("publications").is_none(), "{sub}");
}

/// Without persistence a Redis restart loses the stream: nodes go unready while
/// Redis is away, publishes fail with a temporary error, and afterwards every
/// subscriber is told to resubscribe (2500) and learns it could not recover.
#[tokio::test]
async fn redis_restart_without_persistence_is_never_a_silent_gap() {
    let mut redis = RedisServer::start();
    let nodes = start_nodes(2, &[redis.url()], false, &namespaces());
    let (a, b) = (&nodes[0], &nodes[1]);
    let ch = "ticker";

    // Anonymous clients: no server-side subscription, only their own.
    let mut p = a.client().await;
    p.connect_ok("").await;
    let mut s = b.client().await;
    s.connect_ok("").await;
    let sub = s.subscribe_ok(ch, json!({"recoverable": true})).await;
    let epoch = sub["epoch"].as_str().expect("epoch").to_string();
    // A user: the node subscribed it to its personal channel `#carol` at connect.
    let mut carol = b.connected("carol").await;
    for n in 1..=5 {
        p.publish(ch, json!({"n": n})).await;
    }
    assert_eq!(collect_pubs(&mut s, 5).await.last().map(|x| x.offset), Some(5));
    for n in &nodes {
        assert_eq!(http_get(n.port, "/ready").expect("/ready").0, 200);
    }

    redis.kill();
    for n in &nodes {
        wait_ready_status(n, 503, Duration::from_secs(5));
    }
    let r = p.publish(ch, json!({"n": 6})).await;
    assert_error(&r, 100);
    assert_eq!(r["error"]["temporary"], true, "a publisher should retry: {r}");
    redis.restart();
    for n in &nodes {
        wait_ready_status(n, 200, Duration::from_secs(10));
    }

    // A server-side subscription cannot be resubscribed by the SDK: the
    // connection is closed with 3010 (insufficient state) so the SDK reconnects.
    let (code, _) = carol.expect_close().await;
    assert_eq!(code, 3010, "server-side subscription after a gap");
    let mut carol = b.connected("carol").await;
    carol.subscribe_ok(ch, json!({})).await;

    // The subscriber is told its stream may have a gap ...
    let push =
        s.recv_matching("unsubscribe push", |v| v["push"].get("unsubscribe").is_some()).await;
    assert_eq!(push["push"]["channel"], ch, "{push}");
    assert_eq!(push["push"]["unsubscribe"]["code"], 2500, "{push}");
    // ... and recovering says what happened: the stream is a new one.
    let sub = s
        .subscribe_ok(
            ch,
            json!({"recoverable": true, "recover": true, "epoch": epoch, "offset": 5}),
        )
        .await;
    assert!(sub.get("recovered").is_none() || sub["recovered"] == false, "{sub}");
    assert_ne!(sub["epoch"], epoch.as_str(), "{sub}");
    // Delivery works again, cross-node.
    let r = p.publish(ch, json!({"n": 7})).await;
    assert_eq!(r["publish"], json!({}), "{r}");
    let live = collect_pubs(&mut s, 1).await;
    assert_eq!(live[0].data, json!({"n": 7}), "{live:?}");
    assert_eq!(live[0].offset, 1, "first publication of the new stream: {live:?}");
    assert_eq!(collect_pubs(&mut carol, 1).await[0].data, json!({"n": 7}));
    for n in &nodes {
        assert_healthy(n).await;
    }
}

/// Subscribing (with or without recovery) on one node while another node
/// publishes: each subscriber gets the publications after its position exactly
/// once. A publication can reach the node through pub/sub after the
/// subscriber's history read already returned it; it must not be delivered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribing_during_publishing_never_duplicates_an_offset() {
    const N: u64 = 600;
    let redis = RedisServer::start();
    let nodes = start_nodes(2, &[redis.url()], false, &namespaces());
    let (a, b) = (&nodes[0], &nodes[1]);
    let ch = "busy";

    let mut publisher = a.connected("publisher").await;
    let publishing = tokio::spawn(async move {
        for chunk in (1..=N).collect::<Vec<u64>>().chunks(5) {
            let items: Vec<(String, Value)> =
                chunk.iter().map(|n| (ch.to_string(), json!({"n": n}))).collect();
            publish_pipelined(&mut publisher, &items, 5).await;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        publisher
    });

    // While it publishes, subscribers join on B: fresh (positioned), or
    // recovering from a few publications before the previous one's position.
    struct Joined {
        client: common::Client,
        /// Position the subscriber starts after.
        from: u64,
        /// Offsets received so far (the recovered ones).
        seen: Vec<u64>,
        /// Stream position in the subscribe reply.
        at: u64,
    }
    let mut joined: Vec<Joined> = Vec::new();
    let mut epoch = String::new();
    for k in 0..24 {
        tokio::time::sleep(Duration::from_millis(40)).await;
        let mut client = b.connected(&format!("s{k}")).await;
        let recover_from = joined.last().filter(|_| k % 2 == 1).map(|j| j.at.saturating_sub(3));
        let req = match recover_from {
            Some(since) => {
                json!({"recoverable": true, "recover": true, "epoch": epoch, "offset": since})
            }
            None => json!({"recoverable": true}),
        };
        let sub = client.subscribe_ok(ch, req).await;
        epoch = sub["epoch"].as_str().expect("epoch").to_string();
        let at = sub["offset"].as_u64().unwrap_or(0);
        let mut seen = Vec::new();
        if recover_from.is_some() {
            assert_eq!(sub["recovered"], true, "{sub}");
            for p in sub["publications"].as_array().into_iter().flatten() {
                seen.push(p["offset"].as_u64().expect("offset"));
            }
        }
        joined.push(Joined { client, from: recover_from.unwrap_or(at), seen, at });
    }
    let publisher = publishing.await.expect("publisher task");

    for (k, mut j) in joined.into_iter().enumerate() {
        let missing = (N - j.from) as usize - j.seen.len();
        j.seen.extend(collect_pubs(&mut j.client, missing).await.iter().map(|p| p.offset));
        let expected: Vec<u64> = (j.from + 1..=N).collect();
        assert_eq!(j.seen, expected, "subscriber {k} from offset {}", j.from);
        j.client.assert_silent(Duration::from_millis(100)).await;
    }
    drop(publisher);
}

/// A client's publishes through Redis are pipelined (many wait for Redis at
/// once, more than the per-connection limit, so reading from the client pauses
/// too), yet Redis receives them in the client's order, every one is
/// acknowledged, and a command sent after them sees all of them.
#[tokio::test]
async fn pipelined_publishes_keep_client_order_and_later_commands_see_them() {
    let redis = RedisServer::start();
    let nodes = start_nodes(2, &[redis.url()], false, &namespaces());
    let ch = "pipe";
    let mut sub = nodes[1].connected("s").await;
    sub.subscribe_ok(ch, json!({"recoverable": true})).await;
    let mut p = nodes[0].connected("p").await;
    p.subscribe_ok(ch, json!({})).await;

    // One publish per frame, all written before any reply is read.
    const N: u64 = 600;
    let mut ids = Vec::new();
    for seq in 1..=N {
        let id = p.next_id();
        ids.push(id);
        p.send_json(&json!({"id": id, "publish": {"channel": ch, "data": {"seq": seq}}})).await;
    }
    let hid = p.next_id();
    p.send_json(&json!({"id": hid, "history": {"channel": ch, "limit": -1}})).await;

    let history = p.reply(hid).await;
    // The history reply sees every publish before it (its top is N) and
    // carries at most client.history_max_publication_limit (300) of them;
    // the rest is read from there on with `since`.
    assert_eq!(history["history"]["offset"], N, "{history}");
    let mut pubs = history["history"]["publications"].as_array().cloned().unwrap_or_default();
    assert_eq!(pubs.len(), 300);
    let epoch = history["history"]["epoch"].clone();
    let rest = p.history(ch, json!({"limit": -1, "since": {"offset": 300, "epoch": epoch}})).await;
    pubs.extend(rest["history"]["publications"].as_array().cloned().unwrap_or_default());
    let seqs: Vec<u64> = pubs.iter().map(|x| x["data"]["seq"].as_u64().unwrap_or(0)).collect();
    assert_eq!(seqs, (1..=N).collect::<Vec<u64>>(), "history after the publishes");
    for id in ids {
        let r = p.reply(id).await;
        assert_eq!(r["publish"], json!({}), "publish {id}: {r}");
    }
    let seen = collect_pubs(&mut sub, N as usize).await;
    let offsets: Vec<u64> = seen.iter().map(|x| x.offset).collect();
    assert_eq!(offsets, (1..=N).collect::<Vec<u64>>(), "offsets on the other node");
    let seqs: Vec<u64> = seen.iter().map(|x| x.data["seq"].as_u64().unwrap_or(0)).collect();
    assert_eq!(seqs, (1..=N).collect::<Vec<u64>>(), "the client's order on the other node");
    for n in &nodes {
        assert_healthy(n).await;
    }
}

#[tokio::test]
async fn history_since_beyond_the_top_is_empty_with_the_current_position() {
    let redis = RedisServer::start();
    let nodes = start_nodes(1, &[redis.url()], false, &namespaces());
    common::assert_history_past_the_top_is_empty(&nodes[0], "ahead").await;
}
