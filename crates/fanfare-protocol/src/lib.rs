//! Centrifugo client protocol v2: the messages clients and fanfare exchange, and
//! their wire encodings.
//!
//! This crate does no IO. Commands are decoded from a transport frame into
//! [`Command`]s; replies and pushes are built as [`Reply`] values and encoded by a
//! [`Codec`]. Payload fields (`data`, `info`) are opaque [`bytes::Bytes`]: the
//! JSON codec embeds them verbatim as raw JSON (never base64) and refuses data
//! that is not JSON ([`EncodeError::NotJson`]); the Protobuf codec carries any
//! bytes.
//!
//! Message names and field numbers follow the public `client.proto` of the
//! Centrifugo protocol; see `proto/centrifuge/client.proto` in this repository.

mod codec;
mod codes;
mod command;
mod json;
mod protobuf;
mod reply;

pub use codec::{Codec, DecodeError, EncodeError, FrameKind};
pub use codes::{DisconnectCode, ErrorCode};
pub use command::{
    Command, ConnectRequest, HistoryRequest, Request, StreamPosition, SubscribeRequest,
};
pub use json::is_json;
pub use protobuf::pb;
pub use reply::{
    ClientInfo, ConnectResult, Disconnect, HistoryResult, Publication, Push, PushBody, Reply,
    ReplyBody, ReplyError, SubscribeResult,
};
