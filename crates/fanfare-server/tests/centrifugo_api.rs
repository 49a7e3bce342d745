//! Centrifugo's server API (`/centrifugo/api/<method>`, gRPC
//! `centrifugal.centrifugo.api.CentrifugoApi`) on one node with the memory
//! broker, watched by WebSocket clients: what a backend moving from
//! Centrifugo relies on. The cluster and `cent` side is
//! tests/api/test_centrifugo_api.py.

mod common;

use std::time::Duration;

use common::api::{
    API_KEY, Authorization, grpc_channel, http_request, metric_with, start_api_node,
};
use common::{SECRET, Server, sign, unix_now};
use fanfare_server::centrifugo_pb as cpb;
use serde_json::{Value, json};

/// `POST /centrifugo/api/<method>` with `X-API-Key`: `(status, JSON body)`.
fn call(server: &Server, method: &str, body: Value) -> (u16, Value) {
    let r = http_request(
        server.port,
        "POST",
        &format!("/centrifugo/api/{method}"),
        &[("X-API-Key", API_KEY), ("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    );
    let v = r.json();
    (r.status, v)
}

#[track_caller]
fn result(server: &Server, method: &str, body: Value) -> Value {
    let (status, v) = call(server, method, body);
    assert_eq!(status, 200, "{v}");
    assert!(v.get("error").is_none(), "{method}: {v}");
    v["result"].clone()
}

#[tokio::test]
async fn after_history_remove_a_subscriber_recovering_is_told_it_did_not_recover() {
    let server = start_api_node();
    let mut first = None;
    for i in 0..3 {
        let r = result(&server, "publish", json!({"channel": "feed", "data": {"i": i}}));
        first.get_or_insert(r);
    }
    let epoch = first.expect("a publish")["epoch"].as_str().unwrap().to_string();
    result(&server, "history_remove", json!({"channel": "feed"}));
    let h = result(&server, "history", json!({"channel": "feed", "limit": -1}));
    assert_eq!(h["publications"], json!([]), "{h}");
    assert_eq!((h["offset"].as_u64(), h["epoch"].as_str()), (Some(3), Some(epoch.as_str())));

    let mut c = server.connected("reader").await;
    let r = c.subscribe("feed", json!({"recover": true, "offset": 1, "epoch": epoch})).await;
    // (false fields are left out of the JSON protocol, as Centrifugo does)
    assert_eq!(r["subscribe"]["was_recovering"], json!(true), "{r}");
    assert!(r["subscribe"].get("recovered").is_none(), "{r}");
    // A position of another epoch: Centrifugo's 112 (unrecoverable position).
    let since = json!({"channel": "feed", "limit": -1, "since": {"offset": 1, "epoch": "other"}});
    let (status, v) = call(&server, "history", since);
    assert_eq!((status, &v["error"]["code"]), (200, &json!(112)), "{v}");
    // Publishing goes on from the kept position.
    let r = result(&server, "publish", json!({"channel": "feed", "data": 4}));
    assert_eq!(r["offset"], 4, "{r}");
}

#[tokio::test]
async fn refresh_replaces_a_connections_expiry_and_tells_the_client() {
    let server = start_api_node();
    let token = sign(SECRET, &json!({"sub": "short", "exp": unix_now() + 2}));
    let mut c = server.client().await;
    c.connect_ok(&token).await;
    // No expiry any more: the token's deadline passes and the client stays.
    result(&server, "refresh", json!({"user": "short", "expire_at": 0}));
    let p = c.recv_push().await;
    assert_eq!(p["push"]["refresh"], json!({}), "expires false, ttl 0: {p}");
    c.idle(Duration::from_secs(3)).await;
    let r = c.subscribe("alive", json!({})).await;
    assert!(r.get("subscribe").is_some(), "the connection is still served: {r}");
    // A new deadline one second away: closed with 3005 (expired).
    result(&server, "refresh", json!({"user": "short", "expire_at": unix_now() + 1}));
    assert_eq!(c.expect_close_within(Duration::from_secs(5)).await.0, 3005);
    let (_, v) = call(&server, "refresh", json!({"user": "short", "expire_at": -5}));
    assert_eq!(v["error"]["code"], 107, "{v}");
    let (_, v) = call(&server, "refresh", json!({"expire_at": 5}));
    assert_eq!(v["error"]["code"], 107, "{v}");
}

#[tokio::test]
async fn a_sequential_grpc_batch_sees_its_own_earlier_commands() {
    let server = start_api_node();
    let key = format!("apikey {API_KEY}").parse().expect("ASCII");
    let mut api = cpb::centrifugo_api_client::CentrifugoApiClient::with_interceptor(
        grpc_channel(&server).await,
        Authorization(Some(key)),
    );
    let publish = |n: u32| cpb::Command {
        publish: Some(cpb::PublishRequest {
            channel: "seq".into(),
            data: n.to_string().into_bytes(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let history = cpb::Command {
        history: Some(cpb::HistoryRequest {
            channel: "seq".into(),
            limit: -1,
            ..Default::default()
        }),
        ..Default::default()
    };
    let req =
        cpb::BatchRequest { commands: vec![publish(1), publish(2), history], parallel: false };
    let replies = api.batch(req).await.expect("batch").into_inner().replies;
    assert_eq!(replies.len(), 3);
    let offsets: Vec<u64> =
        replies[..2].iter().map(|r| r.publish.as_ref().expect("published").offset).collect();
    assert_eq!(offsets, [1, 2]);
    let h = replies[2].history.as_ref().expect("history");
    let data: Vec<&[u8]> = h.publications.iter().map(|p| p.data.as_slice()).collect();
    assert_eq!(data, [b"1", b"2"]);
    let labels = [("method", "batch"), ("protocol", "centrifugo_grpc"), ("code", "OK")];
    assert_eq!(metric_with(server.port, "fanfare_api_requests_total", &labels), 1.0);
}
