//! Channel names and the per-namespace rules that govern them.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::delta::DeltaType;

/// Options of one channel namespace. Channel `ns:name` belongs to namespace `ns`;
/// a channel without `:` to the default namespace (name `""`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Namespace {
    pub name: String,
    /// Clients may publish into channels of this namespace.
    pub allow_publish: bool,
    /// Clients may subscribe without a subscription token.
    pub allow_subscribe: bool,
    /// Track who is subscribed; enables the presence commands.
    pub presence: bool,
    /// Send join/leave pushes to subscribers.
    pub join_leave: bool,
    /// Publications kept per channel for history and recovery (0 = none).
    pub history_size: usize,
    /// How long publications stay in history.
    #[serde(with = "humantime_serde")]
    pub history_ttl: Duration,
    /// Subscribing always needs a subscription token (or the subscribe
    /// proxy's yes), and only subscribers may publish, whatever
    /// `allow_publish` or a publish proxy says.
    pub private: bool,
    /// Every subscription is recoverable (the reply says so and carries the
    /// stream position), whether or not the client asked: a centrifuge-js
    /// subscription created without `recoverable` then recovers missed
    /// publications on resubscribe. Needs history.
    pub force_recovery: bool,
    /// Every subscription is positioned (the reply carries the stream
    /// position). Needs history.
    pub force_positioning: bool,
    /// Subscribers of a channel may publish into it (`allow_publish` lets any
    /// client publish, subscribed or not).
    pub allow_publish_for_subscriber: bool,
    /// Subscribers may read the channel's history (when history is on).
    pub allow_history_for_subscriber: bool,
    /// Any connected client may read history, subscribed or not.
    pub allow_history_for_client: bool,
    /// Anonymous connections may read history (in addition to one of the above).
    pub allow_history_for_anonymous: bool,
    /// Subscribers may read presence (when presence is on).
    pub allow_presence_for_subscriber: bool,
    /// Any connected client may read presence, subscribed or not.
    pub allow_presence_for_client: bool,
    /// Anonymous connections may read presence (in addition to one of the above).
    pub allow_presence_for_anonymous: bool,
    /// Delta encodings a subscribe request may ask for (`["fossil"]`);
    /// empty = none. A subscription that gets one receives publications as
    /// deltas against the previous one where it can (`delta.rs`).
    pub allowed_delta_types: Vec<DeltaType>,
    /// The `[[proxies]]` entry asked about subscribes without a token
    /// (empty = none): it decides instead of `allow_subscribe` / `private`.
    pub subscribe_proxy: String,
    /// The `[[proxies]]` entry asked about every client publish (empty =
    /// none): it decides instead of the `allow_publish*` options, and may
    /// rewrite the data.
    pub publish_proxy: String,
    /// The `[[proxies]]` entry asked when a subscription the subscribe proxy
    /// gave an `expire_at` expires (empty = none: the subscription ends then).
    pub sub_refresh_proxy: String,
}

impl Default for Namespace {
    fn default() -> Self {
        Self {
            name: String::new(),
            allow_publish: false,
            allow_subscribe: true,
            presence: false,
            join_leave: false,
            history_size: 0,
            history_ttl: Duration::ZERO,
            private: false,
            force_recovery: false,
            force_positioning: false,
            allow_publish_for_subscriber: false,
            // fanfare let subscribers read history and presence from the
            // start; Centrifugo defaults these to false.
            allow_history_for_subscriber: true,
            allow_history_for_client: false,
            allow_history_for_anonymous: true,
            allow_presence_for_subscriber: true,
            allow_presence_for_client: false,
            allow_presence_for_anonymous: true,
            allowed_delta_types: Vec::new(),
            subscribe_proxy: String::new(),
            publish_proxy: String::new(),
            sub_refresh_proxy: String::new(),
        }
    }
}

impl Namespace {
    pub fn history_enabled(&self) -> bool {
        self.history_size > 0 && !self.history_ttl.is_zero()
    }

    /// Whether a client may read history (`presence` false) or presence
    /// (`presence` true) of a channel here.
    pub fn may_read(&self, presence: bool, subscribed: bool, anonymous: bool) -> bool {
        let (subscriber, client, anon) = if presence {
            (
                self.allow_presence_for_subscriber,
                self.allow_presence_for_client,
                self.allow_presence_for_anonymous,
            )
        } else {
            (
                self.allow_history_for_subscriber,
                self.allow_history_for_client,
                self.allow_history_for_anonymous,
            )
        };
        (client || (subscriber && subscribed)) && (anon || !anonymous)
    }
}

/// Why a channel name was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChannelError {
    #[error("invalid channel name")]
    Invalid,
    #[error("unknown namespace")]
    UnknownNamespace,
}

/// Longest accepted channel name, in bytes.
pub const MAX_CHANNEL_LEN: usize = 255;

/// The namespaces of a node, looked up by channel name.
#[derive(Debug, Clone)]
pub struct ChannelRules {
    default: Namespace,
    named: Vec<Namespace>,
}

impl ChannelRules {
    /// Builds the rules; a namespace named `""` replaces the default one.
    pub fn new(namespaces: Vec<Namespace>) -> Result<Self, String> {
        let mut default = Namespace::default();
        let mut named: Vec<Namespace> = Vec::new();
        for ns in namespaces {
            if (ns.force_recovery || ns.force_positioning) && !ns.history_enabled() {
                return Err(format!(
                    "namespaces: {:?}: force_recovery and force_positioning need history \
                     (history_size and history_ttl)",
                    ns.name
                ));
            }
            if ns.name.is_empty() {
                default = ns;
                continue;
            }
            if !ns.name.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)) {
                return Err(format!(
                    "namespaces: name {:?} may only contain letters, digits, '_', '-' and '.'",
                    ns.name
                ));
            }
            if named.iter().any(|n| n.name == ns.name) {
                return Err(format!("namespaces: name {:?} is defined twice", ns.name));
            }
            named.push(ns);
        }
        Ok(Self { default, named })
    }

    /// The namespace a channel belongs to, after checking the name.
    pub fn namespace(&self, channel: &str) -> Result<&Namespace, ChannelError> {
        if channel.is_empty()
            || channel.len() > MAX_CHANNEL_LEN
            || channel.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(ChannelError::Invalid);
        }
        if channel.starts_with('#') {
            // Personal channels: `#<user>`; only server-side subscriptions.
            return Ok(&self.default);
        }
        match channel.split_once(':') {
            None => Ok(&self.default),
            Some((ns, _)) => {
                self.named.iter().find(|n| n.name == ns).ok_or(ChannelError::UnknownNamespace)
            }
        }
    }

    pub fn namespaces(&self) -> impl Iterator<Item = &Namespace> {
        std::iter::once(&self.default).chain(self.named.iter())
    }
}

/// The personal channel of a user: every connection of the user is subscribed to it.
pub fn personal_channel(user: &str) -> String {
    format!("#{user}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_lookup() {
        let rules = ChannelRules::new(vec![Namespace {
            name: "chat".into(),
            presence: true,
            ..Default::default()
        }])
        .unwrap();
        assert!(rules.namespace("chat:room").unwrap().presence);
        assert!(!rules.namespace("news").unwrap().presence);
        assert_eq!(rules.namespace("nope:x"), Err(ChannelError::UnknownNamespace));
        assert_eq!(rules.namespace(""), Err(ChannelError::Invalid));
        assert_eq!(rules.namespace("a b"), Err(ChannelError::Invalid));
        assert_eq!(rules.namespace(&"x".repeat(256)), Err(ChannelError::Invalid));
        assert!(
            ChannelRules::new(vec![Namespace { name: "a b".into(), ..Default::default() }])
                .is_err()
        );
    }
}
