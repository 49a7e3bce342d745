//! Long-lived HTTP streams served on the bare socket, outside hyper.
//!
//! hyper keeps an 8 KiB read buffer and a write buffer per connection for as
//! long as a response lasts; for a stream that lasts hours and is idle nearly
//! all of it, that is most of its memory (23.3 KiB per idle SSE connection
//! measured with hyper, docs/BENCHMARKS.md). The accept loop peeks at a new
//! connection's first bytes; a request for one of the streaming transports
//! as the connection's first request is read here (head with `httparse`,
//! body by `Content-Length`), handled by the same handler as hyper's path
//! would (which returns the same `Response<AnyBody>`), and its response is
//! written here: a complete one with `Connection: close`, a streamed one with
//! chunked encoding, pumped from the handler's body channel to the socket.
//! The head buffer is freed before the stream starts. Anything else —
//! including a streaming request on a connection that already carried
//! another request — goes to hyper as before.

use std::io;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::AnyBody;

/// Largest request head accepted here (hyper's default limit is larger, but
/// these requests carry a URL and a few headers; `cf_connect` with a token
/// fits easily).
const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;

/// The request lines served here, when the transport is on.
pub(crate) const PREFIXES: [&[u8]; 4] = [
    b"GET /connection/sse",
    b"POST /connection/http_stream",
    b"GET /connection/uni_sse",
    b"POST /connection/uni_http_stream",
];

/// Whether the first bytes of a connection are a request for a streaming
/// transport (a complete path segment, so `/connection/sse2` is not one).
pub(crate) fn wants(peeked: &[u8], enabled: &[bool; 4]) -> bool {
    PREFIXES.iter().zip(enabled).any(|(p, on)| {
        *on && peeked.starts_with(p) && matches!(peeked.get(p.len()), Some(b' ' | b'?'))
    })
}

/// Why a request could not be read.
enum Bad {
    Status(u16, &'static str),
    Gone,
}

/// Reads one request from `stream`: the head within `header_timeout`, the
/// body (`Content-Length`, at most `max_body` bytes) within `body_timeout`.
async fn read_request(
    stream: &mut TcpStream,
    header_timeout: Duration,
    body_timeout: Duration,
    max_body: usize,
) -> Result<Request<Full<Bytes>>, Bad> {
    let mut buf = BytesMut::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + header_timeout;
    let (head_len, mut req, length) = loop {
        let n = tokio::time::timeout_at(deadline, stream.read_buf(&mut buf))
            .await
            .map_err(|_| Bad::Gone)?
            .map_err(|_| Bad::Gone)?;
        if n == 0 {
            return Err(Bad::Gone);
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                if parsed.version != Some(1) {
                    return Err(Bad::Status(505, "HTTP/1.1 only"));
                }
                let mut req = Request::builder()
                    .method(parsed.method.unwrap_or("GET"))
                    .uri(parsed.path.unwrap_or("/"));
                let mut length = 0usize;
                for h in parsed.headers.iter() {
                    if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        return Err(Bad::Status(411, "send the body with Content-Length"));
                    }
                    if h.name.eq_ignore_ascii_case("content-length") {
                        length = std::str::from_utf8(h.value)
                            .ok()
                            .and_then(|v| v.trim().parse().ok())
                            .ok_or(Bad::Status(400, "bad Content-Length"))?;
                    }
                    req = req.header(h.name, h.value);
                }
                break (len, req, length);
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => continue,
            Ok(httparse::Status::Partial) => {
                return Err(Bad::Status(431, "request head too large"));
            }
            Err(_) => return Err(Bad::Status(400, "malformed request")),
        }
    };
    if length > max_body {
        return Err(Bad::Status(413, "request body too large (websocket.max_message_size)"));
    }
    let mut body = buf.split_off(head_len);
    drop(buf);
    let deadline = tokio::time::Instant::now() + body_timeout;
    while body.len() < length {
        body.reserve(length - body.len());
        match tokio::time::timeout_at(deadline, stream.read_buf(&mut body)).await {
            Err(_) => {
                return Err(Bad::Status(
                    408,
                    "request body not received in time (http.body_read_timeout)",
                ));
            }
            Ok(Ok(0) | Err(_)) => return Err(Bad::Gone),
            Ok(Ok(_)) => {}
        }
    }
    body.truncate(length);
    req = req.header(hyper::header::CONTENT_LENGTH, length);
    let req = req.body(Full::new(body.freeze())).map_err(|_| Bad::Status(400, "bad request"))?;
    Ok(req)
}

/// Serves the connection's one request: reads it, lets `handle` answer, and
/// writes the answer (streamed until either side ends it).
pub(crate) async fn serve<F, Fut>(
    mut stream: TcpStream,
    header_timeout: Duration,
    body_timeout: Duration,
    max_body: usize,
    handle: F,
) where
    F: FnOnce(Request<Full<Bytes>>) -> Fut,
    Fut: Future<Output = Response<AnyBody>>,
{
    let req = match read_request(&mut stream, header_timeout, body_timeout, max_body).await {
        Ok(req) => req,
        Err(Bad::Gone) => return,
        Err(Bad::Status(status, text)) => {
            let head = format!(
                "HTTP/1.1 {status} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}\n",
                reason(status),
                text.len() + 1
            );
            let _ = tokio::time::timeout(body_timeout, stream.write_all(head.as_bytes())).await;
            return;
        }
    };
    let response = handle(req).await;
    // The stream lives on in a task of its own: this one's future is sized
    // for reading and handling the request (the header array, the handlers'
    // state), which a task would keep for the stream's whole life.
    tokio::spawn(async move {
        let _ = respond(&mut stream, response, body_timeout).await;
    });
}

/// Writes every byte of `slices`, vectored.
async fn write_all_vectored(stream: &mut TcpStream, mut slices: [&[u8]; 3]) -> io::Result<()> {
    loop {
        let bufs = slices.map(io::IoSlice::new);
        let mut n = stream.write_vectored(&bufs).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        for s in slices.iter_mut() {
            let k = n.min(s.len());
            *s = &s[k..];
            n -= k;
        }
        if slices.iter().all(|s| s.is_empty()) {
            return Ok(());
        }
    }
}

fn reason(status: u16) -> &'static str {
    hyper::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("")
}

fn head(response: &Response<AnyBody>, framing: &str) -> Vec<u8> {
    let status = response.status();
    let mut out = format!("HTTP/1.1 {} {}\r\n", status.as_u16(), reason(status.as_u16()));
    for (k, v) in response.headers() {
        out.push_str(k.as_str());
        out.push_str(": ");
        out.push_str(v.to_str().unwrap_or(""));
        out.push_str("\r\n");
    }
    out.push_str(framing);
    out.push_str("\r\n");
    out.into_bytes()
}

/// Writes `response`; a streamed body is pumped until it ends or the client
/// goes away (then the body channel is dropped, which the connection's
/// driver sees as the client gone).
async fn respond(
    stream: &mut TcpStream,
    response: Response<AnyBody>,
    write_timeout: Duration,
) -> io::Result<()> {
    let (parts, body) = response.into_parts();
    let shell = Response::from_parts(parts, http_body_util::Either::Left(Full::new(Bytes::new())));
    match body {
        http_body_util::Either::Left(full) => {
            let body = full.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
            let framing = format!("content-length: {}\r\nconnection: close\r\n", body.len());
            let mut out = head(&shell, &framing);
            out.extend_from_slice(&body);
            tokio::time::timeout(write_timeout, stream.write_all(&out)).await??;
            Ok(())
        }
        http_body_util::Either::Right(mut chunks) => {
            let mut pending = head(&shell, "transfer-encoding: chunked\r\n");
            drop(shell);
            // The head goes out with the first chunk (the connect reply).
            let mut probe = [0u8; 64];
            loop {
                // Wait for the next chunk; meanwhile watch the socket for the
                // client closing (anything it sends is read and dropped).
                let chunk = tokio::select! {
                    c = chunks.next() => c,
                    r = stream.read(&mut probe) => match r {
                        Ok(0) | Err(_) => return Ok(()),
                        Ok(_) => continue,
                    },
                };
                let Some(chunk) = chunk else {
                    pending.extend_from_slice(b"0\r\n\r\n");
                    tokio::time::timeout(write_timeout, stream.write_all(&pending)).await??;
                    let _ = stream.shutdown().await;
                    return Ok(());
                };
                pending.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                // The chunk goes out between its size line and CRLF in one
                // vectored write (no copy of the chunk).
                let slices = [&pending[..], &chunk[..], b"\r\n"];
                match tokio::time::timeout(write_timeout, write_all_vectored(stream, slices)).await
                {
                    Ok(Ok(())) => {}
                    // A client that stopped reading: the driver's own send
                    // times out too and ends the session.
                    _ => return Ok(()),
                }
                pending = Vec::new();
            }
        }
    }
}
