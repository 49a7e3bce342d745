//! The encoding seam: Session and Hub only see `Command`/`Reply` and encoded
//! `Bytes`; the codec decides the wire form.

use bytes::Bytes;

use crate::command::Command;
use crate::json;
use crate::reply::Reply;

/// Why a frame could not be decoded. Every variant is a protocol violation that
/// closes the connection with 3501 (bad request).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("malformed command: {0}")]
    Malformed(String),
    #[error("command without id")]
    MissingId,
    #[error("empty frame")]
    Empty,
}

/// WebSocket frame type a codec's output goes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    Text,
    Binary,
}

/// A wire encoding of the client protocol. JSON today; Protobuf slots in as a
/// second variant without Session or Hub changing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    Json,
}

impl Codec {
    /// Index for per-codec caches (serialize once per codec per publication).
    pub const COUNT: usize = 1;

    pub fn index(self) -> usize {
        match self {
            Codec::Json => 0,
        }
    }

    pub fn frame_kind(self) -> FrameKind {
        match self {
            Codec::Json => FrameKind::Text,
        }
    }

    /// Decodes every command in one transport frame.
    pub fn decode(self, frame: &[u8]) -> Result<Vec<Command>, DecodeError> {
        match self {
            Codec::Json => json::decode_commands(frame),
        }
    }

    /// Encodes one reply or push into a standalone buffer.
    pub fn encode(self, reply: &Reply) -> Bytes {
        match self {
            Codec::Json => {
                let mut out = Vec::with_capacity(64);
                json::encode_reply(reply, &mut out);
                // Messages share frames separated by newlines (see `json::Obj::raw`).
                debug_assert!(!out.contains(&b'\n'), "a JSON message must not contain a newline");
                Bytes::from(out)
            }
        }
    }

    /// Appends `item` (as returned by [`Codec::encode`]) to a frame being batched.
    pub fn append(self, frame: &mut Vec<u8>, item: &[u8]) {
        match self {
            Codec::Json => {
                if !frame.is_empty() {
                    frame.push(b'\n');
                }
                frame.extend_from_slice(item);
            }
        }
    }
}
