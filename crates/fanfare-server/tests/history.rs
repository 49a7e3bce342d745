//! History and recovery of missed publications after a reconnect.

mod common;

use std::time::Duration;

use common::{Server, assert_error, assert_healthy};
use serde_json::{Value, json};

const HISTORY_NS: &str = r#"
[[namespaces]]
name = "h"
allow_publish = true
history_size = 100
history_ttl = "60s"

[[namespaces]]
name = "plain"
allow_publish = true
"#;

/// `(offset, data.n)` of each publication in a reply's `publications`.
fn offsets_and_n(pubs: &Value) -> Vec<(u64, u64)> {
    pubs.as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    (
                        p["offset"].as_u64().expect("publication offset"),
                        p["data"]["n"].as_u64().expect("publication data.n"),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn recovery_after_reconnect_and_history_queries() {
    let server = Server::start(HISTORY_NS);
    let ch = "h:room";
    let mut publisher = server.connected("pub").await;
    for n in 1..=2 {
        let r = publisher.publish(ch, json!({"n": n})).await;
        assert_eq!(r["publish"], json!({}), "{r}");
    }

    // A recoverable subscription tells the stream position.
    let mut a = server.connected("a").await;
    let sub = a.subscribe_ok(ch, json!({"recoverable": true})).await;
    assert_eq!(sub["recoverable"], true, "{sub}");
    let epoch = sub["epoch"].as_str().expect("epoch").to_string();
    assert!(!epoch.is_empty());
    assert_eq!(sub["offset"], 2, "{sub}");
    // Live publications carry increasing offsets.
    publisher.publish(ch, json!({"n": 3})).await;
    let push = a.recv_push().await;
    assert_eq!(push["push"]["pub"]["offset"], 3, "{push}");
    assert_eq!(push["push"]["pub"]["data"]["n"], 3, "{push}");
    let last_seen = 3;
    a.close().await;

    // While away, three more publications.
    for n in 4..=6 {
        publisher.publish(ch, json!({"n": n})).await;
    }

    // Reconnect and recover from the last offset seen.
    let mut a = server.connected("a").await;
    let sub = a
        .subscribe_ok(
            ch,
            json!({"recoverable": true, "recover": true, "epoch": epoch, "offset": last_seen}),
        )
        .await;
    assert_eq!(sub["recovered"], true, "{sub}");
    assert_eq!(sub["was_recovering"], true, "{sub}");
    assert_eq!(sub["epoch"], epoch.as_str(), "{sub}");
    assert_eq!(sub["offset"], 6, "{sub}");
    assert_eq!(offsets_and_n(&sub["publications"]), vec![(4, 4), (5, 5), (6, 6)], "{sub}");
    // Then live again, without duplicates.
    publisher.publish(ch, json!({"n": 7})).await;
    let push = a.recv_push().await;
    assert_eq!(push["push"]["pub"]["offset"], 7, "{push}");
    a.assert_silent(Duration::from_millis(200)).await;

    // Recovering with an unknown epoch: not recovered, nothing replayed, the
    // current position is reported.
    let mut b = server.connected("b").await;
    let sub = b
        .subscribe_ok(
            ch,
            json!({"recoverable": true, "recover": true, "epoch": "not-the-epoch", "offset": 3}),
        )
        .await;
    assert!(sub.get("recovered").is_none() || sub["recovered"] == false, "{sub}");
    assert_eq!(sub["was_recovering"], true, "{sub}");
    assert!(sub.get("publications").is_none(), "{sub}");
    assert_eq!(sub["epoch"], epoch.as_str(), "{sub}");
    assert_eq!(sub["offset"], 7, "{sub}");

    // An offset from the future cannot be recovered either.
    let mut c = server.connected("c").await;
    let sub = c.subscribe_ok(ch, json!({"recover": true, "epoch": epoch, "offset": 1000})).await;
    assert!(sub.get("recovered").is_none(), "{sub}");
    assert!(sub.get("publications").is_none(), "{sub}");

    // History: limit from the oldest, reverse from the newest, since an offset.
    let h = a.history(ch, json!({"limit": 2})).await;
    assert_eq!(offsets_and_n(&h["history"]["publications"]), vec![(1, 1), (2, 2)], "{h}");
    assert_eq!(h["history"]["epoch"], epoch.as_str(), "{h}");
    assert_eq!(h["history"]["offset"], 7, "{h}");

    let h = a.history(ch, json!({"limit": 3, "reverse": true})).await;
    assert_eq!(offsets_and_n(&h["history"]["publications"]), vec![(7, 7), (6, 6), (5, 5)], "{h}");

    let h = a.history(ch, json!({"limit": 2, "since": {"offset": 3, "epoch": epoch}})).await;
    assert_eq!(offsets_and_n(&h["history"]["publications"]), vec![(4, 4), (5, 5)], "{h}");

    let h = a.history(ch, json!({"limit": -1, "since": {"offset": 5, "epoch": epoch}})).await;
    assert_eq!(offsets_and_n(&h["history"]["publications"]), vec![(6, 6), (7, 7)], "{h}");

    let h = a.history(ch, json!({"limit": -1})).await;
    assert_eq!(offsets_and_n(&h["history"]["publications"]).len(), 7, "{h}");

    // limit 0: only the stream position.
    let h = a.history(ch, json!({})).await;
    assert!(h["history"].get("publications").is_none(), "{h}");
    assert_eq!(h["history"]["offset"], 7, "{h}");

    // `since` in another epoch: unrecoverable position.
    let h = a.history(ch, json!({"limit": 10, "since": {"offset": 1, "epoch": "other"}})).await;
    assert_error(&h, 112);

    // History of a namespace without history: not available.
    let mut d = server.connected("d").await;
    d.subscribe_ok("plain:x", json!({})).await;
    let h = d.history("plain:x", json!({"limit": 1})).await;
    assert_error(&h, 108);
    // History of a channel not subscribed to: permission denied.
    let h = d.history(ch, json!({"limit": 1})).await;
    assert_error(&h, 103);
    assert_healthy(&server).await;
}

#[tokio::test]
async fn history_keeps_only_history_size() {
    let server = Server::start(
        r#"
[[namespaces]]
name = "small"
allow_publish = true
history_size = 3
history_ttl = "60s"
"#,
    );
    let ch = "small:x";
    let mut a = server.connected("a").await;
    let sub = a.subscribe_ok(ch, json!({"recoverable": true})).await;
    let epoch = sub["epoch"].as_str().expect("epoch").to_string();
    let mut p = server.connected("p").await;
    for n in 1..=5 {
        p.publish(ch, json!({"n": n})).await;
    }
    let h = a.history(ch, json!({"limit": -1})).await;
    assert_eq!(offsets_and_n(&h["history"]["publications"]), vec![(3, 3), (4, 4), (5, 5)], "{h}");
    // Recovering from offset 1 needs 2, which is gone: not recovered, no
    // partial replay presented as complete.
    let mut b = server.connected("b").await;
    let sub = b.subscribe_ok(ch, json!({"recover": true, "epoch": epoch, "offset": 1})).await;
    assert!(sub.get("recovered").is_none(), "{sub}");
    assert!(sub.get("publications").is_none(), "{sub}");
    assert_eq!(sub["offset"], 5, "{sub}");
    // From offset 2 everything is still there.
    let mut c = server.connected("c").await;
    let sub = c.subscribe_ok(ch, json!({"recover": true, "epoch": epoch, "offset": 2})).await;
    assert_eq!(sub["recovered"], true, "{sub}");
    assert_eq!(offsets_and_n(&sub["publications"]), vec![(3, 3), (4, 4), (5, 5)], "{sub}");
}

#[tokio::test]
async fn recovery_and_history_replies_are_bounded_by_count() {
    let server = Server::start(
        r#"
[client]
recovery_max_publication_limit = 3
history_max_publication_limit = 4

[[namespaces]]
name = "h"
allow_publish = true
history_size = 100
history_ttl = "60s"
"#,
    );
    let ch = "h:bounded";
    let mut a = server.connected("a").await;
    let sub = a.subscribe_ok(ch, json!({"recoverable": true})).await;
    let epoch = sub["epoch"].as_str().expect("epoch").to_string();
    for n in 1..=6 {
        a.publish(ch, json!({ "n": n })).await;
    }
    // Four missed is more than the limit of three: start over, no partial list.
    let mut b = server.connected("b").await;
    let sub = b.subscribe_ok(ch, json!({"recover": true, "epoch": epoch, "offset": 2})).await;
    assert!(sub.get("recovered").is_none(), "{sub}");
    assert!(sub.get("publications").is_none(), "{sub}");
    assert_eq!(sub["was_recovering"], true, "{sub}");
    assert_eq!(sub["offset"], 6, "{sub}");
    // Exactly the limit is recovered.
    let mut c = server.connected("c").await;
    let sub = c.subscribe_ok(ch, json!({"recover": true, "epoch": epoch, "offset": 3})).await;
    assert_eq!(sub["recovered"], true, "{sub}");
    assert_eq!(offsets_and_n(&sub["publications"]), vec![(4, 4), (5, 5), (6, 6)], "{sub}");
    // History: "everything" and a larger limit both stop at four.
    for limit in [-1, 10] {
        let h = c.history(ch, json!({ "limit": limit })).await;
        let got = offsets_and_n(&h["history"]["publications"]);
        assert_eq!(got, vec![(1, 1), (2, 2), (3, 3), (4, 4)], "limit {limit}: {h}");
        assert_eq!(h["history"]["offset"], 6, "{h}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribing_while_publishing_has_no_gaps_or_duplicates() {
    let server = Server::start(
        r#"
[client]
# Recovering thousands of publications in one reply is what this test races.
recovery_max_publication_limit = 100000
queue_max_size = 16777216

[[namespaces]]
name = "h"
allow_publish = true
history_size = 100000
history_ttl = "60s"
"#,
    );
    const CH: &str = "h:race";
    const N: u64 = 4000;
    let mut first = server.connected("first").await;
    let sub = first.subscribe_ok(CH, json!({"recoverable": true})).await;
    let epoch = sub["epoch"].as_str().expect("epoch").to_string();
    first.close().await;

    let mut publisher = server.connected("pub").await;
    let publishing = tokio::spawn(async move {
        let mut n = 0;
        while n < N {
            let mut frame = String::new();
            let first = publisher.next_id();
            for i in 0..10 {
                let id = if i == 0 { first } else { publisher.next_id() };
                n += 1;
                frame.push_str(
                    &json!({"id": id, "publish": {"channel": CH, "data": {"n": n}}}).to_string(),
                );
                frame.push('\n');
            }
            publisher.send_text(&frame).await;
            for id in first..first + 10 {
                let r = publisher.reply(id).await;
                assert_eq!(r["publish"], json!({}), "{r}");
            }
        }
    });

    // Subscribers join at different moments, some recovering from an earlier
    // offset, some just positioned; each must then see every offset exactly
    // once, in order, across the subscribe reply and the live pushes.
    let mut checkers = Vec::new();
    for i in 0..12u64 {
        tokio::time::sleep(Duration::from_millis(40)).await;
        let mut c = server.connected(&format!("r{i}")).await;
        let from = i * 200;
        let req = if i % 3 == 2 {
            json!({"recoverable": true})
        } else {
            json!({"recover": true, "epoch": epoch, "offset": from})
        };
        checkers.push(tokio::spawn(async move {
            let sub = c.subscribe_ok(CH, req.clone()).await;
            let top = sub["offset"].as_u64().unwrap_or(0);
            if sub["recovered"] == true {
                let got: Vec<u64> = offsets_and_n(&sub["publications"])
                    .into_iter()
                    .map(|(o, n)| {
                        assert_eq!(o, n, "offset and data disagree");
                        o
                    })
                    .collect();
                let want: Vec<u64> = (from + 1..=top).collect();
                assert_eq!(got, want, "recovered publications for {req}");
            } else {
                assert!(req.get("recover").is_none() || from > top, "{req} -> {sub}");
            }
            let mut expect = top + 1;
            while expect <= N {
                let push = c.recv_push().await;
                assert_eq!(
                    push["push"]["pub"]["offset"], expect,
                    "gap or duplicate after subscribing at {top} with {req}"
                );
                expect += 1;
            }
            c.assert_silent(Duration::from_millis(100)).await;
            top
        }));
    }
    publishing.await.expect("publisher");
    let mut mid_stream = 0;
    for c in checkers {
        let top = c.await.expect("checker");
        if top > 0 && top < N {
            mid_stream += 1;
        }
    }
    assert!(
        mid_stream >= 3,
        "only {mid_stream} subscribers joined while publishing; the test proves little"
    );
}

#[tokio::test]
async fn history_ttl_expires_publications() {
    let server = Server::start(
        r#"
[[namespaces]]
name = "t"
allow_publish = true
history_size = 10
history_ttl = "1s"
"#,
    );
    let ch = "t:x";
    let mut a = server.connected("a").await;
    let sub = a.subscribe_ok(ch, json!({"recoverable": true})).await;
    let epoch = sub["epoch"].as_str().expect("epoch").to_string();
    for n in 1..=2 {
        a.publish(ch, json!({"n": n})).await;
    }
    let h = a.history(ch, json!({"limit": -1})).await;
    assert_eq!(offsets_and_n(&h["history"]["publications"]).len(), 2, "{h}");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let h = a.history(ch, json!({"limit": -1})).await;
    assert!(h["history"].get("publications").is_none(), "{h}");
    // The position survives the publications.
    assert_eq!(h["history"]["offset"], 2, "{h}");
    assert_eq!(h["history"]["epoch"], epoch.as_str(), "{h}");
    // Missed publications that expired cannot be recovered...
    let mut b = server.connected("b").await;
    let sub = b.subscribe_ok(ch, json!({"recover": true, "epoch": epoch, "offset": 0})).await;
    assert!(sub.get("recovered").is_none(), "{sub}");
    // ...but a client that missed nothing recovers fine.
    let mut c = server.connected("c").await;
    let sub = c.subscribe_ok(ch, json!({"recover": true, "epoch": epoch, "offset": 2})).await;
    assert_eq!(sub["recovered"], true, "{sub}");
    assert!(sub.get("publications").is_none(), "{sub}");
}

#[tokio::test]
async fn history_since_beyond_the_top_is_empty_with_the_current_position() {
    let server = Server::start(HISTORY_NS);
    common::assert_history_past_the_top_is_empty(&server, "h:ahead").await;
}
