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
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Frame;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};

pub(crate) use websocket::WsOptions;

/// A response body fed by the connection's task, one chunk per write,
/// through a one-chunk slot: about 100 bytes per connection where a tokio
/// channel would preallocate a block of 32 slots (1 KiB), and a stream is
/// idle nearly all of its life.
pub struct StreamBody(Arc<Slot>);

/// The sending side of a [`StreamBody`]; dropping it ends the body.
pub(crate) struct BodySender(Arc<Slot>);

#[derive(Default)]
struct Slot {
    state: Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    chunk: Option<Bytes>,
    /// The connection's task waits for room or for the reader to go away.
    sender: Option<Waker>,
    /// The body's reader waits for a chunk.
    reader: Option<Waker>,
    sender_gone: bool,
    reader_gone: bool,
}

impl Slot {
    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl StreamBody {
    /// The body, and the sender its connection writes into.
    pub(crate) fn channel() -> (BodySender, Self) {
        let slot = Arc::new(Slot::default());
        (BodySender(slot.clone()), Self(slot))
    }

    fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        let mut s = self.0.lock();
        if let Some(chunk) = s.chunk.take() {
            if let Some(w) = s.sender.take() {
                w.wake();
            }
            return Poll::Ready(Some(chunk));
        }
        if s.sender_gone {
            return Poll::Ready(None);
        }
        s.reader = Some(cx.waker().clone());
        Poll::Pending
    }

    /// The next chunk; `None` once the connection's task ended the stream.
    pub(crate) async fn next(&mut self) -> Option<Bytes> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }
}

impl Drop for StreamBody {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.reader_gone = true;
        s.chunk = None;
        if let Some(w) = s.sender.take() {
            w.wake();
        }
    }
}

impl BodySender {
    /// Hands one chunk to the body once the previous one was taken; `Err`
    /// when the reader is gone (the client went away).
    pub(crate) async fn send(&self, chunk: Bytes) -> Result<(), Bytes> {
        let mut chunk = Some(chunk);
        std::future::poll_fn(|cx| {
            let mut s = self.0.lock();
            if s.reader_gone {
                return Poll::Ready(Err(chunk.take().unwrap_or_default()));
            }
            if s.chunk.is_some() {
                s.sender = Some(cx.waker().clone());
                return Poll::Pending;
            }
            s.chunk = chunk.take();
            if let Some(w) = s.reader.take() {
                w.wake();
            }
            Poll::Ready(Ok(()))
        })
        .await
    }

    /// Hands a chunk over only if the slot is free now.
    pub(crate) fn try_send(&self, chunk: Bytes) -> bool {
        let mut s = self.0.lock();
        if s.reader_gone || s.chunk.is_some() {
            return false;
        }
        s.chunk = Some(chunk);
        if let Some(w) = s.reader.take() {
            w.wake();
        }
        true
    }

    /// Resolves once the body's reader is gone.
    pub(crate) async fn closed(&self) {
        std::future::poll_fn(|cx| {
            let mut s = self.0.lock();
            if s.reader_gone {
                return Poll::Ready(());
            }
            s.sender = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

impl Drop for BodySender {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.sender_gone = true;
        if let Some(w) = s.reader.take() {
            w.wake();
        }
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
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.poll_next(cx).map(|c| c.map(|b| Ok(Frame::data(b))))
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

/// Reads a whole request body of at most `limit` bytes within `timeout`.
pub(crate) async fn read_body(
    req: Request<impl ReqBody>,
    limit: usize,
    timeout: Duration,
    key: &str,
) -> Result<Bytes, Response<AnyBody>> {
    let body = Limited::new(req.into_body(), limit).collect();
    match tokio::time::timeout(timeout, body).await {
        Err(_) => Err(refuse(
            StatusCode::REQUEST_TIMEOUT,
            json!({"error": "request body not received in time (http.body_read_timeout)"}),
        )),
        Ok(Err(_)) => Err(refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            json!({"error": format!("request body larger than {limit} bytes ({key})")}),
        )),
        Ok(Ok(b)) => Ok(b.to_bytes()),
    }
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
pub(crate) fn add_cors(request: &Cors, opts: &WsOptions, response: &mut Response<AnyBody>) {
    let Some(origin) = &request.origin else { return };
    if !opts.origin_allowed(Some(origin)) {
        return;
    }
    let h = response.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    h.insert(header::VARY, HeaderValue::from_static("Origin"));
    h.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
    if let Some(asked) = &request.asked_headers {
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
    }
    if request.preflight {
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    }
}

/// The request headers CORS answers depend on, taken before the request is
/// handed on (not a copy of the whole header map per request).
pub(crate) struct Cors {
    origin: Option<HeaderValue>,
    asked_headers: Option<HeaderValue>,
    preflight: bool,
}

impl Cors {
    pub(crate) fn of(request: &HeaderMap) -> Self {
        Self {
            origin: request.get(header::ORIGIN).cloned(),
            asked_headers: request.get(header::ACCESS_CONTROL_REQUEST_HEADERS).cloned(),
            preflight: request.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD),
        }
    }
}

/// The `{"disconnect": {...}}` body of a refused connect (and the last
/// message of a unidirectional stream).
/// The client headers some `[[proxies]]` entry forwards (`http_headers`),
/// taken from the request that opens a connection. None, and no allocation,
/// when no proxy forwards headers.
pub(crate) fn proxy_headers(
    node: &fanfare_core::Node,
    headers: &HeaderMap,
) -> Option<Arc<fanfare_core::proxy::Headers>> {
    node.config().proxies.capture(|name| headers.get(name).and_then(|v| v.to_str().ok()))
}

pub(crate) fn disconnect_json(code: fanfare_protocol::DisconnectCode) -> Value {
    json!({"disconnect": {"code": code.0, "reason": code.reason()}})
}

/// The answer to a CORS preflight (`OPTIONS`); headers come from [`add_cors`].
pub(crate) fn preflight() -> Response<AnyBody> {
    let mut r = Response::new(http_body_util::Either::Left(Full::new(Bytes::new())));
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_body_slot_hands_chunks_over_in_order_and_ends_when_the_sender_goes() {
        let (tx, mut body) = StreamBody::channel();
        let writer = tokio::spawn(async move {
            for i in 0..3u8 {
                tx.send(Bytes::from(vec![i])).await.unwrap();
            }
        });
        for i in 0..3u8 {
            assert_eq!(body.next().await.unwrap()[..], [i]);
        }
        writer.await.unwrap();
        assert_eq!(body.next().await, None, "the sender is gone: the body ends");
    }

    #[tokio::test]
    async fn a_sender_waits_for_room_and_learns_when_the_reader_is_gone() {
        let (tx, body) = StreamBody::channel();
        assert!(tx.try_send(Bytes::from_static(b"a")));
        assert!(!tx.try_send(Bytes::from_static(b"b")), "one chunk at a time");
        let waiting = tokio::spawn(async move {
            let r = tx.send(Bytes::from_static(b"b")).await;
            tx.closed().await;
            r
        });
        tokio::task::yield_now().await;
        drop(body);
        assert_eq!(waiting.await.unwrap(), Err(Bytes::from_static(b"b")));
    }
}
