//! HTTP requests whose responses are streams (the HTTP transports), read
//! as a plain client would: message by message, SSE event by event.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpStream;

/// A streamed response read message by message.
pub struct Stream {
    pub status: u16,
    pub body: Incoming,
    buf: Vec<u8>,
    pub content_type: String,
    pub headers: hyper::HeaderMap,
}

impl Stream {
    pub async fn open(
        port: u16,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
        body: impl AsRef<[u8]>,
    ) -> Stream {
        let io = TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(io)).await.expect("handshake");
        tokio::spawn(conn);
        let mut req = hyper::Request::builder().method(method).uri(uri).header("host", "127.0.0.1");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::copy_from_slice(body.as_ref()))).expect("request");
        let resp = send.send_request(req).await.expect("response");
        let content_type = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap_or("").to_string())
            .unwrap_or_default();
        Stream {
            headers: resp.headers().clone(),
            status: resp.status().as_u16(),
            body: resp.into_body(),
            buf: Vec::new(),
            content_type,
        }
    }

    /// The whole body of a complete (refused) response.
    pub async fn text(self) -> String {
        let b = self.body.collect().await.expect("body").to_bytes();
        String::from_utf8_lossy(&b).into_owned()
    }

    /// The next chunk of text up to `sep` (within 5 s), without the separator.
    pub async fn next(&mut self, sep: &[u8]) -> Option<String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(i) = self.buf.windows(sep.len()).position(|w| w == sep) {
                let item: Vec<u8> = self.buf.drain(..i + sep.len()).collect();
                return Some(String::from_utf8_lossy(&item[..i]).into_owned());
            }
            let frame = tokio::time::timeout_at(deadline, self.body.frame()).await.ok()??.ok()?;
            if let Ok(data) = frame.into_data() {
                self.buf.extend_from_slice(&data);
            }
        }
    }

    /// The next SSE event: (id, data as JSON).
    pub async fn event(&mut self) -> (Option<String>, Value) {
        let raw = self.next(b"\n\n").await.expect("an event within 5 s");
        let mut id = None;
        let mut data = Value::Null;
        for line in raw.lines() {
            if let Some(v) = line.strip_prefix("id: ") {
                id = Some(v.to_string());
            } else if let Some(v) = line.strip_prefix("data: ") {
                data = serde_json::from_str(v).expect("data is one JSON message");
            }
        }
        (id, data)
    }

    /// The next event that is not a ping.
    pub async fn message(&mut self) -> (Option<String>, Value) {
        loop {
            let (id, data) = self.event().await;
            if data != json!({}) {
                return (id, data);
            }
        }
    }
}

/// `path?cf_connect=<value, percent-encoded>`: the connect request (or
/// command) of the SSE transports in their query.
pub fn cf_connect_uri(path: &str, value: &Value) -> String {
    let q: String =
        value
            .to_string()
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
    format!("{path}?cf_connect={q}")
}
