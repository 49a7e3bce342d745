//! The seam between a node and the rest of the cluster.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use fanfare_protocol::{ClientInfo, Publication, StreamPosition};

/// Why a broker operation failed. Every variant is reported to clients as a
/// temporary internal error (100) and to the control API as UNAVAILABLE.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum BrokerError {
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    #[error("broker error: {0}")]
    Internal(String),
}

/// What a node announces about itself to the cluster every few seconds.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NodeInfo {
    /// Unique per process (a restarted node is a new entry).
    pub uid: String,
    pub name: String,
    pub version: String,
    pub num_clients: u64,
    pub num_subscriptions: u64,
    pub num_channels: u64,
    pub uptime_secs: u64,
    /// Unix milliseconds of this announcement.
    pub updated_at_ms: u64,
}

/// How one publication is stored.
#[derive(Debug, Clone, Default)]
pub struct PublishOptions {
    /// Keep up to this many publications (0 = no history, no offset).
    pub history_size: usize,
    pub history_ttl: Duration,
    /// With a key: a second publish with the same key into the same channel
    /// within `idempotency_window` returns the first result and publishes nothing.
    pub idempotency_key: Option<String>,
    pub idempotency_window: Duration,
}

/// One publication of a [`Broker::publish_many`] batch.
#[derive(Debug, Clone)]
pub struct PublishItem {
    pub channel: String,
    pub publication: Publication,
    pub opts: PublishOptions,
}

/// Which part of a channel's history to read.
#[derive(Debug, Clone, Default)]
pub struct HistoryQuery {
    /// Start after this position; the epoch must match the stream's.
    pub since: Option<StreamPosition>,
    /// At most this many publications; `Some(0)` reads only the stream position;
    /// `None` = everything kept.
    pub limit: Option<usize>,
    /// Newest first.
    pub reverse: bool,
}

/// A slice of history and the stream's current position.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistoryPage {
    pub publications: Vec<Publication>,
    /// Offset of the newest publication ever published, and the stream epoch.
    pub position: StreamPosition,
    /// With `since`: false when publications after `since` are no longer all
    /// kept, or `since` is not a position of this stream (another epoch, or
    /// beyond its top), so a client cannot be told it recovered. A `since`
    /// that is not a position of the stream reads no publications.
    pub complete: bool,
}

/// What one [`Broker::sweep`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Channels whose state was freed.
    pub freed: usize,
    /// Channels whose state the broker still keeps in this process.
    pub kept: usize,
    /// Bytes of publication data dropped from history because their TTL
    /// passed, since the previous sweep (by this sweep or by reads).
    pub expired_bytes: usize,
}

/// Receives what the broker delivers for channels this node subscribed to.
/// Called from broker tasks; must not block.
pub trait BrokerHandler: Send + Sync + 'static {
    fn on_publication(&self, channel: &str, publication: Publication);
    fn on_join(&self, channel: &str, info: ClientInfo);
    fn on_leave(&self, channel: &str, info: ClientInfo);
    /// Deliveries for `channel` may have been lost (e.g. the broker connection
    /// dropped): subscribers must be told so they can recover.
    fn on_gap(&self, channel: &str);
    /// Whether this node still has local subscribers of `channel` (checked
    /// before a delayed broker unsubscribe, so a racing subscribe wins).
    fn has_subscribers(&self, channel: &str) -> bool;
    /// A control-plane message sent by some node (this one included) with
    /// [`Broker::publish_control`].
    fn on_control(&self, message: bytes::Bytes);
}

/// Pub/sub, history and presence for a node: `MemoryBroker` for a single node,
/// `RedisBroker` for a cluster.
///
/// Guarantee expected of implementations: publications on one channel are
/// delivered to `BrokerHandler::on_publication` in offset order.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Installs the receiver of deliveries; called once, before any subscribe.
    fn set_handler(&self, handler: Arc<dyn BrokerHandler>);

    /// Publishes, assigning the next offset when history is on; returns the
    /// stream position after this publication.
    async fn publish(
        &self,
        channel: &str,
        publication: Publication,
        opts: PublishOptions,
    ) -> Result<StreamPosition, BrokerError>;

    /// Publishes `items` in their order — publications of one channel get their
    /// offsets in this order — in as few round trips as the broker allows. One
    /// result per item, in the same order.
    async fn publish_many(
        &self,
        items: Vec<PublishItem>,
    ) -> Vec<Result<StreamPosition, BrokerError>> {
        let mut out = Vec::with_capacity(items.len());
        for i in items {
            out.push(self.publish(&i.channel, i.publication, i.opts).await);
        }
        out
    }

    async fn publish_join(&self, channel: &str, info: ClientInfo) -> Result<(), BrokerError>;
    async fn publish_leave(&self, channel: &str, info: ClientInfo) -> Result<(), BrokerError>;

    /// This node wants deliveries for `channel` (its first local subscriber came).
    async fn subscribe(&self, channel: &str) -> Result<(), BrokerError>;
    /// This node no longer needs `channel` (its last local subscriber left).
    async fn unsubscribe(&self, channel: &str) -> Result<(), BrokerError>;

    async fn history(&self, channel: &str, query: HistoryQuery)
    -> Result<HistoryPage, BrokerError>;

    /// Drops a channel's kept publications (API `history_remove`). The stream
    /// position (top offset and epoch) stays, so a subscriber that recovers
    /// from an older offset is told the gap is not recoverable rather than
    /// being handed a reset stream.
    async fn remove_history(&self, channel: &str) -> Result<(), BrokerError>;

    async fn add_presence(
        &self,
        channel: &str,
        info: ClientInfo,
        ttl: Duration,
    ) -> Result<(), BrokerError>;
    async fn remove_presence(&self, channel: &str, client: &str) -> Result<(), BrokerError>;
    /// client id -> info.
    async fn presence(&self, channel: &str) -> Result<BTreeMap<String, ClientInfo>, BrokerError>;
    /// (clients, unique users).
    async fn presence_stats(&self, channel: &str) -> Result<(u32, u32), BrokerError>;

    /// Sends a control-plane message to every node (this one included).
    async fn publish_control(&self, message: bytes::Bytes) -> Result<(), BrokerError>;

    /// Publishes this node's announcement; entries older than `ttl` are dropped
    /// by readers.
    async fn announce(&self, info: &NodeInfo, ttl: Duration) -> Result<(), BrokerError>;

    /// Every node that announced itself within its ttl, this one included.
    async fn nodes(&self) -> Result<Vec<NodeInfo>, BrokerError>;

    /// Frees per-channel state nobody needs any more (expired history,
    /// streams past their meta TTL without local subscribers, expired presence
    /// and idempotency entries), a bounded amount per call. The node calls it
    /// periodically. `None`: this broker keeps no such state in the process
    /// (Redis expires its keys itself), so there is nothing to sweep.
    fn sweep(&self) -> Option<Sweep> {
        None
    }

    /// Whether deliveries are flowing (false while a connection is down).
    fn is_healthy(&self) -> bool {
        true
    }
}
