//! The transport-independent heart of a fanfare node.
//!
//! A [`Node`] owns the [`Hub`] (channel -> local subscribers), the [`Broker`]
//! (memory or Redis), token verification and channel rules. Transports create
//! one [`Session`] per client connection, feed it decoded frames and write out
//! what lands in its [`Outbox`].

pub mod api;
pub mod auth;
pub mod broker;
pub mod channel;
pub mod coalesce;
pub mod control;
pub mod delta;
pub mod emulation;
pub mod events;
pub mod hub;
pub mod ingress;
pub mod limits;
pub mod memory;
pub mod metrics;
pub mod node;
pub mod outbox;
pub mod proxy;
pub mod session;
mod subscriptions;
pub mod timer;

pub use api::{ApiError, ApiLimits, ApiPublish};
pub use auth::{AuthConfig, AuthError, Authenticator, ConnectClaims, SubscribeClaims};
pub use broker::{
    Broker, BrokerError, BrokerHandler, HistoryPage, HistoryQuery, NodeInfo, PublishItem,
    PublishOptions, Sweep,
};
pub use channel::{ChannelError, ChannelRules, Namespace};
pub use coalesce::Coalescer;
pub use emulation::Emulation;
pub use events::{Event, EventKind, EventMask, EventQueue, Events, MemoryQueue};
pub use hub::{FanOut, Hub};
pub use ingress::{DataError, DataRules};
pub use limits::Limits;
pub use memory::{MemoryBroker, MemoryConfig};
pub use node::{Node, NodeConfig};
pub use outbox::{Directive, Outbox};
pub use proxy::{Proxies, Proxy, ProxyBackend};
pub use session::{MAX_PUBLISHES_IN_FLIGHT, Session, Transport};
