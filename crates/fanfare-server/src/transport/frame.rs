//! WebSocket framing for the server role (RFC 6455, no extensions).
//!
//! [`WsConn`] reads and writes frames on a socket with as little state per
//! connection as possible, because a gateway holds very many idle ones:
//!
//! - Socket reads land in one buffer per worker thread (up to `read_size`
//!   bytes); only what was read is copied into the connection's own buffer,
//!   which is freed once every frame in it was handled. An idle connection
//!   holds no buffer at all. A frame larger than `read_size` is read straight
//!   into a buffer of its size.
//! - Payloads are unmasked in place as they arrive, and text is checked for
//!   UTF-8 as it arrives too (across fragments), so invalid text fails at the
//!   first bad byte, not at the end of the message.
//! - Small writes (up to 16 KiB on the wire) are assembled in one buffer per
//!   thread and offered to the socket in one `write`; the rest, and anything
//!   larger, goes out as a 2–10 byte header plus the caller's payload slices
//!   in vectored writes. No connection keeps a write buffer.
//!
//! Enforced (a violation is an error whose [`WsError::close_code`] is the code
//! to close with): RSV bits must be 0; known opcodes only; client frames must
//! be masked; control frames are at most 125 bytes and not fragmented;
//! continuation frames only inside a fragmented message and no new message
//! inside one (1002); text and close reasons are UTF-8 (1007); close codes
//! must be valid to send (1002); a message larger than the limit is refused
//! as soon as its header says so (1009).

use std::cell::RefCell;
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Most iovecs one vectored write is given (Linux IOV_MAX).
const MAX_IOVECS: usize = 1024;

/// Frames and batches up to this many bytes on the wire are copied into one
/// per-thread buffer and written with a single `write` instead of a vectored
/// write of two slices per message: at ~10 messages per write the kernel's
/// per-slice work (`_copy_from_iter`, `vfs_writev`) was ~10 % of the node's
/// CPU, the copy costs a fraction of that.
const COPY_MAX: usize = 16 * 1024;

thread_local! {
    /// Socket reads of all connections of a worker thread land here first.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// Small batches are assembled here before their single write.
    static WRITE_SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Groups consecutive items into frames of at most `max_frame` payload bytes
/// (a larger item is a frame of its own): (payload length, item count) each.
fn frames<T: AsRef<[u8]>>(
    items: &[T],
    separator: usize,
    max_frame: usize,
) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        if i >= items.len() {
            return None;
        }
        let mut len = items[i].as_ref().len();
        let mut j = i + 1;
        while j < items.len() && len + separator + items[j].as_ref().len() <= max_frame {
            len += separator + items[j].as_ref().len();
            j += 1;
        }
        let count = j - i;
        i = j;
        Some((len, count))
    })
}

/// Why reading failed.
#[derive(Debug)]
pub enum WsError {
    /// The peer closed the TCP connection (or reading is over after an error).
    Eof,
    Io(io::Error),
    /// A framing rule was broken: close with 1002.
    Protocol(&'static str),
    /// Text or a close reason that is not UTF-8: close with 1007.
    InvalidUtf8,
    /// A message over the size limit: close with 1009.
    TooBig,
}

impl WsError {
    /// The close code to send for this error, if one should be sent.
    pub fn close_code(&self) -> Option<u16> {
        match self {
            WsError::Protocol(_) => Some(1002),
            WsError::InvalidUtf8 => Some(1007),
            WsError::TooBig => Some(1009),
            WsError::Eof | WsError::Io(_) => None,
        }
    }
}

impl std::fmt::Display for WsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WsError::Eof => f.write_str("connection closed"),
            WsError::Io(e) => write!(f, "{e}"),
            WsError::Protocol(what) => write!(f, "protocol error: {what}"),
            WsError::InvalidUtf8 => f.write_str("invalid UTF-8"),
            WsError::TooBig => f.write_str("message too big"),
        }
    }
}

/// Where a received payload is; read it with [`WsConn::payload`] before the
/// next [`WsConn::read`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Payload {
    /// In the reassembly buffer of a fragmented message, else in the read buffer.
    assembled: bool,
    start: usize,
    end: usize,
}

impl Payload {
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

/// What [`WsConn::read`] returns. Pongs are consumed silently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incoming {
    Text(Payload),
    Binary(Payload),
    /// Answer with a pong carrying the same payload ([`WsConn::send`]).
    Ping(Payload),
    /// The peer's close: its code (None for an empty close) and reason.
    Close(Option<u16>, Payload),
}

/// Whether a peer may send close code `code` (RFC 6455 7.4 and the IANA
/// registry: 1004–1006 and 1015 are reserved, below 1000 and 1016–2999 unused).
pub fn close_code_valid(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// UTF-8 checked piece by piece: a sequence split between two pieces is
/// kept (at most 3 bytes) until the next piece completes it.
#[derive(Debug, Default, Clone, Copy)]
struct Utf8Check {
    tail: [u8; 4],
    len: u8,
}

fn utf8_width(lead: u8) -> usize {
    match lead {
        0xC2..=0xDF => 2,
        0xE0..=0xEF => 3,
        _ => 4,
    }
}

impl Utf8Check {
    fn feed(&mut self, mut data: &[u8]) -> Result<(), WsError> {
        if self.len > 0 {
            let have = self.len as usize;
            let take = (utf8_width(self.tail[0]) - have).min(data.len());
            self.tail[have..have + take].copy_from_slice(&data[..take]);
            self.len += take as u8;
            data = &data[take..];
            match std::str::from_utf8(&self.tail[..self.len as usize]) {
                Ok(_) => self.len = 0,
                // Still a valid prefix; `data` is used up.
                Err(e) if e.error_len().is_none() => return Ok(()),
                Err(_) => return Err(WsError::InvalidUtf8),
            }
        }
        match std::str::from_utf8(data) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_none() => {
                let rest = &data[e.valid_up_to()..];
                self.tail[..rest.len()].copy_from_slice(rest);
                self.len = rest.len() as u8;
                Ok(())
            }
            Err(_) => Err(WsError::InvalidUtf8),
        }
    }

    fn complete(&self) -> bool {
        self.len == 0
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy)]
struct Head {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    /// Header length in bytes.
    size: u8,
    len: u64,
}

/// Parses a client frame header; `Ok(None)` when more bytes are needed.
fn parse_head(b: &[u8]) -> Result<Option<Head>, WsError> {
    let Some(&b0) = b.first() else { return Ok(None) };
    if b0 & 0x70 != 0 {
        return Err(WsError::Protocol("reserved bits set without an extension"));
    }
    let opcode = b0 & 0x0F;
    if !matches!(opcode, 0x0..=0x2 | 0x8..=0xA) {
        return Err(WsError::Protocol("unknown opcode"));
    }
    let fin = b0 & 0x80 != 0;
    let Some(&b1) = b.get(1) else { return Ok(None) };
    if b1 & 0x80 == 0 {
        return Err(WsError::Protocol("unmasked client frame"));
    }
    let len7 = b1 & 0x7F;
    if opcode >= 0x8 && (!fin || len7 > 125) {
        return Err(WsError::Protocol("fragmented or oversized control frame"));
    }
    let ext = match len7 {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let size = 2 + ext + 4;
    if b.len() < size {
        return Ok(None);
    }
    let len = match ext {
        2 => u16::from_be_bytes([b[2], b[3]]) as u64,
        8 => {
            let len = u64::from_be_bytes(b[2..10].try_into().expect("8 bytes"));
            if len >> 63 != 0 {
                return Err(WsError::Protocol("payload length with the top bit set"));
            }
            len
        }
        _ => len7 as u64,
    };
    let mask = b[size - 4..size].try_into().expect("4 bytes");
    Ok(Some(Head { fin, opcode, mask, size: size as u8, len }))
}

/// XORs `data` with `mask`, `data` starting at payload offset `offset`.
fn unmask(data: &mut [u8], mask: [u8; 4], offset: usize) {
    let mut m = [0u8; 4];
    for (i, b) in m.iter_mut().enumerate() {
        *b = mask[(offset + i) % 4];
    }
    let word = u32::from_ne_bytes(m);
    let mut chunks = data.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= m[i];
    }
}

/// A frame header to send (server frames are not masked).
#[derive(Debug, Clone, Copy)]
pub struct Header {
    bytes: [u8; 10],
    len: u8,
}

impl Header {
    /// A final frame of `opcode` with a payload of `len` bytes.
    pub fn new(opcode: u8, len: usize) -> Self {
        let mut bytes = [0u8; 10];
        bytes[0] = 0x80 | opcode;
        let n = if len < 126 {
            bytes[1] = len as u8;
            2
        } else if len <= u16::MAX as usize {
            bytes[1] = 126;
            bytes[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            4
        } else {
            bytes[1] = 127;
            bytes[2..10].copy_from_slice(&(len as u64).to_be_bytes());
            10
        };
        Self { bytes, len: n }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

/// The frame being received (its header parsed, its payload not complete).
#[derive(Debug, Clone, Copy)]
struct Partial {
    head: Head,
    /// Payload bytes already unmasked (and checked, for text).
    done: u64,
}

/// One server-side WebSocket connection. See the module docs.
pub struct WsConn<S> {
    io: S,
    /// Bytes read and not yet consumed, from `pos` on.
    buf: Vec<u8>,
    pos: usize,
    /// A frame or message in progress (boxed: absent between messages).
    progress: Option<Box<Progress>>,
    /// Reading failed: every further read returns `Eof`.
    failed: bool,
    read_size: u32,
    max_message: usize,
}

/// What is kept only while a frame arrives in pieces or a message in fragments.
#[derive(Debug, Default)]
struct Progress {
    partial: Option<Partial>,
    /// UTF-8 state of the text message being received.
    utf8: Utf8Check,
    /// Opcode of the fragmented message in progress (0 = none).
    fragmented: u8,
    /// The payload of a fragmented message so far.
    assembled: Vec<u8>,
    /// `assembled` was handed out and is freed on the next read.
    assembled_out: bool,
}

impl Progress {
    fn idle(&self) -> bool {
        self.partial.is_none()
            && self.fragmented == 0
            && self.utf8.complete()
            && self.assembled.capacity() == 0
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsConn<S> {
    /// A connection after the handshake. `read_ahead` is what the HTTP layer
    /// read past the upgrade request (usually nothing).
    pub fn new(io: S, read_ahead: &[u8], read_size: usize, max_message: usize) -> Self {
        Self {
            io,
            buf: read_ahead.to_vec(),
            pos: 0,
            progress: None,
            failed: false,
            read_size: read_size.clamp(16, u32::MAX as usize) as u32,
            max_message,
        }
    }

    /// The bytes of a payload returned by the last [`WsConn::read`].
    pub fn payload(&self, p: Payload) -> &[u8] {
        match (&self.progress, p.assembled) {
            (Some(progress), true) => &progress.assembled[p.start..p.end],
            _ => &self.buf[p.start..p.end],
        }
    }

    /// Bytes held for this connection's reading (0 when idle).
    pub fn buffered_capacity(&self) -> usize {
        self.buf.capacity()
            + self.progress.as_ref().map_or(0, |p| size_of::<Progress>() + p.assembled.capacity())
    }

    /// Reads the next message or control frame. Cancel-safe: bytes read are
    /// kept in the connection, never in the future.
    pub async fn read(&mut self) -> Result<Incoming, WsError> {
        if self.failed {
            return Err(WsError::Eof);
        }
        if let Some(p) = &mut self.progress {
            if p.assembled_out {
                p.assembled = Vec::new();
                p.assembled_out = false;
            }
            if p.idle() {
                self.progress = None;
            }
        }
        loop {
            match self.parse() {
                Ok(Some(incoming)) => return Ok(incoming),
                Ok(None) => {}
                Err(e) => {
                    self.failed = true;
                    return Err(e);
                }
            }
            match poll_fn(|cx| self.poll_fill(cx)).await {
                Ok(0) => {
                    self.failed = true;
                    return Err(WsError::Eof);
                }
                Ok(_) => {}
                Err(e) => {
                    self.failed = true;
                    return Err(WsError::Io(e));
                }
            }
        }
    }

    /// Bytes still missing of the frame being received, when known.
    fn missing(&self) -> usize {
        match self.progress.as_ref().and_then(|p| p.partial.as_ref()) {
            Some(p) => {
                let total = p.head.size as usize + p.head.len as usize;
                total.saturating_sub(self.buf.len() - self.pos)
            }
            None => 0,
        }
    }

    /// One socket read, appended to `buf`. Returns the bytes read (0 = EOF).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        // Drop what was consumed: all of it (freeing the buffer), or the
        // front before appending more.
        if self.pos == self.buf.len() {
            self.buf = Vec::new();
            self.pos = 0;
        } else if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        let read_size = self.read_size as usize;
        let missing = self.missing();
        if missing > read_size {
            // A large frame: read straight into a buffer of its size.
            self.buf.reserve_exact(missing);
            let spare = self.buf.spare_capacity_mut();
            let mut rb = ReadBuf::uninit(&mut spare[..missing]);
            return match Pin::new(&mut self.io).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    // SAFETY: `poll_read` initialized the first `n` spare bytes.
                    unsafe { self.buf.set_len(self.buf.len() + n) };
                    Poll::Ready(Ok(n))
                }
                other => other.map_ok(|()| 0),
            };
        }
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            if scratch.len() < read_size {
                scratch.resize(read_size, 0);
            }
            let mut rb = ReadBuf::new(&mut scratch[..read_size]);
            match Pin::new(&mut self.io).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let filled = rb.filled();
                    if self.buf.is_empty() {
                        // Exactly what was read, no growth slack.
                        self.buf = filled.to_vec();
                    } else {
                        self.buf.extend_from_slice(filled);
                    }
                    Poll::Ready(Ok(filled.len()))
                }
                other => other.map_ok(|()| 0),
            }
        })
    }

    fn progress(&mut self) -> &mut Progress {
        self.progress.get_or_insert_default()
    }

    /// Takes the next complete message or control frame out of `buf`.
    fn parse(&mut self) -> Result<Option<Incoming>, WsError> {
        loop {
            let (fragmented, assembled_len) =
                self.progress.as_ref().map_or((0, 0), |p| (p.fragmented, p.assembled.len()));
            let part = match self.progress.as_ref().and_then(|p| p.partial) {
                Some(p) => p,
                None => {
                    let Some(head) = parse_head(&self.buf[self.pos..])? else { return Ok(None) };
                    match head.opcode {
                        OP_CONTINUATION if fragmented == 0 => {
                            return Err(WsError::Protocol("continuation without a message"));
                        }
                        OP_TEXT | OP_BINARY if fragmented != 0 => {
                            return Err(WsError::Protocol("new message inside a fragmented one"));
                        }
                        _ => {}
                    }
                    if head.opcode < 0x8
                        && head.len.saturating_add(assembled_len as u64) > self.max_message as u64
                    {
                        return Err(WsError::TooBig);
                    }
                    Partial { head, done: 0 }
                }
            };
            let head = part.head;
            let start = self.pos + head.size as usize;
            let have = ((self.buf.len() - start) as u64).min(head.len) as usize;
            let done = part.done as usize;
            let text =
                head.opcode == OP_TEXT || (head.opcode == OP_CONTINUATION && fragmented == OP_TEXT);
            // A whole unfragmented text frame at once (the usual case) is
            // checked in one go; anything else through the kept UTF-8 state.
            let whole = head.fin && head.opcode == OP_TEXT && done == 0 && have as u64 == head.len;
            if have > done {
                unmask(&mut self.buf[start + done..start + have], head.mask, done);
                if text && whole {
                    if std::str::from_utf8(&self.buf[start..start + have]).is_err() {
                        return Err(WsError::InvalidUtf8);
                    }
                } else if text {
                    let piece = &self.buf[start + done..start + have];
                    self.progress.get_or_insert_default().utf8.feed(piece)?;
                }
            }
            if (have as u64) < head.len {
                self.progress().partial = Some(Partial { head, done: have as u64 });
                return Ok(None);
            }
            if let Some(p) = &mut self.progress {
                p.partial = None;
            }
            let end = start + have;
            self.pos = end;
            let here = Payload { assembled: false, start, end };
            let utf8_complete = self.progress.as_ref().is_none_or(|p| p.utf8.complete());
            match head.opcode {
                OP_CLOSE => return self.close_frame(here).map(Some),
                OP_PING => return Ok(Some(Incoming::Ping(here))),
                OP_PONG => continue,
                OP_TEXT | OP_BINARY if head.fin => {
                    if !utf8_complete {
                        return Err(WsError::InvalidUtf8);
                    }
                    return Ok(Some(if head.opcode == OP_TEXT {
                        Incoming::Text(here)
                    } else {
                        Incoming::Binary(here)
                    }));
                }
                OP_TEXT | OP_BINARY => {
                    let Self { buf, progress, .. } = self;
                    let p = progress.get_or_insert_default();
                    p.fragmented = head.opcode;
                    p.assembled.extend_from_slice(&buf[start..end]);
                }
                _ => {
                    // Continuation.
                    let Self { buf, progress, .. } = self;
                    let p = progress.get_or_insert_default();
                    p.assembled.extend_from_slice(&buf[start..end]);
                    if head.fin {
                        if !p.utf8.complete() {
                            return Err(WsError::InvalidUtf8);
                        }
                        let opcode = std::mem::replace(&mut p.fragmented, 0);
                        p.assembled_out = true;
                        let all = Payload { assembled: true, start: 0, end: p.assembled.len() };
                        return Ok(Some(if opcode == OP_TEXT {
                            Incoming::Text(all)
                        } else {
                            Incoming::Binary(all)
                        }));
                    }
                }
            }
        }
    }

    fn close_frame(&self, p: Payload) -> Result<Incoming, WsError> {
        let body = &self.buf[p.start..p.end];
        match body.len() {
            0 => Ok(Incoming::Close(None, p)),
            1 => Err(WsError::Protocol("close frame with a 1-byte payload")),
            _ => {
                let code = u16::from_be_bytes([body[0], body[1]]);
                if !close_code_valid(code) {
                    return Err(WsError::Protocol("invalid close code"));
                }
                if std::str::from_utf8(&body[2..]).is_err() {
                    return Err(WsError::InvalidUtf8);
                }
                Ok(Incoming::Close(Some(code), Payload { start: p.start + 2, ..p }))
            }
        }
    }

    /// Writes one frame (see `send_joined` for how).
    pub async fn send(&mut self, opcode: u8, payload: &[u8]) -> io::Result<()> {
        self.send_joined(opcode, &[payload], b"", usize::MAX).await.map(|_| ())
    }

    /// Writes a close frame with `code` and `reason` (cut to 123 bytes at a
    /// character boundary).
    pub async fn send_close(&mut self, code: u16, reason: &str) -> io::Result<()> {
        let mut end = reason.len().min(123);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let mut body = [0u8; 125];
        body[..2].copy_from_slice(&code.to_be_bytes());
        body[2..2 + end].copy_from_slice(&reason.as_bytes()[..end]);
        self.send(OP_CLOSE, &body[..2 + end]).await
    }

    /// Writes `items` as frames of `opcode`, joining consecutive items with
    /// `separator` into frames of at most `max_frame` bytes (a larger item is a
    /// frame of its own). Returns the payload bytes written.
    ///
    /// Up to `COPY_MAX` bytes on the wire are assembled in the thread's write
    /// buffer and offered to the socket in one `write`; the buffer is never
    /// held across an await. Whatever the socket does not take at once (all
    /// of it when it is full) and larger batches go out as vectored writes of
    /// the header and the caller's slices, so a connection waiting on a full
    /// socket holds no copy of its messages.
    pub async fn send_joined<T: AsRef<[u8]>>(
        &mut self,
        opcode: u8,
        items: &[T],
        separator: &[u8],
        max_frame: usize,
    ) -> io::Result<usize> {
        let (mut payload, mut wire) = (0, 0);
        for (len, _) in frames(items, separator.len(), max_frame) {
            payload += len;
            wire += len + Header::new(opcode, len).as_bytes().len();
        }
        let mut written = 0;
        if wire <= COPY_MAX {
            let io = &mut self.io;
            written = poll_fn(|cx| {
                Poll::Ready(WRITE_SCRATCH.with_borrow_mut(|buf| {
                    buf.clear();
                    // Sized once, so the buffer never grows past COPY_MAX.
                    buf.reserve_exact(COPY_MAX);
                    let mut next = items.iter();
                    for (len, count) in frames(items, separator.len(), max_frame) {
                        buf.extend_from_slice(Header::new(opcode, len).as_bytes());
                        for k in 0..count {
                            if k > 0 {
                                buf.extend_from_slice(separator);
                            }
                            buf.extend_from_slice(next.next().expect("grouped items").as_ref());
                        }
                    }
                    match Pin::new(&mut *io).poll_write(cx, buf) {
                        Poll::Ready(Ok(0)) if !buf.is_empty() => {
                            Err(io::Error::from(io::ErrorKind::WriteZero))
                        }
                        Poll::Ready(r) => r,
                        // Nothing written: the vectored write below waits.
                        Poll::Pending => Ok(0),
                    }
                }))
            })
            .await?;
            if written == wire {
                poll_fn(|cx| Pin::new(&mut self.io).poll_flush(cx)).await?;
                return Ok(payload);
            }
        }
        let headers: Vec<(Header, usize)> = frames(items, separator.len(), max_frame)
            .map(|(len, count)| (Header::new(opcode, len), count))
            .collect();
        let mut bufs = Vec::with_capacity(headers.len() + items.len() * 2);
        let mut rest = items.iter();
        for (header, count) in &headers {
            bufs.push(IoSlice::new(header.as_bytes()));
            for k in 0..*count {
                let item = rest.next().expect("grouped items");
                if k > 0 && !separator.is_empty() {
                    bufs.push(IoSlice::new(separator));
                }
                bufs.push(IoSlice::new(item.as_ref()));
            }
        }
        let mut bufs = &mut bufs[..];
        IoSlice::advance_slices(&mut bufs, written);
        self.write_all_vectored(bufs).await?;
        Ok(payload)
    }

    async fn write_all_vectored(&mut self, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
        while !bufs.is_empty() {
            let take = bufs.len().min(MAX_IOVECS);
            let n =
                poll_fn(|cx| Pin::new(&mut self.io).poll_write_vectored(cx, &bufs[..take])).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut bufs, n);
        }
        poll_fn(|cx| Pin::new(&mut self.io).poll_flush(cx)).await
    }

    /// Closes the sending side of the socket.
    pub async fn shutdown(&mut self) -> io::Result<()> {
        poll_fn(|cx| Pin::new(&mut self.io).poll_shutdown(cx)).await
    }

    /// Reads and drops raw bytes until the peer closes or the caller's
    /// timeout ends this future ("lingering close", RFC 9112 9.6): a socket
    /// closed with unread input makes the kernel send a reset, which can
    /// destroy the close frame just written before the peer reads it (seen
    /// after a 1009 for a message still arriving).
    pub async fn drain_input(&mut self) {
        let mut scratch = [0u8; 4096];
        loop {
            let n = poll_fn(|cx| {
                let mut rb = ReadBuf::new(&mut scratch);
                Pin::new(&mut self.io).poll_read(cx, &mut rb).map_ok(|()| rb.filled().len())
            })
            .await;
            if !matches!(n, Ok(n) if n > 0) {
                return;
            }
        }
    }
}

/// The `Sec-WebSocket-Accept` value for a `Sec-WebSocket-Key` (RFC 6455 4.2.2).
pub fn accept_key(key: &[u8]) -> String {
    use sha1::Digest;
    let mut h = sha1::Sha1::new();
    h.update(key);
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    data_encoding::BASE64.encode(&h.finalize())
}

/// Checks an HTTP request for a WebSocket upgrade (RFC 6455 4.2.1) and
/// returns its `Sec-WebSocket-Key`, or the status and text to refuse it with
/// (426 means the version is not 13; answer with `Sec-WebSocket-Version: 13`).
pub fn check_upgrade<B>(
    req: &hyper::Request<B>,
) -> Result<hyper::header::HeaderValue, (hyper::StatusCode, &'static str)> {
    use hyper::header;
    let has_token = |name: header::HeaderName, token: &str| {
        req.headers().get_all(name).iter().any(|v| {
            v.to_str()
                .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
                .unwrap_or(false)
        })
    };
    // RFC 6455 4.1: "HTTP/1.1 or higher". An HTTP/1.0 peer (or a proxy that
    // downgraded the request) has no Upgrade mechanism to rely on.
    if req.version() < hyper::Version::HTTP_11 {
        return Err((hyper::StatusCode::BAD_REQUEST, "WebSocket needs HTTP/1.1\n"));
    }
    if req.method() != hyper::Method::GET
        || !has_token(header::CONNECTION, "upgrade")
        || !has_token(header::UPGRADE, "websocket")
    {
        return Err((hyper::StatusCode::BAD_REQUEST, "expected a WebSocket upgrade request\n"));
    }
    if req.headers().get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
        return Err((hyper::StatusCode::UPGRADE_REQUIRED, "unsupported WebSocket version\n"));
    }
    let key = req
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or((hyper::StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key\n"))?;
    // RFC 6455 4.2.1 item 5: the key is a base64-encoded 16-byte value, so
    // exactly 24 characters of canonical padded base64.
    if !is_websocket_key(key.as_bytes()) {
        return Err((
            hyper::StatusCode::BAD_REQUEST,
            "Sec-WebSocket-Key is not 16 base64-encoded bytes\n",
        ));
    }
    Ok(key.clone())
}

/// A `Sec-WebSocket-Key`: 16 bytes in standard padded base64 (24 characters).
fn is_websocket_key(key: &[u8]) -> bool {
    // BASE64 checks padding and trailing bits: one canonical spelling per key.
    key.len() == 24 && data_encoding::BASE64.decode(key).is_ok_and(|k| k.len() == 16)
}

/// The 101 answer to an upgrade request with `key`.
pub fn switching_protocols(
    key: &hyper::header::HeaderValue,
) -> hyper::Response<http_body_util::Full<Bytes>> {
    use hyper::header::{self, HeaderValue};
    let mut resp = hyper::Response::new(http_body_util::Full::new(Bytes::new()));
    *resp.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept_key(key.as_bytes())).expect("base64 is a valid header value"),
    );
    resp
}

#[cfg(test)]
mod tests {
    #[test]
    fn websocket_key_must_be_sixteen_base64_bytes() {
        use super::is_websocket_key;
        assert!(is_websocket_key(b"dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(!is_websocket_key(b"dGhlIHNhbXBsZSBub25jZQ")); // unpadded
        assert!(!is_websocket_key(b"dGhlIHNhbXBsZSBub25jZR==")); // trailing bits
        assert!(!is_websocket_key(b"dGhlIHNhbXBsZSBub25j")); // 15 bytes
        assert!(!is_websocket_key(b"dGhlIHNhbXBsZSBub25jZQ==dGhl"));
        assert!(!is_websocket_key(b"not base64 at all!!!!!!!"));
        assert!(!is_websocket_key(b""));
    }
    use super::*;
    use futures_util::FutureExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// A client frame: masked, with the given first byte (FIN, RSV, opcode).
    fn frame(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut f = vec![b0];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    fn text(payload: &[u8]) -> Vec<u8> {
        frame(0x81, payload)
    }

    fn conn(max: usize) -> (WsConn<DuplexStream>, DuplexStream) {
        let (a, b) = tokio::io::duplex(1 << 20);
        (WsConn::new(a, &[], 64, max), b)
    }

    async fn read_text(c: &mut WsConn<DuplexStream>) -> Vec<u8> {
        match c.read().await.expect("a message") {
            Incoming::Text(p) => c.payload(p).to_vec(),
            other => panic!("expected text, got {other:?}"),
        }
    }

    async fn expect_err(bytes: &[u8], code: u16) {
        let (mut c, mut peer) = conn(1 << 16);
        peer.write_all(bytes).await.unwrap();
        drop(peer);
        loop {
            match c.read().await {
                Ok(_) => continue,
                Err(e) => {
                    assert_eq!(e.close_code(), Some(code), "{e}");
                    break;
                }
            }
        }
        assert!(matches!(c.read().await, Err(WsError::Eof)), "reading stops after an error");
    }

    #[tokio::test]
    async fn reads_messages_of_every_length_form_and_frees_buffers_when_idle() {
        let (mut c, mut peer) = conn(1 << 20);
        for len in [0usize, 5, 125, 126, 200, 65535, 65536, 100_000] {
            let body: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            peer.write_all(&text(&body)).await.unwrap();
            assert_eq!(read_text(&mut c).await, body, "length {len}");
        }
        // Two messages in one read, then a message split byte by byte.
        let mut two = text(b"one");
        two.extend(text(b"two"));
        peer.write_all(&two).await.unwrap();
        assert_eq!(read_text(&mut c).await, b"one");
        assert_eq!(read_text(&mut c).await, b"two");
        // Byte by byte, trying to read after each: partial frames wait.
        let f = text("héllo wörld".as_bytes());
        for &b in &f[..f.len() - 1] {
            peer.write_all(&[b]).await.unwrap();
            assert!(c.read().now_or_never().is_none());
        }
        peer.write_all(&f[f.len() - 1..]).await.unwrap();
        assert_eq!(read_text(&mut c).await, "héllo wörld".as_bytes());
        peer.write_all(&frame(0x82, &[0, 255, 7])).await.unwrap();
        match c.read().await.unwrap() {
            Incoming::Binary(p) => assert_eq!(c.payload(p), &[0, 255, 7]),
            other => panic!("{other:?}"),
        }
        // Idle: once the next read waits, nothing is held.
        let pending = tokio::time::timeout(std::time::Duration::from_millis(20), c.read()).await;
        assert!(pending.is_err());
        assert_eq!(c.buffered_capacity(), 0);
    }

    #[tokio::test]
    async fn fragments_are_assembled_around_control_frames() {
        let (mut c, mut peer) = conn(1 << 16);
        let mut bytes = frame(0x01, "frag".as_bytes());
        bytes.extend(frame(0x89, b"p1"));
        bytes.extend(frame(0x00, "mé".as_bytes()[..2].as_ref()));
        bytes.extend(frame(0x8A, b"pong"));
        bytes.extend(frame(0x80, &"mé".as_bytes()[2..]));
        peer.write_all(&bytes).await.unwrap();
        match c.read().await.unwrap() {
            Incoming::Ping(p) => assert_eq!(c.payload(p), b"p1"),
            other => panic!("{other:?}"),
        }
        assert_eq!(read_text(&mut c).await, "fragmé".as_bytes());
        peer.write_all(&text(b"after")).await.unwrap();
        assert_eq!(read_text(&mut c).await, b"after");
        assert!(c.progress.is_none(), "the reassembly buffer is freed");
    }

    #[tokio::test]
    async fn framing_violations_are_1002() {
        expect_err(&frame(0xC1, b"x"), 1002).await; // RSV1
        expect_err(&frame(0x83, b"x"), 1002).await; // reserved opcode
        expect_err(&frame(0x8B, b""), 1002).await; // reserved control opcode
        expect_err(&frame(0x09, b""), 1002).await; // fragmented ping
        expect_err(&frame(0x89, &[0; 126]), 1002).await; // control > 125 bytes
        expect_err(&frame(0x80, b"x"), 1002).await; // continuation first
        let mut two_starts = frame(0x01, b"a");
        two_starts.extend(text(b"b"));
        expect_err(&two_starts, 1002).await;
        expect_err(&[0x81, 0x01, b'x'], 1002).await; // unmasked
        let mut huge = vec![0x82, 0xFF];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        huge.extend_from_slice(&[0; 4]);
        expect_err(&huge, 1002).await; // 64-bit length with the top bit set
    }

    #[tokio::test]
    async fn invalid_utf8_fails_at_the_first_bad_fragment() {
        expect_err(&text(&[b'a', 0xFF]), 1007).await;
        expect_err(&text(&[0xE2, 0x82]), 1007).await; // cut short at the end
        // The first fragment is fine, the second is not: fail before the third.
        let (mut c, mut peer) = conn(1 << 16);
        peer.write_all(&frame(0x01, &[0xCE, 0xBA, 0xE1])).await.unwrap();
        peer.write_all(&frame(0x00, &[0xBD, 0xF4, 0x90])).await.unwrap();
        assert!(matches!(c.read().await, Err(WsError::InvalidUtf8)));
        // Within one frame that has not fully arrived yet.
        let (mut c, mut peer) = conn(1 << 16);
        let f = text(&[b'o', b'k', 0xED, 0xA0, 0x80, b'a', b'b', b'c']);
        peer.write_all(&f[..f.len() - 3]).await.unwrap();
        assert!(matches!(c.read().await, Err(WsError::InvalidUtf8)));
    }

    #[tokio::test]
    async fn close_frames_are_checked() {
        let (mut c, mut peer) = conn(1 << 16);
        let mut body = 1000u16.to_be_bytes().to_vec();
        body.extend_from_slice(b"bye");
        peer.write_all(&frame(0x88, &body)).await.unwrap();
        match c.read().await.unwrap() {
            Incoming::Close(Some(1000), p) => assert_eq!(c.payload(p), b"bye"),
            other => panic!("{other:?}"),
        }
        let (mut c, mut peer) = conn(1 << 16);
        peer.write_all(&frame(0x88, b"")).await.unwrap();
        assert!(matches!(c.read().await, Ok(Incoming::Close(None, _))));
        expect_err(&frame(0x88, &[3]), 1002).await;
        for bad in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
            expect_err(&frame(0x88, &bad.to_be_bytes()), 1002).await;
        }
        for good in [1000u16, 1001, 1003, 1007, 1011, 1014, 3000, 4999] {
            assert!(close_code_valid(good), "{good}");
        }
        let mut bad_reason = 1000u16.to_be_bytes().to_vec();
        bad_reason.extend_from_slice(&[0xC0, 0x80]);
        expect_err(&frame(0x88, &bad_reason), 1007).await;
    }

    #[tokio::test]
    async fn messages_over_the_limit_are_1009_from_the_header() {
        let (mut c, mut peer) = conn(100);
        let f = text(&[b'a'; 101]);
        peer.write_all(&f[..10]).await.unwrap(); // the header alone decides
        assert!(matches!(c.read().await, Err(WsError::TooBig)));
        let mut two = frame(0x01, &[b'a'; 60]);
        two.extend(frame(0x80, &[b'a'; 60]));
        let (mut c, mut peer) = conn(100);
        peer.write_all(&two).await.unwrap();
        assert!(matches!(c.read().await, Err(WsError::TooBig)));
        let (mut c, mut peer) = conn(100);
        peer.write_all(&text(&[b'a'; 100])).await.unwrap();
        assert_eq!(read_text(&mut c).await.len(), 100);
    }

    /// Reads one server frame: (first byte, payload).
    async fn server_frame(peer: &mut DuplexStream) -> (u8, Vec<u8>) {
        let mut h = [0u8; 2];
        peer.read_exact(&mut h).await.unwrap();
        assert_eq!(h[1] & 0x80, 0, "server frames are not masked");
        let len = match h[1] {
            126 => peer.read_u16().await.unwrap() as usize,
            127 => peer.read_u64().await.unwrap() as usize,
            n => n as usize,
        };
        let mut body = vec![0; len];
        peer.read_exact(&mut body).await.unwrap();
        (h[0], body)
    }

    #[tokio::test]
    async fn writes_frames_and_joins_batches_without_exceeding_the_frame_limit() {
        let (mut c, mut peer) = conn(1 << 16);
        c.send(OP_PONG, b"p").await.unwrap();
        assert_eq!(server_frame(&mut peer).await, (0x8A, b"p".to_vec()));
        let items: Vec<Bytes> =
            ["a", "bb", "ccc"].iter().map(|s| Bytes::from(s.as_bytes().to_vec())).collect();
        assert_eq!(c.send_joined(OP_TEXT, &items, b"\n", 1000).await.unwrap(), 8);
        assert_eq!(server_frame(&mut peer).await, (0x81, b"a\nbb\nccc".to_vec()));
        // A limit of 5 bytes: "a\nbb" (4), then "ccc".
        c.send_joined(OP_TEXT, &items, b"\n", 5).await.unwrap();
        assert_eq!(server_frame(&mut peer).await, (0x81, b"a\nbb".to_vec()));
        assert_eq!(server_frame(&mut peer).await, (0x81, b"ccc".to_vec()));
        // Many items, more slices than one vectored write takes, long frames.
        let many: Vec<Bytes> = (0..3000).map(|i| Bytes::from(format!("{i:05}"))).collect();
        let sent = c.send_joined(OP_TEXT, &many, b"\n", 70_000).await.unwrap();
        let (op, body) = server_frame(&mut peer).await;
        assert_eq!((op, body.len(), sent), (0x81, 3000 * 6 - 1, 3000 * 6 - 1));
        assert_eq!(&body[..12], b"00000\n00001\n");
        c.send_close(3012, &"é".repeat(100)).await.unwrap();
        let (op, body) = server_frame(&mut peer).await;
        assert_eq!(op, 0x88);
        assert_eq!(&body[..2], &3012u16.to_be_bytes());
        assert_eq!(body.len(), 2 + 122, "reason cut to 123 bytes at a char boundary");
    }

    #[tokio::test]
    async fn small_batches_survive_partial_writes_while_other_connections_use_the_buffer() {
        // Sockets that take 7 bytes at a time: the assembled batch is written
        // partly, the rest from the caller's slices, while another connection
        // on the same thread assembles its own batch in the shared buffer.
        let (a, mut peer_a) = tokio::io::duplex(7);
        let (b, mut peer_b) = tokio::io::duplex(7);
        let (mut ca, mut cb) = (WsConn::new(a, &[], 64, 1 << 16), WsConn::new(b, &[], 64, 1 << 16));
        let batch = |tag: &str| -> Vec<Bytes> {
            (0..20).map(|i| Bytes::from(format!("{tag}{i:03}"))).collect()
        };
        let (items_a, items_b) = (batch("a"), batch("b"));
        let want = |items: &[Bytes]| {
            items.iter().map(|i| std::str::from_utf8(i).unwrap()).collect::<Vec<_>>().join("\n")
        };
        let (sent_a, sent_b, got_a, got_b) = tokio::join!(
            async { ca.send_joined(OP_TEXT, &items_a, b"\n", 1000).await.unwrap() },
            async { cb.send_joined(OP_TEXT, &items_b, b"\n", 1000).await.unwrap() },
            server_frame(&mut peer_a),
            server_frame(&mut peer_b),
        );
        assert_eq!(got_a, (0x81, want(&items_a).into_bytes()));
        assert_eq!(got_b, (0x81, want(&items_b).into_bytes()));
        assert_eq!((sent_a, sent_b), (want(&items_a).len(), want(&items_b).len()));
        // Frame limit inside a copied batch: frames of at most 12 bytes.
        let (sent, (f1, f2)) = tokio::join!(
            async { ca.send_joined(OP_TEXT, &items_a[..3], b"\n", 12).await.unwrap() },
            async { (server_frame(&mut peer_a).await, server_frame(&mut peer_a).await) },
        );
        assert_eq!(
            (f1.1.as_slice(), f2.1.as_slice(), sent),
            (&b"a000\na001"[..], &b"a002"[..], 13)
        );

        // A full socket: the write waits (Pending) without holding a copy,
        // then completes from the caller's slices once the peer reads.
        let (c, mut peer) = tokio::io::duplex(64);
        let mut c = WsConn::new(c, &[], 64, 1 << 16);
        c.send(OP_TEXT, &[b'x'; 62]).await.unwrap(); // 64 bytes: the pipe is full
        let items = batch("z");
        let mut write = Box::pin(c.send_joined(OP_TEXT, &items, b"\n", 1000));
        assert!(poll_once(&mut write).is_none(), "waits for room");
        assert_eq!(server_frame(&mut peer).await.1, vec![b'x'; 62]);
        let (sent, got) = tokio::join!(write, server_frame(&mut peer));
        assert_eq!((sent.unwrap(), got.1), (want(&items).len(), want(&items).into_bytes()));
    }

    /// Polls a future once.
    fn poll_once<F: Future + Unpin>(f: &mut F) -> Option<F::Output> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match Pin::new(f).poll(&mut cx) {
            Poll::Ready(v) => Some(v),
            Poll::Pending => None,
        }
    }

    #[test]
    fn accept_key_matches_the_rfc_example() {
        assert_eq!(accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn unmask_at_any_offset_matches_a_bytewise_xor() {
        let mask = [1, 2, 3, 4];
        let data: Vec<u8> = (0..23).collect();
        for offset in 0..4 {
            let mut got = data.clone();
            unmask(&mut got, mask, offset);
            let want: Vec<u8> =
                data.iter().enumerate().map(|(i, b)| b ^ mask[(offset + i) % 4]).collect();
            assert_eq!(got, want);
        }
    }
}
