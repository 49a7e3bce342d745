//! Proxies (issue 15) against backends this test runs in-process: an HTTP
//! one (hyper, JSON as Centrifugo's HTTP proxy speaks it) and a gRPC one
//! (tonic, from proto/centrifugo/proxy.proto), driven by WebSocket clients
//! of a real node. The SDK-driven suites with Python backends are
//! tests/api/test_proxy.py and tests/sdk/proxy.mjs.

mod common;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::api::{http_request, metric_with};
use common::stream::Stream;
use common::{Client, Server, assert_error, free_port, unix_now};
use fanfare_server::proxy_pb as pb;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

/// One request an HTTP backend received.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    headers: hyper::HeaderMap,
    body: Value,
}

#[derive(Clone, Default)]
struct Backend {
    seen: Arc<Mutex<Vec<Seen>>>,
    refreshes: Arc<Mutex<u32>>,
    sub_refreshes: Arc<Mutex<u32>>,
}

impl Backend {
    fn seen(&self, path: &str) -> Vec<Seen> {
        self.seen.lock().unwrap().iter().filter(|s| s.path == path).cloned().collect()
    }

    /// What the backend answers: by path, then by what the request says.
    async fn answer(&self, path: &str, body: &Value, headers: &hyper::HeaderMap) -> Value {
        match path {
            "/connect" => {
                let cookie = headers.get("cookie").and_then(|v| v.to_str().ok()).unwrap_or("");
                match cookie {
                    "sid=ann" => json!({"result": {
                        "user": "ann", "info": {"name": "Ann"}, "channels": ["news"],
                        "data": {"welcome": true}, "meta": {"tenant": 7},
                        "subs": {"room": {"info": {"role": "mod"}}}
                    }}),
                    "sid=short" => json!({"result": {"user": "bob", "expire_at": unix_now() + 2}}),
                    "sid=banned" => json!({"disconnect": {"code": 4501, "reason": "banned"}}),
                    _ => json!({"error": {"code": 401, "message": "who are you"}}),
                }
            }
            "/refresh" => {
                let mut n = self.refreshes.lock().unwrap();
                *n += 1;
                match *n {
                    1 => json!({"result": {"expire_at": unix_now() + 2}}),
                    _ => json!({"result": {"expired": true}}),
                }
            }
            "/sub_refresh" => {
                let mut n = self.sub_refreshes.lock().unwrap();
                *n += 1;
                match *n {
                    1 => json!({"result": {"expire_at": unix_now() + 2, "info": {"seat": 4}}}),
                    _ => json!({"result": {"expired": true}}),
                }
            }
            "/subscribe" => match body["channel"].as_str().unwrap_or("") {
                "proxied:deny" => json!({"error": {"code": 103, "message": "permission denied"}}),
                "proxied:custom" => json!({"error": {"code": 1000, "message": "room is full"}}),
                "proxied:hidden" => json!({"result": {"override": {"presence": {"value": false}}}}),
                "proxied:expiring" => json!({"result": {"expire_at": unix_now() + 2}}),
                _ => json!({"result": {"info": {"seat": 3}, "data": {"topic": "rust"}}}),
            },
            "/publish" => match body["data"]["text"].as_str() {
                Some("spam") => json!({"error": {"code": 1001, "message": "no spam"}}),
                Some(t) => json!({"result": {"data": {"text": t.to_uppercase(), "checked": true}}}),
                None => json!({"result": {}}),
            },
            "/rpc" => match body["method"].as_str() {
                Some("echo") => {
                    json!({"result": {"data": {"echo": body["data"], "user": body["user"]}}})
                }
                Some("bye") => json!({"disconnect": {"code": 4501, "reason": "rpc said bye"}}),
                _ => json!({"error": {"code": 1002, "message": "unknown method"}}),
            },
            "/slow" => {
                // Twice the `slow` proxy's timeout: the node gives up first.
                tokio::time::sleep(Duration::from_secs(4)).await;
                json!({"result": {}})
            }
            _ => json!({"error": {"code": 100, "message": "no such path"}}),
        }
    }
}

/// Starts the HTTP backend on a free port.
async fn http_backend() -> (Backend, u16) {
    let backend = Backend::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let b = backend.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let b = b.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let b = b.clone();
                    async move {
                        let path = req.uri().path().to_string();
                        let headers = req.headers().clone();
                        let raw = req.into_body().collect().await.unwrap().to_bytes();
                        let body: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
                        let answer = b.answer(&path, &body, &headers).await;
                        b.seen.lock().unwrap().push(Seen { path, headers, body });
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(
                            answer.to_string(),
                        ))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (backend, port)
}

fn node_with(backend_port: u16, extra: &str) -> Server {
    let url = |p: &str| format!("http://127.0.0.1:{backend_port}/{p}");
    Server::start(&format!(
        r#"
[auth]
hmac_secret = "{secret}"

[client]
connect_proxy = "connect"
refresh_proxy = "refresh"
rpc_proxy = "rpc"

[[proxies]]
name = "connect"
endpoint = "{connect}"
http_headers = ["Cookie", "X-Forwarded-Me"]
static_headers = {{ "X-Static" = "yes" }}

[[proxies]]
name = "refresh"
endpoint = "{refresh}"

[[proxies]]
name = "rpc"
endpoint = "{rpc}"

[[proxies]]
name = "subscribe"
endpoint = "{subscribe}"

[[proxies]]
name = "publish"
endpoint = "{publish}"
http_headers = ["Cookie"]

[[proxies]]
name = "sub_refresh"
endpoint = "{sub_refresh}"

[[proxies]]
name = "slow"
endpoint = "{slow}"
timeout = "2s"

[[proxies]]
name = "down"
endpoint = "http://127.0.0.1:{down}/nothing"

[[namespaces]]
name = ""
allow_subscribe = true

[[namespaces]]
name = "proxied"
subscribe_proxy = "subscribe"
publish_proxy = "publish"
sub_refresh_proxy = "sub_refresh"
presence = true

[[namespaces]]
name = "slow"
subscribe_proxy = "slow"

[[namespaces]]
name = "down"
publish_proxy = "down"
allow_subscribe = true
{extra}
"#,
        connect = url("connect"),
        refresh = url("refresh"),
        rpc = url("rpc"),
        subscribe = url("subscribe"),
        publish = url("publish"),
        slow = url("slow"),
        sub_refresh = url("sub_refresh"),
        down = free_port(),
        secret = common::SECRET,
    ))
}

async fn as_cookie(server: &Server, cookie: &str) -> Client {
    Client::open_with_headers(server.port, &[("Cookie", cookie), ("X-Not-Listed", "secret")]).await
}

#[tokio::test]
async fn a_client_without_token_is_who_the_connect_proxy_says_by_its_cookie() {
    let (backend, port) = http_backend().await;
    let server = node_with(port, "");
    let mut c = as_cookie(&server, "sid=ann").await;
    let r = c.connect_with(json!({"name": "test-sdk", "version": "1.2"})).await;
    let res = &r["connect"];
    assert_eq!(res["data"], json!({"welcome": true}), "{r}");
    // The proxy's channels and subs are joined server-side, with the sub's info.
    assert!(res["subs"]["news"].is_object() && res["subs"]["room"].is_object(), "{r}");
    assert!(res["subs"]["#ann"].is_object(), "personal channel: {r}");
    let seen = backend.seen("/connect");
    let req = &seen[0];
    assert_eq!(req.body["client"], res["client"], "{:?}", req.body);
    assert_eq!(
        (req.body["transport"].as_str(), req.body["protocol"].as_str()),
        (Some("websocket"), Some("json"))
    );
    assert_eq!(
        (req.body["name"].as_str(), req.body["version"].as_str()),
        (Some("test-sdk"), Some("1.2"))
    );
    assert_eq!(req.headers["cookie"], "sid=ann");
    assert_eq!(req.headers["x-static"], "yes");
    assert!(req.headers.get("x-not-listed").is_none(), "only listed headers are forwarded");

    // The user and info from the proxy are what others see in presence.
    let s = c.subscribe_ok("proxied:lobby", json!({})).await;
    assert_eq!(s["data"], json!({"topic": "rust"}), "{s}");
    let p = c.presence("proxied:lobby").await;
    let me =
        p["presence"]["presence"].as_object().expect("presence").values().next().cloned().unwrap();
    assert_eq!(me["user"], "ann");
    assert_eq!(me["conn_info"], json!({"name": "Ann"}));
    assert_eq!(me["chan_info"], json!({"seat": 3}));
    // A subscribe answer may turn presence off for one subscription.
    c.subscribe_ok("proxied:hidden", json!({})).await;
    let p = c.presence("proxied:hidden").await;
    assert_eq!(p["presence"]["presence"], json!({}), "{p}");
    // Later calls carry the user and the connect answer's meta.
    let sub = &backend.seen("/subscribe")[0];
    assert_eq!(
        (sub.body["user"].as_str(), sub.body["channel"].as_str()),
        (Some("ann"), Some("proxied:lobby"))
    );
    assert_eq!(sub.body["meta"], json!({"tenant": 7}));
}

#[tokio::test]
async fn connect_proxy_errors_and_disconnects_reach_the_client() {
    let (_backend, port) = http_backend().await;
    let server = node_with(port, "");
    let mut c = as_cookie(&server, "sid=nobody").await;
    let r = c.connect("").await;
    assert_error(&r, 401);
    assert_eq!(r["error"]["message"], "who are you");
    let mut c = as_cookie(&server, "sid=banned").await;
    c.send_json(&json!({"id": 1, "connect": {}})).await;
    assert_eq!(c.expect_close().await, (4501, "banned".to_string()));
}

#[tokio::test]
async fn subscribe_proxy_allows_denies_and_answers_custom_errors() {
    let (_backend, port) = http_backend().await;
    let server = node_with(port, "");
    let mut c = as_cookie(&server, "sid=ann").await;
    c.connect_ok("").await;
    assert_error(&c.subscribe("proxied:deny", json!({})).await, 103);
    let r = c.subscribe("proxied:custom", json!({})).await;
    assert_error(&r, 1000);
    assert_eq!(r["error"]["message"], "room is full");
    c.subscribe_ok("proxied:ok", json!({})).await;
}

#[tokio::test]
async fn publish_proxy_rewrites_data_and_rejects_with_custom_codes() {
    let (backend, port) = http_backend().await;
    let server = node_with(port, "");
    let mut reader = as_cookie(&server, "sid=ann").await;
    reader.connect_ok("").await;
    reader.subscribe_ok("proxied:chat", json!({})).await;
    let mut writer = as_cookie(&server, "sid=ann").await;
    writer.connect_ok("").await;
    let r = writer.publish("proxied:chat", json!({"text": "spam"})).await;
    assert_error(&r, 1001);
    let r = writer.publish("proxied:chat", json!({"text": "hello"})).await;
    assert!(r.get("publish").is_some(), "{r}");
    let push = reader.recv_push().await;
    assert_eq!(push["push"]["pub"]["data"], json!({"text": "HELLO", "checked": true}), "{push}");
    assert_eq!(push["push"]["pub"]["info"]["user"], "ann");
    // The publish proxy forwards the cookie too (its own allow-list).
    assert_eq!(backend.seen("/publish")[0].headers["cookie"], "sid=ann");
}

#[tokio::test]
async fn rpc_goes_to_the_backend_and_its_disconnect_closes_the_client() {
    let (_backend, port) = http_backend().await;
    let server = node_with(port, "");
    let mut c = as_cookie(&server, "sid=ann").await;
    c.connect_ok("").await;
    let r = c.command(json!({"rpc": {"method": "echo", "data": {"n": 1}}})).await;
    assert_eq!(r["rpc"]["data"], json!({"echo": {"n": 1}, "user": "ann"}), "{r}");
    assert_error(&c.command(json!({"rpc": {"method": "nope"}})).await, 1002);
    c.send_json(&json!({"id": 99, "rpc": {"method": "bye"}})).await;
    assert_eq!(c.expect_close().await, (4501, "rpc said bye".to_string()));
}

// Multi-threaded: the API call below blocks its thread while the backend
// (on this runtime) answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_apis_rpc_is_answered_by_the_rpc_proxy() {
    let (backend, port) = http_backend().await;
    let server = node_with(port, "");
    let call = |body: Value| {
        let r = http_request(
            server.port,
            "POST",
            "/centrifugo/api/rpc",
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        );
        assert_eq!(r.status, 200);
        r.json()
    };
    let r = call(json!({"method": "echo", "params": {"n": 3}}));
    assert_eq!(r["result"]["data"], json!({"echo": {"n": 3}, "user": ""}), "{r}");
    let seen = &backend.seen("/rpc")[0];
    assert_eq!(seen.body["transport"], "api");
    // The backend's error is the API error.
    let r = call(json!({"method": "nope"}));
    assert_eq!(r["error"]["code"], 1002, "{r}");
}

/// Reads on `c` (bounded) until the backend saw one call to `path`, and
/// checks it was one. The first expiry (`expire_at` now + 2 s in whole
/// seconds, so 1-2 s) is noticed up to a 1 s timer tick late: the call
/// comes 1-3 s after the connect or subscribe, 6 s allowed for a loaded
/// machine. The extension it answers runs at least 1 s more (again now +
/// 2 s in whole seconds), so a second call cannot come before the check.
async fn wait_for_calls(backend: &Backend, c: &mut Client, path: &str) {
    let deadline = Instant::now() + Duration::from_secs(6);
    while backend.seen(path).is_empty() {
        assert!(Instant::now() < deadline, "no {path} call within 6 s");
        c.idle(Duration::from_millis(20)).await;
    }
    assert_eq!(backend.seen(path).len(), 1, "one {path} call, then the extension runs");
}

#[tokio::test]
async fn the_refresh_proxy_extends_a_connection_then_ends_it_with_3005() {
    let (backend, port) = http_backend().await;
    let server = node_with(port, "");
    let mut c = as_cookie(&server, "sid=short").await;
    let res = c.connect_ok("").await;
    // The node refreshes through the proxy: the client is not asked to.
    assert!(res.get("expires").is_none(), "{res}");
    // First expiry after ~2 s: extended by 2 s; the second: expired.
    wait_for_calls(&backend, &mut c, "/refresh").await;
    let r = c.command(json!({"rpc": {"method": "echo", "data": 1}})).await;
    assert_eq!(r["rpc"]["data"]["echo"], 1, "still connected: {r}");
    let (code, _) = c.expect_close_within(Duration::from_secs(6)).await;
    assert_eq!(code, 3005);
    assert_eq!(backend.seen("/refresh").len(), 2, "closed on the second call's answer");
    assert_eq!(backend.seen("/refresh")[0].body["user"], "bob");
}

#[tokio::test]
async fn the_sub_refresh_proxy_extends_a_subscription_then_unsubscribes_it() {
    let (backend, port) = http_backend().await;
    let server = node_with(port, "");
    let mut c = as_cookie(&server, "sid=ann").await;
    c.connect_ok("").await;
    let s = c.subscribe_ok("proxied:expiring", json!({})).await;
    assert!(s.get("expires").is_none(), "the node refreshes it, not the client: {s}");
    wait_for_calls(&backend, &mut c, "/sub_refresh").await;
    // The node takes the answer's info once the answer is in, which may be
    // a moment after the backend noted the call; well within the second
    // with the extension (the second call, answered "expired", unsubscribes).
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let p = c.presence("proxied:expiring").await;
        let me = p["presence"]["presence"].as_object().and_then(|m| m.values().next().cloned());
        if me.as_ref().is_some_and(|me| me["chan_info"] == json!({"seat": 4})) {
            break;
        }
        assert!(Instant::now() < deadline, "the refresh answer's info not in presence: {p}");
        c.idle(Duration::from_millis(20)).await;
    }
    let push = c.recv_push().await;
    assert_eq!(push["push"]["channel"], "proxied:expiring");
    assert_eq!(push["push"]["unsubscribe"]["code"], 2501, "{push}");
    let seen = &backend.seen("/sub_refresh")[1];
    assert_eq!(
        (seen.body["user"].as_str(), seen.body["channel"].as_str()),
        (Some("ann"), Some("proxied:expiring"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_or_dead_backend_costs_one_error_reply_and_nothing_else() {
    let (_backend, port) = http_backend().await;
    let server = node_with(port, "");
    let mut bystander = common::Bystander::join(&server).await;
    let mut c = as_cookie(&server, "sid=ann").await;
    c.connect_ok("").await;
    c.subscribe_ok("down:feed", json!({})).await;
    let started = Instant::now();
    c.send_json(&json!({"id": 50, "subscribe": {"channel": "slow:room"}})).await;
    // While the call waits, deliveries go on.
    let (status, _) = common::api::http_api(
        &server,
        "publish",
        &json!({"channel": "down:feed", "data": {"y": 1}}),
    );
    assert_eq!(status, 200);
    // The push comes before the subscribe's answer, which the node gives
    // only at the proxy's 2 s timeout (the backend answers after 4 s): a
    // session blocked on the call would deliver after its reply.
    let first = c.recv_json().await;
    assert_eq!(first["push"]["pub"]["data"], json!({"y": 1}), "delivered during the call: {first}");
    assert_error(&c.reply(50).await, 100);
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(2) && took < Duration::from_millis(3900), "{took:?}");
    assert_error(&c.publish("down:feed", json!({"x": 1})).await, 100);
    // The connection goes on: commands work, deliveries arrive.
    bystander.check().await;
    let r = c.command(json!({"rpc": {"method": "echo", "data": 1}})).await;
    assert_eq!(r["rpc"]["data"]["echo"], 1, "{r}");
    let (status, _) = common::api::http_api(
        &server,
        "publish",
        &json!({"channel": "down:feed", "data": {"y": 2}}),
    );
    assert_eq!(status, 200);
    let push = c.recv_push().await;
    assert_eq!(push["push"]["pub"]["data"], json!({"y": 2}));
    let count =
        |result| metric_with(server.port, "fanfare_proxy_calls_total", &[("result", result)]);
    assert_eq!(count("timeout"), 1.0);
    assert_eq!(count("unavailable"), 1.0);
    assert!(server.log().contains("proxy call failed"), "a log line says why");
}

#[tokio::test]
async fn http_transports_forward_the_cookie_of_their_request_to_the_connect_proxy() {
    let (_backend, port) = http_backend().await;
    let server = node_with(port, "[transports]\nuni_http_stream = true\n");
    let cookie = [("Cookie", "sid=ann")];
    // Unidirectional: the connect reply waits for the proxy; channels from it.
    let mut s =
        Stream::open(server.port, "POST", "/connection/uni_http_stream", &cookie, "{}").await;
    assert_eq!(s.status, 200);
    let connect: Value = serde_json::from_str(&s.next(b"\n").await.expect("connect")).unwrap();
    assert!(connect["connect"]["subs"]["news"].is_object(), "{connect}");
    // Bidirectional emulation (the centrifuge-js fallback).
    let body = json!({"id": 1, "connect": {}}).to_string();
    let mut s = Stream::open(server.port, "POST", "/connection/http_stream", &cookie, &body).await;
    let reply: Value = serde_json::from_str(&s.next(b"\n").await.expect("reply")).unwrap();
    assert!(reply["connect"]["subs"]["#ann"].is_object(), "{reply}");
    // A refused one gets the backend's answer as the HTTP refusal.
    let nobody = [("Cookie", "sid=nobody")];
    let s = Stream::open(server.port, "POST", "/connection/uni_http_stream", &nobody, "{}").await;
    assert_eq!(s.status, 400);
    assert!(s.text().await.contains("who are you"));
}

// --- gRPC -----------------------------------------------------------------

#[derive(Default)]
struct GrpcBackend {
    seen: Arc<Mutex<Vec<(String, tonic::metadata::MetadataMap)>>>,
}

type Res<T> = Result<tonic::Response<T>, tonic::Status>;

#[tonic::async_trait]
impl pb::centrifugo_proxy_server::CentrifugoProxy for GrpcBackend {
    async fn connect(&self, r: tonic::Request<pb::ConnectRequest>) -> Res<pb::ConnectResponse> {
        self.seen.lock().unwrap().push(("connect".into(), r.metadata().clone()));
        let result = pb::ConnectResult {
            user: "grace".into(),
            info: Bytes::from_static(br#"{"via":"grpc"}"#),
            ..Default::default()
        };
        Ok(tonic::Response::new(pb::ConnectResponse { result: Some(result), ..Default::default() }))
    }
    async fn refresh(&self, _: tonic::Request<pb::RefreshRequest>) -> Res<pb::RefreshResponse> {
        Err(tonic::Status::unimplemented("no"))
    }
    async fn subscribe(
        &self,
        r: tonic::Request<pb::SubscribeRequest>,
    ) -> Res<pb::SubscribeResponse> {
        let r = r.into_inner();
        let resp = if r.channel.ends_with("deny") {
            pb::SubscribeResponse {
                error: Some(pb::Error {
                    code: 103,
                    message: "permission denied".into(),
                    temporary: false,
                }),
                ..Default::default()
            }
        } else {
            pb::SubscribeResponse { result: Some(Default::default()), ..Default::default() }
        };
        Ok(tonic::Response::new(resp))
    }
    async fn publish(&self, r: tonic::Request<pb::PublishRequest>) -> Res<pb::PublishResponse> {
        let r = r.into_inner();
        let text =
            serde_json::from_slice::<Value>(&r.data).unwrap()["text"].as_str().unwrap().to_string();
        let data = json!({"text": text, "by": r.user}).to_string();
        let result = pb::PublishResult { data: Bytes::from(data), ..Default::default() };
        Ok(tonic::Response::new(pb::PublishResponse { result: Some(result), ..Default::default() }))
    }
    async fn rpc(&self, r: tonic::Request<pb::RpcRequest>) -> Res<pb::RpcResponse> {
        let r = r.into_inner();
        let result = pb::RpcResult { data: r.data, ..Default::default() };
        Ok(tonic::Response::new(pb::RpcResponse { result: Some(result), ..Default::default() }))
    }
    async fn sub_refresh(
        &self,
        _: tonic::Request<pb::SubRefreshRequest>,
    ) -> Res<pb::SubRefreshResponse> {
        Err(tonic::Status::unimplemented("no"))
    }
}

#[tokio::test]
async fn a_grpc_backend_answers_connect_subscribe_publish_and_rpc() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let svc =
        pb::centrifugo_proxy_server::CentrifugoProxyServer::new(GrpcBackend { seen: seen.clone() });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream_wrap(listener)),
    );
    let server = Server::start(&format!(
        r#"
[client]
connect_proxy = "app"
rpc_proxy = "app"

[[proxies]]
name = "app"
endpoint = "grpc://127.0.0.1:{port}"
http_headers = ["Authorization"]
static_headers = {{ "X-Static" = "grpc" }}

[[namespaces]]
name = "g"
subscribe_proxy = "app"
publish_proxy = "app"
"#
    ));
    let mut c = Client::open_with_headers(server.port, &[("Authorization", "Bearer abc")]).await;
    let res = c.connect_ok("").await;
    assert!(res["subs"]["#grace"].is_object(), "user from the gRPC backend: {res}");
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen[0].1.get("authorization").unwrap(), "Bearer abc");
        assert_eq!(seen[0].1.get("x-static").unwrap(), "grpc");
    }
    assert_error(&c.subscribe("g:deny", json!({})).await, 103);
    c.subscribe_ok("g:room", json!({})).await;
    assert!(c.publish("g:room", json!({"text": "hi"})).await.get("publish").is_some());
    let push = c.recv_push().await;
    assert_eq!(push["push"]["pub"]["data"], json!({"text": "hi", "by": "grace"}));
    let r = c.command(json!({"rpc": {"method": "echo", "data": {"n": 2}}})).await;
    assert_eq!(r["rpc"]["data"], json!({"n": 2}), "{r}");
}

/// A listener as the incoming stream tonic serves.
fn tokio_stream_wrap(
    listener: tokio::net::TcpListener,
) -> impl futures_util::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures_util::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| s);
        Some((r, l))
    })
}
