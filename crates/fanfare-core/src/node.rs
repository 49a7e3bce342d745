//! The node: the one object transports and the control API talk to.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use fanfare_protocol::{ClientInfo, DisconnectCode, Publication, PushBody, Reply, StreamPosition};

use crate::auth::Authenticator;
use crate::broker::{Broker, BrokerError, BrokerHandler, NodeInfo, PublishOptions, Sweep};
use crate::channel::{ChannelRules, Namespace};
use crate::control::ControlMessage;
use crate::hub::{FanOut, Hub, PreparedPush, Subscriber};
use crate::metrics;
use crate::outbox::{Directive, Outbox};
use crate::timer::Timers;

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
    /// How long a publication may wait for others to share its socket write
    /// (0 = written at once).
    pub write_delay: Duration,
    /// What publication data must look like on every ingress path.
    pub data_rules: crate::ingress::DataRules,
    /// Most publications a recovering subscribe may return; a client further
    /// behind gets `recovered: false` (`client.recovery_max_publication_limit`).
    pub recovery_max_publications: usize,
    /// Most publications one client `history` reply carries
    /// (`client.history_max_publication_limit`).
    pub history_max_publications: usize,
    /// The `[[proxies]]` and which events use them (none by default).
    pub proxies: crate::proxy::Proxies,
    /// Connections per user, commands per connection and per user.
    pub limits: crate::limits::Limits,
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
            write_delay: Duration::ZERO,
            data_rules: crate::ingress::DataRules::default(),
            recovery_max_publications: 300,
            history_max_publications: 300,
            proxies: crate::proxy::Proxies::default(),
            limits: crate::limits::Limits::default(),
        }
    }
}

/// Unsubscribe push code telling SDKs to resubscribe (with recovery).
pub const INSUFFICIENT_STATE: u32 = 2500;

/// Receives broker deliveries: publications go to local subscribers (encoded
/// once per codec, shared by all of them); control messages to the registry.
struct NodeHandler {
    hub: Arc<Hub>,
    node: Weak<Shared>,
}

impl BrokerHandler for NodeHandler {
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

    fn on_control(&self, message: bytes::Bytes) {
        if let Some(shared) = self.node.upgrade() {
            Node { shared }.handle_control(&message);
        }
    }
}

/// An open connection as the node's registry sees it: its outbox, and who it
/// is once connected (the session's own `ClientInfo`, shared, not copied).
struct SessionEntry {
    outbox: Arc<Outbox>,
    info: Option<Arc<ClientInfo>>,
}

/// Open connections, indexed for the control API.
#[derive(Default)]
pub(crate) struct Registry {
    sessions: HashMap<u64, SessionEntry, ahash::RandomState>,
    by_user: HashMap<Arc<str>, UserEntry, ahash::RandomState>,
    by_client: HashMap<Arc<str>, u64, ahash::RandomState>,
}

/// A connected user's sessions on this node, and the commands budget they
/// share (`limits.user_commands`): kept while the user has a connection here,
/// so the map is bounded by connected users.
#[derive(Debug)]
struct UserEntry {
    ids: Vec<u64>,
    commands: crate::limits::Bucket,
}

/// Why [`Node::bind`] refused a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UserConnectionLimit;

struct Shared {
    config: NodeConfig,
    hub: Arc<Hub>,
    broker: Arc<dyn Broker>,
    auth: Authenticator,
    rules: ChannelRules,
    registry: Mutex<Registry>,
    /// Connection deadlines (pings, timeouts), one coarse timer for all.
    timers: Timers,
    /// Cluster-wide requests of this node waiting for replies, by request id.
    pending: Mutex<HashMap<String, tokio::sync::mpsc::UnboundedSender<ControlMessage>>>,
    next_session: AtomicU64,
    draining: AtomicBool,
    started: Instant,
    uid: String,
    /// Sessions of the emulated transports, by key (`crate::emulation`).
    emulated: crate::emulation::Registry,
    /// Lifecycle events for webhooks (off unless installed).
    events: crate::events::Events,
}

/// How often [`Node::close_spread`] closes its next batch: fine enough that
/// a period of seconds is spread over dozens of batches, coarse enough that
/// the timer costs nothing.
pub const DRAIN_TICK: Duration = Duration::from_millis(50);

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
        let hub = Arc::new(Hub::with_write_delay(config.write_delay));
        let timers = Timers::new(Timers::tick_for(&[
            config.ping_interval,
            config.pong_timeout,
            config.connect_timeout,
            // Refreshed at a third of the TTL: a tick late must stay well inside it.
            config.presence_ttl / 3,
        ]));
        let node = Self {
            shared: Arc::new(Shared {
                config,
                hub: hub.clone(),
                broker,
                auth,
                rules,
                registry: Mutex::new(Registry::default()),
                timers,
                pending: Mutex::new(HashMap::new()),
                next_session: AtomicU64::new(1),
                draining: AtomicBool::new(false),
                started: Instant::now(),
                uid: uuid::Uuid::new_v4().to_string(),
                emulated: Default::default(),
                events: Default::default(),
            }),
        };
        node.shared
            .broker
            .set_handler(Arc::new(NodeHandler { hub, node: Arc::downgrade(&node.shared) }));
        node
    }

    pub fn config(&self) -> &NodeConfig {
        &self.shared.config
    }

    /// This node's id in the cluster (random per process).
    pub fn uid(&self) -> &str {
        &self.shared.uid
    }

    /// Lifecycle events (webhooks): install a queue at start-up to turn them on.
    pub fn events(&self) -> &crate::events::Events {
        &self.shared.events
    }

    pub(crate) fn emulated(&self) -> &crate::emulation::Registry {
        &self.shared.emulated
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

    pub(crate) fn timers(&self) -> &Timers {
        &self.shared.timers
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
        self.registry().sessions.insert(id, SessionEntry { outbox, info: None });
        metrics::hot().connections.increment(1.0);
        Some(id)
    }

    /// Records who a connected session is, for the control API. Refused
    /// when the user already holds `limits.user_connections` connections here
    /// (counted and checked under one lock, so racing connects cannot pass
    /// the limit together).
    pub(crate) fn bind(&self, id: u64, info: Arc<ClientInfo>) -> Result<(), UserConnectionLimit> {
        let max = self.shared.config.limits.user_connections;
        let now = self.ms();
        let burst = self.shared.config.limits.user_commands;
        let mut reg = self.registry();
        if !info.user.is_empty()
            && max > 0
            && reg.by_user.get(&info.user).is_some_and(|u| u.ids.len() >= max)
        {
            return Err(UserConnectionLimit);
        }
        let Some(entry) = reg.sessions.get_mut(&id) else { return Ok(()) };
        entry.info = Some(info.clone());
        // Anonymous connections are reachable by client id only (the API
        // needs a user or a client): one list of every anonymous connection
        // would cost memory and a linear search at each disconnect.
        if !info.user.is_empty() {
            reg.by_user
                .entry(info.user.clone())
                .or_insert_with(|| UserEntry {
                    ids: Vec::new(),
                    commands: crate::limits::Bucket::full(burst, now),
                })
                .ids
                .push(id);
        }
        reg.by_client.insert(info.client.clone(), id);
        Ok(())
    }

    /// Milliseconds since the node started (the time base of its shared
    /// token buckets).
    fn ms(&self) -> u32 {
        crate::limits::ms_since(self.shared.started)
    }

    /// Takes one command from `user`'s shared budget (`limits.user_commands`,
    /// one second of it as burst); false when it is spent. Costs a lock of
    /// the registry per command of a named user while the limit is on.
    pub(crate) fn take_user_command(&self, user: &str) -> bool {
        let rate = self.shared.config.limits.user_commands;
        if rate == 0 || user.is_empty() {
            return true;
        }
        let now = self.ms();
        let mut reg = self.registry();
        match reg.by_user.get_mut(user) {
            Some(u) => u.commands.try_take(rate, rate, now),
            None => true,
        }
    }

    pub(crate) fn unregister(&self, id: u64) {
        let mut reg = self.registry();
        let Some(entry) = reg.sessions.remove(&id) else { return };
        if let Some(info) = entry.info {
            if let Some(u) = reg.by_user.get_mut(&info.user) {
                u.ids.retain(|i| *i != id);
                if u.ids.is_empty() {
                    reg.by_user.remove(&info.user);
                }
            }
            reg.by_client.remove(&info.client);
        }
        metrics::hot().connections.decrement(1.0);
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.shared.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn num_connections(&self) -> usize {
        self.registry().sessions.len()
    }

    /// Local connections of `user` (all of them, or only `client` when given).
    fn local_targets(&self, user: &str, client: &str) -> Vec<Arc<Outbox>> {
        let reg = self.registry();
        if !client.is_empty() {
            return reg
                .by_client
                .get(client)
                .and_then(|id| reg.sessions.get(id))
                .filter(|e| user.is_empty() || e.info.as_ref().is_some_and(|i| &*i.user == user))
                .map(|e| vec![e.outbox.clone()])
                .unwrap_or_default();
        }
        reg.by_user
            .get(user)
            .map(|u| {
                u.ids.iter().filter_map(|i| reg.sessions.get(i)).map(|e| e.outbox.clone()).collect()
            })
            .unwrap_or_default()
    }

    /// Applies a control-plane message from any node.
    fn handle_control(&self, raw: &[u8]) {
        let msg: ControlMessage = match serde_json::from_slice(raw) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "undecodable control message ignored");
                return;
            }
        };
        match msg {
            ControlMessage::Subscribe { user, client, channel } => {
                let channel: Arc<str> = channel.into();
                for o in self.local_targets(&user, &client) {
                    o.push_directive(Directive::Subscribe { channel: channel.clone() });
                }
            }
            ControlMessage::Unsubscribe { user, client, channel } => {
                let channel: Arc<str> = channel.into();
                for o in self.local_targets(&user, &client) {
                    o.push_directive(Directive::Unsubscribed {
                        channel: channel.clone(),
                        code: 2000,
                        reason: "server unsubscribe",
                    });
                }
            }
            ControlMessage::Refresh { user, client, expire_at } => {
                for o in self.local_targets(&user, &client) {
                    o.push_directive(Directive::Refresh { expires_at: expire_at });
                }
            }
            ControlMessage::Disconnect { user, client, code, reason } => {
                for o in self.local_targets(&user, &client) {
                    o.close_with_reason(DisconnectCode(code), reason.clone());
                }
            }
            ControlMessage::ChannelsRequest { id, from, pattern } => {
                let matcher =
                    wildmatch::WildMatch::new(if pattern.is_empty() { "*" } else { &pattern });
                let channels: Vec<(String, u32)> = self
                    .shared
                    .hub
                    .channels()
                    .into_iter()
                    .filter(|(c, _)| matcher.matches(c))
                    .map(|(c, n)| (c.to_string(), n as u32))
                    .collect();
                let reply = ControlMessage::ChannelsReply {
                    id,
                    to: from,
                    node: self.shared.uid.clone(),
                    channels,
                };
                let node = self.clone();
                tokio::spawn(async move {
                    if let Err(e) = node.send_control(&reply).await {
                        tracing::warn!(error = %e, "channels reply failed");
                    }
                });
            }
            ControlMessage::Emulate { id, from, node, session, data } => {
                if node == self.shared.uid {
                    self.on_emulate(id, from, session, data);
                }
            }
            reply
            @ (ControlMessage::ChannelsReply { .. } | ControlMessage::EmulateReply { .. }) => {
                let (ControlMessage::ChannelsReply { id, to, .. }
                | ControlMessage::EmulateReply { id, to, .. }) = &reply
                else {
                    unreachable!()
                };
                if *to != self.shared.uid {
                    return;
                }
                let pending = self.shared.pending.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(tx) = pending.get(id) {
                    let _ = tx.send(reply);
                }
            }
        }
    }

    pub(crate) async fn send_control(&self, msg: &ControlMessage) -> Result<(), BrokerError> {
        let raw = serde_json::to_vec(msg).map_err(|e| BrokerError::Internal(e.to_string()))?;
        self.shared.broker.publish_control(bytes::Bytes::from(raw)).await
    }

    /// Asks every node for its channels matching `pattern` and merges the
    /// answers (channel -> subscribers cluster-wide). Waits for every node that
    /// announced itself, at most `timeout`.
    pub(crate) async fn cluster_channels(
        &self,
        pattern: &str,
        timeout: Duration,
    ) -> Result<HashMap<String, u32>, BrokerError> {
        let expected = self.shared.broker.nodes().await?.len().max(1);
        let id = uuid::Uuid::new_v4().to_string();
        let request = ControlMessage::ChannelsRequest {
            id: id.clone(),
            from: self.shared.uid.clone(),
            pattern: pattern.to_string(),
        };
        let mut merged: HashMap<String, u32> = HashMap::new();
        let mut seen = std::collections::HashSet::new();
        self.request(&id, &request, timeout, |reply| {
            if let ControlMessage::ChannelsReply { node, channels, .. } = reply
                && seen.insert(node)
            {
                for (c, n) in channels {
                    *merged.entry(c).or_default() += n;
                }
            }
            seen.len() >= expected
        })
        .await?;
        Ok(merged)
    }

    /// Sends `request` (request id `id`) to the cluster and hands each reply
    /// addressed to it to `on_reply` until that returns `true` or `timeout`
    /// passes. `Err`: the request could not be sent.
    pub(crate) async fn request(
        &self,
        id: &str,
        request: &ControlMessage,
        timeout: Duration,
        mut on_reply: impl FnMut(ControlMessage) -> bool,
    ) -> Result<(), BrokerError> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        self.shared.pending.lock().unwrap_or_else(|p| p.into_inner()).insert(id.to_string(), tx);
        let sent = self.send_control(request).await;
        if sent.is_ok() {
            let deadline = tokio::time::Instant::now() + timeout;
            while let Ok(Some(reply)) = tokio::time::timeout_at(deadline, rx.recv()).await {
                if on_reply(reply) {
                    break;
                }
            }
        }
        self.shared.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
        sent
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
            self.shared.events.local_occupancy(&self.shared.hub, channel);
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
            self.shared.events.local_occupancy(&self.shared.hub, channel);
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
        self.publish_with(channel, publication, Self::publish_options(ns)).await
    }

    /// How a namespace stores publications.
    pub(crate) fn publish_options(ns: &Namespace) -> PublishOptions {
        if ns.history_enabled() {
            PublishOptions {
                history_size: ns.history_size,
                history_ttl: ns.history_ttl,
                ..Default::default()
            }
        } else {
            PublishOptions::default()
        }
    }

    pub(crate) async fn publish_with(
        &self,
        channel: &str,
        publication: Publication,
        opts: PublishOptions,
    ) -> Result<StreamPosition, BrokerError> {
        let start = Instant::now();
        let res = self.shared.broker.publish(channel, publication, opts).await;
        let hot = metrics::hot();
        hot.broker_publish.record(start.elapsed().as_secs_f64());
        if res.is_ok() {
            hot.publications.increment(1);
        }
        res
    }

    /// Publishes a batch in order (see [`Broker::publish_many`]).
    pub(crate) async fn publish_many(
        &self,
        items: Vec<crate::broker::PublishItem>,
    ) -> Vec<Result<StreamPosition, BrokerError>> {
        let start = Instant::now();
        let res = self.shared.broker.publish_many(items).await;
        let hot = metrics::hot();
        let took = start.elapsed().as_secs_f64();
        for r in &res {
            hot.broker_publish.record(took);
            if r.is_ok() {
                hot.publications.increment(1);
            }
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

    /// Lets the broker free channel state nobody needs any more (see
    /// [`Broker::sweep`]) every `period`, a bounded amount each time, until the
    /// process ends, calling `after` with each result (the binary trims the
    /// heap there); returns at once for a broker that keeps no such state.
    pub async fn sweep_forever(self, period: Duration, mut after: impl FnMut(&Sweep) + Send) {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(sweep) = self.shared.broker.sweep() else { return };
            ::metrics::counter!(metrics::BROKER_CHANNELS_SWEPT).increment(sweep.freed as u64);
            ::metrics::gauge!(metrics::BROKER_CHANNELS).set(sweep.kept as f64);
            after(&sweep);
        }
    }

    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::Acquire)
    }

    /// Ready to take clients: not draining and the broker is delivering.
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.shared.broker.is_healthy()
    }

    /// Starts a drain: [`Node::is_ready`] turns false (`/ready` answers 503)
    /// and new connections are refused; open ones keep working until
    /// [`Node::close_spread`] closes them.
    pub fn start_drain(&self) {
        self.shared.draining.store(true, Ordering::Release);
    }

    /// Starts a drain and closes every open connection with `code` at once.
    pub fn drain(&self, code: DisconnectCode) {
        self.start_drain();
        for o in self.open_outboxes() {
            o.close(code);
        }
    }

    /// Starts a drain and closes every open connection with `code` (3001
    /// shutdown makes SDKs reconnect, to another node since this one refuses
    /// them), spread evenly over `period`: by `t` after the start,
    /// `total * t / period` are closed. So the other nodes see the
    /// reconnects arrive at a steady rate instead of all at once. One timer
    /// closes a batch per [`DRAIN_TICK`], however many connections there are;
    /// the cost is a snapshot of the connections (8 bytes each) for the
    /// period. Returns how many were closed.
    pub async fn close_spread(&self, code: DisconnectCode, period: Duration) -> usize {
        self.start_drain();
        let outboxes = self.open_outboxes();
        let total = outboxes.len();
        let start = tokio::time::Instant::now();
        let mut tick = tokio::time::interval(DRAIN_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut closed = 0;
        while closed < total {
            tick.tick().await;
            let elapsed = start.elapsed();
            let due = if elapsed >= period {
                total
            } else {
                // Rounded up, so the last batch goes out at `period`, not after.
                (total as u128 * elapsed.as_nanos()).div_ceil(period.as_nanos()) as usize
            };
            for o in &outboxes[closed..due.max(closed)] {
                o.close(code);
            }
            closed = due.max(closed);
        }
        total
    }

    fn open_outboxes(&self) -> Vec<Arc<Outbox>> {
        self.registry().sessions.values().map(|e| e.outbox.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::AuthConfig;
    use fanfare_protocol::Codec;

    fn outbox() -> Arc<Outbox> {
        Arc::new(Outbox::new(Codec::Json, 1 << 16))
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_refuses_new_connections_and_closes_open_ones_in_steady_batches_over_the_period()
     {
        let node = Node::new(
            NodeConfig::default(),
            Arc::new(crate::MemoryBroker::new()),
            Authenticator::new(&AuthConfig::default()).expect("no key is valid"),
            ChannelRules::new(vec![Namespace::default()]).expect("default namespace"),
        );
        let open: Vec<Arc<Outbox>> = (0..1000)
            .map(|_| {
                let o = outbox();
                node.register(o.clone()).expect("not draining yet");
                o
            })
            .collect();
        let spread = tokio::spawn({
            let node = node.clone();
            async move { node.close_spread(DisconnectCode::SHUTDOWN, Duration::from_secs(1)).await }
        });
        tokio::task::yield_now().await;
        assert!(node.is_draining() && !node.is_ready());
        assert!(node.register(outbox()).is_none(), "a new connection during the drain");
        let closed = || open.iter().filter(|o| o.close_code().is_some()).count();
        let mut by_quarter = Vec::new();
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            by_quarter.push(closed());
        }
        assert_eq!(spread.await.expect("spread task"), 1000);
        // Batches every 50 ms: a quarter of the period closes about a quarter.
        let expected = [250, 500, 750, 1000];
        for (got, want) in by_quarter.iter().zip(expected) {
            assert!(got.abs_diff(want) <= 50, "closed by quarter: {by_quarter:?}");
        }
        assert!(open.iter().all(|o| o.close_code() == Some(DisconnectCode::SHUTDOWN)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_with_no_period_closes_everything_at_once() {
        let node = Node::new(
            NodeConfig::default(),
            Arc::new(crate::MemoryBroker::new()),
            Authenticator::new(&AuthConfig::default()).expect("no key is valid"),
            ChannelRules::new(vec![Namespace::default()]).expect("default namespace"),
        );
        let open: Vec<Arc<Outbox>> = (0..10)
            .map(|_| {
                let o = outbox();
                node.register(o.clone()).expect("not draining yet");
                o
            })
            .collect();
        assert_eq!(node.close_spread(DisconnectCode::SHUTDOWN, Duration::ZERO).await, 10);
        assert!(open.iter().all(|o| o.close_code() == Some(DisconnectCode::SHUTDOWN)));
    }
}
