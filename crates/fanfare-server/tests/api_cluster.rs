//! The control API across three nodes sharing a real `redis-server`: every call
//! takes effect cluster-wide, whichever node receives it; and UNAVAILABLE / 503
//! when the broker is gone.

mod common;

use std::time::Duration;

use common::api::{
    API_KEY, API_KEY_TOML, Api, Redis, api, assert_http_error, code_of, data, eventually, http_api,
    http_api_with, pb, publish_req, redis_node_toml, subscribe_req,
};
use common::{Server, assert_healthy};
use serde_json::{Value, json};
use tonic::Code;

fn three_nodes(redis: &Redis) -> [Server; 3] {
    ["node-a", "node-b", "node-c"].map(|name| Server::start(&redis_node_toml(redis, name)))
}

fn pub_data(push: &Value) -> &Value {
    &push["push"]["pub"]["data"]
}

/// Info as seen from `api`: the sorted node names.
async fn node_names(api: &mut Api) -> Vec<String> {
    let info = api.info(pb::InfoRequest {}).await.expect("info").into_inner();
    let mut names: Vec<String> = info.nodes.into_iter().map(|n| n.name).collect();
    names.sort();
    names
}

#[tokio::test]
async fn three_nodes_on_redis() {
    let redis = Redis::start();
    let [a, b, c] = three_nodes(&redis);
    let mut api_a = api(&a).await;
    let mut api_b = api(&b).await;

    // Info on any node reports all three.
    for api in [&mut api_a, &mut api_b] {
        let want = ["node-a", "node-b", "node-c"];
        let mut names = vec![];
        for _ in 0..100 {
            names = node_names(api).await;
            if names == want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(names, want);
    }
    let info = api_a.info(pb::InfoRequest {}).await.expect("info").into_inner();
    assert!(info.nodes.iter().all(|n| !n.uid.is_empty() && !n.version.is_empty()), "{info:?}");
    let uids: std::collections::HashSet<&str> = info.nodes.iter().map(|n| n.uid.as_str()).collect();
    assert_eq!(uids.len(), 3, "{info:?}");

    // Publish on A reaches a WebSocket subscriber on C (and the HTTP mirror on B too).
    let mut reader = c.connected("reader").await;
    reader.subscribe_ok("news", json!({})).await;
    let r = api_a.publish(publish_req("news", json!({"from": "a"}))).await.expect("publish");
    let r = r.into_inner();
    assert_eq!(r.offset, 1, "{r:?}");
    let p = reader.recv_push().await;
    assert_eq!(p["push"]["channel"], "news", "{p}");
    assert_eq!(*pub_data(&p), json!({"from": "a"}), "{p}");
    let (status, v) = http_api(&b, "publish", &json!({"channel": "news", "data": {"from": "b"}}));
    assert_eq!((status, v["offset"].as_u64()), (200, Some(2)), "{v}");
    assert_eq!(*pub_data(&reader.recv_push().await), json!({"from": "b"}));

    // Idempotency holds across nodes: the same key on A then B publishes once.
    for api in [&mut api_a, &mut api_b] {
        let mut req = publish_req("news", json!({"once": true}));
        req.idempotency_key = "k-1".into();
        let r = api.publish(req).await.expect("idempotent publish").into_inner();
        assert_eq!(r.offset, 3, "{r:?}");
    }
    assert_eq!(*pub_data(&reader.recv_push().await), json!({"once": true}));
    reader.assert_silent(Duration::from_millis(300)).await;

    // User 42 has connections on B and C (two there); user 7 on C is a bystander.
    let mut u_b = b.connected("42").await;
    let mut u_c1 = c.connected("42").await;
    let mut u_c2 = c.connected("42").await;
    let mut bystander = c.connected("7").await;

    // PublishToUser on A reaches every connection of the user.
    api_a
        .publish_to_user(pb::PublishToUserRequest {
            user: "42".into(),
            data: data(json!({"dm": 1})),
            ..Default::default()
        })
        .await
        .expect("publish_to_user");
    for u in [&mut u_b, &mut u_c1, &mut u_c2] {
        let p = u.recv_push().await;
        assert_eq!(p["push"]["channel"], "#42", "{p}");
        assert_eq!(*pub_data(&p), json!({"dm": 1}), "{p}");
    }
    bystander.assert_silent(Duration::from_millis(200)).await;

    // Subscribe on A: every connection of the user gets a `subscribe` push, then
    // publications of the channel.
    api_a.subscribe(subscribe_req("42", "room")).await.expect("subscribe");
    for u in [&mut u_b, &mut u_c1, &mut u_c2] {
        let p = u.recv_push().await;
        assert_eq!(p["push"]["channel"], "room", "{p}");
        assert!(p["push"]["subscribe"].is_object(), "{p}");
    }
    api_b.publish(publish_req("room", json!({"in": "room"}))).await.expect("publish room");
    for u in [&mut u_b, &mut u_c1, &mut u_c2] {
        assert_eq!(*pub_data(&u.recv_push().await), json!({"in": "room"}));
    }

    // Presence is cluster-wide (the broker's).
    let s = api_a
        .presence_stats(pb::PresenceStatsRequest { channel: "room".into() })
        .await
        .expect("presence_stats")
        .into_inner();
    assert_eq!((s.num_clients, s.num_users), (3, 1));

    // Channels on A counts subscribers of every node.
    let ch = api_a.channels(pb::ChannelsRequest::default()).await.expect("channels").into_inner();
    let n = |name: &str| ch.channels.get(name).map(|i| i.num_clients);
    assert_eq!(n("news"), Some(1), "{ch:?}");
    assert_eq!(n("room"), Some(3), "{ch:?}");
    assert_eq!(n("#42"), Some(3), "{ch:?}");
    assert_eq!(n("#7"), Some(1), "{ch:?}");
    let ch = api_b
        .channels(pb::ChannelsRequest { pattern: "#*".into() })
        .await
        .expect("channels")
        .into_inner();
    let mut names: Vec<&str> = ch.channels.keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(names, ["#42", "#7", "#reader"], "{ch:?}");
    // Info counts the clients of each node.
    let info = api_b.info(pb::InfoRequest {}).await.expect("info").into_inner();
    let clients: Vec<(String, u64)> =
        info.nodes.iter().map(|n| (n.name.clone(), n.num_clients)).collect();
    // Other nodes' figures come from their last announcement (every 5 s).
    let b_now = clients.iter().find(|(n, _)| n == "node-b").map(|(_, c)| *c);
    assert_eq!(b_now, Some(1), "{clients:?}");

    // Unsubscribe on B removes the channel from the user's connections everywhere.
    api_b
        .unsubscribe(pb::UnsubscribeRequest {
            user: "42".into(),
            channel: "room".into(),
            ..Default::default()
        })
        .await
        .expect("unsubscribe");
    for u in [&mut u_b, &mut u_c1, &mut u_c2] {
        let p = u.recv_push().await;
        assert_eq!(p["push"]["channel"], "room", "{p}");
        assert_eq!(p["push"]["unsubscribe"]["code"], 2000, "{p}");
    }

    // Disconnect on A closes the user's connections on B and C with the code.
    api_a
        .disconnect(pb::DisconnectRequest {
            user: "42".into(),
            client: String::new(),
            code: 4000,
            reason: "kicked".into(),
        })
        .await
        .expect("disconnect");
    for u in [&mut u_b, &mut u_c1, &mut u_c2] {
        assert_eq!(u.expect_close().await, (4000, "kicked".into()));
    }
    bystander.assert_silent(Duration::from_millis(300)).await;
    // Disconnect of one client on another node, over HTTP.
    let auth = format!("apikey {API_KEY}");
    let r = http_api_with(
        &a,
        "disconnect",
        &[("Authorization", &auth)],
        &json!({"client": bystander.client_id, "code": 3500}),
    );
    assert_eq!(r.status, 200, "{}", r.json());
    assert_eq!(bystander.expect_close().await.0, 3500);
    eventually("user 42 gone from presence", Duration::from_secs(5), || {
        let mut api = api_a.clone();
        async move {
            let s = api
                .presence_stats(pb::PresenceStatsRequest { channel: "#42".into() })
                .await
                .map(|r| r.into_inner());
            matches!(s, Ok(s) if s.num_clients == 0)
        }
    })
    .await;
    for s in [&a, &b, &c] {
        assert_healthy(s).await;
    }
}

#[tokio::test]
async fn broker_down_is_unavailable() {
    let mut redis = Redis::start();
    let node = Server::start(&redis_node_toml(&redis, "lonely"));
    let mut api = api(&node).await;
    api.publish(publish_req("news", json!(1))).await.expect("publish with redis up");
    redis.kill();

    // gRPC: UNAVAILABLE, promptly (not after the broker's reconnect backoff).
    let t = std::time::Instant::now();
    let r = api.publish(publish_req("news", json!(2))).await;
    assert_eq!(code_of(r), Code::Unavailable);
    for r in [
        code_of(api.publish(publish_req("news", json!(3))).await),
        code_of(
            api.history(pb::HistoryRequest { channel: "news".into(), ..Default::default() }).await,
        ),
        code_of(api.presence(pb::PresenceRequest { channel: "news".into() }).await),
        code_of(
            api.disconnect(pb::DisconnectRequest { user: "42".into(), ..Default::default() }).await,
        ),
    ] {
        assert_eq!(r, Code::Unavailable);
    }
    assert!(t.elapsed() < Duration::from_secs(5), "UNAVAILABLE took {:?}", t.elapsed());
    // HTTP: 503 with the same code.
    let auth = format!("apikey {API_KEY}");
    let h = [("Authorization", auth.as_str())];
    let r = http_api_with(&node, "publish", &h, &json!({"channel": "news", "data": 1}));
    assert_http_error(&r, 503, "UNAVAILABLE");
    let r = http_api_with(&node, "history", &h, &json!({"channel": "news"}));
    assert_http_error(&r, 503, "UNAVAILABLE");
    // Validation still comes first.
    let r = api.publish(publish_req("bad channel", json!(1))).await;
    assert_eq!(code_of(r), Code::InvalidArgument);
}

/// A subscription made by the API keeps its Redis presence entry alive past
/// `client.presence_ttl`, even when the TTL is shorter than the ping interval
/// and the connection had no presence subscription before (the refresh
/// deadline must reach the timer without waiting for a ping).
#[tokio::test]
async fn api_subscription_presence_outlives_a_short_ttl() {
    let redis = Redis::start();
    let node = Server::start(&format!(
        r#"
[node]
name = "node-a"
[broker]
kind = "redis"
[redis]
urls = ["{url}"]
{API_KEY_TOML}
[auth]
hmac_secret = "{secret}"
[client]
presence_ttl = "2s"
ping_interval = "25s"
[[namespaces]]
name = ""
[[namespaces]]
name = "room"
presence = true
"#,
        url = redis.url(),
        secret = common::SECRET,
    ));
    let mut api_a = api(&node).await;
    let mut user = node.connected("42").await;
    api_a.subscribe(subscribe_req("42", "room:x")).await.expect("subscribe");
    let p = user.recv_push().await;
    assert!(p["push"]["subscribe"].is_object(), "{p}");
    tokio::time::sleep(Duration::from_secs(6)).await;
    let s = api_a
        .presence_stats(pb::PresenceStatsRequest { channel: "room:x".into() })
        .await
        .expect("presence_stats")
        .into_inner();
    assert_eq!((s.num_clients, s.num_users), (1, 1), "three TTLs later, the user is still present");
}
