//! Namespace options SDK behaviour depends on (issue 14): forced recovery and
//! positioning, per-role permissions for publish, history and presence, and
//! RPC without a handler answering 108 as Centrifugo does.

mod common;

use common::{SECRET, Server, assert_error, run_cli};
use serde_json::json;

fn server() -> Server {
    Server::start(&format!(
        r#"
[auth]
hmac_secret = "{SECRET}"
allow_anonymous = true

[[namespaces]]
name = "forced"
allow_publish = true
history_size = 10
history_ttl = "60s"
force_recovery = true

[[namespaces]]
name = "pos"
history_size = 10
history_ttl = "60s"
force_positioning = true

[[namespaces]]
name = "subpub"
allow_publish_for_subscriber = true

[[namespaces]]
name = "open"
allow_publish = true
history_size = 10
history_ttl = "60s"
presence = true
allow_history_for_client = true
allow_presence_for_client = true

[[namespaces]]
name = "closed"
allow_publish = true
history_size = 10
history_ttl = "60s"
presence = true
allow_history_for_subscriber = false
allow_presence_for_subscriber = false

[[namespaces]]
name = "noanon"
allow_publish = true
history_size = 10
history_ttl = "60s"
presence = true
allow_history_for_anonymous = false
allow_presence_for_anonymous = false
"#
    ))
}

#[tokio::test]
async fn force_recovery_makes_a_plain_subscription_recoverable_and_it_recovers() {
    let server = server();
    let mut a = server.connected("a").await;
    // The client asks for nothing; the namespace makes it recoverable.
    let sub = a.subscribe_ok("forced:c", json!({})).await;
    assert_eq!(sub["recoverable"], true, "{sub}");
    assert_eq!(sub["positioned"], true, "{sub}");
    let epoch = sub["epoch"].as_str().expect("epoch in a forced-recovery reply").to_string();
    a.close().await;

    let mut p = server.connected("p").await;
    for n in 1..=3 {
        p.publish("forced:c", json!({ "n": n })).await;
    }
    // The SDK resubscribes with the position the first reply gave it.
    let mut a = server.connected("a").await;
    let sub =
        a.subscribe_ok("forced:c", json!({"recover": true, "epoch": epoch, "offset": 0})).await;
    assert_eq!(sub["recovered"], true, "{sub}");
    let got: Vec<u64> = sub["publications"]
        .as_array()
        .expect("publications")
        .iter()
        .map(|p| p["data"]["n"].as_u64().expect("n"))
        .collect();
    assert_eq!(got, vec![1, 2, 3]);
}

#[tokio::test]
async fn force_positioning_puts_the_stream_position_in_every_subscribe_reply() {
    let server = server();
    let mut a = server.connected("a").await;
    let sub = a.subscribe_ok("pos:c", json!({})).await;
    assert_eq!(sub["positioned"], true, "{sub}");
    assert!(sub["epoch"].as_str().is_some(), "{sub}");
    assert!(sub.get("recoverable").is_none(), "{sub}");
}

#[tokio::test]
async fn publish_for_subscriber_needs_a_subscription() {
    let server = server();
    let mut a = server.connected("a").await;
    assert_error(&a.publish("subpub:c", json!({"x": 1})).await, 103);
    a.subscribe_ok("subpub:c", json!({})).await;
    let r = a.publish("subpub:c", json!({"x": 2})).await;
    assert_eq!(r["publish"], json!({}), "{r}");
}

#[tokio::test]
async fn history_and_presence_follow_the_per_role_permissions() {
    let server = server();
    let mut user = server.connected("u").await;
    let mut anon = server.client().await;
    anon.connect_ok("").await;

    // "open": any client reads, subscribed or not, anonymous too.
    for c in [&mut user, &mut anon] {
        let h = c.history("open:c", json!({"limit": 0})).await;
        assert!(h.get("history").is_some(), "{h}");
        let p = c.presence("open:c").await;
        assert!(p.get("presence").is_some(), "{p}");
    }

    // "closed": not even subscribers.
    user.subscribe_ok("closed:c", json!({})).await;
    assert_error(&user.history("closed:c", json!({"limit": 0})).await, 103);
    assert_error(&user.presence("closed:c").await, 103);

    // "noanon": subscribers with a user id read, anonymous subscribers do not.
    user.subscribe_ok("noanon:c", json!({})).await;
    anon.subscribe_ok("noanon:c", json!({})).await;
    assert!(user.history("noanon:c", json!({"limit": 0})).await.get("history").is_some());
    assert!(user.presence("noanon:c").await.get("presence").is_some());
    assert_error(&anon.history("noanon:c", json!({"limit": 0})).await, 103);
    assert_error(&anon.presence("noanon:c").await, 103);
    assert_error(&anon.presence_stats("noanon:c").await, 103);

    // Defaults: a subscriber reads, a non-subscriber does not.
    assert_error(&user.history("forced:other", json!({"limit": 0})).await, 103);
}

#[tokio::test]
async fn rpc_without_a_handler_is_not_available_108() {
    let server = server();
    let mut a = server.connected("a").await;
    let r = a.command(json!({"rpc": {"method": "sum", "data": {"a": 1}}})).await;
    assert_error(&r, 108);
    // The connection stays usable.
    let r = a.command(json!({"ping": {}})).await;
    assert!(r.get("error").is_none(), "{r}");
}

#[test]
fn forced_recovery_without_history_is_refused_naming_the_option() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = dir.path().join("f.toml");
    std::fs::write(&cfg, "[[namespaces]]\nname = \"x\"\nforce_recovery = true\n").expect("write");
    let (status, _, err) =
        run_cli(&["check-config", "--config", cfg.to_str().expect("utf-8")], &[]);
    assert!(!status.success());
    assert!(err.contains("force_recovery"), "{err}");
}
