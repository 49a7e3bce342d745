//! Configuration: built-in defaults < TOML file (`--config`) < `FANFARE__SECTION__KEY`
//! environment variables. Unknown keys and bad values stop start-up with an
//! error naming the key.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use fanfare_core::{AuthConfig, ChannelRules, Namespace, NodeConfig};
use serde::{Deserialize, Serialize};

#[derive(Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub node: NodeSection,
    pub http: HttpSection,
    pub grpc: GrpcSection,
    pub broker: BrokerSection,
    pub memory: MemorySection,
    pub redis: RedisSection,
    pub api: ApiSection,
    pub auth: AuthConfig,
    pub websocket: WebSocketSection,
    pub client: ClientSection,
    pub shutdown: ShutdownSection,
    pub log: LogSection,
    pub transports: TransportsSection,
    pub webhooks: WebhooksSection,
    pub limits: LimitsSection,
    pub admin: AdminSection,
    pub namespaces: Vec<Namespace>,
    /// Backends the node asks about clients (`client.connect_proxy`,
    /// namespace `subscribe_proxy`, ...), by name.
    pub proxies: Vec<ProxySection>,
}

/// One `[[proxies]]` entry: an application backend speaking Centrifugo's
/// proxy protocol.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySection {
    /// What `client.*_proxy` and the namespaces' `*_proxy` options name.
    pub name: String,
    /// `http://` or `https://` URL (each call is a JSON POST to it), or
    /// `grpc://host:port` (service `centrifugal.centrifugo.proxy.CentrifugoProxy`).
    pub endpoint: String,
    /// A call unanswered after this long fails: the client gets error 100.
    #[serde(with = "humantime_serde", default = "default_proxy_timeout")]
    pub timeout: Duration,
    /// Client request headers forwarded to the backend (as gRPC metadata for
    /// a gRPC one), e.g. `["Cookie", "Authorization"]`.
    #[serde(default)]
    pub http_headers: Vec<String>,
    /// Headers (metadata) added to every call of this proxy.
    #[serde(default)]
    pub static_headers: std::collections::BTreeMap<String, String>,
}

fn default_proxy_timeout() -> Duration {
    Duration::from_secs(1)
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeSection {
    /// Name shown by Info; default: the host name.
    pub name: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSection {
    pub listen: String,
    /// How long a request's head (request line and headers) may take to
    /// arrive. Counted from the moment the connection waits for one: after
    /// accept, and on a kept-alive connection after the previous response, so
    /// it is also how long an idle keep-alive connection stays open.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// How long a request's body (e.g. of `/api/*`) may take to arrive once
    /// its head is in.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// PEM certificate chain (leaf first) for TLS on this listener; with
    /// `tls_key`, the port speaks only TLS (WebSocket `wss://`, `https://`).
    /// Both files are read again on SIGHUP.
    pub tls_cert: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `tls_cert`.
    pub tls_key: String,
}

impl Default for HttpSection {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8000".into(),
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
            tls_cert: String::new(),
            tls_key: String::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcSection {
    pub listen: String,
    /// Dedicated threads serving gRPC connections (each a current-thread
    /// runtime; connections are dealt round-robin). 0 = half the CPUs, at
    /// least 1. Unary calls cost about half as much CPU there as on the shared
    /// runtime (docs/BENCHMARKS.md).
    pub threads: usize,
    /// PEM certificate chain for TLS on the gRPC port (ALPN `h2`); with
    /// `tls_key`, the port speaks only TLS. Read again on SIGHUP.
    pub tls_cert: String,
    /// PEM private key of `tls_cert`.
    pub tls_key: String,
}

impl Default for GrpcSection {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:9000".into(),
            threads: 0,
            tls_cert: String::new(),
            tls_key: String::new(),
        }
    }
}

impl GrpcSection {
    /// `threads`, with 0 resolved to half the CPUs (at least 1).
    pub fn worker_threads(&self) -> usize {
        if self.threads > 0 {
            return self.threads;
        }
        std::thread::available_parallelism().map(|n| n.get() / 2).unwrap_or(1).max(1)
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BrokerKind {
    #[default]
    Memory,
    Redis,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerSection {
    pub kind: BrokerKind,
}

/// The memory broker (`broker.kind = "memory"`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemorySection {
    /// How long a channel's offset and epoch survive after its last
    /// publication or its last local subscriber leaving (at least its history
    /// TTL; kept while subscribed here).
    #[serde(with = "humantime_serde")]
    pub history_meta_ttl: Duration,
    /// How often expired channel state is freed (a bounded number of
    /// channels each time).
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
}

impl Default for MemorySection {
    fn default() -> Self {
        Self {
            history_meta_ttl: fanfare_core::MemoryConfig::default().history_meta_ttl,
            sweep_interval: Duration::from_secs(1),
        }
    }
}

impl MemorySection {
    pub fn broker_config(&self) -> fanfare_core::MemoryConfig {
        fanfare_core::MemoryConfig { history_meta_ttl: self.history_meta_ttl }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSection {
    /// `redis://host:port` URLs: one Redis, several (channels sharded across
    /// them), or seed nodes of a Redis Cluster.
    pub urls: Vec<String>,
    pub cluster: bool,
    /// Prefix of every Redis key and pub/sub channel fanfare uses.
    pub prefix: String,
    /// How long a node stays subscribed after its last local subscriber left.
    #[serde(with = "humantime_serde")]
    pub unsubscribe_delay: Duration,
    /// How long a channel's offset and epoch survive after its last publication.
    #[serde(with = "humantime_serde")]
    pub history_meta_ttl: Duration,
    /// How long to keep trying to reach Redis at start-up.
    #[serde(with = "humantime_serde")]
    pub startup_timeout: Duration,
    /// `rediss://` only: PEM file of the CA that signed the Redis servers'
    /// certificates (empty: the public webpki roots).
    pub tls_ca: String,
    /// `rediss://` only: PEM client certificate (chain) and its private key,
    /// for a Redis with `tls-auth-clients yes` (empty: none).
    pub tls_cert: String,
    pub tls_key: String,
    /// Redis Sentinel: the sentinels (`redis://host:port`) to ask for the
    /// primary of `sentinel_master`. `urls` (one) then gives only the scheme,
    /// credentials and database of the primary's URL.
    pub sentinel_urls: Vec<String>,
    pub sentinel_master: String,
}

impl Default for RedisSection {
    fn default() -> Self {
        let d = fanfare_redis::RedisConfig::default();
        Self {
            urls: d.urls,
            cluster: d.cluster,
            prefix: d.prefix,
            unsubscribe_delay: d.unsubscribe_delay,
            history_meta_ttl: d.history_meta_ttl,
            startup_timeout: d.startup_timeout,
            tls_ca: d.tls_ca,
            tls_cert: d.tls_cert,
            tls_key: d.tls_key,
            sentinel_urls: d.sentinel_urls,
            sentinel_master: d.sentinel_master,
        }
    }
}

impl RedisSection {
    pub fn broker_config(&self) -> fanfare_redis::RedisConfig {
        fanfare_redis::RedisConfig {
            urls: self.urls.clone(),
            cluster: self.cluster,
            prefix: self.prefix.clone(),
            unsubscribe_delay: self.unsubscribe_delay,
            history_meta_ttl: self.history_meta_ttl,
            startup_timeout: self.startup_timeout,
            tls_ca: self.tls_ca.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            sentinel_urls: self.sentinel_urls.clone(),
            sentinel_master: self.sentinel_master.clone(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSection {
    /// Control API key; empty = loopback callers only.
    pub key: String,
    /// Largest API request (HTTP body or gRPC message) in bytes.
    pub max_request_size: usize,
    /// A repeated `idempotency_key` within this window publishes nothing.
    #[serde(with = "humantime_serde")]
    pub idempotency_window: Duration,
    /// Most channels in one Broadcast.
    pub max_broadcast_channels: usize,
    /// How long cluster-wide calls (Channels) wait for other nodes.
    #[serde(with = "humantime_serde")]
    pub cluster_timeout: Duration,
}

impl Default for ApiSection {
    fn default() -> Self {
        let l = fanfare_core::ApiLimits::default();
        Self {
            key: String::new(),
            max_request_size: 1 << 20,
            idempotency_window: l.idempotency_window,
            max_broadcast_channels: l.max_broadcast_channels,
            cluster_timeout: l.cluster_timeout,
        }
    }
}

impl ApiSection {
    pub fn context(&self) -> crate::api::ApiContext {
        crate::api::ApiContext {
            key: self.key.clone(),
            max_request_size: self.max_request_size,
            limits: fanfare_core::ApiLimits {
                max_broadcast_channels: self.max_broadcast_channels,
                idempotency_window: self.idempotency_window,
                cluster_timeout: self.cluster_timeout,
            },
            admin: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketSection {
    /// Allowed `Origin` header values; `*` allows any. Requests without an
    /// Origin header (non-browser clients) are always allowed.
    pub allowed_origins: Vec<String>,
    /// Largest client message in bytes; larger closes with 1009.
    pub max_message_size: usize,
    /// Largest socket read in bytes, through a buffer per worker thread (an idle
    /// connection keeps no read buffer of this size).
    pub read_buffer_size: usize,
    /// A write that does not finish within this time drops the connection.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
}

impl Default for WebSocketSection {
    fn default() -> Self {
        Self {
            allowed_origins: vec!["*".into()],
            max_message_size: 65536,
            read_buffer_size: 2048,
            write_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientSection {
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub pong_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Bound of each connection's outbound queue in bytes; overflow closes 3008.
    pub queue_max_size: usize,
    pub max_channels: usize,
    #[serde(with = "humantime_serde")]
    pub presence_ttl: Duration,
    /// Publications wait up to this long for others bound for the same
    /// connection, so they share one socket write (0 = written at once).
    #[serde(with = "humantime_serde")]
    pub write_delay: Duration,
    /// Largest publication data in bytes on every path (client publish, HTTP
    /// and gRPC API); at most a quarter of `queue_max_size`, so one
    /// publication never overflows a subscriber's queue by itself. 0 (the
    /// default) = 64 KiB or a quarter of `queue_max_size`, whichever is less.
    pub max_publication_size: usize,
    /// Deepest nesting of arrays and objects in publication data (1-128).
    pub max_publication_depth: usize,
    /// Most publications a recovering subscribe returns; a client further
    /// behind gets `recovered: false` (Centrifugo's default: 300).
    pub recovery_max_publication_limit: usize,
    /// Most publications in one client `history` reply.
    pub history_max_publication_limit: usize,
    /// The `[[proxies]]` entry asked who a client connecting without a token
    /// is (cookie or header auth); empty = none.
    pub connect_proxy: String,
    /// The `[[proxies]]` entry asked when a connection's `expire_at` passes
    /// (the node refreshes it; clients are not asked for tokens); empty = none.
    pub refresh_proxy: String,
    /// The `[[proxies]]` entry that answers client RPC commands (and the
    /// Centrifugo-compatible API's `rpc`); empty = none (108).
    pub rpc_proxy: String,
}

impl Default for ClientSection {
    fn default() -> Self {
        let n = NodeConfig::default();
        Self {
            max_publication_size: 0,
            max_publication_depth: n.data_rules.max_depth,
            recovery_max_publication_limit: n.recovery_max_publications,
            history_max_publication_limit: n.history_max_publications,
            ping_interval: n.ping_interval,
            pong_timeout: n.pong_timeout,
            connect_timeout: n.connect_timeout,
            queue_max_size: n.max_queue_bytes,
            max_channels: n.max_channels,
            presence_ttl: n.presence_ttl,
            write_delay: n.write_delay,
            connect_proxy: String::new(),
            refresh_proxy: String::new(),
            rpc_proxy: String::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownSection {
    /// After SIGTERM, how long `/ready` answers 503 while clients keep
    /// working, so load balancers stop sending new ones before any is closed.
    #[serde(with = "humantime_serde")]
    pub drain_delay: Duration,
    /// Over how long the clients are then closed with 3001, evenly, so their
    /// reconnects reach the other nodes at a steady rate.
    #[serde(with = "humantime_serde")]
    pub drain_period: Duration,
    /// After the period: how long closes may take to reach the clients, and
    /// in-flight API calls and webhooks to finish, before the node exits.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

impl Default for ShutdownSection {
    /// 5 s + 10 s + 5 s: within Kubernetes' default 30 s grace period even
    /// after a 5 s preStop sleep.
    fn default() -> Self {
        Self {
            drain_delay: Duration::from_secs(5),
            drain_period: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(5),
        }
    }
}

/// Transports besides the bidirectional WebSocket (always on), each switched
/// on by itself. The browser fallbacks (HTTP streaming, SSE) are on by
/// default, so centrifuge-js falls back out of the box (Centrifugo has them
/// off); the unidirectional ones are off, as in Centrifugo: they let a client
/// without an SDK hold a connection.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransportsSection {
    /// `GET /connection/uni_sse` (Server-Sent Events, resumable with `Last-Event-ID`).
    pub uni_sse: bool,
    /// `POST /connection/uni_http_stream` (newline-delimited JSON stream).
    pub uni_http_stream: bool,
    /// `/connection/uni_websocket` (connect request as the first message,
    /// then one push per WebSocket message).
    pub uni_websocket: bool,
    /// `POST /connection/http_stream` with `POST /emulation` (bidirectional
    /// emulation, JSON or Protobuf).
    pub http_stream: bool,
    /// `GET /connection/sse` with `POST /emulation` (bidirectional
    /// emulation, JSON).
    pub sse: bool,
}

impl Default for TransportsSection {
    fn default() -> Self {
        Self {
            uni_sse: false,
            uni_http_stream: false,
            uni_websocket: false,
            http_stream: true,
            sse: true,
        }
    }
}

/// Abuse limits (decision 29, docs/SECURITY.md "Limits"). Each has a finite
/// default; 0 turns one off. Refusals are counted in
/// `fanfare_limit_refusals_total{limit}`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Most client connections open on this node; past it a new one is
    /// answered 503 before the upgrade.
    pub node_connections: usize,
    /// Most connections of one user on this node; one more is closed with
    /// 3504 after its connect (anonymous connections are not counted).
    pub user_connections: usize,
    /// New connections per second on this node (a second of it as burst);
    /// past it 503 before the upgrade.
    pub connect_rate: u32,
    /// New connections per second from one client IP (IPv6: one /64), a
    /// second of it as burst; past it 429 before the upgrade.
    pub ip_connect_rate: u32,
    /// Commands per second one connection may send; past it error 111.
    pub client_commands: u32,
    /// Commands a connection may send at once; past another burst of 111s
    /// it is closed with 3013.
    pub client_command_burst: u32,
    /// Commands per second of all connections of one user on this node; past
    /// it error 111.
    pub user_commands: u32,
    /// Reverse proxies (CIDRs, e.g. `10.0.0.0/8`, `127.0.0.1/32`) whose
    /// `X-Forwarded-For` / `X-Real-IP` name the client for `ip_connect_rate`;
    /// other peers are counted by their own address.
    pub trusted_proxies: Vec<String>,
}

impl Default for LimitsSection {
    fn default() -> Self {
        let core = fanfare_core::Limits::default();
        Self {
            node_connections: 100_000,
            user_connections: core.user_connections,
            connect_rate: 10_000,
            // A reconnect storm of thousands of users behind one NAT (and the
            // test suites, connecting thousands from 127.0.0.1) passes; one
            // host still gets at most half of `connect_rate`.
            ip_connect_rate: 5_000,
            client_commands: core.client_commands,
            client_command_burst: core.client_command_burst,
            user_commands: core.user_commands,
            trusted_proxies: Vec::new(),
        }
    }
}

impl LimitsSection {
    /// The limits the sessions enforce.
    pub fn core(&self) -> fanfare_core::Limits {
        fanfare_core::Limits {
            user_connections: self.user_connections,
            client_commands: self.client_commands,
            client_command_burst: self.client_command_burst,
            user_commands: self.user_commands,
        }
    }

    /// `trusted_proxies` parsed (validated at load).
    pub fn trusted(&self) -> anyhow::Result<Vec<crate::limits::Cidr>> {
        self.trusted_proxies
            .iter()
            .map(|c| c.parse().map_err(|e| anyhow::anyhow!("limits.trusted_proxies: {c:?}: {e}")))
            .collect()
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.client_commands > 0 && self.client_command_burst == 0 {
            bail!(
                "limits.client_command_burst: must be at least 1 while limits.client_commands is on"
            );
        }
        if self.client_command_burst > 1_000_000 {
            bail!("limits.client_command_burst: must be at most 1000000");
        }
        self.trusted()?;
        Ok(())
    }
}

/// The admin console at `/admin` (decision 33). Off by default; on, it needs
/// a password (plain or an Argon2 PHC hash) and a secret signing its
/// session tokens.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    /// Serve `/admin` and accept its session tokens on `/api/*`.
    pub enabled: bool,
    /// The console's password, compared in constant time; or use `password_hash`.
    pub password: String,
    /// An Argon2 PHC string (`$argon2id$v=19$m=...`) of the password, e.g.
    /// from `argon2` or `python3 -m argon2`; exclusive with `password`.
    pub password_hash: String,
    /// HMAC-SHA256 key of the session tokens, at least 32 characters (e.g.
    /// `openssl rand -hex 32`). Changing it signs every console out.
    pub secret: String,
    /// How long a session token is valid after sign-in.
    #[serde(with = "humantime_serde")]
    pub session_ttl: Duration,
}

impl Default for AdminSection {
    fn default() -> Self {
        Self {
            enabled: false,
            password: String::new(),
            password_hash: String::new(),
            secret: String::new(),
            session_ttl: Duration::from_secs(8 * 3600),
        }
    }
}

/// The shortest `admin.secret`: 32 characters, e.g. 16 random bytes in hex
/// (128 bits); HMAC-SHA256 keys shorter than that are guessable offline from
/// one token.
pub const ADMIN_SECRET_MIN: usize = 32;

impl AdminSection {
    fn validate(&self) -> anyhow::Result<()> {
        if !self.enabled {
            return Ok(());
        }
        match (self.password.is_empty(), self.password_hash.is_empty()) {
            (true, true) => bail!(
                "admin.password: admin.enabled = true needs admin.password or admin.password_hash"
            ),
            (false, false) => {
                bail!("admin.password_hash: set admin.password or admin.password_hash, not both")
            }
            (true, false) => {
                crate::admin::parse_hash(&self.password_hash).map_err(|e| {
                    anyhow::anyhow!("admin.password_hash: not an Argon2 PHC string: {e}")
                })?;
            }
            (false, true) => {}
        }
        if self.secret.is_empty() {
            bail!("admin.secret: admin.enabled = true needs a secret for the session tokens");
        }
        if self.secret.len() < ADMIN_SECRET_MIN {
            bail!(
                "admin.secret: must be at least {ADMIN_SECRET_MIN} characters (e.g. `openssl rand -hex 32`)"
            );
        }
        if self.session_ttl < Duration::from_secs(1)
            || self.session_ttl > Duration::from_secs(7 * 86400)
        {
            bail!("admin.session_ttl: must be between 1s and 7d");
        }
        Ok(())
    }
}

/// Lifecycle webhooks (decision 26): events POSTed as signed JSON batches.
/// Off while `url` is empty.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksSection {
    /// `http://host:port/path` of the receiver; empty = webhooks off.
    pub url: String,
    /// HMAC-SHA256 key of the `X-Fanfare-Signature` header.
    pub secret: String,
    /// Events to send: connect, disconnect, subscribe, unsubscribe,
    /// channel_occupied, channel_vacated, presence_join, presence_leave.
    pub events: Vec<String>,
    /// How long one POST may take until its answer.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Most events in one POST.
    pub batch_size: usize,
    /// Most undelivered events held (memory broker: in this process; Redis:
    /// in the outbox stream and in each node's hand-off to it); more are
    /// dropped and counted in `fanfare_webhook_dropped_total`.
    pub queue_size: usize,
    /// Wait before the first retry of a failed POST; doubled per failure.
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// Longest wait between retries.
    #[serde(with = "humantime_serde")]
    pub retry_backoff_max: Duration,
    /// Failed POSTs of one batch before it is dropped (counted); 0 = retry
    /// until delivered (order and completeness over freshness).
    pub max_attempts: u32,
    /// Redis broker: lifetime of the delivery lease and of each node's
    /// liveness key, so how long a crashed node's undelivered batch and
    /// channels wait before another node takes them over.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
}

impl Default for WebhooksSection {
    fn default() -> Self {
        Self {
            url: String::new(),
            secret: String::new(),
            events: Vec::new(),
            timeout: Duration::from_secs(5),
            batch_size: 100,
            queue_size: 100_000,
            retry_backoff: Duration::from_millis(500),
            retry_backoff_max: Duration::from_secs(30),
            max_attempts: 0,
            lease_ttl: Duration::from_secs(10),
        }
    }
}

impl WebhooksSection {
    pub fn enabled(&self) -> bool {
        !self.url.is_empty()
    }

    /// `events` as a set (validated).
    pub fn mask(&self) -> anyhow::Result<fanfare_core::EventMask> {
        let mut mask = fanfare_core::EventMask::default();
        for name in &self.events {
            let Some(kind) = fanfare_core::EventKind::parse(name) else {
                let known: Vec<&str> =
                    fanfare_core::EventKind::ALL.iter().map(|k| k.name()).collect();
                bail!("webhooks.events: unknown event {name:?} (known: {})", known.join(", "));
            };
            mask = mask.with(kind);
        }
        Ok(mask)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let mask = self.mask()?;
        if !self.enabled() {
            if !mask.is_empty() {
                bail!("webhooks.url: must be set when webhooks.events names events");
            }
            return Ok(());
        }
        // Messages show the URL masked: it may hold a password.
        let shown = mask_userinfo(&self.url);
        let uri: http::Uri = self
            .url
            .parse()
            .map_err(|e| anyhow::anyhow!("webhooks.url: {shown:?} is not a URL: {e}"))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            bail!("webhooks.url: {shown:?} must be an http(s)://host[:port]/path URL");
        }
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            bail!(
                "webhooks.url: user:password@ is not sent by the HTTP client (and would reach \
                 its logs); receivers authenticate calls by the webhooks.secret signature"
            );
        }
        if self.secret.is_empty() {
            bail!("webhooks.secret: must be set when webhooks.url is set (receivers verify it)");
        }
        if mask.is_empty() {
            bail!("webhooks.events: must name at least one event when webhooks.url is set");
        }
        if self.timeout < Duration::from_millis(10) || self.timeout > Duration::from_secs(300) {
            bail!("webhooks.timeout: must be between 10ms and 5m");
        }
        if !(1..=10_000).contains(&self.batch_size) {
            bail!("webhooks.batch_size: must be between 1 and 10000");
        }
        if self.queue_size < self.batch_size {
            bail!("webhooks.queue_size: must be at least webhooks.batch_size");
        }
        if self.retry_backoff < Duration::from_millis(1) {
            bail!("webhooks.retry_backoff: must be at least 1ms");
        }
        if self.retry_backoff_max < self.retry_backoff {
            bail!("webhooks.retry_backoff_max: must be at least webhooks.retry_backoff");
        }
        if self.lease_ttl < Duration::from_millis(300) {
            bail!("webhooks.lease_ttl: must be at least 300ms");
        }
        if self.timeout >= self.lease_ttl {
            bail!(
                "webhooks.timeout: must be shorter than webhooks.lease_ttl (a POST must end \
                 while its node still holds the delivery lease)"
            );
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// `tracing` filter, e.g. `info` or `fanfare=debug`; `RUST_LOG` overrides it.
    pub level: String,
    /// `text` (human-readable lines) or `json` (one object per line, span
    /// fields such as `client` and `request_id` included).
    pub format: LogFormat,
}

impl Default for LogSection {
    fn default() -> Self {
        Self { level: "info".into(), format: LogFormat::Text }
    }
}

/// `log.format`.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The certificate and key files of a listener's TLS, when both are set.
fn tls_files<'a>(
    listener: &str,
    cert: &'a str,
    key: &'a str,
) -> anyhow::Result<Option<(&'a Path, &'a Path)>> {
    match (cert.is_empty(), key.is_empty()) {
        (true, true) => Ok(None),
        (false, false) => Ok(Some((Path::new(cert), Path::new(key)))),
        (false, true) => bail!("{listener}.tls_key: must be set when {listener}.tls_cert is"),
        (true, false) => bail!("{listener}.tls_cert: must be set when {listener}.tls_key is"),
    }
}

/// Keys the environment may give as comma-separated lists.
const LIST_KEYS: &[&str] = &[
    "redis.urls",
    "redis.sentinel_urls",
    "websocket.allowed_origins",
    "webhooks.events",
    "limits.trusted_proxies",
];

/// Refuses a top-level TOML key with `[` or `]`: the config crate reads it
/// as an array index (see [`Settings::build`]), and a large one aborts the
/// process allocating the array. Text that is not TOML passes: the config
/// crate reports that itself.
fn refuse_index_keys_in_toml(text: &str) -> anyhow::Result<()> {
    if let Ok(table) = text.parse::<toml::Table>()
        && let Some(k) = table.keys().find(|k| k.contains(['[', ']']))
    {
        bail!("key {k:?} is not a configuration key ('[' and ']' are not allowed)");
    }
    Ok(())
}

impl Settings {
    /// Loads defaults, then the file (if any), then the environment.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        let env: std::collections::HashMap<String, String> =
            std::env::vars().filter(|(k, _)| k.starts_with("FANFARE__")).collect();
        Self::load_with_env(file, env)
    }

    /// [`Settings::load`] with the environment given as a map (for tests).
    pub fn load_with_env(
        file: Option<&Path>,
        env: std::collections::HashMap<String, String>,
    ) -> anyhow::Result<Self> {
        let mut b = config::Config::builder();
        if let Some(path) = file {
            if !path.exists() {
                bail!("config file {} does not exist", path.display());
            }
            // Unreadable or malformed files are left to the config crate,
            // whose errors name the file and line.
            if let Ok(text) = std::fs::read_to_string(path) {
                refuse_index_keys_in_toml(&text)
                    .map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))?;
            }
            b = b.add_source(config::File::from(path).format(config::FileFormat::Toml));
        }
        Self::build(b, env)
    }

    /// [`Settings::load_with_env`] with the file given as TOML text (for the
    /// config fuzz target).
    #[cfg(feature = "fuzzing")]
    #[allow(dead_code)] // compiled into the binary too, used by the library
    pub fn from_toml_with_env(
        toml: &str,
        env: std::collections::HashMap<String, String>,
    ) -> anyhow::Result<Self> {
        refuse_index_keys_in_toml(toml)?;
        let b = config::Config::builder()
            .add_source(config::File::from_str(toml, config::FileFormat::Toml));
        Self::build(b, env)
    }

    fn build(
        mut b: config::ConfigBuilder<config::builder::DefaultState>,
        env: std::collections::HashMap<String, String>,
    ) -> anyhow::Result<Self> {
        // The config crate reads `[N]` in a key as an array index and grows
        // the array to it: `FANFARE__X[5333333333]__Y=` asked for 512 GB and
        // aborted the process (found by the `config` fuzz target). No key of
        // ours has brackets.
        if let Some(k) = env.keys().find(|k| k.contains(['[', ']'])) {
            bail!(
                "environment variable {k}: not a configuration key ('[' and ']' are not allowed)"
            );
        }
        // Values stay strings here (serde converts them to the field's type), so a
        // secret such as "00123" is not turned into the number 123.
        let mut lists = Vec::new();
        for k in LIST_KEYS {
            let var = format!("FANFARE__{}", k.to_uppercase().replace('.', "__"));
            if let Some(v) = env.get(&var) {
                let items: Vec<String> =
                    v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
                lists.push((*k, items));
            }
        }
        b = b.add_source(
            config::Environment::with_prefix("FANFARE")
                .prefix_separator("__")
                .separator("__")
                .source(Some(env.into_iter().collect())),
        );
        for (k, items) in lists {
            b = b.set_override(k, items).map_err(|e| anyhow::anyhow!("{k}: {e}"))?;
        }
        let cfg = b.build().map_err(|e| anyhow::anyhow!("{e}"))?;
        let settings: Settings = serde_path_to_error::deserialize(cfg).map_err(|e| {
            let path = e.path().to_string();
            anyhow::anyhow!("invalid configuration at `{path}`: {}", e.into_inner())
        })?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate_redis_tls_and_sentinel(&self) -> anyhow::Result<()> {
        let r = &self.redis;
        let tls_set = [&r.tls_ca, &r.tls_cert, &r.tls_key].iter().any(|p| !p.is_empty());
        if tls_set && self.broker.kind == BrokerKind::Redis {
            let any_tls = r.urls.iter().chain(&r.sentinel_urls).any(|u| u.starts_with("rediss://"));
            if !any_tls {
                bail!(
                    "redis.tls_ca: TLS files are set but no redis.urls/redis.sentinel_urls entry is rediss://"
                );
            }
            fanfare_redis::check_tls(&r.tls_ca, &r.tls_cert, &r.tls_key)
                .map_err(|e| anyhow::anyhow!(e))?;
        }
        for u in &r.sentinel_urls {
            if !(u.starts_with("redis://") || u.starts_with("rediss://")) {
                bail!("redis.sentinel_urls: {u:?} must start with redis:// or rediss://");
            }
        }
        if !r.sentinel_urls.is_empty() {
            if r.sentinel_master.is_empty() {
                bail!(
                    "redis.sentinel_master: needed with redis.sentinel_urls (the monitored master's name)"
                );
            }
            if r.cluster {
                bail!("redis.sentinel_urls: Sentinel and redis.cluster = true exclude each other");
            }
            if r.urls.len() != 1 {
                bail!(
                    "redis.urls: with redis.sentinel_urls give one URL (scheme, credentials and database of the primary)"
                );
            }
        } else if !r.sentinel_master.is_empty() {
            bail!("redis.sentinel_urls: needed with redis.sentinel_master");
        }
        Ok(())
    }

    fn validate(&self) -> anyhow::Result<()> {
        self.http_addr()?;
        self.http_tls()?;
        self.grpc_tls()?;
        self.grpc.listen.parse::<SocketAddr>().with_context(|| {
            format!("grpc.listen: {:?} is not an address like 0.0.0.0:9000", self.grpc.listen)
        })?;
        if self.broker.kind == BrokerKind::Redis && self.redis.urls.is_empty() {
            bail!("redis.urls: at least one URL is needed when broker.kind = \"redis\"");
        }
        if self.redis.prefix.is_empty() || self.redis.prefix.contains(['{', '}']) {
            bail!("redis.prefix: must be non-empty and contain no braces");
        }
        for u in &self.redis.urls {
            if !(u.starts_with("redis://") || u.starts_with("rediss://")) {
                bail!("redis.urls: {u:?} must start with redis:// or rediss://");
            }
        }
        self.validate_redis_tls_and_sentinel()?;
        if self.memory.sweep_interval < Duration::from_millis(10)
            || self.memory.sweep_interval > Duration::from_secs(60)
        {
            bail!("memory.sweep_interval: must be between 10ms and 60s");
        }
        if self.api.max_request_size < 1024 {
            bail!("api.max_request_size: must be at least 1024 bytes");
        }
        if self.api.max_broadcast_channels == 0 {
            bail!("api.max_broadcast_channels: must be at least 1");
        }
        if self.websocket.max_message_size < 128 {
            bail!("websocket.max_message_size: must be at least 128 bytes");
        }
        if !(64..=1 << 20).contains(&self.websocket.read_buffer_size) {
            bail!("websocket.read_buffer_size: must be between 64 and 1048576 bytes");
        }
        if self.client.ping_interval < Duration::from_secs(1) {
            bail!("client.ping_interval: must be at least 1s");
        }
        if self.client.pong_timeout.is_zero()
            || self.client.pong_timeout >= self.client.ping_interval
        {
            bail!("client.pong_timeout: must be positive and shorter than client.ping_interval");
        }
        if self.client.write_delay > Duration::from_secs(1)
            || (!self.client.write_delay.is_zero()
                && self.client.write_delay < Duration::from_millis(1))
        {
            bail!(
                "client.write_delay: must be 0 or between 1ms (the timer's resolution) and 1s \
                 (it delays every publication)"
            );
        }
        if self.client.queue_max_size < 1024 {
            bail!("client.queue_max_size: must be at least 1024 bytes");
        }
        if self.client.max_publication_size > self.client.queue_max_size / 4 {
            bail!(
                "client.max_publication_size: must be at most a quarter of \
                 client.queue_max_size ({} bytes), so one publication cannot overflow a \
                 subscriber's queue",
                self.client.queue_max_size / 4
            );
        }
        if !(1..=128).contains(&self.client.max_publication_depth) {
            bail!("client.max_publication_depth: must be between 1 and 128");
        }
        if self.client.recovery_max_publication_limit == 0 {
            bail!("client.recovery_max_publication_limit: must be at least 1");
        }
        if self.client.history_max_publication_limit == 0 {
            bail!("client.history_max_publication_limit: must be at least 1");
        }
        for (key, d) in [
            ("http.header_read_timeout", self.http.header_read_timeout),
            ("http.body_read_timeout", self.http.body_read_timeout),
        ] {
            if d < Duration::from_millis(100) || d > Duration::from_secs(3600) {
                bail!("{key}: must be between 100ms and 1h");
            }
        }
        for (key, d) in [
            ("shutdown.drain_delay", self.shutdown.drain_delay),
            ("shutdown.drain_period", self.shutdown.drain_period),
            ("shutdown.drain_timeout", self.shutdown.drain_timeout),
        ] {
            if d > Duration::from_secs(3600) {
                bail!("{key}: must be at most 1h");
            }
        }
        for (i, ns) in self.namespaces.iter().enumerate() {
            if ns.history_size > 0 && ns.history_ttl.is_zero() {
                bail!("namespaces[{i}].history_ttl: must be set when history_size > 0");
            }
        }
        self.webhooks.validate()?;
        self.limits.validate()?;
        self.admin.validate()?;
        self.channel_rules()?;
        fanfare_core::Authenticator::new(&self.auth).map_err(|e| anyhow::anyhow!(e))?;
        crate::jwks::validate(&self.auth)?;
        self.validate_proxies()
    }

    fn validate_proxies(&self) -> anyhow::Result<()> {
        let mut names = std::collections::HashSet::new();
        for (i, p) in self.proxies.iter().enumerate() {
            if p.name.is_empty() {
                bail!("proxies[{i}].name: must not be empty");
            }
            if !names.insert(p.name.as_str()) {
                bail!("proxies[{i}].name: {:?} is used by another [[proxies]] entry", p.name);
            }
            crate::proxy::Endpoint::parse(&p.endpoint).map_err(|e| {
                let e = e.replace(&p.endpoint, &mask_userinfo(&p.endpoint));
                anyhow::anyhow!("proxies[{i}].endpoint: {e}")
            })?;
            if mask_userinfo(&p.endpoint) != p.endpoint {
                bail!(
                    "proxies[{i}].endpoint: user:password@ is not sent (and would reach the \
                     HTTP client's logs); put credentials in static_headers (e.g. Authorization)"
                );
            }
            if p.timeout < Duration::from_millis(10) || p.timeout > Duration::from_secs(60) {
                bail!("proxies[{i}].timeout: must be between 10ms and 60s");
            }
            for h in &p.http_headers {
                if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                    bail!("proxies[{i}].http_headers: {h:?} is not a header name");
                }
            }
            for (k, v) in &p.static_headers {
                if http::HeaderName::from_bytes(k.as_bytes()).is_err()
                    || http::HeaderValue::from_str(v).is_err()
                {
                    bail!("proxies[{i}].static_headers: {k:?} = {v:?} is not a valid header");
                }
            }
        }
        let known = |key: String, name: &str| {
            if name.is_empty() || names.contains(name) {
                Ok(())
            } else {
                Err(anyhow::anyhow!("{key}: no [[proxies]] entry is named {name:?}"))
            }
        };
        known("client.connect_proxy".into(), &self.client.connect_proxy)?;
        known("client.refresh_proxy".into(), &self.client.refresh_proxy)?;
        known("client.rpc_proxy".into(), &self.client.rpc_proxy)?;
        for (i, ns) in self.namespaces.iter().enumerate() {
            known(format!("namespaces[{i}].subscribe_proxy"), &ns.subscribe_proxy)?;
            known(format!("namespaces[{i}].publish_proxy"), &ns.publish_proxy)?;
            known(format!("namespaces[{i}].sub_refresh_proxy"), &ns.sub_refresh_proxy)?;
        }
        Ok(())
    }

    pub fn http_addr(&self) -> anyhow::Result<SocketAddr> {
        self.http.listen.parse().with_context(|| {
            format!("http.listen: {:?} is not an address like 0.0.0.0:8000", self.http.listen)
        })
    }

    pub fn channel_rules(&self) -> anyhow::Result<ChannelRules> {
        ChannelRules::new(self.namespaces.clone()).map_err(|e| anyhow::anyhow!(e))
    }

    pub fn node_config(&self) -> NodeConfig {
        let name = if self.node.name.is_empty() { hostname() } else { self.node.name.clone() };
        NodeConfig {
            name,
            ping_interval: self.client.ping_interval,
            pong_timeout: self.client.pong_timeout,
            connect_timeout: self.client.connect_timeout,
            max_queue_bytes: self.client.queue_max_size,
            max_channels: self.client.max_channels,
            presence_ttl: self.client.presence_ttl,
            write_delay: self.client.write_delay,
            data_rules: fanfare_core::DataRules {
                max_size: self.max_publication_size(),
                max_depth: self.client.max_publication_depth,
            },
            recovery_max_publications: self.client.recovery_max_publication_limit,
            history_max_publications: self.client.history_max_publication_limit,
            limits: self.limits.core(),
            ..NodeConfig::default()
        }
    }

    /// `client.max_publication_size` with 0 resolved.
    pub fn max_publication_size(&self) -> usize {
        match self.client.max_publication_size {
            0 => (self.client.queue_max_size / 4).min(fanfare_core::DataRules::default().max_size),
            n => n,
        }
    }

    /// `http.tls_cert` and `http.tls_key`, when TLS is on for the HTTP port.
    pub fn http_tls(&self) -> anyhow::Result<Option<(&Path, &Path)>> {
        tls_files("http", &self.http.tls_cert, &self.http.tls_key)
    }

    /// `grpc.tls_cert` and `grpc.tls_key`, when TLS is on for the gRPC port.
    pub fn grpc_tls(&self) -> anyhow::Result<Option<(&Path, &Path)>> {
        tls_files("grpc", &self.grpc.tls_cert, &self.grpc.tls_key)
    }

    /// The effective configuration as TOML, secrets masked.
    pub fn to_masked_toml(&self) -> String {
        let mut s = self.clone();
        for secret in [
            &mut s.api.key,
            &mut s.auth.hmac_secret,
            &mut s.auth.hmac_previous_secret,
            &mut s.webhooks.secret,
            &mut s.admin.password,
            &mut s.admin.password_hash,
            &mut s.admin.secret,
        ] {
            if !secret.is_empty() {
                *secret = MASK.into();
            }
        }
        // Passwords in URLs (redis://:pw@host) and static proxy headers
        // (often `Authorization`) are secrets too.
        for url in s.redis.urls.iter_mut().chain([&mut s.webhooks.url]) {
            *url = mask_userinfo(url);
        }
        s.auth.jwks_url = crate::jwks::shown_url(&s.auth.jwks_url);
        for p in &mut s.proxies {
            p.endpoint = mask_userinfo(&p.endpoint);
            for v in p.static_headers.values_mut() {
                *v = MASK.into();
            }
        }
        toml::to_string_pretty(&s).unwrap_or_else(|e| format!("# cannot render: {e}"))
    }
}

/// What a masked secret reads as.
const MASK: &str = "********";

/// `scheme://user:password@host/...` with the user and password masked.
pub fn mask_userinfo(url: &str) -> String {
    let Some(start) = url.find("://").map(|i| i + 3) else { return url.to_string() };
    let authority_end = url[start..].find(['/', '?', '#']).map_or(url.len(), |i| start + i);
    match url[start..authority_end].rfind('@') {
        Some(at) => format!("{}{MASK}{}", &url[..start], &url[start + at..]),
        None => url.to_string(),
    }
}

/// The configuration as `check-config` prints it: secrets masked, so that a
/// `{:?}` in a log line cannot leak them either.
impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_masked_toml())
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "fanfare".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> std::collections::HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn environment_values_keep_their_text_and_lists_split() {
        let s = Settings::load_with_env(
            None,
            env(&[
                ("FANFARE__API__KEY", "00123"),
                ("FANFARE__AUTH__HMAC_SECRET", "1e5"),
                ("FANFARE__REDIS__URLS", "redis://a:1, redis://b:2"),
                ("FANFARE__CLIENT__MAX_CHANNELS", "7"),
                ("FANFARE__REDIS__CLUSTER", "true"),
                ("FANFARE__CLIENT__PING_INTERVAL", "30s"),
            ]),
        )
        .unwrap();
        assert_eq!(s.api.key, "00123");
        assert_eq!(s.auth.hmac_secret, "1e5");
        assert_eq!(s.redis.urls, vec!["redis://a:1", "redis://b:2"]);
        assert_eq!(s.client.max_channels, 7);
        assert!(s.redis.cluster);
        assert_eq!(s.client.ping_interval, Duration::from_secs(30));
    }

    #[test]
    fn sentinel_settings_come_from_the_environment_as_a_list() {
        let s = Settings::load_with_env(
            None,
            env(&[
                ("FANFARE__BROKER__KIND", "redis"),
                ("FANFARE__REDIS__URLS", "rediss://:pw@primary/0"),
                ("FANFARE__REDIS__SENTINEL_URLS", "redis://s1:26379, redis://s2:26379"),
                ("FANFARE__REDIS__SENTINEL_MASTER", "mymaster"),
            ]),
        )
        .unwrap();
        assert_eq!(s.redis.sentinel_urls, vec!["redis://s1:26379", "redis://s2:26379"]);
        let b = s.redis.broker_config();
        assert_eq!(b.sentinel_master, "mymaster");
        assert_eq!(b.urls, vec!["rediss://:pw@primary/0"]);
        let two = Settings::load_with_env(
            None,
            env(&[
                ("FANFARE__BROKER__KIND", "redis"),
                ("FANFARE__REDIS__URLS", "redis://a:1, redis://b:2"),
                ("FANFARE__REDIS__SENTINEL_URLS", "redis://s1:26379"),
                ("FANFARE__REDIS__SENTINEL_MASTER", "mymaster"),
            ]),
        );
        let e = two.expect_err("two URLs with Sentinel").to_string();
        assert!(e.starts_with("redis.urls: with redis.sentinel_urls give one URL"), "{e}");
    }

    #[test]
    fn tls_needs_both_files_and_log_format_is_text_or_json() {
        let half = Settings::load_with_env(None, env(&[("FANFARE__HTTP__TLS_CERT", "/c.pem")]))
            .unwrap_err()
            .to_string();
        assert!(half.contains("http.tls_key"), "{half}");
        let half = Settings::load_with_env(None, env(&[("FANFARE__GRPC__TLS_KEY", "/k.pem")]))
            .unwrap_err()
            .to_string();
        assert!(half.contains("grpc.tls_cert"), "{half}");
        let s = Settings::load_with_env(
            None,
            env(&[
                ("FANFARE__GRPC__TLS_CERT", "/c.pem"),
                ("FANFARE__GRPC__TLS_KEY", "/k.pem"),
                ("FANFARE__LOG__FORMAT", "json"),
            ]),
        )
        .unwrap();
        assert!(s.grpc_tls().unwrap().is_some() && s.http_tls().unwrap().is_none());
        assert_eq!(s.log.format, LogFormat::Json);
        let e = Settings::load_with_env(None, env(&[("FANFARE__LOG__FORMAT", "xml")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("log.format"), "{e}");
    }

    #[test]
    fn secrets_are_masked_in_debug_output_and_check_config() {
        let s = Settings::load_with_env(
            None,
            env(&[
                ("FANFARE__API__KEY", "api-key-sekrit"),
                ("FANFARE__AUTH__HMAC_SECRET", "hmac-sekrit"),
                ("FANFARE__REDIS__URLS", "redis://:redis-sekrit@h:6379/0,redis://h2:1"),
            ]),
        )
        .unwrap();
        let shown = format!("{s:?}");
        for secret in ["api-key-sekrit", "hmac-sekrit", "redis-sekrit"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("redis://********@h:6379/0"), "{shown}");
        let e = Settings::load_with_env(
            None,
            env(&[
                ("FANFARE__WEBHOOKS__URL", "http://u:hook-sekrit@h/x"),
                ("FANFARE__WEBHOOKS__SECRET", "s"),
                ("FANFARE__WEBHOOKS__EVENTS", "connect"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("webhooks.url") && !e.contains("hook-sekrit"), "{e}");
        assert_eq!(mask_userinfo("https://h/p?a=b@c"), "https://h/p?a=b@c");
    }

    #[test]
    fn drain_settings_default_to_kubernetes_and_are_bounded_naming_the_key() {
        let s = Settings::load_with_env(None, env(&[])).unwrap();
        let d = &s.shutdown;
        assert_eq!(
            (d.drain_delay, d.drain_period, d.drain_timeout),
            (Duration::from_secs(5), Duration::from_secs(10), Duration::from_secs(5))
        );
        let s = Settings::load_with_env(None, env(&[("FANFARE__SHUTDOWN__DRAIN_PERIOD", "0s")]));
        assert_eq!(s.unwrap().shutdown.drain_period, Duration::ZERO, "0 = close all at once");
        for key in ["drain_delay", "drain_period", "drain_timeout"] {
            let var = format!("FANFARE__SHUTDOWN__{}", key.to_uppercase());
            let e = Settings::load_with_env(None, env(&[(&var, "2h")])).unwrap_err().to_string();
            assert!(e.contains(&format!("shutdown.{key}")), "{e}");
            let e = Settings::load_with_env(None, env(&[(&var, "soon")])).unwrap_err().to_string();
            assert!(e.contains(&format!("shutdown.{key}")), "{e}");
        }
    }

    #[test]
    fn bad_environment_value_names_the_key() {
        let e = Settings::load_with_env(None, env(&[("FANFARE__CLIENT__MAX_CHANNELS", "many")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("client.max_channels"), "{e}");
    }

    #[test]
    fn memory_section_sets_the_broker_and_refuses_a_zero_sweep_interval() {
        let s = Settings::load_with_env(
            None,
            env(&[
                ("FANFARE__MEMORY__HISTORY_META_TTL", "2h"),
                ("FANFARE__MEMORY__SWEEP_INTERVAL", "250ms"),
            ]),
        )
        .unwrap();
        assert_eq!(s.memory.broker_config().history_meta_ttl, Duration::from_secs(7200));
        assert_eq!(s.memory.sweep_interval, Duration::from_millis(250));
        let d = Settings::load_with_env(None, env(&[])).unwrap();
        assert_eq!(d.memory.history_meta_ttl, Duration::from_secs(3600));
        let e = Settings::load_with_env(None, env(&[("FANFARE__MEMORY__SWEEP_INTERVAL", "0s")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("memory.sweep_interval"), "{e}");
    }

    /// Found by the `config` fuzz target (2026-12-07): a bracketed index in
    /// a key made the config crate allocate an array up to it (512 GB) and
    /// abort the process. Now an error naming the variable or key.
    #[test]
    fn a_key_with_an_array_index_is_an_error_naming_it_not_an_abort() {
        let e = Settings::load_with_env(None, env(&[("FANFARE__A[5333333333]", "1")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("environment variable FANFARE__A[5333333333]"), "{e}");
        // The fuzzer's own input: the index in the middle of the name.
        let e = Settings::load_with_env(
            None,
            env(&[("FANFARE__K[5333333333\t]__BRARE__K[5\t]__CRI0", "__")]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not a configuration key"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.toml");
        std::fs::write(&path, "\"a[5333333333]\" = 1\n").unwrap();
        let e = Settings::load_with_env(Some(&path), std::collections::HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("f.toml") && e.contains("a[5333333333]"), "{e}");
        // Brackets inside a value or a nested key are not keys of the config crate.
        let s = Settings::load_with_env(None, env(&[("FANFARE__API__KEY", "[1]")])).unwrap();
        assert_eq!(s.api.key, "[1]");
    }

    #[test]
    fn proxy_names_endpoints_and_headers_are_checked_naming_the_key() {
        let load = |toml: &str| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("f.toml");
            std::fs::write(&path, toml).unwrap();
            Settings::load_with_env(Some(&path), std::collections::HashMap::new())
                .map_err(|e| e.to_string())
        };
        let proxy = "[[proxies]]\nname = \"app\"\nendpoint = \"http://127.0.0.1:1/c\"\n";
        let s = load(&format!("[client]\nconnect_proxy = \"app\"\n{proxy}")).unwrap();
        assert_eq!(s.proxies[0].timeout, Duration::from_secs(1));
        let err = load("[client]\nrpc_proxy = \"nope\"\n").unwrap_err();
        assert!(err.contains("client.rpc_proxy") && err.contains("nope"), "{err}");
        let err = load(&format!("{proxy}[[namespaces]]\nname = \"x\"\npublish_proxy = \"b\"\n"))
            .unwrap_err();
        assert!(err.contains("namespaces[0].publish_proxy"), "{err}");
        let err = load("[[proxies]]\nname = \"a\"\nendpoint = \"tcp://x:1\"\n").unwrap_err();
        assert!(err.contains("proxies[0].endpoint"), "{err}");
        let err = load(&format!("{proxy}{proxy}")).unwrap_err();
        assert!(err.contains("proxies[1].name"), "{err}");
        let err = load(&format!("{proxy}http_headers = [\"bad header\"]\n")).unwrap_err();
        assert!(err.contains("proxies[0].http_headers"), "{err}");
    }

    #[test]
    fn webhooks_are_off_by_default_and_validated_with_the_key_named() {
        let d = Settings::load_with_env(None, env(&[])).unwrap();
        assert!(!d.webhooks.enabled());
        let on = Settings::load_with_env(
            None,
            env(&[
                ("FANFARE__WEBHOOKS__URL", "http://127.0.0.1:9/hook"),
                ("FANFARE__WEBHOOKS__SECRET", "s"),
                ("FANFARE__WEBHOOKS__EVENTS", "connect, channel_vacated"),
            ]),
        )
        .unwrap();
        let mask = on.webhooks.mask().unwrap();
        assert!(mask.has(fanfare_core::EventKind::ChannelVacated));
        assert!(!mask.has(fanfare_core::EventKind::Subscribe));
        for (pairs, key) in [
            (vec![("FANFARE__WEBHOOKS__EVENTS", "connect")], "webhooks.url"),
            (vec![("FANFARE__WEBHOOKS__URL", "ftp://h/x")], "webhooks.url"),
            (vec![("FANFARE__WEBHOOKS__URL", "http://h/x")], "webhooks.secret"),
            (
                vec![("FANFARE__WEBHOOKS__URL", "http://h/x"), ("FANFARE__WEBHOOKS__SECRET", "s")],
                "webhooks.events",
            ),
            (vec![("FANFARE__WEBHOOKS__EVENTS", "join")], "webhooks.events"),
            (
                vec![
                    ("FANFARE__WEBHOOKS__URL", "http://h/x"),
                    ("FANFARE__WEBHOOKS__SECRET", "s"),
                    ("FANFARE__WEBHOOKS__EVENTS", "connect"),
                    ("FANFARE__WEBHOOKS__TIMEOUT", "20s"),
                ],
                "webhooks.timeout",
            ),
        ] {
            let e = Settings::load_with_env(None, env(&pairs)).unwrap_err().to_string();
            assert!(e.contains(key), "{pairs:?}: {e}");
        }
    }

    #[test]
    fn trusted_proxies_come_from_the_environment_as_a_list() {
        let s = Settings::load_with_env(
            None,
            env(&[("FANFARE__LIMITS__TRUSTED_PROXIES", "10.0.0.0/8, 127.0.0.1")]),
        )
        .unwrap();
        let trusted = s.limits.trusted().unwrap();
        assert_eq!(trusted.len(), 2);
        assert!(trusted[0].contains("10.9.8.7".parse().unwrap()));
        assert_eq!(Settings::load_with_env(None, env(&[])).unwrap().limits.ip_connect_rate, 5000);
    }

    #[test]
    fn the_example_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/fanfare.example.toml");
        Settings::load_with_env(Some(&path), env(&[])).unwrap();
    }
}
