//! Helpers of the control API tests: a gRPC client (tonic, generated from
//! proto/ by the server crate's build script), a tiny HTTP/1.1 client over a
//! plain TCP stream, a throwaway `redis-server` and labelled metrics.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

pub use fanfare_server::pb;
use pb::control_service_client::ControlServiceClient;
use serde_json::Value;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::{Server, http_get};

/// The API key of the tests that configure one.
pub const API_KEY: &str = "api-test-key";

/// `[api] key = API_KEY`.
pub const API_KEY_TOML: &str = "[api]\nkey = \"api-test-key\"\n";

/// Adds `authorization: <value>` to every call (nothing when `None`).
#[derive(Clone)]
pub struct Authorization(pub Option<MetadataValue<Ascii>>);

impl Interceptor for Authorization {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A control API client.
pub type Api = ControlServiceClient<InterceptedService<Channel, Authorization>>;

/// An HTTP/2 channel to the node's gRPC port.
pub async fn grpc_channel(server: &Server) -> Channel {
    assert_ne!(server.grpc_port, 0, "the server has no [grpc] listen");
    let endpoint = Channel::from_shared(format!("http://127.0.0.1:{}", server.grpc_port))
        .expect("endpoint URI")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10));
    endpoint.connect().await.expect("connecting to the gRPC port")
}

/// A client sending `authorization: apikey <key>` (no header for `None`).
pub async fn grpc_client(server: &Server, key: Option<&str>) -> Api {
    grpc_client_raw(server, key.map(|k| format!("apikey {k}"))).await
}

/// A client sending `authorization: <value>` verbatim.
pub async fn grpc_client_raw(server: &Server, authorization: Option<String>) -> Api {
    let v = authorization.map(|a| a.parse().expect("ASCII metadata value"));
    ControlServiceClient::with_interceptor(grpc_channel(server).await, Authorization(v))
}

/// A client with the test key.
pub async fn api(server: &Server) -> Api {
    grpc_client(server, Some(API_KEY)).await
}

/// `data` as the bytes the API expects (JSON).
pub fn data(v: Value) -> Vec<u8> {
    v.to_string().into_bytes()
}

pub fn publish_req(channel: &str, v: Value) -> pb::PublishRequest {
    pb::PublishRequest { channel: channel.into(), data: data(v), ..Default::default() }
}

/// Subscribe every connection of `user` to `channel`.
pub fn subscribe_req(user: &str, channel: &str) -> pb::SubscribeRequest {
    pb::SubscribeRequest { user: user.into(), channel: channel.into(), ..Default::default() }
}

/// The status code of a failed call (panics on success).
#[track_caller]
pub fn code_of<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> tonic::Code {
    match r {
        Ok(v) => panic!("expected an error status, got {:?}", v.into_inner()),
        Err(s) => {
            assert!(!s.message().is_empty(), "status without message: {s:?}");
            s.code()
        }
    }
}

/// One HTTP response.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The body as JSON (panics when it is not).
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "HTTP {} body is not JSON ({e}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// `method path` with `headers` and `body` over a fresh HTTP/1.1 connection
/// (`Connection: close`). Write errors are ignored so that a server that
/// answers before reading a large body (413) is still heard.
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connecting");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
    s.set_write_timeout(Some(Duration::from_secs(10))).expect("write timeout");
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = s.write_all(head.as_bytes()).and_then(|_| s.write_all(body));
    let mut raw = Vec::new();
    // A reset after the response (unread request body) is not an error here.
    let mut chunk = [0u8; 16384];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
            Err(e) if raw.is_empty() => panic!("reading the HTTP response: {e}"),
            Err(_) => break,
        }
    }
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> HttpResponse {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        body = dechunk(&body);
    }
    HttpResponse { status, headers, body }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16)
            .expect("chunk size");
        if size == 0 {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
    out
}

/// `POST /api/<method>` with a JSON body and the given auth headers.
pub fn http_api_with(
    server: &Server,
    method: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> HttpResponse {
    let mut h = vec![("Content-Type", "application/json")];
    h.extend_from_slice(headers);
    http_request(server.port, "POST", &format!("/api/{method}"), &h, body.to_string().as_bytes())
}

/// `POST /api/<method>` with `authorization: apikey API_KEY`: `(status, JSON body)`.
pub fn http_api(server: &Server, method: &str, body: &Value) -> (u16, Value) {
    let auth = format!("apikey {API_KEY}");
    let r = http_api_with(server, method, &[("Authorization", &auth)], body);
    let v = r.json();
    (r.status, v)
}

/// Asserts an HTTP API error: `status` and `{"error":{"code": code, "message": ..}}`.
#[track_caller]
pub fn assert_http_error(r: &HttpResponse, status: u16, code: &str) {
    let v = r.json();
    assert_eq!(r.status, status, "expected HTTP {status} {code}, got {v}");
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "no message: {v}");
    assert_eq!(r.header("content-type"), Some("application/json"), "{r:?}");
}

/// The sum of the samples of `name` in `/metrics` whose labels include every
/// `key="value"` of `labels` (0 when none).
pub fn metric_with(port: u16, name: &str, labels: &[(&str, &str)]) -> f64 {
    let Ok((200, body)) = http_get(port, "/metrics") else {
        return 0.0;
    };
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(k, _)| {
            let (n, rest) = k.split_once('{').unwrap_or((k, ""));
            n == name && labels.iter().all(|(lk, lv)| rest.contains(&format!("{lk}=\"{lv}\"")))
        })
        .filter_map(|(_, v)| v.trim().parse::<f64>().ok())
        .sum()
}

/// The API tests' Redis: the one launcher in `common::redis`.
pub use super::redis::RedisServer as Redis;

/// Token auth and the namespaces of every API test node: the default one with
/// presence and history, `plain:` without either.
fn auth_and_namespaces() -> String {
    format!(
        r#"
[auth]
hmac_secret = "{secret}"

[[namespaces]]
name = ""
presence = true
history_size = 100
history_ttl = "300s"
allow_publish = true

[[namespaces]]
name = "plain"
allow_publish = true
"#,
        secret = super::SECRET,
    )
}

/// One node: API key, at most 3 channels per broadcast and 4 KiB requests.
pub fn api_node_toml() -> String {
    format!(
        "{API_KEY_TOML}max_broadcast_channels = 3\nmax_request_size = 4096\n{}",
        auth_and_namespaces()
    )
}

pub fn start_api_node() -> Server {
    Server::start(&api_node_toml())
}

pub fn redis_node_toml(redis: &Redis, name: &str) -> String {
    format!(
        r#"
[node]
name = "{name}"

[broker]
kind = "redis"

[redis]
urls = ["{url}"]

{API_KEY_TOML}{rest}"#,
        url = redis.url(),
        rest = auth_and_namespaces(),
    )
}

/// Waits (bounded) until `pred` holds, polling every 50 ms.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut pred: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if pred().await {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
