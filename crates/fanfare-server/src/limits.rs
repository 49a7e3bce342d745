//! Admission of new connections on the public HTTP port (decision 29): the
//! connection count of the node, the node's connect rate and each client
//! IP's connect rate, checked on the request that opens a connection (a
//! WebSocket upgrade, a stream of an HTTP transport) before anything is
//! allocated for it. The per-user and per-command limits live in the session
//! (`fanfare_core::limits`).

use std::hash::BuildHasher;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Instant;

use fanfare_core::Node;
use fanfare_core::limits::{Bucket, ms_since, refused};
use hyper::StatusCode;
use hyper::header::HeaderMap;

use crate::config::LimitsSection;

/// A network in CIDR notation (`10.0.0.0/8`, `::1/128`); a bare address is
/// one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: u128,
    mask: u128,
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let ip: IpAddr = addr.trim().parse().map_err(|_| "not an IP address".to_string())?;
        let (bits, max) = match ip {
            IpAddr::V4(_) => (key(ip), 32),
            IpAddr::V6(_) => (key(ip), 128),
        };
        let len: u32 = match len {
            Some(l) => l.trim().parse().map_err(|_| "bad prefix length".to_string())?,
            None => max,
        };
        if len > max {
            return Err(format!("prefix length above {max}"));
        }
        // IPv4 addresses are compared in their IPv4-mapped IPv6 form.
        let len = if max == 32 { len + 96 } else { len };
        let mask = if len == 0 { 0 } else { u128::MAX << (128 - len) };
        Ok(Self { net: bits & mask, mask })
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        key(ip) & self.mask == self.net
    }
}

/// An address as 128 bits, IPv4 mapped into IPv6.
fn key(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => u128::from(v4.to_ipv6_mapped()),
            None => u128::from(v6),
        },
    }
}

/// What the per-IP limit counts: the address, or for IPv6 its /64 (one
/// host usually holds a whole /64, so counting single addresses would be
/// no limit at all).
pub(crate) fn rate_key(ip: IpAddr) -> u128 {
    let k = key(ip);
    if k >> 32 == 0xffff { k } else { k & (u128::MAX << 64) }
}

/// The client's address: the peer's, or, when the peer is a trusted proxy,
/// the rightmost `X-Forwarded-For` entry that is not itself a trusted proxy
/// (entries further left are whatever the client wrote), else `X-Real-IP`.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[Cidr]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if trusted.is_empty() || !is_trusted(peer) {
        return peer;
    }
    let mut last = None;
    for value in headers.get_all("x-forwarded-for").iter().rev() {
        let Ok(value) = value.to_str() else { return peer };
        for item in value.split(',').rev() {
            let Ok(ip) = item.trim().parse::<IpAddr>() else {
                // Garbage in the chain: the hop that wrote it is not to be
                // believed, nor anything left of it.
                return last.unwrap_or(peer);
            };
            if !is_trusted(ip) {
                return ip;
            }
            last = Some(ip);
        }
    }
    if let Some(ip) = last {
        return ip;
    }
    headers
        .get("x-real-ip")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(peer)
}

/// Slots of the per-IP table: a bounded, set-associative cache of buckets
/// (32 bytes each, 512 KiB in all), so a flood from many addresses cannot
/// grow memory: a new address takes the slot of its set whose bucket is the
/// fullest (an address that has been quiet), never one that is being
/// limited.
const IP_SETS: usize = 4096;
const IP_WAYS: usize = 4;

#[derive(Clone, Copy)]
struct IpSlot {
    ip: u128,
    bucket: Bucket,
}

/// Why a new connection is refused before its upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `limits.node_connections`: 503.
    NodeConnections,
    /// `limits.connect_rate`: 503.
    ConnectRate,
    /// `limits.ip_connect_rate`: 429.
    IpConnectRate,
}

impl Refusal {
    pub fn status(self) -> StatusCode {
        match self {
            Self::IpConnectRate => StatusCode::TOO_MANY_REQUESTS,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn text(self) -> &'static str {
        match self {
            Self::NodeConnections => {
                "too many connections on this node (limits.node_connections)\n"
            }
            Self::ConnectRate => "too many new connections on this node (limits.connect_rate)\n",
            Self::IpConnectRate => {
                "too many new connections from this address (limits.ip_connect_rate)\n"
            }
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::NodeConnections => "node_connections",
            Self::ConnectRate => "connect_rate",
            Self::IpConnectRate => "ip_connect_rate",
        }
    }
}

/// The node-wide admission state, shared by every accept task.
pub struct Admission {
    node_connections: usize,
    connect_rate: u32,
    ip_connect_rate: u32,
    trusted: Vec<Cidr>,
    base: Instant,
    node_bucket: Mutex<Bucket>,
    /// Empty while `ip_connect_rate` is off. One lock for all: it is taken
    /// once per new connection, for a few nanoseconds.
    ips: Mutex<Vec<IpSlot>>,
    hasher: std::collections::hash_map::RandomState,
}

impl Admission {
    pub fn new(cfg: &LimitsSection) -> anyhow::Result<Self> {
        let empty = IpSlot { ip: u128::MAX, bucket: Bucket::full(0, 0) };
        let slots = if cfg.ip_connect_rate > 0 { IP_SETS * IP_WAYS } else { 0 };
        Ok(Self {
            node_connections: cfg.node_connections,
            connect_rate: cfg.connect_rate,
            ip_connect_rate: cfg.ip_connect_rate,
            trusted: cfg.trusted()?,
            base: Instant::now(),
            node_bucket: Mutex::new(Bucket::full(cfg.connect_rate, 0)),
            ips: Mutex::new(vec![empty; slots]),
            hasher: std::collections::hash_map::RandomState::new(),
        })
    }

    /// Whether a new connection from `peer` (with the request's `headers`)
    /// may open now. The per-IP budget is taken first, so one address
    /// flooding spends its own budget and not the node's.
    pub fn admit(&self, node: &Node, peer: SocketAddr, headers: &HeaderMap) -> Result<(), Refusal> {
        let r = self.check(node, peer, headers);
        if let Err(refusal) = r {
            refused(refusal.label());
        }
        r
    }

    fn check(&self, node: &Node, peer: SocketAddr, headers: &HeaderMap) -> Result<(), Refusal> {
        let now = ms_since(self.base);
        if self.ip_connect_rate > 0 {
            let ip = client_ip(peer.ip(), headers, &self.trusted);
            if !self.take_ip(rate_key(ip), now) {
                return Err(Refusal::IpConnectRate);
            }
        }
        if self.connect_rate > 0 {
            let mut b = self.node_bucket.lock().unwrap_or_else(|p| p.into_inner());
            if !b.try_take(self.connect_rate, self.connect_rate, now) {
                return Err(Refusal::ConnectRate);
            }
        }
        if self.node_connections > 0 && node.num_connections() >= self.node_connections {
            return Err(Refusal::NodeConnections);
        }
        Ok(())
    }

    fn take_ip(&self, ip: u128, now: u32) -> bool {
        let rate = self.ip_connect_rate;
        let set = (self.hasher.hash_one(ip) as usize % IP_SETS) * IP_WAYS;
        let mut slots = self.ips.lock().unwrap_or_else(|p| p.into_inner());
        let ways = &mut slots[set..set + IP_WAYS];
        if let Some(s) = ways.iter_mut().find(|s| s.ip == ip) {
            return s.bucket.try_take(rate, rate, now);
        }
        // Evict the way that has been quietest (an empty slot's bucket
        // counts as full, so empty slots go first).
        let victim = ways
            .iter_mut()
            .max_by(|a, b| {
                let (la, lb) = (a.level(rate, now), b.level(rate, now));
                la.partial_cmp(&lb).unwrap_or(std::cmp::Ordering::Equal)
            })
            .expect("a set has ways");
        *victim = IpSlot { ip, bucket: Bucket::full(rate, now) };
        victim.bucket.try_take(rate, rate, now)
    }
}

impl IpSlot {
    fn level(&self, rate: u32, now: u32) -> f32 {
        if self.ip == u128::MAX { f32::INFINITY } else { self.bucket.level(rate, rate, now) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidrs_match_their_networks_in_either_family() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains(ip("10.1.200.3")));
        assert!(!c.contains(ip("10.2.0.1")));
        assert!(c.contains(ip("::ffff:10.1.0.9")), "IPv4-mapped IPv6 is the same address");
        let host: Cidr = "127.0.0.1".parse().unwrap();
        assert!(host.contains(ip("127.0.0.1")) && !host.contains(ip("127.0.0.2")));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fe80::1")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("8.8.8.8")) && !all.contains(ip("fd12::1")));
        for bad in ["10.0.0.0/33", "x", "10.0.0.0/a", "::/129"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn forwarded_addresses_count_only_behind_a_trusted_proxy() {
        let trusted: Vec<Cidr> = vec!["10.0.0.0/8".parse().unwrap()];
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "6.6.6.6, 1.2.3.4, 10.0.0.5".parse().unwrap());
        // From the proxy: the rightmost address it did not add itself.
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &trusted), ip("1.2.3.4"));
        // From anyone else: the header is the client's own word, ignored.
        assert_eq!(client_ip(ip("9.9.9.9"), &h, &trusted), ip("9.9.9.9"));
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &[]), ip("10.0.0.1"));
        let mut h = HeaderMap::new();
        h.insert("x-real-ip", "1.2.3.4".parse().unwrap());
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &trusted), ip("1.2.3.4"));
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "garbage, 10.0.0.7".parse().unwrap());
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &trusted), ip("10.0.0.7"));
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_64() {
        assert_eq!(rate_key(ip("2001:db8::1")), rate_key(ip("2001:db8::ffff")));
        assert_ne!(rate_key(ip("2001:db8::1")), rate_key(ip("2001:db8:0:1::1")));
        assert_ne!(rate_key(ip("127.0.0.1")), rate_key(ip("127.0.0.2")));
    }

    #[test]
    fn the_ip_table_stays_bounded_and_keeps_limiting_a_flooder_among_many_addresses() {
        let cfg = LimitsSection { ip_connect_rate: 5, ..Default::default() };
        let a = Admission::new(&cfg).unwrap();
        let flooder = rate_key(ip("1.1.1.1"));
        for _ in 0..5 {
            assert!(a.take_ip(flooder, 0));
        }
        assert!(!a.take_ip(flooder, 0));
        // A million other addresses pass once each; the table does not grow
        // and the flooder's empty bucket is not the one evicted.
        for i in 0..1_000_000u32 {
            a.take_ip(u128::from(i) + 1_000_000, 0);
        }
        assert_eq!(a.ips.lock().unwrap().len(), IP_SETS * IP_WAYS);
        assert!(!a.take_ip(flooder, 0), "still limited");
        assert!(a.take_ip(flooder, 1000), "refilled a second later");
    }
}
