//! The webhook outbox in Redis (decision 26): a stream every node appends its
//! lifecycle events to, delivered by one node at a time (the lease holder)
//! through a consumer group, so events survive the crash of the node that
//! produced them and of the node that was delivering them.
//!
//! - **Producing.** Sessions hand events to a bounded channel (never waiting);
//!   one task per node writes them in order, pipelined, with `ADD` (or
//!   `OCCUPANCY` for this node's first/last local subscriber of a channel).
//!   Until written an event lives only in this process (`unsaved`).
//! - **Occupancy.** A set per channel of the nodes with local subscribers; the
//!   script that changes it appends `channel_occupied` on its 0 -> 1 and
//!   `channel_vacated` on its 1 -> 0, atomically. Every node refreshes an
//!   `alive` key; the lease holder vacates the channels of nodes whose key
//!   expired (SIGKILL, lost network) through the same script. A live node
//!   that finds its key expired writes its occupied channels again.
//! - **Delivering.** The lease holder first re-takes every pending entry
//!   (XAUTOCLAIM from the start: its own unacked batch, or the one a dead
//!   holder was delivering), then reads new entries (XREADGROUP `>`); it acks
//!   and deletes a batch once delivered, so the stream holds exactly what is
//!   undelivered and its length is the bound (`webhooks.queue_size`).
//!
//! All keys share one hash tag, so in a Redis Cluster they live on one slot
//! and the scripts may touch them together.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use fanfare_core::BrokerError;
use fanfare_core::events::{self, Batch, Event, EventKind, EventMask, EventQueue};
use redis::Value;

use crate::conn::SharedCmd;
use crate::{script_text, unavailable};

/// Append one event unless the stream holds `cap` already.
/// KEYS: stream. ARGV: cap, event JSON. Returns 1 (added) or 0 (full).
const ADD: &str = r#"
if redis.call('xlen', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('xadd', KEYS[1], '*', 'e', ARGV[2])
return 1
"#;

/// A node's first local subscriber of a channel came (ARGV[5] = '1') or its
/// last left ('0'). KEYS: stream, the channel's node set, the node's channel
/// set, the set of nodes, the node's alive key. ARGV: cap, event JSON, node
/// uid, channel, occupied, deliver ('1' when the event's kind is asked for),
/// swept ('1': a sweeper vacates a node it found dead, which it no longer is
/// if its alive key is back). Returns 1 (cluster-wide transition, event
/// added), 2 (transition, stream full) or 0.
const OCCUPANCY: &str = r#"
if ARGV[7] == '1' and redis.call('exists', KEYS[5]) == 1 then return 0 end
local transition
if ARGV[5] == '1' then
  transition = redis.call('sadd', KEYS[2], ARGV[3]) == 1 and redis.call('scard', KEYS[2]) == 1
  redis.call('sadd', KEYS[3], ARGV[4])
  redis.call('sadd', KEYS[4], ARGV[3])
else
  transition = redis.call('srem', KEYS[2], ARGV[3]) == 1 and redis.call('scard', KEYS[2]) == 0
  redis.call('srem', KEYS[3], ARGV[4])
end
if not transition or ARGV[6] ~= '1' then return 0 end
if redis.call('xlen', KEYS[1]) >= tonumber(ARGV[1]) then return 2 end
redis.call('xadd', KEYS[1], '*', 'e', ARGV[2])
return 1
"#;

/// Take or renew the delivery lease. KEYS: lease. ARGV: node uid, ttl (ms).
/// Returns 1 when this node holds it.
const LEASE: &str = r#"
local holder = redis.call('get', KEYS[1])
if holder == ARGV[1] then
  redis.call('pexpire', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"#;

/// Give the lease up. KEYS: lease. ARGV: node uid.
const RESIGN: &str = r#"
if redis.call('get', KEYS[1]) == ARGV[1] then redis.call('del', KEYS[1]) end
return 0
"#;

/// Drop a dead node from the set of nodes. KEYS: set of nodes, the node's
/// channel set, its alive key. ARGV: node uid.
const FORGET: &str = r#"
if redis.call('exists', KEYS[2]) == 0 and redis.call('exists', KEYS[3]) == 0 then
  redis.call('srem', KEYS[1], ARGV[1])
end
return 0
"#;

const GROUP: &str = "delivery";

/// How long the delivering node waits before looking at an empty stream
/// again: it polls, because a blocking XREADGROUP would stall the command
/// connection every publish of this node shares. Ten small commands a second
/// on one node of the cluster.
const POLL: Duration = Duration::from_millis(100);

/// Outbox settings (`webhooks.*`).
#[derive(Debug, Clone)]
pub struct OutboxConfig {
    /// Most undelivered events in the stream (and in this node's hand-off).
    pub capacity: usize,
    /// Lifetime of the delivery lease and of a node's `alive` key: how long a
    /// dead node's channels and undelivered batch wait for the others.
    pub lease_ttl: Duration,
    /// Kinds that are delivered.
    pub mask: EventMask,
}

struct Keys {
    stream: String,
    lease: String,
    nodes: String,
    tag: String,
}

impl Keys {
    fn alive(&self, uid: &str) -> String {
        format!("{}.alive.{uid}", self.tag)
    }
    fn node(&self, uid: &str) -> String {
        format!("{}.node.{uid}", self.tag)
    }
    fn channel(&self, ch: &str) -> String {
        format!("{}.chan.{ch}", self.tag)
    }
}

enum Op {
    Add(Event),
    Occupancy(Event, bool),
    /// Write this node's occupied channels again (its alive key had lapsed,
    /// so a sweeper may have vacated them).
    Reassert,
}

struct Inner {
    cmd: SharedCmd,
    keys: Keys,
    node: String,
    cfg: OutboxConfig,
    add: String,
    occupancy: String,
    lease: String,
    resign: String,
    forget: String,
    /// Pushed but not yet written to Redis.
    unsaved: AtomicUsize,
    /// Dropped since the hand-off last had room (the first is logged).
    dropping: AtomicU64,
    group_ready: AtomicBool,
    /// Shutting down: never take the lease again.
    resigned: AtomicBool,
}

/// See the module docs.
pub struct RedisOutbox {
    inner: Arc<Inner>,
    tx: tokio::sync::mpsc::Sender<Op>,
}

impl crate::RedisBroker {
    /// The webhook outbox on this broker's first Redis (or the cluster),
    /// with its writer and heartbeat tasks; `node` is this node's uid.
    pub async fn outbox(&self, node: &str, cfg: OutboxConfig) -> Result<RedisOutbox, BrokerError> {
        let tag = format!("{{{}.webhooks}}", self.names.prefix);
        let inner = Arc::new(Inner {
            cmd: self.shards[0].cmd.clone(),
            keys: Keys {
                stream: format!("{tag}.stream"),
                lease: format!("{tag}.lease"),
                nodes: format!("{tag}.nodes"),
                tag,
            },
            node: node.to_string(),
            add: script_text(ADD, self.cluster),
            occupancy: script_text(OCCUPANCY, self.cluster),
            lease: script_text(LEASE, self.cluster),
            resign: script_text(RESIGN, self.cluster),
            forget: script_text(FORGET, self.cluster),
            cfg,
            unsaved: AtomicUsize::new(0),
            dropping: AtomicU64::new(0),
            group_ready: AtomicBool::new(false),
            resigned: AtomicBool::new(false),
        });
        // Alive before the first occupancy is written: a sweeper must never
        // see this node's channels without its key.
        inner.heartbeat().await?;
        let (tx, rx) = tokio::sync::mpsc::channel(inner.cfg.capacity);
        tokio::spawn(inner.clone().write(rx));
        tokio::spawn(inner.clone().beat(tx.clone()));
        Ok(RedisOutbox { inner, tx })
    }
}

impl Inner {
    fn conn(&self) -> crate::conn::CmdConn {
        self.cmd.get()
    }

    /// The script call writing `e` of `node` (this one, or a dead one being
    /// `swept`): ADD, or OCCUPANCY when `occupancy` says which transition.
    fn write_cmd(&self, e: &Event, occupancy: Option<bool>, node: &str, swept: bool) -> redis::Cmd {
        let mut cmd = redis::cmd("EVAL");
        match occupancy {
            None => {
                cmd.arg(&self.add).arg(1).arg(&self.keys.stream);
                cmd.arg(self.cfg.capacity).arg(e.to_json().as_ref());
            }
            Some(occupied) => {
                cmd.arg(&self.occupancy)
                    .arg(5)
                    .arg(&self.keys.stream)
                    .arg(self.keys.channel(&e.channel))
                    .arg(self.keys.node(node))
                    .arg(&self.keys.nodes)
                    .arg(self.keys.alive(node));
                cmd.arg(self.cfg.capacity)
                    .arg(e.to_json().as_ref())
                    .arg(node)
                    .arg(&e.channel)
                    .arg(if occupied { "1" } else { "0" })
                    .arg(if self.cfg.mask.has(e.kind) { "1" } else { "0" })
                    .arg(if swept { "1" } else { "0" });
            }
        }
        cmd
    }

    /// Writes queued ops in order, pipelined; a failed pipeline is retried
    /// whole (scripts that ran before the failure ran again are harmless:
    /// ADD appends a second copy with the same event id, OCCUPANCY finds no
    /// transition), so order is kept and nothing is lost while Redis is away.
    async fn write(self: Arc<Self>, mut rx: tokio::sync::mpsc::Receiver<Op>) {
        let mut received = Vec::with_capacity(256);
        // Channels this node has written as occupied: what `Reassert` writes
        // again. One string per locally occupied channel.
        let mut here: HashSet<String> = HashSet::new();
        while rx.recv_many(&mut received, 256).await > 0 {
            let taken = received.len();
            let mut ops = Vec::with_capacity(taken);
            for op in received.drain(..) {
                match op {
                    Op::Reassert => ops.extend(here.iter().map(|ch| {
                        (Event::new(EventKind::ChannelOccupied, &self.node, ch, None), Some(true))
                    })),
                    Op::Occupancy(e, occupied) => {
                        if occupied {
                            here.insert(e.channel.clone());
                        } else {
                            here.remove(&e.channel);
                        }
                        ops.push((e, Some(occupied)));
                    }
                    Op::Add(e) => ops.push((e, None)),
                }
            }
            let mut pipe = redis::Pipeline::with_capacity(ops.len());
            pipe.ignore_errors();
            for (e, occupancy) in &ops {
                pipe.add_command(self.write_cmd(e, *occupancy, &self.node, false));
            }
            let mut backoff = Duration::from_millis(50);
            let replies = loop {
                match pipe.query_async::<Vec<Value>>(&mut self.conn()).await {
                    Ok(r) => break r,
                    Err(e) => {
                        tracing::warn!(error = %e, "webhook outbox write failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                }
            };
            for ((e, _), reply) in ops.iter().zip(&replies) {
                self.outcome(e.kind, reply);
            }
            self.unsaved.fetch_sub(taken, Ordering::AcqRel);
        }
    }

    fn outcome(&self, kind: EventKind, reply: &Value) {
        match reply {
            Value::Int(1) => {
                self.dropping.store(0, Ordering::Relaxed);
                events::counted(kind);
            }
            Value::Int(0)
                if matches!(kind, EventKind::ChannelOccupied | EventKind::ChannelVacated) => {}
            Value::Int(_) => events::dropped(1, self.dropping.fetch_add(1, Ordering::Relaxed) == 0),
            other => tracing::warn!(reply = ?other, "webhook outbox script failed"),
        }
    }

    /// Sets this node's alive key; whether it was still there.
    async fn heartbeat(&self) -> Result<bool, BrokerError> {
        let previous: Option<String> = redis::cmd("SET")
            .arg(self.keys.alive(&self.node))
            .arg(1)
            .arg("PX")
            .arg(self.cfg.lease_ttl.as_millis() as u64)
            .arg("GET")
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(previous.is_some())
    }

    /// Keeps this node's `alive` key; the lease holder also vacates the
    /// channels of nodes whose key expired. A key found expired (Redis out
    /// of reach for `lease_ttl`) means the others may have vacated this
    /// node's channels: they are written again through the writer (in order
    /// with what it still holds).
    async fn beat(self: Arc<Self>, tx: tokio::sync::mpsc::Sender<Op>) {
        let mut tick = tokio::time::interval(self.cfg.lease_ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match self.heartbeat().await {
                Err(e) => {
                    tracing::warn!(error = %e, "webhook heartbeat failed");
                    continue;
                }
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(
                        "this node's webhook liveness key had expired; its channels are written \
                         as occupied again"
                    );
                    self.unsaved.fetch_add(1, Ordering::AcqRel);
                    if tx.send(Op::Reassert).await.is_err() {
                        self.unsaved.fetch_sub(1, Ordering::AcqRel);
                    }
                }
            }
            if self.lead().await
                && let Err(e) = self.sweep().await
            {
                tracing::warn!(error = %e, "vacating channels of dead nodes failed");
            }
        }
    }

    async fn lead(&self) -> bool {
        if self.resigned.load(Ordering::Acquire) {
            return false;
        }
        let r: Result<i64, _> = redis::cmd("EVAL")
            .arg(&self.lease)
            .arg(1)
            .arg(&self.keys.lease)
            .arg(&self.node)
            .arg(self.cfg.lease_ttl.as_millis() as u64)
            .query_async(&mut self.conn())
            .await;
        matches!(r, Ok(1))
    }

    /// Vacates every channel of nodes that stopped beating.
    async fn sweep(&self) -> Result<(), BrokerError> {
        let mut conn = self.conn();
        let nodes: Vec<String> = redis::cmd("SMEMBERS")
            .arg(&self.keys.nodes)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        for uid in nodes.into_iter().filter(|u| *u != self.node) {
            let alive: bool = redis::cmd("EXISTS")
                .arg(self.keys.alive(&uid))
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            if alive {
                continue;
            }
            let channels: Vec<String> = redis::cmd("SMEMBERS")
                .arg(self.keys.node(&uid))
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            tracing::info!(
                node = uid,
                channels = channels.len(),
                "vacating a dead node's channels"
            );
            for ch in channels {
                let e = Event::new(EventKind::ChannelVacated, &uid, &ch, None);
                let reply: Value = self
                    .write_cmd(&e, Some(false), &uid, true)
                    .query_async(&mut conn)
                    .await
                    .map_err(unavailable)?;
                self.outcome(EventKind::ChannelVacated, &reply);
            }
            // Forgotten only while still dead and without channels: a node
            // back in time (its `Reassert`) stays known.
            redis::cmd("EVAL")
                .arg(&self.forget)
                .arg(3)
                .arg(&self.keys.nodes)
                .arg(self.keys.node(&uid))
                .arg(self.keys.alive(&uid))
                .arg(&uid)
                .exec_async(&mut conn)
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }

    async fn ensure_group(&self) -> Result<(), BrokerError> {
        if self.group_ready.load(Ordering::Acquire) {
            return Ok(());
        }
        let r = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.keys.stream)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .exec_async(&mut self.conn())
            .await;
        match r {
            Err(e) if e.code() != Some("BUSYGROUP") => Err(unavailable(e)),
            _ => {
                self.group_ready.store(true, Ordering::Release);
                Ok(())
            }
        }
    }

    async fn next(&self, max: usize) -> Result<Batch, BrokerError> {
        self.ensure_group().await?;
        let mut conn = self.conn();
        // Pending entries first, from the oldest: whatever a previous holder
        // (this node included) took and did not ack goes out before anything
        // newer, which keeps per-channel order across a change of holder.
        let claimed: Result<Value, _> = redis::cmd("XAUTOCLAIM")
            .arg(&self.keys.stream)
            .arg(GROUP)
            .arg(&self.node)
            .arg(0)
            .arg("0-0")
            .arg("COUNT")
            .arg(max)
            .query_async(&mut conn)
            .await;
        let claimed = claimed.map_err(|e| self.lost_group(e))?;
        let batch = entries(&claimed);
        if !batch.events.is_empty() {
            return Ok(batch);
        }
        let read: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(&self.node)
            .arg("COUNT")
            .arg(max)
            .arg("STREAMS")
            .arg(&self.keys.stream)
            .arg(">")
            .query_async(&mut conn)
            .await
            .map_err(|e| self.lost_group(e))?;
        let batch = entries(&read);
        if batch.events.is_empty() {
            tokio::time::sleep(POLL).await;
        }
        Ok(batch)
    }

    /// A NOGROUP answer means Redis lost the stream (restart without
    /// persistence, flush): create the group again next time.
    fn lost_group(&self, e: redis::RedisError) -> BrokerError {
        if e.code() == Some("NOGROUP") {
            self.group_ready.store(false, Ordering::Release);
        }
        unavailable(e)
    }
}

/// The entries of an XAUTOCLAIM or XREADGROUP answer, in order: every
/// `[id, [field, value, ...]]` pair found in it (RESP2 arrays or RESP3
/// maps). Entries deleted meanwhile come without fields and are skipped.
fn entries(v: &Value) -> Batch {
    let mut batch = Batch::default();
    collect(v, &mut batch);
    batch
}

fn collect(v: &Value, batch: &mut Batch) {
    match v {
        Value::Array(items) => {
            if let [Value::BulkString(id), Value::Array(fields)] = items.as_slice()
                && let Some(Value::BulkString(json)) = fields.get(1)
            {
                batch.ids.push(String::from_utf8_lossy(id).into_owned());
                batch.events.push(Bytes::copy_from_slice(json));
                return;
            }
            items.iter().for_each(|i| collect(i, batch));
        }
        Value::Map(pairs) => pairs.iter().for_each(|(_, i)| collect(i, batch)),
        _ => {}
    }
}

#[async_trait]
impl EventQueue for RedisOutbox {
    fn push(&self, event: Event) {
        self.send(Op::Add(event));
    }

    fn occupancy(&self, event: Event, occupied: bool) {
        self.send(Op::Occupancy(event, occupied));
    }

    async fn lead(&self) -> bool {
        self.inner.lead().await
    }

    async fn next(&self, max: usize) -> Result<Batch, BrokerError> {
        self.inner.next(max).await
    }

    async fn ack(&self, batch: &Batch) -> Result<(), BrokerError> {
        if batch.ids.is_empty() {
            return Ok(());
        }
        let keys = &self.inner.keys;
        let mut pipe = redis::pipe();
        pipe.cmd("XACK").arg(&keys.stream).arg(GROUP).arg(&batch.ids).ignore();
        pipe.cmd("XDEL").arg(&keys.stream).arg(&batch.ids).ignore();
        pipe.exec_async(&mut self.inner.conn()).await.map_err(unavailable)
    }

    async fn resign(&self) {
        self.inner.resigned.store(true, Ordering::Release);
        let r = redis::cmd("EVAL")
            .arg(&self.inner.resign)
            .arg(1)
            .arg(&self.inner.keys.lease)
            .arg(&self.inner.node)
            .exec_async(&mut self.inner.conn())
            .await;
        if let Err(e) = r {
            tracing::debug!(error = %e, "giving the webhook lease up failed; it expires");
        }
    }

    async fn depth(&self) -> Option<u64> {
        redis::cmd("XLEN")
            .arg(&self.inner.keys.stream)
            .query_async(&mut self.inner.conn())
            .await
            .ok()
    }

    fn unsaved(&self) -> usize {
        self.inner.unsaved.load(Ordering::Acquire)
    }
}

impl RedisOutbox {
    fn send(&self, op: Op) {
        self.inner.unsaved.fetch_add(1, Ordering::AcqRel);
        if self.tx.try_send(op).is_err() {
            self.inner.unsaved.fetch_sub(1, Ordering::AcqRel);
            let first = self.inner.dropping.fetch_add(1, Ordering::Relaxed) == 0;
            events::dropped(1, first);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn entries_are_read_from_xautoclaim_and_xreadgroup_answers_in_order() {
        let entry = |id: &str, json: &str| {
            Value::Array(vec![bulk(id), Value::Array(vec![bulk("e"), bulk(json)])])
        };
        // XAUTOCLAIM: [cursor, [entries], [deleted ids]]
        let claim = Value::Array(vec![
            bulk("0-0"),
            Value::Array(vec![entry("1-0", "{\"a\":1}"), entry("2-0", "{\"a\":2}")]),
            Value::Array(vec![bulk("3-0")]),
        ]);
        let b = entries(&claim);
        assert_eq!(b.ids, ["1-0", "2-0"]);
        assert_eq!(b.events[1].as_ref(), b"{\"a\":2}");
        // XREADGROUP (RESP2): [[stream, [entries]]]; nil when nothing new.
        let read = Value::Array(vec![Value::Array(vec![
            bulk("s"),
            Value::Array(vec![entry("4-0", "{}")]),
        ])]);
        assert_eq!(entries(&read).ids, ["4-0"]);
        let map = Value::Map(vec![(bulk("s"), Value::Array(vec![entry("5-0", "{}")]))]);
        assert_eq!(entries(&map).ids, ["5-0"]);
        assert!(entries(&Value::Nil).events.is_empty());
    }
}
