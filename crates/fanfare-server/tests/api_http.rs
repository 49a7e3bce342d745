//! The HTTP/JSON mirror of the control API (`POST /api/<method>`) on one node,
//! driven by a plain HTTP/1.1 client over a TCP stream: every method, the error
//! statuses with their `{"error":{"code","message"}}` bodies, API keys, body
//! size limits and metrics.

mod common;

use std::time::Duration;

use common::api::{
    API_KEY, assert_http_error, http_api, http_api_with, http_request, metric_with, start_api_node,
};
use common::{Server, assert_healthy};
use serde_json::{Value, json};

#[track_caller]
fn ok(server: &Server, method: &str, body: Value) -> Value {
    let (status, v) = http_api(server, method, &body);
    assert_eq!(status, 200, "{method} {body}: {v}");
    v
}

#[tokio::test]
async fn every_method_over_http() {
    let server = start_api_node();
    let mut sub = server.connected("42").await;
    let mut other = server.connected("7").await;
    sub.subscribe_ok("news", json!({})).await;
    other.subscribe_ok("sport", json!({})).await;

    // publish: `data` is any JSON value, delivered verbatim.
    let r = ok(
        &server,
        "publish",
        json!({"channel": "news", "data": {"text": "hi", "n": [1, 2]}, "tags": {"t": "1"}}),
    );
    assert_eq!(r["offset"], 1, "{r}");
    assert!(r["epoch"].as_str().is_some_and(|e| !e.is_empty()), "{r}");
    let p = sub.recv_push().await;
    assert_eq!(p["push"]["pub"]["data"], json!({"text": "hi", "n": [1, 2]}), "{p}");
    assert_eq!(p["push"]["pub"]["tags"], json!({"t": "1"}), "{p}");
    let r = ok(&server, "publish", json!({"channel": "news", "data": "just a string"}));
    assert_eq!(r["offset"], 2, "{r}");
    assert_eq!(sub.recv_push().await["push"]["pub"]["data"], "just a string");

    // broadcast
    let r = ok(
        &server,
        "broadcast",
        json!({"channels": ["news", "sport", "nope:x"], "data": {"b": 1}}),
    );
    let results = r["results"].as_array().expect("results");
    assert_eq!(results.len(), 3, "{r}");
    assert_eq!(results[0]["channel"], "news");
    assert_eq!(results[0]["offset"], 3);
    assert_eq!(results[1]["offset"], 1);
    assert_eq!(results[2]["error"]["code"], "INVALID_ARGUMENT", "{r}");
    assert_eq!(sub.recv_push().await["push"]["pub"]["data"], json!({"b": 1}));
    assert_eq!(other.recv_push().await["push"]["pub"]["data"], json!({"b": 1}));

    // publish_to_user
    ok(&server, "publish_to_user", json!({"user": "42", "data": {"dm": true}}));
    let p = sub.recv_push().await;
    assert_eq!(p["push"]["channel"], "#42", "{p}");
    assert_eq!(p["push"]["pub"]["data"], json!({"dm": true}), "{p}");

    // subscribe / presence / presence_stats / channels / info
    assert_eq!(ok(&server, "subscribe", json!({"user": "42", "channel": "room"})), json!({}));
    let p = sub.recv_push().await;
    assert_eq!(p["push"]["channel"], "room", "{p}");
    assert!(p["push"]["subscribe"].is_object(), "{p}");
    let r = ok(&server, "presence", json!({"channel": "room"}));
    let clients = r["clients"].as_object().expect("clients");
    assert_eq!(clients.len(), 1, "{r}");
    assert_eq!(clients[&sub.client_id]["user"], "42", "{r}");
    let r = ok(&server, "presence_stats", json!({"channel": "room"}));
    assert_eq!(r, json!({"num_clients": 1, "num_users": 1}));
    let r = ok(&server, "channels", json!({"pattern": "*o*"}));
    let chans = r["channels"].as_object().expect("channels");
    let mut names: Vec<&str> = chans.keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(names, ["room", "sport"], "{r}");
    assert_eq!(chans["room"]["num_clients"], 1, "{r}");
    let r = ok(&server, "info", json!({}));
    let nodes = r["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 1, "{r}");
    assert_eq!(nodes[0]["num_clients"], 2, "{r}");
    // An empty body is an empty request.
    let auth = format!("apikey {API_KEY}");
    let empty = http_request(server.port, "POST", "/api/info", &[("Authorization", &auth)], b"");
    assert_eq!(empty.status, 200, "{:?}", String::from_utf8_lossy(&empty.body));

    // history
    let r = ok(&server, "history", json!({"channel": "news", "limit": -1}));
    let pubs = r["publications"].as_array().expect("publications");
    assert_eq!(pubs.len(), 3, "{r}");
    assert_eq!(pubs[0]["data"], json!({"text": "hi", "n": [1, 2]}), "{r}");
    assert_eq!(pubs[0]["tags"], json!({"t": "1"}), "{r}");
    assert_eq!(r["offset"], 3, "{r}");
    let epoch = r["epoch"].as_str().expect("epoch").to_string();
    let r = ok(
        &server,
        "history",
        json!({"channel": "news", "limit": 10, "since_offset": 2, "epoch": epoch}),
    );
    assert_eq!(r["publications"].as_array().map(Vec::len), Some(1), "{r}");
    let r = ok(&server, "history", json!({"channel": "news", "limit": 1, "reverse": true}));
    assert_eq!(r["publications"][0]["offset"], 3, "{r}");

    // unsubscribe / disconnect
    assert_eq!(ok(&server, "unsubscribe", json!({"user": "42", "channel": "room"})), json!({}));
    let p = sub.recv_push().await;
    assert_eq!(p["push"]["unsubscribe"]["code"], 2000, "{p}");
    ok(&server, "disconnect", json!({"user": "42", "code": 4100, "reason": "bye now"}));
    assert_eq!(sub.expect_close().await, (4100, "bye now".into()));
    other.assert_silent(Duration::from_millis(200)).await;
    assert_healthy(&server).await;
}

#[tokio::test]
async fn api_key_is_required_on_http() {
    let server = start_api_node();
    let body = json!({"channel": "news", "data": 1});
    let wrong_bearer = format!("Bearer {API_KEY}");
    for headers in [
        vec![],
        vec![("Authorization", "apikey wrong")],
        vec![("Authorization", wrong_bearer.as_str())],
        vec![("Authorization", API_KEY)],
        vec![("X-API-Key", "wrong")],
    ] {
        let r = http_api_with(&server, "publish", &headers, &body);
        assert_http_error(&r, 401, "UNAUTHENTICATED");
        let r = http_api_with(&server, "info", &headers, &json!({}));
        assert_http_error(&r, 401, "UNAUTHENTICATED");
    }
    let good = format!("apikey {API_KEY}");
    for headers in [vec![("Authorization", good.as_str())], vec![("X-API-Key", API_KEY)]] {
        let r = http_api_with(&server, "publish", &headers, &body);
        assert_eq!(r.status, 200, "{headers:?}: {}", r.json());
    }
    let r = http_api(&server, "history", &json!({"channel": "news", "limit": -1})).1;
    assert_eq!(
        r["publications"].as_array().map(Vec::len),
        Some(2),
        "only accepted calls published: {r}"
    );
}

#[tokio::test]
async fn http_error_statuses() {
    let server = start_api_node();
    let auth = format!("apikey {API_KEY}");
    let h = [("Authorization", auth.as_str())];
    let call = |method: &str, body: Value| http_api_with(&server, method, &h, &body);

    // 400 INVALID_ARGUMENT: channel names, unknown namespace, missing/empty data, bodies.
    for body in [
        json!({"channel": "", "data": 1}),
        json!({"channel": "bad channel", "data": 1}),
        json!({"channel": "x".repeat(256), "data": 1}),
        json!({"channel": "nope:x", "data": 1}),
        json!({"channel": "news"}),
        json!({"channel": "news", "data": 1, "unknown_field": true}),
        json!({"channel": 5, "data": 1}),
    ] {
        assert_http_error(&call("publish", body), 400, "INVALID_ARGUMENT");
    }
    for raw in [&b"{not json"[..], b"[1,2]", b"{\"channel\":\"news\",\"data\":}"] {
        let r = http_request(server.port, "POST", "/api/publish", &h, raw);
        assert_http_error(&r, 400, "INVALID_ARGUMENT");
    }
    assert_http_error(&call("publish_to_user", json!({"data": 1})), 400, "INVALID_ARGUMENT");
    assert_http_error(&call("subscribe", json!({"channel": "news"})), 400, "INVALID_ARGUMENT");
    assert_http_error(
        &call("disconnect", json!({"user": "42", "code": 1000})),
        400,
        "INVALID_ARGUMENT",
    );
    assert_http_error(
        &call("broadcast", json!({"channels": [], "data": 1})),
        400,
        "INVALID_ARGUMENT",
    );

    // 404 NOT_FOUND: features off in the namespace, unknown methods.
    assert_http_error(&call("presence", json!({"channel": "plain:x"})), 404, "NOT_FOUND");
    assert_http_error(&call("presence_stats", json!({"channel": "plain:x"})), 404, "NOT_FOUND");
    assert_http_error(&call("history", json!({"channel": "plain:x"})), 404, "NOT_FOUND");
    assert_http_error(&call("no_such_method", json!({})), 404, "NOT_FOUND");

    // 405 for anything but POST.
    let r = http_request(server.port, "GET", "/api/info", &h, b"");
    assert_eq!(r.status, 405, "{:?}", String::from_utf8_lossy(&r.body));

    // 429 RESOURCE_EXHAUSTED: more than api.max_broadcast_channels (3).
    let r = call("broadcast", json!({"channels": ["a", "b", "c", "d"], "data": 1}));
    assert_http_error(&r, 429, "RESOURCE_EXHAUSTED");

    // 413: a body over api.max_request_size (4096), with and without Content-Length
    // being honest about it; a body just under the limit is served.
    let big = json!({"channel": "news", "data": {"blob": "z".repeat(5000)}});
    let r = call("publish", big);
    assert_http_error(&r, 413, "RESOURCE_EXHAUSTED");
    let huge = json!({"channel": "news", "data": {"blob": "z".repeat(2 << 20)}});
    assert_http_error(&call("publish", huge), 413, "RESOURCE_EXHAUSTED");
    let fits = json!({"channel": "news", "data": {"blob": "z".repeat(3000)}});
    assert_eq!(call("publish", fits).status, 200);

    // Nothing refused reached history.
    let r = http_api(&server, "history", &json!({"channel": "news", "limit": -1})).1;
    assert_eq!(r["publications"].as_array().map(Vec::len), Some(1), "{r}");

    // Metrics by protocol and code.
    let m = |method: &str, code: &str| {
        let labels = [("method", method), ("protocol", "http"), ("code", code)];
        metric_with(server.port, "fanfare_api_requests_total", &labels)
    };
    assert_eq!(m("publish", "INVALID_ARGUMENT"), 10.0);
    assert_eq!(m("publish", "RESOURCE_EXHAUSTED"), 2.0);
    assert_eq!(m("broadcast", "RESOURCE_EXHAUSTED"), 1.0);
    assert_eq!(m("presence", "NOT_FOUND"), 1.0);
    assert_eq!(m("publish", "OK"), 1.0);
    assert_healthy(&server).await;
}
