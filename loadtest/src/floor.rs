//! `fanfare-loadtest floor-server ADDR`: a calibration endpoint that does the
//! least any server must do for a Centrifugo-protocol client, so that the
//! generator measured against it shows what this machine allows at most.
//!
//! Per connection it accepts, answers the WebSocket upgrade, answers every
//! `connect` and `subscribe` command with a fixed reply carrying the command's
//! id, and echoes a close. Nothing else: no sessions, no hub, no pings, no
//! publications, no limits. The syscalls per handshake are the same as a real
//! server's (accept4, setsockopt TCP_NODELAY, epoll_ctl, a read and a write
//! per round trip, close), so the difference between a node and this endpoint
//! under the same generator is the node's own work. It runs a two-worker
//! multi-threaded tokio runtime like `fanfare` does on this machine.
//!
//! Only what the generator sends is understood: masked, unfragmented text
//! and close frames up to 64 KiB. Anything else ends the connection.

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::ws;

/// The same listen backlog as `fanfare` (a burst of connects must not lose SYNs).
const LISTEN_BACKLOG: u32 = 4096;

pub fn main(args: &[String]) -> anyhow::Result<()> {
    let addr: std::net::SocketAddr = args
        .first()
        .context("usage: fanfare-loadtest floor-server ADDR [WORKER_THREADS]")?
        .parse()
        .context("floor-server: ADDR must be IP:PORT")?;
    let threads: usize = match args.get(1) {
        Some(t) => t.parse().context("floor-server: WORKER_THREADS must be a number")?,
        None => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.bind(addr).with_context(|| format!("floor-server: cannot listen on {addr}"))?;
        let listener = socket.listen(LISTEN_BACKLOG)?;
        eprintln!("floor-server listening on {addr}");
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                // Out of files and the like: the peers retry.
                Err(_) => continue,
            };
            stream.set_nodelay(true).ok();
            tokio::spawn(async move {
                serve(stream).await.ok();
            });
        }
    })
}

async fn serve(mut s: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 2048];
    let mut have = 0;
    // The upgrade request.
    let head_len = loop {
        let n = s.read(&mut buf[have..]).await?;
        if n == 0 {
            return Ok(());
        }
        have += n;
        if let Some(end) = find(&buf[..have], b"\r\n\r\n") {
            break end + 4;
        }
        if have == buf.len() {
            return Ok(());
        }
    };
    let Some(key) = header(&buf[..head_len], b"sec-websocket-key") else {
        s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n").await?;
        return Ok(());
    };
    let accept = ws::accept_for(&key);
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    s.write_all(response.as_bytes()).await?;
    buf.copy_within(head_len..have, 0);
    have -= head_len;

    let mut out = Vec::with_capacity(256);
    loop {
        // Every complete frame in the buffer.
        let mut at = 0;
        while let Some((op, range, next)) = frame(&mut buf[at..have]) {
            let payload = &buf[at + range.start..at + range.end];
            match op {
                ws::OP_TEXT => reply(payload, &mut out),
                ws::OP_CLOSE => {
                    push_server_frame(&mut out, ws::OP_CLOSE, payload.get(..2).unwrap_or(&[]));
                    s.write_all(&out).await?;
                    return Ok(());
                }
                _ => return Ok(()),
            }
            at += next;
        }
        if !out.is_empty() {
            s.write_all(&out).await?;
            out.clear();
        }
        buf.copy_within(at..have, 0);
        have -= at;
        if have == buf.len() {
            buf.resize(buf.len() * 2, 0);
            if buf.len() > 1 << 17 {
                return Ok(());
            }
        }
        let n = s.read(&mut buf[have..]).await?;
        if n == 0 {
            return Ok(());
        }
        have += n;
    }
}

/// Fixed replies to the commands the generator sends before it idles
/// (newline-separated commands in one frame each get their own line).
fn reply(payload: &[u8], out: &mut Vec<u8>) {
    let mut text = Vec::with_capacity(128);
    for cmd in payload.split(|b| *b == b'\n').filter(|c| !c.is_empty()) {
        let id = number_after(cmd, b"\"id\":").unwrap_or(0);
        if !text.is_empty() {
            text.push(b'\n');
        }
        if find(cmd, b"\"subscribe\"").is_some() {
            text.extend_from_slice(format!("{{\"id\":{id},\"subscribe\":{{}}}}").as_bytes());
        } else if find(cmd, b"\"connect\"").is_some() {
            text.extend_from_slice(
                format!(
                    "{{\"id\":{id},\"connect\":{{\"client\":\"floor-{id}\",\"version\":\"floor\",\
                     \"ping\":25,\"pong\":true}}}}"
                )
                .as_bytes(),
            );
        } else {
            text.extend_from_slice(
                format!("{{\"id\":{id},\"error\":{{\"code\":104,\"message\":\"not available\"}}}}")
                    .as_bytes(),
            );
        }
    }
    push_server_frame(out, ws::OP_TEXT, &text);
}

/// An unmasked (server) frame.
fn push_server_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= 0xffff => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

/// The first complete masked frame of `buf`, unmasked in place: (opcode,
/// payload range, frame length). `None` when incomplete or not understood.
fn frame(buf: &mut [u8]) -> Option<(u8, std::ops::Range<usize>, usize)> {
    if buf.len() < 2 || buf[0] & 0x80 == 0 || buf[1] & 0x80 == 0 {
        return None;
    }
    let (len, head) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
        126 | 127 => return None,
        n => (usize::from(n), 2),
    };
    let total = head + 4 + len;
    if buf.len() < total {
        return None;
    }
    let mask: [u8; 4] = buf[head..head + 4].try_into().expect("4 bytes");
    ws::apply_mask(&mut buf[head + 4..total], mask);
    Some((buf[0] & 0x0f, head + 4..total, total))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A request header's value (name matched case-insensitively).
fn header(head: &[u8], name: &[u8]) -> Option<String> {
    head.split(|b| *b == b'\n').find_map(|line| {
        let colon = line.iter().position(|b| *b == b':')?;
        line[..colon]
            .eq_ignore_ascii_case(name)
            .then(|| String::from_utf8_lossy(&line[colon + 1..]).trim().to_string())
    })
}

fn number_after(hay: &[u8], key: &[u8]) -> Option<u64> {
    let at = find(hay, key)? + key.len();
    let digits = hay[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&hay[at..at + digits]).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_carry_the_ids_and_are_unmasked_server_frames() {
        let mut out = Vec::new();
        reply(b"{\"id\":7,\"connect\":{}}\n{\"id\":8,\"subscribe\":{\"channel\":\"c\"}}", &mut out);
        assert_eq!(out[0], 0x81);
        assert_eq!(out[1] & 0x80, 0, "server frames are not masked");
        let len = usize::from(out[1] & 0x7f);
        assert_eq!(out.len(), 2 + len);
        let text = std::str::from_utf8(&out[2..]).unwrap();
        let lines: Vec<serde_json::Value> =
            text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines[0]["id"], 7);
        assert_eq!(lines[0]["connect"]["ping"], 25);
        assert_eq!(lines[1]["id"], 8);
        assert!(lines[1]["subscribe"].is_object());
    }

    #[test]
    fn decodes_a_masked_client_frame() {
        let mut wire = Vec::new();
        ws::push_frame(&mut wire, ws::OP_TEXT, b"{\"id\":1}", [1, 2, 3, 4]);
        wire.extend_from_slice(b"\x81"); // the start of a next frame
        let (op, range, next) = frame(&mut wire).unwrap();
        assert_eq!(op, ws::OP_TEXT);
        assert_eq!(&wire[range], b"{\"id\":1}");
        assert_eq!(next, wire.len() - 1);
        assert!(frame(&mut wire[next..]).is_none(), "incomplete");
    }
}
