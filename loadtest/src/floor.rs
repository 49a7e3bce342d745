//! `fanfare-loadtest floor-server ADDR`: a calibration endpoint that does less
//! than any real server could for a Centrifugo-protocol client, so that the
//! generator measured against it shows what this machine allows at most (a
//! bound no server reaches, not a baseline to match).
//!
//! Per connection it accepts, answers the WebSocket upgrade, answers
//! `connect`, `subscribe` and `publish` commands with fixed replies carrying
//! the command's id, and echoes a close. The publications of one read are
//! written at once, by the publisher's task, to every subscriber of their
//! channel: one frame per channel built once (pushes newline-joined), one
//! uncontended lock and one `write` per subscriber. Nothing else: no
//! sessions, no queues, no task wake-up per subscriber, no pings (although
//! the `connect` reply announces them), no history, no limits, no UTF-8 or
//! JSON validation, no authentication. The syscalls per
//! handshake and per delivery are the ones any server makes (accept4,
//! setsockopt TCP_NODELAY, epoll_ctl, a read and a write per round trip, a
//! write per delivery, close), so the difference between a node and this
//! endpoint under the same generator is the node's own work. It runs a
//! multi-threaded tokio runtime with one worker per CPU, as `fanfare` does.
//!
//! Only what `fanfare-loadtest` sends is understood: masked, unfragmented
//! text, binary and close frames up to 64 KiB, JSON commands as `wire.rs`
//! writes them (`data` last in a publish), Protobuf commands (a client that
//! offers the subprotocol `centrifuge-protobuf` gets it; its publications
//! reach subscribers Protobuf-encoded, so one run uses one protocol).
//! Anything else ends the connection.

use anyhow::Context;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};

use tokio::net::TcpStream;

use crate::protobuf::{self, pb};
use crate::ws;
use prost::Message as _;

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

/// One client connection, shared with publishers that write to it.
struct Conn {
    stream: TcpStream,
    /// Held for a whole frame, so that frames from several tasks never interleave.
    write: tokio::sync::Mutex<()>,
}

impl Conn {
    async fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        let _w = self.write.lock().await;
        let mut at = 0;
        while at < frame.len() {
            match self.stream.try_write(&frame[at..]) {
                Ok(n) => at += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.stream.writable().await?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.stream.try_read(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.stream.readable().await?;
                }
                r => return r,
            }
        }
    }
}

type Subscribers = std::collections::HashMap<String, Vec<(u64, Arc<Conn>)>>;

/// Channel → its subscribers, for the whole process.
fn subscribers() -> &'static Mutex<Subscribers> {
    static SUBS: OnceLock<Mutex<Subscribers>> = OnceLock::new();
    SUBS.get_or_init(Default::default)
}

async fn serve(stream: TcpStream) -> std::io::Result<()> {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let id = NEXT.fetch_add(1, Relaxed);
    let conn = Arc::new(Conn { stream, write: tokio::sync::Mutex::new(()) });
    let mut channels = Vec::new();
    let r = session(&conn, id, &mut channels).await;
    if !channels.is_empty() {
        let mut subs = subscribers().lock().unwrap_or_else(|p| p.into_inner());
        for ch in channels {
            if let Some(list) = subs.get_mut(&ch) {
                list.retain(|(i, _)| *i != id);
            }
        }
    }
    r
}

async fn session(conn: &Arc<Conn>, id: u64, channels: &mut Vec<String>) -> std::io::Result<()> {
    let mut buf = vec![0u8; 2048];
    let mut have = 0;
    // The upgrade request (httparse, as the generator parses the answer).
    let (head_len, key, binary) = loop {
        let n = conn.read(&mut buf[have..]).await?;
        if n == 0 {
            return Ok(());
        }
        have += n;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..have]) {
            Ok(httparse::Status::Complete(len)) => {
                let header = |name: &str| {
                    req.headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
                };
                let binary = header("sec-websocket-protocol")
                    .is_some_and(|p| p.split(',').any(|p| p.trim() == protobuf::SUBPROTOCOL));
                break (len, header("sec-websocket-key"), binary);
            }
            Ok(httparse::Status::Partial) if have < buf.len() => {}
            _ => return Ok(()),
        }
    };
    let Some(key) = key else {
        conn.send(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n").await?;
        return Ok(());
    };
    let accept = ws::accept_for(&key);
    let protocol = if binary {
        format!("Sec-WebSocket-Protocol: {}\r\n", protobuf::SUBPROTOCOL)
    } else {
        String::new()
    };
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n{protocol}\r\n"
    );
    conn.send(response.as_bytes()).await?;
    buf.copy_within(head_len..have, 0);
    have -= head_len;

    let mut out = Vec::with_capacity(256);
    let mut publications = Vec::new();
    loop {
        // Every complete frame in the buffer.
        let mut at = 0;
        while let Some((op, range, next)) = frame(&mut buf[at..have]) {
            let payload = &buf[at + range.start..at + range.end];
            let mut on = |what: Command| match what {
                Command::Subscribe(ch) => {
                    let mut subs = subscribers().lock().unwrap_or_else(|p| p.into_inner());
                    subs.entry(ch.clone()).or_default().push((id, conn.clone()));
                    channels.push(ch);
                }
                Command::Publish(p) => publications.push(p),
                Command::Other => {}
            };
            match op {
                ws::OP_TEXT if !binary => {
                    for cmd in payload.split(|b| *b == b'\n').filter(|c| !c.is_empty()) {
                        on(command(cmd, &mut out));
                    }
                }
                ws::OP_BINARY if binary => {
                    // One frame of replies per client frame.
                    let mut replies = Vec::new();
                    for msg in protobuf::messages(payload) {
                        let Ok(cmd) =
                            msg.map_err(drop).and_then(|m| pb::Command::decode(m).map_err(drop))
                        else {
                            return Ok(());
                        };
                        on(protobuf_command(cmd, &mut replies));
                    }
                    ws::push_server_frame(&mut out, true, ws::OP_BINARY, &replies);
                }
                ws::OP_CLOSE => {
                    ws::push_server_frame(
                        &mut out,
                        true,
                        ws::OP_CLOSE,
                        payload.get(..2).unwrap_or(&[]),
                    );
                    conn.send(&out).await?;
                    return Ok(());
                }
                _ => return Ok(()),
            }
            at += next;
        }
        if !out.is_empty() {
            conn.send(&out).await?;
            out.clear();
        }
        // The publications of this read, one frame per channel (pushes
        // newline-joined, or length-delimited back to back, as servers batch
        // them), one write per subscriber.
        let (opcode, separator): (u8, &[u8]) =
            if binary { (ws::OP_BINARY, b"") } else { (ws::OP_TEXT, b"\n") };
        while let Some((channel, first)) = publications.first().cloned() {
            let mut text = first;
            let mut rest = Vec::new();
            for (ch, push) in publications.drain(..).skip(1) {
                if ch == channel {
                    text.extend_from_slice(separator);
                    text.extend_from_slice(&push);
                } else {
                    rest.push((ch, push));
                }
            }
            publications = rest;
            let mut frame = Vec::with_capacity(text.len() + 10);
            ws::push_server_frame(&mut frame, true, opcode, &text);
            let targets: Vec<Arc<Conn>> = {
                let subs = subscribers().lock().unwrap_or_else(|p| p.into_inner());
                subs.get(&channel).map(|l| l.iter().map(|(_, c)| c.clone()).collect())
            }
            .unwrap_or_default();
            for t in targets {
                // A subscriber that is gone is the subscriber's problem.
                t.send(&frame).await.ok();
            }
        }
        buf.copy_within(at..have, 0);
        have -= at;
        if have == buf.len() {
            buf.resize(buf.len() * 2, 0);
            if buf.len() > 1 << 17 {
                return Ok(());
            }
        }
        let n = conn.read(&mut buf[have..]).await?;
        if n == 0 {
            return Ok(());
        }
        have += n;
    }
}

/// What a command asks of the server beyond its reply.
enum Command {
    Subscribe(String),
    /// The channel and the push (one JSON line) for its subscribers.
    Publish((String, Vec<u8>)),
    Other,
}

/// Appends the fixed reply to one command (a frame of its own) and says what
/// else it needs.
fn command(cmd: &[u8], out: &mut Vec<u8>) -> Command {
    let id = number_after(cmd, b"\"id\":").unwrap_or(0);
    let channel = || string_after(cmd, b"\"channel\":\"").unwrap_or_default();
    let (text, what) = if find(cmd, b"\"subscribe\":").is_some() {
        (format!("{{\"id\":{id},\"subscribe\":{{}}}}"), Command::Subscribe(channel()))
    } else if find(cmd, b"\"publish\":").is_some() {
        let ch = channel();
        // `data` is the last field: everything after it but the two braces
        // that close the publish and the command.
        let data = find(cmd, b"\"data\":")
            .map(|at| &cmd[at + 7..cmd.len().saturating_sub(2).max(at + 7)])
            .unwrap_or(b"null");
        let mut push = Vec::with_capacity(data.len() + ch.len() + 40);
        push.extend_from_slice(b"{\"push\":{\"channel\":\"");
        push.extend_from_slice(ch.as_bytes());
        push.extend_from_slice(b"\",\"pub\":{\"data\":");
        push.extend_from_slice(data);
        push.extend_from_slice(b"}}}");
        (format!("{{\"id\":{id},\"publish\":{{}}}}"), Command::Publish((ch, push)))
    } else if find(cmd, b"\"connect\":").is_some() {
        (
            format!(
                "{{\"id\":{id},\"connect\":{{\"client\":\"floor-{id}\",\"version\":\"floor\",\
                 \"ping\":25,\"pong\":true}}}}"
            ),
            Command::Other,
        )
    } else {
        (
            format!("{{\"id\":{id},\"error\":{{\"code\":104,\"message\":\"not available\"}}}}"),
            Command::Other,
        )
    };
    ws::push_server_frame(out, true, ws::OP_TEXT, text.as_bytes());
    what
}

/// Appends the fixed reply to one Protobuf command (length-delimited) and
/// says what else it needs; a publish's push is encoded once, here.
fn protobuf_command(cmd: pb::Command, out: &mut Vec<u8>) -> Command {
    let mut reply = pb::Reply { id: cmd.id, ..Default::default() };
    let what = if let Some(s) = cmd.subscribe {
        reply.subscribe = Some(Default::default());
        Command::Subscribe(s.channel)
    } else if let Some(p) = cmd.publish {
        reply.publish = Some(pb::PublishResult {});
        let push = pb::Reply {
            push: Some(pb::Push {
                channel: p.channel.clone(),
                r#pub: Some(pb::Publication { data: p.data, ..Default::default() }),
                ..Default::default()
            }),
            ..Default::default()
        };
        Command::Publish((p.channel, push.encode_length_delimited_to_vec()))
    } else if cmd.connect.is_some() {
        reply.connect = Some(pb::ConnectResult {
            client: format!("floor-{}", cmd.id),
            version: "floor".into(),
            ping: 25,
            pong: true,
            ..Default::default()
        });
        Command::Other
    } else {
        reply.error =
            Some(pb::Error { code: 104, message: "not available".into(), ..Default::default() });
        Command::Other
    };
    reply.encode_length_delimited(out).expect("a Vec grows as needed");
    what
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

/// The JSON string (without escapes) after `key`.
fn string_after(hay: &[u8], key: &[u8]) -> Option<String> {
    let at = find(hay, key)? + key.len();
    let len = hay[at..].iter().position(|b| *b == b'"')?;
    Some(String::from_utf8_lossy(&hay[at..at + len]).into_owned())
}

fn number_after(hay: &[u8], key: &[u8]) -> Option<u64> {
    let at = find(hay, key)? + key.len();
    let digits = hay[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&hay[at..at + digits]).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The text of the single unmasked server frame in `out`.
    fn text_of(out: &[u8]) -> &str {
        assert_eq!(out[0], 0x81);
        assert_eq!(out[1] & 0x80, 0, "server frames are not masked");
        let (len, head) = match out[1] {
            126 => (usize::from(u16::from_be_bytes([out[2], out[3]])), 4),
            n => (usize::from(n), 2),
        };
        assert_eq!(out.len(), head + len);
        std::str::from_utf8(&out[head..]).unwrap()
    }

    #[test]
    fn replies_carry_the_ids_and_a_publish_becomes_a_push_the_generator_reads() {
        let mut out = Vec::new();
        assert!(matches!(
            command(crate::wire::connect(7, "").as_bytes(), &mut out),
            Command::Other
        ));
        let r: serde_json::Value = serde_json::from_str(text_of(&out)).unwrap();
        assert_eq!((r["id"].as_u64(), r["connect"]["ping"].as_u64()), (Some(7), Some(25)));

        let mut cmd = Vec::new();
        crate::wire::subscribe(&mut cmd, 8, "room");
        out.clear();
        let Command::Subscribe(ch) = command(&cmd, &mut out) else { panic!("{cmd:?}") };
        assert_eq!(ch, "room");
        assert_eq!(crate::wire::fast(text_of(&out)), crate::wire::Fast::Reply(8));

        let probe = crate::wire::Probe { ts: 123, seq: 4, p: 5 };
        let mut cmd = Vec::new();
        crate::wire::publish(&mut cmd, 9, "room", &probe.encode(200));
        out.clear();
        let Command::Publish((ch, push)) = command(&cmd, &mut out) else { panic!("{cmd:?}") };
        assert_eq!(ch, "room");
        assert_eq!(crate::wire::fast(text_of(&out)), crate::wire::Fast::Reply(9));
        assert_eq!(
            crate::wire::fast(std::str::from_utf8(&push).unwrap()),
            crate::wire::Fast::Probe { channel: "room", probe }
        );
    }

    #[test]
    fn protobuf_replies_carry_the_ids_and_a_publish_becomes_a_push_the_generator_reads() {
        let mut out = Vec::new();
        let connect = pb::Command::decode(&protobuf::connect(7, "")[1..]).unwrap();
        assert!(matches!(protobuf_command(connect, &mut out), Command::Other));
        let mut cmds = Vec::new();
        protobuf::subscribe(&mut cmds, 8, "room");
        let probe = crate::wire::Probe { ts: 123, seq: 4, p: 5 };
        protobuf::publish(&mut cmds, 9, "room", probe.encode(200).as_bytes());
        let mut push = None;
        for m in protobuf::messages(&cmds) {
            match protobuf_command(pb::Command::decode(m.unwrap()).unwrap(), &mut out) {
                Command::Subscribe(ch) => assert_eq!(ch, "room"),
                Command::Publish((ch, p)) => push = Some((ch, p)),
                Command::Other => panic!("subscribe or publish"),
            }
        }
        let replies: Vec<&[u8]> = protobuf::messages(&out).map(Result::unwrap).collect();
        let connect = pb::Reply::decode(replies[0]).unwrap();
        assert_eq!((connect.id, connect.connect.unwrap().ping), (7, 25));
        assert_eq!(protobuf::fast(replies[1]), crate::wire::Fast::Reply(8));
        assert_eq!(protobuf::fast(replies[2]), crate::wire::Fast::Reply(9));
        let (ch, push) = push.unwrap();
        assert_eq!(ch, "room");
        let push: Vec<&[u8]> = protobuf::messages(&push).map(Result::unwrap).collect();
        assert_eq!(protobuf::fast(push[0]), crate::wire::Fast::Probe { channel: "room", probe });
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
