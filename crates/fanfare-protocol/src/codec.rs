//! The encoding seam: Session and Hub only see `Command`/`Reply` and encoded
//! `Bytes`; the codec decides the wire form.

use bytes::Bytes;

use crate::command::Command;
use crate::reply::Reply;
use crate::{json, protobuf};

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

/// Why a reply cannot be encoded by a codec.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EncodeError {
    /// Publication data that is not JSON (binary data published by a
    /// Protobuf client) cannot be embedded in a JSON message. Centrifugo
    /// closes such a client with 3506 (inappropriate protocol); so does fanfare.
    #[error("publication data is not JSON: a JSON client cannot receive it")]
    NotJson,
}

/// WebSocket frame type a codec's output goes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    Text,
    Binary,
}

/// A wire encoding of the client protocol, chosen per connection: JSON (text
/// frames, newline-separated messages, payloads embedded as raw JSON) or
/// Protobuf (binary frames, varint-length-prefixed messages, opaque payloads).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    Json,
    Protobuf,
}

impl Codec {
    /// Index for per-codec caches (serialize once per codec per publication).
    pub const COUNT: usize = 2;

    pub fn index(self) -> usize {
        match self {
            Codec::Json => 0,
            Codec::Protobuf => 1,
        }
    }

    pub fn frame_kind(self) -> FrameKind {
        match self {
            Codec::Json => FrameKind::Text,
            Codec::Protobuf => FrameKind::Binary,
        }
    }

    /// What goes between two encoded messages sharing a frame: a newline for
    /// JSON, nothing for Protobuf (each message carries its length prefix).
    pub fn separator(self) -> &'static [u8] {
        match self {
            Codec::Json => b"\n",
            Codec::Protobuf => b"",
        }
    }

    /// Decodes every command in one transport frame.
    pub fn decode(self, frame: &[u8]) -> Result<Vec<Command>, DecodeError> {
        match self {
            Codec::Json => json::decode_commands(frame),
            Codec::Protobuf => protobuf::decode_commands(frame),
        }
    }

    /// Encodes one reply or push into a standalone buffer (for Protobuf,
    /// with its length prefix).
    pub fn encode(self, reply: &Reply) -> Result<Bytes, EncodeError> {
        match self {
            Codec::Json => {
                if !json::payloads_are_json(reply) {
                    return Err(EncodeError::NotJson);
                }
                let mut out = Vec::with_capacity(64);
                json::encode_reply(reply, &mut out);
                // Messages share frames separated by newlines (see `json::Obj::raw`).
                debug_assert!(!out.contains(&b'\n'), "a JSON message must not contain a newline");
                Ok(Bytes::from(out))
            }
            Codec::Protobuf => Ok(Bytes::from(protobuf::encode_reply(reply))),
        }
    }

    /// Appends `item` (as returned by [`Codec::encode`]) to a frame being batched.
    pub fn append(self, frame: &mut Vec<u8>, item: &[u8]) {
        if !frame.is_empty() {
            frame.extend_from_slice(self.separator());
        }
        frame.extend_from_slice(item);
    }
}
