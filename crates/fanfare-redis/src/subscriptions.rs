//! The pub/sub side of one Redis (or of the cluster): which channels this node
//! is subscribed to, batching of SUBSCRIBE/UNSUBSCRIBE, delivery of pushes, and
//! reconnection.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use fanfare_core::broker::BrokerError;
use redis::{PushKind, Value};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, WeakUnboundedSender};
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use crate::conn::{self, ClusterView, CmdConn, PubSubConn, PubSubTarget, Push, SharedCmd};
use crate::wire::{self, Event};
use crate::{HandlerCell, Names};

/// A request from the broker to the manager.
pub enum SubRequest {
    /// Subscribe (if not yet) and answer once deliveries flow.
    Subscribe(String, oneshot::Sender<Result<(), BrokerError>>),
    /// The node's last local subscriber left; unsubscribe after the delay unless
    /// a subscriber came back.
    Unsubscribe(String),
    /// Redis ended our subscription to this pub/sub name without being asked
    /// (a sunsubscribe push: its slot moved to another master, e.g. after a
    /// manual `CLUSTER FAILOVER`), on the connection of this generation.
    Dropped(u64, String),
}

/// Whether the pub/sub connection is live; shared with `/ready`.
pub struct Health {
    up: AtomicBool,
    lost: Notify,
    target: String,
}

impl Health {
    pub fn new(target: String) -> Self {
        Self { up: AtomicBool::new(true), lost: Notify::new(), target }
    }

    pub fn target(&self) -> &str {
        &self.target
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }
}

/// Reads pushes and hands publications to the node. Runs for the broker's life;
/// reconnected connections reuse the same push channel.
pub fn spawn_delivery(
    mut rx: UnboundedReceiver<Push>,
    names: Names,
    handler: HandlerCell,
    health: Arc<Health>,
    manager: WeakUnboundedSender<SubRequest>,
) {
    let control = names.control();
    let delivery_lag = metrics::histogram!(fanfare_core::metrics::DELIVERY_LAG);
    tokio::spawn(async move {
        while let Some((generation, push)) = rx.recv().await {
            match push.kind {
                PushKind::Message | PushKind::SMessage => {
                    let (Some(Value::BulkString(name)), Some(Value::BulkString(payload))) =
                        (push.data.first(), push.data.get(1))
                    else {
                        continue;
                    };
                    let Some(h) = handler.get() else { continue };
                    let Ok(name) = std::str::from_utf8(name) else { continue };
                    if name == control {
                        h.on_control(Bytes::copy_from_slice(payload));
                        continue;
                    }
                    let Some(channel) = names.channel_of(name) else { continue };
                    match wire::decode_message(&Bytes::copy_from_slice(payload)) {
                        Some(Event::Publication(p, sent)) => {
                            let lag = wire::unix_micros().saturating_sub(sent);
                            delivery_lag.record(lag as f64 / 1e6);
                            h.on_publication(channel, p)
                        }
                        Some(Event::Join(i)) => h.on_join(channel, i),
                        Some(Event::Leave(i)) => h.on_leave(channel, i),
                        None => tracing::warn!(channel, "undecodable message from redis; ignored"),
                    }
                }
                PushKind::Disconnection => {
                    health.up.store(false, Ordering::Release);
                    health.lost.notify_one();
                }
                // Also the confirmation of our own SUNSUBSCRIBE; the manager
                // tells the two apart by whether it still wants the name.
                PushKind::SUnsubscribe => {
                    if let (Some(Value::BulkString(name)), Some(m)) =
                        (push.data.first(), manager.upgrade())
                    {
                        let name = String::from_utf8_lossy(name).into_owned();
                        let _ = m.send(SubRequest::Dropped(generation, name));
                    }
                }
                _ => {}
            }
        }
    });
}

/// Owns the pub/sub connection; the only task that subscribes or unsubscribes.
pub struct Manager {
    pub(crate) target: PubSubTarget,
    pub(crate) conn: PubSubConn,
    /// The shard's command connection: proven to work before reporting
    /// healthy; in a cluster rebuilt with the pub/sub connection.
    pub(crate) cmd: SharedCmd,
    pub(crate) push: UnboundedSender<Push>,
    pub(crate) names: Names,
    pub(crate) handler: HandlerCell,
    pub(crate) health: Arc<Health>,
    pub(crate) delay: Duration,
    /// Channels subscribed in Redis.
    pub(crate) live: HashSet<String>,
    /// Channels to unsubscribe at the given time unless a local subscriber returns.
    pub(crate) leaving: HashMap<String, Instant>,
    /// Pub/sub names subscribed for the node's whole life (the control channel).
    pub(crate) always: Vec<String>,
    /// Cluster: the slot owners (`(first, last, master)`) our subscriptions
    /// were made on; `None` until known.
    pub(crate) owners: Option<Vec<(i64, i64, String)>>,
    /// Cluster: every node (`host:port`) configured or seen so far, where a
    /// reconnect starts asking for the topology.
    pub(crate) known: Vec<String>,
}

/// How often a cluster's slot owners are compared with those our
/// subscriptions were made on. A dead master's connection and a moved slot
/// announce themselves (disconnection, sunsubscribe); this catches a master
/// replaced without either, e.g. one cut off by the network, whose socket
/// stays open and silent. Cost: one CLUSTER SLOTS per second per node.
const TOPOLOGY_CHECK: Duration = Duration::from_secs(1);

/// Reconnect backoff: from 10 ms, doubling, at most 250 ms; see
/// [`Manager::pause`] for the probe that cuts a wait short.
const MIN_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_millis(250);
const PROBE_EVERY: Duration = Duration::from_millis(10);
const PROBE_TIMEOUT: Duration = Duration::from_millis(100);

impl Manager {
    pub async fn run(mut self, mut rx: UnboundedReceiver<SubRequest>) {
        let mut tick = tokio::time::interval(
            Duration::from_millis(100).min(self.delay.max(Duration::from_millis(10))),
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let cluster = matches!(self.target, PubSubTarget::Cluster { .. });
        let mut topology_tick = tokio::time::interval(TOPOLOGY_CHECK);
        topology_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let sentinel = self.target.is_sentinel();
        loop {
            tokio::select! {
                req = rx.recv() => {
                    let Some(first) = req else { return };
                    // Take everything already queued: one command for the batch.
                    let mut batch = vec![first];
                    while batch.len() < 50_000 {
                        match rx.try_recv() {
                            Ok(r) => batch.push(r),
                            Err(_) => break,
                        }
                    }
                    self.apply(batch).await;
                }
                _ = tick.tick() => self.flush_leaving().await,
                _ = topology_tick.tick(), if cluster || sentinel => {
                    if cluster {
                        self.check_topology().await
                    } else {
                        self.check_sentinel().await
                    }
                }
                _ = self.health.lost.notified() => self.reconnect().await,
            }
        }
    }

    async fn apply(&mut self, batch: Vec<SubRequest>) {
        let now = Instant::now();
        let mut wanted: Vec<String> = Vec::new();
        let mut waiting: Vec<oneshot::Sender<Result<(), BrokerError>>> = Vec::new();
        let mut dropped = false;
        for req in batch {
            match req {
                // From an older connection: the reconnect that replaced it
                // already resubscribed everything.
                SubRequest::Dropped(generation, _) if generation != self.target.generation() => {}
                SubRequest::Dropped(_, name) => {
                    dropped |= self.always.contains(&name)
                        || self.names.channel_of(&name).is_some_and(|ch| self.live.contains(ch));
                }
                SubRequest::Unsubscribe(ch) => {
                    self.leaving.insert(ch, now + self.delay);
                }
                SubRequest::Subscribe(ch, ack) => {
                    self.leaving.remove(&ch);
                    if !self.health.is_up() {
                        let _ = ack.send(Err(BrokerError::Unavailable(format!(
                            "redis {} is reconnecting",
                            self.health.target
                        ))));
                    } else if self.live.contains(&ch) {
                        let _ = ack.send(Ok(()));
                    } else {
                        if !wanted.contains(&ch) {
                            wanted.push(ch);
                        }
                        waiting.push(ack);
                    }
                }
            }
        }
        if dropped {
            // A slot of ours moved: rebuild the connection on the new topology,
            // resubscribe everything and report gaps (publications may have
            // gone to the new master before we subscribed there).
            tracing::warn!(redis = %self.health.target, "redis dropped a subscription we hold (slot moved)");
            self.reconnect().await;
        }
        if wanted.is_empty() {
            return;
        }
        let names: Vec<String> = wanted.iter().map(|c| self.names.pubsub(c)).collect();
        match self.conn.subscribe(&names).await {
            Ok(()) => {
                self.live.extend(wanted);
                for ack in waiting {
                    let _ = ack.send(Ok(()));
                }
            }
            Err(e) => {
                tracing::warn!(redis = %self.health.target, error = %e, "subscribe failed");
                for ack in waiting {
                    let _ = ack.send(Err(BrokerError::Unavailable(e.to_string())));
                }
                self.health.up.store(false, Ordering::Release);
                self.reconnect().await;
            }
        }
    }

    async fn flush_leaving(&mut self) {
        if self.leaving.is_empty() || !self.health.is_up() {
            return;
        }
        let now = Instant::now();
        let due: Vec<String> =
            self.leaving.iter().filter(|(_, at)| **at <= now).map(|(c, _)| c.clone()).collect();
        if due.is_empty() {
            return;
        }
        let handler = self.handler.get();
        let mut gone = Vec::new();
        for ch in due {
            self.leaving.remove(&ch);
            // A subscriber that arrived meanwhile keeps the channel.
            if handler.is_some_and(|h| h.has_subscribers(&ch)) {
                continue;
            }
            if self.live.remove(&ch) {
                gone.push(ch);
            }
        }
        if gone.is_empty() {
            return;
        }
        let names: Vec<String> = gone.iter().map(|c| self.names.pubsub(c)).collect();
        if let Err(e) = self.conn.unsubscribe(&names).await {
            tracing::warn!(redis = %self.health.target, error = %e, "unsubscribe failed");
            self.health.up.store(false, Ordering::Release);
            self.reconnect().await;
        }
    }

    /// Cluster: reconnects when the slot owners differ from those subscribed
    /// on. A different answer from one node is confirmed with all of them
    /// first ([`conn::agreed_view`]): a node that has not caught up (or is cut
    /// off from the others) must not cause a reconnect, which makes every
    /// subscriber recover.
    async fn check_topology(&mut self) {
        if !self.health.is_up() {
            return;
        }
        let mut cmd = self.cmd.get();
        let query = conn::cluster_view(&mut cmd);
        let Ok(Ok(view)) = tokio::time::timeout(Duration::from_millis(500), query).await else {
            return;
        };
        if self.owners.is_none() {
            self.owners = Some(view.masters);
            return;
        }
        if self.owners.as_ref() == Some(&view.masters) {
            return;
        }
        let tls = self.target.tls();
        let confirm =
            conn::agreed_view(tls, &self.target.urls()[0], &self.known, Duration::from_secs(1));
        let Ok(Ok(agreed)) = tokio::time::timeout(Duration::from_secs(2), confirm).await else {
            return;
        };
        if self.owners.as_ref() != Some(&agreed.masters) {
            tracing::warn!(redis = %self.health.target, "redis cluster slot owners changed");
            self.reconnect().await;
        }
    }

    /// Sentinel: reconnects when the sentinels name another primary (a
    /// failover the old primary survived as a replica, e.g. `SENTINEL
    /// FAILOVER`: our connections to it would stay open while publishes fail
    /// with READONLY). Cost: one SENTINEL and one ROLE per second per node,
    /// each over a short-lived connection of its own (two connects, with
    /// `rediss://` two TLS handshakes, per second per node).
    async fn check_sentinel(&mut self) {
        if !self.health.is_up() {
            return;
        }
        let follow = self.target.follow_sentinel();
        if let Ok(Ok(true)) = tokio::time::timeout(Duration::from_secs(2), follow).await {
            tracing::warn!(redis = %self.health.target, to = %self.target.urls()[0], "redis sentinel names a new primary");
            self.reconnect().await;
        }
    }

    /// One reconnect attempt: the new pub/sub connection, the new command
    /// connection and (cluster) the view they were made on.
    async fn attempt(&mut self) -> redis::RedisResult<(PubSubConn, CmdConn, ClusterView)> {
        // Sentinel: the primary may have changed while we were away.
        self.target.follow_sentinel().await?;
        // Cluster: a new connection, not the old one's own recovery: it
        // learns the slot map afresh, seeded with every node the cluster
        // still knows, once the reachable nodes agree on the slot owners, so
        // subscriptions lost with a dead master or a moved slot are made on
        // the current owners.
        let tls = self.target.tls().clone();
        let view = match &self.target {
            PubSubTarget::Cluster { .. } => {
                let template = &self.target.urls()[0];
                conn::agreed_view(&tls, template, &self.known, Duration::from_secs(1)).await?
            }
            PubSubTarget::Single { .. } => ClusterView::default(),
        };
        let mut conn = self.target.connect(self.push.clone(), &view.nodes).await?;
        conn.ping().await?;
        // Publishes, history and presence use the command connection: a new
        // one replaces it (cluster: on the same topology; standalone: the old
        // one may be waiting out its own retries against the dead server, or
        // point at a demoted primary). Ready only once it answers, so the
        // first client command after `/ready` turns 200 does not fail.
        let mut cmd = match &self.target {
            PubSubTarget::Cluster { urls, .. } => {
                conn::open_cluster_cmd(&tls, &urls[0], &view.nodes).await?
            }
            PubSubTarget::Single { url, .. } => conn::open_single_cmd(&tls, url).await?,
        };
        redis::cmd("PING").exec_async(&mut cmd).await?;
        let mut names: Vec<String> = self.live.iter().map(|c| self.names.pubsub(c)).collect();
        names.extend(self.always.iter().cloned());
        conn.subscribe(&names).await?;
        Ok((conn, cmd, view))
    }

    /// Waits `backoff` before the next attempt, or less: a standalone Redis
    /// we could not connect to is probed (a bare TCP connect) every
    /// [`PROBE_EVERY`], and the wait ends as soon as a probe connects after
    /// one that did not, so publishing resumes within a probe interval of
    /// Redis answering again rather than after whatever the backoff had grown
    /// to. Only a change from refusing to accepting ends the wait: a server
    /// that accepts and then fails us (maxclients, TLS) gets the full backoff.
    /// Cost while Redis is down: one TCP connect per probe interval per node
    /// (refused at once by a host whose Redis is down; else bounded by the
    /// probe's timeout).
    async fn pause(&self, backoff: Duration, unreachable: bool) {
        let addr = match &self.target {
            PubSubTarget::Single { sentinel: None, url, .. } if unreachable => conn::url_addr(url),
            _ => return tokio::time::sleep(backoff).await,
        };
        let deadline = Instant::now() + backoff;
        let mut was_down = false;
        while Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            let probe = tokio::net::TcpStream::connect(addr.as_str());
            let started = Instant::now();
            match tokio::time::timeout(left.min(PROBE_TIMEOUT), probe).await {
                Ok(Ok(_)) if was_down => return,
                Ok(Ok(_)) => {}
                _ => was_down = true,
            }
            let next = (started + PROBE_EVERY).min(deadline);
            tokio::time::sleep_until(next).await;
        }
    }

    /// Re-establishes the pub/sub connection and resubscribes every live channel,
    /// then tells the node that each of them may have missed publications.
    async fn reconnect(&mut self) {
        self.health.up.store(false, Ordering::Release);
        tracing::warn!(redis = %self.health.target, channels = self.live.len(), "redis pub/sub connection lost; reconnecting");
        let mut backoff = MIN_BACKOFF;
        loop {
            match self.attempt().await {
                Ok((conn, cmd, view)) => {
                    self.conn = conn;
                    self.cmd.replace(cmd);
                    self.owners = Some(view.masters);
                    for n in view.nodes {
                        if !self.known.contains(&n) {
                            self.known.push(n);
                        }
                    }
                    break;
                }
                Err(e) => {
                    tracing::debug!(redis = %self.health.target, error = %e, "reconnect attempt failed");
                    let unreachable =
                        e.is_connection_refusal() || e.is_timeout() || e.is_connection_dropped();
                    self.pause(backoff, unreachable).await;
                    // Capped low: a Redis Cluster failover completes while we
                    // wait, and publishing resumes only once we are back.
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        // A Disconnection push from the connection we just replaced may still be
        // pending; drop it.
        let _ = tokio::time::timeout(Duration::ZERO, self.health.lost.notified()).await;
        self.health.up.store(true, Ordering::Release);
        metrics::counter!(fanfare_core::metrics::BROKER_RECONNECTS).increment(1);
        tracing::info!(redis = %self.health.target, channels = self.live.len(), "redis pub/sub reconnected; subscribers told to recover");
        if let Some(h) = self.handler.get() {
            for ch in &self.live {
                h.on_gap(ch);
            }
        }
    }
}
