//! The gRPC transport: HTTP/2 connections served with the `h2` crate directly.
//!
//! `fanfare.v1.ControlService` and `centrifugal.centrifugo.api.CentrifugoApi`
//! calls (all unary) are decoded, authorized and answered right in the
//! connection's task: every call whose request frames
//! arrived in one read is started before the connection is polled again, so
//! their responses leave in one write, and a call costs no task, no router and
//! no streaming codec. Everything else (the standard health service, server
//! reflection, unknown services) goes to tonic's `Routes` in a task of its own.
//! docs/ARCHITECTURE.md ("Control API transport") has the measurements.

use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use prost::Message;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tonic::Status;
use tonic::codegen::Service;
use tonic::service::Routes;

use crate::api::{ApiContext, AuthFailure};
use crate::centrifugo::grpc::{self as centrifugo, Target as CentrifugoTarget};
use crate::methods::{Api, Method};
use fanfare_core::Node;
use fanfare_server::pb;
use pb::control_service_server::ControlService;

const CONTROL_PREFIX: &str = "/fanfare.v1.ControlService/";

/// A call this transport runs itself.
#[derive(Debug, Clone, Copy)]
enum Target {
    Control(Method),
    Centrifugo(CentrifugoTarget),
}

/// Streams one connection may have open at once (calls beyond it wait in the
/// client).
const MAX_CONCURRENT_STREAMS: u32 = 1024;
/// Flow-control windows: large enough that unary calls never wait for a
/// WINDOW_UPDATE.
const WINDOW: u32 = 1 << 20;
/// A client that opens a TCP connection but never completes the HTTP/2
/// preface is dropped after this long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What every connection of a node's gRPC port shares. `C` implements the
/// ControlService calls; this module only carries them.
/// CentrifugoApi calls run on `node` (`crate::centrifugo::grpc`).
pub struct GrpcService<C> {
    control: C,
    node: Node,
    ctx: Arc<ApiContext>,
    /// Health, reflection and the UNIMPLEMENTED fallback.
    routes: Routes,
}

impl<C: ControlService> GrpcService<C> {
    pub fn new(control: C, node: Node, ctx: Arc<ApiContext>, routes: Routes) -> GrpcService<C> {
        GrpcService { control, node, ctx, routes: routes.prepare() }
    }
}

/// Serves gRPC on `listener` until `stop` turns true.
///
/// The connections are served on `threads` dedicated threads, each with its own
/// current-thread runtime; accepted connections are dealt round-robin. On a
/// current-thread runtime the responses that calls finish while the connection
/// waits are written together, one syscall for many (docs/BENCHMARKS.md); the
/// HTTP/2 side is [`serve_connection`].
///
/// With `tls` (`grpc.tls_cert`), every connection is a TLS one; its handshake
/// runs on the worker thread, bounded like the HTTP/2 preface.
pub async fn serve<C: ControlService>(
    listener: tokio::net::TcpListener,
    threads: usize,
    service: GrpcService<C>,
    tls: Option<TlsAcceptor>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let service = Arc::new(service);
    let threads = threads.max(1);
    let mut done = Vec::with_capacity(threads);
    let mut senders = Vec::with_capacity(threads);
    for i in 0..threads {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<std::net::TcpStream>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<anyhow::Result<()>>();
        let (service, stop, tls) = (service.clone(), stop.clone(), tls.clone());
        std::thread::Builder::new().name(format!("fanfare-grpc-{i}")).spawn(move || {
            let served = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(serve_worker(rx, service, tls, stop)));
            let _ = done_tx.send(served);
        })?;
        done.push(done_rx);
        senders.push(tx);
    }
    let mut next = 0usize;
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "gRPC accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        match stream.into_std() {
            Ok(s) => {
                let _ = senders[next % senders.len()].send(s);
                next = next.wrapping_add(1);
            }
            Err(e) => tracing::warn!(error = %e, "gRPC connection not handed over"),
        }
    }
    drop(listener);
    drop(senders);
    // Each worker drains its connections gracefully, then ends. (The caller
    // bounds this wait: a client that never lets go must not hold up exit.)
    for d in done {
        match d.await {
            Ok(Err(e)) => tracing::error!(error = %e, "gRPC worker failed"),
            Err(_) => tracing::error!("gRPC worker ended abnormally"),
            Ok(Ok(())) => {}
        }
    }
    Ok(())
}

/// One gRPC worker thread: serves the connections it is handed until `stop`,
/// then waits for them to finish gracefully.
async fn serve_worker<C: ControlService>(
    mut incoming: tokio::sync::mpsc::UnboundedReceiver<std::net::TcpStream>,
    service: Arc<GrpcService<C>>,
    tls: Option<TlsAcceptor>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut conns = tokio::task::JoinSet::new();
    let mut stopping = std::pin::pin!(stopped(stop.clone()));
    loop {
        tokio::select! {
            s = incoming.recv() => {
                let Some(s) = s else { break };
                // Registered with this thread's runtime here. A socket that
                // cannot be registered is dropped; the worker goes on serving.
                match tokio::net::TcpStream::from_std(s) {
                    Ok(io) => {
                        let (service, stop) = (service.clone(), stopped(stop.clone()));
                        let peer = io.peer_addr().ok();
                        match &tls {
                            None => conns.spawn(serve_connection(io, peer, service, stop)),
                            Some(tls) => {
                                conns.spawn(serve_tls_connection(io, peer, tls.clone(), service, stop))
                            }
                        };
                    }
                    Err(e) => tracing::warn!(error = %e, "gRPC connection dropped: cannot register it"),
                }
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = stopping.as_mut() => break,
        }
    }
    while conns.join_next().await.is_some() {}
    Ok(())
}

/// Resolves when `stop` turns true (or its sender is gone).
async fn stopped(mut stop: tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|v| *v).await;
}

type Call = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The TLS handshake (ALPN `h2`), then [`serve_connection`].
async fn serve_tls_connection<C: ControlService>(
    io: TcpStream,
    peer: Option<SocketAddr>,
    tls: TlsAcceptor,
    service: Arc<GrpcService<C>>,
    stop: impl Future<Output = ()>,
) {
    let mut stop = pin!(stop);
    let io = tokio::select! {
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(io)) => match r {
            Ok(Ok(io)) => io,
            Ok(Err(e)) => {
                tracing::debug!(?peer, error = %e, "gRPC TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(?peer, "gRPC TLS handshake not completed in time");
                return;
            }
        },
        _ = stop.as_mut() => return,
    };
    serve_connection(io, peer, service, stop).await
}

/// Serves one accepted connection until the peer closes it, or, once `stop`
/// resolves, until its open calls are answered (graceful GOAWAY).
async fn serve_connection<C: ControlService, IO>(
    io: IO,
    peer: Option<SocketAddr>,
    service: Arc<GrpcService<C>>,
    stop: impl Future<Output = ()>,
) where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(WINDOW)
        .initial_connection_window_size(WINDOW)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(16 * 1024);
    let mut stop = pin!(stop);
    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, builder.handshake::<_, Bytes>(io));
    let mut conn = tokio::select! {
        r = handshake => match r {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "gRPC handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!("gRPC client sent no HTTP/2 preface");
                return;
            }
        },
        _ = stop.as_mut() => return,
    };
    let mut calls: FuturesUnordered<Call> = FuturesUnordered::new();
    let mut accepted = Vec::new();
    let mut shutting_down = false;
    let ended = poll_fn(|cx| {
        loop {
            // Take every request h2 has already read before polling the
            // connection again: a poll flushes what is queued, and answers
            // that are queued together leave in one write.
            loop {
                match conn.poll_accept(cx) {
                    Poll::Ready(Some(Ok(r))) => accepted.push(r),
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                    Poll::Ready(None) => return Poll::Ready(Ok(())),
                    Poll::Pending => break,
                }
            }
            let mut progressed = !accepted.is_empty();
            for (req, respond) in accepted.drain(..) {
                if let Some(mut call) = service.start(req, respond, peer) {
                    // Most calls (memory broker) finish on their first poll.
                    if call.as_mut().poll(cx).is_pending() {
                        calls.push(call);
                    }
                }
            }
            while let Poll::Ready(Some(())) = calls.poll_next_unpin(cx) {
                progressed = true;
            }
            if !shutting_down && stop.as_mut().poll(cx).is_ready() {
                conn.graceful_shutdown();
                shutting_down = true;
                progressed = true;
            }
            if !progressed {
                return Poll::Pending;
            }
        }
    })
    .await;
    if let Err(e) = ended {
        tracing::debug!(error = %e, "gRPC connection ended");
    }
}

impl<C: ControlService> GrpcService<C> {
    /// Starts one request: a ControlService or CentrifugoApi call as a future
    /// for the connection task, anything else in a task of its own.
    fn start(
        self: &Arc<Self>,
        req: Request<RecvStream>,
        respond: SendResponse<Bytes>,
        peer: Option<SocketAddr>,
    ) -> Option<Call> {
        let path = req.uri().path();
        let target = if let Some(name) = path.strip_prefix(CONTROL_PREFIX) {
            Some(Method::from_grpc(Api::Control, name).map(Target::Control))
        } else {
            path.strip_prefix(centrifugo::PREFIX)
                .map(|name| CentrifugoTarget::from_name(name).map(Target::Centrifugo))
        };
        match target {
            Some(target) => {
                use tracing::Instrument;
                let (span, id) =
                    crate::api::request_span(req.headers().get(crate::api::REQUEST_ID));
                let call = api_call(self.clone(), target, req, respond, peer, id);
                Some(Box::pin(call.instrument(span)))
            }
            None => {
                tokio::spawn(routed_call(self.routes.clone(), req, respond));
                None
            }
        }
    }

    /// Everything about an API request that is not its message.
    fn check(
        &self,
        target: Option<Target>,
        path: &str,
        headers: &HeaderMap,
        peer: Option<SocketAddr>,
    ) -> Result<Target, Reply> {
        let content_type = headers.get(header::CONTENT_TYPE).map(HeaderValue::as_bytes);
        if !content_type.is_some_and(|t| t.starts_with(b"application/grpc")) {
            return Err(Reply::Refused(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                Status::invalid_argument("content-type must be application/grpc"),
            ));
        }
        let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        match self.ctx.authorize(authorization, None, peer) {
            Ok(()) => {}
            Err(f @ (AuthFailure::BadKey | AuthFailure::BadToken)) => {
                return Err(Reply::Status(Status::unauthenticated(f.message())));
            }
            Err(f @ AuthFailure::NotLoopback) => {
                return Err(Reply::Status(Status::permission_denied(f.message())));
            }
        }
        let Some(target) = target else {
            return Err(Reply::Status(Status::unimplemented(format!("{path}: no such method"))));
        };
        if let Some(enc) = headers.get("grpc-encoding")
            && enc.as_bytes() != b"identity"
        {
            return Err(Reply::Unsupported(Status::unimplemented(format!(
                "grpc-encoding {:?} is not supported; send messages uncompressed",
                String::from_utf8_lossy(enc.as_bytes())
            ))));
        }
        Ok(target)
    }
}

/// One API call: read the request message, run it, answer.
async fn api_call<C: ControlService>(
    service: Arc<GrpcService<C>>,
    target: Option<Target>,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer: Option<SocketAddr>,
    request_id: Option<HeaderValue>,
) {
    let (parts, body) = req.into_parts();
    let reply = match service.check(target, parts.uri.path(), &parts.headers, peer) {
        Err(reply) => reply,
        Ok(target) => match read_message(body, service.ctx.max_request_size).await {
            Err(ReadError::Gone) => return,
            Err(ReadError::Status(s)) => Reply::Status(s),
            Ok(msg) => match timeout(&parts.headers) {
                None => dispatch(&service, target, msg).await,
                Some(Err(s)) => Reply::Status(s),
                Some(Ok(limit)) => {
                    match tokio::time::timeout(limit, dispatch(&service, target, msg)).await {
                        Ok(reply) => reply,
                        Err(_) => Reply::Status(Status::deadline_exceeded(
                            "the call did not finish within its grpc-timeout",
                        )),
                    }
                }
            },
        },
    };
    let status = match &reply {
        Reply::Message(_) => 0,
        Reply::Status(s) | Reply::Unsupported(s) | Reply::Refused(_, s) => s.code() as i32,
    };
    tracing::debug!(?peer, path = parts.uri.path(), status, "grpc request");
    send_reply(&mut respond, reply, request_id);
}

/// An answer to a ControlService call.
enum Reply {
    /// One encoded response message (with its 5-byte prefix), status OK.
    Message(Bytes),
    /// A non-OK status (trailers-only response).
    Status(Status),
    /// A compression we do not speak: the status plus `grpc-accept-encoding`.
    Unsupported(Status),
    /// Not a gRPC request at all: an HTTP error status plus a gRPC status.
    Refused(StatusCode, Status),
}

fn send_reply(respond: &mut SendResponse<Bytes>, reply: Reply, request_id: Option<HeaderValue>) {
    let (http_status, status, accept_encoding) = match reply {
        Reply::Message(body) => {
            let mut resp = Response::new(());
            resp.headers_mut().insert(header::CONTENT_TYPE, GRPC_CONTENT_TYPE);
            if let Some(id) = request_id {
                resp.headers_mut().insert(crate::api::REQUEST_ID, id);
            }
            if let Ok(mut stream) = respond.send_response(resp, false) {
                let mut trailers = HeaderMap::with_capacity(1);
                trailers.insert("grpc-status", HeaderValue::from_static("0"));
                let _ = stream.send_data(body, false);
                let _ = stream.send_trailers(trailers);
            }
            return;
        }
        Reply::Status(s) => (StatusCode::OK, s, false),
        Reply::Unsupported(s) => (StatusCode::OK, s, true),
        Reply::Refused(code, s) => (code, s, false),
    };
    let mut resp = Response::new(());
    *resp.status_mut() = http_status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, GRPC_CONTENT_TYPE);
    if let Some(id) = request_id {
        h.insert(crate::api::REQUEST_ID, id);
    }
    h.insert("grpc-status", HeaderValue::from(status.code() as i32));
    if !status.message().is_empty() {
        h.insert("grpc-message", percent_encode(status.message()));
    }
    if accept_encoding {
        h.insert("grpc-accept-encoding", HeaderValue::from_static("identity"));
    }
    let _ = respond.send_response(resp, true);
}

const GRPC_CONTENT_TYPE: HeaderValue = HeaderValue::from_static("application/grpc");

/// `grpc-message` is percent-encoded: bytes outside printable ASCII and `%`.
fn percent_encode(message: &str) -> HeaderValue {
    // CONTROLS covers 0x00-0x1F and 0x7F; every non-ASCII byte is encoded too.
    const SET: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b'%');
    let out = percent_encoding::percent_encode(message.as_bytes(), SET).to_string();
    HeaderValue::from_str(&out).expect("printable ASCII is a valid header value")
}

/// The call's `grpc-timeout`, if it sent one (`None`), or why it is invalid.
fn timeout(headers: &HeaderMap) -> Option<Result<Duration, Status>> {
    let v = headers.get("grpc-timeout")?;
    Some(parse_timeout(v.as_bytes()).ok_or_else(|| {
        Status::invalid_argument(format!(
            "grpc-timeout {:?} is not 1-8 digits and a unit (H, M, S, m, u, n)",
            String::from_utf8_lossy(v.as_bytes())
        ))
    }))
}

fn parse_timeout(v: &[u8]) -> Option<Duration> {
    let (&unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

enum ReadError {
    /// The client reset the stream or the connection failed: nobody to answer.
    Gone,
    Status(Status),
}

/// Reads the one length-prefixed message of a unary request.
async fn read_message(mut body: RecvStream, max: usize) -> Result<Bytes, ReadError> {
    let mut first: Option<Bytes> = None;
    let mut more = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|_| ReadError::Gone)?;
        let _ = body.flow_control().release_capacity(chunk.len());
        let len = first.as_ref().map_or(0, Bytes::len) + more.len() + chunk.len();
        if len > max + 5 {
            return Err(ReadError::Status(too_large(max)));
        }
        match &first {
            None if more.is_empty() => first = Some(chunk),
            _ => {
                if let Some(f) = first.take() {
                    more.extend_from_slice(&f);
                }
                more.extend_from_slice(&chunk);
            }
        }
    }
    let buf = first.unwrap_or_else(|| more.freeze());
    let internal = |m: &str| Err(ReadError::Status(Status::internal(m.to_string())));
    if buf.is_empty() {
        return internal("the request has no message (a unary call sends exactly one)");
    }
    if buf.len() < 5 {
        return internal("the request ends inside a message's 5-byte prefix");
    }
    if buf[0] != 0 {
        return internal("compressed message without grpc-encoding");
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len > max {
        return Err(ReadError::Status(too_large(max)));
    }
    match (buf.len() - 5).cmp(&len) {
        std::cmp::Ordering::Less => internal("the request ends inside its message"),
        std::cmp::Ordering::Greater => {
            internal("more than one request message (a unary call sends exactly one)")
        }
        std::cmp::Ordering::Equal => Ok(buf.slice(5..)),
    }
}

fn too_large(max: usize) -> Status {
    Status::resource_exhausted(format!(
        "request message larger than api.max_request_size ({max} bytes)"
    ))
}

/// A response message with its gRPC prefix.
fn encode(m: &impl Message) -> Bytes {
    let len = m.encoded_len();
    let mut out = BytesMut::with_capacity(5 + len);
    out.put_u8(0);
    out.put_u32(len as u32);
    m.encode(&mut out).expect("the buffer has room for the message");
    out.freeze()
}

/// An encoded response message with its gRPC prefix.
fn frame(body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + body.len());
    out.put_u8(0);
    out.put_u32(body.len() as u32);
    out.extend_from_slice(body);
    out.freeze()
}

/// Decodes the request message, runs the call, encodes its answer.
async fn dispatch<C: ControlService>(
    service: &GrpcService<C>,
    target: Target,
    msg: Bytes,
) -> Reply {
    let method = match target {
        Target::Control(m) => m,
        Target::Centrifugo(t) => {
            return match centrifugo::call(&service.node, &service.ctx, t, msg).await {
                Ok(body) => Reply::Message(frame(&body)),
                Err(s) => Reply::Status(s),
            };
        }
    };
    let c = &service.control;
    match method {
        Method::Publish => unary(msg, |r| c.publish(r)).await,
        Method::Broadcast => unary(msg, |r| c.broadcast(r)).await,
        Method::PublishToUser => unary(msg, |r| c.publish_to_user(r)).await,
        Method::Subscribe => unary(msg, |r| c.subscribe(r)).await,
        Method::Unsubscribe => unary(msg, |r| c.unsubscribe(r)).await,
        Method::Disconnect => unary(msg, |r| c.disconnect(r)).await,
        Method::Presence => unary(msg, |r| c.presence(r)).await,
        Method::PresenceStats => unary(msg, |r| c.presence_stats(r)).await,
        Method::History => unary(msg, |r| c.history(r)).await,
        Method::Channels => unary(msg, |r| c.channels(r)).await,
        Method::Info => unary(msg, |r| c.info(r)).await,
        // CentrifugoApi only: `from_grpc(Api::Control, ..)` never returns them.
        Method::Refresh | Method::HistoryRemove | Method::Rpc | Method::Batch => {
            Reply::Status(Status::unimplemented(format!(
                "{} is a method of centrifugal.centrifugo.api.CentrifugoApi",
                method.grpc_name()
            )))
        }
    }
}

/// Decodes a ControlService request, runs it through the generated trait,
/// encodes the response.
async fn unary<Req, Resp, F>(msg: Bytes, call: impl FnOnce(tonic::Request<Req>) -> F) -> Reply
where
    Req: Message + Default,
    Resp: Message,
    F: Future<Output = Result<tonic::Response<Resp>, Status>>,
{
    match Req::decode(msg) {
        Ok(r) => match call(tonic::Request::new(r)).await {
            Ok(resp) => Reply::Message(encode(resp.get_ref())),
            Err(s) => Reply::Status(s),
        },
        Err(e) => {
            // The generated type's name is the message's name in the .proto.
            let name = std::any::type_name::<Req>().rsplit("::").next().unwrap_or_default();
            Reply::Status(Status::invalid_argument(format!("not a valid fanfare.v1.{name}: {e}")))
        }
    }
}

/// A request body for tonic's services: h2's stream, releasing flow-control
/// capacity as data is read.
struct H2Body(RecvStream);

impl http_body::Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, h2::Error>>> {
        let body = &mut self.get_mut().0;
        match body.poll_data(cx) {
            Poll::Ready(Some(Ok(data))) => {
                let _ = body.flow_control().release_capacity(data.len());
                Poll::Ready(Some(Ok(http_body::Frame::data(data))))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => match body.poll_trailers(cx) {
                Poll::Ready(Ok(Some(t))) => Poll::Ready(Some(Ok(http_body::Frame::trailers(t)))),
                Poll::Ready(Ok(None)) => Poll::Ready(None),
                Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
                Poll::Pending => Poll::Pending,
            },
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }
}

/// Serves a request through tonic's services (health, reflection, the
/// UNIMPLEMENTED fallback), streaming the response until it ends or the
/// client resets the stream.
async fn routed_call(
    mut routes: Routes,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    use http_body::Body as _;
    let resp = match Service::call(&mut routes, req.map(H2Body)).await {
        Ok(resp) => resp,
        Err(never) => match never {},
    };
    let (parts, mut body) = resp.into_parts();
    let end = body.is_end_stream();
    let Ok(mut stream) = respond.send_response(Response::from_parts(parts, ()), end) else {
        return;
    };
    if end {
        return;
    }
    loop {
        let frame = poll_fn(|cx| {
            if stream.poll_reset(cx).is_ready() {
                return Poll::Ready(None);
            }
            Pin::new(&mut body).poll_frame(cx).map(Some)
        })
        .await;
        match frame {
            None => return, // reset by the client
            Some(None) => {
                let _ = stream.send_data(Bytes::new(), true);
                return;
            }
            Some(Some(Err(e))) => {
                tracing::debug!(error = %e, "gRPC response body failed");
                stream.send_reset(h2::Reason::INTERNAL_ERROR);
                return;
            }
            Some(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    if stream.send_data(data, false).is_err() {
                        return;
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        let _ = stream.send_trailers(trailers);
                    }
                    return;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_values() {
        assert_eq!(parse_timeout(b"100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_timeout(b"5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_timeout(b"2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_timeout(b"99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in [&b""[..], b"S", b"10", b"10x", b"123456789S", b"-1S", b"1.5S"] {
            assert_eq!(parse_timeout(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(percent_encode("plain text: ok"), "plain text: ok");
        assert_eq!(percent_encode("50% é\n"), "50%25 %C3%A9%0A");
    }
}
