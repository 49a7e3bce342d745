//! In-process broker for a single node.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use fanfare_protocol::{ClientInfo, Publication, StreamPosition};
use indexmap::IndexMap;

use crate::broker::{
    Broker, BrokerError, BrokerHandler, HistoryPage, HistoryQuery, NodeInfo, PublishOptions, Sweep,
};

const SHARDS: usize = 32;

/// Channels one sweep visits per shard: bounds how long a shard stays locked
/// and the work per tick (a full pass over n channels takes n / 32 768 ticks).
const SWEEP_PER_SHARD: usize = 1024;

/// Memory broker settings (`memory.*`).
#[derive(Debug, Clone)]
pub struct MemoryConfig {
    /// How long a stream's offset and epoch outlive its last publication (at
    /// least its history TTL), its creation, or its last subscriber on this
    /// node leaving; a stream with subscribers here is kept regardless.
    pub history_meta_ttl: Duration,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        // Shorter than `redis.history_meta_ttl` (24 h): every channel touched
        // within it stays in this process's memory (ARCHITECTURE.md, 21).
        Self { history_meta_ttl: Duration::from_secs(3600) }
    }
}

#[derive(Debug)]
struct Stream {
    epoch: String,
    top: u64,
    items: VecDeque<(Instant, Publication)>,
    /// History TTL of the last publication.
    ttl: Duration,
    /// Epoch and top are kept at least until then: the meta TTL after the
    /// last publication, the creation, or the last local subscriber leaving.
    keep_until: Instant,
}

impl Stream {
    fn new(now: Instant) -> Self {
        Self { epoch: new_epoch(), ..Self::absent(now) }
    }

    /// What a channel without stream answers: offset 0, no epoch.
    fn absent(now: Instant) -> Self {
        Self {
            epoch: String::new(),
            top: 0,
            items: VecDeque::new(),
            ttl: Duration::ZERO,
            keep_until: now,
        }
    }

    /// Drops publications older than the TTL, and the buffer once empty;
    /// returns the bytes of data dropped.
    fn expire(&mut self, now: Instant) -> usize {
        let mut dropped = 0;
        while let Some((at, p)) = self.items.front() {
            if now.duration_since(*at) >= self.ttl {
                dropped += p.data.len();
                self.items.pop_front();
            } else {
                break;
            }
        }
        if self.items.is_empty() {
            self.items = VecDeque::new();
        } else if self.items.capacity() > 16 && self.items.len() * 4 < self.items.capacity() {
            self.items.shrink_to(self.items.len() * 2);
        }
        dropped
    }

    fn position(&self) -> StreamPosition {
        StreamPosition { offset: self.top, epoch: self.epoch.clone() }
    }

    /// The publications `query` asks for, and whether they are complete.
    fn read(&self, query: &HistoryQuery) -> (Vec<Publication>, bool) {
        let mut complete = true;
        let after = match &query.since {
            // Not a position of this stream (a client cannot be ahead of it):
            // nothing follows it.
            Some(since) if since.epoch != self.epoch || since.offset > self.top => {
                return (Vec::new(), false);
            }
            Some(since) => {
                // The first kept offset must directly follow `since`.
                let first_kept = self.items.front().map_or(self.top + 1, |(_, p)| p.offset);
                if since.offset + 1 < first_kept {
                    complete = false;
                }
                since.offset
            }
            None => 0,
        };
        let limit = query.limit.unwrap_or(usize::MAX);
        let matching = self.items.iter().map(|(_, p)| p).filter(|p| p.offset > after);
        let publications = if query.reverse {
            let mut v: Vec<_> = matching.cloned().collect();
            v.reverse();
            v.truncate(limit);
            v
        } else {
            matching.take(limit).cloned().collect()
        };
        (publications, complete)
    }
}

fn new_epoch() -> String {
    let n: u32 = rand::random();
    format!("{n:08x}")
}

/// Gives memory back when a map emptied or shrank to a quarter of its
/// capacity (an emptied presence map kept ~600 B per channel).
fn shrink_sparse<K: Eq + Hash, V, S: BuildHasher>(m: &mut HashMap<K, V, S>) {
    if m.is_empty() {
        m.shrink_to_fit();
    } else if m.capacity() > 16 && m.len() * 4 < m.capacity() {
        m.shrink_to(m.len() * 2);
    }
}

/// What the broker keeps for one channel. The entry goes once it holds
/// nothing anyone could still need (see [`Channel::is_idle`]).
#[derive(Default)]
struct Channel {
    stream: Option<Stream>,
    /// client id -> info and when it expires.
    presence: HashMap<String, (ClientInfo, Instant)>,
    /// idempotency key -> first result and when it expires.
    idempotency: HashMap<String, (StreamPosition, Instant)>,
}

impl Channel {
    /// Drops what expired; returns the bytes of publication data dropped.
    fn expire(&mut self, now: Instant) -> usize {
        let dropped = self.stream.as_mut().map_or(0, |s| s.expire(now));
        self.presence.retain(|_, (_, until)| *until > now);
        shrink_sparse(&mut self.presence);
        self.idempotency.retain(|_, (_, until)| *until > now);
        shrink_sparse(&mut self.idempotency);
        dropped
    }

    /// Nothing is kept by time any more: the entry may go unless a local
    /// subscriber holds a position in its stream.
    fn is_idle(&self, now: Instant) -> bool {
        self.presence.is_empty()
            && self.idempotency.is_empty()
            && self.stream.as_ref().is_none_or(|s| s.items.is_empty() && s.keep_until <= now)
    }
}

#[derive(Default)]
struct Shard {
    channels: IndexMap<String, Channel, ahash::RandomState>,
    /// Index where the next sweep of this shard starts.
    cursor: usize,
}

impl Shard {
    fn channel_mut(&mut self, channel: &str) -> &mut Channel {
        // Looked up first: `entry` would allocate the key on every call.
        match self.channels.get_index_of(channel) {
            Some(i) => &mut self.channels[i],
            None => self.channels.entry(channel.to_string()).or_default(),
        }
    }
}

/// Keeps history and presence in memory and delivers publications to this node
/// synchronously, in publish order (delivery happens under the channel's shard
/// lock, right after the offset is assigned).
///
/// A channel's state is freed when nothing in it is needed any more:
/// publications when their history TTL passes, the stream's epoch and offset
/// when nobody on this node is subscribed and `history_meta_ttl` passed since
/// its last publication, its creation and its last local subscriber leaving,
/// presence and idempotency entries when they expire. [`MemoryBroker::sweep_at`]
/// does this a bounded number of channels at a time; reads of a channel
/// without stream or subscribers create nothing.
///
/// Nothing survives a restart: a new process starts new epochs, so clients
/// recovering across a restart are told `recovered: false`.
pub struct MemoryBroker {
    config: MemoryConfig,
    shards: Box<[Mutex<Shard>]>,
    hasher: ahash::RandomState,
    handler: OnceLock<Arc<dyn BrokerHandler>>,
    node: Mutex<Option<NodeInfo>>,
    /// Publication bytes dropped for their TTL since the last sweep.
    expired_bytes: AtomicUsize,
}

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBroker {
    pub fn new() -> Self {
        Self::with_config(MemoryConfig::default())
    }

    pub fn with_config(config: MemoryConfig) -> Self {
        Self {
            config,
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: ahash::RandomState::new(),
            handler: OnceLock::new(),
            node: Mutex::new(None),
            expired_bytes: AtomicUsize::new(0),
        }
    }

    fn shard(&self, channel: &str) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[(self.hasher.hash_one(channel) as usize) % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn handler(&self) -> Option<&Arc<dyn BrokerHandler>> {
        self.handler.get()
    }

    /// Called under the channel's shard lock: a session joins the hub before
    /// it reads the position, so a subscriber that was handed an epoch is seen
    /// here, and one that joins later reads after this lock is released.
    fn has_subscribers(&self, channel: &str) -> bool {
        self.handler().is_some_and(|h| h.has_subscribers(channel))
    }

    /// Removes `channel` from `shard` when it is idle and nobody here holds a
    /// position in its stream.
    fn remove_if_idle(&self, shard: &mut Shard, channel: &str, now: Instant) {
        let Some(c) = shard.channels.get(channel) else { return };
        if c.is_idle(now) && (c.stream.is_none() || !self.has_subscribers(channel)) {
            shard.channels.swap_remove(channel);
        }
    }

    /// Expires and frees state of up to `SWEEP_PER_SHARD` channels per shard,
    /// continuing where the previous sweep stopped.
    pub fn sweep_at(&self, now: Instant) -> Sweep {
        let mut out = Sweep::default();
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            let n = shard.channels.len().min(SWEEP_PER_SHARD);
            for _ in 0..n {
                if shard.channels.is_empty() {
                    break;
                }
                if shard.cursor >= shard.channels.len() {
                    shard.cursor = 0;
                }
                let i = shard.cursor;
                let (name, c) = shard.channels.get_index_mut(i).expect("cursor is in range");
                let dropped = c.expire(now);
                out.expired_bytes += dropped;
                let free = c.is_idle(now) && (c.stream.is_none() || !self.has_subscribers(name));
                if free {
                    // The last entry moves to `i` and is visited next.
                    shard.channels.swap_remove_index(i);
                    out.freed += 1;
                } else {
                    shard.cursor += 1;
                }
            }
            let (len, cap) = (shard.channels.len(), shard.channels.capacity());
            if cap > 64 && len * 4 < cap {
                shard.channels.shrink_to(len * 2);
            }
            out.kept += len;
        }
        out.expired_bytes += self.expired_bytes.swap(0, Ordering::Relaxed);
        out
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    fn set_handler(&self, handler: Arc<dyn BrokerHandler>) {
        let _ = self.handler.set(handler);
    }

    async fn publish(
        &self,
        channel: &str,
        mut publication: Publication,
        opts: PublishOptions,
    ) -> Result<StreamPosition, BrokerError> {
        let mut shard = self.shard(channel);
        let now = Instant::now();
        if let Some(key) = &opts.idempotency_key
            && let Some((pos, until)) =
                shard.channels.get(channel).and_then(|c| c.idempotency.get(key))
            && *until > now
        {
            return Ok(pos.clone());
        }
        let position = if opts.history_size > 0 && !opts.history_ttl.is_zero() {
            let keep = self.config.history_meta_ttl.max(opts.history_ttl);
            let stream = shard.channel_mut(channel).stream.get_or_insert_with(|| Stream::new(now));
            stream.ttl = opts.history_ttl;
            stream.keep_until = now + keep;
            stream.top += 1;
            publication.offset = stream.top;
            stream.items.push_back((now, publication.clone()));
            while stream.items.len() > opts.history_size {
                stream.items.pop_front();
            }
            let dropped = stream.expire(now);
            self.expired_bytes.fetch_add(dropped, Ordering::Relaxed);
            stream.position()
        } else {
            StreamPosition::default()
        };
        if let Some(key) = opts.idempotency_key
            && !opts.idempotency_window.is_zero()
        {
            let until = now + opts.idempotency_window;
            shard.channel_mut(channel).idempotency.insert(key, (position.clone(), until));
        }
        if let Some(h) = self.handler() {
            h.on_publication(channel, publication);
        }
        drop(shard);
        Ok(position)
    }

    async fn publish_join(&self, channel: &str, info: ClientInfo) -> Result<(), BrokerError> {
        let _order = self.shard(channel);
        if let Some(h) = self.handler() {
            h.on_join(channel, info);
        }
        Ok(())
    }

    async fn publish_leave(&self, channel: &str, info: ClientInfo) -> Result<(), BrokerError> {
        let _order = self.shard(channel);
        if let Some(h) = self.handler() {
            h.on_leave(channel, info);
        }
        Ok(())
    }

    async fn subscribe(&self, _channel: &str) -> Result<(), BrokerError> {
        Ok(())
    }

    /// The node's last local subscriber left: the position it was told stays
    /// valid for the meta TTL from now, so the client can come back and recover.
    async fn unsubscribe(&self, channel: &str) -> Result<(), BrokerError> {
        let mut shard = self.shard(channel);
        let now = Instant::now();
        if let Some(s) = shard.channels.get_mut(channel).and_then(|c| c.stream.as_mut()) {
            s.keep_until = s.keep_until.max(now + self.config.history_meta_ttl);
        }
        self.remove_if_idle(&mut shard, channel, now);
        Ok(())
    }

    async fn history(
        &self,
        channel: &str,
        query: HistoryQuery,
    ) -> Result<HistoryPage, BrokerError> {
        let mut shard = self.shard(channel);
        let now = Instant::now();
        let known = shard.channels.get(channel).is_some_and(|c| c.stream.is_some());
        if !known && !self.has_subscribers(channel) {
            // Nobody here would keep the position: answer without creating state.
            let absent = Stream::absent(now);
            let (publications, complete) = absent.read(&query);
            return Ok(HistoryPage { publications, position: absent.position(), complete });
        }
        // A subscriber reading the position of a new channel gets an epoch that
        // stays while it is subscribed and the meta TTL after.
        let meta_ttl = self.config.history_meta_ttl;
        let stream = shard
            .channel_mut(channel)
            .stream
            .get_or_insert_with(|| Stream { keep_until: now + meta_ttl, ..Stream::new(now) });
        let dropped = stream.expire(now);
        self.expired_bytes.fetch_add(dropped, Ordering::Relaxed);
        let (publications, complete) = stream.read(&query);
        Ok(HistoryPage { publications, position: stream.position(), complete })
    }

    async fn remove_history(&self, channel: &str) -> Result<(), BrokerError> {
        let mut shard = self.shard(channel);
        if let Some(s) = shard.channels.get_mut(channel).and_then(|c| c.stream.as_mut()) {
            // A new deque, not `clear`: the buffer's memory goes too.
            s.items = VecDeque::new();
        }
        Ok(())
    }

    async fn add_presence(
        &self,
        channel: &str,
        info: ClientInfo,
        ttl: Duration,
    ) -> Result<(), BrokerError> {
        let mut shard = self.shard(channel);
        let until = Instant::now() + ttl;
        shard.channel_mut(channel).presence.insert(info.client.to_string(), (info, until));
        Ok(())
    }

    async fn remove_presence(&self, channel: &str, client: &str) -> Result<(), BrokerError> {
        let mut shard = self.shard(channel);
        let Some(c) = shard.channels.get_mut(channel) else { return Ok(()) };
        c.presence.remove(client);
        shrink_sparse(&mut c.presence);
        self.remove_if_idle(&mut shard, channel, Instant::now());
        Ok(())
    }

    async fn presence(&self, channel: &str) -> Result<BTreeMap<String, ClientInfo>, BrokerError> {
        let shard = self.shard(channel);
        let now = Instant::now();
        Ok(shard
            .channels
            .get(channel)
            .map(|c| {
                c.presence
                    .iter()
                    .filter(|(_, (_, until))| *until > now)
                    .map(|(k, (v, _))| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn presence_stats(&self, channel: &str) -> Result<(u32, u32), BrokerError> {
        let shard = self.shard(channel);
        let now = Instant::now();
        let Some(c) = shard.channels.get(channel) else {
            return Ok((0, 0));
        };
        let live = || c.presence.values().filter(|(_, until)| *until > now);
        let users: HashSet<&str> = live().map(|(i, _)| &*i.user).collect();
        Ok((live().count() as u32, users.len() as u32))
    }

    async fn publish_control(&self, message: bytes::Bytes) -> Result<(), BrokerError> {
        if let Some(h) = self.handler() {
            h.on_control(message);
        }
        Ok(())
    }

    async fn announce(&self, info: &NodeInfo, _ttl: Duration) -> Result<(), BrokerError> {
        *self.node.lock().unwrap_or_else(|p| p.into_inner()) = Some(info.clone());
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>, BrokerError> {
        Ok(self.node.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect())
    }

    fn sweep(&self) -> Option<Sweep> {
        Some(self.sweep_at(Instant::now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn opts() -> PublishOptions {
        PublishOptions {
            history_size: 3,
            history_ttl: Duration::from_secs(60),
            ..Default::default()
        }
    }

    fn publication(n: u8) -> Publication {
        Publication { data: Bytes::from(vec![b'0' + n]), ..Default::default() }
    }

    #[tokio::test]
    async fn removed_history_keeps_the_position_and_recovery_is_incomplete() {
        let b = MemoryBroker::new();
        let mut pos = StreamPosition::default();
        for n in 1..=3 {
            pos = b.publish("c", publication(n), opts()).await.unwrap();
        }
        b.remove_history("c").await.unwrap();
        b.remove_history("never-published").await.unwrap();
        let since = |offset| HistoryQuery {
            since: Some(StreamPosition { offset, epoch: pos.epoch.clone() }),
            ..Default::default()
        };
        let page = b.history("c", since(1)).await.unwrap();
        assert!(page.publications.is_empty());
        assert_eq!(page.position, pos);
        assert!(!page.complete, "offsets 2 and 3 are gone");
        assert!(b.history("c", since(3)).await.unwrap().complete, "nothing after the top");
        assert_eq!(b.publish("c", publication(4), opts()).await.unwrap().offset, 4);
    }

    #[tokio::test]
    async fn history_offsets_and_recovery_completeness() {
        let b = MemoryBroker::new();
        let mut pos = StreamPosition::default();
        for n in 1..=5 {
            pos = b.publish("c", publication(n), opts()).await.unwrap();
        }
        assert_eq!(pos.offset, 5);
        // Kept: offsets 3, 4, 5.
        let page = b
            .history(
                "c",
                HistoryQuery {
                    since: Some(StreamPosition { offset: 2, epoch: pos.epoch.clone() }),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert!(page.complete);
        assert_eq!(page.publications.iter().map(|p| p.offset).collect::<Vec<_>>(), vec![3, 4, 5]);
        let page = b
            .history(
                "c",
                HistoryQuery {
                    since: Some(StreamPosition { offset: 1, epoch: pos.epoch.clone() }),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert!(!page.complete, "offset 2 is gone");
        let page = b
            .history(
                "c",
                HistoryQuery {
                    since: Some(StreamPosition { offset: 4, epoch: "other".into() }),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert!(!page.complete, "epoch changed");
        let page = b
            .history("c", HistoryQuery { limit: Some(2), reverse: true, ..Default::default() })
            .await
            .unwrap();
        assert_eq!(page.publications.iter().map(|p| p.offset).collect::<Vec<_>>(), vec![5, 4]);
    }

    /// Stands in for the node: which channels have local subscribers.
    #[derive(Default)]
    struct Subscribed(Mutex<HashSet<String>>);

    impl Subscribed {
        fn set(&self, channel: &str, on: bool) {
            let mut s = self.0.lock().unwrap();
            if on {
                s.insert(channel.to_string());
            } else {
                s.remove(channel);
            }
        }
    }

    impl BrokerHandler for Subscribed {
        fn on_publication(&self, _: &str, _: Publication) {}
        fn on_join(&self, _: &str, _: ClientInfo) {}
        fn on_leave(&self, _: &str, _: ClientInfo) {}
        fn on_gap(&self, _: &str) {}
        fn has_subscribers(&self, channel: &str) -> bool {
            self.0.lock().unwrap().contains(channel)
        }
        fn on_control(&self, _: Bytes) {}
    }

    fn broker(meta_ttl: Duration) -> (MemoryBroker, Arc<Subscribed>) {
        let b = MemoryBroker::with_config(MemoryConfig { history_meta_ttl: meta_ttl });
        let subs = Arc::new(Subscribed::default());
        b.set_handler(subs.clone());
        (b, subs)
    }

    fn since(offset: u64, epoch: &str) -> HistoryQuery {
        HistoryQuery {
            since: Some(StreamPosition { offset, epoch: epoch.into() }),
            ..Default::default()
        }
    }

    fn position_only() -> HistoryQuery {
        HistoryQuery { limit: Some(0), ..Default::default() }
    }

    fn freed_kept(s: Sweep) -> (usize, usize) {
        (s.freed, s.kept)
    }

    fn kept(b: &MemoryBroker) -> usize {
        b.shards.iter().map(|s| s.lock().unwrap().channels.len()).sum()
    }

    #[tokio::test]
    async fn history_since_beyond_the_top_reads_nothing_and_is_incomplete() {
        let (b, _) = broker(Duration::from_secs(60));
        let mut pos = StreamPosition::default();
        for n in 1..=3 {
            pos = b.publish("c", publication(n), opts()).await.unwrap();
        }
        let page = b.history("c", since(999_999, &pos.epoch)).await.unwrap();
        assert!(page.publications.is_empty(), "{page:?}");
        assert!(!page.complete, "a client cannot be ahead of the stream");
        assert_eq!(page.position, pos);
        let page =
            b.history("c", HistoryQuery { reverse: true, ..since(999_999, &pos.epoch) }).await;
        assert!(page.unwrap().publications.is_empty());
        // At the top exactly: nothing missed, recovered.
        let page = b.history("c", since(3, &pos.epoch)).await.unwrap();
        assert!(page.publications.is_empty() && page.complete, "{page:?}");
    }

    #[tokio::test]
    async fn reading_a_channel_nobody_subscribed_to_creates_no_state() {
        let (b, _) = broker(Duration::from_secs(60));
        for i in 0..1000 {
            let page = b.history(&format!("c{i}"), position_only()).await.unwrap();
            assert_eq!(page.position, StreamPosition::default());
            assert!(page.complete);
        }
        assert_eq!(kept(&b), 0);
        let page = b.history("c1", since(0, "")).await.unwrap();
        assert!(page.complete, "nothing was published after offset 0");
        assert!(!b.history("c1", since(0, "e")).await.unwrap().complete);
    }

    #[tokio::test]
    async fn an_epoch_handed_to_a_subscriber_holds_while_subscribed_and_the_meta_ttl_after() {
        let meta_ttl = Duration::from_secs(300);
        let (b, subs) = broker(meta_ttl);
        subs.set("c", true);
        let first = b.history("c", position_only()).await.unwrap().position;
        assert_eq!(first.offset, 0);
        assert!(!first.epoch.is_empty());
        // Sweeps, however late, keep what a subscriber holds.
        let later = Instant::now() + Duration::from_secs(3600);
        assert_eq!(b.sweep_at(later).freed, 0);
        assert_eq!(b.history("c", position_only()).await.unwrap().position, first);

        // The subscriber leaves without anything published; its client may
        // come back and recover from offset 0 within the meta TTL.
        subs.set("c", false);
        b.unsubscribe("c").await.unwrap();
        let left = Instant::now();
        assert_eq!(freed_kept(b.sweep_at(left + meta_ttl - Duration::from_secs(1))), (0, 1));
        let pos = b.publish("c", publication(1), opts()).await.unwrap();
        assert_eq!((pos.offset, &pos.epoch), (1, &first.epoch), "no epoch switch under it");
        let page = b.history("c", since(0, &first.epoch)).await.unwrap();
        assert!(page.complete && page.publications.len() == 1, "{page:?}");

        // Nobody subscribed, nothing published within the meta TTL: freed.
        subs.set("d", true);
        b.history("d", position_only()).await.unwrap();
        subs.set("d", false);
        b.unsubscribe("d").await.unwrap();
        assert_eq!(kept(&b), 2);
        subs.set("c", true);
        let sweep = b.sweep_at(Instant::now() + meta_ttl + Duration::from_secs(1));
        assert_eq!(freed_kept(sweep), (1, 1), "d goes; c has a subscriber again");
        assert_eq!(b.shard("c").channels.len(), 1);
    }

    #[tokio::test]
    async fn sweep_frees_history_after_its_ttl_and_the_stream_after_its_meta_ttl() {
        let (b, subs) = broker(Duration::from_secs(300));
        let now = Instant::now();
        let pos = b.publish("c", publication(1), opts()).await.unwrap();
        assert_eq!(freed_kept(b.sweep_at(now)), (0, 1));
        // The publication expired (60 s); the position is still known.
        let sweep = b.sweep_at(now + Duration::from_secs(61));
        assert_eq!((sweep.freed, sweep.kept, sweep.expired_bytes), (0, 1, 1));
        {
            let shard = b.shard("c");
            let stream = shard.channels.get("c").unwrap().stream.as_ref().unwrap();
            assert!(stream.items.is_empty() && stream.items.capacity() == 0);
        }
        let page = b.history("c", since(0, &pos.epoch)).await.unwrap();
        assert_eq!(page.position, pos);
        assert!(!page.complete, "offset 1 expired");
        // Past the meta TTL a subscriber still keeps it; without one it goes.
        subs.set("c", true);
        let late = now + Duration::from_secs(301);
        assert_eq!(freed_kept(b.sweep_at(late)), (0, 1));
        subs.set("c", false);
        assert_eq!(freed_kept(b.sweep_at(late)), (1, 0));
        // A new stream, a new epoch: the old position cannot be recovered.
        let again = b.publish("c", publication(2), opts()).await.unwrap();
        assert_eq!(again.offset, 1);
        assert_ne!(again.epoch, pos.epoch);
    }

    #[tokio::test]
    async fn presence_and_idempotency_entries_expire_and_free_their_channel() {
        let (b, _) = broker(Duration::from_secs(60));
        let info = |client: &str| ClientInfo {
            client: client.into(),
            user: "u".into(),
            ..Default::default()
        };
        b.add_presence("p", info("a"), Duration::from_secs(10)).await.unwrap();
        b.add_presence("p", info("b"), Duration::from_secs(10)).await.unwrap();
        b.remove_presence("p", "a").await.unwrap();
        assert_eq!(b.presence_stats("p").await.unwrap(), (1, 1));
        let keyed = PublishOptions {
            idempotency_key: Some("k".into()),
            idempotency_window: Duration::from_secs(5),
            ..Default::default()
        };
        b.publish("i", publication(1), keyed.clone()).await.unwrap();
        assert_eq!(kept(&b), 2);
        let now = Instant::now();
        assert_eq!(freed_kept(b.sweep_at(now + Duration::from_secs(6))), (1, 1));
        assert_eq!(freed_kept(b.sweep_at(now + Duration::from_secs(11))), (1, 0));
        // Removing the last presence entry frees the channel at once.
        b.add_presence("q", info("a"), Duration::from_secs(10)).await.unwrap();
        b.remove_presence("q", "a").await.unwrap();
        assert_eq!(kept(&b), 0);
    }

    #[tokio::test]
    async fn one_sweep_visits_a_bounded_number_of_channels_and_later_ones_finish() {
        let (b, _) = broker(Duration::ZERO);
        let n = SHARDS * SWEEP_PER_SHARD * 2;
        for i in 0..n {
            b.publish(&format!("c{i}"), publication(1), opts()).await.unwrap();
        }
        let late = Instant::now() + Duration::from_secs(61);
        let first = b.sweep_at(late);
        assert!(first.freed <= SHARDS * SWEEP_PER_SHARD, "{first:?}");
        assert!(first.freed > 0);
        let mut freed = first.freed;
        for _ in 0..4 {
            freed += b.sweep_at(late).freed;
        }
        assert_eq!(freed, n);
        assert_eq!(kept(&b), 0);
        let capacity: usize = b.shards.iter().map(|s| s.lock().unwrap().channels.capacity()).sum();
        assert!(capacity <= SHARDS * 64, "maps gave their memory back: {capacity}");
    }
}
