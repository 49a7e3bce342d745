//! Unidirectional transports over plain HTTP: the client connects once and
//! only receives. For clients without an SDK — a `curl`, a browser's
//! `EventSource`, a device.
//!
//! - `GET /connection/uni_sse?cf_connect=<connect request JSON>`:
//!   `text/event-stream`, one event per message. Publication events carry an
//!   `id` with the stream positions of every recoverable channel of the
//!   connection, so a plain `EventSource` that reconnects sends them back as
//!   `Last-Event-ID` and gets exactly the publications it missed (beyond
//!   Centrifugo, whose uni_sse cannot resume without an SDK).
//! - `POST /connection/uni_http_stream` with the connect request as body:
//!   newline-delimited JSON messages in a streamed response.
//! - `/connection/uni_websocket`: the connect request as the first message,
//!   then one push per WebSocket message.
//!
//! Messages are Centrifugo's unidirectional pushes: `{"connect":{...}}`
//! first, then `{"channel":"c","pub":{...}}`, `{}` as ping, and
//! `{"disconnect":{...}}` before the stream ends. Channels come from the token
//! (`channels`, the personal channel) and from the connect request's `subs`
//! (where the namespace lets anyone subscribe). The session is the same state
//! machine as a WebSocket's; this module only frames its outbox.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use data_encoding::BASE64URL_NOPAD;
use fanfare_core::{Node, Session, Transport};
use fanfare_protocol::{Codec, DisconnectCode};
use fanfare_server::ws::{self, OP_TEXT, WsConn};
use hyper::header;
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};

use super::driver::{End, Input, Wire, drive};
use super::websocket::{WsOptions, answer_ping, send_close};
use std::sync::Arc;

use super::{
    AnyBody, BodySender, ReqBody, StreamBody, disconnect_json, proxy_headers, read_body, refuse,
    streamed, url_param,
};
use fanfare_core::proxy::Headers;

/// Which unidirectional transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Sse,
    HttpStream,
}

/// The position of one channel as an SSE event id carries it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
struct Position(String, String, u64);

/// `Last-Event-ID` back into positions; anything unreadable is ignored (the
/// client then simply starts from the current position).
fn positions_from_event_id(id: &str) -> Vec<Position> {
    BASE64URL_NOPAD
        .decode(id.trim().as_bytes())
        .ok()
        .and_then(|raw| serde_json::from_slice(&raw).ok())
        .unwrap_or_default()
}

fn event_id(positions: &[Position]) -> String {
    BASE64URL_NOPAD.encode(&serde_json::to_vec(positions).expect("positions serialize"))
}

/// Handles `/connection/uni_sse` and `/connection/uni_http_stream`.
pub async fn handle(
    req: Request<impl ReqBody>,
    node: Node,
    opts: &WsOptions,
    framing: Framing,
    body_timeout: Duration,
) -> Response<AnyBody> {
    if !opts.origin_allowed(req.headers().get(header::ORIGIN)) {
        return refuse(StatusCode::FORBIDDEN, json!({"error": "origin not allowed"}));
    }
    let expected = if framing == Framing::Sse { Method::GET } else { Method::POST };
    if req.method() != expected {
        return refuse(StatusCode::METHOD_NOT_ALLOWED, json!({"error": format!("use {expected}")}));
    }
    if node.is_draining() {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, disconnect_json(DisconnectCode::SHUTDOWN));
    }
    let headers = proxy_headers(&node, req.headers());
    // `Last-Event-ID`, sent by a reconnecting EventSource: recover from there.
    let resume = match (framing, req.headers().get("last-event-id")) {
        (Framing::Sse, Some(id)) => positions_from_event_id(id.to_str().unwrap_or("")),
        _ => Vec::new(),
    };
    // The connect request: query `cf_connect` (SSE) or the body (HTTP stream).
    let connect: Bytes = match framing {
        Framing::Sse => {
            let query = req.uri().query().unwrap_or("");
            let param = url_param(query, "cf_connect");
            Bytes::from(param.unwrap_or_else(|| "{}".into()))
        }
        Framing::HttpStream => {
            let limit = opts.max_message_size;
            match read_body(req, limit, body_timeout, "websocket.max_message_size").await {
                Ok(b) if b.iter().all(u8::is_ascii_whitespace) => Bytes::from_static(b"{}"),
                Ok(b) => b,
                Err(refusal) => return refusal,
            }
        }
    };
    let mut connect: Value = match serde_json::from_slice(&connect) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            return refuse(
                StatusCode::BAD_REQUEST,
                json!({"error": "the connect request must be a JSON object"}),
            );
        }
    };
    start(node, connect.take(), framing, opts.write_timeout, resume, headers).await
}

/// Adds `recover` positions for the channels of a `Last-Event-ID` to the
/// connect request's `subs`.
fn add_recovery(connect: &mut Value, positions: &[Position]) {
    let Some(obj) = connect.as_object_mut() else { return };
    let subs = obj.entry("subs").or_insert_with(|| json!({}));
    let Some(subs) = subs.as_object_mut() else { return };
    for Position(channel, epoch, offset) in positions {
        let entry = subs.entry(channel.clone()).or_insert_with(|| json!({}));
        if let Some(e) = entry.as_object_mut() {
            e.insert("recover".into(), true.into());
            e.insert("epoch".into(), epoch.clone().into());
            e.insert("offset".into(), (*offset).into());
        }
    }
}

/// Fuzz entry: a uni transport's connect request (`body`, or `cf_connect` in
/// `query`) and `Last-Event-ID` as `handle` reads them, the frame `start`
/// builds from them, and that frame through the JSON codec. Returns the frame.
#[cfg(feature = "fuzzing")]
#[allow(dead_code)] // compiled into the binary too, used by the library
pub(crate) fn fuzz_connect(body: &[u8], query: &str, last_event_id: &str) -> Option<String> {
    let resume = positions_from_event_id(last_event_id);
    // What we encode we must read back: the next reconnect sends it.
    assert_eq!(positions_from_event_id(&event_id(&resume)), resume);
    let from_query = url_param(query, "cf_connect").unwrap_or_default();
    for connect in [body, from_query.as_bytes()] {
        let Ok(mut connect @ Value::Object(_)) = serde_json::from_slice::<Value>(connect) else {
            continue;
        };
        add_recovery(&mut connect, &resume);
        let frame = json!({"id": 1, "connect": connect}).to_string();
        // Fields of the wrong type are the session's 3501, not a crash.
        let _ = Codec::Json.decode(frame.as_bytes());
        return Some(frame);
    }
    None
}

/// Connects the session and, when that succeeded, streams its messages.
async fn start(
    node: Node,
    mut connect: Value,
    framing: Framing,
    write_timeout: Duration,
    resume: Vec<Position>,
    headers: Option<Arc<Headers>>,
) -> Response<AnyBody> {
    add_recovery(&mut connect, &resume);
    let transport = match framing {
        Framing::Sse => Transport::UniSse,
        Framing::HttpStream => Transport::UniHttpStream,
    };
    let Some(mut session) = Session::new_unidirectional(node, Codec::Json, transport) else {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, disconnect_json(DisconnectCode::SHUTDOWN));
    };
    session.set_proxy_headers(headers);
    let frame = json!({"id": 1, "connect": connect}).to_string();
    let connected = match session.handle_frame(frame.as_bytes()).await {
        Ok(()) => session.settle().await,
        Err(code) => Err(code),
    };
    if let Err(code) = connected {
        let status = match code {
            DisconnectCode::INVALID_TOKEN => StatusCode::UNAUTHORIZED,
            _ => StatusCode::BAD_REQUEST,
        };
        let code = session.ended(code);
        session.close(code).await;
        return refuse(status, disconnect_json(code));
    }
    let outbox = session.outbox().clone();
    let mut items = Vec::new();
    outbox.drain(&mut items);
    // The first message is the connect reply (or its error).
    let mut first: Value =
        items.first().and_then(|b| serde_json::from_slice(b).ok()).unwrap_or(Value::Null);
    if let Some(err) = first.get("error") {
        let status = match err["code"].as_u64() {
            Some(101 | 109) => StatusCode::UNAUTHORIZED,
            Some(103) => StatusCode::FORBIDDEN,
            Some(106) => StatusCode::TOO_MANY_REQUESTS,
            _ => StatusCode::BAD_REQUEST,
        };
        let code = session.ended(DisconnectCode::BAD_REQUEST);
        session.close(code).await;
        return refuse(status, json!({ "error": err }));
    }
    let mut positions: Vec<Position> = Vec::new();
    if let Some(subs) = first["connect"]["subs"].as_object() {
        for (channel, s) in subs {
            if let (Some(epoch), true) = (s["epoch"].as_str(), s["recoverable"] == true) {
                positions.push(Position(
                    channel.clone(),
                    epoch.to_string(),
                    s["offset"].as_u64().unwrap_or(0),
                ));
            }
        }
    }
    // Over SSE, publications recovered at connect follow the connect push as
    // events of their own (with ids), so a plain EventSource needs no code to
    // find them inside it; over HTTP streaming they stay inside, as Centrifugo
    // sends them.
    let mut recovered = Vec::new();
    if framing == Framing::Sse
        && let Some(subs) = first["connect"]["subs"].as_object_mut()
    {
        for (channel, s) in subs.iter_mut() {
            if let Some(Value::Array(pubs)) =
                s.as_object_mut().and_then(|o| o.remove("publications"))
            {
                for p in pubs {
                    let msg = json!({"channel": channel, "pub": p}).to_string();
                    recovered.push(Bytes::from(msg));
                }
            }
        }
    }
    let (tx, body) = StreamBody::channel();
    let mut conn = UniConn { framing, positions };
    // The connect reply as the unidirectional connect push (no id).
    let connect_push = Bytes::from(json!({"connect": first["connect"]}).to_string());
    items[0] = connect_push;
    items.splice(1..1, recovered);
    let head = conn.frame(&items);
    items.clear();
    tx.try_send(head);
    tokio::spawn(async move {
        let mut wire = UniStreamWire { conn, tx };
        let code = drive(&mut wire, &mut session, &write_timeout).await;
        session.close(code).await
    });
    let content_type = match framing {
        Framing::Sse => "text/event-stream",
        Framing::HttpStream => "application/json",
    };
    streamed(body, content_type)
}

/// One connection's framing state.
struct UniConn {
    framing: Framing,
    /// Latest position of each recoverable channel (for SSE event ids).
    positions: Vec<Position>,
}

/// What a publication push says about its position.
#[derive(Deserialize)]
struct PubPosition<'a> {
    #[serde(borrow)]
    channel: std::borrow::Cow<'a, str>,
    #[serde(rename = "pub")]
    publication: Option<PubOffset>,
}

#[derive(Deserialize)]
struct PubOffset {
    #[serde(default)]
    offset: u64,
}

impl UniConn {
    /// Frames a drained batch of encoded messages as one chunk.
    fn frame(&mut self, items: &[Bytes]) -> Bytes {
        let mut out = BytesMut::new();
        for item in items {
            let msg = unidirectional(item);
            match self.framing {
                Framing::HttpStream => {
                    out.extend_from_slice(msg);
                    out.extend_from_slice(b"\n");
                }
                Framing::Sse => {
                    if let Some(id) = self.advance(msg) {
                        out.extend_from_slice(b"id: ");
                        out.extend_from_slice(id.as_bytes());
                        out.extend_from_slice(b"\n");
                    }
                    // JSON messages hold no raw line break (the encoder
                    // guarantees it), so one `data:` line is the whole message.
                    out.extend_from_slice(b"data: ");
                    out.extend_from_slice(msg);
                    out.extend_from_slice(b"\n\n");
                }
            }
        }
        out.freeze()
    }

    /// For a publication of a recoverable channel: moves its position and
    /// returns the new event id. Costs one partial parse per publication and
    /// connection (the publication's data is skipped, not built).
    fn advance(&mut self, msg: &[u8]) -> Option<String> {
        if self.positions.is_empty() || !msg.starts_with(b"{\"channel\"") {
            return None;
        }
        let p: PubPosition<'_> = serde_json::from_slice(msg).ok()?;
        let offset = p.publication?.offset;
        let pos = self.positions.iter_mut().find(|pos| pos.0 == p.channel)?;
        if offset == 0 {
            return None;
        }
        pos.2 = offset;
        Some(event_id(&self.positions))
    }

    fn goodbye(&self, code: DisconnectCode) -> Bytes {
        let msg = disconnect_json(code).to_string();
        Bytes::from(match self.framing {
            Framing::HttpStream => format!("{msg}\n"),
            Framing::Sse => format!("data: {msg}\n\n"),
        })
    }
}

/// A push as its unidirectional form: without its `{"push":...}` envelope
/// (a slice of the bytes shared by every subscriber, no copy).
fn unidirectional(item: &Bytes) -> &[u8] {
    const PUSH: &[u8] = b"{\"push\":";
    if item.starts_with(PUSH) && item.ends_with(b"}") {
        return &item[PUSH.len()..item.len() - 1];
    }
    item
}

/// A unidirectional HTTP stream as the driver sees it: nothing comes in
/// (the client only receives), batches go out as one chunk each.
struct UniStreamWire {
    conn: UniConn,
    tx: BodySender,
}

impl Wire for UniStreamWire {
    type Token = ();

    async fn read(&mut self) -> Input<()> {
        // The client went away (hyper dropped the body).
        self.tx.closed().await;
        Input::Gone(DisconnectCode::CONNECTION_CLOSED)
    }

    fn frame(&self, _: ()) -> &[u8] {
        &[]
    }

    async fn answer(&mut self, _: (), _: Duration) -> Result<(), End> {
        Ok(())
    }

    async fn write(&mut self, items: &[Bytes]) -> std::io::Result<usize> {
        let chunk = self.conn.frame(items);
        let n = chunk.len();
        self.tx.send(chunk).await.map_err(|_| std::io::ErrorKind::BrokenPipe)?;
        Ok(n)
    }

    async fn goodbye(&mut self, code: DisconnectCode, _: Option<String>, write_timeout: Duration) {
        let _ = tokio::time::timeout(write_timeout, self.tx.send(self.conn.goodbye(code))).await;
    }
}

/// The close code for a connect refused with reply error `code`.
fn refused_close(code: Option<u64>) -> DisconnectCode {
    match code {
        Some(101 | 109) => DisconnectCode::INVALID_TOKEN,
        Some(103) => DisconnectCode::PERMISSION_DENIED,
        Some(106) => DisconnectCode::CHANNEL_LIMIT,
        _ => DisconnectCode::BAD_REQUEST,
    }
}

/// `/connection/uni_websocket` after the upgrade: the first message is the
/// connect request; then every push goes out as a WebSocket message of its
/// own (a plain client parses one JSON value per message), pings as `{}`.
/// Messages from the client after the connect request are ignored; its
/// WebSocket pings are answered and its close ends the connection.
pub async fn serve_websocket<S>(
    conn: &mut WsConn<S>,
    node: Node,
    opts: &WsOptions,
    headers: Option<Arc<Headers>>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let connect_timeout = node.config().connect_timeout;
    let first = tokio::time::timeout(connect_timeout, conn.read()).await;
    let connect: Option<Value> = match &first {
        Ok(Ok(ws::Incoming::Text(p))) => serde_json::from_slice(conn.payload(*p)).ok(),
        _ => None,
    };
    let connect = match (connect, first.is_err()) {
        (Some(v @ Value::Object(_)), _) => v,
        (_, true) => {
            return send_close(conn, DisconnectCode::STALE, None, opts.write_timeout).await;
        }
        _ => return send_close(conn, DisconnectCode::BAD_REQUEST, None, opts.write_timeout).await,
    };
    let Some(mut session) = Session::new_unidirectional(node, Codec::Json, Transport::UniWebSocket)
    else {
        return send_close(conn, DisconnectCode::SHUTDOWN, None, opts.write_timeout).await;
    };
    session.set_proxy_headers(headers);
    let frame = json!({"id": 1, "connect": connect}).to_string();
    let connected = match session.handle_frame(frame.as_bytes()).await {
        Ok(()) => session.settle().await,
        Err(code) => Err(code),
    };
    if let Err(code) = connected {
        let code = session.ended(code);
        send_close(conn, code, None, opts.write_timeout).await;
        return session.close(code).await;
    }
    let outbox = session.outbox().clone();
    let mut items = Vec::new();
    outbox.drain(&mut items);
    let first: Value =
        items.first().and_then(|b| serde_json::from_slice(b).ok()).unwrap_or(Value::Null);
    if let Some(err) = first.get("error") {
        let code = session.ended(refused_close(err["code"].as_u64()));
        send_close(conn, code, None, opts.write_timeout).await;
        return session.close(code).await;
    }
    if !items.is_empty() {
        items[0] = Bytes::from(json!({"connect": first["connect"]}).to_string());
    }
    let mut wire = UniWsWire { conn };
    // What the connect queued goes first, then the driver takes over.
    let sent = tokio::time::timeout(opts.write_timeout, wire.write(&items)).await;
    if !matches!(sent, Ok(Ok(_))) {
        let code = session.ended(DisconnectCode::WRITE_ERROR);
        return session.close(code).await;
    }
    let code = drive(&mut wire, &mut session, &opts.write_timeout).await;
    session.close(code).await
}

/// A unidirectional WebSocket as the driver sees it: every push goes out as
/// a WebSocket message of its own (a plain client parses one JSON value per
/// message); the client's messages are ignored, its pings answered, its
/// close ends the connection.
struct UniWsWire<'c, S> {
    conn: &'c mut WsConn<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Wire for UniWsWire<'_, S> {
    type Token = ws::Payload;

    async fn read(&mut self) -> Input<ws::Payload> {
        loop {
            match self.conn.read().await {
                Ok(ws::Incoming::Ping(p)) => return Input::ControlFrame(p),
                Ok(ws::Incoming::Close(..)) | Err(_) => {
                    return Input::Gone(DisconnectCode::CONNECTION_CLOSED);
                }
                Ok(_) => {}
            }
        }
    }

    fn frame(&self, _: ws::Payload) -> &[u8] {
        &[]
    }

    async fn answer(&mut self, ping: ws::Payload, write_timeout: Duration) -> Result<(), End> {
        answer_ping(self.conn, ping, write_timeout)
            .await
            .map_err(|()| End::Gone(DisconnectCode::WRITE_ERROR))
    }

    async fn write(&mut self, items: &[Bytes]) -> std::io::Result<usize> {
        let mut n = 0;
        for item in items {
            let msg = unidirectional(item);
            self.conn.send(OP_TEXT, msg).await?;
            n += msg.len();
        }
        Ok(n)
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
