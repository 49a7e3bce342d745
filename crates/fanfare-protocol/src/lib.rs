//! Centrifugo client protocol v2: the messages clients and fanfare exchange, and
//! their wire encodings.
//!
//! This crate does no IO. Commands are decoded from a transport frame into
//! [`Command`]s; replies and pushes are built as [`Reply`] values and encoded by a
//! [`Codec`]. Payload fields (`data`, `info`) are opaque [`bytes::Bytes`]: with the
//! JSON codec they hold raw JSON text that is embedded verbatim, never base64.
//!
//! Message names and field numbers follow the public `client.proto` of the
//! Centrifugo protocol; see `proto/centrifuge/client.proto` in this repository.

mod codec;
mod codes;
mod command;
mod json;
mod reply;

pub use codec::{Codec, DecodeError, FrameKind};
pub use codes::{DisconnectCode, ErrorCode};
pub use command::{
    Command, ConnectRequest, HistoryRequest, Request, StreamPosition, SubscribeRequest,
};
pub use reply::{
    ClientInfo, ConnectResult, Disconnect, HistoryResult, Publication, Push, PushBody, Reply,
    ReplyBody, ReplyError, SubscribeResult,
};
