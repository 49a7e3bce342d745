//! The WebSocket frame parser (`fanfare_server::ws::WsConn::read`) on client
//! bytes arriving in arbitrary pieces. The first byte sets the piece size
//! (1..=256) and the second the message size limit; the parser must answer
//! every input with messages or a close code, never a panic.
#![no_main]

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use fanfare_server::ws::{Incoming, WsConn, WsError};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A socket that yields `data` in pieces of `piece` bytes, then EOF, and
/// swallows writes.
struct Pieces<'a> {
    data: &'a [u8],
    piece: usize,
}

impl AsyncRead for Pieces<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.piece.min(self.data.len()).min(buf.remaining());
        buf.put_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Pieces<'_> {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fuzz_target!(|data: &[u8]| {
    let [piece, limit, rest @ ..] = data else { return };
    let piece = *piece as usize + 1;
    let max_message = 128 + *limit as usize * 64;
    let mut conn = WsConn::new(Pieces { data: rest, piece }, &[], 64, max_message);
    let mut cx = Context::from_waker(Waker::noop());
    // Every call consumes input or ends reading, so this is bounded; the
    // cap guards the fuzzer against a parser that stops making progress.
    for _ in 0..rest.len() + 2 {
        let result = {
            let mut read = std::pin::pin!(conn.read());
            let Poll::Ready(result) = read.as_mut().poll(&mut cx) else {
                panic!("a socket that is always ready left read() pending");
            };
            result
        };
        match result {
            Ok(Incoming::Text(p)) => {
                let text = conn.payload(p);
                assert!(std::str::from_utf8(text).is_ok(), "text message that is not UTF-8");
                assert!(text.len() <= max_message, "message over the limit");
            }
            Ok(Incoming::Binary(p)) => assert!(conn.payload(p).len() <= max_message),
            Ok(Incoming::Ping(p)) => assert!(conn.payload(p).len() <= 125),
            Ok(Incoming::Close(code, p)) => {
                assert!(code.is_none_or(fanfare_server::ws::close_code_valid));
                assert!(std::str::from_utf8(conn.payload(p)).is_ok());
            }
            Err(WsError::Eof) => return,
            Err(e) => {
                assert!(e.close_code().is_some(), "{e} without a close code");
                return;
            }
        }
    }
    panic!("read() kept returning messages past the end of the input");
});
