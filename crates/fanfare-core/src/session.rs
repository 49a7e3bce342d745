//! One client connection's protocol state machine, independent of the transport.
//!
//! The transport feeds frames to [`Session::handle_frame`], wakes it at
//! [`Session::deadline`], writes out what lands in [`Session::outbox`] and calls
//! [`Session::close`] when the connection ends. Commands of one connection are
//! handled one at a time, in order, with one exception: publishes are group
//! committed (`session/publishing.rs`). A command the application
//! backend decides (a proxy, `session/proxied.rs`) starts its call and the
//! commands behind it wait, in order, until the answer
//! ([`Session::next_event`]); the transport reads no input meanwhile
//! ([`Session::accepts_input`]).

use std::future::Future;
use std::num::NonZeroU64;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use fanfare_protocol::{
    ClientInfo, Codec, Command, ConnectRequest, ConnectResult, DisconnectCode, ErrorCode,
    HistoryRequest, HistoryResult, Publication, Reply, ReplyBody, Request, StreamPosition,
    SubscribeRequest, SubscribeResult,
};
use sync_wrapper::SyncWrapper;

use crate::auth::{AuthError, Authenticator, JWKS_WAIT, info_bytes, unix_now};
use crate::broker::{HistoryQuery, PublishItem};
use crate::channel::{ChannelError, Namespace, personal_channel};
use crate::hub::Subscriber;
use crate::ingress::DataError;
use crate::node::Node;
use crate::outbox::{Directive, Outbox};
use crate::subscriptions::{SubMap, Subscription};

mod proxied;
mod publishing;
#[cfg(test)]
mod tests;

pub use publishing::MAX_PUBLISHES_IN_FLIGHT;
use publishing::Publishing;

/// How a command failed: a reply error (connection stays) or a disconnect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fail {
    Error(ErrorCode),
    Disconnect(DisconnectCode),
}

impl From<ErrorCode> for Fail {
    fn from(c: ErrorCode) -> Self {
        Fail::Error(c)
    }
}

impl From<ChannelError> for Fail {
    fn from(e: ChannelError) -> Self {
        match e {
            ChannelError::Invalid => Fail::Error(ErrorCode::BAD_REQUEST),
            ChannelError::UnknownNamespace => Fail::Error(ErrorCode::UNKNOWN_CHANNEL),
        }
    }
}

/// Who a connecting client is: from its token, the connect proxy, or nobody
/// (anonymous).
#[derive(Debug, Default)]
struct Identity {
    user: String,
    conn_info: Bytes,
    /// Unix seconds.
    expires_at: Option<u64>,
    /// Server-side subscriptions.
    channels: Vec<String>,
    /// The connect reply's `data`.
    data: Bytes,
    /// Server-side subscriptions with their options (connect proxy `subs`).
    subs: Vec<(String, crate::proxy::SubOptions)>,
}

/// A backend's `expire_at` (Unix seconds, 0 = never) as an expiry.
fn unix_expiry(expire_at: i64) -> Option<u64> {
    u64::try_from(expire_at).ok().filter(|&e| e > 0)
}

/// State that exists once `connect` succeeded.
#[derive(Debug)]
struct Connected {
    info: Arc<ClientInfo>,
    expires_at: Option<u64>,
    subs: SubMap,
    /// Commands budget (`limits.client_commands`): 8 bytes in this boxed
    /// part, so the connection's task does not grow.
    commands: crate::limits::Bucket,
}

/// The protocol state of one client connection. See the module docs.
pub struct Session {
    node: Node,
    id: u64,
    outbox: Arc<Outbox>,
    conn: Option<Box<Connected>>,
    created: Instant,
    next_ping: Instant,
    pong_deadline: Option<Instant>,
    /// When presence entries of this connection must be written again.
    presence_refresh: Option<Instant>,
    /// Publishes waiting for the broker, and the proxy state (see [`Side`]).
    side: Option<Box<Side>>,
    /// The disconnect was counted ([`Session::ended`]).
    end_counted: bool,
    /// The transport carrying this session (for metrics; a unidirectional
    /// one changes behaviour, see [`Transport::is_unidirectional`]).
    transport: Transport,
}

/// The transport a session runs over. A unidirectional one: the client only
/// receives, so pings expect no pong, and the channels of the connect
/// request's `subs` are joined server-side (where the namespace lets anyone
/// subscribe). An emulated one (HTTP streaming, SSE): replies go down a
/// stream, commands come up in separate `/emulation` requests, so the connect
/// reply carries a session key, and pings expect no pong (a pong would be one
/// more HTTP request per client and ping period; a dead stream shows as a
/// failed write instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    WebSocket,
    HttpStream,
    Sse,
    UniWebSocket,
    UniSse,
    UniHttpStream,
}

impl Transport {
    pub fn label(self) -> &'static str {
        match self {
            Transport::WebSocket => "websocket",
            Transport::HttpStream => "http_stream",
            Transport::Sse => "sse",
            Transport::UniWebSocket => "uni_websocket",
            Transport::UniSse => "uni_sse",
            Transport::UniHttpStream => "uni_http_stream",
        }
    }

    pub fn is_unidirectional(self) -> bool {
        matches!(self, Transport::UniWebSocket | Transport::UniSse | Transport::UniHttpStream)
    }

    /// Bidirectional over separate requests (`/emulation`).
    pub fn is_emulated(self) -> bool {
        matches!(self, Transport::HttpStream | Transport::Sse)
    }

    /// Whether the client answers server pings (only over a WebSocket).
    pub fn expects_pong(self) -> bool {
        self == Transport::WebSocket
    }
}

/// What a session has only while it waits for something, or when it uses
/// proxies: publishes at the broker (allocated on the first one that does not
/// complete at once, freed when all are answered), forwarded headers,
/// connection meta and the proxy call it waits for. One allocation and one
/// pointer for both: a second pointer in `Session` made the WebSocket task
/// future 16 B larger, past a 128-byte step of tokio's task cell (+100 B per
/// idle connection, docs/BENCHMARKS.md "Proxies").
#[derive(Default)]
struct Side {
    publishing: Option<Publishing>,
    proxy: proxied::ProxyState,
}

/// Something a session waited for happened ([`Session::next_event`]).
pub struct Event(EventKind);

/// Small on purpose (4 bytes): it sits in every connection task's future
/// (the driver's select output). A batch is answered while polling; a proxy
/// answer waits in the session until [`Session::handle_event`].
enum EventKind {
    Published(Result<(), DisconnectCode>),
    Answered,
}

/// The subscriptions of `conn` whose expiry passed.
fn conn_expired_subs(conn: &Connected, unix: u64) -> Vec<Arc<str>> {
    conn.subs
        .iter()
        .filter(|(_, s)| s.expires_at.is_some_and(|e| unix >= e))
        .map(|(c, _)| c.clone())
        .collect()
}

/// Bytes `pubs` take in a reply, estimated generously (field names, offsets,
/// escaping of ids); the encoded reply is checked again in `Session::send`.
fn estimated_size(pubs: &[Publication]) -> usize {
    pubs.iter()
        .map(|p| {
            let info = p.info.as_ref().map_or(0, |i| {
                64 + 2 * (i.user.len() + i.client.len()) + i.conn_info.len() + i.chan_info.len()
            });
            let tags = p
                .tags
                .as_ref()
                .map_or(0, |t| t.iter().map(|(k, v)| 8 + 2 * (k.len() + v.len())).sum());
            64 + p.data.len() + info + tags
        })
        .sum()
}

/// The empty user id of anonymous connections, shared rather than allocated
/// per connection.
fn anonymous_user() -> Arc<str> {
    static EMPTY: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from(""));
    EMPTY.clone()
}

/// The `{}` server ping, encoded once per codec for the whole process.
fn ping_frame(codec: Codec) -> Bytes {
    static PINGS: [std::sync::OnceLock<Bytes>; Codec::COUNT] =
        [const { std::sync::OnceLock::new() }; Codec::COUNT];
    PINGS[codec.index()]
        .get_or_init(|| {
            codec.encode(&Reply::new(0, ReplyBody::Ping)).expect("every codec encodes a ping")
        })
        .clone()
}

/// A point in time in 8 bytes (a `std::time::Instant` takes 16, and a session
/// keeps four): milliseconds since the process's first session, plus one so
/// that `Option<Instant>` is 8 bytes too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Instant(NonZeroU64);

static EPOCH: std::sync::LazyLock<std::time::Instant> =
    std::sync::LazyLock::new(std::time::Instant::now);

impl Instant {
    fn now() -> Self {
        Self::from_millis(EPOCH.elapsed().as_millis() as u64)
    }

    fn from_millis(ms: u64) -> Self {
        Self(NonZeroU64::new(ms.saturating_add(1)).expect("not zero"))
    }

    fn millis(self) -> u64 {
        self.0.get() - 1
    }

    fn std(self) -> std::time::Instant {
        *EPOCH + Duration::from_millis(self.millis())
    }
}

impl std::ops::Add<Duration> for Instant {
    type Output = Self;

    fn add(self, d: Duration) -> Self {
        Self::from_millis(self.millis().saturating_add(d.as_millis() as u64))
    }
}

fn instant_at(unix: u64) -> Instant {
    let now = unix_now();
    Instant::now() + Duration::from_secs(unix.saturating_sub(now))
}

fn ttl_until(unix: u64) -> u32 {
    unix.saturating_sub(unix_now()).min(u32::MAX as u64) as u32
}

impl Session {
    /// Starts a session; `None` when the node is draining and refuses clients.
    pub fn new(node: Node, codec: Codec) -> Option<Self> {
        let outbox = Arc::new(Outbox::new(codec, node.config().max_queue_bytes));
        let id = node.register(outbox.clone())?;
        let now = Instant::now();
        // First ping between half and the full interval, so a crowd connected at
        // once does not ping in lockstep.
        let interval = node.config().ping_interval;
        let jitter = interval.mul_f64(0.5 + rand::random::<f64>() * 0.5);
        Some(Self {
            node,
            id,
            outbox,
            conn: None,
            created: now,
            next_ping: now + jitter,
            pong_deadline: None,
            presence_refresh: None,
            side: None,
            end_counted: false,
            transport: Transport::WebSocket,
        })
    }

    /// A session of a unidirectional transport (see [`Transport`]).
    pub fn new_unidirectional(node: Node, codec: Codec, transport: Transport) -> Option<Self> {
        let mut s = Self::new(node, codec)?;
        s.transport = transport;
        Some(s)
    }

    /// A session of an emulated transport (see [`Transport`]), registered
    /// with the node: its commands arrive in the returned inbox through
    /// [`Node::emulate`]. The key lives in the node's registry, not in the
    /// session (every WebSocket session would carry the field).
    pub fn new_emulated(
        node: Node,
        codec: Codec,
        transport: Transport,
    ) -> Option<(Self, Arc<crate::emulation::Inbox>)> {
        let mut s = Self::new(node, codec)?;
        s.transport = transport;
        let inbox = s.node.register_emulated(s.id);
        Some((s, inbox))
    }

    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    /// The client id, once connected.
    pub fn client_id(&self) -> Option<&str> {
        self.conn.as_ref().map(|c| &*c.info.client)
    }

    /// Arms the node's shared timer for [`Session::deadline`]: when it comes,
    /// the outbox wakes its task ([`Outbox::ready`]) with
    /// [`Outbox::take_timer_due`] set, and the task calls
    /// [`Session::on_deadline`]. Call after anything that may move the deadline
    /// (a frame, a timer run); re-arming for the same deadline is cheap.
    pub fn arm_timer(&self) {
        self.node.timers().arm(&self.outbox, self.deadline());
    }

    /// When [`Session::on_deadline`] must run next.
    pub fn deadline(&self) -> std::time::Instant {
        self.next_deadline().std()
    }

    fn next_deadline(&self) -> Instant {
        let Some(conn) = &self.conn else {
            return self.created + self.node.config().connect_timeout;
        };
        let mut d = self.next_ping;
        for p in [self.pong_deadline, self.presence_refresh].into_iter().flatten() {
            d = d.min(p);
        }
        if self.waiting().is_some() {
            // Expiries are looked at again once the call is answered (a
            // refresh through the proxy may be what is waiting).
            return d;
        }
        if let Some(e) = conn.expires_at {
            d = d.min(instant_at(e));
        }
        for s in conn.subs.values() {
            if let Some(e) = s.expires_at {
                d = d.min(instant_at(e));
            }
        }
        d
    }

    /// Runs timers: connect timeout, pings, pong check, token expiry.
    pub async fn on_deadline(&mut self) -> Result<(), DisconnectCode> {
        let now = Instant::now();
        let Some(conn) = &self.conn else {
            if now >= self.created + self.node.config().connect_timeout {
                return Err(DisconnectCode::STALE);
            }
            return Ok(());
        };
        if self.pong_deadline.is_some_and(|p| now >= p) {
            return Err(DisconnectCode::NO_PONG);
        }
        let unix = unix_now();
        let waiting = self.waiting().is_some();
        if !waiting && conn.expires_at.is_some_and(|e| unix >= e) {
            match self.node.config().proxies.refresh().cloned() {
                Some(proxy) => self.start_refresh_proxy(&proxy),
                None => return Err(DisconnectCode::EXPIRED),
            }
        }
        let expired: Vec<Arc<str>> = match waiting || self.waiting().is_some() {
            true => Vec::new(),
            false => conn_expired_subs(self.connected(), unix),
        };
        for channel in expired {
            let ns = self.node.rules().namespace(&channel).ok();
            if let Some(proxy) =
                ns.and_then(|ns| self.node.config().proxies.named(&ns.sub_refresh_proxy))
            {
                // One at a time: the others are looked at once it is answered.
                let proxy = proxy.clone();
                self.start_sub_refresh_proxy(&proxy, channel);
                break;
            }
            // 2501: the SDK resubscribes with a fresh token.
            self.leave_channel(&channel).await;
            self.send(Reply::push(
                channel,
                fanfare_protocol::PushBody::Unsubscribe {
                    code: 2501,
                    reason: "subscription expired".into(),
                },
            ));
        }
        if self.presence_refresh.is_some_and(|p| now >= p) {
            self.refresh_presence().await;
        }
        if now >= self.next_ping {
            self.outbox.push(ping_frame(self.outbox.codec()));
            if self.pong_deadline.is_none() && self.transport.expects_pong() {
                self.pong_deadline = Some(now + self.node.config().pong_timeout);
            }
            self.next_ping = now + self.node.config().ping_interval;
        }
        Ok(())
    }

    /// Writes this connection's presence entries again before they expire.
    async fn refresh_presence(&mut self) {
        let ttl = self.node.config().presence_ttl;
        self.presence_refresh = Some(Instant::now() + ttl / 3);
        let Some(conn) = &self.conn else { return };
        let entries: Vec<(Arc<str>, ClientInfo)> = conn
            .subs
            .iter()
            .filter(|(_, s)| s.presence)
            .map(|(c, s)| (c.clone(), (*s.info).clone()))
            .collect();
        if entries.is_empty() {
            self.presence_refresh = None;
        }
        for (channel, info) in entries {
            if let Err(e) = self.node.broker().add_presence(&channel, info, ttl).await {
                tracing::warn!(session = self.id, channel = &*channel, error = %e, "presence refresh failed");
            }
        }
    }

    /// Applies requests the node queued for this session (see [`Directive`]).
    pub async fn apply_directives(&mut self) {
        let directives = self.outbox.take_directives();
        if directives.is_empty() {
            return;
        }
        for directive in directives {
            match directive {
                Directive::Subscribe { channel } => {
                    if self.conn.is_some() {
                        self.subscribe_server_side(&channel).await;
                    }
                }
                Directive::Refresh { expires_at } => self.refresh_server_side(expires_at),
                Directive::Unsubscribed { channel, code, reason } => {
                    let server_side = self
                        .conn
                        .as_ref()
                        .and_then(|c| c.subs.get(&channel))
                        .is_some_and(|s| s.server_side);
                    if server_side && code >= 2500 {
                        // SDKs drop a server-side subscription on an unsubscribe
                        // push and cannot resubscribe it: reconnect instead, which
                        // joins (and recovers) it again. As Centrifugo does. A
                        // plain server unsubscribe (2000) is just an unsubscribe.
                        self.outbox.close(DisconnectCode::INSUFFICIENT_STATE);
                        return;
                    }
                    if self.conn.is_some() && self.leave_channel(&channel).await {
                        self.send(Reply::push(
                            channel,
                            fanfare_protocol::PushBody::Unsubscribe { code, reason: reason.into() },
                        ));
                    }
                }
            }
        }
        // A control may have added a deadline (presence refresh of a new
        // server-side subscription): the timer must know before its next tick.
        self.arm_timer();
    }

    /// A refresh by the server API: the new expiry applies at once (the
    /// deadline is re-armed after the directives) and the client is told with
    /// a refresh push, so an SDK moves its own refresh timer.
    fn refresh_server_side(&mut self, expires_at: Option<u64>) {
        let Some(conn) = self.conn.as_mut() else { return };
        conn.expires_at = expires_at;
        let (expires, ttl) = (expires_at.is_some(), expires_at.map_or(0, ttl_until));
        self.send(Reply::push("", fanfare_protocol::PushBody::Refresh { expires, ttl }));
    }

    /// A subscription made by the control API: joins the channel and tells the
    /// client with a `subscribe` push (SDKs surface it as a server-side subscription).
    async fn subscribe_server_side(&mut self, channel: &str) {
        if self.connected().subs.contains_key(channel) {
            return;
        }
        let Ok(ns) = self.node.rules().namespace(channel).cloned() else { return };
        let req = SubscribeRequest {
            channel: channel.to_string(),
            recoverable: true,
            positioned: true,
            ..Default::default()
        };
        match self.join_channel(channel, &req, &ns, Bytes::new(), None, true).await {
            Ok((r, subscriber)) => {
                self.send(Reply::push(
                    channel,
                    fanfare_protocol::PushBody::Subscribe {
                        recoverable: r.recoverable,
                        epoch: r.epoch,
                        offset: r.offset,
                        positioned: r.positioned,
                        data: Bytes::new(),
                    },
                ));
                subscriber.go_live(r.offset);
                if ns.join_leave {
                    self.announce_join(channel).await;
                }
            }
            Err(_) => tracing::warn!(session = self.id, channel, "server-side subscribe failed"),
        }
    }

    /// Handles every command in one transport frame, in order.
    pub async fn handle_frame(&mut self, frame: &[u8]) -> Result<(), DisconnectCode> {
        let commands = self.outbox.codec().decode(frame).map_err(|e| {
            tracing::debug!(session = self.id, error = %e, "undecodable frame");
            DisconnectCode::BAD_REQUEST
        })?;
        crate::metrics::hot().messages_received.increment(commands.len() as u64);
        let mut commands = commands.into_iter();
        while let Some(cmd) = commands.next() {
            self.handle_command(cmd).await?;
            if let Some(w) = self.waiting_mut() {
                // A proxy call started: the rest waits for its answer, in order.
                w.queued.extend(commands);
                break;
            }
        }
        Ok(())
    }

    /// Queues a reply or push. Nothing the session sends may exceed the reply
    /// budget ([`Session::reply_budget`]): a reply that would is answered with
    /// error 106 instead, so asking for too much never closes the asker with 3008.
    ///
    /// A reply this connection's codec cannot carry (binary publication data
    /// in a recovery or history reply to a JSON client) closes the connection
    /// with 3506, as a push would (see `Hub::fan_out`).
    fn send(&self, reply: Reply) {
        let codec = self.outbox.codec();
        let bytes = match codec.encode(&reply) {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(session = self.id, error = %e, "reply not encodable; closing");
                self.outbox.close(DisconnectCode::INAPPROPRIATE_PROTOCOL);
                return;
            }
        };
        if bytes.len() > self.reply_budget() {
            tracing::warn!(
                session = self.id,
                size = bytes.len(),
                budget = self.reply_budget(),
                "reply larger than the client queue allows; sent as error 106"
            );
            if reply.id != 0 {
                let error = codec.encode(&Reply::error(reply.id, ErrorCode::LIMIT_EXCEEDED));
                self.outbox.push(error.expect("every codec encodes an error reply"));
            }
            return;
        }
        self.outbox.push(bytes);
    }

    /// Most bytes one reply may take: half the queue bound, so a reply fits
    /// next to publications already waiting for the client.
    fn reply_budget(&self) -> usize {
        self.node.config().max_queue_bytes / 2
    }

    async fn handle_command(&mut self, cmd: Command) -> Result<(), DisconnectCode> {
        metrics::counter!(crate::metrics::COMMANDS, "method" => cmd.request.method()).increment(1);
        let id = cmd.id;
        if self.conn.is_none() {
            // The first command must be connect.
            return match cmd.request {
                Request::Connect(req) => {
                    let result = self.connect(id, req).await;
                    self.finish(id, result)
                }
                _ => Err(DisconnectCode::BAD_REQUEST),
            };
        }
        let pong = id == 0 && matches!(cmd.request, Request::Empty);
        if !pong && self.over_rate()? {
            if id != 0 {
                self.send(Reply::error(id, ErrorCode::TOO_MANY_REQUESTS));
            }
            return Ok(());
        }
        if !matches!(cmd.request, Request::Publish { .. }) {
            // Everything but a publish sees the effects of the publishes before it.
            self.finish_publishes().await?;
        }
        let result = match cmd.request {
            Request::Connect(_) => Err(Fail::Disconnect(DisconnectCode::BAD_REQUEST)),
            Request::Empty if id == 0 => {
                // Pong: only valid as an answer to a ping.
                if self.pong_deadline.take().is_none() {
                    return Err(DisconnectCode::BAD_REQUEST);
                }
                return Ok(());
            }
            Request::Empty => Err(Fail::Error(ErrorCode::METHOD_NOT_FOUND)),
            Request::Send { .. } => return Ok(()),
            Request::Rpc { method, data } => self.rpc(id, method, data),
            Request::Ping => Ok(Some(ReplyBody::Ping)),
            Request::Subscribe(req) => self.subscribe(id, req).await,
            Request::Unsubscribe { channel } => self.unsubscribe(&channel).await,
            Request::Publish { channel, data } => self.publish(id, channel, data),
            Request::Presence { channel } => self.presence(&channel).await,
            Request::PresenceStats { channel } => self.presence_stats(&channel).await,
            Request::History(req) => self.history(req).await,
            Request::Refresh { token } => self.refresh(&token).await,
            Request::SubRefresh { channel, token } => self.sub_refresh(&channel, &token).await,
        };
        self.finish(id, result)
    }

    /// Whether this command is over the connection's or its user's rate
    /// (`limits.client_commands`, `limits.user_commands`): it is then
    /// answered with 111. A connection that keeps sending through another
    /// burst of refusals is closed with 3013. Pongs are free (they answer
    /// the node's pings).
    fn over_rate(&mut self) -> Result<bool, DisconnectCode> {
        use crate::limits::{Take, refused};
        let limits = self.node.config().limits;
        if limits.client_commands > 0 {
            let now = Instant::now().millis() as u32;
            let bucket = &mut self.connected_mut().commands;
            match bucket.take(limits.client_commands, limits.client_command_burst, now) {
                Take::Ok => {}
                Take::Refused => {
                    refused("client_commands");
                    return Ok(true);
                }
                Take::Exhausted => {
                    refused("client_commands");
                    tracing::debug!(session = self.id, "command flood; closing with 3013");
                    return Err(DisconnectCode::TOO_MANY_REQUESTS);
                }
            }
        }
        if !self.node.take_user_command(&self.connected().info.user) {
            refused("user_commands");
            return Ok(true);
        }
        Ok(false)
    }

    fn finish(
        &self,
        id: u32,
        result: Result<Option<ReplyBody>, Fail>,
    ) -> Result<(), DisconnectCode> {
        match result {
            Ok(Some(body)) => self.send(Reply::new(id, body)),
            Ok(None) => {}
            Err(Fail::Error(code)) => self.send(Reply::error(id, code)),
            Err(Fail::Disconnect(code)) => return Err(code),
        }
        Ok(())
    }

    fn connected(&self) -> &Connected {
        self.conn.as_ref().expect("commands other than connect run only once connected")
    }

    fn connected_mut(&mut self) -> &mut Connected {
        self.conn.as_mut().expect("commands other than connect run only once connected")
    }

    async fn connect(&mut self, id: u32, req: ConnectRequest) -> Result<Option<ReplyBody>, Fail> {
        // A version 4 UUID from the thread's ChaCha generator (seeded from the
        // OS): `Uuid::new_v4` asks the kernel (getrandom) on every connect.
        let client: Arc<str> =
            uuid::Builder::from_random_bytes(rand::random()).into_uuid().to_string().into();
        let auth = self.node.auth();
        let identity = if req.token.is_empty() {
            if let Some(proxy) = self.node.config().proxies.connect().cloned() {
                // Cookie or header auth: the backend says who this is.
                self.start_connect_proxy(&proxy, id, req, client);
                return Ok(None);
            }
            if !auth.allow_anonymous() {
                return Err(Fail::Disconnect(DisconnectCode::INVALID_TOKEN));
            }
            Identity::default()
        } else {
            // A connect waits for an unknown kid's JWKS fetch no longer than
            // the connect itself may take.
            let deadline =
                (Instant::now() + JWKS_WAIT).min(self.created + self.node.config().connect_timeout);
            match self.verify_token(|a| a.verify_connect(&req.token), deadline).await {
                Ok(c) => Identity {
                    user: c.sub,
                    conn_info: info_bytes(&c.info),
                    expires_at: c.exp,
                    channels: c.channels,
                    ..Default::default()
                },
                Err(AuthError::Expired) => return Err(Fail::Error(ErrorCode::TOKEN_EXPIRED)),
                Err(e) => {
                    // `e` is a short kind ("signature", "token kind"), never the token.
                    tracing::debug!(session = self.id, error = %e, "connect token refused");
                    return Err(Fail::Disconnect(DisconnectCode::INVALID_TOKEN));
                }
            }
        };
        self.connect_as(id, req, client, identity).await
    }

    /// Connects as `identity` (from a token, the connect proxy or anonymous).
    async fn connect_as(
        &mut self,
        id: u32,
        req: ConnectRequest,
        client: Arc<str>,
        identity: Identity,
    ) -> Result<Option<ReplyBody>, Fail> {
        let Identity { user, conn_info, expires_at, channels, data, subs: granted } = identity;
        // A unidirectional client cannot subscribe by itself: the channels it
        // names in `subs` are joined for it, with the permission a subscribe
        // command without token would need.
        let mut requested = Vec::new();
        if self.transport.is_unidirectional() {
            if req.subs.len() > self.node.config().max_channels {
                return Err(ErrorCode::LIMIT_EXCEEDED.into());
            }
            for (channel, _) in &req.subs {
                let open = self
                    .node
                    .rules()
                    .namespace(channel)
                    .is_ok_and(|ns| ns.allow_subscribe && !ns.private);
                if !open || channel.starts_with('#') {
                    return Err(ErrorCode::PERMISSION_DENIED.into());
                }
                requested.push(channel.clone());
            }
        }
        let info = Arc::new(ClientInfo {
            user: if user.is_empty() { anonymous_user() } else { user.as_str().into() },
            client: client.clone(),
            conn_info,
            chan_info: Bytes::new(),
        });
        // Server-side subscriptions: the personal channel and the token's
        // channels (a claim far over the limit is refused before the
        // duplicate checks below, which are quadratic).
        let max_channels = self.node.config().max_channels;
        let mut server_channels = Vec::new();
        if channels.len() > max_channels {
            server_channels = channels;
        } else {
            if !user.is_empty() {
                server_channels.push(personal_channel(&user));
            }
            server_channels.extend(channels);
            for (channel, _) in &granted {
                if !server_channels.contains(channel) {
                    server_channels.push(channel.clone());
                }
            }
            for channel in requested {
                if !server_channels.contains(&channel) {
                    server_channels.push(channel);
                }
            }
        }
        // The channel limit holds for channels a token or the connect proxy
        // grants too (Centrifugo: DisconnectChannelLimit); the personal
        // channel counts, as it is a subscription like any other.
        if server_channels.len() > max_channels {
            crate::limits::refused("channels");
            tracing::debug!(
                session = self.id,
                channels = server_channels.len(),
                max_channels,
                "connect grants more channels than client.max_channels; closing with 3505"
            );
            return Err(Fail::Disconnect(DisconnectCode::CHANNEL_LIMIT));
        }
        if self.node.bind(self.id, info.clone()).is_err() {
            crate::limits::refused("user_connections");
            return Err(Fail::Disconnect(DisconnectCode::CONNECTION_LIMIT));
        }
        let commands = crate::limits::Bucket::full(
            self.node.config().limits.client_command_burst,
            Instant::now().millis() as u32,
        );
        // `session` (this node's number for the connection, in every line
        // about it) meets `client` (the id clients and the API see) here.
        tracing::debug!(session = self.id, client = &*info.client, user = &*info.user, "connected");
        self.conn =
            Some(Box::new(Connected { info, expires_at, subs: SubMap::default(), commands }));
        let mut subs = Vec::new();
        let mut live = Vec::new();
        let mut recovered_size = 0;
        for channel in server_channels {
            let Ok(ns) = self.node.rules().namespace(&channel).cloned() else {
                tracing::warn!(
                    session = self.id,
                    channel,
                    "token names an invalid channel; skipped"
                );
                continue;
            };
            if self.connected().subs.contains_key(channel.as_str()) {
                continue;
            }
            let wanted = req.subs.iter().find(|(c, _)| *c == channel).map(|(_, s)| s.clone());
            let mut sub_req = wanted.unwrap_or_else(|| SubscribeRequest {
                channel: channel.clone(),
                recoverable: true,
                positioned: true,
                ..Default::default()
            });
            if self.transport.is_unidirectional() {
                // Server-side, so recoverable as token channels are: the
                // transport resumes from positions it hands out (SSE ids).
                sub_req.recoverable = true;
                sub_req.positioned = true;
            }
            // Options the connect proxy gave this channel.
            let opts = granted.iter().find(|(c, _)| *c == channel).map(|(_, o)| o.clone());
            let opts = opts.unwrap_or_default();
            let sub_expires = unix_expiry(opts.expire_at);
            match self.join_channel(&channel, &sub_req, &ns, opts.info, sub_expires, true).await {
                Ok((mut result, subscriber)) => {
                    result.data = opts.data;
                    if sub_expires.is_some() && !ns.sub_refresh_proxy.is_empty() {
                        // The node refreshes it through the proxy, not the client.
                        result.expires = false;
                        result.ttl = 0;
                    }
                    // Recovered lists of all server-side channels share one
                    // connect reply, and so its budget.
                    recovered_size += estimated_size(&result.publications);
                    if recovered_size > self.reply_budget() {
                        recovered_size -= estimated_size(&result.publications);
                        result.publications = Vec::new();
                        result.recovered = false;
                    }
                    live.push((subscriber, result.offset, channel.clone(), ns.join_leave));
                    subs.push((channel, result));
                }
                Err(_) => {
                    self.close_subscriptions().await;
                    self.conn = None;
                    return Err(Fail::Error(ErrorCode::INTERNAL));
                }
            }
        }

        let cfg = self.node.config();
        // With a refresh proxy the node refreshes expiring connections itself
        // (asking the backend); the client is not told to.
        let client_refresh = expires_at.filter(|_| cfg.proxies.refresh().is_none());
        let result = ConnectResult {
            client: client.to_string(),
            version: cfg.version.clone(),
            expires: client_refresh.is_some(),
            ttl: client_refresh.map_or(0, ttl_until),
            data,
            subs,
            ping: cfg.ping_interval.as_secs() as u32,
            pong: self.transport.expects_pong(),
            session: match self.transport.is_emulated() {
                true => self.node.emulation_key(self.id).unwrap_or_default(),
                false => String::new(),
            },
            node: match self.transport.is_emulated() {
                true => self.node.uid().to_string(),
                false => String::new(),
            },
        };
        self.send(Reply::new(id, ReplyBody::Connect(Box::new(result))));
        for (subscriber, offset, channel, join_leave) in live {
            subscriber.go_live(offset);
            if join_leave {
                self.announce_join(&channel).await;
            }
        }
        crate::metrics::hot().connects.increment(1);
        self.node.events().connect(&self.connected().info);
        let encoding = match self.outbox.codec() {
            Codec::Json => "json",
            Codec::Protobuf => "protobuf",
        };
        metrics::gauge!(crate::metrics::TRANSPORT_CONNECTIONS, "transport" => self.transport.label())
            .increment(1.0);
        metrics::counter!(
            crate::metrics::TRANSPORT_CONNECTS,
            "transport" => self.transport.label(),
            "encoding" => encoding
        )
        .increment(1);
        Ok(None)
    }

    /// Registers this connection as a subscriber of `channel` and reads the
    /// stream position (recovering missed publications when asked). The returned
    /// subscriber must go live once the reply carrying the result is queued.
    async fn join_channel(
        &mut self,
        channel: &str,
        req: &SubscribeRequest,
        ns: &Namespace,
        chan_info: Bytes,
        expires_at: Option<u64>,
        server_side: bool,
    ) -> Result<(SubscribeResult, Arc<Subscriber>), Fail> {
        // Delta compression is negotiated as Centrifugo does: granted when the
        // namespace allows the requested type; otherwise the subscription
        // goes on without it (no error, the reply just lacks `delta`, and the
        // SDKs then take full payloads). Server-side subscriptions never use it.
        let delta = !server_side
            && !req.delta.is_empty()
            && ns.allowed_delta_types.iter().any(|t| t.as_str() == req.delta);
        let subscriber = Arc::new(Subscriber::with_delta(self.outbox.clone(), delta));
        self.node
            .subscribe_local(channel, self.id, subscriber.clone())
            .await
            .map_err(|_| Fail::Error(ErrorCode::INTERNAL))?;
        let mut result = SubscribeResult::default();
        // The namespace may make every subscription recoverable / positioned.
        let recoverable = req.recoverable || ns.force_recovery;
        let positioned = req.positioned || ns.force_positioning;
        if ns.history_enabled() && (req.recover || recoverable || positioned) {
            let query = if req.recover {
                HistoryQuery {
                    since: Some(StreamPosition { offset: req.offset, epoch: req.epoch.clone() }),
                    // One more than may be returned, to tell "exactly the
                    // limit" from "more than the limit".
                    limit: Some(self.node.config().recovery_max_publications + 1),
                    reverse: false,
                }
            } else {
                HistoryQuery { limit: Some(0), ..Default::default() }
            };
            match self.node.broker().history(channel, query).await {
                Ok(page) => {
                    result.recoverable = recoverable || req.recover;
                    result.positioned = positioned || recoverable || req.recover;
                    result.epoch = page.position.epoch;
                    result.offset = page.position.offset;
                    if req.recover {
                        result.was_recovering = true;
                        // A client further behind than the recovery limit, or
                        // whose missed publications would not fit one reply,
                        // starts over (`recovered: false`), as in Centrifugo.
                        // Never a partial list presented as complete.
                        let fits = page.publications.len()
                            <= self.node.config().recovery_max_publications
                            && estimated_size(&page.publications) <= self.reply_budget();
                        result.recovered = page.complete && fits;
                        if result.recovered {
                            result.publications = page.publications;
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(session = self.id, channel, error = %e, "history read failed at subscribe");
                    self.node.unsubscribe_local(channel, self.id).await;
                    return Err(Fail::Error(ErrorCode::INTERNAL));
                }
            }
        }
        let base = &self.connected().info;
        let info = if chan_info.is_empty() {
            base.clone()
        } else {
            Arc::new(ClientInfo { chan_info, ..(**base).clone() })
        };
        if ns.presence {
            let ttl = self.node.config().presence_ttl;
            if let Err(e) = self.node.broker().add_presence(channel, (*info).clone(), ttl).await {
                tracing::warn!(session = self.id, channel, error = %e, "presence add failed");
            }
            self.node.events().presence_join(channel, &info);
            // The entry expires after `ttl` unless written again: from now on
            // this connection refreshes its entries (`on_deadline`).
            if self.presence_refresh.is_none() {
                self.presence_refresh = Some(Instant::now() + ttl / 3);
            }
        }
        if let Some(e) = expires_at {
            result.expires = true;
            result.ttl = ttl_until(e);
        }
        if delta {
            result.delta = true;
            // The first recovered publication in full, the rest as deltas;
            // the last one is the base of the first live delta (`go_live`).
            let pubs = std::mem::take(&mut result.publications);
            if let Some(last) = pubs.last() {
                self.node.hub().seed_delta_base(channel, last.offset, &last.data);
            }
            result.publications = crate::delta::recovered(pubs, self.outbox.codec());
        }
        self.node.events().subscribe(channel, &info);
        self.connected_mut().subs.insert(
            channel.into(),
            Subscription {
                presence: ns.presence,
                join_leave: ns.join_leave,
                server_side,
                expires_at,
                info,
            },
        );
        Ok((result, subscriber))
    }

    async fn announce_join(&self, channel: &str) {
        let Some(sub) = self.connected().subs.get(channel) else {
            return;
        };
        let info = (*sub.info).clone();
        if let Err(e) = self.node.broker().publish_join(channel, info).await {
            tracing::warn!(session = self.id, channel, error = %e, "join push failed");
        }
    }

    async fn subscribe(
        &mut self,
        id: u32,
        req: SubscribeRequest,
    ) -> Result<Option<ReplyBody>, Fail> {
        let channel = req.channel.clone();
        let ns = self.node.rules().namespace(&channel)?.clone();
        let conn = self.connected();
        if conn.subs.contains_key(channel.as_str()) {
            return Err(ErrorCode::ALREADY_SUBSCRIBED.into());
        }
        if conn.subs.len() >= self.node.config().max_channels {
            return Err(ErrorCode::LIMIT_EXCEEDED.into());
        }
        let mut chan_info = Bytes::new();
        let mut expires_at = None;
        if channel.starts_with('#') {
            // Personal channels are joined server-side only.
            return Err(ErrorCode::PERMISSION_DENIED.into());
        }
        if !req.token.is_empty() {
            let deadline = Instant::now() + JWKS_WAIT;
            let claims = match self.verify_token(|a| a.verify_subscribe(&req.token), deadline).await
            {
                Ok(c) => c,
                Err(AuthError::Expired) => return Err(ErrorCode::TOKEN_EXPIRED.into()),
                Err(e) => {
                    tracing::debug!(session = self.id, error = %e, "subscription token refused");
                    return Err(Fail::Disconnect(DisconnectCode::INVALID_TOKEN));
                }
            };
            let conn = self.connected();
            if claims.channel != channel || claims.sub != *conn.info.user {
                return Err(ErrorCode::PERMISSION_DENIED.into());
            }
            chan_info = info_bytes(&claims.info);
            expires_at = claims.exp;
        } else if let Some(proxy) = self.node.config().proxies.named(&ns.subscribe_proxy).cloned() {
            // The backend decides (instead of allow_subscribe / private).
            self.start_subscribe_proxy(&proxy, id, req);
            return Ok(None);
        } else if ns.private || !ns.allow_subscribe {
            return Err(ErrorCode::PERMISSION_DENIED.into());
        }
        self.subscribe_granted(id, &req, &ns, chan_info, expires_at, Bytes::new()).await
    }

    /// Joins a channel the client may subscribe to and replies.
    async fn subscribe_granted(
        &mut self,
        id: u32,
        req: &SubscribeRequest,
        ns: &Namespace,
        chan_info: Bytes,
        expires_at: Option<u64>,
        data: Bytes,
    ) -> Result<Option<ReplyBody>, Fail> {
        let channel = req.channel.as_str();
        let (mut result, subscriber) =
            self.join_channel(channel, req, ns, chan_info, expires_at, false).await?;
        result.data = data;
        if expires_at.is_some() && !ns.sub_refresh_proxy.is_empty() {
            // The node refreshes it through the proxy, not the client.
            result.expires = false;
            result.ttl = 0;
        }
        let offset = result.offset;
        // A delta subscription's client holds the last recovered publication;
        // with none recovered it holds nothing we can vouch for (an SDK may
        // drop its base on resubscribe), so the first live one goes in full.
        let delta_base = result.publications.last().map_or(0, |p| p.offset);
        self.send(Reply::new(id, ReplyBody::Subscribe(Box::new(result))));
        subscriber.go_live_with_base(offset, delta_base);
        if ns.join_leave {
            self.announce_join(channel).await;
        }
        Ok(None)
    }

    /// Drops one subscription: hub, presence, leave push.
    async fn leave_channel(&mut self, channel: &str) -> bool {
        let Some(sub) = self.connected_mut().subs.remove(channel) else {
            return false;
        };
        if sub.presence {
            self.node.events().presence_leave(channel, &sub.info);
        }
        self.node.events().unsubscribe(channel, &sub.info);
        self.node.unsubscribe_local(channel, self.id).await;
        self.node.subscription_ended();
        let broker = self.node.broker();
        if sub.presence
            && let Err(e) = broker.remove_presence(channel, &sub.info.client).await
        {
            tracing::warn!(session = self.id, channel, error = %e, "presence remove failed");
        }
        if sub.join_leave
            && let Err(e) = broker.publish_leave(channel, (*sub.info).clone()).await
        {
            tracing::warn!(session = self.id, channel, error = %e, "leave push failed");
        }
        true
    }

    async fn unsubscribe(&mut self, channel: &str) -> Result<Option<ReplyBody>, Fail> {
        self.node.rules().namespace(channel)?;
        self.leave_channel(channel).await;
        Ok(Some(ReplyBody::Unsubscribe))
    }

    /// Hands a publish to the broker, or queues it behind the batch the broker
    /// has. The reply is sent when the broker answers: at once (memory broker)
    /// or from [`Session::publish_done`].
    fn publish(
        &mut self,
        id: u32,
        channel: String,
        data: Bytes,
    ) -> Result<Option<ReplyBody>, Fail> {
        let ns = self.node.rules().namespace(&channel)?;
        if data.is_empty() {
            return Err(ErrorCode::BAD_REQUEST.into());
        }
        let proxy = self.node.config().proxies.named(&ns.publish_proxy).cloned();
        let subscribed = self.connected().subs.contains_key(channel.as_str());
        let allowed =
            proxy.is_some() || ns.allow_publish || (ns.allow_publish_for_subscriber && subscribed);
        // A private channel is for those who were let in: `allow_publish`
        // (or a publish proxy) does not open it to outsiders.
        if !allowed || channel.starts_with('#') || (ns.private && !subscribed) {
            return Err(ErrorCode::PERMISSION_DENIED.into());
        }
        // Protobuf clients may publish any bytes (JSON clients cannot receive
        // those, see `Hub::fan_out`); a JSON client's data is JSON, which the
        // frame decoder parsed as one value already.
        let rules = &self.node.config().data_rules;
        let checked = match self.outbox.codec() {
            Codec::Json => rules.check_parsed(data),
            Codec::Protobuf => rules.check_opaque(data),
        };
        let data = match checked {
            Ok(d) => d,
            Err(DataError::TooLarge { .. }) => return Err(ErrorCode::LIMIT_EXCEEDED.into()),
            Err(e) => {
                tracing::debug!(session = self.id, error = %e, "publish data refused");
                return Err(ErrorCode::BAD_REQUEST.into());
            }
        };
        if let Some(proxy) = proxy {
            // Commands after this one wait for the answer, so publications
            // keep the client's order.
            self.start_publish_proxy(&proxy, id, channel, data);
            return Ok(None);
        }
        let opts = Node::publish_options(ns);
        let publication = Publication { data, ..Default::default() };
        self.enqueue_publish(id, PublishItem { channel, publication, opts });
        Ok(None)
    }

    /// Frees the side state once it holds nothing.
    fn trim_side(&mut self) {
        if self.side.as_ref().is_some_and(|s| s.publishing.is_none() && s.proxy.is_empty()) {
            self.side = None;
        }
    }

    /// Whether the transport should read the client's next commands: not
    /// while too many publishes wait for the broker, nor while a proxy call
    /// waits for the backend (the commands behind it would queue unbounded).
    pub fn accepts_input(&self) -> bool {
        self.publishes_in_flight() < MAX_PUBLISHES_IN_FLIGHT && self.waiting().is_none()
    }

    /// Waits until the broker answers the batch it has or the backend answers
    /// the proxy call this session waits for; hand the result to
    /// [`Session::handle_event`] at once. Never resolves when nothing is out.
    /// Cancel-safe: it only polls futures the session keeps.
    pub fn next_event(&mut self) -> impl Future<Output = Event> + Send + '_ {
        std::future::poll_fn(move |cx| {
            if let Some(p) = self.publishing_mut()
                && let Poll::Ready(done) = p.sent.get_mut().as_mut().poll(cx)
            {
                // Replied to at once (no await): nothing is left half done
                // if the caller drops this future after it returned.
                return Poll::Ready(Event(EventKind::Published(self.batch_done(done))));
            }
            if let Some(w) = self.waiting_mut()
                && w.answer.is_none()
                && let Poll::Ready(answer) = w.call.get_mut().as_mut().poll(cx)
            {
                w.answer = Some(answer);
                return Poll::Ready(Event(EventKind::Answered));
            }
            Poll::Pending
        })
    }

    /// Acts on what [`Session::next_event`] returned: replies to a batch of
    /// publishes and sends the next one, or goes on with the command (or
    /// timer) that waited for the backend, then with the commands queued
    /// behind it.
    pub async fn handle_event(&mut self, event: Event) -> Result<(), DisconnectCode> {
        match event.0 {
            EventKind::Published(result) => result,
            EventKind::Answered => self.proxy_answered().await,
        }
    }

    /// Checks that this client may read presence (`presence` true) or history
    /// of `channel`: the feature is on (else 108) and the namespace's per-role
    /// permissions allow it (else 103).
    fn readable(&self, channel: &str, presence: bool) -> Result<(), Fail> {
        let ns = self.node.rules().namespace(channel)?;
        let enabled = if presence { ns.presence } else { ns.history_enabled() };
        if !enabled {
            return Err(ErrorCode::NOT_AVAILABLE.into());
        }
        let conn = self.connected();
        if !ns.may_read(presence, conn.subs.contains_key(channel), conn.info.user.is_empty()) {
            return Err(ErrorCode::PERMISSION_DENIED.into());
        }
        Ok(())
    }

    async fn presence(&self, channel: &str) -> Result<Option<ReplyBody>, Fail> {
        self.readable(channel, true)?;
        let map = self.node.broker().presence(channel).await.map_err(|_| ErrorCode::INTERNAL)?;
        Ok(Some(ReplyBody::Presence(map)))
    }

    async fn presence_stats(&self, channel: &str) -> Result<Option<ReplyBody>, Fail> {
        self.readable(channel, true)?;
        let (num_clients, num_users) =
            self.node.broker().presence_stats(channel).await.map_err(|_| ErrorCode::INTERNAL)?;
        Ok(Some(ReplyBody::PresenceStats { num_clients, num_users }))
    }

    async fn history(&self, req: HistoryRequest) -> Result<Option<ReplyBody>, Fail> {
        self.readable(&req.channel, false)?;
        // At most `history_max_publications` (also for "everything", -1).
        let max = self.node.config().history_max_publications;
        let limit = match req.limit {
            0 => Some(0),
            n if n < 0 => Some(max),
            n => Some((n as usize).min(max)),
        };
        let query = HistoryQuery { since: req.since.clone(), limit, reverse: req.reverse };
        let page = self
            .node
            .broker()
            .history(&req.channel, query)
            .await
            .map_err(|_| ErrorCode::INTERNAL)?;
        if let Some(since) = &req.since
            && since.epoch != page.position.epoch
        {
            return Err(ErrorCode::UNRECOVERABLE_POSITION.into());
        }
        // And at most what fits one reply: the client sees from `offset` that
        // there is more and pages on with `since`.
        let mut publications = page.publications;
        let mut size = 0;
        let fit = publications
            .iter()
            .take_while(|p| {
                size += estimated_size(std::slice::from_ref(p));
                size <= self.reply_budget()
            })
            .count();
        publications.truncate(fit);
        Ok(Some(ReplyBody::History(HistoryResult {
            publications,
            epoch: page.position.epoch,
            offset: page.position.offset,
        })))
    }

    /// Verifies a token with `verify`. One signed with a `kid` the JWKS does
    /// not list yet waits, until `deadline`, for a fetch (unless one ran
    /// within `auth.jwks_refetch_interval`) and is verified once more.
    async fn verify_token<T>(
        &self,
        verify: impl Fn(&Authenticator) -> Result<T, AuthError>,
        deadline: Instant,
    ) -> Result<T, AuthError> {
        let auth = self.node.auth();
        match verify(auth) {
            Err(AuthError::UnknownKey) if auth.await_jwks(deadline.std().into()).await => {
                verify(auth)
            }
            r => r,
        }
    }

    async fn refresh(&mut self, token: &str) -> Result<Option<ReplyBody>, Fail> {
        let deadline = Instant::now() + JWKS_WAIT;
        let claims = match self.verify_token(|a| a.verify_connect(token), deadline).await {
            Ok(c) => c,
            Err(AuthError::Expired) => return Err(ErrorCode::TOKEN_EXPIRED.into()),
            Err(e) => {
                tracing::debug!(session = self.id, error = %e, "refresh token refused");
                return Err(Fail::Disconnect(DisconnectCode::INVALID_TOKEN));
            }
        };
        let version = self.node.config().version.clone();
        let conn = self.connected_mut();
        if claims.sub != *conn.info.user {
            return Err(Fail::Disconnect(DisconnectCode::INVALID_TOKEN));
        }
        conn.expires_at = claims.exp;
        Ok(Some(ReplyBody::Refresh {
            client: conn.info.client.to_string(),
            version,
            expires: claims.exp.is_some(),
            ttl: claims.exp.map_or(0, ttl_until),
        }))
    }

    async fn sub_refresh(&mut self, channel: &str, token: &str) -> Result<Option<ReplyBody>, Fail> {
        match self.connected().subs.get(channel) {
            None => return Err(ErrorCode::PERMISSION_DENIED.into()),
            // A server-side subscription (the personal channel `#user`, a
            // token's `channels`) lives as long as the connection: the server
            // made it, so a client's token may not set its expiry.
            Some(sub) if sub.server_side || channel.starts_with('#') => {
                return Err(ErrorCode::PERMISSION_DENIED.into());
            }
            Some(_) => {}
        }
        let deadline = Instant::now() + JWKS_WAIT;
        let claims = match self.verify_token(|a| a.verify_subscribe(token), deadline).await {
            Ok(c) => c,
            Err(AuthError::Expired) => return Err(ErrorCode::TOKEN_EXPIRED.into()),
            Err(e) => {
                tracing::debug!(session = self.id, error = %e, "subscription token refused");
                return Err(Fail::Disconnect(DisconnectCode::INVALID_TOKEN));
            }
        };
        let conn = self.connected_mut();
        if claims.channel != channel || claims.sub != *conn.info.user {
            return Err(ErrorCode::PERMISSION_DENIED.into());
        }
        let sub = conn.subs.get_mut(channel).expect("checked above");
        sub.expires_at = claims.exp;
        Ok(Some(ReplyBody::SubRefresh {
            expires: claims.exp.is_some(),
            ttl: claims.exp.map_or(0, ttl_until),
        }))
    }

    async fn close_subscriptions(&mut self) {
        let channels: Vec<Arc<str>> = match &self.conn {
            Some(c) => c.subs.keys().cloned().collect(),
            None => return,
        };
        for channel in channels {
            self.leave_channel(&channel).await;
        }
    }

    /// Records how the connection ends, as soon as the transport knows, and
    /// returns the code to close with. A close already decided through the
    /// outbox wins over how the socket failed afterwards: a slow consumer
    /// whose peer then reset the connection still ends as 3008. The slow
    /// consumer counter is bumped where 3008 is decided (queue overflow, write
    /// timeout) and only there, so it always equals
    /// `disconnects_total{reason="slow"}`. Counted once; later calls (and
    /// [`Session::close`]) do not count again.
    pub fn ended(&mut self, code: DisconnectCode) -> DisconnectCode {
        // Sticky from here on: a control arriving now cannot change it.
        self.outbox.close_first(code);
        let code = self.outbox.close_code().unwrap_or(code);
        if !self.end_counted {
            self.end_counted = true;
            metrics::counter!(crate::metrics::DISCONNECTS, "reason" => code.label()).increment(1);
        }
        code
    }

    /// Ends the session: leaves every channel and unregisters from the node.
    pub async fn close(mut self, code: DisconnectCode) {
        let code = self.ended(code);
        if self.transport.is_emulated() {
            self.node.unregister_emulated(self.id);
        }
        if self.conn.is_some() {
            metrics::gauge!(crate::metrics::TRANSPORT_CONNECTIONS, "transport" => self.transport.label())
                .decrement(1.0);
        }
        // The timer's entry for this outbox is dropped when its bucket is walked.
        self.outbox.set_armed_tick(0);
        self.close_subscriptions().await;
        tracing::debug!(session = self.id, client = self.client_id(), code = code.0, "closed");
        if let Some(c) = &self.conn {
            self.node.events().disconnect(&c.info, code, &self.outbox);
        }
        self.node.unregister(self.id);
        self.outbox.release();
    }
}
