//! The WebSocket transport: upgrade at `/connection/websocket`, then one task per
//! connection that selects over the socket, the session's outbox and its timers.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fanfare_core::metrics::hot;
use fanfare_core::{MAX_PUBLISHES_IN_FLIGHT, Node, Session};
use fanfare_protocol::{Codec, DisconnectCode, FrameKind};
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes, error::CapacityError};

use crate::http::{Body, plain};
use crate::lean_io::{LeanIo, WS_READ_CHUNK};

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
    fn origin_allowed(&self, origin: Option<&HeaderValue>) -> bool {
        let Some(origin) = origin else { return true };
        self.allowed_origins.iter().any(|o| o == "*" || o.as_bytes() == origin.as_bytes())
    }

    fn ws_config(&self) -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(WS_READ_CHUNK)
            .write_buffer_size(0)
            .max_message_size(Some(self.max_message_size))
            .max_frame_size(Some(self.max_message_size))
    }
}

fn header_has_token(req: &Request<Incoming>, name: header::HeaderName, token: &str) -> bool {
    req.headers().get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

/// Answers the upgrade request and spawns the connection task.
pub fn upgrade(mut req: Request<Incoming>, node: Node, opts: Arc<WsOptions>) -> Response<Body> {
    if req.method() != hyper::Method::GET
        || !header_has_token(&req, header::CONNECTION, "upgrade")
        || !header_has_token(&req, header::UPGRADE, "websocket")
    {
        return plain(StatusCode::BAD_REQUEST, "expected a WebSocket upgrade request\n");
    }
    if req.headers().get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
        let mut r = plain(StatusCode::UPGRADE_REQUIRED, "unsupported WebSocket version\n");
        r.headers_mut().insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        return r;
    }
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return plain(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key\n");
    };
    if !opts.origin_allowed(req.headers().get(header::ORIGIN)) {
        return plain(StatusCode::FORBIDDEN, "origin not allowed\n");
    }
    if node.is_draining() {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "node is shutting down\n");
    }
    let codec = Codec::Json;
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
        // keeps what it read ahead (usually nothing) in front of it.
        match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => {
                let stream = LeanIo::new(parts.io.into_inner(), opts.read_buffer_size);
                let config = Some(opts.ws_config());
                // What hyper read past the request (usually nothing) is a view
                // into its 8 KiB read buffer: copy it out, release the buffer.
                let part = parts.read_buf.to_vec();
                drop(parts.read_buf);
                let mut ws = if part.is_empty() {
                    WebSocketStream::from_raw_socket(stream, Role::Server, config).await
                } else {
                    WebSocketStream::from_partially_read(stream, part, Role::Server, config).await
                };
                // A task of its own: the long-lived future is just `serve` and
                // the stream, not also the upgrade's state.
                tokio::spawn(async move { serve(&mut ws, node, codec, opts).await });
            }
            Err(upgraded) => {
                let io = LeanIo::new(TokioIo::new(upgraded), opts.read_buffer_size);
                let mut ws =
                    WebSocketStream::from_raw_socket(io, Role::Server, Some(opts.ws_config()))
                        .await;
                tokio::spawn(async move { serve(&mut ws, node, codec, opts).await });
            }
        }
    });
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
    );
    resp
}

/// Why the connection loop ended.
enum End {
    /// Close with this code (after writing what is queued).
    Close(DisconnectCode),
    /// The peer went away or the socket failed; nothing more can be written.
    Gone(DisconnectCode),
}

/// Runs one connection. Takes the stream by reference: an `async fn` keeps its
/// by-value arguments for its whole life next to the locals they move into,
/// which would store the (large) stream twice in every connection's task.
async fn serve<S>(ws: &mut WebSocketStream<S>, node: Node, codec: Codec, opts: Arc<WsOptions>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let Some(mut session) = Session::new(node, codec) else {
        let _ = Box::pin(send_close(ws, DisconnectCode::SHUTDOWN, None, opts.write_timeout)).await;
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
                Box::pin(session.apply_controls()).await;
                match Box::pin(flush_outbox(ws, &outbox, codec, opts.write_timeout)).await {
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
            msg = ws.next(), if session.publishes_in_flight() < MAX_PUBLISHES_IN_FLIGHT => {
                let res = match msg {
                    Some(Ok(Message::Text(text))) => {
                        account_received(text.len());
                        Box::pin(session.handle_frame(text.as_bytes())).await
                    }
                    Some(Ok(Message::Binary(data))) => {
                        account_received(data.len());
                        match codec.frame_kind() {
                            FrameKind::Binary => Box::pin(session.handle_frame(&data)).await,
                            // Binary frames are not part of the JSON protocol.
                            FrameKind::Text => Err(DisconnectCode::BAD_REQUEST),
                        }
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => Ok(()),
                    Some(Ok(Message::Close(_))) => {
                        // tungstenite queued the close reply; send it (RFC 6455 5.5.1).
                        let _ = tokio::time::timeout(opts.write_timeout, ws.flush()).await;
                        break End::Gone(DisconnectCode::CONNECTION_CLOSED);
                    }
                    None => break End::Gone(DisconnectCode::CONNECTION_CLOSED),
                    Some(Err(WsError::Capacity(CapacityError::MessageTooLong { .. }))) => {
                        Err(DisconnectCode::MESSAGE_TOO_BIG)
                    }
                    Some(Err(WsError::Utf8(_))) => break End::Close(INVALID_PAYLOAD),
                    Some(Err(WsError::Protocol(e))) => {
                        tracing::debug!(error = %e, "websocket protocol error");
                        break End::Close(PROTOCOL_ERROR);
                    }
                    Some(Err(_)) => break End::Gone(DisconnectCode::CONNECTION_CLOSED),
                };
                if let Err(code) = res {
                    break End::Close(code);
                }
                session.arm_timer();
            }
        }
    };
    let code = match end {
        End::Close(code) => {
            // Answer publishes still waiting for the broker (a drain must not
            // leave an accepted publication unacknowledged), then write what the
            // session queued before closing (e.g. an error reply), except after
            // overflow, where the queue was dropped.
            let _ = tokio::time::timeout(opts.write_timeout, Box::pin(session.finish_publishes()))
                .await;
            let _ = Box::pin(flush_outbox(ws, &outbox, codec, opts.write_timeout)).await;
            let reason = outbox.close_reason(code);
            let _ = Box::pin(send_close(ws, code, reason, opts.write_timeout)).await;
            code
        }
        End::Gone(code) => code,
    };
    if code == DisconnectCode::SLOW {
        tracing::debug!(client = session.client_id(), "slow consumer closed");
    }
    Box::pin(session.close(code)).await;
}

/// WebSocket standard codes for transport-level violations.
const INVALID_PAYLOAD: DisconnectCode = DisconnectCode(1007);
const PROTOCOL_ERROR: DisconnectCode = DisconnectCode(1002);

fn account_received(n: usize) {
    hot().bytes_received.increment(n as u64);
}

/// Writes everything queued, batched into as few frames as possible, with one
/// flush. Returns a close requested through the outbox, or `Err` when the socket
/// is unusable.
async fn flush_outbox<S>(
    ws: &mut WebSocketStream<S>,
    outbox: &fanfare_core::Outbox,
    codec: Codec,
    write_timeout: Duration,
) -> Result<Option<DisconnectCode>, DisconnectCode>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut items = Vec::new();
    let close = outbox.drain(&mut items);
    if items.is_empty() {
        return Ok(close);
    }
    let count = items.len();
    let write = async {
        let mut bytes = 0usize;
        let mut frame: Vec<u8> = Vec::new();
        let mut iter = items.into_iter().peekable();
        while let Some(item) = iter.next() {
            if frame.is_empty()
                && iter.peek().is_none_or(|n| item.len() + n.len() >= MAX_BATCH_FRAME)
            {
                // A lone item goes out as is: the shared bytes, no copy.
                bytes += item.len();
                ws.feed(message(codec, item)?).await?;
                continue;
            }
            codec.append(&mut frame, &item);
            if frame.len() >= MAX_BATCH_FRAME || iter.peek().is_none() {
                bytes += frame.len();
                ws.feed(message(codec, Bytes::from(std::mem::take(&mut frame)))?).await?;
            }
        }
        ws.flush().await?;
        Ok::<usize, WsError>(bytes)
    };
    match tokio::time::timeout(write_timeout, write).await {
        Ok(Ok(bytes)) => {
            let h = hot();
            h.messages_sent.increment(count as u64);
            h.bytes_sent.increment(bytes as u64);
            Ok(close)
        }
        Ok(Err(_)) => Err(DisconnectCode::WRITE_ERROR),
        Err(_) => {
            // The client stopped reading: the same failure as a queue overflow.
            fanfare_core::metrics::slow_consumer();
            Err(DisconnectCode::SLOW)
        }
    }
}

fn message(codec: Codec, payload: Bytes) -> Result<Message, WsError> {
    Ok(match codec.frame_kind() {
        FrameKind::Text => Message::Text(Utf8Bytes::try_from(payload)?),
        FrameKind::Binary => Message::Binary(payload),
    })
}

async fn send_close<S>(
    ws: &mut WebSocketStream<S>,
    code: DisconnectCode,
    reason: Option<String>,
    write_timeout: Duration,
) -> Result<(), WsError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let reason = match reason {
        // A close frame's reason is at most 123 bytes; cut at a char boundary.
        Some(mut r) => {
            let mut end = r.len().min(123);
            while !r.is_char_boundary(end) {
                end -= 1;
            }
            r.truncate(end);
            Utf8Bytes::from(r)
        }
        None => Utf8Bytes::from_static(code.reason()),
    };
    let frame = CloseFrame { code: CloseCode::from(code.0), reason };
    let close = async {
        ws.close(Some(frame)).await?;
        // Give the peer a moment to answer the close handshake.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
        Ok(())
    };
    tokio::time::timeout(write_timeout, close).await.unwrap_or(Ok(()))
}
