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
use tokio::net::TcpListener;
use tokio::sync::watch;

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
    /// `transports.*`: which optional transports answer.
    pub http_stream: bool,
    pub sse: bool,
    pub uni_sse: bool,
    pub uni_http_stream: bool,
    pub uni_websocket: bool,
    /// HTTP API calls being answered: shutdown waits for them.
    pub api_calls: Arc<InFlight>,
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
) -> Response<AnyBody> {
    // The browser fallbacks are fetched cross-origin: preflights and CORS
    // headers for the HTTP transports.
    let cors = Cors::of(req.headers());
    let mut r = if req.method() == Method::OPTIONS {
        preflight()
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
        Some(t) => serve_http_transport(t, req, &st).await,
        None => route_complete(req, st, peer).await.map(http_body_util::Either::Left),
    }
}

async fn route_complete(req: Request<Incoming>, st: HttpState, peer: SocketAddr) -> Response<Body> {
    if req.uri().path().starts_with("/api/") {
        let _call = st.api_calls.enter();
        return crate::api_http::handle(req, &st.node, &st.api, peer, st.deadlines.body).await;
    }
    if req.uri().path().starts_with(crate::centrifugo::http::PREFIX) {
        let _call = st.api_calls.enter();
        return crate::centrifugo::http::handle(req, &st.node, &st.api, peer, st.deadlines.body)
            .await;
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

/// Accepts connections until `stop` turns true.
pub async fn serve(listener: TcpListener, st: HttpState, mut stop: watch::Receiver<bool>) {
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
        let header_timeout = st.deadlines.header;
        tokio::spawn(async move {
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
                                    Some(t) => serve_http_transport(t, req, &st2).await,
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
            let svc = service_fn(move |req| {
                let st = st.clone();
                async move { Ok::<_, Infallible>(route(req, st, peer).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades();
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "http connection error");
            }
        });
    }
}

/// Refreshes gauges that are cheaper to read on scrape than to track per event.
fn refresh_gauges(node: &Node) {
    metrics::gauge!("fanfare_node_uptime_seconds").set(node.uptime().as_secs_f64());
    metrics::gauge!("fanfare_node_ready").set(if node.is_ready() { 1.0 } else { 0.0 });
}
