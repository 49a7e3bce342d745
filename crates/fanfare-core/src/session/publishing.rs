//! Publishes of one connection are group committed. While one batch of a
//! connection's publishes waits for the broker, the connection keeps reading,
//! and the publishes that arrive meanwhile form the next batch, sent (in
//! order, as one Redis pipeline) when the first is answered. Any other command
//! first waits for the publishes before it, so it sees their effects. Without
//! this a client publishing through Redis would be held to one publication per
//! round trip. Why and what it costs: docs/ARCHITECTURE.md, decision 11.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use fanfare_protocol::{DisconnectCode, ErrorCode, ReplyBody};
use sync_wrapper::SyncWrapper;

use super::{Fail, Session};
use crate::broker::PublishItem;

/// A connection's publishes: one batch at the broker, the next one forming.
pub(super) struct Publishing {
    /// Resolves to (command id, accepted) per publish of the batch. Only ever
    /// touched through `&mut`, so `SyncWrapper` keeps the session `Sync`.
    pub(super) sent: SyncWrapper<PendingBatch>,
    sent_len: usize,
    queued: Vec<(u32, PublishItem)>,
}

type PendingBatch = Pin<Box<dyn Future<Output = Vec<(u32, bool)>> + Send>>;

/// Publishes one connection may have waiting for the broker; beyond this the
/// transport stops reading from the client until some are answered.
pub const MAX_PUBLISHES_IN_FLIGHT: usize = 256;

fn publish_reply(accepted: bool) -> Result<Option<ReplyBody>, Fail> {
    if accepted { Ok(Some(ReplyBody::Publish)) } else { Err(ErrorCode::INTERNAL.into()) }
}

impl Session {
    /// Sends an accepted publish to the broker (with this client's info), or
    /// queues it behind the batch the broker has.
    pub(super) fn enqueue_publish(&mut self, id: u32, mut item: PublishItem) {
        let conn = self.connected();
        let info = conn
            .subs
            .get(item.channel.as_str())
            .map_or_else(|| conn.info.clone(), |s| s.info.clone());
        item.publication.info = Some(info);
        if let Some(p) = self.publishing_mut() {
            p.queued.push((id, item));
            return;
        }
        self.send_batch(vec![(id, item)]);
    }

    /// Starts `batch` at the broker. Replies at once to what completes at once.
    fn send_batch(&mut self, batch: Vec<(u32, PublishItem)>) {
        let ids: Vec<u32> = batch.iter().map(|(id, _)| *id).collect();
        let sent_len = ids.len();
        let items = batch.into_iter().map(|(_, item)| item).collect();
        let node = self.node.clone();
        let mut fut: PendingBatch = Box::pin(async move {
            let results = node.publish_many(items).await;
            ids.into_iter()
                .zip(results)
                .map(|(id, r)| {
                    if let Err(e) = &r {
                        tracing::warn!(error = %e, "publish failed");
                    }
                    (id, r.is_ok())
                })
                .collect()
        });
        match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(done) => {
                for (id, ok) in done {
                    // A publish reply never disconnects.
                    let _ = self.finish(id, publish_reply(ok));
                }
            }
            Poll::Pending => {
                self.side.get_or_insert_default().publishing =
                    Some(Publishing { sent: SyncWrapper::new(fut), sent_len, queued: Vec::new() });
            }
        }
    }

    /// Publishes waiting for the broker or queued behind those.
    pub fn publishes_in_flight(&self) -> usize {
        self.publishing().map_or(0, |p| p.sent_len + p.queued.len())
    }

    fn publishing(&self) -> Option<&Publishing> {
        self.side.as_ref().and_then(|s| s.publishing.as_ref())
    }

    pub(super) fn publishing_mut(&mut self) -> Option<&mut Publishing> {
        self.side.as_mut().and_then(|s| s.publishing.as_mut())
    }

    /// Waits until the broker answers the batch it has, replies to each of its
    /// publishes and sends the next batch. Never resolves when no batch is out.
    async fn publish_done(&mut self) -> Result<(), DisconnectCode> {
        let Some(p) = self.publishing_mut() else {
            return std::future::pending().await;
        };
        let done = p.sent.get_mut().await;
        self.batch_done(done)
    }

    pub(super) fn batch_done(&mut self, done: Vec<(u32, bool)>) -> Result<(), DisconnectCode> {
        let p = self.side.as_mut().and_then(|s| s.publishing.take()).expect("a batch was out");
        self.trim_side();
        for (id, ok) in done {
            self.finish(id, publish_reply(ok))?;
        }
        if !p.queued.is_empty() {
            self.send_batch(p.queued);
        }
        Ok(())
    }

    /// Waits for every waiting publish and replies to each.
    pub async fn finish_publishes(&mut self) -> Result<(), DisconnectCode> {
        while self.publishing().is_some() {
            self.publish_done().await?;
        }
        Ok(())
    }
}
