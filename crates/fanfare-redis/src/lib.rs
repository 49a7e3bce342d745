//! `RedisBroker`: the [`Broker`] for a cluster of fanfare nodes sharing Redis.
//!
//! - **Interest-based pub/sub.** A node subscribes to a channel's Redis pub/sub
//!   channel when its first local subscriber arrives and unsubscribes
//!   `unsubscribe_delay` after the last one left. Requests from many sessions are
//!   batched into one SUBSCRIBE/UNSUBSCRIBE per round trip: subscribes that
//!   arrive together (a reconnect storm) cost a handful of commands; subscribes
//!   trickling in slower than a round trip still cost one command each.
//! - **Separate connections.** Publishes, history and presence go through a
//!   multiplexed (pipelining) command connection; pub/sub has its own RESP3
//!   connection per Redis (standalone/sharded) or per cluster node (Redis Cluster,
//!   sharded pub/sub with SSUBSCRIBE/SPUBLISH).
//! - **History.** One Lua script assigns the next offset, appends to a capped
//!   stream with a TTL, keeps the epoch and publishes — atomically, so pub/sub
//!   order equals offset order.
//! - **No silent loss.** When the pub/sub connection drops the broker reports
//!   unhealthy (`/ready` 503), reconnects with backoff, resubscribes every live
//!   channel and tells the node each channel may have a gap, so subscribers are
//!   asked to resubscribe with recovery.
//! - **Fast return.** The reconnect backoff starts at 10 ms; while a
//!   standalone Redis refuses connections a TCP probe every 10 ms ends the
//!   wait as soon as it accepts again (docs/ARCHITECTURE.md decision 31).
//! - **TLS and Sentinel.** `rediss://` with `redis.tls_*` for every
//!   connection; with Sentinel the primary is asked of the sentinels (and
//!   confirmed with ROLE) on every reconnect and once a second.
//! - **Redis Cluster failovers.** A dead master, a moved slot (sunsubscribe
//!   push) or changed slot owners (checked every second) make the broker
//!   rebuild its pub/sub connection on the topology every reachable node
//!   agrees on, with the same resubscribe-and-gap handling.

mod conn;
mod events;
mod scripts;
mod sentinel;
mod subscriptions;
mod wire;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use fanfare_core::broker::{
    Broker, BrokerError, BrokerHandler, HistoryPage, HistoryQuery, NodeInfo, PublishItem,
    PublishOptions,
};
use fanfare_protocol::{ClientInfo, Publication, StreamPosition};
use redis::{AsyncCommands, Script, Value};

use crate::conn::{CmdConn, PubSubTarget, SharedCmd, Tls};
use crate::subscriptions::{Manager, SubRequest};

pub use events::{OutboxConfig, RedisOutbox};

/// Fuzz entry (`fuzz/`): decodes `msg` as a pub/sub message and, from every
/// offset, as a history stream entry's publication body; both read bytes
/// any Redis client could have written. Not part of the API.
#[doc(hidden)]
pub fn fuzz_decode(msg: &[u8]) {
    let msg = Bytes::copy_from_slice(msg);
    let _ = wire::decode_message(&msg);
    for from in 0..msg.len().min(16) {
        let _ = wire::decode_publication(&msg, from, 1);
    }
}

/// Redis settings (`redis.*`).
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// One URL per Redis (several = client-side sharding), or cluster seeds.
    pub urls: Vec<String>,
    /// The URLs are seeds of a Redis Cluster; use sharded pub/sub.
    pub cluster: bool,
    /// Prefix of every key and pub/sub channel.
    pub prefix: String,
    /// How long a node stays subscribed after its last local subscriber left.
    pub unsubscribe_delay: Duration,
    /// How long a stream's offset and epoch outlive its last publication.
    pub history_meta_ttl: Duration,
    /// How long to keep trying to reach Redis at start-up.
    pub startup_timeout: Duration,
    /// PEM files for `rediss://` (empty = unset): the CA to check servers
    /// against (else the webpki roots), and a client certificate and key.
    pub tls_ca: String,
    pub tls_cert: String,
    pub tls_key: String,
    /// Sentinels (`redis://host:port`) to ask for the primary of
    /// `sentinel_master`; empty = no Sentinel. `urls[0]` then only gives the
    /// scheme, credentials and database of the primary's URL.
    pub sentinel_urls: Vec<String>,
    pub sentinel_master: String,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            urls: vec!["redis://127.0.0.1:6379".into()],
            cluster: false,
            prefix: "fanfare".into(),
            unsubscribe_delay: Duration::from_secs(1),
            history_meta_ttl: Duration::from_secs(24 * 3600),
            startup_timeout: Duration::from_secs(30),
            tls_ca: String::new(),
            tls_cert: String::new(),
            tls_key: String::new(),
            sentinel_urls: Vec::new(),
            sentinel_master: String::new(),
        }
    }
}

/// Checks the TLS settings (`redis.tls_*`) as the broker will read them:
/// readable PEM files, a certificate with its key. The error names the key.
pub fn check_tls(ca: &str, cert: &str, key: &str) -> Result<(), String> {
    Tls::load(ca, cert, key).map(|_| ())
}

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The message names the setting.
    #[error("{0}")]
    Config(String),
    #[error("redis: cannot reach {url}: {source}")]
    Unreachable { url: String, source: redis::RedisError },
}

type HandlerCell = Arc<OnceLock<Arc<dyn BrokerHandler>>>;

/// One Redis (or the whole cluster) with its connections and subscription manager.
struct Shard {
    cmd: SharedCmd,
    requests: tokio::sync::mpsc::UnboundedSender<SubRequest>,
    health: Arc<subscriptions::Health>,
}

/// See the crate docs.
pub struct RedisBroker {
    shards: Vec<Shard>,
    names: Names,
    cluster: bool,
    handler: HandlerCell,
    meta_ttl: Duration,
    /// `scripts::PUBLISH` as sent (see [`script_text`]).
    publish_script: String,
    history_script: Script,
    presence_add_script: Script,
    presence_get_script: Script,
}

/// Key and channel names. Every name of one channel carries the channel as hash
/// tag, so a channel's keys and its pub/sub channel live on one cluster slot.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    prefix: String,
}

impl Names {
    fn stream(&self, ch: &str) -> String {
        format!("{}.s.{{{ch}}}", self.prefix)
    }
    fn meta(&self, ch: &str) -> String {
        format!("{}.m.{{{ch}}}", self.prefix)
    }
    fn presence_hash(&self, ch: &str) -> String {
        format!("{}.ph.{{{ch}}}", self.prefix)
    }
    fn presence_zset(&self, ch: &str) -> String {
        format!("{}.pz.{{{ch}}}", self.prefix)
    }
    pub(crate) fn pubsub(&self, ch: &str) -> String {
        format!("{}.c.{{{ch}}}", self.prefix)
    }
    /// The channel of a pub/sub channel name.
    pub(crate) fn channel_of<'a>(&self, name: &'a str) -> Option<&'a str> {
        name.strip_prefix(self.prefix.as_str())?.strip_prefix(".c.{")?.strip_suffix('}')
    }
    fn idempotency(&self, ch: &str, key: &str) -> String {
        format!("{}.i.{{{ch}}}.{key}", self.prefix)
    }
    /// The control-plane pub/sub channel (on the first shard).
    pub(crate) fn control(&self) -> String {
        format!("{}.control", self.prefix)
    }
    fn nodes(&self) -> String {
        format!("{}.nodes", self.prefix)
    }
}

/// A script's text as sent. In a cluster it starts with a `#!lua` shebang
/// (Redis 7, which sharded pub/sub needs anyway): a script with a shebang and
/// without the `no-writes` flag counts as a write command, so a replica
/// answers MOVED to its master. redis-rs sends READONLY on every cluster
/// connection, and a script without the shebang counts as a read: after a
/// manual failover the old master (now a replica) would run our publish
/// script and fail it with READONLY, which redis-rs neither retries nor takes
/// as a sign to refresh its slot map, so the channel would stay unpublishable.
fn script_text(script: &str, cluster: bool) -> String {
    if cluster { format!("#!lua{script}") } else { script.to_string() }
}

fn unavailable(e: redis::RedisError) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn new_epoch() -> String {
    format!("{:08x}", rand_u32())
}

fn rand_u32() -> u32 {
    // Epochs only need to differ between stream instances; time + address
    // entropy is plenty and avoids another dependency.
    let t = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let local = 0u8;
    (t as u32) ^ ((t >> 32) as u32) ^ (&local as *const u8 as usize as u32)
}

/// Jump consistent hash (Lamping & Veach): channel -> shard, stable when shards
/// are added at the end.
fn jump_hash(mut key: u64, buckets: usize) -> usize {
    let (mut b, mut j) = (-1i64, 0i64);
    while j < buckets as i64 {
        b = j;
        key = key.wrapping_mul(2862933555777941757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as usize
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

impl RedisBroker {
    /// Connects to every Redis (retrying up to `startup_timeout`) and starts the
    /// pub/sub tasks.
    pub async fn connect(cfg: RedisConfig) -> Result<Self, StartError> {
        if cfg.urls.is_empty() {
            return Err(StartError::Config("redis.urls: at least one URL is needed".into()));
        }
        // rustls needs a process-wide crypto provider when more than one is
        // compiled in; ring is the one this crate asks for (the same as the
        // server's other TLS users). Ignored if the process installed one
        // already. Deprecated upstream for lacking post-quantum key exchange,
        // which Redis servers do not offer anyway.
        #[allow(deprecated)]
        let _ = rustls::crypto::ring::default_provider().install_default();
        let tls =
            Tls::load(&cfg.tls_ca, &cfg.tls_cert, &cfg.tls_key).map_err(StartError::Config)?;
        let sentinel = if cfg.sentinel_urls.is_empty() {
            None
        } else {
            if cfg.cluster || cfg.urls.len() != 1 || cfg.sentinel_master.is_empty() {
                return Err(StartError::Config(
                    "redis.sentinel_urls: needs redis.sentinel_master, one redis.urls entry and no cluster".into(),
                ));
            }
            Some(Arc::new(sentinel::Sentinel {
                urls: cfg.sentinel_urls.clone(),
                master: cfg.sentinel_master.clone(),
            }))
        };
        let names = Names { prefix: cfg.prefix.clone() };
        let handler: HandlerCell = Arc::new(OnceLock::new());
        let groups: Vec<Vec<String>> = if cfg.cluster {
            vec![cfg.urls.clone()]
        } else {
            cfg.urls.iter().map(|u| vec![u.clone()]).collect()
        };
        let mut shards = Vec::new();
        for (index, urls) in groups.into_iter().enumerate() {
            let deadline = tokio::time::Instant::now() + cfg.startup_timeout;
            let (cmd, target) = loop {
                match conn::open(&urls, cfg.cluster, &tls, sentinel.clone()).await {
                    Ok(x) => break x,
                    Err(e) if tokio::time::Instant::now() < deadline => {
                        tracing::warn!(redis = %conn::addrs(&urls), error = %e, "redis not reachable yet; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    Err(source) => {
                        let url = match &sentinel {
                            Some(s) => {
                                format!("sentinel master {} via {}", s.master, conn::addrs(&s.urls))
                            }
                            None => conn::addrs(&urls),
                        };
                        return Err(StartError::Unreachable { url, source });
                    }
                }
            };
            shards.push(Self::start_shard(cmd, target, &names, &handler, &cfg, index == 0).await?);
        }
        Ok(Self {
            shards,
            names,
            cluster: cfg.cluster,
            handler,
            meta_ttl: cfg.history_meta_ttl,
            publish_script: script_text(scripts::PUBLISH, cfg.cluster),
            history_script: Script::new(&script_text(scripts::HISTORY, cfg.cluster)),
            presence_add_script: Script::new(&script_text(scripts::PRESENCE_ADD, cfg.cluster)),
            presence_get_script: Script::new(&script_text(scripts::PRESENCE_GET, cfg.cluster)),
        })
    }

    async fn start_shard(
        cmd: CmdConn,
        target: PubSubTarget,
        names: &Names,
        handler: &HandlerCell,
        cfg: &RedisConfig,
        control: bool,
    ) -> Result<Shard, StartError> {
        let (push_tx, push_rx) = tokio::sync::mpsc::unbounded_channel();
        let cmd = SharedCmd::new(cmd);
        let target_addrs: Vec<String> = target.urls().iter().map(|u| conn::url_addr(u)).collect();
        let unreachable = |source| StartError::Unreachable { url: target.describe(), source };
        let mut pubsub = target.connect(push_tx.clone(), &[]).await.map_err(unreachable)?;
        let always: Vec<String> = if control { vec![names.control()] } else { Vec::new() };
        pubsub.subscribe(&always).await.map_err(unreachable)?;
        let health = Arc::new(subscriptions::Health::new(target.describe()));
        let (req_tx, req_rx) = tokio::sync::mpsc::unbounded_channel();
        subscriptions::spawn_delivery(
            push_rx,
            names.clone(),
            handler.clone(),
            health.clone(),
            req_tx.downgrade(),
        );
        let manager = Manager {
            target,
            conn: pubsub,
            cmd: cmd.clone(),
            push: push_tx,
            names: names.clone(),
            handler: handler.clone(),
            health: health.clone(),
            delay: cfg.unsubscribe_delay,
            live: Default::default(),
            leaving: Default::default(),
            always,
            owners: None,
            known: target_addrs,
        };
        tokio::spawn(manager.run(req_rx));
        Ok(Shard { cmd, requests: req_tx, health })
    }

    fn shard(&self, channel: &str) -> &Shard {
        &self.shards[self.shard_index(channel)]
    }

    fn shard_index(&self, channel: &str) -> usize {
        if self.shards.len() == 1 {
            return 0;
        }
        jump_hash(fnv1a(channel), self.shards.len())
    }

    fn cmd(&self, channel: &str) -> CmdConn {
        self.shard(channel).cmd.get()
    }

    fn publish_command(&self) -> &'static str {
        if self.cluster { "spublish" } else { "publish" }
    }

    async fn send_event(&self, channel: &str, msg: Vec<u8>) -> Result<(), BrokerError> {
        let mut conn = self.cmd(channel);
        redis::cmd(&self.publish_command().to_uppercase())
            .arg(self.names.pubsub(channel))
            .arg(msg)
            .exec_async(&mut conn)
            .await
            .map_err(unavailable)
    }

    /// Refuses at once while the channel's Redis is reconnecting: a caller told
    /// "unavailable" retries; one left waiting may time out while the publish
    /// still happens.
    fn check_up(&self, channel: &str) -> Result<(), BrokerError> {
        let shard = self.shard(channel);
        if shard.health.is_up() {
            return Ok(());
        }
        Err(BrokerError::Unavailable(format!("redis {} is reconnecting", shard.health.target())))
    }

    /// The command that publishes `publication`; true when it is the script
    /// (history or idempotency), false for a plain PUBLISH.
    fn publish_cmd(
        &self,
        channel: &str,
        publication: &Publication,
        opts: &PublishOptions,
    ) -> (redis::Cmd, bool) {
        let body = wire::encode_publication(publication);
        let history = opts.history_size > 0 && !opts.history_ttl.is_zero();
        let idempotent =
            opts.idempotency_key.as_ref().filter(|_| !opts.idempotency_window.is_zero());
        if !history && idempotent.is_none() {
            let mut cmd = redis::cmd(&self.publish_command().to_uppercase());
            cmd.arg(self.names.pubsub(channel)).arg(wire::publication_message(&body));
            return (cmd, false);
        }
        let ttl = opts.history_ttl.as_secs().max(1);
        let meta_ttl = self.meta_ttl.as_secs().max(ttl);
        // EVAL with the script's text, not EVALSHA: a NOSCRIPT answer (first
        // use, Redis restarted or flushed) makes the caller load the script and
        // retry, and that retry would land after publishes the same client sent
        // later. Redis caches the compiled script by its hash, so the cost is
        // ~1 KB more per publish on the wire.
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(&self.publish_script)
            .arg(3)
            .arg(self.names.stream(channel))
            .arg(self.names.meta(channel))
            .arg(self.names.idempotency(channel, idempotent.map_or("", |k| k.as_str())))
            .arg(body)
            .arg(if history { opts.history_size } else { 0 })
            .arg(ttl)
            .arg(new_epoch())
            .arg(meta_ttl)
            .arg(self.names.pubsub(channel))
            .arg(self.publish_command())
            .arg(idempotent.map_or(0, |_| opts.idempotency_window.as_secs().max(1)));
        (cmd, true)
    }

    /// Publishes `items[idx]` (all on one connection) as one pipeline.
    async fn publish_pipeline(
        &self,
        items: &[PublishItem],
        idx: &[usize],
    ) -> Vec<Result<StreamPosition, BrokerError>> {
        let channel = &items[idx[0]].channel;
        if let Err(e) = self.check_up(channel) {
            return idx.iter().map(|_| Err(e.clone())).collect();
        }
        let mut pipe = redis::Pipeline::with_capacity(idx.len());
        pipe.ignore_errors();
        let mut scripted = Vec::with_capacity(idx.len());
        for &i in idx {
            let (cmd, s) =
                self.publish_cmd(&items[i].channel, &items[i].publication, &items[i].opts);
            pipe.add_command(cmd);
            scripted.push(s);
        }
        match pipe.query_async::<Vec<Value>>(&mut self.cmd(channel)).await {
            Ok(replies) if replies.len() == idx.len() => {
                replies.into_iter().zip(scripted).map(|(v, s)| publish_result(v, s)).collect()
            }
            Ok(replies) => {
                let e = BrokerError::Unavailable(format!(
                    "redis answered {} of {} publishes",
                    replies.len(),
                    idx.len()
                ));
                idx.iter().map(|_| Err(e.clone())).collect()
            }
            Err(e) => {
                let e = unavailable(e);
                idx.iter().map(|_| Err(e.clone())).collect()
            }
        }
    }

    /// Redis servers this broker talks to (one entry per shard or per cluster).
    pub fn num_shards(&self) -> usize {
        self.shards.len()
    }
}

/// The stream position from a publish command's reply.
fn publish_result(reply: Value, scripted: bool) -> Result<StreamPosition, BrokerError> {
    if let Value::ServerError(e) = reply {
        return Err(unavailable(e.into()));
    }
    if !scripted {
        return Ok(StreamPosition::default());
    }
    let (offset, epoch, _duplicate): (u64, String, u8) = redis::from_redis_value(reply)
        .map_err(|e| BrokerError::Unavailable(format!("unexpected publish reply: {e}")))?;
    Ok(StreamPosition { offset, epoch })
}

fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn as_string(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

/// Parses XRANGE entries `[[id, [field, value, ...]], ...]` into publications.
fn parse_entries(v: &Value) -> Vec<Publication> {
    let Value::Array(entries) = v else { return Vec::new() };
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let Value::Array(pair) = e else { continue };
        let (Some(id), Some(Value::Array(fields))) = (pair.first(), pair.get(1)) else { continue };
        let Some(id) = as_string(id) else { continue };
        let Some(offset) = id.split('-').next().and_then(|o| o.parse::<u64>().ok()) else {
            continue;
        };
        let Some(Value::BulkString(body)) = fields.get(1) else { continue };
        if let Some(p) = wire::decode_publication(&Bytes::from(body.clone()), 0, offset) {
            out.push(p);
        }
    }
    out
}

#[async_trait]
impl Broker for RedisBroker {
    fn set_handler(&self, handler: Arc<dyn BrokerHandler>) {
        let _ = self.handler.set(handler);
    }

    async fn publish(
        &self,
        channel: &str,
        publication: Publication,
        opts: PublishOptions,
    ) -> Result<StreamPosition, BrokerError> {
        self.check_up(channel)?;
        let (cmd, scripted) = self.publish_cmd(channel, &publication, &opts);
        let reply: Value = cmd.query_async(&mut self.cmd(channel)).await.map_err(unavailable)?;
        publish_result(reply, scripted)
    }

    async fn publish_many(
        &self,
        items: Vec<PublishItem>,
    ) -> Vec<Result<StreamPosition, BrokerError>> {
        if items.len() == 1 {
            let i = items.into_iter().next().expect("one item");
            return vec![self.publish(&i.channel, i.publication, i.opts).await];
        }
        // One pipeline per connection the items travel on: a pipeline reaches
        // Redis as one write, so its commands run in the items' order (a set
        // of separate commands in flight at once has no such guarantee). In a
        // cluster, one per channel: a channel's keys live in one slot.
        let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
        let mut channels: Vec<&str> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let key = if self.cluster {
                match channels.iter().position(|c| *c == item.channel) {
                    Some(k) => k,
                    None => {
                        channels.push(&item.channel);
                        channels.len() - 1
                    }
                }
            } else {
                self.shard_index(&item.channel)
            };
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, g)) => g.push(i),
                None => groups.push((key, vec![i])),
            }
        }
        let runs = groups.iter().map(|(_, idx)| self.publish_pipeline(&items, idx));
        let mut out: Vec<Option<Result<StreamPosition, BrokerError>>> =
            (0..items.len()).map(|_| None).collect();
        for ((_, idx), results) in groups.iter().zip(futures_util::future::join_all(runs).await) {
            for (&i, r) in idx.iter().zip(results) {
                out[i] = Some(r);
            }
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(BrokerError::Unavailable("no reply".into()))))
            .collect()
    }

    async fn publish_join(&self, channel: &str, info: ClientInfo) -> Result<(), BrokerError> {
        self.send_event(channel, wire::event_message(b'j', &info)).await
    }

    async fn publish_leave(&self, channel: &str, info: ClientInfo) -> Result<(), BrokerError> {
        self.send_event(channel, wire::event_message(b'l', &info)).await
    }

    async fn subscribe(&self, channel: &str) -> Result<(), BrokerError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.shard(channel)
            .requests
            .send(SubRequest::Subscribe(channel.to_string(), tx))
            .map_err(|_| BrokerError::Unavailable("subscription manager stopped".into()))?;
        rx.await.map_err(|_| BrokerError::Unavailable("subscription manager stopped".into()))?
    }

    async fn unsubscribe(&self, channel: &str) -> Result<(), BrokerError> {
        let _ = self.shard(channel).requests.send(SubRequest::Unsubscribe(channel.to_string()));
        Ok(())
    }

    async fn history(
        &self,
        channel: &str,
        query: HistoryQuery,
    ) -> Result<HistoryPage, BrokerError> {
        let mut conn = self.cmd(channel);
        let from = query.since.as_ref().filter(|_| !query.reverse).map(|s| s.offset.to_string());
        let limit: i64 = match query.limit {
            None => -1,
            Some(n) => n.min(i64::MAX as usize) as i64,
        };
        let v: Value = self
            .history_script
            .key(self.names.stream(channel))
            .key(self.names.meta(channel))
            .arg(new_epoch())
            .arg(self.meta_ttl.as_secs().max(1))
            .arg(from.unwrap_or_default())
            .arg(limit)
            .arg(if query.reverse { "1" } else { "0" })
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let Value::Array(parts) = v else {
            return Err(BrokerError::Internal("unexpected history reply".into()));
        };
        let top = parts.first().and_then(as_u64).unwrap_or(0);
        let epoch = parts.get(1).and_then(as_string).unwrap_or_default();
        let mut publications = parts.get(2).map(parse_entries).unwrap_or_default();
        let position = StreamPosition { offset: top, epoch };
        let mut complete = true;
        if let Some(since) = &query.since {
            if since.epoch != position.epoch || since.offset > top {
                // Not a position of this stream: nothing follows it.
                complete = false;
                publications.clear();
            } else if since.offset < top && !query.reverse {
                complete = publications.first().is_some_and(|p| p.offset == since.offset + 1);
            }
            if query.reverse {
                publications.retain(|p| p.offset > since.offset);
            }
        }
        Ok(HistoryPage { publications, position, complete })
    }

    async fn add_presence(
        &self,
        channel: &str,
        info: ClientInfo,
        ttl: Duration,
    ) -> Result<(), BrokerError> {
        let mut conn = self.cmd(channel);
        let ttl = ttl.as_secs().max(1);
        let expire_at = unix_ms() / 1000 + ttl;
        let _: i64 = self
            .presence_add_script
            .key(self.names.presence_hash(channel))
            .key(self.names.presence_zset(channel))
            .arg(info.client.as_ref())
            .arg(wire::encode_info(&info))
            .arg(expire_at)
            .arg(ttl)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn remove_history(&self, channel: &str) -> Result<(), BrokerError> {
        // The stream only: the meta hash (top offset, epoch) stays.
        let mut conn = self.cmd(channel);
        redis::cmd("DEL")
            .arg(self.names.stream(channel))
            .exec_async(&mut conn)
            .await
            .map_err(unavailable)
    }

    async fn remove_presence(&self, channel: &str, client: &str) -> Result<(), BrokerError> {
        let mut conn = self.cmd(channel);
        redis::pipe()
            .hdel(self.names.presence_hash(channel), client)
            .ignore()
            .zrem(self.names.presence_zset(channel), client)
            .ignore()
            .exec_async(&mut conn)
            .await
            .map_err(unavailable)
    }

    async fn presence(&self, channel: &str) -> Result<BTreeMap<String, ClientInfo>, BrokerError> {
        let mut conn = self.cmd(channel);
        let flat: Vec<Vec<u8>> = self
            .presence_get_script
            .key(self.names.presence_hash(channel))
            .key(self.names.presence_zset(channel))
            .arg(unix_ms() / 1000)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let mut out = BTreeMap::new();
        for pair in flat.chunks_exact(2) {
            let client = String::from_utf8_lossy(&pair[0]).into_owned();
            let mut msg = b"j0:".to_vec();
            msg.extend_from_slice(&pair[1]);
            if let Some(wire::Event::Join(info)) = wire::decode_message(&Bytes::from(msg)) {
                out.insert(client, info);
            }
        }
        Ok(out)
    }

    async fn presence_stats(&self, channel: &str) -> Result<(u32, u32), BrokerError> {
        let map = self.presence(channel).await?;
        let users: HashSet<&str> = map.values().map(|i| &*i.user).collect();
        Ok((map.len() as u32, users.len() as u32))
    }

    async fn publish_control(&self, message: bytes::Bytes) -> Result<(), BrokerError> {
        let mut conn = self.shards[0].cmd.get();
        redis::cmd(&self.publish_command().to_uppercase())
            .arg(self.names.control())
            .arg(message.as_ref())
            .exec_async(&mut conn)
            .await
            .map_err(unavailable)
    }

    async fn announce(&self, info: &NodeInfo, ttl: Duration) -> Result<(), BrokerError> {
        let mut conn = self.shards[0].cmd.get();
        let json = serde_json::to_string(info).map_err(|e| BrokerError::Internal(e.to_string()))?;
        let key = self.names.nodes();
        let _: () = conn.hset(&key, &info.uid, json).await.map_err(unavailable)?;
        // The hash outlives its members by a margin; stale members are dropped by readers.
        let _: () =
            conn.expire(&key, (ttl.as_secs() * 10).max(60) as i64).await.map_err(unavailable)?;
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>, BrokerError> {
        let mut conn = self.shards[0].cmd.get();
        let key = self.names.nodes();
        let all: BTreeMap<String, String> = conn.hgetall(&key).await.map_err(unavailable)?;
        let now = unix_ms();
        let mut out = Vec::new();
        let mut stale = Vec::new();
        for (uid, json) in all {
            match serde_json::from_str::<NodeInfo>(&json) {
                // Three missed announcements (5 s apart) = gone.
                Ok(n) if now.saturating_sub(n.updated_at_ms) <= NODE_TTL.as_millis() as u64 => {
                    out.push(n)
                }
                _ => stale.push(uid),
            }
        }
        if !stale.is_empty() {
            let _: Result<(), _> = conn.hdel(&key, stale).await;
        }
        Ok(out)
    }

    fn is_healthy(&self) -> bool {
        self.shards.iter().all(|s| s.health.is_up())
    }
}

/// Nodes that did not announce within this time are dropped from the cluster view.
pub const NODE_TTL: Duration = Duration::from_secs(15);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_share_a_hash_tag_and_roundtrip() {
        let n = Names { prefix: "ff".into() };
        assert_eq!(n.stream("chat:1"), "ff.s.{chat:1}");
        assert_eq!(n.channel_of(&n.pubsub("a}b")), Some("a}b"));
        assert_eq!(n.channel_of("other"), None);
    }

    #[test]
    fn jump_hash_spreads_and_is_stable() {
        let mut counts = [0usize; 3];
        for i in 0..3000 {
            counts[jump_hash(fnv1a(&format!("ch{i}")), 3)] += 1;
        }
        assert!(counts.iter().all(|c| *c > 800), "{counts:?}");
        for i in 0..100 {
            let k = fnv1a(&format!("ch{i}"));
            let two = jump_hash(k, 2);
            let three = jump_hash(k, 3);
            assert!(three == two || three == 2, "moves only to the new shard");
        }
    }
}
