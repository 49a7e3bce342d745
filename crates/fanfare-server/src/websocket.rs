//! The WebSocket transport: upgrade at `/connection/websocket`, then one task per
//! connection that selects over the socket, the session's outbox and its timers.

use std::sync::Arc;
use std::time::Duration;

use fanfare_core::metrics::hot;
use fanfare_core::{MAX_PUBLISHES_IN_FLIGHT, Node, Session};
use fanfare_protocol::{Codec, DisconnectCode, FrameKind};
use fanfare_server::ws::{self, Incoming, OP_BINARY, OP_PONG, OP_TEXT, WsConn, WsError};
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::http::{Body, plain};

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
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "websocket upgrade failed");
                return;
            }
        };
        // Run on the bare TcpStream: hyper's `Upgraded` boxes the socket and
        // keeps what it read ahead (usually nothing) in its 8 KiB read buffer,
        // which is released here.
        match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => {
                let mut conn = opts.conn(parts.io.into_inner(), &parts.read_buf);
                drop(parts.read_buf);
                // A task of its own: the long-lived future is just `serve` and
                // the connection, not also the upgrade's state.
                // Spawned apart: a task of one future type each keeps the
                // bidirectional connection's task as small as before.
                if mode == Mode::Unidirectional {
                    tokio::spawn(async move {
                        crate::uni::serve_websocket(&mut conn, node, &opts).await
                    });
                    return;
                }
                let task = async move { serve(&mut conn, node, codec, opts).await };
                tracing::trace!(bytes = std::mem::size_of_val(&task), "connection task future");
                tokio::spawn(task);
            }
            Err(upgraded) => {
                let mut conn = opts.conn(TokioIo::new(upgraded), &[]);
                tokio::spawn(async move {
                    match mode {
                        Mode::Bidirectional => serve(&mut conn, node, codec, opts).await,
                        Mode::Unidirectional => {
                            crate::uni::serve_websocket(&mut conn, node, &opts).await
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

/// Why the connection loop ended.
enum End {
    /// Close with this code (after writing what is queued).
    Close(DisconnectCode),
    /// The peer went away or the socket failed; nothing more can be written.
    Gone(DisconnectCode),
}

/// Runs one connection. Takes the connection by reference: an `async fn`
/// keeps its by-value arguments for its whole life next to the locals they
/// move into, which would store the connection twice in every task.
async fn serve<S>(conn: &mut WsConn<S>, node: Node, codec: Codec, opts: Arc<WsOptions>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Some(mut session) = Session::new(node, codec) else {
        let _ =
            Box::pin(send_close(conn, DisconnectCode::SHUTDOWN, None, opts.write_timeout)).await;
        return;
    };
    let outbox = session.outbox().clone();
    // Deadlines (pings, pong and connect timeouts) come from the node's shared
    // coarse timer through the outbox: the task holds no timer of its own.
    session.arm_timer();
    let end = loop {
        tokio::select! {
            biased;
            _ = outbox.ready() => {
                // Cold paths are boxed: their state exists only while they run,
                // so an idle connection's task stays small.
                if outbox.take_timer_due() {
                    if let Err(code) = Box::pin(session.on_deadline()).await {
                        break End::Close(code);
                    }
                    session.arm_timer();
                }
                Box::pin(session.apply_directives()).await;
                match Box::pin(flush_outbox(conn, &outbox, codec, opts.write_timeout)).await {
                    Ok(None) => {}
                    Ok(Some(code)) => break End::Close(code),
                    Err(code) => break End::Gone(code),
                }
            }
            r = session.publish_done() => {
                if let Err(code) = r {
                    break End::Close(code);
                }
            }
            // While too many publishes wait for the broker, leave the client's
            // commands in the socket (backpressure instead of an unbounded queue).
            msg = conn.read(), if session.publishes_in_flight() < MAX_PUBLISHES_IN_FLIGHT => {
                let res = match msg {
                    // A binary frame on JSON, or text on Protobuf: a bad request
                    // (3501), which is what Centrifugo's decoder ends up
                    // answering too (it reads either frame type with the codec).
                    Ok(Incoming::Text(p)) if codec.frame_kind() != FrameKind::Text => {
                        account_received(p.len());
                        Err(DisconnectCode::BAD_REQUEST)
                    }
                    Ok(Incoming::Binary(p)) if codec.frame_kind() != FrameKind::Binary => {
                        account_received(p.len());
                        Err(DisconnectCode::BAD_REQUEST)
                    }
                    Ok(Incoming::Text(p) | Incoming::Binary(p)) => {
                        account_received(p.len());
                        Box::pin(session.handle_frame(conn.payload(p))).await
                    }
                    Ok(Incoming::Ping(p)) => {
                        match Box::pin(answer_ping(conn, p, opts.write_timeout)).await {
                            Ok(()) => Ok(()),
                            Err(()) => break End::Gone(DisconnectCode::WRITE_ERROR),
                        }
                    }
                    Ok(Incoming::Close(code, _)) => {
                        // Answer the close handshake (RFC 6455 5.5.1), echoing the code.
                        let reply = async {
                            match code {
                                Some(c) => conn.send_close(c, "").await,
                                None => conn.send(ws::OP_CLOSE, &[]).await,
                            }
                        };
                        let _ = Box::pin(tokio::time::timeout(opts.write_timeout, reply)).await;
                        break End::Gone(DisconnectCode::CONNECTION_CLOSED);
                    }
                    Err(WsError::TooBig) => Err(DisconnectCode::MESSAGE_TOO_BIG),
                    Err(e) => match e.close_code() {
                        Some(code) => {
                            tracing::debug!(error = %e, "websocket protocol error");
                            break End::Close(DisconnectCode(code));
                        }
                        None => break End::Gone(DisconnectCode::CONNECTION_CLOSED),
                    },
                };
                if let Err(code) = res {
                    break End::Close(code);
                }
                session.arm_timer();
            }
        }
    };
    // Decided and counted now (the goodbye below may wait a write timeout on
    // a full socket); a close the outbox decided first wins.
    let end = match end {
        End::Close(code) => End::Close(session.ended(code)),
        End::Gone(code) => End::Gone(session.ended(code)),
    };
    let code = match end {
        End::Close(code) => {
            // Answer publishes still waiting for the broker (a drain must not
            // leave an accepted publication unacknowledged), then write what the
            // session queued before closing (e.g. an error reply), except after
            // overflow, where the queue was dropped.
            let _ = Box::pin(tokio::time::timeout(opts.write_timeout, session.finish_publishes()))
                .await;
            let flushed = Box::pin(flush_outbox(conn, &outbox, codec, opts.write_timeout)).await;
            // A flush that failed may have stopped inside a frame: a close
            // frame after it would be garbage, so the socket is just dropped.
            if flushed.is_ok() {
                let reason = outbox.close_reason(code);
                let _ = Box::pin(send_close(conn, code, reason, opts.write_timeout)).await;
            }
            code
        }
        End::Gone(code) => code,
    };
    if code == DisconnectCode::SLOW {
        tracing::debug!(client = session.client_id(), "slow consumer closed");
    }
    Box::pin(session.close(code)).await;
}

fn account_received(n: usize) {
    hot().bytes_received.increment(n as u64);
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

/// Writes everything queued, batched into as few frames as possible, in one
/// write (`WsConn::send_joined`). Returns a close requested
/// through the outbox, or `Err` when the socket is unusable.
async fn flush_outbox<S>(
    conn: &mut WsConn<S>,
    outbox: &fanfare_core::Outbox,
    codec: Codec,
    write_timeout: Duration,
) -> Result<Option<DisconnectCode>, DisconnectCode>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut items = Vec::new();
    let close = outbox.drain(&mut items);
    if items.is_empty() {
        return Ok(close);
    }
    let count = items.len();
    // JSON messages share a text frame, separated by newlines; Protobuf
    // messages a binary frame, each behind its length prefix.
    let opcode = match codec.frame_kind() {
        FrameKind::Text => OP_TEXT,
        FrameKind::Binary => OP_BINARY,
    };
    let separator = codec.separator();
    let h = hot();
    // Counted before writing, so a client that got the bytes sees the count.
    h.writes.increment(1);
    let write = conn.send_joined(opcode, &items, separator, MAX_BATCH_FRAME);
    match tokio::time::timeout(write_timeout, write).await {
        Ok(Ok(bytes)) => {
            h.messages_sent.increment(count as u64);
            h.bytes_sent.increment(bytes as u64);
            Ok(close)
        }
        Ok(Err(_)) => Err(DisconnectCode::WRITE_ERROR),
        Err(_) => {
            // The client stopped reading: the same failure as a queue overflow,
            // counted if this decided the close (a second timeout while
            // saying goodbye does not count again).
            if outbox.close_first(DisconnectCode::SLOW) {
                fanfare_core::metrics::slow_consumer();
            }
            Err(DisconnectCode::SLOW)
        }
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
