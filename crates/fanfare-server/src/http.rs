//! The public HTTP port: WebSocket upgrades, health, readiness and metrics.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use fanfare_core::Node;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::api::ApiContext;
use crate::transport::emulation::{self, Stream};
use crate::transport::uni::{self, Framing};
use crate::transport::websocket::{self, WsOptions};
use crate::transport::{AnyBody, Cors, ReqBody, add_cors, bare, preflight};

pub type Body = Full<Bytes>;

pub fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// What every HTTP request needs.
#[derive(Clone)]
pub struct HttpState {
    pub node: Node,
    pub ws: Arc<WsOptions>,
    pub metrics: PrometheusHandle,
    pub api: Arc<ApiContext>,
    pub deadlines: Deadlines,
    /// `[limits]` checked before a connection opens.
    pub admission: Arc<crate::limits::Admission>,
    /// `transports.*`: which optional transports answer.
    pub http_stream: bool,
    pub sse: bool,
    pub uni_sse: bool,
    pub uni_http_stream: bool,
    pub uni_websocket: bool,
    /// HTTP API calls being answered: shutdown waits for them.
    pub api_calls: Arc<InFlight>,
    /// The admin console (`admin.enabled`); `None`: `/admin` answers 404.
    pub admin: Option<Arc<crate::admin::Admin>>,
}

/// A count of requests being answered, for a shutdown that lets them finish.
#[derive(Debug, Default)]
pub struct InFlight(AtomicUsize);

impl InFlight {
    pub fn count(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }

    /// Counts one request until the guard is dropped (also when the
    /// request's future is dropped half-way).
    fn enter(&self) -> InFlightGuard<'_> {
        self.0.fetch_add(1, Ordering::AcqRel);
        InFlightGuard(self)
    }
}

struct InFlightGuard<'a>(&'a InFlight);

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How long a client may take to send a request (`http.*_timeout`). Without
/// them a socket that sends nothing, half a header line or part of a body
/// holds a file descriptor forever, and a few thousand such sockets lock
/// healthy clients out. A WebSocket is no longer HTTP once upgraded, so its
/// life is governed by pings instead.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    /// For the request head; also the idle time of a kept-alive connection
    /// (hyper runs one timer from the moment it waits for a head).
    pub header: Duration,
    /// For the body, once the head is in.
    pub body: Duration,
}

/// The transports answered with a streamed response, and `/emulation`.
enum HttpTransport {
    Emulated(Stream),
    Uni(Framing),
    Emulation,
}

fn http_transport(path: &str, st: &HttpState) -> Option<HttpTransport> {
    Some(match path {
        "/connection/http_stream" if st.http_stream => HttpTransport::Emulated(Stream::HttpStream),
        "/connection/sse" if st.sse => HttpTransport::Emulated(Stream::Sse),
        "/emulation" if st.http_stream || st.sse => HttpTransport::Emulation,
        "/connection/uni_sse" if st.uni_sse => HttpTransport::Uni(Framing::Sse),
        "/connection/uni_http_stream" if st.uni_http_stream => {
            HttpTransport::Uni(Framing::HttpStream)
        }
        _ => return None,
    })
}

/// Answers a request for an HTTP transport, from hyper or from
/// `transport::bare`.
async fn serve_http_transport(
    t: HttpTransport,
    req: Request<impl ReqBody>,
    st: &HttpState,
    peer: SocketAddr,
) -> Response<AnyBody> {
    // The browser fallbacks are fetched cross-origin: preflights and CORS
    // headers for the HTTP transports.
    let cors = Cors::of(req.headers());
    let opens = !matches!(t, HttpTransport::Emulation) && req.method() != Method::OPTIONS;
    let refusal =
        if opens { st.admission.admit(&st.node, peer, req.headers()).err() } else { None };
    let mut r = if req.method() == Method::OPTIONS {
        preflight()
    } else if let Some(refusal) = refusal {
        refused(refusal).map(http_body_util::Either::Left)
    } else {
        let (node, body) = (st.node.clone(), st.deadlines.body);
        match t {
            HttpTransport::Emulated(stream) => {
                emulation::connect(req, node, &st.ws, stream, body).await
            }
            HttpTransport::Emulation => emulation::emulate(req, &node, &st.ws, body).await,
            HttpTransport::Uni(framing) => uni::handle(req, node, &st.ws, framing, body).await,
        }
    };
    add_cors(&cors, &st.ws, &mut r);
    r
}

async fn route(req: Request<Incoming>, st: HttpState, peer: SocketAddr) -> Response<AnyBody> {
    match http_transport(req.uri().path(), &st) {
        Some(t) => serve_http_transport(t, req, &st, peer).await,
        None => route_complete(req, st, peer).await.map(http_body_util::Either::Left),
    }
}

async fn route_complete(req: Request<Incoming>, st: HttpState, peer: SocketAddr) -> Response<Body> {
    let path = req.uri().path();
    if path.starts_with("/api/") || path.starts_with(crate::centrifugo::http::PREFIX) {
        let calls = st.api_calls.clone();
        let _call = calls.enter();
        return api_request(req, st, peer).await;
    }
    let path = req.uri().path();
    if path == "/admin" || path.starts_with("/admin/") {
        return match &st.admin {
            Some(admin) => crate::admin::handle(admin, req, peer, st.deadlines.body).await,
            None => plain(StatusCode::NOT_FOUND, "not found\n"),
        };
    }
    let websocket = path == "/connection/websocket"
        || (path == "/connection/uni_websocket" && st.uni_websocket);
    if websocket && let Err(refusal) = st.admission.admit(&st.node, peer, req.headers()) {
        return refused(refusal);
    }
    match (req.method(), req.uri().path()) {
        (_, "/connection/websocket") => {
            websocket::upgrade(req, st.node.clone(), st.ws.clone(), websocket::Mode::Bidirectional)
        }
        (_, "/connection/uni_websocket") if st.uni_websocket => {
            websocket::upgrade(req, st.node.clone(), st.ws.clone(), websocket::Mode::Unidirectional)
        }
        (&Method::GET, "/health") => plain(StatusCode::OK, "ok\n"),
        (&Method::GET, "/ready") => {
            if st.node.is_ready() {
                plain(StatusCode::OK, "ready\n")
            } else {
                plain(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        (&Method::GET, "/metrics") => {
            refresh_gauges(&st.node);
            let mut r = Response::new(Full::new(Bytes::from(st.metrics.render())));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        (_, "/health" | "/ready" | "/metrics") => {
            plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => plain(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// The answer to a connection refused by `[limits]`, before its upgrade:
/// 503 or 429, with `Retry-After` (a second refills the rate limits).
fn refused(refusal: crate::limits::Refusal) -> Response<Body> {
    let mut r = plain(refusal.status(), refusal.text());
    r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// An API call (`/api/*`, Centrifugo's `/api/*` names), in a span carrying
/// its request id, which the answer echoes in `X-Request-Id`.
async fn api_request(req: Request<Incoming>, st: HttpState, peer: SocketAddr) -> Response<Body> {
    use tracing::Instrument;
    let (span, id) = crate::api::request_span(req.headers().get(crate::api::REQUEST_ID));
    let call = async {
        // The path names the method; query, headers and body stay out of logs.
        let path = req.uri().path().to_owned();
        let (node, api, body) = (&st.node, &*st.api, st.deadlines.body);
        let r = if path.starts_with("/api/") {
            crate::api_http::handle(req, node, api, peer, body).await
        } else {
            crate::centrifugo::http::handle(req, node, api, peer, body).await
        };
        tracing::debug!(%peer, path, status = r.status().as_u16(), "api request");
        r
    };
    let mut r = call.instrument(span).await;
    if let Some(id) = id {
        r.headers_mut().insert(crate::api::REQUEST_ID, id);
    }
    r
}

/// Accepts connections until `stop` turns true; with `tls`, every connection
/// is a TLS one (`http.tls_cert`).
pub async fn serve(
    listener: TcpListener,
    st: HttpState,
    tls: Option<TlsAcceptor>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (stream, peer): (_, SocketAddr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let st = st.clone();
        // Two task types: a plain connection's task is what it was before
        // TLS existed.
        match &tls {
            None => tokio::spawn(serve_plain(stream, peer, st)),
            Some(tls) => tokio::spawn(serve_tls(stream, peer, st, tls.clone())),
        };
    }
}

/// One plain connection: `transport::bare` for a long-lived stream as the
/// first request, else hyper.
async fn serve_plain(stream: TcpStream, peer: SocketAddr, st: HttpState) {
    let header_timeout = st.deadlines.header;
    // A long-lived stream as the connection's first request is served
    // on the bare socket, without hyper's buffers (`transport::bare`).
    let streams = [st.sse, st.http_stream, st.uni_sse, st.uni_http_stream];
    if streams.contains(&true) {
        let mut first = [0u8; 40];
        match tokio::time::timeout(header_timeout, stream.peek(&mut first)).await {
            Ok(Ok(n)) if n > 0 => {
                if bare::wants(&first[..n], &streams) {
                    let (body, max) = (st.deadlines.body, st.ws.max_message_size);
                    let st2 = st.clone();
                    let handle = |req: Request<_>| async move {
                        match http_transport(req.uri().path(), &st2) {
                            Some(t) => serve_http_transport(t, req, &st2, peer).await,
                            None => crate::transport::refuse(
                                StatusCode::NOT_FOUND,
                                serde_json::json!({"error": "not found"}),
                            ),
                        }
                    };
                    // Boxed: the accept task of every other connection
                    // (WebSocket upgrades) stays as small as before.
                    Box::pin(bare::serve(stream, header_timeout, body, max, handle)).await;
                    return;
                }
            }
            // Closed, failed, or silent past the header deadline.
            _ => return,
        }
    }
    serve_hyper(TokioIo::new(stream), peer, st).await
}

/// One TLS connection: the handshake, then hyper. The handshake counts
/// against `http.header_read_timeout` (a client stalling in it holds a socket
/// like one stalling in its request head). The long-lived HTTP streams are
/// served by hyper here (`transport::bare` reads a bare socket).
async fn serve_tls(stream: TcpStream, peer: SocketAddr, st: HttpState, tls: TlsAcceptor) {
    let stream = match tokio::time::timeout(st.deadlines.header, tls.accept(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake not completed within http.header_read_timeout");
            return;
        }
    };
    serve_hyper(TokioIo::new(stream), peer, st).await
}

async fn serve_hyper<I>(io: TokioIo<I>, peer: SocketAddr, st: HttpState)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let header_timeout = st.deadlines.header;
    let svc = service_fn(move |req| {
        let st = st.clone();
        async move { Ok::<_, Infallible>(route(req, st, peer).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(io, svc)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!(%peer, error = %e, "http connection error");
    }
}

/// Refreshes gauges that are cheaper to read on scrape than to track per event.
fn refresh_gauges(node: &Node) {
    metrics::gauge!("fanfare_node_uptime_seconds").set(node.uptime().as_secs_f64());
    metrics::gauge!("fanfare_node_ready").set(if node.is_ready() { 1.0 } else { 0.0 });
}
