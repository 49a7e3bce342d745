//! Centrifugo's server API (issue 15), so a backend built on `cent` or another
//! Centrifugo API client works against fanfare by changing only the URL and
//! key: `POST /centrifugo/api/<method>` on the HTTP port ([`http`]) and
//! `centrifugal.centrifugo.api.CentrifugoApi` on the gRPC port ([`grpc`]).
//!
//! Both transports turn a request into [`Params`], run it here with [`run`]
//! (or [`run_batch`]) on the same `Node::api_*` calls as fanfare's own API,
//! and encode the [`Done`] in Centrifugo's shapes. As in Centrifugo an API
//! error is part of the answer (`{"error": {code, message}}`, the response
//! message's `error`), not a transport status.

pub mod grpc;
pub mod http;

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use bytes::Bytes;
use fanfare_core::{ApiError, ApiPublish, HistoryPage, Node, NodeInfo};
use fanfare_protocol::{ClientInfo, StreamPosition};

use crate::api::{ApiContext, observe};
use crate::methods::{CENTRIFUGO_PRO, Method};

/// A Centrifugo API error: its code and a message saying what was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompatError {
    pub code: u32,
    pub message: String,
}

impl CompatError {
    pub const INTERNAL: u32 = 100;
    pub const UNAUTHORIZED: u32 = 101;
    pub const NAMESPACE_NOT_FOUND: u32 = 102;
    pub const METHOD_NOT_FOUND: u32 = 104;
    pub const LIMIT_EXCEEDED: u32 = 106;
    pub const BAD_REQUEST: u32 = 107;
    pub const NOT_AVAILABLE: u32 = 108;
    pub const UNRECOVERABLE_POSITION: u32 = 112;

    pub fn new(code: u32, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(Self::BAD_REQUEST, message)
    }

    /// A method of Centrifugo's paid edition.
    pub fn pro(method: &str) -> Self {
        Self::new(
            Self::NOT_AVAILABLE,
            format!("not available: {method} is a Centrifugo PRO method fanfare does not have"),
        )
    }

    pub fn method_not_found(method: &str) -> Self {
        Self::new(Self::METHOD_NOT_FOUND, format!("method not found: {method:?}"))
    }

    /// The `code` label of the API metrics.
    pub fn label(&self) -> &'static str {
        match self.code {
            100 => "100",
            101 => "101",
            102 => "102",
            104 => "104",
            106 => "106",
            107 => "107",
            108 => "108",
            112 => "112",
            _ => "other",
        }
    }
}

impl From<ApiError> for CompatError {
    fn from(e: ApiError) -> Self {
        let code = match &e {
            ApiError::InvalidArgument(_) => Self::BAD_REQUEST,
            ApiError::UnknownNamespace(_) => Self::NAMESPACE_NOT_FOUND,
            // Presence or history not enabled for the namespace: Centrifugo
            // answers "not available".
            ApiError::NotFound(_) => Self::NOT_AVAILABLE,
            ApiError::ResourceExhausted(_) | ApiError::TooLarge(_) => Self::LIMIT_EXCEEDED,
            ApiError::Unavailable(_) => Self::INTERNAL,
            ApiError::UnrecoverablePosition(_) => Self::UNRECOVERABLE_POSITION,
        };
        Self::new(code, e.to_string())
    }
}

/// Whether `snake` names a paid-edition method (HTTP path, batch key).
pub fn is_pro_snake(snake: &str) -> Option<&'static str> {
    CENTRIFUGO_PRO.iter().find(|(_, s)| *s == snake).map(|(_, s)| *s)
}

/// The fields of any method's request, as both transports decode them.
/// Fields fanfare does not support are kept only to refuse them when set.
#[derive(Debug, Default)]
pub struct Params {
    pub channel: String,
    pub channels: Vec<String>,
    pub user: String,
    pub client: String,
    pub session: String,
    pub data: Bytes,
    pub b64data: String,
    pub skip_history: bool,
    pub tags: BTreeMap<String, String>,
    pub idempotency_key: String,
    pub version: u64,
    pub expire_at: i64,
    pub info: Bytes,
    pub b64info: String,
    pub recover_since: bool,
    pub override_options: bool,
    /// `disconnect {code, reason}`.
    pub disconnect: Option<(u32, String)>,
    pub whitelist: Vec<String>,
    pub expired: bool,
    pub limit: i32,
    pub since: Option<StreamPosition>,
    pub reverse: bool,
    pub pattern: String,
    pub method: String,
    pub params: Bytes,
}

/// Request fields Centrifugo has and fanfare does not support.
#[derive(Debug, Clone, Copy)]
enum Unsupported {
    Session,
    ExpireAt,
    Info,
    B64Info,
    Data,
    B64Data,
    RecoverSince,
    Override,
    Whitelist,
    Version,
}

impl Unsupported {
    fn name(self) -> &'static str {
        match self {
            Unsupported::Session => "session",
            Unsupported::ExpireAt => "expire_at",
            Unsupported::Info => "info",
            Unsupported::B64Info => "b64info",
            Unsupported::Data => "data",
            Unsupported::B64Data => "b64data",
            Unsupported::RecoverSince => "recover_since",
            Unsupported::Override => "override",
            Unsupported::Whitelist => "whitelist",
            Unsupported::Version => "version",
        }
    }
}

impl Params {
    /// Refuses the first of `fields` that is set: ignoring it would do
    /// something else than the caller asked for (e.g. without `session`, a
    /// disconnect meant for one session would close all of the user's).
    fn refuse(&self, fields: &[Unsupported]) -> Result<(), CompatError> {
        for &f in fields {
            let set = match f {
                Unsupported::Session => !self.session.is_empty(),
                Unsupported::ExpireAt => self.expire_at != 0,
                Unsupported::Info => !self.info.is_empty(),
                Unsupported::B64Info => !self.b64info.is_empty(),
                Unsupported::Data => !self.data.is_empty(),
                Unsupported::B64Data => !self.b64data.is_empty(),
                Unsupported::RecoverSince => self.recover_since,
                Unsupported::Override => self.override_options,
                Unsupported::Whitelist => !self.whitelist.is_empty(),
                Unsupported::Version => self.version != 0,
            };
            if set {
                let name = f.name();
                return Err(CompatError::bad_request(format!("{name}: not supported by fanfare")));
            }
        }
        Ok(())
    }

    /// The publish part of publish and broadcast.
    fn publish(&self) -> Result<ApiPublish, CompatError> {
        self.refuse(&[Unsupported::Version])?;
        let data = match (self.data.is_empty(), self.b64data.is_empty()) {
            (_, true) => self.data.clone(),
            (true, false) => data_encoding::BASE64
                .decode(self.b64data.as_bytes())
                .map_err(|e| CompatError::bad_request(format!("b64data: not base64: {e}")))?
                .into(),
            (false, false) => {
                return Err(CompatError::bad_request("data and b64data: send one of them"));
            }
        };
        Ok(ApiPublish {
            data,
            idempotency_key: self.idempotency_key.clone(),
            tags: self.tags.clone(),
            skip_history: self.skip_history,
        })
    }
}

/// What a method produced, for the transports to encode.
#[derive(Debug)]
pub enum Done {
    /// An empty result (`{}`).
    Empty,
    Publish(StreamPosition),
    /// One result per channel, in request order.
    Broadcast(Vec<Result<StreamPosition, CompatError>>),
    Presence(BTreeMap<String, ClientInfo>),
    PresenceStats {
        num_clients: u32,
        num_users: u32,
    },
    History(HistoryPage),
    Channels(HashMap<String, u32>),
    Info(Vec<NodeInfo>),
    Rpc(Bytes),
}

/// The server API's `rpc`: answered by the backend through the rpc proxy
/// (`client.rpc_proxy`), as a client's RPC is but with no client and no user;
/// 108 without one, as Centrifugo answers. The backend's error answer is the
/// API error; a failed call (timeout, backend down, bad answer) is 100.
pub async fn api_rpc(node: &Node, method: &str, params: Bytes) -> Result<Bytes, CompatError> {
    use fanfare_core::proxy::{ProxyAnswer, ProxyResult};
    let Some(answer) = node.api_rpc(method, params).await else {
        return Err(CompatError::new(
            CompatError::NOT_AVAILABLE,
            format!(
                "not available: no rpc proxy is configured (client.rpc_proxy) to answer {method:?}"
            ),
        ));
    };
    match answer {
        Ok(ProxyAnswer::Result(ProxyResult::Rpc(data))) => Ok(data),
        Ok(ProxyAnswer::Error { code, message, .. }) => Err(CompatError::new(code, message)),
        Ok(ProxyAnswer::Disconnect { code, .. }) => Err(CompatError::new(
            CompatError::INTERNAL,
            format!("the rpc proxy answered disconnect {code}, which needs a client"),
        )),
        Ok(ProxyAnswer::Result(_)) => {
            Err(CompatError::new(CompatError::INTERNAL, "the rpc proxy answered another call"))
        }
        Err(e) => Err(CompatError::new(CompatError::INTERNAL, format!("rpc proxy: {e}"))),
    }
}

/// Runs one method (not `batch`: see [`run_batch`]).
pub async fn run(
    node: &Node,
    ctx: &ApiContext,
    method: Method,
    p: Params,
) -> Result<Done, CompatError> {
    let limits = &ctx.limits;
    Ok(match method {
        Method::Publish => {
            Done::Publish(node.api_publish(&p.channel, &p.publish()?, limits).await?)
        }
        Method::Broadcast => {
            let results = node.api_broadcast(&p.channels, &p.publish()?, limits).await?;
            Done::Broadcast(results.into_iter().map(|r| r.map_err(CompatError::from)).collect())
        }
        Method::Subscribe => {
            use Unsupported::*;
            p.refuse(&[Session, ExpireAt, Info, B64Info, Data, B64Data, RecoverSince, Override])?;
            node.api_subscribe(&p.user, &p.client, &p.channel).await?;
            Done::Empty
        }
        Method::Unsubscribe => {
            p.refuse(&[Unsupported::Session])?;
            node.api_unsubscribe(&p.user, &p.client, &p.channel).await?;
            Done::Empty
        }
        Method::Disconnect => {
            p.refuse(&[Unsupported::Session, Unsupported::Whitelist])?;
            let (code, reason) = p.disconnect.unwrap_or_default();
            node.api_disconnect(&p.user, &p.client, code, &reason).await?;
            Done::Empty
        }
        Method::Refresh => {
            p.refuse(&[Unsupported::Session, Unsupported::Info])?;
            node.api_refresh(&p.user, &p.client, p.expired, p.expire_at).await?;
            Done::Empty
        }
        Method::Presence => Done::Presence(node.api_presence(&p.channel).await?),
        Method::PresenceStats => {
            let (num_clients, num_users) = node.api_presence_stats(&p.channel).await?;
            Done::PresenceStats { num_clients, num_users }
        }
        Method::History => {
            Done::History(node.api_history(&p.channel, p.limit, p.since, p.reverse).await?)
        }
        Method::HistoryRemove => {
            node.api_history_remove(&p.channel).await?;
            Done::Empty
        }
        Method::Channels => Done::Channels(node.api_channels(&p.pattern, limits).await?),
        Method::Info => Done::Info(node.api_info().await?),
        Method::Rpc => {
            if p.method.is_empty() {
                return Err(CompatError::bad_request("method: must not be empty"));
            }
            Done::Rpc(api_rpc(node, &p.method, p.params).await?)
        }
        Method::Batch => return Err(CompatError::method_not_found("batch (inside a batch)")),
        Method::PublishToUser => return Err(CompatError::method_not_found(method.snake())),
    })
}

/// One command of a batch, as a transport decoded it.
pub type Command = Result<(Method, Params), CompatError>;

/// Runs a batch's commands one after another, or all at once with
/// `parallel`; one reply per command, in command order.
pub async fn run_batch(
    node: &Node,
    ctx: &ApiContext,
    commands: Vec<Command>,
    parallel: bool,
) -> Vec<Result<(Method, Done), CompatError>> {
    let one = |c: Command| async move {
        let (method, params) = c?;
        Ok((method, run(node, ctx, method, params).await?))
    };
    if parallel {
        futures_util::future::join_all(commands.into_iter().map(one)).await
    } else {
        let mut out = Vec::with_capacity(commands.len());
        for c in commands {
            out.push(one(c).await);
        }
        out
    }
}

/// Records a call of the Centrifugo-compatible API in the per-method metrics.
pub fn observe_call(
    method: &'static str,
    protocol: &'static str,
    result: Result<(), &CompatError>,
    start: Instant,
) {
    observe(method, protocol, result.map_or_else(CompatError::label, |()| "OK"), start);
}
