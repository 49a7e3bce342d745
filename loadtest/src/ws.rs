//! The client side of RFC 6455, just what a load generator needs and no
//! more: the opening handshake (request bytes, response check), a frame
//! decoder over one reused read buffer that hands out every complete message
//! without copying (fragmented messages are joined), and masked frame
//! encoding. No extensions are negotiated, so reserved bits are errors.
//!
//! No IO here: `client.rs` moves the bytes.

use sha1::{Digest, Sha1};

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Close code "normal closure".
pub const CLOSE_NORMAL: u16 = 1000;

/// The GUID RFC 6455 appends to the key for `Sec-WebSocket-Accept`.
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// A message is refused above this (the server's own limit is far lower).
const MAX_MESSAGE: usize = 64 << 20;

/// Reads ask the kernel for at least this much room.
const READ_CHUNK: usize = 4096;

/// A small fast PRNG (xorshift64*) for masks and handshake keys. RFC 6455
/// wants them unpredictable to third parties; a load generator talking to its
/// own server needs them to be merely different per frame and per connection.
pub struct Rng(u64);

impl Rng {
    pub fn new() -> Rng {
        use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let s = SEQ.fetch_add(1, Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let seed = (t ^ s ^ u64::from(std::process::id()).rotate_left(32)) | 1;
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn mask(&mut self) -> [u8; 4] {
        (self.next_u64() as u32).to_ne_bytes()
    }
}

/// Standard base64 with padding.
pub fn base64(input: &[u8]) -> String {
    data_encoding::BASE64.encode(input)
}

/// A fresh `Sec-WebSocket-Key`: 16 random bytes, base64.
pub fn new_key(rng: &mut Rng) -> String {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&rng.next_u64().to_ne_bytes());
    b[8..].copy_from_slice(&rng.next_u64().to_ne_bytes());
    base64(&b)
}

/// The `Sec-WebSocket-Accept` a server must answer `key` with.
pub fn accept_for(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(GUID.as_bytes());
    base64(&h.finalize())
}

/// Everything of the upgrade request but the key and the final blank line;
/// built once per endpoint. `path` includes the query, `host` the port;
/// `subprotocol` is offered in `Sec-WebSocket-Protocol` when given.
pub fn request_head(path: &str, host: &str, subprotocol: Option<&str>) -> Vec<u8> {
    let protocol =
        subprotocol.map(|p| format!("Sec-WebSocket-Protocol: {p}\r\n")).unwrap_or_default();
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         {protocol}Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: "
    )
    .into_bytes()
}

/// Appends the complete upgrade request: `head` (see [`request_head`]) and `key`.
pub fn push_request(out: &mut Vec<u8>, head: &[u8], key: &str) {
    out.extend_from_slice(head);
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
}

/// Checks the server's answer to the upgrade request. `Ok(Some(n))`: a valid
/// `101` whose head is the first `n` bytes (frames may follow); `Ok(None)`:
/// the head is not complete yet. With `subprotocol` (the one offered) the
/// server must have chosen it: a server that ignores it would speak JSON to
/// a client expecting Protobuf, a failure better reported at the upgrade.
pub fn parse_response(
    buf: &[u8],
    key: &str,
    subprotocol: Option<&str>,
) -> Result<Option<usize>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let n = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > 16 * 1024 => {
            return Err("upgrade response head over 16 KiB".into());
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("bad upgrade response: {e}")),
    };
    let code = resp.code.unwrap_or(0);
    if code != 101 {
        return Err(format!("HTTP error: {code} {}", resp.reason.unwrap_or("")));
    }
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    if !header("upgrade").is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket")) {
        return Err("upgrade response without `Upgrade: websocket`".into());
    }
    if !header("connection")
        .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
    {
        return Err("upgrade response without `Connection: upgrade`".into());
    }
    if header("sec-websocket-accept").map(str::trim) != Some(accept_for(key).as_str()) {
        return Err("wrong or missing Sec-WebSocket-Accept".into());
    }
    if header("sec-websocket-extensions").is_some() {
        return Err("server chose an extension we did not offer".into());
    }
    if let Some(p) = subprotocol
        && header("sec-websocket-protocol").map(str::trim) != Some(p)
    {
        return Err(format!("server did not accept the subprotocol {p}"));
    }
    Ok(Some(n))
}

/// XORs `buf` with the mask, the mask's first byte at `buf[0]`.
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4]) {
    let m8 = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes(c.try_into().expect("8 bytes")) ^ m8;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    // The remainder starts at a multiple of 8, so at mask position 0.
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
}

/// Appends one final, masked frame (the client role requires the mask).
pub fn push_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= usize::from(u16::MAX) {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask);
}

/// Appends a masked close frame with `code` and `reason`.
pub fn push_close(out: &mut Vec<u8>, code: u16, reason: &str, mask: [u8; 4]) {
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(reason.as_bytes());
    push_frame(out, OP_CLOSE, &payload, mask);
}

/// Appends an unmasked frame, as a server sends it (the floor endpoint's
/// replies, and frames for the tests).
pub fn push_server_frame(out: &mut Vec<u8>, fin: bool, opcode: u8, payload: &[u8]) {
    out.push(if fin { 0x80 } else { 0 } | opcode);
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= 0xffff => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

/// One complete message from the server.
#[derive(Debug, PartialEq, Eq)]
pub enum Msg<'a> {
    /// A text message (UTF-8 is the caller's to check).
    Text(&'a [u8]),
    Binary(&'a [u8]),
    /// Answer with a pong carrying the same payload.
    Ping(&'a [u8]),
    Pong,
    /// The close frame's code (none when it had no payload) and reason.
    Close(Option<u16>, &'a str),
}

/// The server broke the protocol; the connection must be failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError(pub &'static str);

impl std::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WebSocket protocol error: {}", self.0)
    }
}

/// Bytes read from the server and the frames in them. Complete frames are
/// handed out as slices of the read buffer; a fragmented message is joined
/// in a second buffer. Consumed bytes are dropped before the next read.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Start of the unconsumed bytes in `buf`.
    start: usize,
    /// Bytes the frame at `start` needs in total, when incomplete.
    need: usize,
    /// The fragments of a message so far, and its opcode.
    frag: Vec<u8>,
    frag_op: Option<u8>,
    /// `frag` was handed out: clear it on the next call.
    frag_done: bool,
}

impl Decoder {
    pub fn with_capacity(n: usize) -> Decoder {
        Decoder { buf: Vec::with_capacity(n), ..Default::default() }
    }

    /// The buffer to read into (append at its end), with consumed bytes
    /// removed and room for at least the incomplete frame, or a read chunk.
    pub fn read_buf(&mut self) -> &mut Vec<u8> {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let room = self.buf.capacity() - self.buf.len();
        let want = self.need.saturating_sub(self.buf.len()).max(READ_CHUNK / 2);
        if room < want {
            self.buf.reserve(want.max(READ_CHUNK));
        }
        &mut self.buf
    }

    /// Unconsumed bytes (the handshake response is parsed from here).
    pub fn unread(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.buf.len());
    }

    #[cfg(test)]
    pub fn push(&mut self, bytes: &[u8]) {
        self.read_buf().extend_from_slice(bytes);
    }

    /// The next complete message, or `None` until more bytes arrive.
    pub fn next_msg(&mut self) -> Result<Option<Msg<'_>>, ProtocolError> {
        if self.frag_done {
            self.frag.clear();
            self.frag_done = false;
        }
        loop {
            let avail = &self.buf[self.start..];
            if avail.len() < 2 {
                return Ok(None);
            }
            let (b0, b1) = (avail[0], avail[1]);
            if b0 & 0x70 != 0 {
                return Err(ProtocolError("reserved bits set"));
            }
            if b1 & 0x80 != 0 {
                return Err(ProtocolError("masked frame from the server"));
            }
            let fin = b0 & 0x80 != 0;
            let op = b0 & 0x0f;
            let (len, head) = match b1 & 0x7f {
                126 if avail.len() >= 4 => (u64::from(u16::from_be_bytes([avail[2], avail[3]])), 4),
                127 if avail.len() >= 10 => {
                    (u64::from_be_bytes(avail[2..10].try_into().expect("8 bytes")), 10)
                }
                126 | 127 => return Ok(None),
                n => (u64::from(n), 2),
            };
            if len > MAX_MESSAGE as u64 {
                return Err(ProtocolError("frame over 64 MiB"));
            }
            let total = head + len as usize;
            if avail.len() < total {
                self.need = total;
                return Ok(None);
            }
            self.need = 0;
            let payload = self.start + head..self.start + total;
            self.start += total;
            match op {
                OP_CLOSE | OP_PING | OP_PONG if !fin || len > 125 => {
                    return Err(ProtocolError("fragmented or oversized control frame"));
                }
                OP_PING => return Ok(Some(Msg::Ping(&self.buf[payload]))),
                OP_PONG => return Ok(Some(Msg::Pong)),
                OP_CLOSE => {
                    let p = &self.buf[payload];
                    return match p.len() {
                        0 => Ok(Some(Msg::Close(None, ""))),
                        1 => Err(ProtocolError("one-byte close payload")),
                        _ => {
                            let code = u16::from_be_bytes([p[0], p[1]]);
                            let reason = std::str::from_utf8(&p[2..])
                                .map_err(|_| ProtocolError("close reason is not UTF-8"))?;
                            Ok(Some(Msg::Close(Some(code), reason)))
                        }
                    };
                }
                OP_TEXT | OP_BINARY => {
                    if self.frag_op.is_some() {
                        return Err(ProtocolError("new message inside a fragmented one"));
                    }
                    if fin {
                        let p = &self.buf[payload];
                        return Ok(Some(if op == OP_TEXT { Msg::Text(p) } else { Msg::Binary(p) }));
                    }
                    self.frag_op = Some(op);
                    self.frag.extend_from_slice(&self.buf[payload]);
                }
                OP_CONT => {
                    let Some(first) = self.frag_op else {
                        return Err(ProtocolError("continuation frame without a message"));
                    };
                    if self.frag.len() + len as usize > MAX_MESSAGE {
                        return Err(ProtocolError("message over 64 MiB"));
                    }
                    self.frag.extend_from_slice(&self.buf[payload]);
                    if fin {
                        self.frag_op = None;
                        self.frag_done = true;
                        let p = &self.frag[..];
                        return Ok(Some(if first == OP_TEXT {
                            Msg::Text(p)
                        } else {
                            Msg::Binary(p)
                        }));
                    }
                }
                _ => return Err(ProtocolError("reserved opcode")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server frame (unmasked).
    fn frame(fin: bool, op: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        push_server_frame(&mut v, fin, op, payload);
        v
    }

    fn all(d: &mut Decoder) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(m) = d.next_msg().unwrap() {
            out.push(match m {
                Msg::Text(t) => format!("text {}", String::from_utf8_lossy(t)),
                Msg::Binary(b) => format!("binary {}", b.len()),
                Msg::Ping(p) => format!("ping {}", String::from_utf8_lossy(p)),
                Msg::Pong => "pong".into(),
                Msg::Close(c, r) => format!("close {c:?} {r}"),
            });
        }
        out
    }

    #[test]
    fn rfc_accept_key_and_base64() {
        assert_eq!(accept_for("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        let key = new_key(&mut Rng::new());
        assert_eq!(key.len(), 24);
        assert_ne!(key, new_key(&mut Rng::new()));
    }

    #[test]
    fn request_and_response() {
        let mut req = Vec::new();
        push_request(
            &mut req,
            &request_head("/connection/websocket", "127.0.0.1:8000", None),
            "k==",
        );
        let req = String::from_utf8(req).unwrap();
        assert!(req.starts_with("GET /connection/websocket HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"));
        assert!(req.ends_with("Sec-WebSocket-Key: k==\r\n\r\n"));
        assert!(!req.contains("Sec-WebSocket-Protocol"));
        let head = request_head("/", "h", Some("centrifuge-protobuf"));
        assert!(
            String::from_utf8(head)
                .unwrap()
                .contains("\r\nSec-WebSocket-Protocol: centrifuge-protobuf\r\n")
        );

        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let ok = "HTTP/1.1 101 Switching Protocols\r\nupgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\n\
                  Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        let mut with_frame = ok.as_bytes().to_vec();
        with_frame.extend_from_slice(&frame(true, OP_TEXT, b"{}"));
        assert_eq!(parse_response(&with_frame, key, None), Ok(Some(ok.len())));
        assert_eq!(parse_response(&ok.as_bytes()[..30], key, None), Ok(None));
        let bad = ok.replace("s3pP", "AAAA");
        assert!(parse_response(bad.as_bytes(), key, None).unwrap_err().contains("Accept"));
        let denied = "HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(
            parse_response(denied.as_bytes(), key, None),
            Err("HTTP error: 403 Forbidden".into())
        );
        // A subprotocol offered must be the one chosen.
        let pb = Some("centrifuge-protobuf");
        assert!(parse_response(ok.as_bytes(), key, pb).unwrap_err().contains("subprotocol"));
        let chosen =
            ok.replace("\r\n\r\n", "\r\nSec-WebSocket-Protocol: centrifuge-protobuf\r\n\r\n");
        assert_eq!(parse_response(chosen.as_bytes(), key, pb), Ok(Some(chosen.len())));
    }

    #[test]
    fn masked_frames_decode_back() {
        let mut rng = Rng::new();
        for len in [0, 1, 7, 8, 9, 125, 126, 200, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mask = rng.mask();
            let mut out = Vec::new();
            push_frame(&mut out, OP_TEXT, &payload, mask);
            assert_eq!(out[0], 0x81);
            assert_ne!(out[1] & 0x80, 0, "client frames are masked");
            let head = match len {
                n if n < 126 => 2,
                n if n <= 65535 => 4,
                _ => 10,
            };
            assert_eq!(&out[head..head + 4], &mask);
            let mut body = out[head + 4..].to_vec();
            apply_mask(&mut body, mask);
            assert_eq!(body, payload, "length {len}");
        }
        let mut out = Vec::new();
        push_close(&mut out, 1000, "bye", [1, 2, 3, 4]);
        let mut body = out[6..].to_vec();
        apply_mask(&mut body, [1, 2, 3, 4]);
        assert_eq!(body, b"\x03\xe8bye");
    }

    #[test]
    fn several_frames_in_one_read() {
        let mut d = Decoder::default();
        let mut bytes = frame(true, OP_TEXT, b"{\"a\":1}");
        bytes.extend(frame(true, OP_PING, b"p"));
        bytes.extend(frame(true, OP_TEXT, &[b'x'; 300]));
        bytes.extend(frame(true, OP_PONG, b""));
        bytes.extend(frame(true, OP_BINARY, b"\x00\x01"));
        d.push(&bytes);
        let got = all(&mut d);
        assert_eq!(got.len(), 5);
        assert_eq!(got[0], "text {\"a\":1}");
        assert_eq!(got[1], "ping p");
        assert_eq!(got[2], format!("text {}", "x".repeat(300)));
        assert_eq!(got[3..], ["pong", "binary 2"]);
        assert!(d.unread().is_empty());
    }

    #[test]
    fn a_frame_split_across_reads() {
        let big = vec![b'y'; 70_000];
        let mut bytes = frame(true, OP_TEXT, b"first");
        bytes.extend(frame(true, OP_TEXT, &big));
        bytes.extend(frame(true, OP_TEXT, b"last"));
        // Every split point of the small frames, and a few inside the big one.
        for cut in (0..12).chain([20, 1000, 65_000, bytes.len() - 3]) {
            let mut d = Decoder::default();
            d.push(&bytes[..cut]);
            let mut got = all(&mut d);
            for piece in bytes[cut..].chunks(4096) {
                d.push(piece);
                got.extend(all(&mut d));
            }
            assert_eq!(got.len(), 3, "cut at {cut}");
            assert_eq!(got[0], "text first");
            assert_eq!(got[1].len(), 5 + 70_000);
            assert_eq!(got[2], "text last");
        }
    }

    #[test]
    fn fragments_join_with_control_frames_between() {
        let mut d = Decoder::default();
        let mut bytes = frame(false, OP_TEXT, b"{\"push\":");
        bytes.extend(frame(true, OP_PING, b"hi"));
        bytes.extend(frame(false, OP_CONT, b"{\"channel\""));
        bytes.extend(frame(true, OP_PONG, b""));
        bytes.extend(frame(true, OP_CONT, b":\"c\"}}"));
        bytes.extend(frame(true, OP_TEXT, b"after"));
        // Byte by byte: the worst case of splitting.
        let mut got = Vec::new();
        for b in &bytes {
            d.push(&[*b]);
            got.extend(all(&mut d));
        }
        assert_eq!(got, ["ping hi", "pong", "text {\"push\":{\"channel\":\"c\"}}", "text after"]);
    }

    #[test]
    fn close_frames_carry_code_and_reason() {
        let mut d = Decoder::default();
        let mut p = 3008u16.to_be_bytes().to_vec();
        p.extend_from_slice(b"slow");
        d.push(&frame(true, OP_CLOSE, &p));
        d.push(&frame(true, OP_CLOSE, b""));
        assert_eq!(all(&mut d), ["close Some(3008) slow", "close None "]);

        let mut d = Decoder::default();
        d.push(&frame(true, OP_CLOSE, b"\x03"));
        assert!(d.next_msg().is_err());
    }

    #[test]
    fn protocol_errors() {
        let cases: [(&[u8], &str); 6] = [
            (&[0x81, 0x81, 0, 0, 0, 0, b'a'], "masked frame from the server"),
            (&[0xC1, 0x00], "reserved bits set"),
            (&[0x80, 0x00], "continuation frame without a message"),
            (&[0x09, 0x00], "fragmented or oversized control frame"),
            (&[0x83, 0x00], "reserved opcode"),
            (&[0x01, 0x01, b'a', 0x81, 0x00], "new message inside a fragmented one"),
        ];
        for (bytes, want) in cases {
            let mut d = Decoder::default();
            d.push(bytes);
            let err = loop {
                match d.next_msg() {
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("no error for {bytes:?}"),
                    Err(e) => break e,
                }
            };
            assert_eq!(err.0, want);
        }
    }
}
