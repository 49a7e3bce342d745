//! Sessions of the emulated transports (HTTP streaming, SSE): their replies go
//! down a long-lived response, their commands arrive in separate
//! `POST /emulation` requests naming the session key and the node the connect
//! reply gave. A request may land on any node of the cluster; one that does not
//! hold the session forwards it through the broker's control channel to the
//! node that does and answers with what that node reported
//! ([`Node::emulate`]).
//!
//! The session key is 128 random bits from the thread's ChaCha generator,
//! separate from the client id: client ids are visible to other clients
//! (presence), and whoever holds a key can send commands as that client.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use data_encoding::BASE64;
use futures_util::task::AtomicWaker;

use crate::control::ControlMessage;
use crate::node::Node;

/// Command batches one emulated session may have waiting; a request beyond
/// this is refused as [`Emulation::Busy`] instead of growing the queue (the
/// SDK sends commands in batches, so a client that far ahead is broken or
/// hostile).
const QUEUE: usize = 16;

/// How long an `/emulation` request waits for the node holding its session
/// to answer. Past it the session counts as gone (the SDK then closes the
/// transport and reconnects).
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(2);

/// The command batches waiting for one emulated session. A queue that
/// allocates only while it holds something and the session task's waker: an
/// idle session pays about 100 bytes (a channel would preallocate a block of
/// slots, 1 KiB).
#[derive(Default)]
pub struct Inbox {
    queue: Mutex<VecDeque<Bytes>>,
    waker: AtomicWaker,
}

impl Inbox {
    fn push(&self, batch: Bytes) -> Emulation {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() >= QUEUE {
            return Emulation::Busy;
        }
        q.push_back(batch);
        drop(q);
        self.waker.wake();
        Emulation::Delivered
    }

    /// The next batch of commands (cancel-safe: nothing is taken until it
    /// is returned).
    pub async fn next(&self) -> Bytes {
        std::future::poll_fn(|cx| {
            self.waker.register(cx.waker());
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            match q.pop_front() {
                Some(b) => {
                    if q.is_empty() {
                        q.shrink_to(0);
                    }
                    Poll::Ready(b)
                }
                None => Poll::Pending,
            }
        })
        .await
    }
}

/// What became of one `/emulation` request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emulation {
    /// The session took the commands.
    Delivered,
    /// No such session (ended, never existed, or its node is gone).
    Unknown,
    /// The session has too many command batches waiting.
    Busy,
}

/// The emulated sessions of this node: by key, and the key of each session
/// (by the node's session id).
#[derive(Default)]
pub(crate) struct Registry {
    maps: Mutex<Maps>,
}

#[derive(Default)]
struct Maps {
    by_key: HashMap<Box<str>, Arc<Inbox>, ahash::RandomState>,
    key_of: HashMap<u64, Box<str>, ahash::RandomState>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(&self, session: u64) -> Arc<Inbox> {
        let key: Box<str> = data_encoding::HEXLOWER.encode(&rand::random::<[u8; 16]>()).into();
        let inbox = Arc::new(Inbox::default());
        let mut m = self.lock();
        m.by_key.insert(key.clone(), inbox.clone());
        m.key_of.insert(session, key);
        inbox
    }

    fn unregister(&self, session: u64) {
        let mut m = self.lock();
        if let Some(key) = m.key_of.remove(&session) {
            m.by_key.remove(&key);
        }
    }

    /// Hands `data` to a session of this node.
    fn deliver(&self, key: &str, data: Bytes) -> Emulation {
        match self.lock().by_key.get(key) {
            Some(inbox) => inbox.push(data),
            None => Emulation::Unknown,
        }
    }
}

impl Node {
    /// Registers emulated session `session` under a new key; the inbox of
    /// the command batches sent for it.
    pub(crate) fn register_emulated(&self, session: u64) -> Arc<Inbox> {
        self.emulated().register(session)
    }

    pub(crate) fn unregister_emulated(&self, session: u64) {
        self.emulated().unregister(session)
    }

    /// The key of emulated session `session` (for its connect reply).
    pub(crate) fn emulation_key(&self, session: u64) -> Option<String> {
        self.emulated().lock().key_of.get(&session).map(|k| k.to_string())
    }

    /// Delivers one `/emulation` request's commands to session `session` of
    /// node `node`: here, or through the control channel on another node.
    pub async fn emulate(&self, node: &str, session: &str, data: Bytes) -> Emulation {
        if node == self.uid() || node.is_empty() {
            return self.emulated().deliver(session, data);
        }
        let id = format!("{:032x}", rand::random::<u128>());
        let request = ControlMessage::Emulate {
            id: id.clone(),
            from: self.uid().to_string(),
            node: node.to_string(),
            session: session.to_string(),
            data: BASE64.encode(&data),
        };
        let mut reply = None;
        let _ = self
            .request(&id, &request, DELIVERY_TIMEOUT, |m| match m {
                ControlMessage::EmulateReply { delivered, busy, .. } => {
                    reply = Some((delivered, busy));
                    true
                }
                _ => false,
            })
            .await;
        match reply {
            Some((true, _)) => Emulation::Delivered,
            Some((false, true)) => Emulation::Busy,
            // Not answered in time: the node is gone, and its sessions with it.
            Some((false, false)) | None => Emulation::Unknown,
        }
    }

    /// Applies an `Emulate` control message addressed to this node.
    pub(crate) fn on_emulate(&self, id: String, from: String, session: String, data: String) {
        let node = self.clone();
        tokio::spawn(async move {
            let outcome = match BASE64.decode(data.as_bytes()) {
                Ok(data) => node.emulated().deliver(&session, Bytes::from(data)),
                Err(_) => Emulation::Unknown,
            };
            let reply = ControlMessage::EmulateReply {
                id,
                to: from,
                delivered: outcome == Emulation::Delivered,
                busy: outcome == Emulation::Busy,
            };
            if let Err(e) = node.send_control(&reply).await {
                tracing::warn!(error = %e, "emulation reply failed");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_session_takes_batches_in_order_and_refuses_the_seventeenth_waiting_one_as_busy() {
        let registry = Registry::default();
        let inbox = registry.register(7);
        let key = registry.lock().key_of[&7].to_string();
        for i in 0..QUEUE {
            assert_eq!(registry.deliver(&key, Bytes::from(i.to_string())), Emulation::Delivered);
        }
        assert_eq!(registry.deliver(&key, Bytes::from_static(b"one too many")), Emulation::Busy);
        // The session reads one: there is room for one more, and order is kept.
        assert_eq!(inbox.next().await, Bytes::from_static(b"0"));
        assert_eq!(registry.deliver(&key, Bytes::from_static(b"last")), Emulation::Delivered);
        assert_eq!(registry.deliver(&key, Bytes::from_static(b"again")), Emulation::Busy);
        for i in 1..QUEUE {
            assert_eq!(inbox.next().await, Bytes::from(i.to_string()));
        }
        assert_eq!(inbox.next().await, Bytes::from_static(b"last"));
    }

    #[test]
    fn keys_are_unguessable_and_a_session_gone_or_never_there_is_unknown() {
        let registry = Registry::default();
        registry.register(1);
        registry.register(2);
        let (k1, k2) = {
            let m = registry.lock();
            (m.key_of[&1].to_string(), m.key_of[&2].to_string())
        };
        assert_ne!(k1, k2);
        assert_eq!(k1.len(), 32, "128 random bits, hex");
        assert_eq!(registry.deliver("0".repeat(32).as_str(), Bytes::new()), Emulation::Unknown);
        registry.unregister(1);
        assert_eq!(registry.deliver(&k1, Bytes::new()), Emulation::Unknown);
        assert_eq!(registry.deliver(&k2, Bytes::new()), Emulation::Delivered);
        assert!(!registry.lock().key_of.contains_key(&1), "nothing kept of a gone session");
    }
}
