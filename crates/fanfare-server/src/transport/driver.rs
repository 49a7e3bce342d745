//! The one connection loop every transport runs once its session exists: it
//! selects over the session's outbox (replies, publications, timers,
//! directives), its publishes waiting for the broker, and the client's input,
//! and ends with the same goodbye sequence everywhere. A transport only says
//! how bytes come in and go out ([`Wire`]).

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use fanfare_core::metrics::hot;
use fanfare_core::{Outbox, Session};
use fanfare_protocol::DisconnectCode;

/// What a wire read from the client. `T` says where (a wire's own token,
/// handed back to it: kept out of the wire itself, so an idle connection's
/// task does not carry the last input around).
pub(crate) enum Input<T> {
    /// A frame of commands, in the session's encoding: [`Wire::frame`].
    Frame(T),
    /// Something only the wire understands (a WebSocket control frame:
    /// ping or close): [`Wire::answer`] deals with it. (Not the control
    /// API, `methods::Api::Control`.)
    ControlFrame(T),
    /// The client broke the protocol: close with this code.
    Refused(DisconnectCode),
    /// The client went away; nothing more can be written.
    Gone(DisconnectCode),
}

/// Why an answer to a control input ended the connection.
pub(crate) enum End {
    /// Close with this code (after writing what is queued).
    Close(DisconnectCode),
    /// The peer went away or the socket failed; nothing more can be written.
    Gone(DisconnectCode),
}

/// How one transport moves bytes. Futures of `read` must be cancel-safe (the
/// loop drops them when the outbox wakes first); `write`, `answer` and
/// `goodbye` run to completion (or their timeout).
pub(crate) trait Wire {
    type Token: Copy;
    /// Waits for the client's next input. A write-only wire waits until the
    /// client is gone.
    fn read(&mut self) -> impl Future<Output = Input<Self::Token>>;
    /// The frame an [`Input::Frame`] announced.
    fn frame(&self, at: Self::Token) -> &[u8];
    /// Answers an [`Input::ControlFrame`].
    fn answer(
        &mut self,
        at: Self::Token,
        write_timeout: Duration,
    ) -> impl Future<Output = Result<(), End>>;
    /// Writes a batch of encoded messages; the bytes written.
    fn write(&mut self, items: &[Bytes]) -> impl Future<Output = std::io::Result<usize>>;
    /// Tells the client the connection ends with `code`, in the transport's
    /// way (a close frame, a disconnect push), within `write_timeout`.
    fn goodbye(
        &mut self,
        code: DisconnectCode,
        reason: Option<String>,
        write_timeout: Duration,
    ) -> impl Future<Output = ()>;
}

/// Runs a session over `wire` until the connection ends; returns the code
/// to close the session with ([`Session::close`], the caller's: it takes
/// the session by value). Takes both by reference: an `async fn` keeps its by-value
/// arguments for its whole life next to the locals they move into, which
/// would store them twice in every connection's task.
pub(crate) async fn drive<W: Wire>(
    wire: &mut W,
    session: &mut Session,
    write_timeout: &Duration,
) -> DisconnectCode {
    let outbox = session.outbox().clone();
    // Deadlines (pings, pong and connect timeouts) come from the node's shared
    // coarse timer through the outbox: the task holds no timer of its own.
    session.arm_timer();
    let end = loop {
        tokio::select! {
            biased;
            _ = outbox.ready() => {
                // Cold paths are boxed: their state exists only while they run,
                // so an idle connection's task stays small.
                if outbox.take_timer_due() {
                    if let Err(code) = Box::pin(session.on_deadline()).await {
                        break End::Close(code);
                    }
                    session.arm_timer();
                }
                Box::pin(session.apply_directives()).await;
                match Box::pin(flush(wire, &outbox, *write_timeout)).await {
                    Ok(None) => {}
                    Ok(Some(code)) => break End::Close(code),
                    Err(code) => break End::Gone(code),
                }
            }
            // The broker answered a batch of publishes, or the backend a
            // proxy call (the select only polls the session's own futures,
            // so dropping this arm loses nothing).
            event = session.next_event() => {
                if let Err(code) = Box::pin(session.handle_event(event)).await {
                    break End::Close(code);
                }
                session.arm_timer();
            }
            // While too many publishes wait for the broker, or a proxy call
            // for the backend, leave the client's commands unread
            // (backpressure instead of an unbounded queue).
            input = wire.read(), if session.accepts_input() => {
                let res = match input {
                    Input::Frame(at) => Box::pin(session.handle_frame(wire.frame(at))).await,
                    Input::ControlFrame(at) => match Box::pin(wire.answer(at, *write_timeout)).await {
                        Ok(()) => Ok(()),
                        Err(end) => break end,
                    },
                    Input::Refused(code) => Err(code),
                    Input::Gone(code) => break End::Gone(code),
                };
                if let Err(code) = res {
                    break End::Close(code);
                }
                session.arm_timer();
            }
        }
    };
    // Decided and counted now (the goodbye below may wait a write timeout on
    // a full socket); a close the outbox decided first wins.
    let code = match end {
        End::Close(code) => {
            let code = session.ended(code);
            // Answer publishes still waiting for the broker (a drain must not
            // leave an accepted publication unacknowledged), then write what the
            // session queued before closing (e.g. an error reply), except after
            // overflow, where the queue was dropped.
            let _ =
                Box::pin(tokio::time::timeout(*write_timeout, session.finish_publishes())).await;
            let flushed = Box::pin(flush(wire, &outbox, *write_timeout)).await;
            // A flush that failed may have stopped inside a frame: a goodbye
            // after it would be garbage, so the connection is just dropped.
            if flushed.is_ok() {
                let reason = outbox.close_reason(code);
                Box::pin(wire.goodbye(code, reason, *write_timeout)).await;
            }
            code
        }
        End::Gone(code) => session.ended(code),
    };
    if code == DisconnectCode::SLOW {
        tracing::debug!(client = session.client_id(), "slow consumer closed");
    }
    code
}

/// Writes everything queued in one `Wire::write`. Returns a close requested
/// through the outbox, or `Err` when the connection is unusable.
async fn flush<W: Wire>(
    wire: &mut W,
    outbox: &Outbox,
    write_timeout: Duration,
) -> Result<Option<DisconnectCode>, DisconnectCode> {
    let mut items = Vec::new();
    let close = outbox.drain(&mut items);
    if items.is_empty() {
        return Ok(close);
    }
    let count = items.len();
    let h = hot();
    // Counted before writing, so a client that got the bytes sees the count.
    h.writes.increment(1);
    match tokio::time::timeout(write_timeout, wire.write(&items)).await {
        Ok(Ok(bytes)) => {
            h.messages_sent.increment(count as u64);
            h.bytes_sent.increment(bytes as u64);
            Ok(close)
        }
        Ok(Err(_)) => Err(DisconnectCode::WRITE_ERROR),
        Err(_) => {
            // The client stopped reading: the same failure as a queue overflow,
            // counted if this decided the close (a second timeout while
            // saying goodbye does not count again).
            if outbox.close_first(DisconnectCode::SLOW) {
                fanfare_core::metrics::slow_consumer();
            }
            Err(DisconnectCode::SLOW)
        }
    }
}

/// Counts bytes received from a client.
pub(crate) fn account_received(n: usize) {
    hot().bytes_received.increment(n as u64);
}
