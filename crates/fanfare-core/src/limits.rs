//! Abuse limits the session and the node enforce (decision 29): how many
//! connections one user may hold and how fast a connection or a user may send
//! commands. The HTTP-level limits (connections per node, connect rates per
//! node and per client IP) live in the server crate, before the upgrade.

use std::time::Instant;

/// Limits on connections and commands (`[limits]`). 0 turns a limit off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Most connections of one user on this node; one more is closed with
    /// 3504 "connection limit" after its connect. Anonymous connections are
    /// not counted (they have no user).
    pub user_connections: usize,
    /// Commands per second one connection may send; past it a command is
    /// answered with error 111.
    pub client_commands: u32,
    /// Commands a connection may send at once, and how many more refused
    /// (111) commands it may send before it is closed with 3013.
    pub client_command_burst: u32,
    /// Commands per second all connections of one user on this node may send
    /// together; past it a command is answered with error 111.
    pub user_commands: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            user_connections: 1_000,
            // Generous: a backend publishing over one client connection
            // (tests, SDK suites, firehose publishers) sends thousands a
            // second; a flood of 50 000/s is still closed within a second.
            client_commands: 10_000,
            client_command_burst: 20_000,
            user_commands: 20_000,
        }
    }
}

/// A token bucket in 8 bytes (it sits in every connection): `tokens` may go
/// below zero to count refused requests (the debt a flooding client runs up
/// before it is closed). Time is milliseconds since a base instant the owner
/// keeps; `u32` wraps after 49 days, which only under-refills a bucket left
/// untouched that long, once.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f32,
    at_ms: u32,
}

/// What a bucket said about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// Within the rate.
    Ok,
    /// Over the rate: refuse this request.
    Refused,
    /// Over the rate and past another burst of refused requests: end the client.
    Exhausted,
}

impl Bucket {
    /// A full bucket (`burst` tokens) at `now_ms`.
    pub fn full(burst: u32, now_ms: u32) -> Self {
        Self { tokens: burst as f32, at_ms: now_ms }
    }

    /// Takes one token at `now_ms`, refilling `rate` per second up to `burst`.
    /// A refusal costs a token too, down to `-burst`; below that, [`Take::Exhausted`].
    pub fn take(&mut self, rate: u32, burst: u32, now_ms: u32) -> Take {
        let elapsed = now_ms.wrapping_sub(self.at_ms);
        self.at_ms = now_ms;
        let burst = burst as f32;
        self.tokens = (self.tokens + elapsed as f32 * rate as f32 / 1000.0).min(burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Take::Ok;
        }
        if self.tokens <= -burst {
            return Take::Exhausted;
        }
        self.tokens -= 1.0;
        Take::Refused
    }

    /// Takes one token if there is one; a refusal costs nothing (for limits
    /// that only refuse, shared by many clients: one flooder must not keep
    /// the others' bucket in debt).
    pub fn try_take(&mut self, rate: u32, burst: u32, now_ms: u32) -> bool {
        let elapsed = now_ms.wrapping_sub(self.at_ms);
        self.at_ms = now_ms;
        self.tokens = (self.tokens + elapsed as f32 * rate as f32 / 1000.0).min(burst as f32);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Tokens left once refilled up to `now_ms` (for eviction choices).
    pub fn level(&self, rate: u32, burst: u32, now_ms: u32) -> f32 {
        let elapsed = now_ms.wrapping_sub(self.at_ms);
        (self.tokens + elapsed as f32 * rate as f32 / 1000.0).min(burst as f32)
    }
}

/// Milliseconds from `base` to now, wrapping (see [`Bucket`]).
pub fn ms_since(base: Instant) -> u32 {
    base.elapsed().as_millis() as u32
}

/// Counts a refusal by a limit (`fanfare_limit_refusals_total{limit}`).
pub fn refused(limit: &'static str) {
    metrics::counter!(crate::metrics::LIMIT_REFUSALS, "limit" => limit).increment(1);
}

/// The `limit` labels of `fanfare_limit_refusals_total`, registered at start-up.
pub const LIMIT_NAMES: &[&str] = &[
    "node_connections",
    "user_connections",
    "connect_rate",
    "ip_connect_rate",
    "client_commands",
    "user_commands",
    "channels",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_a_burst_then_the_rate_then_refuses_then_gives_up() {
        let mut b = Bucket::full(3, 0);
        for _ in 0..3 {
            assert_eq!(b.take(10, 3, 0), Take::Ok);
        }
        // Three more refused (a second burst) and the client is given up on.
        for _ in 0..3 {
            assert_eq!(b.take(10, 3, 0), Take::Refused);
        }
        assert_eq!(b.take(10, 3, 0), Take::Exhausted);
        // Refusals are owed: 100 ms at 10/s pays one back, still below one token.
        assert_eq!(b.take(10, 3, 100), Take::Refused);
        assert_eq!(b.take(10, 3, 600), Take::Ok, "debt paid after 500 ms more");
        let mut b = Bucket::full(3, 0);
        for _ in 0..3 {
            b.take(10, 3, 0);
        }
        assert_eq!(b.take(10, 3, 100), Take::Ok, "refilled at the rate");
        assert_eq!(b.take(10, 3, 10_000), Take::Ok, "refilled up to the burst only");
        assert!(b.level(10, 3, 10_000) <= 2.0);
    }

    #[test]
    fn try_take_refuses_without_running_into_debt() {
        let mut b = Bucket::full(1, 0);
        assert!(b.try_take(1, 1, 0));
        for _ in 0..100 {
            assert!(!b.try_take(1, 1, 0));
        }
        assert!(b.try_take(1, 1, 1000), "one second later the bucket has one token again");
    }
}
