//! The node: the one object transports and the control API talk to.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fanfare_protocol::{ClientInfo, DisconnectCode, Publication, PushBody, Reply, StreamPosition};

use crate::auth::Authenticator;
use crate::broker::{Broker, BrokerError, BrokerHandler, NodeInfo, PublishOptions};
use crate::channel::{ChannelRules, Namespace};
use crate::hub::{FanOut, Hub, PreparedPush, Subscriber};
use crate::metrics;
use crate::outbox::Outbox;

/// Per-node settings that shape every session.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub name: String,
    pub version: String,
    /// Server ping period; the first ping of a connection is jittered.
    pub ping_interval: Duration,
    /// How long a client has to answer a ping.
    pub pong_timeout: Duration,
    /// How long a connection may stay without a successful `connect`.
    pub connect_timeout: Duration,
    /// Bound of each connection's outbound queue, in bytes.
    pub max_queue_bytes: usize,
    /// Most channels one connection may subscribe to.
    pub max_channels: usize,
    /// Lifetime of a presence entry between refreshes.
    pub presence_ttl: Duration,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            name: "fanfare".into(),
            version: concat!("fanfare ", env!("CARGO_PKG_VERSION")).into(),
            ping_interval: Duration::from_secs(25),
            pong_timeout: Duration::from_secs(8),
            connect_timeout: Duration::from_secs(10),
            max_queue_bytes: 1 << 20,
            max_channels: 128,
            presence_ttl: Duration::from_secs(60),
        }
    }
}

/// Delivers what the broker hands over to local subscribers: one encoding per
/// codec per publication, shared by all of them.
struct HubDelivery {
    hub: Arc<Hub>,
}

/// Unsubscribe push code telling SDKs to resubscribe (with recovery).
pub const INSUFFICIENT_STATE: u32 = 2500;

impl BrokerHandler for HubDelivery {
    fn on_publication(&self, channel: &str, publication: Publication) {
        let offset = publication.offset;
        let push = PreparedPush::new(Reply::push(channel, PushBody::Pub(publication)), offset);
        if self.hub.fan_out(channel, &push) == FanOut::Gap {
            self.on_gap(channel);
        }
    }

    fn on_gap(&self, channel: &str) {
        let n = self.hub.evict(channel, INSUFFICIENT_STATE, "insufficient state");
        if n > 0 {
            tracing::info!(channel, subscribers = n, "stream gap: subscribers told to resubscribe");
            ::metrics::counter!(metrics::STREAM_GAPS).increment(1);
        }
    }

    fn has_subscribers(&self, channel: &str) -> bool {
        self.hub.has_subscribers(channel)
    }

    fn on_join(&self, channel: &str, info: ClientInfo) {
        self.hub
            .fan_out(channel, &PreparedPush::new(Reply::push(channel, PushBody::Join(info)), 0));
    }

    fn on_leave(&self, channel: &str, info: ClientInfo) {
        self.hub
            .fan_out(channel, &PreparedPush::new(Reply::push(channel, PushBody::Leave(info)), 0));
    }
}

struct Shared {
    config: NodeConfig,
    hub: Arc<Hub>,
    broker: Arc<dyn Broker>,
    auth: Authenticator,
    rules: ChannelRules,
    sessions: Mutex<HashMap<u64, Arc<Outbox>, ahash::RandomState>>,
    next_session: AtomicU64,
    draining: AtomicBool,
    started: Instant,
    uid: String,
}

/// A fanfare node. Cheap to clone (a handle around `Arc`); thread-safe.
#[derive(Clone)]
pub struct Node {
    shared: Arc<Shared>,
}

impl Node {
    pub fn new(
        config: NodeConfig,
        broker: Arc<dyn Broker>,
        auth: Authenticator,
        rules: ChannelRules,
    ) -> Self {
        let hub = Arc::new(Hub::new());
        broker.set_handler(Arc::new(HubDelivery { hub: hub.clone() }));
        Self {
            shared: Arc::new(Shared {
                config,
                hub,
                broker,
                auth,
                rules,
                sessions: Mutex::new(HashMap::default()),
                next_session: AtomicU64::new(1),
                draining: AtomicBool::new(false),
                started: Instant::now(),
                uid: uuid::Uuid::new_v4().to_string(),
            }),
        }
    }

    pub fn config(&self) -> &NodeConfig {
        &self.shared.config
    }

    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.shared.broker
    }

    pub fn auth(&self) -> &Authenticator {
        &self.shared.auth
    }

    pub fn rules(&self) -> &ChannelRules {
        &self.shared.rules
    }

    pub fn hub(&self) -> &Hub {
        &self.shared.hub
    }

    pub fn uptime(&self) -> Duration {
        self.shared.started.elapsed()
    }

    /// Registers a new connection; `None` while the node drains.
    pub(crate) fn register(&self, outbox: Arc<Outbox>) -> Option<u64> {
        if self.is_draining() {
            return None;
        }
        let id = self.shared.next_session.fetch_add(1, Ordering::Relaxed);
        self.sessions().insert(id, outbox);
        metrics::hot().connections.increment(1.0);
        Some(id)
    }

    pub(crate) fn unregister(&self, id: u64) {
        if self.sessions().remove(&id).is_some() {
            metrics::hot().connections.decrement(1.0);
        }
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Outbox>, ahash::RandomState>> {
        self.shared.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn num_connections(&self) -> usize {
        self.sessions().len()
    }

    /// Adds a local subscriber, subscribing the node in the broker when it is the
    /// channel's first here.
    pub(crate) async fn subscribe_local(
        &self,
        channel: &str,
        session: u64,
        sub: Arc<Subscriber>,
    ) -> Result<(), BrokerError> {
        if self.shared.hub.subscribe(channel, session, sub) {
            metrics::hot().channels.increment(1.0);
            if let Err(e) = self.shared.broker.subscribe(channel).await {
                self.unsubscribe_local(channel, session).await;
                return Err(e);
            }
        }
        metrics::hot().subscriptions.increment(1.0);
        Ok(())
    }

    pub(crate) async fn unsubscribe_local(&self, channel: &str, session: u64) {
        let last = self.shared.hub.unsubscribe(channel, session);
        if last {
            metrics::hot().channels.decrement(1.0);
            if let Err(e) = self.shared.broker.unsubscribe(channel).await {
                tracing::warn!(channel, error = %e, "broker unsubscribe failed");
            }
        }
    }

    pub(crate) fn subscription_ended(&self) {
        metrics::hot().subscriptions.decrement(1.0);
    }

    /// Publishes into a channel with its namespace's history settings.
    pub async fn publish(
        &self,
        channel: &str,
        ns: &Namespace,
        publication: Publication,
    ) -> Result<StreamPosition, BrokerError> {
        let opts = if ns.history_enabled() {
            PublishOptions { history_size: ns.history_size, history_ttl: ns.history_ttl }
        } else {
            PublishOptions::default()
        };
        let start = Instant::now();
        let res = self.shared.broker.publish(channel, publication, opts).await;
        ::metrics::histogram!(metrics::BROKER_PUBLISH).record(start.elapsed().as_secs_f64());
        if res.is_ok() {
            ::metrics::counter!(metrics::PUBLICATIONS).increment(1);
        }
        res
    }

    /// This node's announcement for the cluster view.
    pub fn info(&self) -> NodeInfo {
        let channels = self.shared.hub.channels();
        NodeInfo {
            uid: self.shared.uid.clone(),
            name: self.shared.config.name.clone(),
            version: self.shared.config.version.clone(),
            num_clients: self.num_connections() as u64,
            num_subscriptions: channels.iter().map(|(_, n)| *n as u64).sum(),
            num_channels: channels.len() as u64,
            uptime_secs: self.uptime().as_secs(),
            updated_at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        }
    }

    /// Announces this node through the broker every `period` until the process
    /// ends, and keeps the cluster-size gauge current.
    pub async fn announce_forever(self, period: Duration) {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            let broker = self.shared.broker.clone();
            if let Err(e) = broker.announce(&self.info(), period * 3).await {
                tracing::debug!(error = %e, "node announcement failed");
                continue;
            }
            if let Ok(nodes) = broker.nodes().await {
                ::metrics::gauge!(metrics::CLUSTER_NODES).set(nodes.len() as f64);
            }
        }
    }

    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::Acquire)
    }

    /// Ready to take clients: not draining and the broker is delivering.
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.shared.broker.is_healthy()
    }

    /// Starts a drain: refuse new connections and close every open one with
    /// `code` (3001 shutdown makes SDKs reconnect to another node).
    pub fn drain(&self, code: DisconnectCode) {
        self.shared.draining.store(true, Ordering::Release);
        let outboxes: Vec<Arc<Outbox>> = self.sessions().values().cloned().collect();
        for o in outboxes {
            o.close(code);
        }
    }
}
