//! Replies and pushes the server sends. Codec-independent.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::codes::{DisconnectCode, ErrorCode};

/// One message from server to client: a reply to a command (`id > 0`), a push
/// (`id == 0`, body `Push`), or the empty server ping (`id == 0`, body `Ping`).
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub id: u32,
    pub body: ReplyBody,
}

impl Reply {
    pub fn new(id: u32, body: ReplyBody) -> Self {
        Self { id, body }
    }

    pub fn error(id: u32, code: ErrorCode) -> Self {
        Self::new(id, ReplyBody::Error(ReplyError::from(code)))
    }

    pub fn push(channel: impl Into<Arc<str>>, body: PushBody) -> Self {
        Self::new(0, ReplyBody::Push(Push { channel: channel.into(), body }))
    }
}

/// What a reply carries.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplyBody {
    Error(ReplyError),
    Connect(Box<ConnectResult>),
    Subscribe(Box<SubscribeResult>),
    Unsubscribe,
    Publish,
    Presence(BTreeMap<String, ClientInfo>),
    PresenceStats {
        num_clients: u32,
        num_users: u32,
    },
    History(HistoryResult),
    /// Reply to a client `ping` command, and (with id 0) the server ping `{}`.
    Ping,
    Rpc {
        data: Bytes,
    },
    Refresh {
        client: String,
        version: String,
        expires: bool,
        ttl: u32,
    },
    SubRefresh {
        expires: bool,
        ttl: u32,
    },
    Push(Push),
}

/// `Error` (code 1, message 2, temporary 3).
#[derive(Debug, Clone, PartialEq)]
pub struct ReplyError {
    pub code: u32,
    pub message: String,
    pub temporary: bool,
}

impl From<ErrorCode> for ReplyError {
    fn from(code: ErrorCode) -> Self {
        Self { code: code.0, message: code.message().to_string(), temporary: code.temporary() }
    }
}

/// `ConnectResult` (client 1, version 2, expires 3, ttl 4, data 5, subs 6, ping 7,
/// pong 8, session 9, node 10).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConnectResult {
    pub client: String,
    pub version: String,
    pub expires: bool,
    pub ttl: u32,
    pub data: Bytes,
    pub subs: Vec<(String, SubscribeResult)>,
    pub ping: u32,
    pub pong: bool,
    /// The emulated transports' session key (HTTP streaming, SSE): the client
    /// sends it back with each `/emulation` request. Empty otherwise.
    pub session: String,
    pub node: String,
}

/// `SubscribeResult` (expires 1, ttl 2, recoverable 3, epoch 6, publications 7,
/// recovered 8, offset 9, positioned 10, data 11, was_recovering 12, delta 13).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SubscribeResult {
    pub expires: bool,
    pub ttl: u32,
    pub recoverable: bool,
    pub epoch: String,
    pub publications: Vec<Publication>,
    pub recovered: bool,
    pub offset: u64,
    pub positioned: bool,
    pub data: Bytes,
    pub was_recovering: bool,
    /// Delta compression was negotiated for this subscription.
    pub delta: bool,
}

/// `HistoryResult` (publications 1, epoch 2, offset 3).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistoryResult {
    pub publications: Vec<Publication>,
    pub epoch: String,
    pub offset: u64,
}

/// `ClientInfo` (user 1, client 2, conn_info 3, chan_info 4).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientInfo {
    pub user: Arc<str>,
    pub client: Arc<str>,
    pub conn_info: Bytes,
    pub chan_info: Bytes,
}

/// `Publication` (data 4, info 5, offset 6, tags 7, delta 8, time 9).
///
/// Cheap to clone: payload and info are reference counted.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Publication {
    pub data: Bytes,
    pub info: Option<Arc<ClientInfo>>,
    pub offset: u64,
    pub tags: Option<Arc<BTreeMap<String, String>>>,
    /// `data` is a fossil delta against the previous publication of the
    /// channel (only sent to subscriptions that negotiated delta compression).
    pub delta: bool,
    /// Unix milliseconds; 0 = not sent.
    pub time: i64,
}

/// `Push` (channel 2, pub 4, join 5, leave 6, unsubscribe 7, message 8, subscribe 9,
/// connect 10, disconnect 11, refresh 12).
#[derive(Debug, Clone, PartialEq)]
pub struct Push {
    pub channel: Arc<str>,
    pub body: PushBody,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PushBody {
    Pub(Publication),
    Join(ClientInfo),
    Leave(ClientInfo),
    Unsubscribe { code: u32, reason: String },
    Message { data: Bytes },
    Subscribe { recoverable: bool, epoch: String, offset: u64, positioned: bool, data: Bytes },
    Disconnect(Disconnect),
    Refresh { expires: bool, ttl: u32 },
}

/// `Disconnect` push (code 1, reason 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Disconnect {
    pub code: DisconnectCode,
}

impl From<DisconnectCode> for Disconnect {
    fn from(code: DisconnectCode) -> Self {
        Self { code }
    }
}
