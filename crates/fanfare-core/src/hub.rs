//! Channel -> local subscribers, sharded by channel hash.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use bytes::Bytes;
use fanfare_protocol::{Codec, DisconnectCode, Publication, Push, PushBody, Reply, ReplyBody};

use crate::coalesce::Coalescer;
use crate::delta;
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
///
/// A subscription that negotiated delta compression (`delta.rs`) gets a
/// publication as a delta only when the client holds the publication right
/// before it: the one it was last sent (live, or last in its recovered
/// list). Anything else — the first publication after subscribing without
/// recovery, after a recovery that returned nothing, after a publication
/// without offset — goes in full, and the next one may be a delta again.
#[derive(Debug)]
pub struct Subscriber {
    outbox: Arc<Outbox>,
    /// `SYNCING`, or the offset the subscriber went live after.
    live_after: AtomicU64,
    /// Pushes held while syncing (boxed: most subscribers never hold any).
    held: Mutex<Option<Box<Held>>>,
    /// `NO_DELTA`, or the offset of the publication the client holds as the
    /// base of the next delta (0 = none). Written only by the channel's
    /// fan-out (one at a time per channel) and by `go_live` before it
    /// publishes `live_after`.
    delta_base: AtomicU64,
}

/// Pushes held back while a subscriber syncs: offset, full form, and the
/// delta form for a delta subscription (which one goes is decided at
/// `go_live`, when the client's base is known).
type Held = Vec<(u64, Bytes, Option<Bytes>)>;

const SYNCING: u64 = u64::MAX;
const NO_DELTA: u64 = u64::MAX;

/// Whether a push with `offset` (0 = not part of a stream) follows position `after`.
fn is_new(offset: u64, after: u64) -> bool {
    offset == 0 || offset > after
}

impl Subscriber {
    pub fn new(outbox: Arc<Outbox>) -> Self {
        Self::with_delta(outbox, false)
    }

    /// A subscriber that negotiated delta compression (`delta`) or not.
    pub fn with_delta(outbox: Arc<Outbox>, delta: bool) -> Self {
        Self {
            outbox,
            live_after: AtomicU64::new(SYNCING),
            held: Mutex::new(None),
            delta_base: AtomicU64::new(if delta { 0 } else { NO_DELTA }),
        }
    }

    /// Whether publications reach this subscriber in their delta forms.
    fn takes_delta(&self) -> bool {
        self.delta_base.load(Ordering::Relaxed) != NO_DELTA
    }

    /// The form of a push to queue, moving the delta base along: the delta
    /// when the client holds the publication just before it. `None`: the
    /// codec cannot carry the push at all.
    fn choose(&self, offset: u64, offer: &Offer<'_>) -> Option<Bytes> {
        // Plain first: a subscription without delta pays no atomic load here.
        if matches!(offer, Offer::Plain(_)) {
            return offer.full();
        }
        let base = self.delta_base.load(Ordering::Acquire);
        if base == NO_DELTA {
            return offer.full();
        }
        // No offset, no base: the next publication cannot be checked against it.
        self.delta_base.store(offset, Ordering::Release);
        if base > 0 && offset == base + 1 {
            // Only the form this subscriber takes is built.
            if let Some(d) = offer.delta() {
                return Some(d);
            }
        }
        offer.full()
    }

    /// Queues a push or holds it while syncing. A push the subscriber's
    /// codec cannot carry (binary data for a JSON client) closes it with
    /// 3506 instead: Centrifugo does the same (terminal, so the SDK does not
    /// reconnect into the same failure).
    fn deliver(&self, offset: u64, offer: Offer<'_>, coalescer: Option<&Coalescer>) {
        let after = self.live_after.load(Ordering::Acquire);
        if after != SYNCING {
            if is_new(offset, after) {
                match self.choose(offset, &offer) {
                    Some(item) => {
                        match coalescer {
                            Some(c) => self.outbox.push_deferred(item, c),
                            None => self.outbox.push(item),
                        };
                    }
                    None => self.outbox.close(DisconnectCode::INAPPROPRIATE_PROTOCOL),
                }
            }
            return;
        }
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        // Re-check under the lock: go_live sets the position while holding it.
        let after = self.live_after.load(Ordering::Acquire);
        if after == SYNCING {
            // Which form goes is known only at go_live: keep both.
            match offer.full() {
                Some(full) => held.get_or_insert_default().push((offset, full, offer.delta())),
                None => self.outbox.close(DisconnectCode::INAPPROPRIATE_PROTOCOL),
            }
        } else {
            drop(held);
            if is_new(offset, after) {
                match self.choose(offset, &offer) {
                    Some(item) => {
                        self.outbox.push(item);
                    }
                    None => self.outbox.close(DisconnectCode::INAPPROPRIATE_PROTOCOL),
                }
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
        self.go_live_with_base(after_offset, 0);
    }

    /// [`Subscriber::go_live`] for a delta subscription whose client holds
    /// the publication at `delta_base` (the last one of its subscribe reply;
    /// 0 = none), so the publication after it may come as a delta.
    pub fn go_live_with_base(&self, after_offset: u64, delta_base: u64) {
        let after_offset = after_offset.min(SYNCING - 1);
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if self.takes_delta() {
            self.delta_base.store(delta_base.min(NO_DELTA - 1), Ordering::Release);
        }
        for (offset, full, delta) in held.take().into_iter().flat_map(|h| *h) {
            if is_new(offset, after_offset)
                && let Some(item) = self.choose(offset, &Offer::Ready(&full, delta.as_ref()))
            {
                self.outbox.push(item);
            }
        }
        self.live_after.store(after_offset, Ordering::Release);
    }
}

/// What a subscriber is offered for one push.
enum Offer<'a> {
    /// The same bytes whatever the subscriber's state (`None`: the codec
    /// cannot carry the push).
    Plain(Option<&'a Bytes>),
    /// A publication for a delta subscription: forms built on first demand.
    Lazy(&'a PreparedPush, Codec),
    /// Both forms of a held publication (full, delta).
    Ready(&'a Bytes, Option<&'a Bytes>),
}

impl Offer<'_> {
    fn full(&self) -> Option<Bytes> {
        match self {
            Offer::Plain(b) => b.cloned(),
            Offer::Lazy(push, codec) => push.delta_full(*codec).cloned(),
            Offer::Ready(full, _) => Some((*full).clone()),
        }
    }

    fn delta(&self) -> Option<Bytes> {
        match self {
            Offer::Plain(_) => None,
            Offer::Lazy(push, codec) => push.delta_patch(*codec).cloned(),
            Offer::Ready(_, delta) => delta.cloned(),
        }
    }
}

/// A push prepared for fan-out: encoded at most once per codec, then the same
/// `Bytes` is shared by every subscriber using that codec. A publication
/// also has the forms delta subscriptions take, likewise encoded at most once
/// per codec and form.
pub struct PreparedPush {
    reply: Reply,
    offset: u64,
    /// `None`: the codec cannot carry this push (binary data for JSON clients).
    encoded: [OnceLock<Option<Bytes>>; Codec::COUNT],
    /// Built at the first delta subscriber (boxed: most pushes never need it).
    delta: OnceLock<Box<DeltaForms>>,
}

/// A publication's forms for delta subscriptions (see `delta.rs`).
struct DeltaForms {
    /// Fossil delta against the channel's previous publication: `None` when
    /// that one is unknown here or the delta would not be shorter.
    patch: Option<Bytes>,
    full: [OnceLock<Option<Bytes>>; Codec::COUNT],
    delta: [OnceLock<Option<Bytes>>; Codec::COUNT],
}

fn once_per_codec() -> [OnceLock<Option<Bytes>>; Codec::COUNT] {
    std::array::from_fn(|_| OnceLock::new())
}

impl PreparedPush {
    pub fn new(reply: Reply, offset: u64) -> Self {
        Self { reply, offset, encoded: once_per_codec(), delta: OnceLock::new() }
    }

    fn get(&self, codec: Codec) -> Option<&Bytes> {
        self.encoded[codec.index()].get_or_init(|| codec.encode(&self.reply).ok()).as_ref()
    }

    fn publication(&self) -> Option<(&Arc<str>, &Publication)> {
        match &self.reply.body {
            ReplyBody::Push(Push { channel, body: PushBody::Pub(p) }) => Some((channel, p)),
            _ => None,
        }
    }

    fn delta_forms(&self, base: Option<&Bytes>) -> &DeltaForms {
        self.delta.get_or_init(|| {
            let patch = match (base, self.publication()) {
                (Some(base), Some((_, p))) => delta::fossil(base, &p.data),
                _ => None,
            };
            Box::new(DeltaForms { patch, full: once_per_codec(), delta: once_per_codec() })
        })
    }

    /// Encodes this publication replaced by `form` (none: not representable).
    fn encode_form(&self, codec: Codec, form: Option<Publication>) -> Option<Bytes> {
        let (channel, _) = self.publication()?;
        codec.encode(&Reply::push(channel.clone(), PushBody::Pub(form?))).ok()
    }

    /// The full form for a delta subscription: as for anyone over Protobuf;
    /// data as a JSON string over JSON.
    fn delta_full(&self, codec: Codec) -> Option<&Bytes> {
        if codec == Codec::Protobuf {
            return self.get(codec);
        }
        let forms = self.delta.get()?;
        forms.full[codec.index()]
            .get_or_init(|| {
                let p = self.publication()?.1;
                self.encode_form(codec, delta::full_form(p, codec))
            })
            .as_ref()
    }

    /// The delta form, when there is one this codec can carry.
    fn delta_patch(&self, codec: Codec) -> Option<&Bytes> {
        let forms = self.delta.get()?;
        let patch = forms.patch.as_ref()?;
        forms.delta[codec.index()]
            .get_or_init(|| {
                let p = self.publication()?.1;
                self.encode_form(codec, delta::delta_form(p, patch, codec))
            })
            .as_ref()
    }
}

/// The newest publication of a channel with delta subscribers on this node:
/// the base of the next publication's delta. One per such channel.
#[derive(Default)]
struct DeltaBase(Mutex<Option<(u64, Bytes)>>);

impl DeltaBase {
    /// Records `push` as the channel's newest publication and returns the data
    /// of the one before it, if that is known here (offset - 1).
    fn advance(&self, push: &PreparedPush) -> Option<Bytes> {
        let (_, p) = push.publication()?;
        let mut prev = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let newest = (push.offset > 0).then(|| (push.offset, p.data.clone()));
        match std::mem::replace(&mut *prev, newest) {
            Some((offset, data)) if push.offset > 0 && offset + 1 == push.offset => Some(data),
            _ => None,
        }
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
    /// Set once a delta subscriber joined (boxed: most channels have none).
    delta: Option<Box<DeltaBase>>,
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
        let delta = sub.takes_delta();
        let (entry, first) = match shard.get_mut(channel) {
            Some(entry) => (entry, false),
            None => (shard.entry(Arc::from(channel)).or_default(), true),
        };
        if delta && entry.delta.is_none() {
            entry.delta = Some(Box::default());
        }
        entry.subs.insert(session, sub);
        first
    }

    /// Gives a channel's delta subscribers the base of the next delta when
    /// this node has none yet: the newest publication a subscribe just read
    /// from history (recovery). Nothing was fanned out since the subscriber
    /// joined (that would have set one), so it is the newest there is here;
    /// without it the first live publication after a recovery into a channel
    /// nobody here was subscribed to would go in full to everyone.
    pub fn seed_delta_base(&self, channel: &str, offset: u64, data: &Bytes) {
        let shard = self.shard(channel).read().unwrap_or_else(|p| p.into_inner());
        if let Some(base) = shard.get(channel).and_then(|e| e.delta.as_deref()) {
            let mut prev = base.0.lock().unwrap_or_else(|p| p.into_inner());
            if prev.is_none() && offset > 0 {
                *prev = Some((offset, data.clone()));
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
        // Delta forms only when the channel has delta subscribers: the
        // previous publication is kept (and a delta computed) for them alone.
        let base = entry.delta.as_ref().and_then(|d| d.advance(push));
        let publication = push.publication().is_some();
        for sub in entry.subs.values() {
            let codec = sub.outbox.codec();
            let offer = if publication && sub.takes_delta() {
                push.delta_forms(base.as_ref());
                Offer::Lazy(push, codec)
            } else {
                Offer::Plain(push.get(codec))
            };
            sub.deliver(push.offset, offer, self.coalescer.as_ref());
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

#[cfg(test)]
mod delta_tests {
    use super::*;

    /// A 2 KB-ish JSON document whose `n` changes.
    fn doc(n: u64) -> Bytes {
        let body: String = (0..40).map(|i| format!("\"field{i}\":\"some text {i}\",")).collect();
        Bytes::from(format!("{{{body}\"n\":{n}}}"))
    }

    fn publish(hub: &Hub, offset: u64) {
        let p = Publication { data: doc(offset), offset, ..Default::default() };
        let push = PreparedPush::new(Reply::push("c", PushBody::Pub(p)), offset);
        assert!(matches!(hub.fan_out("c", &push), FanOut::Delivered(_)));
    }

    /// (delta flag, data reconstructed by the client) per received message.
    fn apply_all(outbox: &Outbox, base: &mut Vec<u8>) -> Vec<(bool, Bytes)> {
        let mut v = Vec::new();
        outbox.drain(&mut v);
        v.iter()
            .map(|m| {
                let msg: serde_json::Value = serde_json::from_slice(m).unwrap();
                let p = &msg["push"]["pub"];
                let s = p["data"].as_str().expect("delta subscriptions get JSON strings");
                let delta = p["delta"] == true;
                *base = if delta {
                    fossil_delta::apply(&base[..], s.as_bytes()).unwrap()
                } else {
                    s.as_bytes().to_vec()
                };
                (delta, Bytes::from(base.clone()))
            })
            .collect()
    }

    #[test]
    fn a_delta_subscriber_gets_a_delta_only_after_the_publication_it_applies_to() {
        let hub = Hub::new();
        let plain = Arc::new(Outbox::new(Codec::Json, 1 << 20));
        let plain_sub = Arc::new(Subscriber::new(plain.clone()));
        hub.subscribe("c", 1, plain_sub.clone());
        plain_sub.go_live(0);
        publish(&hub, 1);

        // Joins after offset 1 without recovery: offset 2 must come in full.
        let a = Arc::new(Outbox::new(Codec::Json, 1 << 20));
        let a_sub = Arc::new(Subscriber::with_delta(a.clone(), true));
        hub.subscribe("c", 2, a_sub.clone());
        a_sub.go_live(1);
        publish(&hub, 2);
        publish(&hub, 3);
        let mut base = Vec::new();
        let got = apply_all(&a, &mut base);
        assert_eq!(got, [(false, doc(2)), (true, doc(3))], "full first, then a delta");
        publish(&hub, 4);
        let got = apply_all(&a, &mut base);
        assert_eq!(got, [(true, doc(4))], "offset 4 follows the 3 the client holds");

        // Syncing while 5 and 6 arrive, recovered up to 4 (its base): both
        // held ones go as deltas.
        let b = Arc::new(Outbox::new(Codec::Json, 1 << 20));
        let b_sub = Arc::new(Subscriber::with_delta(b.clone(), true));
        hub.subscribe("c", 3, b_sub.clone());
        publish(&hub, 5);
        publish(&hub, 6);
        b_sub.go_live_with_base(4, 4);
        let mut b_base = doc(4).to_vec();
        let got = apply_all(&b, &mut b_base);
        assert_eq!(got, [(true, doc(5)), (true, doc(6))]);

        // The plain subscriber saw raw JSON data throughout, never a string.
        let mut v = Vec::new();
        plain.drain(&mut v);
        assert_eq!(v.len(), 6);
        for (i, m) in v.iter().enumerate() {
            let msg: serde_json::Value = serde_json::from_slice(m).unwrap();
            assert_eq!(msg["push"]["pub"]["data"]["n"], i as u64 + 1);
            assert!(msg["push"]["pub"].get("delta").is_none());
        }
    }

    #[test]
    fn every_form_is_encoded_once_and_shared_by_all_subscribers() {
        let hub = Hub::new();
        let outboxes: Vec<_> =
            (0..3).map(|_| Arc::new(Outbox::new(Codec::Protobuf, 1 << 20))).collect();
        for (i, o) in outboxes.iter().enumerate() {
            let s = Arc::new(Subscriber::with_delta(o.clone(), true));
            hub.subscribe("c", i as u64, s.clone());
            s.go_live(0);
        }
        publish(&hub, 1);
        publish(&hub, 2);
        let drained: Vec<Vec<Bytes>> = outboxes
            .iter()
            .map(|o| {
                let mut v = Vec::new();
                o.drain(&mut v);
                v
            })
            .collect();
        for d in &drained[1..] {
            for (m, first) in d.iter().zip(&drained[0]) {
                assert_eq!(m.as_ptr(), first.as_ptr(), "the same Bytes, not a copy");
            }
        }
        assert!(drained[0][1].len() < 100, "offset 2 went as a small delta");
    }

    #[test]
    fn binary_data_closes_a_json_delta_subscriber_with_3506_and_reaches_a_protobuf_one() {
        let hub = Hub::new();
        let json = Arc::new(Outbox::new(Codec::Json, 1 << 20));
        let proto = Arc::new(Outbox::new(Codec::Protobuf, 1 << 20));
        for (id, o) in [(1, &json), (2, &proto)] {
            let sub = Arc::new(Subscriber::with_delta(o.clone(), true));
            hub.subscribe("c", id, sub.clone());
            sub.go_live(0);
        }
        let data = Bytes::from_static(b"\x00\xffbinary");
        let p = Publication { data: data.clone(), offset: 1, ..Default::default() };
        hub.fan_out("c", &PreparedPush::new(Reply::push("c", PushBody::Pub(p)), 1));
        let mut v = Vec::new();
        assert_eq!(json.drain(&mut v), Some(DisconnectCode::INAPPROPRIATE_PROTOCOL));
        assert!(v.is_empty());
        assert_eq!(proto.drain(&mut v), None);
        let mut buf = &v[0][..];
        let reply =
            <fanfare_protocol::pb::Reply as prost::Message>::decode_length_delimited(&mut buf)
                .unwrap();
        assert_eq!(reply.push.unwrap().r#pub.unwrap().data, data);
    }
}
