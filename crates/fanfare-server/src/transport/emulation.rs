//! Bidirectional emulation over plain HTTP, as centrifuge-js uses it when a
//! WebSocket cannot get through (a proxy or network that breaks upgrades):
//!
//! - `POST /connection/http_stream`: the body holds the first commands (the
//!   connect); the response streams replies — JSON lines, or varint-delimited
//!   Protobuf replies when the request's `Content-Type` is
//!   `application/octet-stream`.
//! - `GET /connection/sse?cf_connect=<commands>`: `text/event-stream`, one
//!   `data:` event per reply (JSON only: an `EventSource` carries text).
//! - `POST /emulation` `{"session","node","data"}` (or the Protobuf
//!   `EmulationRequest`): the client's further commands. `session` and `node`
//!   come from the connect reply. The request may land on any node; the node
//!   holding the session is found through the broker's control channel
//!   (`fanfare_core::emulation`). 200 once the session took the commands,
//!   404 when there is no such session (the SDK then reconnects), 503 when
//!   16 batches already wait for it.
//!
//! A disconnect goes down the stream as a `disconnect` push before the
//! response ends; the client's pings are not expected (no pong).

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fanfare_core::{Emulation, Node, Session, Transport};
use fanfare_protocol::{Codec, DisconnectCode, PushBody, Reply};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use prost::Message;
use serde_json::{Value, json};
use std::sync::Arc;

use fanfare_core::emulation::Inbox;

use super::driver::{End, Input, Wire, account_received, drive};
use super::websocket::WsOptions;
use super::{
    AnyBody, BodySender, ReqBody, StreamBody, disconnect_json, proxy_headers, read_body, refuse,
    streamed, url_param,
};

/// Which emulated transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    HttpStream,
    Sse,
}

fn is_protobuf<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().starts_with("application/octet-stream"))
}

/// Handles `/connection/http_stream` and `/connection/sse`.
pub async fn connect(
    req: Request<impl ReqBody>,
    node: Node,
    opts: &WsOptions,
    stream: Stream,
    body_timeout: Duration,
) -> Response<AnyBody> {
    let expected = if stream == Stream::Sse { Method::GET } else { Method::POST };
    if req.method() != expected {
        return refuse(StatusCode::METHOD_NOT_ALLOWED, json!({"error": format!("use {expected}")}));
    }
    if !opts.origin_allowed(req.headers().get(header::ORIGIN)) {
        return refuse(StatusCode::FORBIDDEN, json!({"error": "origin not allowed"}));
    }
    if node.is_draining() {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, disconnect_json(DisconnectCode::SHUTDOWN));
    }
    let headers = proxy_headers(&node, req.headers());
    let (codec, commands) = match stream {
        Stream::Sse => {
            let query = req.uri().query().unwrap_or("");
            let Some(commands) = url_param(query, "cf_connect") else {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    json!({"error": "query parameter cf_connect (the connect command) is missing"}),
                );
            };
            (Codec::Json, Bytes::from(commands))
        }
        Stream::HttpStream => {
            let codec = if is_protobuf(&req) { Codec::Protobuf } else { Codec::Json };
            let limit = opts.max_message_size;
            match read_body(req, limit, body_timeout, "websocket.max_message_size").await {
                Ok(b) => (codec, b),
                Err(r) => return r,
            }
        }
    };
    if commands.iter().all(u8::is_ascii_whitespace) {
        return refuse(
            StatusCode::BAD_REQUEST,
            json!({"error": "no connect command (request body or cf_connect)"}),
        );
    }
    if commands.len() > opts.max_message_size {
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            json!({"error": format!("connect commands larger than {} bytes (websocket.max_message_size)", opts.max_message_size)}),
        );
    }
    account_received(commands.len());
    let transport = match stream {
        Stream::HttpStream => Transport::HttpStream,
        Stream::Sse => Transport::Sse,
    };
    let Some((mut session, inbox)) = Session::new_emulated(node, codec, transport) else {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, disconnect_json(DisconnectCode::SHUTDOWN));
    };
    session.set_proxy_headers(headers);
    let (tx, body) = StreamBody::channel();
    let write_timeout = opts.write_timeout;
    tokio::spawn(async move {
        let mut wire = EmulatedWire {
            stream,
            codec,
            commands: inbox,
            first: Some(commands),
            frame: Bytes::new(),
            tx,
        };
        let code = drive(&mut wire, &mut session, &write_timeout).await;
        // Unregisters the key first: later `/emulation` requests get 404.
        session.close(code).await;
    });
    let content_type = match (stream, codec) {
        (Stream::Sse, _) => "text/event-stream",
        (Stream::HttpStream, Codec::Json) => "application/json",
        (Stream::HttpStream, Codec::Protobuf) => "application/octet-stream",
    };
    streamed(body, content_type)
}

/// An emulated connection as the driver sees it: command batches arrive from
/// `/emulation` requests (first the connect request's own), replies go down
/// the response.
struct EmulatedWire {
    stream: Stream,
    codec: Codec,
    commands: Arc<Inbox>,
    /// The commands that came with the connect request, read first.
    first: Option<Bytes>,
    frame: Bytes,
    tx: BodySender,
}

impl EmulatedWire {
    fn chunk(&self, items: &[Bytes]) -> Bytes {
        let mut out = BytesMut::new();
        for item in items {
            match (self.stream, self.codec) {
                (Stream::Sse, _) => {
                    // JSON messages hold no raw line break (the encoder
                    // guarantees it), so one `data:` line is the whole reply.
                    out.extend_from_slice(b"data: ");
                    out.extend_from_slice(item);
                    out.extend_from_slice(b"\n\n");
                }
                (Stream::HttpStream, codec) => {
                    out.extend_from_slice(item);
                    out.extend_from_slice(codec.separator());
                }
            }
        }
        out.freeze()
    }
}

impl Wire for EmulatedWire {
    type Token = ();

    async fn read(&mut self) -> Input<()> {
        if let Some(first) = self.first.take() {
            self.frame = first;
            return Input::Frame(());
        }
        // The last batch was handled: do not keep its buffer while idle.
        self.frame = Bytes::new();
        tokio::select! {
            batch = self.commands.next() => {
                self.frame = batch;
                Input::Frame(())
            }
            // The client went away (hyper dropped the response body).
            _ = self.tx.closed() => Input::Gone(DisconnectCode::CONNECTION_CLOSED),
        }
    }

    fn frame(&self, _: ()) -> &[u8] {
        &self.frame
    }

    async fn answer(&mut self, _: (), _: Duration) -> Result<(), End> {
        Ok(())
    }

    async fn write(&mut self, items: &[Bytes]) -> std::io::Result<usize> {
        let chunk = self.chunk(items);
        let n = chunk.len();
        self.tx.send(chunk).await.map_err(|_| std::io::ErrorKind::BrokenPipe)?;
        Ok(n)
    }

    async fn goodbye(&mut self, code: DisconnectCode, _: Option<String>, write_timeout: Duration) {
        let push = Reply::push("", PushBody::Disconnect(code.into()));
        let Ok(msg) = self.codec.encode(&push) else { return };
        let chunk = self.chunk(&[msg]);
        let _ = tokio::time::timeout(write_timeout, self.tx.send(chunk)).await;
    }
}

/// `EmulationRequest` of the client protocol (node 1, session 2, data 3).
#[derive(Clone, PartialEq, prost::Message)]
struct EmulationRequest {
    #[prost(string, tag = "1")]
    node: String,
    #[prost(string, tag = "2")]
    session: String,
    #[prost(bytes = "bytes", tag = "3")]
    data: Bytes,
}

/// Handles `POST /emulation`.
pub async fn emulate(
    req: Request<impl ReqBody>,
    node: &Node,
    opts: &WsOptions,
    body_timeout: Duration,
) -> Response<AnyBody> {
    if req.method() != Method::POST {
        return refuse(StatusCode::METHOD_NOT_ALLOWED, json!({"error": "use POST"}));
    }
    if !opts.origin_allowed(req.headers().get(header::ORIGIN)) {
        return refuse(StatusCode::FORBIDDEN, json!({"error": "origin not allowed"}));
    }
    let protobuf = is_protobuf(&req);
    // The commands may take `websocket.max_message_size`; JSON escaping
    // inside the `data` string can double them, plus the envelope.
    let limit = opts.max_message_size * 2 + 1024;
    let body = match read_body(req, limit, body_timeout, "websocket.max_message_size").await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let request = if protobuf { EmulationRequest::decode(body).ok() } else { parse_json(&body) };
    let Some(request) = request else {
        return refuse(
            StatusCode::BAD_REQUEST,
            json!({"error": "body must be an emulation request: {\"session\", \"node\", \"data\"}"}),
        );
    };
    if request.session.is_empty() || request.data.is_empty() {
        return refuse(StatusCode::BAD_REQUEST, json!({"error": "session and data are required"}));
    }
    if request.data.len() > opts.max_message_size {
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            json!({"error": format!("commands larger than {} bytes (websocket.max_message_size)", opts.max_message_size)}),
        );
    }
    account_received(request.data.len());
    match node.emulate(&request.node, &request.session, request.data).await {
        Emulation::Delivered => {
            let mut r = refuse(StatusCode::OK, json!({}));
            r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        Emulation::Unknown => refuse(StatusCode::NOT_FOUND, json!({"error": "unknown session"})),
        Emulation::Busy => refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": "too many command batches waiting for this session"}),
        ),
    }
}

/// The JSON form: `data` is the commands as one string (what centrifuge-js
/// sends: commands joined by newlines), or a command object itself.
fn parse_json(body: &[u8]) -> Option<EmulationRequest> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let data = match v.get("data")? {
        Value::String(s) => Bytes::from(s.clone()),
        d @ (Value::Object(_) | Value::Array(_)) => Bytes::from(d.to_string()),
        _ => return None,
    };
    Some(EmulationRequest {
        node: v.get("node").and_then(Value::as_str).unwrap_or_default().to_string(),
        session: v.get("session")?.as_str()?.to_string(),
        data,
    })
}

/// Fuzz entry: an `/emulation` body (JSON, or Protobuf when `protobuf`) as
/// `emulate` reads it, then its commands through the session's codec.
#[cfg(feature = "fuzzing")]
#[allow(dead_code)] // compiled into the binary too, used by the library
pub(crate) fn fuzz_request(body: &[u8], protobuf: bool) {
    let request = if protobuf { EmulationRequest::decode(body).ok() } else { parse_json(body) };
    if let Some(r) = request {
        let codec = if protobuf { Codec::Protobuf } else { Codec::Json };
        let _ = codec.decode(&r.data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_emulation_request_takes_data_as_the_sdk_sends_it_or_as_an_object() {
        let r = parse_json(br#"{"session":"s","node":"n","data":"{\"id\":2,\"publish\":{}}"}"#)
            .unwrap();
        assert_eq!((r.session.as_str(), r.node.as_str()), ("s", "n"));
        assert_eq!(&r.data[..], br#"{"id":2,"publish":{}}"#);
        let r = parse_json(br#"{"session":"s","data":{"id":3}}"#).unwrap();
        assert_eq!(&r.data[..], br#"{"id":3}"#);
        assert!(parse_json(br#"{"session":"s","data":5}"#).is_none());
        assert!(parse_json(br#"{"data":"x"}"#).is_none());
        assert!(parse_json(b"not json").is_none());
    }

    #[test]
    fn the_protobuf_emulation_request_has_the_sdk_field_numbers() {
        // node 1, session 2, data 3, as centrifuge-js's encoder writes them.
        let wire = [10, 1, b'n', 18, 1, b's', 26, 2, 0, 1];
        let r = EmulationRequest::decode(&wire[..]).unwrap();
        assert_eq!((r.node.as_str(), r.session.as_str(), &r.data[..]), ("n", "s", &[0u8, 1][..]));
    }
}
