//! Client transports. Each one carries the same [`fanfare_core::Session`]
//! and runs the same connection loop ([`driver::drive`]); a transport only
//! says how bytes come in and go out ([`driver::Wire`]).
//!
//! | path | module | client |
//! |---|---|---|
//! | `/connection/websocket` | [`websocket`] | every SDK: JSON or Protobuf |
//! | `/connection/http_stream` + `/emulation` | [`emulation`] | centrifuge-js fallback |
//! | `/connection/sse` + `/emulation` | [`emulation`] | centrifuge-js fallback |
//! | `/connection/uni_websocket` | [`uni`] | no SDK, receive only |
//! | `/connection/uni_sse` | [`uni`] | `EventSource`, `curl` |
//! | `/connection/uni_http_stream` | [`uni`] | `curl`, devices |
//!
//! The WebSocket frame codec (`frame.rs`) lives in the library part of the
//! crate as `fanfare_server::ws`.

pub(crate) mod bare;
pub(crate) mod driver;
pub(crate) mod emulation;
pub(crate) mod uni;
pub(crate) mod websocket;

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Frame;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::Value;
use tokio::sync::mpsc;

pub(crate) use websocket::WsOptions;

/// A response body fed by the connection's task, one chunk per write.
pub struct StreamBody(mpsc::Receiver<Bytes>);

impl StreamBody {
    /// The body, and the sender its connection writes into. A capacity of
    /// one: a chunk waits in the channel only while hyper writes the last.
    pub(crate) fn channel() -> (mpsc::Sender<Bytes>, Self) {
        let (tx, rx) = mpsc::channel(1);
        (tx, Self(rx))
    }
}

impl StreamBody {
    /// The next chunk; `None` once the connection's task ended the stream.
    pub(crate) async fn next(&mut self) -> Option<Bytes> {
        self.0.recv().await
    }
}

/// Bodies the handlers read: hyper's, or one `bare` read already.
pub(crate) trait ReqBody:
    http_body::Body<Data = Bytes, Error: Into<BoxError>> + Send
{
}
impl<B: http_body::Body<Data = Bytes, Error: Into<BoxError>> + Send> ReqBody for B {}
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl http_body::Body for StreamBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b))))
    }
}

/// Every HTTP response: complete, or streamed (the HTTP transports).
pub type AnyBody = http_body_util::Either<Full<Bytes>, StreamBody>;

/// A JSON refusal with `status`.
pub(crate) fn refuse(status: StatusCode, body: Value) -> Response<AnyBody> {
    let mut r =
        Response::new(http_body_util::Either::Left(Full::new(Bytes::from(body.to_string()))));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// A streamed response of `content_type`, fed through `body`.
pub(crate) fn streamed(body: StreamBody, content_type: &'static str) -> Response<AnyBody> {
    let mut r = Response::new(http_body_util::Either::Right(body));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Reverse proxies (nginx) would otherwise buffer the stream.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

/// The percent-decoded value of `name` in a query string.
pub(crate) fn url_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| {
            let v = v.replace('+', " ");
            percent_encoding::percent_decode_str(&v).decode_utf8_lossy().into_owned()
        })
    })
}

/// Cross-origin access to the HTTP transports from a page on another origin
/// (the browser fallbacks post with `mode: 'cors'`): an allowed `Origin` is
/// echoed (never `*`, so the policy stays `websocket.allowed_origins`), and a
/// preflight learns the methods and headers it asked for.
pub(crate) fn add_cors(request: &HeaderMap, opts: &WsOptions, response: &mut Response<AnyBody>) {
    let Some(origin) = request.get(header::ORIGIN) else { return };
    if !opts.origin_allowed(Some(origin)) {
        return;
    }
    let h = response.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    h.insert(header::VARY, HeaderValue::from_static("Origin"));
    h.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
    if let Some(asked) = request.get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
    }
    if request.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD) {
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    }
}

/// The answer to a CORS preflight (`OPTIONS`); headers come from [`add_cors`].
pub(crate) fn preflight() -> Response<AnyBody> {
    let mut r = Response::new(http_body_util::Either::Left(Full::new(Bytes::new())));
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}
