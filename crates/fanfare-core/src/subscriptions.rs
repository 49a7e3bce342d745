//! One connection's subscriptions: what the session keeps per channel, and
//! the small map it keeps them in.

use std::sync::Arc;

use fanfare_protocol::ClientInfo;

/// State of one subscription of this connection.
#[derive(Debug)]
pub(crate) struct Subscription {
    pub(crate) presence: bool,
    pub(crate) join_leave: bool,
    /// Joined by the server at connect (personal channel, token `channels`):
    /// the client cannot resubscribe it by itself.
    pub(crate) server_side: bool,
    /// Unix seconds after which the subscription token must have been refreshed.
    pub(crate) expires_at: Option<u64>,
    pub(crate) info: Arc<ClientInfo>,
}

/// A connection's subscriptions by channel.
///
/// A vector searched linearly rather than a hash map: most connections have a
/// handful of subscriptions (at most `client.max_channels`), and a hash map
/// allocates room for four entries plus control bytes even for one, which
/// matters with tens of thousands of idle connections. Grows by half its length
/// at a time instead of doubling.
#[derive(Debug, Default)]
pub(crate) struct SubMap(Vec<(Arc<str>, Subscription)>);

impl SubMap {
    pub(crate) fn position(&self, channel: &str) -> Option<usize> {
        self.0.iter().position(|(c, _)| &**c == channel)
    }

    pub(crate) fn get(&self, channel: &str) -> Option<&Subscription> {
        self.position(channel).map(|i| &self.0[i].1)
    }

    pub(crate) fn get_mut(&mut self, channel: &str) -> Option<&mut Subscription> {
        self.position(channel).map(|i| &mut self.0[i].1)
    }

    pub(crate) fn contains_key(&self, channel: &str) -> bool {
        self.position(channel).is_some()
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.0.capacity()
    }

    pub(crate) fn insert(&mut self, channel: Arc<str>, sub: Subscription) {
        if let Some(i) = self.position(&channel) {
            self.0[i].1 = sub;
            return;
        }
        if self.0.len() == self.0.capacity() {
            self.0.reserve_exact((self.0.len() / 2).max(1));
        }
        self.0.push((channel, sub));
    }

    pub(crate) fn remove(&mut self, channel: &str) -> Option<Subscription> {
        let i = self.position(channel)?;
        let (_, sub) = self.0.swap_remove(i);
        if self.0.is_empty() {
            self.0 = Vec::new();
        }
        Some(sub)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &Subscription)> {
        self.0.iter().map(|(c, s)| (c, s))
    }

    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = (&Arc<str>, &mut Subscription)> {
        self.0.iter_mut().map(|(c, s)| (&*c, s))
    }

    pub(crate) fn keys(&self) -> impl Iterator<Item = &Arc<str>> {
        self.0.iter().map(|(c, _)| c)
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &Subscription> {
        self.0.iter().map(|(_, s)| s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(presence: bool) -> Subscription {
        Subscription {
            presence,
            join_leave: false,
            server_side: false,
            expires_at: None,
            info: Arc::new(ClientInfo::default()),
        }
    }

    #[test]
    fn insert_replaces_an_existing_channel_and_remove_swaps_in_the_last() {
        let mut m = SubMap::default();
        m.insert("a".into(), sub(false));
        m.insert("b".into(), sub(false));
        m.insert("c".into(), sub(false));
        m.insert("a".into(), sub(true));
        assert_eq!(m.len(), 3);
        assert!(m.get("a").is_some_and(|s| s.presence), "replaced, not added");
        assert!(m.remove("a").is_some());
        assert!(m.remove("a").is_none());
        let mut left: Vec<&str> = m.keys().map(|c| &**c).collect();
        left.sort();
        assert_eq!(left, ["b", "c"]);
        assert!(m.contains_key("c") && !m.contains_key("a"));
    }

    #[test]
    fn an_emptied_map_gives_its_allocation_back() {
        let mut m = SubMap::default();
        for c in ["a", "b", "c", "d", "e"] {
            m.insert(c.into(), sub(false));
        }
        for c in ["a", "b", "c", "d", "e"] {
            m.remove(c);
        }
        assert_eq!(m.capacity(), 0, "an idle connection keeps no subscription storage");
    }

    #[test]
    fn grows_by_half_its_length_not_by_doubling() {
        let mut m = SubMap::default();
        for i in 0..9 {
            m.insert(format!("c{i}").into(), sub(false));
        }
        // 1, 2, 3, 4, 6, 9: never more than half again what it holds.
        assert!(m.capacity() <= 9 + 9 / 2, "capacity {}", m.capacity());
    }
}
