//! How publications, join/leave events and node announcements travel through
//! Redis. Our own compact binary format: payloads are opaque bytes, so JSON and
//! (later) Protobuf clients share one stream.
//!
//! Pub/sub message: `<kind><offset>:<body>` where kind is `p` (publication),
//! `j` (join) or `l` (leave), offset is decimal (0 without history) and body is
//! an encoded [`Publication`] or [`ClientInfo`]. The Lua publish script writes the
//! same publication body into the history stream, where the offset is the entry id.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use fanfare_protocol::{ClientInfo, Publication};

const VERSION: u8 = 1;

/// A decoded pub/sub message.
#[derive(Debug, PartialEq)]
pub enum Event {
    /// A publication and when it was published (unix microseconds).
    Publication(Publication, u64),
    Join(ClientInfo),
    Leave(ClientInfo),
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

fn put_info(out: &mut Vec<u8>, info: &ClientInfo) {
    put_bytes(out, info.user.as_bytes());
    put_bytes(out, info.client.as_bytes());
    put_bytes(out, &info.conn_info);
    put_bytes(out, &info.chan_info);
}

/// Encodes a publication body (without offset).
pub fn encode_publication(p: &Publication) -> Vec<u8> {
    let mut out = Vec::with_capacity(p.data.len() + 64);
    out.push(VERSION);
    // When it was published: each receiving node measures its delivery lag.
    out.extend_from_slice(&unix_micros().to_be_bytes());
    out.extend_from_slice(&p.time.to_be_bytes());
    put_bytes(&mut out, &p.data);
    match &p.info {
        Some(info) => {
            out.push(1);
            put_info(&mut out, info);
        }
        None => out.push(0),
    }
    let tags = p.tags.as_deref();
    out.extend_from_slice(&(tags.map_or(0, |t| t.len()) as u32).to_be_bytes());
    for (k, v) in tags.into_iter().flatten() {
        put_bytes(&mut out, k.as_bytes());
        put_bytes(&mut out, v.as_bytes());
    }
    out
}

pub fn encode_info(info: &ClientInfo) -> Vec<u8> {
    let mut out = vec![VERSION];
    put_info(&mut out, info);
    out
}

/// A bounds-checked reader over an encoded body.
struct Reader<'a> {
    buf: &'a [u8],
    src: &'a Bytes,
    base: usize,
}

impl<'a> Reader<'a> {
    fn new(src: &'a Bytes, from: usize) -> Option<Self> {
        Some(Self { buf: src.get(from..)?, src, base: from })
    }

    fn take(&mut self, n: usize) -> Option<Bytes> {
        if self.buf.len() < n {
            return None;
        }
        let out = self.src.slice(self.base..self.base + n);
        self.buf = &self.buf[n..];
        self.base += n;
        Some(out)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?[..].try_into().ok()?))
    }

    fn i64(&mut self) -> Option<i64> {
        Some(i64::from_be_bytes(self.take(8)?[..].try_into().ok()?))
    }

    fn bytes(&mut self) -> Option<Bytes> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?.to_vec()).ok()
    }

    fn info(&mut self) -> Option<ClientInfo> {
        Some(ClientInfo {
            user: self.string()?.into(),
            client: self.string()?.into(),
            conn_info: self.bytes()?,
            chan_info: self.bytes()?,
        })
    }
}

/// Unix time in microseconds.
pub fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Decodes a publication body starting at `from`.
pub fn decode_publication(src: &Bytes, from: usize, offset: u64) -> Option<Publication> {
    decode_publication_sent(src, from, offset).map(|(p, _)| p)
}

/// Decodes a publication body and the time it was published (unix µs).
fn decode_publication_sent(src: &Bytes, from: usize, offset: u64) -> Option<(Publication, u64)> {
    let mut r = Reader::new(src, from)?;
    if r.u8()? != VERSION {
        return None;
    }
    let sent = r.i64()? as u64;
    let time = r.i64()?;
    let data = r.bytes()?;
    let info = match r.u8()? {
        0 => None,
        _ => Some(Arc::new(r.info()?)),
    };
    let ntags = r.u32()? as usize;
    let tags = if ntags == 0 {
        None
    } else {
        let mut t = BTreeMap::new();
        for _ in 0..ntags.min(1024) {
            let k = r.string()?;
            t.insert(k, r.string()?);
        }
        Some(Arc::new(t))
    };
    Some((Publication { data, info, offset, tags, delta: false, time }, sent))
}

fn decode_info(src: &Bytes, from: usize) -> Option<ClientInfo> {
    let mut r = Reader::new(src, from)?;
    if r.u8()? != VERSION {
        return None;
    }
    r.info()
}

/// Builds a pub/sub message for a join or leave.
pub fn event_message(kind: u8, info: &ClientInfo) -> Vec<u8> {
    let body = encode_info(info);
    let mut out = Vec::with_capacity(body.len() + 3);
    out.push(kind);
    out.extend_from_slice(b"0:");
    out.extend_from_slice(&body);
    out
}

/// Builds the pub/sub message of a publication without history (offset 0).
pub fn publication_message(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 3);
    out.extend_from_slice(b"p0:");
    out.extend_from_slice(body);
    out
}

/// Decodes a pub/sub message.
pub fn decode_message(msg: &Bytes) -> Option<Event> {
    let kind = *msg.first()?;
    let colon = msg.iter().position(|b| *b == b':')?;
    // `get`: a colon as the first byte leaves no room for the kind (found by
    // the redis_wire fuzz target: `:J` panicked slicing 1..0).
    let offset: u64 = std::str::from_utf8(msg.get(1..colon)?).ok()?.parse().ok()?;
    match kind {
        b'p' => {
            decode_publication_sent(msg, colon + 1, offset).map(|(p, t)| Event::Publication(p, t))
        }
        b'j' => decode_info(msg, colon + 1).map(Event::Join),
        b'l' => decode_info(msg, colon + 1).map(Event::Leave),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inputs the redis_wire fuzz target found (fuzz/artifacts), each once a
    /// panic of the node reading its pub/sub channel.
    #[test]
    fn messages_found_by_fuzzing_are_skipped_not_a_panic() {
        for msg in [&b":J"[..], b":", b"::", b":0:"] {
            assert_eq!(decode_message(&Bytes::copy_from_slice(msg)), None, "{msg:?}");
        }
    }

    #[test]
    fn publication_roundtrip() {
        let mut tags = BTreeMap::new();
        tags.insert("k".to_string(), "v".to_string());
        let p = Publication {
            data: Bytes::from_static(br#"{"a":1}"#),
            info: Some(Arc::new(ClientInfo {
                user: "u".into(),
                client: "c".into(),
                conn_info: Bytes::from_static(b"{}"),
                chan_info: Bytes::new(),
            })),
            offset: 0,
            tags: Some(Arc::new(tags)),
            delta: false,
            time: 1234,
        };
        let body = encode_publication(&p);
        let mut msg = b"p42:".to_vec();
        msg.extend_from_slice(&body);
        match decode_message(&Bytes::from(msg)) {
            Some(Event::Publication(got, sent)) => {
                assert!(sent > 0 && sent <= unix_micros());
                assert_eq!(got.offset, 42);
                assert_eq!(Publication { offset: 0, ..got }, p);
            }
            other => panic!("unexpected {other:?}"),
        }
        let info = ClientInfo { user: "x".into(), ..Default::default() };
        assert_eq!(
            decode_message(&Bytes::from(event_message(b'l', &info))),
            Some(Event::Leave(info))
        );
        assert_eq!(decode_message(&Bytes::from_static(b"p1:\x07garbage")), None);
        assert_eq!(decode_message(&Bytes::from_static(b"zzz")), None);
    }
}
