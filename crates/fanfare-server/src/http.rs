//! The public HTTP port: WebSocket upgrades, health, readiness and metrics.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
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
use crate::transport::{AnyBody, add_cors, preflight};

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

async fn route(req: Request<Incoming>, st: HttpState, peer: SocketAddr) -> Response<AnyBody> {
    enum Http {
        Emulated(Stream),
        Uni(Framing),
        Emulation,
    }
    let http = match req.uri().path() {
        "/connection/http_stream" if st.http_stream => Some(Http::Emulated(Stream::HttpStream)),
        "/connection/sse" if st.sse => Some(Http::Emulated(Stream::Sse)),
        "/emulation" if st.http_stream || st.sse => Some(Http::Emulation),
        "/connection/uni_sse" if st.uni_sse => Some(Http::Uni(Framing::Sse)),
        "/connection/uni_http_stream" if st.uni_http_stream => Some(Http::Uni(Framing::HttpStream)),
        _ => None,
    };
    let Some(http) = http else {
        return route_complete(req, st, peer).await.map(http_body_util::Either::Left);
    };
    // The browser fallbacks are fetched cross-origin: preflights and CORS
    // headers for the HTTP transports.
    let headers = req.headers().clone();
    let mut r = if req.method() == Method::OPTIONS {
        preflight()
    } else {
        let (node, body) = (st.node.clone(), st.deadlines.body);
        match http {
            Http::Emulated(stream) => emulation::connect(req, node, &st.ws, stream, body).await,
            Http::Emulation => emulation::emulate(req, &node, &st.ws, body).await,
            Http::Uni(framing) => uni::handle(req, node, &st.ws, framing, body).await,
        }
    };
    add_cors(&headers, &st.ws, &mut r);
    r
}

async fn route_complete(req: Request<Incoming>, st: HttpState, peer: SocketAddr) -> Response<Body> {
    if req.uri().path().starts_with("/api/") {
        return crate::api_http::handle(req, &st.node, &st.api, peer, st.deadlines.body).await;
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
            crate::refresh_gauges(&st.node);
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
