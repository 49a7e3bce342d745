//! The WebSocket transport: upgrade at `/connection/websocket`, then one task per
//! connection that selects over the socket, the session's outbox and its timers.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fanfare_core::{Node, Session};
use fanfare_protocol::{Codec, DisconnectCode, FrameKind};
use fanfare_server::ws::{self, Incoming, OP_BINARY, OP_PONG, OP_TEXT, WsConn, WsError};
use futures_util::FutureExt;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use super::driver::{End, Input, Wire, account_received, drive};
use super::proxy_headers;
use crate::http::{Body, plain};
use fanfare_core::proxy::Headers;

/// Largest frame the writer builds when batching queued messages.
const MAX_BATCH_FRAME: usize = 64 * 1024;

/// Transport settings shared by all connections.
#[derive(Debug, Clone)]
pub struct WsOptions {
    pub allowed_origins: Vec<String>,
    pub max_message_size: usize,
    pub read_buffer_size: usize,
    pub write_timeout: Duration,
}

impl WsOptions {
    pub(crate) fn origin_allowed(&self, origin: Option<&HeaderValue>) -> bool {
        let Some(origin) = origin else { return true };
        self.allowed_origins.iter().any(|o| o == "*" || o.as_bytes() == origin.as_bytes())
    }

    fn conn<S: AsyncRead + AsyncWrite + Unpin>(&self, io: S, read_ahead: &[u8]) -> WsConn<S> {
        WsConn::new(io, read_ahead, self.read_buffer_size, self.max_message_size)
    }
}

/// Which protocol runs over an upgraded connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `/connection/websocket`: the client protocol, commands and replies.
    Bidirectional,
    /// `/connection/uni_websocket`: a connect request, then pushes only
    /// (`uni::serve_websocket`).
    Unidirectional,
}

/// Answers the upgrade request and spawns the connection task.
pub fn upgrade(
    mut req: Request<hyper::body::Incoming>,
    node: Node,
    opts: Arc<WsOptions>,
    mode: Mode,
) -> Response<Body> {
    let key = match ws::check_upgrade(&req) {
        Ok(key) => key,
        Err((status, text)) => {
            let mut r = plain(status, text);
            if status == StatusCode::UPGRADE_REQUIRED {
                r.headers_mut()
                    .insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
            }
            return r;
        }
    };
    if !opts.origin_allowed(req.headers().get(header::ORIGIN)) {
        return plain(StatusCode::FORBIDDEN, "origin not allowed\n");
    }
    if node.is_draining() {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "node is shutting down\n");
    }
    let (codec, subprotocol) = negotiate(&req);
    let headers = proxy_headers(&node, req.headers());
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "websocket upgrade failed");
                return;
            }
        };
        // Run on the bare socket (TCP or TLS): hyper's `Upgraded` boxes it
        // and keeps what it read ahead (usually nothing) in its 8 KiB read
        // buffer, which is released here.
        let upgraded = match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => {
                let io = parts.io.into_inner();
                return start(io, &parts.read_buf, node, opts, codec, headers, mode);
            }
            Err(upgraded) => upgraded,
        };
        match upgraded.downcast::<TokioIo<TlsStream<TcpStream>>>() {
            Ok(parts) => {
                let io = parts.io.into_inner();
                start(io, &parts.read_buf, node, opts, codec, headers, mode)
            }
            Err(upgraded) => {
                let mut conn = opts.conn(TokioIo::new(upgraded), &[]);
                tokio::spawn(async move {
                    match mode {
                        Mode::Bidirectional => {
                            let mut session = new_session(node, codec, headers);
                            serve(&mut conn, &mut session, &opts).await
                        }
                        Mode::Unidirectional => {
                            super::uni::serve_websocket(&mut conn, node, &opts, headers).await
                        }
                    }
                });
            }
        }
    });
    let mut resp = ws::switching_protocols(&key);
    if let Some(p) = subprotocol {
        resp.headers_mut().insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(p));
    }
    resp
}

/// Spawns the task of an upgraded connection on its socket `io` (a
/// `TcpStream`, or a TLS stream over one: a task type each, so a plain
/// connection's task does not grow by what TLS needs).
fn start<S>(
    io: S,
    read_ahead: &[u8],
    node: Node,
    opts: Arc<WsOptions>,
    codec: Codec,
    headers: Option<Arc<Headers>>,
    mode: Mode,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut conn = opts.conn(io, read_ahead);
    // A task of its own: the long-lived future is just `serve` and the
    // connection, not also the upgrade's state. Spawned apart: a task of one
    // future type each keeps the bidirectional connection's task as small
    // as before.
    if mode == Mode::Unidirectional {
        tokio::spawn(
            async move { super::uni::serve_websocket(&mut conn, node, &opts, headers).await },
        );
        return;
    }
    let mut session = new_session(node, codec, headers);
    let task = async move { serve(&mut conn, &mut session, &opts).await };
    tracing::trace!(
        bytes = std::mem::size_of_val(&task),
        tls = std::any::type_name::<S>().contains("Tls"),
        "connection task future"
    );
    tokio::spawn(task);
}

/// The codec a client asked for, and the subprotocol to answer with, as
/// Centrifugo's handler decides them: the first of the client's
/// `Sec-WebSocket-Protocol` values that we speak is answered
/// (`centrifuge-protobuf`, or `centrifuge-json`); Protobuf is chosen by that
/// subprotocol or by the query `cf_protocol=protobuf` (older clients:
/// `format=protobuf`). Unknown subprotocols are not answered (a browser then
/// fails the connection, as it should), and JSON is the default.
fn negotiate<B>(req: &Request<B>) -> (Codec, Option<&'static str>) {
    let subprotocol = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find_map(|p| [PROTOBUF_SUBPROTOCOL, JSON_SUBPROTOCOL].into_iter().find(|s| *s == p));
    let query_protobuf = req.uri().query().is_some_and(|q| {
        q.split('&').any(|kv| kv == "cf_protocol=protobuf" || kv == "format=protobuf")
    });
    let codec = if subprotocol == Some(PROTOBUF_SUBPROTOCOL) || query_protobuf {
        Codec::Protobuf
    } else {
        Codec::Json
    };
    (codec, subprotocol)
}

const PROTOBUF_SUBPROTOCOL: &str = "centrifuge-protobuf";
const JSON_SUBPROTOCOL: &str = "centrifuge-json";

/// A bidirectional WebSocket as the driver sees it: frames of commands in,
/// batches of replies out (one frame per batch), pings and the close
/// handshake answered here.
struct WsWire<'c, S> {
    conn: &'c mut WsConn<S>,
    codec: Codec,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Wire for WsWire<'_, S> {
    type Token = Incoming;

    /// The socket's read future itself, its result mapped (no future of
    /// our own around it: this one sits in every idle connection's task).
    fn read(&mut self) -> impl Future<Output = Input<Incoming>> {
        let codec = self.codec;
        self.conn.read().map(move |msg| match msg {
            // A binary frame on JSON, or text on Protobuf: a bad request
            // (3501), which is what Centrifugo's decoder ends up answering
            // too (it reads either frame type with the codec).
            Ok(Incoming::Text(p)) if codec.frame_kind() != FrameKind::Text => {
                account_received(p.len());
                Input::Refused(DisconnectCode::BAD_REQUEST)
            }
            Ok(Incoming::Binary(p)) if codec.frame_kind() != FrameKind::Binary => {
                account_received(p.len());
                Input::Refused(DisconnectCode::BAD_REQUEST)
            }
            Ok(m @ (Incoming::Text(p) | Incoming::Binary(p))) => {
                account_received(p.len());
                Input::Frame(m)
            }
            Ok(m @ (Incoming::Ping(_) | Incoming::Close(..))) => Input::ControlFrame(m),
            Err(WsError::TooBig) => Input::Refused(DisconnectCode::MESSAGE_TOO_BIG),
            Err(e) => match e.close_code() {
                Some(code) => {
                    tracing::debug!(error = %e, "websocket protocol error");
                    Input::Refused(DisconnectCode(code))
                }
                None => Input::Gone(DisconnectCode::CONNECTION_CLOSED),
            },
        })
    }

    fn frame(&self, at: Incoming) -> &[u8] {
        match at {
            Incoming::Text(p) | Incoming::Binary(p) => self.conn.payload(p),
            _ => &[],
        }
    }

    async fn answer(&mut self, at: Incoming, write_timeout: Duration) -> Result<(), End> {
        match at {
            Incoming::Ping(p) => answer_ping(self.conn, p, write_timeout)
                .await
                .map_err(|()| End::Gone(DisconnectCode::WRITE_ERROR)),
            Incoming::Close(code, _) => {
                // Answer the close handshake (RFC 6455 5.5.1), echoing the code.
                let conn = &mut *self.conn;
                let reply = async {
                    match code {
                        Some(c) => conn.send_close(c, "").await,
                        None => conn.send(ws::OP_CLOSE, &[]).await,
                    }
                };
                let _ = tokio::time::timeout(write_timeout, reply).await;
                Err(End::Gone(DisconnectCode::CONNECTION_CLOSED))
            }
            _ => Ok(()),
        }
    }

    async fn write(&mut self, items: &[Bytes]) -> std::io::Result<usize> {
        // JSON messages share a text frame, separated by newlines; Protobuf
        // messages a binary frame, each behind its length prefix.
        let opcode = match self.codec.frame_kind() {
            FrameKind::Text => OP_TEXT,
            FrameKind::Binary => OP_BINARY,
        };
        self.conn.send_joined(opcode, items, self.codec.separator(), MAX_BATCH_FRAME).await
    }

    async fn goodbye(
        &mut self,
        code: DisconnectCode,
        reason: Option<String>,
        write_timeout: Duration,
    ) {
        send_close(self.conn, code, reason, write_timeout).await
    }
}

/// A new connection's session with the headers proxies forward; None when
/// the node is draining. Made before the connection's task is spawned, so the
/// task keeps the session and not also what went into it (node, codec,
/// headers: an `async` block or fn keeps what it captured or was given for
/// its whole life).
fn new_session(node: Node, codec: Codec, headers: Option<Arc<Headers>>) -> Option<Session> {
    let mut session = Session::new(node, codec)?;
    session.set_proxy_headers(headers);
    Some(session)
}

/// Runs one connection to its end (closed with 3001 when there is no
/// session: the node is draining). Takes everything by reference for the
/// same reason as [`new_session`]: by-value arguments would be stored again
/// next to the locals they move into.
async fn serve<S>(conn: &mut WsConn<S>, session: &mut Option<Session>, opts: &WsOptions)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Some(s) = session.as_mut() else {
        let _ =
            Box::pin(send_close(conn, DisconnectCode::SHUTDOWN, None, opts.write_timeout)).await;
        return;
    };
    let codec = s.outbox().codec();
    let mut wire = WsWire { conn, codec };
    let code = drive(&mut wire, s, &opts.write_timeout).await;
    if let Some(s) = session.take() {
        Box::pin(s.close(code)).await;
    }
}

/// Sends the pong for a ping (same payload, at most 125 bytes).
pub(crate) async fn answer_ping<S>(
    conn: &mut WsConn<S>,
    ping: ws::Payload,
    write_timeout: Duration,
) -> Result<(), ()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut body = [0u8; 125];
    let data = conn.payload(ping);
    body[..data.len()].copy_from_slice(data);
    let n = data.len();
    match tokio::time::timeout(write_timeout, conn.send(OP_PONG, &body[..n])).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

/// Sends a close frame, then gives the peer a moment to answer the close
/// handshake before the socket is dropped.
pub(crate) async fn send_close<S>(
    conn: &mut WsConn<S>,
    code: DisconnectCode,
    reason: Option<String>,
    write_timeout: Duration,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let reason = reason.as_deref().unwrap_or(code.reason());
    let close = async {
        if conn.send_close(code.0, reason).await.is_err() {
            return;
        }
        let answered = tokio::time::timeout(Duration::from_secs(1), async {
            while let Ok(m) = conn.read().await {
                if matches!(m, Incoming::Close(..)) {
                    return true;
                }
            }
            false
        })
        .await;
        if answered != Ok(true) {
            // No close frame came back (e.g. the peer is still sending the
            // message we refused with 1009): drop its input for a moment so
            // the socket is not reset under our close frame.
            let _ = conn.shutdown().await;
            let _ = tokio::time::timeout(Duration::from_secs(1), conn.drain_input()).await;
        }
    };
    let _ = tokio::time::timeout(write_timeout, close).await;
}
