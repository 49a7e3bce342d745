//! Proxies: the node asks the application backend what to do with a client's
//! connect, subscribe, publish, RPC and refreshes, in Centrifugo's proxy
//! protocol (`proto/centrifugo/proxy.proto`), so backends written for
//! Centrifugo answer fanfare unchanged.
//!
//! This module holds what the protocol means; how a call travels (HTTP JSON
//! or gRPC) is a [`ProxyBackend`] of the server crate. A call has a deadline
//! (the proxy's `timeout`), is counted in `fanfare_proxy_calls_total{proxy,
//! kind,result}` and timed in `fanfare_proxy_call_duration_seconds`.
//!
//! A session waits for at most one proxy call at a time, and reads no further
//! commands while it waits (`Session::accepts_input`), so a slow backend costs
//! a connection at most one pending future and never an unbounded queue; its
//! deliveries, pings and timers go on meanwhile (the connection loop keeps
//! polling the outbox). No task is spawned per call: the call is a future the
//! connection's own task polls, dropped with the connection.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::ingress::{DataError, DataRules};

/// What a proxy call is about (also its metric label and the name of the
/// gRPC method it calls).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(usize)]
pub enum ProxyKind {
    Connect,
    Refresh,
    Subscribe,
    Publish,
    Rpc,
    SubRefresh,
}

impl ProxyKind {
    const ALL: [ProxyKind; 6] = [
        ProxyKind::Connect,
        ProxyKind::Refresh,
        ProxyKind::Subscribe,
        ProxyKind::Publish,
        ProxyKind::Rpc,
        ProxyKind::SubRefresh,
    ];

    pub fn label(self) -> &'static str {
        match self {
            ProxyKind::Connect => "connect",
            ProxyKind::Refresh => "refresh",
            ProxyKind::Subscribe => "subscribe",
            ProxyKind::Publish => "publish",
            ProxyKind::Rpc => "rpc",
            ProxyKind::SubRefresh => "sub_refresh",
        }
    }
}

/// Client request headers a proxy forwards (names lowercased), captured when
/// the connection was opened. Only names some proxy lists in `http_headers`
/// are kept.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Headers(pub Vec<(String, String)>);

/// Who is asking: sent with every call.
#[derive(Debug, Clone)]
pub struct CallContext {
    /// The client id (for connect: the one the connection will get).
    pub client: Arc<str>,
    /// `websocket`, `http_stream`, `sse`, `uni_websocket`, ...
    pub transport: &'static str,
    /// `json` or `protobuf`: the client's protocol. Data of a JSON client is
    /// JSON; a Protobuf client's may be any bytes.
    pub protocol: &'static str,
    /// Empty for connect and for anonymous connections.
    pub user: Arc<str>,
    /// What the connect answer attached to the connection (raw JSON), sent
    /// back with every later call.
    pub meta: Bytes,
    /// Forwarded client headers.
    pub headers: Option<Arc<Headers>>,
    /// What data and info from the backend must look like (as a client's).
    pub rules: DataRules,
}

/// The question of one call.
#[derive(Debug, Clone)]
pub enum ProxyRequest {
    Connect { data: Bytes, name: String, version: String },
    Refresh,
    Subscribe { channel: String, data: Bytes },
    Publish { channel: String, data: Bytes },
    Rpc { method: String, data: Bytes },
    SubRefresh { channel: String },
}

impl ProxyRequest {
    pub fn kind(&self) -> ProxyKind {
        match self {
            ProxyRequest::Connect { .. } => ProxyKind::Connect,
            ProxyRequest::Refresh => ProxyKind::Refresh,
            ProxyRequest::Subscribe { .. } => ProxyKind::Subscribe,
            ProxyRequest::Publish { .. } => ProxyKind::Publish,
            ProxyRequest::Rpc { .. } => ProxyKind::Rpc,
            ProxyRequest::SubRefresh { .. } => ProxyKind::SubRefresh,
        }
    }
}

/// Options of one server-side subscription made by a connect answer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SubOptions {
    pub expire_at: i64,
    pub info: Bytes,
    pub data: Bytes,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConnectAnswer {
    pub user: String,
    /// Unix seconds; 0 = the connection does not expire.
    pub expire_at: i64,
    pub info: Bytes,
    pub data: Bytes,
    pub channels: Vec<String>,
    pub subs: Vec<(String, SubOptions)>,
    pub meta: Bytes,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct SubscribeAnswer {
    pub expire_at: i64,
    pub info: Bytes,
    pub data: Bytes,
    /// Namespace options overridden for this subscription.
    pub presence: Option<bool>,
    pub join_leave: Option<bool>,
    pub force_recovery: Option<bool>,
    pub force_positioning: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct PublishAnswer {
    /// Replaces the client's data when set.
    pub data: Option<Bytes>,
    pub skip_history: bool,
    pub idempotency_key: String,
    pub tags: BTreeMap<String, String>,
}

/// The answer to refresh and sub_refresh.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RefreshAnswer {
    pub expired: bool,
    pub expire_at: i64,
    pub info: Bytes,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ProxyResult {
    Connect(ConnectAnswer),
    Subscribe(SubscribeAnswer),
    Publish(PublishAnswer),
    Refresh(RefreshAnswer),
    Rpc(Bytes),
}

/// What the backend said.
#[derive(Debug, Clone, PartialEq)]
pub enum ProxyAnswer {
    Result(ProxyResult),
    /// Answer the client's command with this error.
    Error {
        code: u32,
        message: String,
        temporary: bool,
    },
    /// Close the client with this code.
    Disconnect {
        code: u16,
        reason: String,
    },
}

/// Why no answer came.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyFailure {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Connection refused, an HTTP status other than 200, a gRPC status.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// An answer that is not what the protocol allows.
    #[error("bad answer: {0}")]
    BadAnswer(String),
}

impl ProxyFailure {
    /// Its place in `RESULTS`.
    fn index(&self) -> usize {
        match self {
            ProxyFailure::Timeout(_) => 3,
            ProxyFailure::Unavailable(_) => 4,
            ProxyFailure::BadAnswer(_) => 5,
        }
    }
}

pub type ProxyFuture = Pin<Box<dyn Future<Output = Result<ProxyAnswer, ProxyFailure>> + Send>>;

/// How calls travel to one backend (HTTP JSON, gRPC): the server crate's.
pub trait ProxyBackend: Send + Sync + 'static {
    /// Makes one call. The future must own what it needs (it outlives the
    /// borrow), and may be dropped at any point (the connection closed or the
    /// deadline passed).
    fn call(&self, ctx: &CallContext, request: &ProxyRequest) -> ProxyFuture;
}

/// Outcomes of a call, as `fanfare_proxy_calls_total{result}` labels them.
const RESULTS: [&str; 6] = ["ok", "error", "disconnect", "timeout", "unavailable", "bad_answer"];

/// One `[[proxies]]` entry.
pub struct Proxy {
    name: Arc<str>,
    timeout: Duration,
    backend: Box<dyn ProxyBackend>,
    /// Its metric handles by kind (and result), registered up front: every
    /// series shows (at 0) from the start, and a call costs no lookup.
    metrics: Arc<[(metrics::Histogram, [metrics::Counter; 6]); 6]>,
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proxy").field("name", &self.name).field("timeout", &self.timeout).finish()
    }
}

pub const CALLS: &str = "fanfare_proxy_calls_total";
pub const DURATION: &str = "fanfare_proxy_call_duration_seconds";

pub fn describe_metrics() {
    metrics::describe_counter!(
        CALLS,
        "Proxy calls to the application backend by proxy, kind and result (ok, error, \
         disconnect: the backend's answers; timeout, unavailable, bad_answer: failures)."
    );
    metrics::describe_histogram!(
        DURATION,
        metrics::Unit::Seconds,
        "Duration of proxy calls by proxy and kind, failures included."
    );
}

impl Proxy {
    pub fn new(name: &str, timeout: Duration, backend: Box<dyn ProxyBackend>) -> Self {
        let metrics = ProxyKind::ALL.map(|kind| {
            let labels = [("proxy", name.to_string()), ("kind", kind.label().to_string())];
            let duration = metrics::histogram!(DURATION, &labels);
            let counters = RESULTS.map(|result| {
                let mut labels = labels.to_vec();
                labels.push(("result", result.to_string()));
                metrics::counter!(CALLS, &labels)
            });
            (duration, counters)
        });
        Self { name: name.into(), timeout, backend, metrics: Arc::new(metrics) }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Calls the backend with this proxy's deadline; counts and logs the
    /// outcome. A failure is logged at warn: the client only sees error 100.
    pub fn call(&self, ctx: &CallContext, request: &ProxyRequest) -> ProxyFuture {
        let kind = request.kind();
        let name = self.name.clone();
        let timeout = self.timeout;
        let client = ctx.client.clone();
        let (rules, json) = (ctx.rules, ctx.protocol == "json");
        let fut = self.backend.call(ctx, request);
        let handles = self.metrics.clone();
        Box::pin(async move {
            let start = Instant::now();
            let out = match tokio::time::timeout(timeout, fut).await {
                Ok(r) => r.and_then(|a| checked(a, &rules, json)),
                Err(_) => Err(ProxyFailure::Timeout(timeout)),
            };
            let result = match &out {
                Ok(ProxyAnswer::Result(_)) => 0,
                Ok(ProxyAnswer::Error { .. }) => 1,
                Ok(ProxyAnswer::Disconnect { .. }) => 2,
                Err(e) => e.index(),
            };
            if let Err(e) = &out {
                tracing::warn!(proxy = &*name, kind = kind.label(), client = &*client, error = %e,
                    "proxy call failed; the client gets error 100");
            }
            let (duration, counters) = &handles[kind as usize];
            duration.record(start.elapsed().as_secs_f64());
            counters[result].increment(1);
            out
        })
    }
}

/// Every configured proxy, and which one each event uses.
#[derive(Debug, Default, Clone)]
pub struct Proxies {
    by_name: HashMap<String, Arc<Proxy>>,
    connect: Option<Arc<Proxy>>,
    refresh: Option<Arc<Proxy>>,
    rpc: Option<Arc<Proxy>>,
    /// Lowercased names of the client headers some proxy forwards.
    header_names: Vec<String>,
}

/// A proxy name that names no `[[proxies]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no [[proxies]] entry is named {0:?}")]
pub struct UnknownProxy(pub String);

impl Proxies {
    /// `header_names`: the union of every proxy's `http_headers`.
    pub fn new(proxies: Vec<Proxy>, header_names: Vec<String>) -> Self {
        let mut header_names: Vec<String> =
            header_names.into_iter().map(|h| h.to_ascii_lowercase()).collect();
        header_names.sort();
        header_names.dedup();
        let by_name = proxies.into_iter().map(|p| (p.name.to_string(), Arc::new(p))).collect();
        Self { by_name, header_names, ..Default::default() }
    }

    fn resolve(&self, name: &str) -> Result<Option<Arc<Proxy>>, UnknownProxy> {
        if name.is_empty() {
            return Ok(None);
        }
        self.by_name.get(name).cloned().map(Some).ok_or_else(|| UnknownProxy(name.into()))
    }

    /// Names the proxies of `client.connect_proxy`, `refresh_proxy` and `rpc_proxy`
    /// (empty = none).
    pub fn with_client_proxies(
        mut self,
        connect: &str,
        refresh: &str,
        rpc: &str,
    ) -> Result<Self, UnknownProxy> {
        self.connect = self.resolve(connect)?;
        self.refresh = self.resolve(refresh)?;
        self.rpc = self.resolve(rpc)?;
        Ok(self)
    }

    /// A namespace's proxy by name; empty = none. Names were checked when
    /// the configuration was loaded.
    pub fn named(&self, name: &str) -> Option<&Arc<Proxy>> {
        if name.is_empty() { None } else { self.by_name.get(name) }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    pub fn connect(&self) -> Option<&Arc<Proxy>> {
        self.connect.as_ref()
    }

    pub fn refresh(&self) -> Option<&Arc<Proxy>> {
        self.refresh.as_ref()
    }

    pub fn rpc(&self) -> Option<&Arc<Proxy>> {
        self.rpc.as_ref()
    }

    /// Keeps the headers some proxy forwards; `get` looks one up by its
    /// lowercased name. None (no allocation) when no proxy forwards headers
    /// or the client sent none of them.
    pub fn capture<'a>(&self, get: impl Fn(&str) -> Option<&'a str>) -> Option<Arc<Headers>> {
        if self.header_names.is_empty() {
            return None;
        }
        let found: Vec<(String, String)> = self
            .header_names
            .iter()
            .filter_map(|n| get(n).map(|v| (n.clone(), v.to_string())))
            .collect();
        (!found.is_empty()).then(|| Arc::new(Headers(found)))
    }
}

impl crate::Node {
    /// An RPC from the server API (the Centrifugo-compatible `rpc` method),
    /// answered by `client.rpc_proxy` like a client's: no client, no user,
    /// transport `api`, JSON data. None when no rpc proxy is configured.
    pub async fn api_rpc(
        &self,
        method: &str,
        data: Bytes,
    ) -> Option<Result<ProxyAnswer, ProxyFailure>> {
        let proxy = self.config().proxies.rpc()?.clone();
        let ctx = CallContext {
            client: "".into(),
            transport: "api",
            protocol: "json",
            user: "".into(),
            meta: Bytes::new(),
            headers: None,
            rules: self.config().data_rules,
        };
        let request = ProxyRequest::Rpc { method: method.to_string(), data };
        Some(proxy.call(&ctx, &request).await)
    }
}

/// The answer with every value a client or other clients will see made safe
/// as a client's own would be (`crate::ingress`): info is JSON (others see it
/// embedded in JSON frames), data follows the client's protocol. Codes must
/// be ones clients understand.
fn checked(
    answer: ProxyAnswer,
    rules: &DataRules,
    json: bool,
) -> Result<ProxyAnswer, ProxyFailure> {
    let bad = |what: &str, e: DataError| ProxyFailure::BadAnswer(format!("{what}: {e}"));
    let info =
        |b: Bytes| if b.is_empty() { Ok(b) } else { rules.check(b).map_err(|e| bad("info", e)) };
    let data = |b: Bytes| match (b.is_empty(), json) {
        (true, _) => Ok(b),
        (false, true) => rules.check(b).map_err(|e| bad("data", e)),
        (false, false) => rules.check_opaque(b).map_err(|e| bad("data", e)),
    };
    let result = match answer {
        ProxyAnswer::Error { code, .. } if !valid_error_code(code) => {
            return Err(ProxyFailure::BadAnswer(format!("error code {code} is not in 100-1999")));
        }
        ProxyAnswer::Disconnect { code, .. } if !valid_disconnect_code(code.into()) => {
            return Err(ProxyFailure::BadAnswer(format!(
                "disconnect code {code} is not in 3000-4999"
            )));
        }
        ProxyAnswer::Result(r) => r,
        other => return Ok(other),
    };
    let result = match result {
        ProxyResult::Connect(mut a) => {
            a.info = info(a.info)?;
            a.data = data(a.data)?;
            a.meta = info(a.meta)?;
            for (_, o) in &mut a.subs {
                o.info = info(std::mem::take(&mut o.info))?;
                o.data = data(std::mem::take(&mut o.data))?;
            }
            ProxyResult::Connect(a)
        }
        ProxyResult::Subscribe(mut a) => {
            a.info = info(a.info)?;
            a.data = data(a.data)?;
            ProxyResult::Subscribe(a)
        }
        ProxyResult::Publish(mut a) => {
            a.data = match a.data.filter(|d| !d.is_empty()) {
                Some(d) => Some(data(d)?),
                None => None,
            };
            ProxyResult::Publish(a)
        }
        ProxyResult::Refresh(mut a) => {
            a.info = info(a.info)?;
            ProxyResult::Refresh(a)
        }
        ProxyResult::Rpc(d) => ProxyResult::Rpc(data(d)?),
    };
    Ok(ProxyAnswer::Result(result))
}

/// An error code a backend may answer with: the protocol's range (built-in
/// codes below 400, custom ones 400-1999). Others are not errors a client
/// understands.
pub fn valid_error_code(code: u32) -> bool {
    (100..2000).contains(&code)
}

/// A disconnect code a backend may close a client with: 3000-4999
/// (4000-4499 tell the client to reconnect, 4500-4999 not to).
pub fn valid_disconnect_code(code: u32) -> bool {
    (3000..5000).contains(&code)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(Result<ProxyAnswer, ProxyFailure>, Duration);

    impl ProxyBackend for Fixed {
        fn call(&self, _: &CallContext, _: &ProxyRequest) -> ProxyFuture {
            let (out, delay) = (self.0.clone(), self.1);
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                out
            })
        }
    }

    fn ctx() -> CallContext {
        CallContext {
            client: "c".into(),
            transport: "websocket",
            protocol: "json",
            user: "".into(),
            meta: Bytes::new(),
            headers: None,
            rules: DataRules::default(),
        }
    }

    #[tokio::test]
    async fn answers_are_made_as_safe_as_client_data() {
        let rpc =
            |d: &'static [u8]| Ok(ProxyAnswer::Result(ProxyResult::Rpc(Bytes::from_static(d))));
        let call = |answer, protocol| async move {
            let p =
                Proxy::new("p", Duration::from_secs(1), Box::new(Fixed(answer, Duration::ZERO)));
            let req = ProxyRequest::Rpc { method: "m".into(), data: Bytes::new() };
            p.call(&CallContext { protocol, ..ctx() }, &req).await
        };
        // Pretty-printed JSON is compacted (raw newlines would split a JSON frame).
        assert_eq!(call(rpc(b"{\n \"a\": 1\n}"), "json").await, rpc(b"{\"a\":1}"));
        // Bytes that are not JSON cannot go to a JSON client; a Protobuf one takes them.
        assert!(matches!(call(rpc(b"\xff\x00"), "json").await, Err(ProxyFailure::BadAnswer(_))));
        assert_eq!(call(rpc(b"\xff\x00"), "protobuf").await, rpc(b"\xff\x00"));
        let info = Ok(ProxyAnswer::Result(ProxyResult::Refresh(RefreshAnswer {
            info: Bytes::from_static(b"not json"),
            ..Default::default()
        })));
        assert!(matches!(call(info, "protobuf").await, Err(ProxyFailure::BadAnswer(_))));
        let code = Ok(ProxyAnswer::Error { code: 3000, message: "x".into(), temporary: false });
        assert!(matches!(call(code, "json").await, Err(ProxyFailure::BadAnswer(_))));
        let close = Ok(ProxyAnswer::Disconnect { code: 4501, reason: "bye".into() });
        assert_eq!(call(close.clone(), "json").await, close);
    }

    #[tokio::test(start_paused = true)]
    async fn a_backend_slower_than_the_timeout_is_a_timeout_failure() {
        let answer = Ok(ProxyAnswer::Result(ProxyResult::Rpc(Bytes::from_static(b"1"))));
        let p = Proxy::new(
            "slow",
            Duration::from_secs(1),
            Box::new(Fixed(answer.clone(), Duration::from_secs(5))),
        );
        let req = ProxyRequest::Rpc { method: "m".into(), data: Bytes::new() };
        assert_eq!(p.call(&ctx(), &req).await, Err(ProxyFailure::Timeout(Duration::from_secs(1))));
        let fast = Proxy::new(
            "fast",
            Duration::from_secs(1),
            Box::new(Fixed(answer.clone(), Duration::ZERO)),
        );
        assert_eq!(fast.call(&ctx(), &req).await, answer);
    }

    #[test]
    fn only_listed_headers_are_captured_and_none_costs_nothing() {
        let none = Proxies::new(Vec::new(), Vec::new());
        assert_eq!(none.capture(|_| Some("x")), None);
        let p = Proxies::new(Vec::new(), vec!["Cookie".into(), "X-Token".into(), "cookie".into()]);
        let got = p.capture(|n| match n {
            "cookie" => Some("sid=1"),
            "authorization" => Some("Bearer no"),
            _ => None,
        });
        assert_eq!(got.as_deref(), Some(&Headers(vec![("cookie".into(), "sid=1".into())])));
        assert_eq!(p.capture(|_| None), None);
    }

    #[test]
    fn client_proxies_must_name_an_entry() {
        let p = Proxies::new(Vec::new(), Vec::new());
        assert_eq!(
            p.clone().with_client_proxies("nope", "", "").unwrap_err(),
            UnknownProxy("nope".into())
        );
        assert!(p.with_client_proxies("", "", "").is_ok());
    }

    #[test]
    fn code_ranges() {
        assert!(valid_error_code(103) && valid_error_code(1000) && !valid_error_code(2000));
        assert!(!valid_error_code(0));
        assert!(valid_disconnect_code(4501) && !valid_disconnect_code(1000));
    }
}
