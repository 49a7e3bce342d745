//! Closes the node decides on its own: stale connections, missing pongs,
//! shutdown and slow consumers.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Bystander, Client, Server, assert_healthy, assert_survived, metric};
use serde_json::json;

#[tokio::test]
async fn close_3502_stale_without_connect() {
    let server = Server::start(
        r#"
[client]
connect_timeout = "1s"

[[namespaces]]
name = ""
allow_publish = true
"#,
    );
    let mut bystander = Bystander::join(&server).await;
    let start = Instant::now();
    let mut c = server.client().await;
    let (code, reason) = c.expect_close().await;
    let took = start.elapsed();
    assert_eq!((code, reason.as_str()), (3502, "stale"));
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "closed after {took:?}, connect_timeout is 1s"
    );
    // A client that connects in time is not affected by the timeout.
    let mut ok = server.client().await;
    ok.connect_ok("").await;
    ok.subscribe_ok("x", json!({})).await;
    ok.assert_silent(Duration::from_millis(1500)).await;
    assert_survived(&server, &mut bystander).await;
}

#[tokio::test]
async fn close_3012_when_pings_go_unanswered() {
    let server = Server::start(
        r#"
[client]
ping_interval = "2s"
pong_timeout = "1s"

[[namespaces]]
name = ""
allow_publish = true
"#,
    );
    let mut good = server.connected("good").await;
    good.subscribe_ok("both", json!({})).await;
    // The node's clock for the first ping starts at the upgrade: so does
    // ours, before it (a connect slow on a loaded machine must not count).
    let start = Instant::now();
    let mut bad = server.client().await;
    bad.auto_pong = false;
    bad.connect_ok("").await;
    // The good client keeps answering pings while the bad one ignores them.
    let ((closed, took), ()) = tokio::join!(
        async {
            let closed = bad.expect_close_within(Duration::from_secs(8)).await;
            (closed, start.elapsed())
        },
        good.idle(Duration::from_secs(4)),
    );
    assert_eq!((closed.0, closed.1.as_str()), (3012, "no pong"));
    // Closed at the first ping's pong deadline, before a second ping.
    assert_eq!(bad.pings, 1, "closed for no pong after {} pings", bad.pings);
    // First ping 1-2 s after the upgrade, then 1 s to answer: never before
    // 2 s. Nominally by 3 s (+ a 125 ms timer tick); the upper bound leaves
    // 2.5 s for a loaded machine and still catches a node that lets an
    // unanswered ping go (the next would come 2 s later).
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_millis(5500),
        "closed after {took:?}"
    );
    assert!(good.pings >= 1);
    let r = good.publish("both", json!({"alive": true})).await;
    assert_eq!(r["publish"], json!({}), "{r}");
    let push = good.recv_push().await;
    assert_eq!(push["push"]["pub"]["data"], json!({"alive": true}));
    assert_healthy(&server).await;
}

#[tokio::test]
async fn close_3001_on_sigterm_and_exit_0() {
    let mut server = Server::start(
        r#"
[[namespaces]]
name = ""
allow_publish = true
"#,
    );
    let mut a = server.connected("a").await;
    a.subscribe_ok("x", json!({})).await;
    let mut b = server.connected("b").await;
    let mut not_connected = server.client().await;
    server.send_sigterm();
    assert_eq!(a.expect_close().await, (3001, "shutdown".to_string()));
    assert_eq!(b.expect_close().await, (3001, "shutdown".to_string()));
    assert_eq!(not_connected.expect_close().await, (3001, "shutdown".to_string()));
    let status = server.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit status after SIGTERM: {status}");
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_3008_slow_consumer_does_not_slow_others() {
    let server = Server::start(
        r#"
[client]
queue_max_size = 65536

[websocket]
write_timeout = "30s"

# One publisher as fast as the node answers, not a test of the command limits.
[limits]
client_commands = 0
user_commands = 0

[[namespaces]]
name = ""
allow_publish = true
"#,
    );
    const SLOW_METRIC: &str = "fanfare_slow_consumer_disconnects_total";
    assert_eq!(metric(server.port, SLOW_METRIC), 0.0);

    // The slow client subscribes and then stops reading; a small receive buffer
    // makes the backpressure reach the node sooner.
    let mut slow = Client::open_small_rcvbuf(server.port, 4096).await;
    slow.connect_ok("").await;
    slow.subscribe_ok("firehose", json!({})).await;

    let mut fast = server.connected("fast").await;
    fast.subscribe_ok("firehose", json!({})).await;
    let received = Arc::new(AtomicU64::new(0));
    let progress = received.clone();
    let fast_task = tokio::spawn(async move {
        let mut next = 0u64;
        loop {
            let push = fast.recv_push().await;
            let data = &push["push"]["pub"]["data"];
            if data["end"] == true {
                return (next, fast);
            }
            assert_eq!(data["seq"], next, "fast subscriber: out of order or lost");
            next += 1;
            progress.store(next, Ordering::Release);
        }
    });

    let mut publisher = server.connected("pub").await;
    let pad = "x".repeat(1000);
    const WINDOW: u64 = 16;
    const MAX_BYTES: usize = 50 << 20;
    let mut sent = 0u64;
    let mut bytes = 0usize;
    let mut slow_detected = false;
    let mut next_check = 0usize;
    let start = Instant::now();
    while bytes < MAX_BYTES {
        // Keep the fast subscriber within a bounded distance: its queue must
        // never overflow, however the machine schedules us. At most 24 + 16
        // pushes of ~1.2 KB are unread: under the 64 KiB queue even when the
        // socket buffers hold nothing (256 overflowed once on a loaded run).
        let wait_start = Instant::now();
        while sent - received.load(Ordering::Acquire) > 24 {
            assert!(
                wait_start.elapsed() < Duration::from_secs(10),
                "fast subscriber stalled at {} of {sent}",
                received.load(Ordering::Acquire)
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mut frame = String::new();
        let first = publisher.next_id();
        for i in 0..WINDOW {
            let id = if i == 0 { first } else { publisher.next_id() };
            let cmd = json!({"id": id, "publish": {"channel": "firehose", "data": {"seq": sent + i, "pad": pad}}});
            frame.push_str(&cmd.to_string());
            frame.push('\n');
        }
        bytes += frame.len();
        publisher.send_text(&frame).await;
        for id in first..first + WINDOW as u32 {
            let r = publisher.reply(id).await;
            assert_eq!(r["publish"], json!({}), "{r}");
        }
        sent += WINDOW;
        if bytes >= next_check {
            next_check += 256 << 10;
            if metric(server.port, SLOW_METRIC) >= 1.0 {
                slow_detected = true;
                break;
            }
        }
    }
    assert!(
        slow_detected,
        "the node never closed the slow consumer after {sent} publications ({bytes} bytes)"
    );
    eprintln!(
        "slow consumer detected after {sent} publications ({bytes} bytes) in {:?}",
        start.elapsed()
    );

    // The fast subscriber got everything, in order.
    publisher.publish("firehose", json!({"end": true})).await;
    let (got, _fast) = tokio::time::timeout(Duration::from_secs(20), fast_task)
        .await
        .expect("fast subscriber finished")
        .expect("fast subscriber task");
    assert_eq!(got, sent, "fast subscriber lost publications");

    // The slow one, reading again, finds the 3008 close after what was in flight.
    let (code, reason) = slow.expect_close_within(Duration::from_secs(20)).await;
    assert_eq!((code, reason.as_str()), (3008, "slow"));
    // Both counters count the same close, once.
    assert_eq!(metric(server.port, SLOW_METRIC), 1.0);
    assert_eq!(metric(server.port, r#"fanfare_disconnects_total{reason="slow"}"#), 1.0);
    assert_healthy(&server).await;
}

#[tokio::test]
async fn tokens_expire_unless_refreshed() {
    use common::{SECRET, sign, unix_now, user_token};
    let server = Server::start(&format!(
        r#"
[auth]
hmac_secret = "{SECRET}"

[[namespaces]]
name = "priv"
private = true
allow_publish = true
"#
    ));
    let short = |user: &str| sign(SECRET, &json!({"sub": user, "exp": unix_now() + 2}));

    // Not refreshed: 3005 once the connection token expires. `exp` is in
    // whole seconds (now + 2 s truncated: 1-2 s after signing) and the
    // node's timer fires up to one tick (1 s with this config) late: the
    // close comes 1-3 s after signing, never before 1 s. The upper bound
    // leaves 2 s for a loaded machine.
    let start = Instant::now();
    let mut lazy = server.client().await;
    let reply = lazy.connect_ok(&short("1")).await;
    assert_eq!(reply["expires"], true, "{reply}");
    assert!(reply["ttl"].as_u64().is_some_and(|t| t <= 2), "{reply}");
    let closed = lazy.expect_close_within(Duration::from_secs(7)).await;
    assert_eq!((closed.0, closed.1.as_str()), (3005, "connection expired"));
    let took = start.elapsed();
    assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(5), "{took:?}");

    // Refreshed in time: stays connected.
    let mut diligent = server.client().await;
    diligent.connect_ok(&short("2")).await;
    let r = diligent.command(json!({"refresh": {"token": user_token("2")}})).await;
    assert_eq!(r["refresh"]["expires"], true, "{r}");
    assert!(r["refresh"]["ttl"].as_u64().is_some_and(|t| t > 100), "{r}");
    assert_eq!(r["refresh"]["client"], diligent.client_id.as_str(), "{r}");

    // Subscription tokens for a private channel.
    let sub_token = |user: &str, channel: &str, ttl: u64| {
        sign(SECRET, &json!({"sub": user, "channel": channel, "exp": unix_now() + ttl}))
    };
    let r = diligent.subscribe("priv:a", json!({"token": sub_token("2", "priv:b", 60)})).await;
    common::assert_error(&r, 103);
    let r = diligent.subscribe("priv:a", json!({"token": sub_token("3", "priv:a", 60)})).await;
    common::assert_error(&r, 103);
    let expired = sign(SECRET, &json!({"sub": "2", "channel": "priv:a", "exp": unix_now() - 10}));
    let r = diligent.subscribe("priv:a", json!({"token": expired})).await;
    common::assert_error(&r, 109);
    let sub = diligent.subscribe_ok("priv:a", json!({"token": sub_token("2", "priv:a", 60)})).await;
    assert_eq!(sub["expires"], true, "{sub}");
    // A short subscription token that is not refreshed: unsubscribe push 2501.
    diligent.subscribe_ok("priv:short", json!({"token": sub_token("2", "priv:short", 2)})).await;
    let push = diligent
        .recv_matching("unsubscribe push", |v| v["push"].get("unsubscribe").is_some())
        .await;
    assert_eq!(push["push"]["channel"], "priv:short", "{push}");
    assert_eq!(push["push"]["unsubscribe"]["code"], 2501, "{push}");
    // The connection and the other subscription outlived both short tokens.
    assert!(start.elapsed() >= Duration::from_secs(2));
    let r = diligent.publish("priv:a", json!({"still": 1})).await;
    assert_eq!(r["publish"], json!({}), "{r}");
    let push = diligent.recv_push().await;
    assert_eq!(push["push"]["channel"], "priv:a", "{push}");

    // A refresh for another user is an invalid token.
    let id = diligent.next_id();
    diligent
        .send_text(&format!(
            r#"{{"id":{id},"refresh":{{"token":"{}"}}}}"#,
            user_token("someone-else")
        ))
        .await;
    assert_eq!(diligent.expect_close().await, (3500, "invalid token".to_string()));
    assert_healthy(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_timeout_drops_a_client_that_stopped_reading_while_its_channel_keeps_flowing() {
    // A queue big enough never to overflow: only websocket.write_timeout can
    // end the stuck connection.
    let server = Server::start(
        r#"
[client]
queue_max_size = 67108864

[websocket]
write_timeout = "1s"

[[namespaces]]
name = ""
allow_publish = true
"#,
    );
    const TOTAL: u64 = 4000;
    let mut stuck = Client::open_small_rcvbuf(server.port, 4096).await;
    stuck.connect_ok("").await;
    stuck.subscribe_ok("f", json!({})).await;
    // A subscriber of the same channel that keeps reading.
    let mut reader = server.connected("reader").await;
    reader.subscribe_ok("f", json!({})).await;
    let reading = tokio::spawn(async move {
        for next in 0..TOTAL {
            let push = reader.recv_push().await;
            assert_eq!(push["push"]["pub"]["data"]["seq"], next, "reader: lost or out of order");
        }
        reader
    });
    let mut bystander = Bystander::join(&server).await;
    let mut publisher = server.connected("p").await;
    let open = metric(server.port, "fanfare_connections");
    assert_eq!(open, 4.0, "stuck, reader, bystander, publisher");
    let pad = "x".repeat(1000);
    // Enough to fill the socket buffers (a few MB on loopback).
    for w in 0..TOTAL / 10 {
        let mut frame = String::new();
        let first = publisher.next_id();
        for i in 0..10 {
            let id = if i == 0 { first } else { publisher.next_id() };
            let cmd = json!({"id": id, "publish": {"channel": "f", "data": {"seq": w * 10 + i, "pad": pad}}});
            frame.push_str(&cmd.to_string());
            frame.push('\n');
        }
        publisher.send_text(&frame).await;
        for id in first..first + 10 {
            publisher.reply(id).await;
        }
    }
    // By now the stuck write has begun. It is given up after write_timeout,
    // and the goodbye after it gets as long again: 2 s, plus a margin for a
    // loaded machine.
    let published = Instant::now();
    while metric(server.port, "fanfare_connections") != open - 1.0 {
        assert!(
            published.elapsed() < Duration::from_secs(8),
            "the stuck client was not dropped within 8 s of the last publication"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The other subscriber got every publication, in order.
    let reader = tokio::time::timeout(Duration::from_secs(30), reading)
        .await
        .expect("the reader did not get all publications within 30 s")
        .expect("reader task");
    // Reading again, the client gets what was in flight and then finds the
    // connection gone. (The node cannot send a close frame into a socket it
    // could not write to, so there may be no 3008 frame.)
    let mut n = 0;
    let end = loop {
        match stuck.try_recv_json(Duration::from_secs(5)).await {
            Ok(_) => n += 1,
            Err(end) => break end,
        }
    };
    assert!(n < TOTAL, "all {n} publications arrived: the client was never dropped");
    match end {
        common::ReadEnd::Closed(3008, _) | common::ReadEnd::Broken(_) => {}
        other => panic!("expected the connection to be dropped, got {other:?} after {n}"),
    }
    // One slow close, counted once by both series (the write timed out, and
    // so did the goodbye after it: that used to count twice).
    assert_eq!(metric(server.port, "fanfare_slow_consumer_disconnects_total"), 1.0);
    assert_eq!(metric(server.port, r#"fanfare_disconnects_total{reason="slow"}"#), 1.0);
    assert_survived(&server, &mut bystander).await;
    drop(reader);
}
