//! Write coalescing (`client.write_delay`).
//!
//! By default a publication queued for a connection wakes its task at once, so
//! every delivery is its own socket write. On loopback and on most servers the
//! write (and the TCP work it triggers) costs far more than the message's own
//! processing, so a subscriber receiving many messages per second costs one
//! syscall per message. With a write delay, a publication that lands in an
//! empty outbox does not wake the connection: the outbox is put on the node's
//! pending list, and one driver task wakes everything on the list `delay`
//! after the first entry arrived. Whatever reached an outbox in between leaves
//! in one write. Latency grows by at most `delay` (plus scheduling); replies to
//! the client's own commands are not delayed (they wake the task at once and
//! take the waiting publications with them).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::Notify;

use crate::outbox::Outbox;

struct Inner {
    delay: Duration,
    pending: Mutex<Vec<Arc<Outbox>>>,
    /// Signalled when the list goes from empty to non-empty.
    first: Notify,
    /// A driver task is running (cleared when it ends, so another starts).
    started: AtomicBool,
    /// The runtime the node was created on: the driver runs there, not on
    /// whichever runtime (a gRPC worker's, say) made the first deferred push.
    home: Option<tokio::runtime::Handle>,
}

/// A node's write coalescer. Cheap to clone.
#[derive(Clone)]
pub struct Coalescer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Coalescer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalescer").field("delay", &self.inner.delay).finish()
    }
}

impl Coalescer {
    /// A coalescer waking pending outboxes `delay` after the first of a batch
    /// was queued. `delay` must be positive.
    pub fn new(delay: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                delay,
                pending: Mutex::new(Vec::new()),
                first: Notify::new(),
                started: AtomicBool::new(false),
                home: tokio::runtime::Handle::try_current().ok(),
            }),
        }
    }

    /// Wakes `outbox` at the end of the current batch. Outside a tokio runtime
    /// (nothing could drive the batch) it is woken at once.
    pub(crate) fn defer(&self, outbox: &Arc<Outbox>) {
        if !self.inner.started.load(Ordering::Acquire) {
            let rt = self.inner.home.clone().or_else(|| tokio::runtime::Handle::try_current().ok());
            match rt {
                Some(rt) => {
                    if !self.inner.started.swap(true, Ordering::AcqRel) {
                        let running = Running(Arc::downgrade(&self.inner));
                        rt.spawn(drive(running));
                    }
                }
                None => {
                    outbox.wake();
                    return;
                }
            }
        }
        let mut pending = self.inner.pending.lock().unwrap_or_else(|p| p.into_inner());
        let first = pending.is_empty();
        pending.push(outbox.clone());
        drop(pending);
        if first {
            self.inner.first.notify_one();
        }
    }
}

/// Held by the driver task: when the task ends or is dropped (its runtime
/// shut down), the next deferred push starts a new one.
struct Running(Weak<Inner>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(inner) = self.0.upgrade() {
            inner.started.store(false, Ordering::Release);
            // Whatever waits on the list is not lost: wake it now.
            let batch =
                std::mem::take(&mut *inner.pending.lock().unwrap_or_else(|p| p.into_inner()));
            for outbox in batch {
                outbox.wake();
            }
        }
    }
}

/// The driver: waits for a first pending outbox, lets `delay` pass, wakes the
/// batch, and so on while the node exists.
async fn drive(running: Running) {
    let inner = &running.0;
    loop {
        let Some(strong) = inner.upgrade() else { return };
        // Look up once a second while idle, to end with a dropped node.
        let first = strong.first.notified();
        if tokio::time::timeout(Duration::from_secs(1), first).await.is_err() {
            continue;
        }
        let delay = strong.delay;
        drop(strong);
        tokio::time::sleep(delay).await;
        let Some(strong) = inner.upgrade() else { return };
        let batch = std::mem::take(&mut *strong.pending.lock().unwrap_or_else(|p| p.into_inner()));
        drop(strong);
        for outbox in batch {
            outbox.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use fanfare_protocol::Codec;

    #[tokio::test(start_paused = true)]
    async fn deferred_pushes_wake_once_after_the_delay() {
        let c = Coalescer::new(Duration::from_millis(50));
        let o = Arc::new(Outbox::new(Codec::Json, 1 << 16));
        let t0 = tokio::time::Instant::now();
        assert!(o.push_deferred(Bytes::from_static(b"a"), &c));
        assert!(o.push_deferred(Bytes::from_static(b"b"), &c));
        o.ready().await;
        assert!(t0.elapsed() >= Duration::from_millis(50), "woken after {:?}", t0.elapsed());
        let mut items = Vec::new();
        o.drain(&mut items);
        assert_eq!(items.len(), 2);
    }

    #[test]
    fn the_driver_runs_on_the_runtime_the_coalescer_was_made_on() {
        let home = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let c = home.block_on(async { Coalescer::new(Duration::from_millis(20)) });
        // A short-lived runtime (like a gRPC worker's) makes the first push,
        // then goes away; deliveries must still be woken by the home runtime.
        let o = Arc::new(Outbox::new(Codec::Json, 1 << 16));
        let other = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        other.block_on(async {
            assert!(o.push_deferred(Bytes::from_static(b"a"), &c));
        });
        drop(other);
        home.block_on(async {
            tokio::time::timeout(Duration::from_secs(2), o.ready()).await.expect("woken");
            let mut items = Vec::new();
            o.drain(&mut items);
            assert_eq!(items.len(), 1);
            // And the next batch is driven too.
            assert!(o.push_deferred(Bytes::from_static(b"b"), &c));
            tokio::time::timeout(Duration::from_secs(2), o.ready()).await.expect("woken again");
        });
    }

    #[tokio::test(start_paused = true)]
    async fn a_reply_takes_deferred_pushes_along_at_once() {
        let c = Coalescer::new(Duration::from_secs(5));
        let o = Arc::new(Outbox::new(Codec::Json, 1 << 16));
        assert!(o.push_deferred(Bytes::from_static(b"pub"), &c));
        let t0 = tokio::time::Instant::now();
        assert!(o.push(Bytes::from_static(b"reply")));
        o.ready().await;
        assert_eq!(t0.elapsed(), Duration::ZERO);
        let mut items = Vec::new();
        o.drain(&mut items);
        assert_eq!(items, vec![Bytes::from_static(b"pub"), Bytes::from_static(b"reply")]);
    }
}
