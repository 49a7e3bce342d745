//! Connections: the command connection (pipelined) and the pub/sub connection
//! (RESP3 pushes), for a standalone Redis or a Redis Cluster.

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncConnectionConfig, ClientTlsConfig, Cmd, Pipeline, PushInfo, RedisFuture, RedisResult,
    TlsCertificates, Value,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::mpsc::UnboundedSender;

use crate::sentinel::Sentinel;

/// How long one Redis command may take before the caller gets an error.
const COMMAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// TLS material for `rediss://` connections (`redis.tls_ca`, `redis.tls_cert`,
/// `redis.tls_key`), read once at start-up. Without a CA file the server
/// certificate is checked against the webpki roots (public CAs, as managed
/// Redis offerings use); the name checked is the URL's host (an IP host
/// needs an IP SAN). Applies to every connection to a `rediss://` URL: data
/// nodes, cluster nodes learnt from MOVED/CLUSTER SLOTS, sentinels.
#[derive(Clone, Default)]
pub struct Tls(Option<TlsCertificates>);

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (ca, cert) = match &self.0 {
            Some(c) => (c.root_cert.is_some(), c.client_tls.is_some()),
            None => (false, false),
        };
        f.debug_struct("Tls").field("ca_file", &ca).field("client_cert", &cert).finish()
    }
}

impl Tls {
    /// Reads and checks the PEM files; errors name the setting. Empty paths
    /// are unset; a certificate needs its key and the other way round.
    pub fn load(ca: &str, cert: &str, key: &str) -> Result<Tls, String> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        if ca.is_empty() && cert.is_empty() && key.is_empty() {
            return Ok(Tls(None));
        }
        if cert.is_empty() != key.is_empty() {
            let missing = if cert.is_empty() { "redis.tls_cert" } else { "redis.tls_key" };
            return Err(format!(
                "{missing}: needed with the other (a client certificate and its key)"
            ));
        }
        let read = |what: &str, path: &str| {
            std::fs::read(path).map_err(|e| format!("{what}: cannot read {path:?}: {e}"))
        };
        let certs = |what: &str, path: &str| -> Result<Vec<u8>, String> {
            let pem = read(what, path)?;
            let n = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("{what}: {path:?} is not PEM certificates: {e}"))?
                .len();
            if n == 0 {
                return Err(format!("{what}: {path:?} holds no PEM certificate"));
            }
            Ok(pem)
        };
        let root_cert = if ca.is_empty() { None } else { Some(certs("redis.tls_ca", ca)?) };
        let client_tls = if cert.is_empty() {
            None
        } else {
            let client_cert = certs("redis.tls_cert", cert)?;
            let client_key = read("redis.tls_key", key)?;
            PrivateKeyDer::from_pem_slice(&client_key)
                .map_err(|e| format!("redis.tls_key: {key:?} is not a PEM private key: {e}"))?;
            Some(ClientTlsConfig { client_cert, client_key })
        };
        Ok(Tls(Some(TlsCertificates { client_tls, root_cert })))
    }

    /// A client for `url`, with the TLS material when it is `rediss://`.
    pub fn client(&self, url: &str) -> RedisResult<redis::Client> {
        match &self.0 {
            Some(certs) if url.starts_with("rediss://") => {
                redis::Client::build_with_tls(url, certs.clone())
            }
            _ => redis::Client::open(url),
        }
    }

    /// A cluster client for `urls` (TLS when they are `rediss://`: redis-rs
    /// then uses TLS for every node it learns of, MOVED/ASK included).
    fn cluster(&self, urls: Vec<String>) -> ClusterClientBuilder {
        let tls = urls.first().is_some_and(|u| u.starts_with("rediss://"));
        let b = cluster_builder(urls);
        match &self.0 {
            Some(certs) if tls => b.certs(certs.clone()),
            _ => b,
        }
    }
}

/// A cluster client with our timeouts and retry pacing. redis-rs retries a
/// request that hit a dead node, MOVED, TRYAGAIN or CLUSTERDOWN, refreshing
/// the slot map from any node it is connected to; its default pacing waits at
/// least 1.28 s between tries (growing to minutes), which alone would keep a
/// channel unpublishable for seconds after its new master took over. Here a
/// retry waits 10-200 ms; the cost is a few more CLUSTER SLOTS while a slot has
/// no live master. With no response timeout a request to a node that stopped
/// answering would wait forever.
fn cluster_builder(urls: Vec<String>) -> ClusterClientBuilder {
    ClusterClientBuilder::new(urls)
        .response_timeout(COMMAND_TIMEOUT)
        .connection_timeout(std::time::Duration::from_secs(1))
        .min_retry_wait(10)
        .max_retry_wait(200)
        .retry_wait_formula(10, 2)
}

/// The command connection: reconnects by itself (standalone: `ConnectionManager`;
/// cluster: the cluster connection follows MOVED and re-connects nodes).
#[derive(Clone)]
pub enum CmdConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for CmdConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            CmdConn::Single(c) => c.req_packed_command(cmd),
            CmdConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            CmdConn::Single(c) => c.req_packed_commands(cmd, offset, count),
            CmdConn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            CmdConn::Single(c) => c.get_db(),
            CmdConn::Cluster(c) => c.get_db(),
        }
    }
}

/// The command connection of one Redis (or cluster) as the broker and the
/// subscription manager share it: replaceable, because after a cluster
/// topology change the manager swaps in a connection built on the new
/// topology (redis-rs' own connection can stay pinned to a master that hangs
/// instead of failing: its all-nodes PING keeps timing out on it, and nothing
/// makes it refresh the slot map). The lock is never held across an await.
#[derive(Clone)]
pub struct SharedCmd(Arc<std::sync::RwLock<CmdConn>>);

impl SharedCmd {
    pub fn new(conn: CmdConn) -> Self {
        Self(Arc::new(std::sync::RwLock::new(conn)))
    }

    /// The current connection (a cheap handle).
    pub fn get(&self) -> CmdConn {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn replace(&self, conn: CmdConn) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = conn;
    }
}

/// A new cluster command connection seeded with `nodes` (`host:port`), with
/// the credentials and options of `template`.
pub async fn open_cluster_cmd(tls: &Tls, template: &str, nodes: &[String]) -> RedisResult<CmdConn> {
    let client = tls.cluster(nodes.iter().map(|a| node_url(template, a)).collect()).build()?;
    Ok(CmdConn::Cluster(client.get_async_connection().await?))
}

/// Where pub/sub connections come from (kept to reconnect). One per shard,
/// owned by its manager and never moved on a hot path: the size difference
/// between the variants costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
pub enum PubSubTarget {
    /// `url`: the server connected to. With Sentinel it is the primary the
    /// sentinels named last (`template` with its `host:port`), and changes
    /// on failover ([`PubSubTarget::follow_sentinel`]).
    Single {
        url: String,
        client: redis::Client,
        tls: Tls,
        sentinel: Option<Arc<Sentinel>>,
        template: String,
    },
    /// `urls` are the configured seeds; `generation` counts the cluster pub/sub
    /// connections made, and only the newest one's pushes reach the node.
    Cluster { urls: Vec<String>, generation: Arc<AtomicU64>, tls: Tls },
}

/// A push with the generation of the connection it came from (always 0 for a
/// standalone Redis).
pub type Push = (u64, PushInfo);

/// A live pub/sub connection.
pub enum PubSubConn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

fn with_resp3(url: &str) -> String {
    if url.contains("protocol=") {
        url.to_string()
    } else if url.contains('?') {
        format!("{url}&protocol=resp3")
    } else {
        format!("{url}?protocol=resp3")
    }
}

/// Opens the command connection and describes the pub/sub target. With
/// `sentinel` the server is the primary the sentinels name, reached with the
/// scheme, credentials and database of `urls[0]`.
pub async fn open(
    urls: &[String],
    cluster: bool,
    tls: &Tls,
    sentinel: Option<Arc<Sentinel>>,
) -> RedisResult<(CmdConn, PubSubTarget)> {
    if cluster {
        let client = tls.cluster(urls.to_vec()).build()?;
        let cmd = client.get_async_connection().await?;
        let target = PubSubTarget::Cluster {
            urls: urls.to_vec(),
            generation: Arc::new(AtomicU64::new(0)),
            tls: tls.clone(),
        };
        Ok((CmdConn::Cluster(cmd), target))
    } else {
        let template = urls[0].clone();
        let url = match &sentinel {
            Some(s) => node_url(&template, &s.primary(&template, tls).await?),
            None => template.clone(),
        };
        let cmd = open_single_cmd(tls, &url).await?;
        let client = tls.client(&with_resp3(&url))?;
        let target = PubSubTarget::Single { url, client, tls: tls.clone(), sentinel, template };
        Ok((cmd, target))
    }
}

/// The command connection to one server. Made afresh on every pub/sub
/// reconnect (and swapped in): the one it replaces may be mid-way through its
/// own retries against the dead server, or (Sentinel) point at a demoted one.
pub async fn open_single_cmd(tls: &Tls, url: &str) -> RedisResult<CmdConn> {
    // The default 500 ms response timeout fails commands spuriously on a busy
    // machine. One quick retry per reconnect: while Redis is down every command
    // waits for the reconnect in progress, and the default (6 retries with
    // exponential backoff, ~9 s) would hold each API call that long.
    let cfg = ConnectionManagerConfig::new()
        .set_response_timeout(Some(COMMAND_TIMEOUT))
        .set_connection_timeout(Some(std::time::Duration::from_secs(2)))
        .set_min_delay(std::time::Duration::from_millis(10))
        .set_number_of_retries(1);
    Ok(CmdConn::Single(tls.client(url)?.get_connection_manager_with_config(cfg).await?))
}

impl PubSubTarget {
    /// The configured URLs (one for a standalone Redis).
    pub fn urls(&self) -> &[String] {
        match self {
            PubSubTarget::Single { url, .. } => std::slice::from_ref(url),
            PubSubTarget::Cluster { urls, .. } => urls,
        }
    }

    pub fn tls(&self) -> &Tls {
        match self {
            PubSubTarget::Single { tls, .. } | PubSubTarget::Cluster { tls, .. } => tls,
        }
    }

    pub fn is_sentinel(&self) -> bool {
        matches!(self, PubSubTarget::Single { sentinel: Some(_), .. })
    }

    /// Sentinel: asks for the current primary; when it moved, later
    /// connections go to the new one. True when it moved.
    pub async fn follow_sentinel(&mut self) -> RedisResult<bool> {
        let PubSubTarget::Single { url, client, tls, sentinel: Some(s), template } = self else {
            return Ok(false);
        };
        let now = node_url(template, &s.primary(template, tls).await?);
        if now == *url {
            return Ok(false);
        }
        *client = tls.client(&with_resp3(&now))?;
        *url = now;
        Ok(true)
    }

    /// The generation of the newest connection (see [`Push`]).
    pub fn generation(&self) -> u64 {
        match self {
            PubSubTarget::Single { .. } => 0,
            PubSubTarget::Cluster { generation, .. } => generation.load(Ordering::Acquire),
        }
    }

    /// For logs and errors: `host:port`s only (a URL may hold a password).
    pub fn describe(&self) -> String {
        match self {
            PubSubTarget::Single { sentinel: Some(s), .. } => {
                format!("sentinel master {}", s.master)
            }
            PubSubTarget::Single { url, .. } => url_addr(url),
            PubSubTarget::Cluster { urls, .. } => format!("cluster {}", addrs(urls)),
        }
    }

    /// A new pub/sub connection delivering pushes to `push`. A cluster
    /// connection starts from `known` (`host:port` of nodes learnt from the
    /// cluster: after failovers the seeds may be dead or replicas) or else the
    /// seeds, and
    /// silences the previous cluster connection: its remaining pushes
    /// (publications, its disconnection) are dropped, so the caller, which
    /// resubscribes and reports a gap, sees neither duplicates nor a stale
    /// disconnect.
    pub async fn connect(
        &self,
        push: UnboundedSender<Push>,
        known: &[String],
    ) -> RedisResult<PubSubConn> {
        match self {
            PubSubTarget::Single { client, .. } => {
                let cfg = AsyncConnectionConfig::new()
                    .set_push_sender(move |info| push.send((0, info)))
                    .set_connection_timeout(Some(std::time::Duration::from_secs(3)))
                    .set_response_timeout(Some(std::time::Duration::from_secs(10)));
                Ok(PubSubConn::Single(
                    client.get_multiplexed_async_connection_with_config(&cfg).await?,
                ))
            }
            PubSubTarget::Cluster { urls, generation, tls } => {
                // The nodes the cluster reports rather than the configured
                // seeds when known: the client waits for every seed's
                // connection attempt, and a dead seed that drops packets
                // would cost the whole connect timeout.
                let seeds: Vec<String> = if known.is_empty() {
                    urls.iter().map(|u| with_resp3(u)).collect()
                } else {
                    known.iter().map(|a| with_resp3(&node_url(&urls[0], a))).collect()
                };
                let current = generation.fetch_add(1, Ordering::AcqRel) + 1;
                let generation = generation.clone();
                let sender = move |info: PushInfo| {
                    if generation.load(Ordering::Acquire) != current {
                        return Ok(());
                    }
                    push.send((current, info))
                };
                let client = tls
                    .cluster(seeds)
                    .use_protocol(redis::ProtocolVersion::RESP3)
                    .push_sender(sender)
                    .build()?;
                Ok(PubSubConn::Cluster(client.get_async_connection().await?))
            }
        }
    }
}

/// The cluster as `CLUSTER SLOTS` on one live node reports it. Nodes are
/// `host:port`; [`node_url`] makes URLs with the configured credentials.
#[derive(Debug, Default, PartialEq)]
pub struct ClusterView {
    /// Every node: masters and replicas.
    pub nodes: Vec<String>,
    /// `(first slot, last slot, master)` per range, sorted.
    pub masters: Vec<(i64, i64, String)>,
}

/// The view of one node, through the command connection (any node).
pub async fn cluster_view(cmd: &mut CmdConn) -> RedisResult<ClusterView> {
    let ranges: Vec<Value> = redis::cmd("CLUSTER").arg("SLOTS").query_async(cmd).await?;
    Ok(parse_cluster_slots(ranges))
}

/// `template` (a configured URL: scheme, credentials, options) pointing at
/// `addr` (`host:port`) instead.
pub fn node_url(template: &str, addr: &str) -> String {
    let (scheme, rest) = template.split_once("://").unwrap_or(("redis", template));
    let (auth, rest) = match rest.split_once('@') {
        Some((auth, rest)) if !auth.contains('/') => (format!("{auth}@"), rest),
        _ => (String::new(), rest),
    };
    let tail = rest.find(['/', '?']).map_or("", |i| &rest[i..]);
    format!("{scheme}://{auth}{addr}{tail}")
}

/// `host:port` of a configured URL.
/// `host:port` of each URL, comma-separated: URLs as logs may show them.
pub fn addrs(urls: &[String]) -> String {
    urls.iter().map(|u| url_addr(u)).collect::<Vec<_>>().join(",")
}

pub fn url_addr(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.split(['/', '?']).next().unwrap_or(rest).to_string()
}

/// The view of the node at `addr`, over a connection of its own.
async fn node_view(tls: &Tls, template: &str, addr: &str) -> RedisResult<ClusterView> {
    let cfg = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(std::time::Duration::from_millis(500)))
        .set_response_timeout(Some(std::time::Duration::from_millis(500)));
    let url = node_url(template, addr);
    let mut c = tls.client(&url)?.get_multiplexed_async_connection_with_config(&cfg).await?;
    let ranges: Vec<Value> = redis::cmd("CLUSTER").arg("SLOTS").query_async(&mut c).await?;
    Ok(parse_cluster_slots(ranges))
}

/// A view every reachable node agrees on (after `patience`: the one most
/// nodes report), in which every slot range's master answers. Asks every node
/// of `known` and every node they report, each over a connection of its own
/// (`template`: the URL to take credentials and options from).
///
/// Right after a failover the nodes learn the new owner at slightly different
/// times. A pub/sub connection whose slot map comes from a node that has not
/// caught up sends SSUBSCRIBE to the old master, now a replica, which accepts
/// it (redis-rs sends READONLY) but gets the shard's publications only once
/// the new master knows it as its replica: a second or so of publications
/// would be missed without any sign. Slot ownership only moves forward, so
/// once every reachable node agrees, no later answer is older. And while a
/// slot's master is dead and not yet replaced, redis-rs would send the
/// SSUBSCRIBE to a random node (one of its replicas accepts it): an error
/// instead, so the caller keeps waiting for the promotion. Not through the
/// command connection: that may be stuck on a master that hangs. Cost: one
/// connection and CLUSTER SLOTS per node per try, only while reconnecting or
/// confirming a change.
pub async fn agreed_view(
    tls: &Tls,
    template: &str,
    known: &[String],
    patience: std::time::Duration,
) -> RedisResult<ClusterView> {
    let deadline = tokio::time::Instant::now() + patience;
    let mut ask: Vec<String> = known.to_vec();
    loop {
        let views =
            futures_util::future::join_all(ask.iter().map(|a| node_view(tls, template, a))).await;
        let answered: Vec<(&String, ClusterView)> =
            ask.iter().zip(views).filter_map(|(a, v)| Some((a, v.ok()?))).collect();
        let reported: Vec<String> = answered
            .iter()
            .flat_map(|(_, v)| v.nodes.iter())
            .filter(|n| !ask.contains(n))
            .cloned()
            .collect();
        if !reported.is_empty() {
            // Nodes we did not ask yet (ask only grows: bounded by the cluster).
            for n in reported {
                if !ask.contains(&n) {
                    ask.push(n);
                }
            }
            continue;
        }
        let agreed = answered.windows(2).all(|w| w[0].1.masters == w[1].1.masters);
        let late = tokio::time::Instant::now() >= deadline;
        // Out of patience (a node stays behind, e.g. cut off from the cluster
        // bus but not from us): the owners most nodes report.
        let chosen = if agreed {
            answered.first().map(|(_, v)| v)
        } else if late {
            answered
                .iter()
                .max_by_key(|(_, v)| {
                    answered.iter().filter(|(_, w)| w.masters == v.masters).count()
                })
                .map(|(_, v)| v)
        } else {
            None
        };
        if let Some(chosen) = chosen {
            let dead =
                chosen.masters.iter().find(|(_, _, m)| !answered.iter().any(|(a, _)| *a == m));
            if let Some((from, to, m)) = dead {
                let msg = format!("slots {from}-{to}: master {m} does not answer");
                return Err((redis::ErrorKind::Io, "cluster not ready", msg).into());
            }
            // The nodes that answered: the seeds of the new connections.
            let nodes = answered.iter().map(|(a, _)| (*a).clone()).collect();
            return Ok(ClusterView { nodes, masters: chosen.masters.clone() });
        }
        if late {
            return Err((redis::ErrorKind::Io, "no cluster node answers CLUSTER SLOTS").into());
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Parses `[[start, end, [host, port, id, ...] (master), [host, port, ...]
/// (replicas)...], ...]`.
fn parse_cluster_slots(ranges: Vec<Value>) -> ClusterView {
    let mut view = ClusterView::default();
    for range in ranges {
        let Value::Array(parts) = range else { continue };
        let (Some(Value::Int(start)), Some(Value::Int(end))) = (parts.first(), parts.get(1)) else {
            continue;
        };
        for (k, node) in parts.iter().skip(2).enumerate() {
            let Value::Array(node) = node else { continue };
            let host = match node.first() {
                Some(Value::BulkString(h)) => String::from_utf8_lossy(h).into_owned(),
                Some(Value::SimpleString(h)) => h.clone(),
                _ => continue,
            };
            let Some(Value::Int(port)) = node.get(1) else { continue };
            if host.is_empty() {
                continue;
            }
            let addr = if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            };
            if k == 0 {
                view.masters.push((*start, *end, addr.clone()));
            }
            if !view.nodes.contains(&addr) {
                view.nodes.push(addr);
            }
        }
    }
    view.masters.sort();
    view
}

/// CRC16 (XMODEM) as Redis Cluster uses it for key slots.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

/// The cluster slot of a key or channel name (hash tags honoured).
pub fn slot(name: &str) -> u16 {
    let b = name.as_bytes();
    let key = match b.iter().position(|&c| c == b'{') {
        Some(open) => match b[open + 1..].iter().position(|&c| c == b'}') {
            Some(len) if len > 0 => &b[open + 1..open + 1 + len],
            _ => b,
        },
        None => b,
    };
    crc16(key) % 16384
}

/// Largest number of channels in one SUBSCRIBE/UNSUBSCRIBE.
const CHUNK: usize = 1000;

impl PubSubConn {
    /// Subscribes to every name; one command per chunk (standalone) or per slot
    /// (cluster: SSUBSCRIBE needs all channels of one command on one slot).
    pub async fn subscribe(&mut self, names: &[String]) -> RedisResult<()> {
        match self {
            PubSubConn::Single(c) => {
                for chunk in names.chunks(CHUNK) {
                    c.subscribe(chunk).await?;
                }
                Ok(())
            }
            PubSubConn::Cluster(c) => {
                let calls = by_slot(names).into_iter().map(|group| {
                    let mut c = c.clone();
                    async move { c.ssubscribe(group).await }
                });
                for r in futures_util::future::join_all(calls).await {
                    r?;
                }
                Ok(())
            }
        }
    }

    pub async fn unsubscribe(&mut self, names: &[String]) -> RedisResult<()> {
        match self {
            PubSubConn::Single(c) => {
                for chunk in names.chunks(CHUNK) {
                    c.unsubscribe(chunk).await?;
                }
                Ok(())
            }
            PubSubConn::Cluster(c) => {
                let calls = by_slot(names).into_iter().map(|group| {
                    let mut c = c.clone();
                    async move { c.sunsubscribe(group).await }
                });
                for r in futures_util::future::join_all(calls).await {
                    r?;
                }
                Ok(())
            }
        }
    }

    /// A round trip proving the connection works.
    pub async fn ping(&mut self) -> RedisResult<()> {
        match self {
            PubSubConn::Single(c) => redis::cmd("PING").exec_async(c).await,
            PubSubConn::Cluster(c) => redis::cmd("PING").exec_async(c).await,
        }
    }
}

fn by_slot(names: &[String]) -> Vec<Vec<String>> {
    let mut groups: std::collections::BTreeMap<u16, Vec<String>> = Default::default();
    for n in names {
        groups.entry(slot(n)).or_default().push(n.clone());
    }
    groups
        .into_values()
        .flat_map(|g| g.chunks(CHUNK).map(|c| c.to_vec()).collect::<Vec<_>>())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from the Redis Cluster specification / CLUSTER KEYSLOT.
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("{user1000}.following"), slot("user1000"));
        assert_eq!(slot("a{}b"), crc16(b"a{}b") % 16384);
        assert_eq!(with_resp3("redis://h:1"), "redis://h:1?protocol=resp3");
        assert_eq!(with_resp3("redis://h:1/0"), "redis://h:1/0?protocol=resp3");
        assert_eq!(with_resp3("redis://h:1/0?x=1"), "redis://h:1/0?x=1&protocol=resp3");
    }

    #[test]
    fn cluster_slots_reply() {
        let node = |port: i64| {
            Value::Array(vec![
                Value::BulkString(b"127.0.0.1".to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let range = |a: i64, b: i64, nodes: Vec<Value>| {
            let mut v = vec![Value::Int(a), Value::Int(b)];
            v.extend(nodes);
            Value::Array(v)
        };
        let view = parse_cluster_slots(vec![
            range(5461, 16383, vec![node(2), node(4)]),
            range(0, 5460, vec![node(1), node(3)]),
        ]);
        let addr = |p: u16| format!("127.0.0.1:{p}");
        assert_eq!(view.masters, vec![(0, 5460, addr(1)), (5461, 16383, addr(2))]);
        assert_eq!(view.nodes, vec![addr(2), addr(4), addr(1), addr(3)]);
    }

    #[test]
    fn node_urls_keep_credentials_and_options() {
        assert_eq!(node_url("redis://h:1", "10.0.0.2:7000"), "redis://10.0.0.2:7000");
        assert_eq!(
            node_url("rediss://u:p@h:1/0?protocol=resp3", "10.0.0.2:7000"),
            "rediss://u:p@10.0.0.2:7000/0?protocol=resp3"
        );
        assert_eq!(url_addr("redis://u:p@h:1/0?x=1"), "h:1");
        assert_eq!(url_addr("redis://127.0.0.1:7000"), "127.0.0.1:7000");
    }
}
