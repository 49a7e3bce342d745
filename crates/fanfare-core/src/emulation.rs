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

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use data_encoding::BASE64;
use tokio::sync::mpsc;

use crate::control::ControlMessage;
use crate::node::Node;

/// Command batches one emulated session may have waiting; a sender beyond
/// this waits (up to [`DELIVERY_TIMEOUT`]) instead of growing a queue.
const QUEUE: usize = 16;

/// How long an `/emulation` request waits for the session to take its
/// commands, or for the node holding it to answer. Past it the request is
/// answered as failed (the SDK then closes the transport and reconnects).
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(2);

/// What became of one `/emulation` request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emulation {
    /// The session took the commands.
    Delivered,
    /// No such session (ended, never existed, or its node is gone).
    Unknown,
    /// The session did not take the commands in time.
    Busy,
}

/// The emulated sessions of this node, by key.
#[derive(Default)]
pub(crate) struct Registry {
    sessions: Mutex<HashMap<Box<str>, mpsc::Sender<Bytes>, ahash::RandomState>>,
}

impl Registry {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<Box<str>, mpsc::Sender<Bytes>, ahash::RandomState>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn register(&self) -> (String, mpsc::Receiver<Bytes>) {
        let key = data_encoding::HEXLOWER.encode(&rand::random::<[u8; 16]>());
        let (tx, rx) = mpsc::channel(QUEUE);
        self.lock().insert(key.as_str().into(), tx);
        (key, rx)
    }

    pub(crate) fn unregister(&self, key: &str) {
        self.lock().remove(key);
    }

    /// Hands `data` to a session of this node.
    pub(crate) async fn deliver(&self, key: &str, data: Bytes) -> Emulation {
        let Some(tx) = self.lock().get(key).cloned() else { return Emulation::Unknown };
        match tx.send_timeout(data, DELIVERY_TIMEOUT).await {
            Ok(()) => Emulation::Delivered,
            Err(mpsc::error::SendTimeoutError::Closed(_)) => Emulation::Unknown,
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => Emulation::Busy,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

impl Node {
    /// Registers an emulated session: its key (for the connect reply) and
    /// the receiver of the command batches sent for it.
    pub fn register_emulated(&self) -> (String, mpsc::Receiver<Bytes>) {
        self.emulated().register()
    }

    pub fn unregister_emulated(&self, key: &str) {
        self.emulated().unregister(key)
    }

    /// Emulated sessions open on this node.
    pub fn num_emulated(&self) -> usize {
        self.emulated().len()
    }

    /// Delivers one `/emulation` request's commands to session `session` of
    /// node `node`: here, or through the control channel on another node.
    pub async fn emulate(&self, node: &str, session: &str, data: Bytes) -> Emulation {
        if node == self.uid() || node.is_empty() {
            return self.emulated().deliver(session, data).await;
        }
        let id = format!("{:032x}", rand::random::<u128>());
        let request = ControlMessage::Emulate {
            id: id.clone(),
            from: self.uid().to_string(),
            node: node.to_string(),
            session: session.to_string(),
            data: BASE64.encode(&data),
        };
        let reply = self
            .request(&id, &request, |m| match m {
                ControlMessage::EmulateReply { delivered, busy, .. } => Some((delivered, busy)),
                _ => None,
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
                Ok(data) => node.emulated().deliver(&session, Bytes::from(data)).await,
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
