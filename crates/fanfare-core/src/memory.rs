//! In-process broker for a single node.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use fanfare_protocol::{ClientInfo, Publication, StreamPosition};

use crate::broker::{
    Broker, BrokerError, BrokerHandler, HistoryPage, HistoryQuery, NodeInfo, PublishOptions,
};

const SHARDS: usize = 32;

#[derive(Debug)]
struct Stream {
    epoch: String,
    top: u64,
    items: VecDeque<(Instant, Publication)>,
}

impl Stream {
    fn new() -> Self {
        Self { epoch: new_epoch(), top: 0, items: VecDeque::new() }
    }

    fn expire(&mut self, ttl: Duration, now: Instant) {
        while let Some((at, _)) = self.items.front() {
            if now.duration_since(*at) >= ttl {
                self.items.pop_front();
            } else {
                break;
            }
        }
    }

    fn position(&self) -> StreamPosition {
        StreamPosition { offset: self.top, epoch: self.epoch.clone() }
    }
}

fn new_epoch() -> String {
    let n: u32 = rand::random();
    format!("{n:08x}")
}

#[derive(Default)]
struct Shard {
    streams: HashMap<String, (Stream, Duration)>,
    presence: HashMap<String, HashMap<String, ClientInfo>>,
    /// (channel, idempotency key) -> first result and when it expires.
    idempotency: HashMap<(String, String), (StreamPosition, Instant)>,
}

/// Keeps history and presence in memory and delivers publications to this node
/// synchronously, in publish order (delivery happens under the channel's shard
/// lock, right after the offset is assigned).
///
/// Nothing survives a restart: a new process starts new epochs, so clients
/// recovering across a restart are told `recovered: false`.
pub struct MemoryBroker {
    shards: Box<[Mutex<Shard>]>,
    hasher: ahash::RandomState,
    handler: OnceLock<Arc<dyn BrokerHandler>>,
    node: Mutex<Option<NodeInfo>>,
}

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBroker {
    pub fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: ahash::RandomState::new(),
            handler: OnceLock::new(),
            node: Mutex::new(None),
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
        if let Some(key) = &opts.idempotency_key {
            shard.idempotency.retain(|_, (_, until)| *until > now);
            if let Some((pos, _)) = shard.idempotency.get(&(channel.to_string(), key.clone())) {
                return Ok(pos.clone());
            }
        }
        let position = if opts.history_size > 0 && !opts.history_ttl.is_zero() {
            let (stream, ttl) = shard
                .streams
                .entry(channel.to_string())
                .or_insert_with(|| (Stream::new(), opts.history_ttl));
            *ttl = opts.history_ttl;
            stream.top += 1;
            publication.offset = stream.top;
            stream.items.push_back((now, publication.clone()));
            while stream.items.len() > opts.history_size {
                stream.items.pop_front();
            }
            stream.expire(opts.history_ttl, now);
            stream.position()
        } else {
            StreamPosition::default()
        };
        if let Some(key) = opts.idempotency_key {
            let until = now + opts.idempotency_window;
            shard.idempotency.insert((channel.to_string(), key), (position.clone(), until));
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

    async fn unsubscribe(&self, _channel: &str) -> Result<(), BrokerError> {
        Ok(())
    }

    async fn history(
        &self,
        channel: &str,
        query: HistoryQuery,
    ) -> Result<HistoryPage, BrokerError> {
        let mut shard = self.shard(channel);
        let (stream, ttl) = shard
            .streams
            .entry(channel.to_string())
            .or_insert_with(|| (Stream::new(), Duration::from_secs(60)));
        let ttl = *ttl;
        stream.expire(ttl, Instant::now());
        let position = stream.position();
        let mut complete = true;
        let after = match &query.since {
            Some(since) => {
                if since.epoch != stream.epoch || since.offset > stream.top {
                    complete = false;
                    0
                } else {
                    // The first kept offset must directly follow `since`.
                    let first_kept = stream.items.front().map_or(stream.top + 1, |(_, p)| p.offset);
                    if since.offset + 1 < first_kept {
                        complete = false;
                    }
                    since.offset
                }
            }
            None => 0,
        };
        let limit = query.limit.unwrap_or(usize::MAX);
        let matching = stream.items.iter().map(|(_, p)| p).filter(|p| p.offset > after);
        let publications: Vec<Publication> = if query.reverse {
            let mut v: Vec<_> = matching.cloned().collect();
            v.reverse();
            v.truncate(limit);
            v
        } else {
            matching.take(limit).cloned().collect()
        };
        Ok(HistoryPage { publications, position, complete })
    }

    async fn add_presence(
        &self,
        channel: &str,
        info: ClientInfo,
        _ttl: Duration,
    ) -> Result<(), BrokerError> {
        let mut shard = self.shard(channel);
        shard
            .presence
            .entry(channel.to_string())
            .or_default()
            .insert(info.client.to_string(), info);
        Ok(())
    }

    async fn remove_presence(&self, channel: &str, client: &str) -> Result<(), BrokerError> {
        let mut shard = self.shard(channel);
        if let Some(m) = shard.presence.get_mut(channel) {
            m.remove(client);
            if m.is_empty() {
                shard.presence.remove(channel);
            }
        }
        Ok(())
    }

    async fn presence(&self, channel: &str) -> Result<BTreeMap<String, ClientInfo>, BrokerError> {
        let shard = self.shard(channel);
        Ok(shard
            .presence
            .get(channel)
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default())
    }

    async fn presence_stats(&self, channel: &str) -> Result<(u32, u32), BrokerError> {
        let shard = self.shard(channel);
        let Some(m) = shard.presence.get(channel) else {
            return Ok((0, 0));
        };
        let users: HashSet<&str> = m.values().map(|i| &*i.user).collect();
        Ok((m.len() as u32, users.len() as u32))
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
}
