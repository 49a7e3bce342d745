//! What the control API (gRPC and HTTP) asks of a node, with validation and
//! errors that map onto gRPC status codes and HTTP statuses.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fanfare_protocol::{ClientInfo, DisconnectCode, Publication, StreamPosition};

use crate::broker::{BrokerError, HistoryPage, HistoryQuery, NodeInfo};
use crate::channel::{ChannelError, Namespace, personal_channel};
use crate::control::ControlMessage;
use crate::ingress::DataError;
use crate::node::Node;

/// A control API failure. Each variant has one gRPC code and one HTTP status.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// gRPC INVALID_ARGUMENT, HTTP 400.
    #[error("{0}")]
    InvalidArgument(String),
    /// The channel's namespace is not configured: gRPC INVALID_ARGUMENT,
    /// HTTP 400 (the Centrifugo-compatible API tells it apart: code 102).
    #[error("{0}")]
    UnknownNamespace(String),
    /// gRPC NOT_FOUND, HTTP 404.
    #[error("{0}")]
    NotFound(String),
    /// gRPC RESOURCE_EXHAUSTED, HTTP 429.
    #[error("{0}")]
    ResourceExhausted(String),
    /// Something in the request is larger than allowed: gRPC RESOURCE_EXHAUSTED,
    /// HTTP 413.
    #[error("{0}")]
    TooLarge(String),
    /// gRPC UNAVAILABLE, HTTP 503.
    #[error("{0}")]
    Unavailable(String),
    /// A history `since` position that is not one of the stream (another
    /// epoch): gRPC INVALID_ARGUMENT, HTTP 400 (the Centrifugo-compatible API:
    /// code 112).
    #[error("{0}")]
    UnrecoverablePosition(String),
}

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> Self {
        ApiError::Unavailable(e.to_string())
    }
}

/// Limits of the control API.
#[derive(Debug, Clone)]
pub struct ApiLimits {
    /// Most channels in one Broadcast.
    pub max_broadcast_channels: usize,
    /// Window of idempotent publishes.
    pub idempotency_window: Duration,
    /// How long Channels waits for other nodes.
    pub cluster_timeout: Duration,
}

impl Default for ApiLimits {
    fn default() -> Self {
        Self {
            max_broadcast_channels: 1000,
            idempotency_window: Duration::from_secs(300),
            cluster_timeout: Duration::from_secs(2),
        }
    }
}

/// A publish as the API receives it.
#[derive(Debug, Clone, Default)]
pub struct ApiPublish {
    pub data: Bytes,
    pub idempotency_key: String,
    pub tags: BTreeMap<String, String>,
    pub skip_history: bool,
}

impl From<DataError> for ApiError {
    fn from(e: DataError) -> Self {
        match e {
            DataError::TooLarge { .. } => ApiError::TooLarge(e.to_string()),
            _ => ApiError::InvalidArgument(e.to_string()),
        }
    }
}

impl Node {
    fn api_namespace(&self, channel: &str) -> Result<&Namespace, ApiError> {
        self.rules().namespace(channel).map_err(|e| match e {
            ChannelError::Invalid => ApiError::InvalidArgument(format!(
                "channel: {channel:?} is not a valid channel name (1-255 bytes, no whitespace)"
            )),
            ChannelError::UnknownNamespace => ApiError::UnknownNamespace(format!(
                "channel: {channel:?} is in an unknown namespace"
            )),
        })
    }

    /// Publishes into one channel (API `Publish`).
    pub async fn api_publish(
        &self,
        channel: &str,
        req: &ApiPublish,
        limits: &ApiLimits,
    ) -> Result<StreamPosition, ApiError> {
        let data = self.config().data_rules.check(req.data.clone())?;
        self.api_publish_checked(channel, data, req, limits).await
    }

    /// [`Node::api_publish`] with `data` already through the ingress rule.
    async fn api_publish_checked(
        &self,
        channel: &str,
        data: Bytes,
        req: &ApiPublish,
        limits: &ApiLimits,
    ) -> Result<StreamPosition, ApiError> {
        let ns = self.api_namespace(channel)?;
        let mut opts =
            if req.skip_history { Default::default() } else { Node::publish_options(ns) };
        if !req.idempotency_key.is_empty() {
            opts.idempotency_key = Some(req.idempotency_key.clone());
            opts.idempotency_window = limits.idempotency_window;
        }
        let publication = Publication {
            data,
            tags: (!req.tags.is_empty()).then(|| Arc::new(req.tags.clone())),
            ..Default::default()
        };
        Ok(self.publish_with(channel, publication, opts).await?)
    }

    /// Publishes into many channels; one result per channel (API `Broadcast`).
    pub async fn api_broadcast(
        &self,
        channels: &[String],
        req: &ApiPublish,
        limits: &ApiLimits,
    ) -> Result<Vec<Result<StreamPosition, ApiError>>, ApiError> {
        if channels.is_empty() {
            return Err(ApiError::InvalidArgument("channels: at least one is needed".into()));
        }
        if channels.len() > limits.max_broadcast_channels {
            return Err(ApiError::ResourceExhausted(format!(
                "channels: at most {} per broadcast",
                limits.max_broadcast_channels
            )));
        }
        let data = self.config().data_rules.check(req.data.clone())?;
        let calls = channels.iter().map(|c| self.api_publish_checked(c, data.clone(), req, limits));
        Ok(futures_util::future::join_all(calls).await)
    }

    /// Publishes to every connection of a user (API `PublishToUser`).
    pub async fn api_publish_to_user(
        &self,
        user: &str,
        req: &ApiPublish,
        limits: &ApiLimits,
    ) -> Result<StreamPosition, ApiError> {
        if user.is_empty() {
            return Err(ApiError::InvalidArgument("user: must not be empty".into()));
        }
        self.api_publish(&personal_channel(user), req, limits).await
    }

    fn check_target(&self, user: &str, client: &str) -> Result<(), ApiError> {
        if user.is_empty() && client.is_empty() {
            return Err(ApiError::InvalidArgument("user or client: one must be set".into()));
        }
        Ok(())
    }

    /// Subscribes a user's connections to a channel on every node (API `Subscribe`).
    pub async fn api_subscribe(
        &self,
        user: &str,
        client: &str,
        channel: &str,
    ) -> Result<(), ApiError> {
        self.api_membership(user, client, channel, true).await
    }

    /// Unsubscribes a user's connections from a channel on every node (API `Unsubscribe`).
    pub async fn api_unsubscribe(
        &self,
        user: &str,
        client: &str,
        channel: &str,
    ) -> Result<(), ApiError> {
        self.api_membership(user, client, channel, false).await
    }

    async fn api_membership(
        &self,
        user: &str,
        client: &str,
        channel: &str,
        subscribe: bool,
    ) -> Result<(), ApiError> {
        self.check_target(user, client)?;
        self.api_namespace(channel)?;
        let (user, client, channel) = (user.into(), client.into(), channel.into());
        let msg = if subscribe {
            ControlMessage::Subscribe { user, client, channel }
        } else {
            ControlMessage::Unsubscribe { user, client, channel }
        };
        Ok(self.send_control(&msg).await?)
    }

    /// Closes a user's connections on every node (API `Disconnect`).
    pub async fn api_disconnect(
        &self,
        user: &str,
        client: &str,
        code: u32,
        reason: &str,
    ) -> Result<(), ApiError> {
        self.check_target(user, client)?;
        let code = if code == 0 { DisconnectCode::FORCE_DISCONNECT.0 as u32 } else { code };
        if !(3000..=4999).contains(&code) {
            return Err(ApiError::InvalidArgument("code: must be within 3000-4999".into()));
        }
        if reason.len() > 123 {
            return Err(ApiError::InvalidArgument("reason: at most 123 bytes".into()));
        }
        let reason = if reason.is_empty() {
            DisconnectCode(code as u16).reason().to_string()
        } else {
            reason.to_string()
        };
        let msg = ControlMessage::Disconnect {
            user: user.into(),
            client: client.into(),
            code: code as u16,
            reason,
        };
        Ok(self.send_control(&msg).await?)
    }

    /// Sets the expiry of a user's connections (or one client's) on every
    /// node (API `refresh`): `expired` closes them with 3005 at once;
    /// otherwise they expire at `expire_at` (unix seconds; 0 = never) and
    /// each gets a refresh push.
    pub async fn api_refresh(
        &self,
        user: &str,
        client: &str,
        expired: bool,
        expire_at: i64,
    ) -> Result<(), ApiError> {
        self.check_target(user, client)?;
        if expired {
            return self.api_disconnect(user, client, DisconnectCode::EXPIRED.0 as u32, "").await;
        }
        if expire_at < 0 {
            return Err(ApiError::InvalidArgument(
                "expire_at: unix seconds, 0 for no expiry".into(),
            ));
        }
        let msg = ControlMessage::Refresh {
            user: user.into(),
            client: client.into(),
            expire_at: (expire_at > 0).then_some(expire_at as u64),
        };
        Ok(self.send_control(&msg).await?)
    }

    fn feature(&self, channel: &str, presence: bool) -> Result<(), ApiError> {
        let ns = self.api_namespace(channel)?;
        let (on, what) =
            if presence { (ns.presence, "presence") } else { (ns.history_enabled(), "history") };
        if !on {
            let name = if ns.name.is_empty() { "the default namespace" } else { &ns.name };
            return Err(ApiError::NotFound(format!("{what} is not enabled for {name}")));
        }
        Ok(())
    }

    pub async fn api_presence(
        &self,
        channel: &str,
    ) -> Result<BTreeMap<String, ClientInfo>, ApiError> {
        self.feature(channel, true)?;
        Ok(self.broker().presence(channel).await?)
    }

    pub async fn api_presence_stats(&self, channel: &str) -> Result<(u32, u32), ApiError> {
        self.feature(channel, true)?;
        Ok(self.broker().presence_stats(channel).await?)
    }

    /// API `History`: `limit` 0 = position only, -1 = everything kept.
    pub async fn api_history(
        &self,
        channel: &str,
        limit: i32,
        since: Option<StreamPosition>,
        reverse: bool,
    ) -> Result<HistoryPage, ApiError> {
        self.feature(channel, false)?;
        let limit = match limit {
            0 => Some(0),
            n if n < 0 => None,
            n => Some(n as usize),
        };
        let page = self
            .broker()
            .history(channel, HistoryQuery { since: since.clone(), limit, reverse })
            .await?;
        if let Some(since) = since
            && since.epoch != page.position.epoch
        {
            return Err(ApiError::UnrecoverablePosition(format!(
                "epoch: {:?} is not the channel's current epoch {:?}",
                since.epoch, page.position.epoch
            )));
        }
        Ok(page)
    }

    /// API `history_remove`: drops the channel's kept publications; its
    /// position (offset, epoch) stays.
    pub async fn api_history_remove(&self, channel: &str) -> Result<(), ApiError> {
        self.feature(channel, false)?;
        Ok(self.broker().remove_history(channel).await?)
    }

    /// API `Channels`: channel -> subscribers, cluster-wide.
    pub async fn api_channels(
        &self,
        pattern: &str,
        limits: &ApiLimits,
    ) -> Result<HashMap<String, u32>, ApiError> {
        Ok(self.cluster_channels(pattern, limits.cluster_timeout).await?)
    }

    /// API `Info`: every live node.
    pub async fn api_info(&self) -> Result<Vec<NodeInfo>, ApiError> {
        let mut nodes = self.broker().nodes().await?;
        // This node's own figures are always current.
        let me = self.info();
        nodes.retain(|n| n.uid != me.uid);
        nodes.push(me);
        nodes.sort_by(|a, b| a.name.cmp(&b.name).then(a.uid.cmp(&b.uid)));
        Ok(nodes)
    }
}
