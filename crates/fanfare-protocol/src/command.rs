//! Commands a client sends. Codec-independent: payloads are opaque bytes.

use bytes::Bytes;

/// One client command. `id` is 0 only for `send` and for the empty pong command.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub id: u32,
    pub request: Request,
}

/// The request a command carries: the first one set in the wire message.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Connect(ConnectRequest),
    Subscribe(SubscribeRequest),
    Unsubscribe {
        channel: String,
    },
    Publish {
        channel: String,
        data: Bytes,
    },
    Presence {
        channel: String,
    },
    PresenceStats {
        channel: String,
    },
    History(HistoryRequest),
    Ping,
    Send {
        data: Bytes,
    },
    Rpc {
        method: String,
        data: Bytes,
    },
    Refresh {
        token: String,
    },
    SubRefresh {
        channel: String,
        token: String,
    },
    /// A command with no request set: a pong when `id == 0`, otherwise unknown.
    Empty,
}

impl Request {
    /// Method name for logs and metrics.
    pub fn method(&self) -> &'static str {
        match self {
            Request::Connect(_) => "connect",
            Request::Subscribe(_) => "subscribe",
            Request::Unsubscribe { .. } => "unsubscribe",
            Request::Publish { .. } => "publish",
            Request::Presence { .. } => "presence",
            Request::PresenceStats { .. } => "presence_stats",
            Request::History(_) => "history",
            Request::Ping => "ping",
            Request::Send { .. } => "send",
            Request::Rpc { .. } => "rpc",
            Request::Refresh { .. } => "refresh",
            Request::SubRefresh { .. } => "sub_refresh",
            Request::Empty => "empty",
        }
    }
}

/// `ConnectRequest` (client.proto field numbers: token 1, data 2, subs 3, name 4, version 5).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConnectRequest {
    pub token: String,
    pub data: Bytes,
    /// Subscriptions the client wants restored at connect (channel -> request).
    pub subs: Vec<(String, SubscribeRequest)>,
    pub name: String,
    pub version: String,
}

/// `SubscribeRequest` (channel 1, token 2, recover 3, epoch 6, offset 7, data 8,
/// positioned 9, recoverable 10, join_leave 11, delta 12).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SubscribeRequest {
    pub channel: String,
    pub token: String,
    pub recover: bool,
    pub epoch: String,
    pub offset: u64,
    pub data: Bytes,
    pub positioned: bool,
    pub recoverable: bool,
    pub join_leave: bool,
    /// Delta compression wanted (`"fossil"`); empty = none.
    pub delta: String,
}

/// A position in a channel stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamPosition {
    pub offset: u64,
    pub epoch: String,
}

/// `HistoryRequest` (channel 1, limit 7, since 8, reverse 9).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistoryRequest {
    pub channel: String,
    pub limit: i32,
    pub since: Option<StreamPosition>,
    pub reverse: bool,
}
