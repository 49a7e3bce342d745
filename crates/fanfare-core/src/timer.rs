//! One coarse timer for all connections of a node.
//!
//! Connection deadlines (connect timeout, pings, pong checks, token expiry,
//! presence refresh) are seconds-scale. Instead of one tokio `Sleep` per
//! connection (~100 B in every task, and one worker wake-up per expiry), the
//! node keeps a ring of buckets, one per tick. Arming a connection's deadline
//! puts its outbox into the bucket of the tick the deadline rounds up to; one
//! driver task walks the ring once per tick and wakes the outboxes whose
//! deadline came, so the pings of many connections go out in one wake-up.
//! Deadlines fire late by at most one tick, never early.
//!
//! A connection whose deadline moves is not searched for in its old bucket:
//! the outbox records the tick it is armed for, and an entry whose tick no
//! longer matches is dropped when its bucket is walked.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

use crate::outbox::Outbox;

/// Buckets in the ring; deadlines further out wait in the last one and are
/// put back when it is walked.
const BUCKETS: u32 = 256;

type Bucket = Mutex<Vec<(u32, Arc<Outbox>)>>;

struct Inner {
    start: Instant,
    tick: Duration,
    buckets: Box<[Bucket]>,
    /// The last tick the driver walked.
    walked: Mutex<u32>,
    started: AtomicBool,
}

/// The node's shared connection timer. Cheap to clone.
#[derive(Clone)]
pub struct Timers {
    inner: Arc<Inner>,
}

impl Timers {
    /// A timer whose deadlines fire at most `tick` late.
    pub fn new(tick: Duration) -> Self {
        let tick = tick.max(Duration::from_millis(1));
        Self {
            inner: Arc::new(Inner {
                start: Instant::now(),
                tick,
                buckets: (0..BUCKETS).map(|_| Mutex::new(Vec::new())).collect(),
                walked: Mutex::new(0),
                started: AtomicBool::new(false),
            }),
        }
    }

    /// The tick for the shortest of the given timeouts: an eighth of it, between
    /// 10 ms and 1 s.
    pub fn tick_for(timeouts: &[Duration]) -> Duration {
        let shortest = timeouts.iter().copied().min().unwrap_or(Duration::from_secs(8));
        (shortest / 8).clamp(Duration::from_millis(10), Duration::from_secs(1))
    }

    pub fn tick(&self) -> Duration {
        self.inner.tick
    }

    /// The first tick at or after `at` (ticks count from 1; 0 means "not armed").
    fn tick_of(&self, at: Instant) -> u32 {
        let since = at.saturating_duration_since(self.inner.start);
        let ticks = since.as_nanos().div_ceil(self.inner.tick.as_nanos());
        (ticks + 1).min(u32::MAX as u128 - 1) as u32
    }

    fn now_tick(&self) -> u32 {
        let since = self.inner.start.elapsed();
        (since.as_nanos() / self.inner.tick.as_nanos() + 1).min(u32::MAX as u128 - 1) as u32
    }

    /// Wakes `outbox` (see [`Outbox::take_timer_due`]) at `deadline` or within
    /// one tick after it, replacing the deadline it was armed with before.
    /// Must run inside a tokio runtime (the first call starts the driver).
    pub fn arm(&self, outbox: &Arc<Outbox>, deadline: impl Into<Instant>) {
        let tick = self.tick_of(deadline.into());
        if outbox.armed_tick() == tick {
            return;
        }
        outbox.set_armed_tick(tick);
        self.insert(tick, outbox.clone());
        if !self.inner.started.load(Ordering::Relaxed)
            && !self.inner.started.swap(true, Ordering::AcqRel)
        {
            tokio::spawn(drive(Arc::downgrade(&self.inner)));
        }
    }

    fn insert(&self, tick: u32, outbox: Arc<Outbox>) {
        // Never into a bucket the driver already walked for this round; the
        // lock keeps it from walking on while the entry goes in.
        let walked = self.inner.walked.lock().unwrap_or_else(|p| p.into_inner());
        let slot = tick.clamp(*walked + 1, *walked + BUCKETS - 1);
        self.inner.buckets[(slot % BUCKETS) as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((tick, outbox));
    }

    /// Walks every bucket up to the current tick; returns how many outboxes
    /// were woken.
    fn walk(&self) -> usize {
        let now = self.now_tick();
        let mut woken = 0;
        let mut far = Vec::new();
        let mut walked = self.inner.walked.lock().unwrap_or_else(|p| p.into_inner());
        while *walked < now {
            let t = *walked + 1;
            let entries = std::mem::take(
                &mut *self.inner.buckets[(t % BUCKETS) as usize]
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()),
            );
            *walked = t;
            for (tick, outbox) in entries {
                if outbox.armed_tick() != tick {
                    continue; // re-armed for another tick, or disarmed
                }
                if tick <= t {
                    outbox.set_armed_tick(0);
                    outbox.wake_timer();
                    woken += 1;
                } else {
                    far.push((tick, outbox));
                }
            }
        }
        drop(walked);
        for (tick, outbox) in far {
            self.insert(tick, outbox);
        }
        woken
    }
}

/// The driver: one wake-up per tick while the node exists.
async fn drive(inner: Weak<Inner>) {
    let Some(tick) = inner.upgrade().map(|i| i.tick) else { return };
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        Timers { inner }.walk();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fanfare_protocol::Codec;

    fn outbox() -> Arc<Outbox> {
        Arc::new(Outbox::new(Codec::Json, 1024))
    }

    #[tokio::test(start_paused = true)]
    async fn fires_once_not_early_and_at_most_one_tick_late() {
        let timers = Timers::new(Duration::from_millis(100));
        let a = outbox();
        let b = outbox();
        let start = Instant::now();
        timers.arm(&a, start + Duration::from_millis(250));
        timers.arm(&b, start + Duration::from_millis(1000));
        // Re-arming for the same tick adds nothing; re-arming moves the deadline.
        timers.arm(&b, start + Duration::from_millis(1000));
        timers.arm(&b, start + Duration::from_millis(450));
        let mut fired = Vec::new();
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            for (name, o) in [("a", &a), ("b", &b)] {
                if o.take_timer_due() {
                    fired.push((name, start.elapsed()));
                }
            }
        }
        assert_eq!(fired.len(), 2, "{fired:?}");
        assert_eq!(fired[0].0, "a");
        assert!(fired[0].1 >= Duration::from_millis(250), "{fired:?}");
        assert!(fired[0].1 <= Duration::from_millis(400), "{fired:?}");
        assert_eq!(fired[1].0, "b");
        assert!(fired[1].1 >= Duration::from_millis(450), "{fired:?}");
        assert!(fired[1].1 <= Duration::from_millis(600), "{fired:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn far_deadlines_wait_past_the_ring_and_disarm_cancels() {
        let timers = Timers::new(Duration::from_millis(10));
        let far = outbox();
        let gone = outbox();
        let start = Instant::now();
        // 3.3 s = 330 ticks, more than the ring holds.
        timers.arm(&far, start + Duration::from_millis(3300));
        timers.arm(&gone, start + Duration::from_millis(100));
        gone.set_armed_tick(0);
        let mut at = None;
        for _ in 0..80 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(!gone.take_timer_due(), "a disarmed outbox fired");
            if far.take_timer_due() {
                at.get_or_insert(start.elapsed());
            }
        }
        let at = at.expect("the far deadline fired");
        assert!(at >= Duration::from_millis(3300) && at <= Duration::from_millis(3400), "{at:?}");
    }

    #[test]
    fn tick_is_an_eighth_of_the_shortest_timeout_within_bounds() {
        let s = Duration::from_secs;
        assert_eq!(Timers::tick_for(&[s(25), s(8), s(10)]), s(1));
        assert_eq!(Timers::tick_for(&[s(2), s(1)]), Duration::from_millis(125));
        assert_eq!(Timers::tick_for(&[Duration::from_millis(1)]), Duration::from_millis(10));
        assert_eq!(Timers::tick_for(&[s(600)]), s(1));
    }
}
