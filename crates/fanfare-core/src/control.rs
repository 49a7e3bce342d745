//! Control-plane messages between nodes, carried by the broker
//! ([`crate::Broker::publish_control`]). JSON: rare, small, and readable with
//! `redis-cli subscribe` when debugging.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum ControlMessage {
    /// Subscribe a user's connections (or one client) server-side.
    Subscribe {
        user: String,
        client: String,
        channel: String,
    },
    /// Unsubscribe a user's connections (or one client), push code 2000.
    Unsubscribe {
        user: String,
        client: String,
        channel: String,
    },
    /// Close a user's connections (or one client).
    Disconnect {
        user: String,
        client: String,
        code: u16,
        reason: String,
    },
    /// Set a user's connections' (or one client's) expiry: unix seconds,
    /// `None` = never (API `refresh`).
    Refresh {
        user: String,
        client: String,
        expire_at: Option<u64>,
    },
    /// Every node answers with its local channels matching `pattern`.
    ChannelsRequest {
        id: String,
        from: String,
        pattern: String,
    },
    ChannelsReply {
        id: String,
        to: String,
        node: String,
        channels: Vec<(String, u32)>,
    },
    /// Commands for an emulated session held by `node` (base64 `data`, in
    /// the session's encoding); see `crate::emulation`.
    Emulate {
        id: String,
        from: String,
        node: String,
        session: String,
        data: String,
    },
    EmulateReply {
        id: String,
        to: String,
        delivered: bool,
        busy: bool,
    },
}
