//! Lifecycle events for webhooks (decision 26): what sessions and the node
//! report, and the queue that carries it to the delivery task.
//!
//! Sessions call one method of [`Events`] per lifecycle point. While webhooks
//! are off (or the event is not among `webhooks.events`) such a call is one
//! load and one branch: no allocation, nothing on the fan-out path. An event
//! that is on is built (ids, strings), serialized once and handed to the
//! node's [`EventQueue`] without waiting: the memory queue or the Redis outbox.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use bytes::Bytes;
use fanfare_protocol::{ClientInfo, DisconnectCode};
use serde::Serialize;

use crate::broker::BrokerError;
use crate::hub::Hub;
use crate::outbox::Outbox;

/// What happened. The names (`webhooks.events`, the `type` field of the
/// JSON) are an interface: receivers switch on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Connect,
    Disconnect,
    Subscribe,
    Unsubscribe,
    ChannelOccupied,
    ChannelVacated,
    PresenceJoin,
    PresenceLeave,
}

impl EventKind {
    pub const ALL: [EventKind; 8] = [
        EventKind::Connect,
        EventKind::Disconnect,
        EventKind::Subscribe,
        EventKind::Unsubscribe,
        EventKind::ChannelOccupied,
        EventKind::ChannelVacated,
        EventKind::PresenceJoin,
        EventKind::PresenceLeave,
    ];

    pub fn name(self) -> &'static str {
        match self {
            EventKind::Connect => "connect",
            EventKind::Disconnect => "disconnect",
            EventKind::Subscribe => "subscribe",
            EventKind::Unsubscribe => "unsubscribe",
            EventKind::ChannelOccupied => "channel_occupied",
            EventKind::ChannelVacated => "channel_vacated",
            EventKind::PresenceJoin => "presence_join",
            EventKind::PresenceLeave => "presence_leave",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    fn bit(self) -> u16 {
        1 << self as u16
    }
}

/// A set of event kinds (`webhooks.events`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventMask(u16);

impl EventMask {
    pub fn with(self, kind: EventKind) -> Self {
        Self(self.0 | kind.bit())
    }

    pub fn has(self, kind: EventKind) -> bool {
        self.0 & kind.bit() != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// One event as receivers get it (an element of the batch's `events`).
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Unique (UUID v4): receivers drop an id they have seen, since a batch
    /// can arrive twice (a retry after a lost answer, a crash before the ack).
    pub id: String,
    #[serde(rename = "type")]
    pub kind: EventKind,
    /// Unix milliseconds on the producing node.
    pub time_ms: u64,
    /// The producing node's uid.
    pub node: String,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub channel: String,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub user: String,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub client: String,
    /// Disconnect only: the close code and reason the client got.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Event {
    pub fn new(kind: EventKind, node: &str, channel: &str, info: Option<&ClientInfo>) -> Self {
        Self {
            // From the thread's ChaCha generator, as client ids are: no
            // syscall per event.
            id: uuid::Builder::from_random_bytes(rand::random()).into_uuid().to_string(),
            kind,
            time_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            node: node.to_string(),
            channel: channel.to_string(),
            user: info.map(|i| i.user.to_string()).unwrap_or_default(),
            client: info.map(|i| i.client.to_string()).unwrap_or_default(),
            code: None,
            reason: None,
        }
    }

    /// The JSON receivers get.
    pub fn to_json(&self) -> Bytes {
        // Plain strings and numbers: serialization cannot fail.
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }
}

/// Events taken for delivery, oldest first.
#[derive(Debug, Default)]
pub struct Batch {
    /// Each event's JSON.
    pub events: Vec<Bytes>,
    /// What [`EventQueue::ack`] needs to drop them (Redis stream ids; empty
    /// for the memory queue, which drops from its front).
    pub ids: Vec<String>,
}

/// Carries events from the node to the delivery task: the bounded memory
/// queue, or the Redis outbox that any node may deliver from.
#[async_trait]
pub trait EventQueue: Send + Sync + 'static {
    /// Queues one event. Never waits; a full queue drops it, counts it in
    /// `fanfare_webhook_dropped_total` and logs.
    fn push(&self, event: Event);
    /// This node's first local subscriber of `event.channel` came
    /// (`occupied`) or its last one left. The queue turns that into the
    /// cluster-wide event (a single node's view is the cluster's for the
    /// memory broker). Calls come in the order of the transitions.
    fn occupancy(&self, event: Event, occupied: bool);
    /// Whether this node delivers now (holds the lease of the Redis outbox;
    /// always for the memory queue). Renews the lease when held.
    async fn lead(&self) -> bool;
    /// Up to `max` events, oldest first, the same ones again until acked;
    /// waits a while (and returns an empty batch) when there are none.
    async fn next(&self, max: usize) -> Result<Batch, BrokerError>;
    /// The batch was delivered (or given up): drop it.
    async fn ack(&self, batch: &Batch) -> Result<(), BrokerError>;
    /// Events waiting for delivery (the queue depth gauge), if known.
    async fn depth(&self) -> Option<u64>;
    /// This node stops delivering (shutdown): another may take over at once
    /// instead of after the lease expires.
    async fn resign(&self) {}
    /// Events this node produced that are not yet where another node could
    /// deliver them (memory: all queued; Redis: not yet written). Shutdown
    /// waits for 0, up to its drain timeout.
    fn unsaved(&self) -> usize;
}

struct Installed {
    mask: EventMask,
    queue: Arc<dyn EventQueue>,
    node: String,
    /// Channels with local subscribers, as last reported to the queue. Only
    /// kept when occupied or vacated events are on.
    occupied: Mutex<HashSet<Arc<str>>>,
}

/// The node's event source. Off until [`Events::install`].
#[derive(Default)]
pub struct Events(OnceLock<Installed>);

impl Events {
    /// Turns events in `mask` on, queued into `queue`; once, at start-up.
    pub fn install(&self, mask: EventMask, queue: Arc<dyn EventQueue>, node: &str) {
        let _ = self.0.set(Installed {
            mask,
            queue,
            node: node.to_string(),
            occupied: Mutex::default(),
        });
    }

    /// The installation, when `kind` is on.
    #[inline]
    fn on(&self, kind: EventKind) -> Option<&Installed> {
        self.0.get().filter(|i| i.mask.has(kind))
    }

    #[inline]
    fn client(&self, kind: EventKind, channel: &str, info: &ClientInfo) {
        if let Some(i) = self.on(kind) {
            i.queue.push(Event::new(kind, &i.node, channel, Some(info)));
        }
    }

    pub fn connect(&self, info: &ClientInfo) {
        self.client(EventKind::Connect, "", info);
    }

    /// The reason is the custom one the close carried (API or proxy
    /// disconnect), else the code's own.
    pub fn disconnect(&self, info: &ClientInfo, code: DisconnectCode, outbox: &Outbox) {
        if let Some(i) = self.on(EventKind::Disconnect) {
            let mut e = Event::new(EventKind::Disconnect, &i.node, "", Some(info));
            e.code = Some(code.0);
            e.reason = Some(outbox.close_reason(code).unwrap_or_else(|| code.reason().into()));
            i.queue.push(e);
        }
    }

    pub fn subscribe(&self, channel: &str, info: &ClientInfo) {
        self.client(EventKind::Subscribe, channel, info);
    }

    pub fn unsubscribe(&self, channel: &str, info: &ClientInfo) {
        self.client(EventKind::Unsubscribe, channel, info);
    }

    pub fn presence_join(&self, channel: &str, info: &ClientInfo) {
        self.client(EventKind::PresenceJoin, channel, info);
    }

    pub fn presence_leave(&self, channel: &str, info: &ClientInfo) {
        self.client(EventKind::PresenceLeave, channel, info);
    }

    /// The first local subscriber of `channel` came or the last one left
    /// (called after the hub changed). What is reported is the hub's state
    /// read under this lock, not what the caller saw: a subscribe racing an
    /// unsubscribe of the same channel in another task may call in either
    /// order, and reading the truth here keeps the reported transitions
    /// alternating and ending in the hub's state.
    pub(crate) fn local_occupancy(&self, hub: &Hub, channel: &str) {
        let Some(i) = self.0.get() else { return };
        let (occ, vac) = (EventKind::ChannelOccupied, EventKind::ChannelVacated);
        if !i.mask.has(occ) && !i.mask.has(vac) {
            return;
        }
        let mut occupied = i.occupied.lock().unwrap_or_else(|p| p.into_inner());
        let now = hub.has_subscribers(channel);
        let changed = if now { occupied.insert(channel.into()) } else { occupied.remove(channel) };
        if changed {
            let kind = if now { occ } else { vac };
            // The queue needs both transitions to count nodes even when only
            // one kind is delivered; it drops kinds not in the mask.
            i.queue.occupancy(Event::new(kind, &i.node, channel, None), now);
        }
    }
}

/// The bounded in-process queue used with the memory broker: one node is the
/// whole cluster, so occupancy transitions are the events themselves.
pub struct MemoryQueue {
    state: Mutex<MemoryState>,
    wake: tokio::sync::Notify,
    capacity: usize,
    mask: EventMask,
}

#[derive(Default)]
struct MemoryState {
    events: std::collections::VecDeque<Bytes>,
    /// Dropped since the queue was last below capacity: the first drop of
    /// an overflow is logged, not every one.
    dropping: u64,
}

impl MemoryQueue {
    pub fn new(capacity: usize, mask: EventMask) -> Self {
        Self { state: Mutex::default(), wake: Default::default(), capacity, mask }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Counts an accepted event.
pub fn counted(kind: EventKind) {
    metrics::counter!(crate::metrics::WEBHOOK_EVENTS, "event" => kind.name()).increment(1);
}

/// Counts and logs events a full queue refused.
pub fn dropped(n: u64, first: bool) {
    metrics::counter!(crate::metrics::WEBHOOK_DROPPED, "reason" => "queue_full").increment(n);
    if first {
        tracing::warn!("webhook queue full (webhooks.queue_size): events are dropped");
    }
}

#[async_trait]
impl EventQueue for MemoryQueue {
    fn push(&self, event: Event) {
        let json = event.to_json();
        let mut st = self.lock();
        if st.events.len() >= self.capacity {
            st.dropping += 1;
            let first = st.dropping == 1;
            drop(st);
            dropped(1, first);
            return;
        }
        st.dropping = 0;
        st.events.push_back(json);
        drop(st);
        counted(event.kind);
        self.wake.notify_one();
    }

    fn occupancy(&self, event: Event, _occupied: bool) {
        if self.mask.has(event.kind) {
            self.push(event);
        }
    }

    async fn lead(&self) -> bool {
        true
    }

    async fn next(&self, max: usize) -> Result<Batch, BrokerError> {
        let notified = self.wake.notified();
        {
            let st = self.lock();
            if !st.events.is_empty() {
                let events = st.events.iter().take(max).cloned().collect();
                return Ok(Batch { events, ids: Vec::new() });
            }
        }
        // A push between the check and here has stored its permit in
        // `notify_one`, so this returns at once.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), notified).await;
        Ok(Batch::default())
    }

    async fn ack(&self, batch: &Batch) -> Result<(), BrokerError> {
        let mut st = self.lock();
        let n = batch.events.len().min(st.events.len());
        st.events.drain(..n);
        Ok(())
    }

    async fn depth(&self) -> Option<u64> {
        Some(self.lock().events.len() as u64)
    }

    fn unsaved(&self) -> usize {
        self.lock().events.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> ClientInfo {
        ClientInfo {
            user: "u".into(),
            client: "c".into(),
            conn_info: Bytes::new(),
            chan_info: Bytes::new(),
        }
    }

    #[test]
    fn every_event_name_parses_back_and_is_its_json_type() {
        for k in EventKind::ALL {
            assert_eq!(EventKind::parse(k.name()), Some(k));
            let json = serde_json::to_value(Event::new(k, "n", "ch", Some(&info()))).unwrap();
            assert_eq!(json["type"], k.name());
        }
        assert_eq!(EventKind::parse("join"), None);
    }

    #[test]
    fn events_carry_unique_ids_and_skip_empty_fields() {
        let a = Event::new(EventKind::Connect, "n", "", Some(&info()));
        let b = Event::new(EventKind::Connect, "n", "", Some(&info()));
        assert_ne!(a.id, b.id);
        let json: serde_json::Value = serde_json::from_slice(&a.to_json()).unwrap();
        assert!(json.get("channel").is_none() && json.get("code").is_none(), "{json}");
        assert_eq!(json["user"], "u");
    }

    #[tokio::test]
    async fn the_memory_queue_hands_out_in_order_until_acked_and_drops_past_its_bound() {
        let mask = EventMask::default().with(EventKind::Subscribe);
        let q = MemoryQueue::new(3, mask);
        for ch in ["a", "b", "c", "d"] {
            q.push(Event::new(EventKind::Subscribe, "n", ch, Some(&info())));
        }
        let channels = |b: &Batch| -> Vec<String> {
            b.events
                .iter()
                .map(|e| {
                    let v: serde_json::Value = serde_json::from_slice(e).unwrap();
                    v["channel"].as_str().unwrap().to_string()
                })
                .collect()
        };
        let first = q.next(2).await.unwrap();
        assert_eq!(channels(&first), ["a", "b"]);
        assert_eq!(channels(&q.next(2).await.unwrap()), ["a", "b"], "unacked: handed out again");
        q.ack(&first).await.unwrap();
        assert_eq!(channels(&q.next(10).await.unwrap()), ["c"], "d was past the bound");
        assert_eq!(q.depth().await, Some(1));
    }

    #[tokio::test]
    async fn occupancy_events_not_asked_for_are_not_queued() {
        let q = MemoryQueue::new(10, EventMask::default().with(EventKind::ChannelVacated));
        q.occupancy(Event::new(EventKind::ChannelOccupied, "n", "a", None), true);
        q.occupancy(Event::new(EventKind::ChannelVacated, "n", "a", None), false);
        assert_eq!(q.depth().await, Some(1));
    }

    #[tokio::test]
    async fn sessions_report_their_lifecycle_and_the_node_its_first_and_last_subscriber() {
        use crate::auth::{AuthConfig, Authenticator};
        use crate::channel::{ChannelRules, Namespace};
        use crate::node::{Node, NodeConfig};
        use crate::session::Session;
        use fanfare_protocol::Codec;

        let rules = ChannelRules::new(vec![Namespace { presence: true, ..Default::default() }]);
        let auth = Authenticator::new(&AuthConfig::default()).unwrap();
        let node = Node::new(
            NodeConfig::default(),
            Arc::new(crate::MemoryBroker::new()),
            auth,
            rules.unwrap(),
        );
        let mask = EventKind::ALL.into_iter().fold(EventMask::default(), EventMask::with);
        let queue = Arc::new(MemoryQueue::new(100, mask));
        node.events().install(mask, queue.clone(), node.uid());
        let mut a = Session::new(node.clone(), Codec::Json).unwrap();
        let mut b = Session::new(node.clone(), Codec::Json).unwrap();
        for s in [&mut a, &mut b] {
            s.handle_frame(br#"{"id":1,"connect":{}}"#).await.unwrap();
            s.handle_frame(br#"{"id":2,"subscribe":{"channel":"room"}}"#).await.unwrap();
        }
        a.handle_frame(br#"{"id":3,"unsubscribe":{"channel":"room"}}"#).await.unwrap();
        a.close(DisconnectCode::CONNECTION_CLOSED).await;
        b.close(DisconnectCode::SHUTDOWN).await;
        let batch = queue.next(100).await.unwrap();
        let events: Vec<serde_json::Value> =
            batch.events.iter().map(|e| serde_json::from_slice(e).unwrap()).collect();
        let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "connect",
                "channel_occupied",
                "presence_join",
                "subscribe",
                "connect",
                "presence_join",
                "subscribe",
                "presence_leave",
                "unsubscribe",
                "disconnect",
                "presence_leave",
                "unsubscribe",
                "channel_vacated",
                "disconnect",
            ]
        );
        assert_eq!(events[13]["code"], 3001);
        assert_eq!(events[13]["reason"], "shutdown");
        assert_eq!(events[0]["client"], events[9]["client"]);
    }
}
