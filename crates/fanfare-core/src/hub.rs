//! Channel -> local subscribers, sharded by channel hash.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use bytes::Bytes;
use fanfare_protocol::{Codec, DisconnectCode, Reply};

use crate::coalesce::Coalescer;
use crate::outbox::{Directive, Outbox};

const SHARDS: usize = 64;

/// One connection's subscription to one channel as the hub sees it.
///
/// A subscription starts *syncing*: pushes are held back (with their offsets)
/// while the session reads the channel position or recovers missed
/// publications, so the subscribe reply always precedes the first push and no
/// offset is delivered twice. [`Subscriber::go_live`] releases them.
///
/// Once live, pushes at or below the position the subscriber went live at are
/// still dropped: with an asynchronous broker (Redis) a publication can reach
/// the node after the session's history read already returned it.
#[derive(Debug)]
pub struct Subscriber {
    outbox: Arc<Outbox>,
    /// `SYNCING`, or the offset the subscriber went live after.
    live_after: AtomicU64,
    /// Pushes held while syncing (boxed: most subscribers never hold any).
    held: Mutex<Option<Box<Held>>>,
}

/// Pushes (with their offsets) held back while a subscriber syncs.
type Held = Vec<(u64, Bytes)>;

const SYNCING: u64 = u64::MAX;

/// Whether a push with `offset` (0 = not part of a stream) follows position `after`.
fn is_new(offset: u64, after: u64) -> bool {
    offset == 0 || offset > after
}

impl Subscriber {
    pub fn new(outbox: Arc<Outbox>) -> Self {
        Self { outbox, live_after: AtomicU64::new(SYNCING), held: Mutex::new(None) }
    }

    fn deliver(&self, offset: u64, item: &Bytes, coalescer: Option<&Coalescer>) {
        let after = self.live_after.load(Ordering::Acquire);
        if after != SYNCING {
            if is_new(offset, after) {
                match coalescer {
                    Some(c) => self.outbox.push_deferred(item.clone(), c),
                    None => self.outbox.push(item.clone()),
                };
            }
            return;
        }
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        // Re-check under the lock: go_live sets the position while holding it.
        let after = self.live_after.load(Ordering::Acquire);
        if after == SYNCING {
            held.get_or_insert_default().push((offset, item.clone()));
        } else {
            drop(held);
            if is_new(offset, after) {
                self.outbox.push(item.clone());
            }
        }
    }

    /// Whether this live subscriber, told the stream position `p > 0`,
    /// would miss offsets between it and `offset`.
    fn missed_before(&self, offset: u64) -> bool {
        let after = self.live_after.load(Ordering::Acquire);
        after != SYNCING && after > 0 && offset > after + 1
    }

    /// Ends syncing: queues held pushes newer than `after_offset` (pushes
    /// without an offset always pass) and delivers directly from now on, still
    /// skipping offsets up to `after_offset`.
    pub fn go_live(&self, after_offset: u64) {
        let after_offset = after_offset.min(SYNCING - 1);
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        for (offset, item) in held.take().into_iter().flat_map(|h| *h) {
            if is_new(offset, after_offset) {
                self.outbox.push(item);
            }
        }
        self.live_after.store(after_offset, Ordering::Release);
    }
}

/// A push prepared for fan-out: encoded at most once per codec, then the same
/// `Bytes` is shared by every subscriber using that codec.
pub struct PreparedPush {
    reply: Reply,
    offset: u64,
    /// `None`: the codec cannot carry this push (binary data for JSON clients).
    encoded: [OnceLock<Option<Bytes>>; Codec::COUNT],
}

impl PreparedPush {
    pub fn new(reply: Reply, offset: u64) -> Self {
        Self { reply, offset, encoded: std::array::from_fn(|_| OnceLock::new()) }
    }

    fn get(&self, codec: Codec) -> Option<&Bytes> {
        self.encoded[codec.index()].get_or_init(|| codec.encode(&self.reply).ok()).as_ref()
    }
}

/// Gives memory back once a map shrank to a quarter of its capacity (a
/// channel that had many subscribers, a shard after channel churn). Rehashing
/// costs O(len), paid for by the removals that emptied three quarters.
fn shrink_sparse<K: Eq + std::hash::Hash, V>(m: &mut HashMap<K, V, ahash::RandomState>) {
    if m.capacity() > 64 && m.len() * 4 < m.capacity() {
        m.shrink_to(m.len() * 2);
    }
}

type Subscribers = HashMap<u64, Arc<Subscriber>, ahash::RandomState>;

/// The local subscribers of one channel and the last stream offset this node
/// delivered for it (0 = none yet), to notice gaps in the broker's stream.
#[derive(Default)]
struct ChannelSubs {
    subs: Subscribers,
    last_offset: AtomicU64,
}

type Shard = RwLock<HashMap<Arc<str>, ChannelSubs, ahash::RandomState>>;

/// What [`Hub::fan_out`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FanOut {
    /// Queued for this many local subscribers.
    Delivered(usize),
    /// The offset does not follow the last one delivered: publications were
    /// missed. Nothing was delivered; the caller must evict the subscribers.
    Gap,
}

/// Tracks which local sessions are subscribed to which channel.
///
/// Sharded so that fan-out on one channel does not block subscribe/unsubscribe on
/// channels of other shards. Locks are `std` locks, never held across `.await`.
pub struct Hub {
    shards: Box<[Shard]>,
    hasher: ahash::RandomState,
    /// Set with `client.write_delay`: live pushes wake connections in batches.
    coalescer: Option<Coalescer>,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl Hub {
    pub fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::default())).collect(),
            hasher: ahash::RandomState::new(),
            coalescer: None,
        }
    }

    /// A hub whose live pushes reach connections at most `write_delay` late
    /// and in batches (see `coalesce.rs`); zero means at once.
    pub fn with_write_delay(write_delay: std::time::Duration) -> Self {
        let coalescer = (!write_delay.is_zero()).then(|| Coalescer::new(write_delay));
        Self { coalescer, ..Self::new() }
    }

    fn shard(&self, channel: &str) -> &Shard {
        &self.shards[(self.hasher.hash_one(channel) as usize) % SHARDS]
    }

    /// Adds a subscriber; returns true when it is the channel's first on this node.
    pub fn subscribe(&self, channel: &str, session: u64, sub: Arc<Subscriber>) -> bool {
        let mut shard = self.shard(channel).write().unwrap_or_else(|p| p.into_inner());
        match shard.get_mut(channel) {
            Some(entry) => {
                entry.subs.insert(session, sub);
                false
            }
            None => {
                let mut entry = ChannelSubs::default();
                entry.subs.insert(session, sub);
                shard.insert(Arc::from(channel), entry);
                true
            }
        }
    }

    /// Removes a subscriber; returns true when the channel has no local subscriber left.
    pub fn unsubscribe(&self, channel: &str, session: u64) -> bool {
        let mut shard = self.shard(channel).write().unwrap_or_else(|p| p.into_inner());
        let Some(entry) = shard.get_mut(channel) else { return false };
        if entry.subs.remove(&session).is_none() {
            return false;
        }
        if entry.subs.is_empty() {
            shard.remove(channel);
            shrink_sparse(&mut shard);
            return true;
        }
        shrink_sparse(&mut entry.subs);
        false
    }

    /// Queues `push` for every local subscriber of `channel`.
    ///
    /// Pushes with an offset must continue the channel's stream (previous + 1);
    /// otherwise nothing is delivered and [`FanOut::Gap`] is returned.
    pub fn fan_out(&self, channel: &str, push: &PreparedPush) -> FanOut {
        let shard = self.shard(channel).read().unwrap_or_else(|p| p.into_inner());
        let Some(entry) = shard.get(channel) else { return FanOut::Delivered(0) };
        if push.offset > 0 {
            let prev = entry.last_offset.swap(push.offset, Ordering::AcqRel);
            if prev != 0 && push.offset != prev + 1 {
                return FanOut::Gap;
            }
            // The first push since the channel's entry was (re)created, e.g.
            // after an eviction: it must follow the position each live
            // subscriber was given, or publications in between were lost
            // (a resubscribe whose broker subscription landed late).
            // Subscribers given no position (0) cannot tell.
            if prev == 0 && entry.subs.values().any(|s| s.missed_before(push.offset)) {
                return FanOut::Gap;
            }
        }
        for sub in entry.subs.values() {
            match push.get(sub.outbox.codec()) {
                Some(bytes) => sub.deliver(push.offset, bytes, self.coalescer.as_ref()),
                // A JSON client cannot receive binary data: Centrifugo closes
                // it with 3506 (terminal: the SDK does not reconnect into the
                // same failure), and so does fanfare.
                None => sub.outbox.close(DisconnectCode::INAPPROPRIATE_PROTOCOL),
            }
        }
        FanOut::Delivered(entry.subs.len())
    }

    /// Removes every local subscriber of `channel` and tells each session, so
    /// that no further push reaches them before their SDK resubscribes.
    pub fn evict(&self, channel: &str, code: u32, reason: &'static str) -> usize {
        let entry = {
            let mut shard = self.shard(channel).write().unwrap_or_else(|p| p.into_inner());
            let entry = shard.remove(channel);
            shrink_sparse(&mut shard);
            entry
        };
        let Some(entry) = entry else { return 0 };
        let channel: Arc<str> = Arc::from(channel);
        for sub in entry.subs.values() {
            sub.outbox.push_directive(Directive::Unsubscribed {
                channel: channel.clone(),
                code,
                reason,
            });
        }
        entry.subs.len()
    }

    pub fn has_subscribers(&self, channel: &str) -> bool {
        self.num_subscribers(channel) > 0
    }

    pub fn num_subscribers(&self, channel: &str) -> usize {
        let shard = self.shard(channel).read().unwrap_or_else(|p| p.into_inner());
        shard.get(channel).map_or(0, |s| s.subs.len())
    }

    /// Number of channels with at least one local subscriber.
    pub fn num_channels(&self) -> usize {
        self.shards.iter().map(|s| s.read().unwrap_or_else(|p| p.into_inner()).len()).sum()
    }

    /// Every channel with local subscribers and their count.
    pub fn channels(&self) -> Vec<(Arc<str>, usize)> {
        let mut out = Vec::new();
        for s in self.shards.iter() {
            let s = s.read().unwrap_or_else(|p| p.into_inner());
            out.extend(s.iter().map(|(c, e)| (c.clone(), e.subs.len())));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fanfare_protocol::{Publication, PushBody};

    fn push(offset: u64) -> PreparedPush {
        let p = Publication { data: Bytes::from(offset.to_string()), offset, ..Default::default() };
        PreparedPush::new(Reply::push("c", PushBody::Pub(p)), offset)
    }

    #[test]
    fn holds_pushes_until_live_and_skips_recovered_offsets() {
        let hub = Hub::new();
        let outbox = Arc::new(Outbox::new(Codec::Json, 1 << 20));
        let sub = Arc::new(Subscriber::new(outbox.clone()));
        assert!(hub.subscribe("c", 1, sub.clone()));
        assert_eq!(hub.fan_out("c", &push(5)), FanOut::Delivered(1));
        hub.fan_out("c", &push(6));
        let mut v = Vec::new();
        outbox.drain(&mut v);
        assert!(v.is_empty(), "nothing delivered while syncing");
        sub.go_live(5);
        hub.fan_out("c", &push(7));
        outbox.drain(&mut v);
        let got: Vec<String> = v.iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect();
        assert_eq!(got.len(), 2);
        assert!(got[0].contains("\"offset\":6"));
        assert!(got[1].contains("\"offset\":7"));
        assert_eq!(hub.fan_out("c", &push(9)), FanOut::Gap, "offset 8 is missing");

        // A publication the subscriber already got with its subscribe reply
        // (read from history) that reaches the node late is not delivered again.
        let late = Arc::new(Subscriber::new(outbox.clone()));
        assert!(hub.subscribe("d", 3, late.clone()));
        late.go_live(12);
        let mut v = Vec::new();
        for offset in [11, 12, 13] {
            hub.fan_out("d", &push(offset));
        }
        outbox.drain(&mut v);
        assert_eq!(v.len(), 1, "only offset 13 is new");
        assert!(String::from_utf8_lossy(&v[0]).contains("\"offset\":13"));
        assert!(hub.unsubscribe("d", 3));
        assert!(!hub.subscribe("c", 2, Arc::new(Subscriber::new(outbox.clone()))));
        assert!(!hub.unsubscribe("c", 1));
        assert!(hub.unsubscribe("c", 2));
        assert_eq!(hub.num_channels(), 0);
    }

    #[test]
    fn binary_data_reaches_protobuf_subscribers_and_closes_json_ones_with_3506() {
        let hub = Hub::new();
        let json = Arc::new(Outbox::new(Codec::Json, 1 << 20));
        let proto = Arc::new(Outbox::new(Codec::Protobuf, 1 << 20));
        let proto2 = Arc::new(Outbox::new(Codec::Protobuf, 1 << 20));
        for (id, o) in [(1, &json), (2, &proto), (3, &proto2)] {
            let sub = Arc::new(Subscriber::new(o.clone()));
            hub.subscribe("c", id, sub.clone());
            sub.go_live(0);
        }
        let data = Bytes::from_static(b"\x00\xffbinary");
        let p = Publication { data: data.clone(), offset: 1, ..Default::default() };
        assert_eq!(
            hub.fan_out("c", &PreparedPush::new(Reply::push("c", PushBody::Pub(p)), 1)),
            FanOut::Delivered(3)
        );
        let mut v = Vec::new();
        assert_eq!(proto.drain(&mut v), None);
        let mut v2 = Vec::new();
        proto2.drain(&mut v2);
        assert_eq!(v[0].as_ptr(), v2[0].as_ptr(), "encoded once, shared by both subscribers");
        let mut buf = &v[0][..];
        let reply =
            <fanfare_protocol::pb::Reply as prost::Message>::decode_length_delimited(&mut buf)
                .unwrap();
        assert_eq!(reply.push.unwrap().r#pub.unwrap().data, data, "the exact bytes");
        let mut v = Vec::new();
        assert_eq!(json.drain(&mut v), Some(DisconnectCode::INAPPROPRIATE_PROTOCOL));
        assert!(v.is_empty(), "nothing a JSON client could not parse is queued");
    }

    #[test]
    fn a_jump_right_after_an_eviction_is_a_gap_not_a_new_start() {
        let hub = Hub::new();
        let outbox = Arc::new(Outbox::new(Codec::Json, 1 << 20));
        let sub = Arc::new(Subscriber::new(outbox.clone()));
        hub.subscribe("c", 1, sub.clone());
        sub.go_live(4);
        assert_eq!(hub.fan_out("c", &push(5)), FanOut::Delivered(1));
        assert_eq!(hub.evict("c", 2500, "insufficient state"), 1);
        // The SDK resubscribes and is told position 10; the broker's first
        // delivery since is 13: 11 and 12 never reached this node.
        let again = Arc::new(Subscriber::new(outbox.clone()));
        hub.subscribe("c", 1, again.clone());
        again.go_live(10);
        assert_eq!(hub.fan_out("c", &push(13)), FanOut::Gap);
        // Whereas the next offset after the position is a normal start.
        hub.evict("c", 2500, "insufficient state");
        let third = Arc::new(Subscriber::new(outbox.clone()));
        hub.subscribe("c", 1, third.clone());
        third.go_live(12);
        assert_eq!(hub.fan_out("c", &push(13)), FanOut::Delivered(1));
    }
}

#[cfg(test)]
mod shrink_tests {
    use super::*;

    #[test]
    fn maps_give_memory_back_after_churn() {
        let hub = Hub::new();
        let outbox = Arc::new(Outbox::new(Codec::Json, 1 << 20));
        for i in 0..20_000 {
            hub.subscribe(&format!("c{i}"), 1, Arc::new(Subscriber::new(outbox.clone())));
        }
        for s in 0..5_000 {
            hub.subscribe("busy", s, Arc::new(Subscriber::new(outbox.clone())));
        }
        for i in 0..20_000 {
            hub.unsubscribe(&format!("c{i}"), 1);
        }
        for s in 1..5_000 {
            hub.unsubscribe("busy", s);
        }
        let capacity: usize =
            hub.shards.iter().map(|s| s.read().unwrap_or_else(|p| p.into_inner()).capacity()).sum();
        assert!(capacity <= SHARDS * 64, "channel maps kept {capacity} slots");
        let shard = hub.shard("busy").read().unwrap_or_else(|p| p.into_inner());
        assert!(shard["busy"].subs.capacity() <= 64, "{}", shard["busy"].subs.capacity());
    }
}

#[cfg(test)]
mod evict_tests {
    use super::*;

    #[test]
    fn evict_removes_subscribers_and_tells_sessions() {
        let hub = Hub::new();
        let outbox = Arc::new(Outbox::new(Codec::Json, 1 << 20));
        hub.subscribe("c", 1, Arc::new(Subscriber::new(outbox.clone())));
        assert_eq!(hub.evict("c", 2500, "insufficient state"), 1);
        assert!(!hub.has_subscribers("c"));
        assert_eq!(
            outbox.take_directives(),
            vec![Directive::Unsubscribed {
                channel: "c".into(),
                code: 2500,
                reason: "insufficient state"
            }]
        );
    }
}
