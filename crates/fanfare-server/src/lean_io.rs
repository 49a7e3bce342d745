//! A socket wrapper that keeps no read buffer while a connection is idle.
//!
//! tungstenite reads through a per-connection buffer that exists for the whole
//! life of the connection. Giving it a tiny one (see [`WS_READ_CHUNK`]) and
//! putting this wrapper under it lets a socket read still take up to
//! `read_size` bytes in one system call: the read lands in a buffer shared by
//! all connections of the worker thread, and only what tungstenite did not take
//! yet is copied into a per-connection `Vec`, freed once consumed.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The size of tungstenite's own per-connection read buffer: big enough for a
/// frame header and a typical small command, small enough not to matter when
/// idle. Larger frames still work: tungstenite grows it to the frame's length.
pub const WS_READ_CHUNK: usize = 128;

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// `S` with reads of up to `read_size` bytes through a per-thread buffer.
pub struct LeanIo<S> {
    io: S,
    /// Read from the socket, not yet handed to the reader (empty when idle).
    pending: Vec<u8>,
    /// How much of `pending` was handed out.
    taken: usize,
    read_size: u32,
}

impl<S> LeanIo<S> {
    pub fn new(io: S, read_size: usize) -> Self {
        Self {
            io,
            pending: Vec::new(),
            taken: 0,
            read_size: read_size.min(u32::MAX as usize) as u32,
        }
    }

    /// Hands out buffered bytes; returns false when there are none.
    fn take_pending(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        if self.taken >= self.pending.len() {
            return false;
        }
        let n = (self.pending.len() - self.taken).min(buf.remaining());
        buf.put_slice(&self.pending[self.taken..self.taken + n]);
        self.taken += n;
        if self.taken == self.pending.len() {
            self.pending = Vec::new();
            self.taken = 0;
        }
        true
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for LeanIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.take_pending(buf) {
            return Poll::Ready(Ok(()));
        }
        let read_size = this.read_size as usize;
        if buf.remaining() >= read_size {
            // A large frame being filled: read straight into it.
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            if scratch.len() < read_size {
                scratch.resize(read_size, 0);
            }
            let mut rb = ReadBuf::new(&mut scratch[..read_size]);
            match Pin::new(&mut this.io).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let filled = rb.filled();
                    let n = filled.len().min(buf.remaining());
                    buf.put_slice(&filled[..n]);
                    if n < filled.len() {
                        this.pending = filled[n..].to_vec();
                        this.taken = 0;
                    }
                    Poll::Ready(Ok(()))
                }
                other => other,
            }
        })
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for LeanIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn small_reads_get_everything_in_order_and_idle_keeps_nothing() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        a.write_all(&data).await.unwrap();
        let mut lean = LeanIo::new(b, 4096);
        let mut got = Vec::new();
        let mut chunk = [0u8; 100];
        while got.len() < data.len() {
            let n = lean.read(&mut chunk).await.unwrap();
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, data);
        assert_eq!(lean.pending.capacity(), 0);
        // A large read buffer bypasses the scratch buffer.
        a.write_all(&data).await.unwrap();
        let mut big = vec![0u8; 8192];
        let n = lean.read(&mut big).await.unwrap();
        assert_eq!(&big[..n], &data[..n]);
    }
}
