//! The bounded outbound queue of one connection.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use fanfare_protocol::{Codec, DisconnectCode};
use futures_util::task::AtomicWaker;

use crate::coalesce::Coalescer;

/// Encoded replies and pushes waiting to be written to one client.
///
/// Bounded in bytes: a push that would exceed the bound closes the outbox with
/// 3008 (slow) and drops what was queued, so a client that does not read costs
/// at most `max_bytes` of memory and never slows its channel's other subscribers.
/// Thread-safe; the lock is a `std` mutex because it is never held across `.await`.
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    /// The connection task's waker, and whether it was woken since it last
    /// looked ([`Outbox::ready`]). A `Notify` would put its 60-byte waiter
    /// into every connection task's future; this keeps it here (24 bytes).
    waker: AtomicWaker,
    woken: AtomicBool,
    /// The bound in bytes (at most 4 GiB).
    max_bytes: u32,
    codec: Codec,
    /// The node timer's tick this outbox is armed for (0 = none; see `timer.rs`).
    armed_tick: AtomicU32,
    /// The armed deadline came; the session must run its timers.
    timer_due: AtomicBool,
}

#[derive(Debug, Default)]
struct State {
    items: VecDeque<Bytes>,
    bytes: u32,
    close: Option<DisconnectCode>,
    /// Items were queued without waking the task (they wait for the
    /// coalescer): the next plain push must wake it.
    deferred: bool,
    /// Rarely used parts, allocated only while they hold something.
    cold: Option<Box<Cold>>,
}

#[derive(Debug, Default)]
struct Cold {
    /// A reason replacing the close code's standard one (set by the control API).
    close_reason: Option<String>,
    directives: Vec<Directive>,
}

/// A request from the node to a session, applied by the session's own task
/// (so session state is only ever touched by that task).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Directive {
    /// The node stopped delivering `channel` to this session (e.g. its stream may
    /// have a gap): drop the subscription and send an unsubscribe push with `code`
    /// (>= 2500 makes SDKs resubscribe, with recovery when they use it).
    Unsubscribed { channel: std::sync::Arc<str>, code: u32, reason: &'static str },
    /// Subscribe the session to `channel` server-side and send it a subscribe push.
    Subscribe { channel: std::sync::Arc<str> },
    /// The connection now expires at this unix second (`None`: never), set by
    /// the server API's `refresh`; the client gets a refresh push.
    Refresh { expires_at: Option<u64> },
}

impl Outbox {
    pub fn new(codec: Codec, max_bytes: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            waker: AtomicWaker::new(),
            woken: AtomicBool::new(false),
            max_bytes: max_bytes.min(u32::MAX as usize) as u32,
            codec,
            armed_tick: AtomicU32::new(0),
            timer_due: AtomicBool::new(false),
        }
    }

    pub(crate) fn armed_tick(&self) -> u32 {
        self.armed_tick.load(Ordering::Acquire)
    }

    pub(crate) fn set_armed_tick(&self, tick: u32) {
        self.armed_tick.store(tick, Ordering::Release);
    }

    /// Called by the node timer when the armed deadline came.
    pub(crate) fn wake_timer(&self) {
        self.timer_due.store(true, Ordering::Release);
        self.wake();
    }

    /// Whether the armed deadline came since the last call; [`Outbox::ready`]
    /// resolves when it does.
    pub fn take_timer_due(&self) -> bool {
        self.timer_due.load(Ordering::Acquire) && self.timer_due.swap(false, Ordering::AcqRel)
    }

    pub fn codec(&self) -> Codec {
        self.codec
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave State inconsistent
        // (every update is a single push/clear), so poisoning is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues one encoded message. Returns false when the outbox is closed,
    /// including when this push overflowed it (the client is then closed as slow).
    pub fn push(&self, item: Bytes) -> bool {
        match self.enqueue(item, false) {
            Some(must_wake) => {
                if must_wake {
                    self.wake();
                }
                true
            }
            None => false,
        }
    }

    /// Like [`Outbox::push`], but a push into an empty outbox wakes the
    /// connection only when `coalescer`'s current batch ends (see `coalesce.rs`).
    pub(crate) fn push_deferred(self: &Arc<Self>, item: Bytes, coalescer: &Coalescer) -> bool {
        match self.enqueue(item, true) {
            Some(first) => {
                if first {
                    coalescer.defer(self);
                }
                true
            }
            None => false,
        }
    }

    /// Queues `item`. `None` when closed or overflowing; else whether the
    /// task must be woken (plain push: the queue was empty or only held
    /// deferred items) or the outbox handed to the coalescer (deferred push:
    /// the queue was empty).
    fn enqueue(&self, item: Bytes, defer: bool) -> Option<bool> {
        let mut st = self.lock();
        if st.close.is_some() {
            return None;
        }
        if st.bytes as usize + item.len() > self.max_bytes as usize {
            st.close = Some(DisconnectCode::SLOW);
            st.items = VecDeque::new();
            st.bytes = 0;
            drop(st);
            // Counted here, at the decision (the first close wins, so once per
            // connection); the connection ends with this code (`Session::ended`).
            crate::metrics::slow_consumer();
            self.wake();
            return None;
        }
        let was_empty = st.items.is_empty();
        st.bytes += item.len() as u32;
        st.items.push_back(item);
        if defer {
            st.deferred |= was_empty;
            Some(was_empty)
        } else {
            Some(was_empty || std::mem::take(&mut st.deferred))
        }
    }

    /// Asks the writer to close the connection with `code` once what is queued is
    /// written. The first close wins.
    pub fn close(&self, code: DisconnectCode) {
        self.close_first(code);
    }

    /// Like [`Outbox::close`]; true when this call decided the close.
    pub fn close_first(&self, code: DisconnectCode) -> bool {
        let mut st = self.lock();
        let first = st.close.is_none();
        if first {
            st.close = Some(code);
        }
        drop(st);
        self.wake();
        first
    }

    /// The close decided so far, if any.
    pub fn close_code(&self) -> Option<DisconnectCode> {
        self.lock().close
    }

    /// Queues a directive for the session's task.
    pub fn push_directive(&self, directive: Directive) {
        let mut st = self.lock();
        if st.close.is_some() {
            return;
        }
        st.cold.get_or_insert_default().directives.push(directive);
        drop(st);
        self.wake();
    }

    /// Takes pending directives.
    pub fn take_directives(&self) -> Vec<Directive> {
        let mut st = self.lock();
        let Some(cold) = st.cold.as_mut() else { return Vec::new() };
        let directives = std::mem::take(&mut cold.directives);
        if cold.close_reason.is_none() {
            st.cold = None;
        }
        directives
    }

    /// Like [`Outbox::close`] with a custom reason (at most 123 bytes are sent).
    pub fn close_with_reason(&self, code: DisconnectCode, reason: String) {
        let mut st = self.lock();
        if st.close.is_none() {
            st.close = Some(code);
            st.cold.get_or_insert_default().close_reason = Some(reason);
        }
        drop(st);
        self.wake();
    }

    /// The custom reason to send with the close frame when `code` is the close
    /// this outbox was asked for.
    pub fn close_reason(&self, code: DisconnectCode) -> Option<String> {
        let st = self.lock();
        let reason = st.cold.as_ref().and_then(|c| c.close_reason.clone());
        reason.filter(|_| st.close == Some(code))
    }

    pub fn is_closed(&self) -> bool {
        self.lock().close.is_some()
    }

    /// Moves everything queued into `into` and reports a pending close.
    pub fn drain(&self, into: &mut Vec<Bytes>) -> Option<DisconnectCode> {
        let mut st = self.lock();
        // Take the queue itself: an idle connection keeps no queue allocation.
        let items = std::mem::take(&mut st.items);
        st.bytes = 0;
        st.deferred = false;
        let close = st.close;
        drop(st);
        if into.is_empty() {
            *into = items.into();
        } else {
            into.extend(items);
        }
        close
    }

    /// Lets go of what a closed connection no longer needs while the outbox
    /// itself may live on a little (the timer keeps its entry until its bucket
    /// is walked): the queued items and the connection task's waker (which
    /// keeps the whole task allocation alive).
    pub fn release(&self) {
        let items = {
            let mut st = self.lock();
            st.bytes = 0;
            std::mem::take(&mut st.items)
        };
        drop(items);
        drop(self.waker.take());
    }

    /// Wakes the connection task (also used by the coalescer at a batch's end).
    pub(crate) fn wake(&self) {
        self.woken.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Resolves when something was queued, a close was requested or the timer
    /// deadline came since it last resolved. One task (the connection's) waits.
    pub fn ready(&self) -> impl std::future::Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.woken.swap(false, Ordering::AcqRel) {
                return std::task::Poll::Ready(());
            }
            self.waker.register(cx.waker());
            if self.woken.swap(false, Ordering::AcqRel) {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_closes_slow_and_frees_queue() {
        let o = Outbox::new(Codec::Json, 10);
        assert!(o.push(Bytes::from_static(b"12345")));
        assert!(o.push(Bytes::from_static(b"12345")));
        assert!(!o.push(Bytes::from_static(b"1")));
        let mut v = Vec::new();
        assert_eq!(o.drain(&mut v), Some(DisconnectCode::SLOW));
        assert!(v.is_empty());
        assert!(!o.push(Bytes::from_static(b"1")));
    }

    #[test]
    fn drain_keeps_order_and_close_is_sticky() {
        let o = Outbox::new(Codec::Json, 100);
        o.push(Bytes::from_static(b"a"));
        o.push(Bytes::from_static(b"b"));
        o.close(DisconnectCode::SHUTDOWN);
        o.close(DisconnectCode::SLOW);
        let mut v = Vec::new();
        assert_eq!(o.drain(&mut v), Some(DisconnectCode::SHUTDOWN));
        assert_eq!(v, vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")]);
    }
}
