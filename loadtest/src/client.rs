//! One client connection: TCP from a chosen source address, the WebSocket
//! upgrade, `connect`, `subscribe`, and reading frames while answering pings,
//! in either protocol (JSON text frames or Protobuf binary frames).
//! The WebSocket framing is our own (`ws.rs`): one read buffer per connection
//! that yields every complete message of a read without copying, and one
//! write buffer that sends everything queued in one `write`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{Context, anyhow, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::options::Protocol;
use crate::protobuf;
use crate::wire::{self, Line};
use crate::ws::{self, Decoder, Msg, Rng};

/// A node to connect to: its resolved address and the upgrade request (all
/// but the key), built once.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    request_head: Vec<u8>,
    protocol: Protocol,
}

/// Commands for one frame, in the connection's protocol: JSON objects
/// joined by newlines, or length-delimited Protobuf `Command`s.
pub struct Commands {
    protocol: Protocol,
    pub buf: Vec<u8>,
}

impl Commands {
    pub fn new(protocol: Protocol) -> Commands {
        Commands { protocol, buf: Vec::new() }
    }

    /// The `connect` command alone.
    pub fn connect(protocol: Protocol, id: u32, token: &str) -> Vec<u8> {
        match protocol {
            Protocol::Json => wire::connect(id, token).into_bytes(),
            Protocol::Protobuf => protobuf::connect(id, token),
        }
    }

    pub fn subscribe(&mut self, id: u32, channel: &str) {
        match self.protocol {
            Protocol::Json => wire::subscribe(&mut self.buf, id, channel),
            Protocol::Protobuf => protobuf::subscribe(&mut self.buf, id, channel),
        }
    }

    /// A publish of `data` (the probe text: raw JSON, or the bytes of it).
    pub fn publish(&mut self, id: u32, channel: &str, data: &str) {
        match self.protocol {
            Protocol::Json => wire::publish(&mut self.buf, id, channel, data),
            Protocol::Protobuf => protobuf::publish(&mut self.buf, id, channel, data.as_bytes()),
        }
    }
}

/// One message from the server as the connection reads it.
pub enum Frame<'a> {
    /// A JSON text frame: newline-delimited messages.
    Text(&'a str),
    /// A Protobuf binary frame: length-delimited `Reply`s.
    Binary(&'a [u8]),
}

impl Endpoint {
    /// Resolves `ws://host:port/path` (port 80 when absent); `protocol`
    /// decides the subprotocol the upgrade asks for.
    pub async fn resolve(url: &str, protocol: Protocol) -> anyhow::Result<Endpoint> {
        let rest = url
            .strip_prefix("ws://")
            .with_context(|| format!("{url}: only ws:// URLs are supported"))?;
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest[i..].starts_with('?') => (&rest[..i], format!("/{}", &rest[i..])),
            Some(i) => (&rest[..i], rest[i..].to_string()),
            None => (rest, "/".to_string()),
        };
        let hostport =
            if authority.contains(':') { authority.to_string() } else { format!("{authority}:80") };
        let addr = tokio::net::lookup_host(&hostport)
            .await
            .with_context(|| format!("resolving {hostport}"))?
            .find(SocketAddr::is_ipv4)
            .with_context(|| format!("{hostport} has no IPv4 address"))?;
        let subprotocol = (protocol == Protocol::Protobuf).then_some(protobuf::SUBPROTOCOL);
        Ok(Endpoint {
            addr,
            request_head: ws::request_head(&path, authority, subprotocol),
            protocol,
        })
    }

    /// Source address for client slot `slot`: spread over 127.0.0.2.. for a
    /// loopback target, so that many clients do not exhaust one address's ports.
    pub fn source_for(&self, slot: usize, source_ips: u8) -> Option<Ipv4Addr> {
        match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_loopback() && source_ips > 0 => {
                Some(Ipv4Addr::new(127, 0, 0, 2 + (slot % source_ips as usize) as u8))
            }
            _ => None,
        }
    }
}

/// An open, connected client.
pub struct Conn {
    stream: TcpStream,
    protocol: Protocol,
    dec: Decoder,
    /// Frames queued for the next [`Conn::flush`].
    out: Vec<u8>,
    rng: Rng,
    next_id: u32,
}

/// Answers a control frame (the message borrows the connection's read
/// buffer, hence the fields one by one); a close ends the connection.
fn control(
    out: &mut Vec<u8>,
    rng: &mut Rng,
    stream: &TcpStream,
    msg: Msg<'_>,
) -> Result<(), Ended> {
    match msg {
        Msg::Text(_) | Msg::Binary(_) | Msg::Pong => Ok(()),
        Msg::Ping(payload) => {
            ws::push_frame(out, ws::OP_PONG, payload, rng.mask());
            Ok(())
        }
        Msg::Close(code, reason) => {
            // Echo the close (best effort: we stop reading now).
            let mask = rng.mask();
            match code {
                Some(c) => ws::push_close(out, c, "", mask),
                None => ws::push_frame(out, ws::OP_CLOSE, b"", mask),
            }
            let _ = stream.try_write(out);
            out.clear();
            // A close frame without a code is 1005 "no status received"
            // (RFC 6455 7.1.5), as browsers report it.
            Err(Ended::Closed { code: code.unwrap_or(1005), reason: reason.to_string() })
        }
    }
}

/// What the setup phase (connect, subscribe) needs to know of a message.
enum Setup {
    Ping,
    Reply { id: u32, error: Option<(u32, String)> },
    Disconnect { code: u32, reason: String },
    Undecodable(String),
}

/// How a connection ended, when it was not us who closed it.
#[derive(Debug)]
pub enum Ended {
    Closed { code: u16, reason: String },
    Broken(String),
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::Closed { code, reason } => write!(f, "closed by server: {code} {reason}"),
            Ended::Broken(e) => write!(f, "connection broken: {e}"),
        }
    }
}

/// Binds to `ip` leaving the port to `connect` (IP_BIND_ADDRESS_NO_PORT):
/// the kernel then picks a port free for this destination only, which is
/// cheaper than a port free for every destination, and lets one source
/// address reach many more connections.
fn bind_source(socket: &TcpSocket, ip: Ipv4Addr) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket fd and a c_int option of the size passed.
    // Failure (an old kernel) only costs the optimisation.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    socket.bind(SocketAddr::new(ip.into(), 0)).with_context(|| format!("bind {ip}"))
}

impl Conn {
    /// TCP connect (from `source` when given), WebSocket upgrade, then the
    /// `connect` command `connect_cmd` (which must use id 1, in the
    /// endpoint's protocol: see [`Commands::connect`]) and its reply.
    pub async fn open(
        ep: &Endpoint,
        source: Option<Ipv4Addr>,
        connect_cmd: &[u8],
    ) -> anyhow::Result<Conn> {
        let socket = TcpSocket::new_v4().context("socket")?;
        if let Some(ip) = source {
            bind_source(&socket, ip)?;
        }
        let stream =
            socket.connect(ep.addr).await.with_context(|| format!("connect {}", ep.addr))?;
        stream.set_nodelay(true)?;
        let mut rng = Rng::new();
        let key = ws::new_key(&mut rng);
        let mut conn = Conn {
            stream,
            protocol: ep.protocol,
            dec: Decoder::with_capacity(1024),
            out: Vec::new(),
            rng,
            next_id: 1,
        };
        let subprotocol = (ep.protocol == Protocol::Protobuf).then_some(protobuf::SUBPROTOCOL);
        ws::push_request(&mut conn.out, &ep.request_head, &key);
        conn.flush().await.context("WebSocket upgrade")?;
        loop {
            if conn.stream.read_buf(conn.dec.read_buf()).await.context("WebSocket upgrade")? == 0 {
                bail!("WebSocket upgrade: connection closed before the response");
            }
            if let Some(n) = ws::parse_response(conn.dec.unread(), &key, subprotocol)
                .map_err(|e| anyhow!("WebSocket upgrade: {e}"))?
            {
                conn.dec.consume(n);
                break;
            }
        }
        let id = conn.next_id();
        debug_assert_eq!(id, 1);
        conn.send(connect_cmd);
        conn.flush().await.context("sending connect")?;
        conn.await_replies(&[id]).await.context("connect")?;
        Ok(conn)
    }

    pub fn next_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// Queues one frame of commands (text for JSON, binary for Protobuf).
    pub fn send(&mut self, commands: &[u8]) {
        let mask = self.rng.mask();
        let opcode = match self.protocol {
            Protocol::Json => ws::OP_TEXT,
            Protocol::Protobuf => ws::OP_BINARY,
        };
        ws::push_frame(&mut self.out, opcode, commands, mask);
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let r = self.stream.write_all(&self.out).await;
        self.out.clear();
        if self.out.capacity() > 64 * 1024 {
            self.out.shrink_to(4096);
        }
        r
    }

    /// Subscribes to every channel in one frame and waits for all replies.
    pub async fn subscribe(&mut self, channels: &[String]) -> anyhow::Result<()> {
        if channels.is_empty() {
            return Ok(());
        }
        let mut frame = Commands::new(self.protocol);
        let mut ids = Vec::with_capacity(channels.len());
        for ch in channels {
            let id = self.next_id();
            frame.subscribe(id, ch);
            ids.push(id);
        }
        self.send(&frame.buf);
        self.flush().await.context("sending subscribe")?;
        self.await_replies(&ids).await.context("subscribe")
    }

    /// Reads until every id in `ids` got a reply; an error reply fails.
    /// Pings are answered; anything else is dropped (nothing is published yet).
    async fn await_replies(&mut self, ids: &[u32]) -> anyhow::Result<()> {
        let mut left = ids.len();
        let mut failed: Option<anyhow::Error> = None;
        while left > 0 {
            self.read().await.map_err(|e| anyhow!("{e}"))?;
            self.handle(|frame| {
                let mut pings = 0;
                let mut on = |setup: Setup| match setup {
                    Setup::Ping => pings += 1,
                    Setup::Reply { id, error } if id != 0 && ids.contains(&id) => {
                        if let Some((code, message)) = error {
                            failed.get_or_insert(anyhow!("error {code} {message}"));
                        }
                        left -= 1;
                    }
                    Setup::Reply { .. } => {}
                    Setup::Disconnect { code, reason } => {
                        failed.get_or_insert(anyhow!("disconnect push {code} {reason}"));
                    }
                    Setup::Undecodable(e) => {
                        failed.get_or_insert(anyhow!("undecodable reply: {e}"));
                    }
                };
                match frame {
                    Frame::Text(text) => {
                        for line in wire::lines(text) {
                            on(match line {
                                Err(e) => Setup::Undecodable(e.to_string()),
                                Ok(Line::Ping) => Setup::Ping,
                                Ok(Line::Message(m)) => match m.push.and_then(|p| p.disconnect) {
                                    Some(d) if m.id == 0 => {
                                        Setup::Disconnect { code: d.code, reason: d.reason }
                                    }
                                    _ => Setup::Reply {
                                        id: m.id,
                                        error: m.error.map(|e| (e.code, e.message)),
                                    },
                                },
                            });
                        }
                    }
                    Frame::Binary(bytes) => {
                        for msg in protobuf::messages(bytes) {
                            on(match msg.map(|m| (m.is_empty(), protobuf::decode(m))) {
                                Err(e) => Setup::Undecodable(e),
                                Ok((_, Err(e))) => Setup::Undecodable(e.to_string()),
                                Ok((true, _)) => Setup::Ping,
                                Ok((false, Ok(r))) => match r.push.and_then(|p| p.disconnect) {
                                    Some(d) if r.id == 0 => {
                                        Setup::Disconnect { code: d.code, reason: d.reason }
                                    }
                                    _ => Setup::Reply {
                                        id: r.id,
                                        error: r.error.map(|e| (e.code, e.message)),
                                    },
                                },
                            });
                        }
                    }
                }
                pings
            })
            .map_err(|e| anyhow!("{e}"))?;
            if let Some(e) = failed {
                return Err(e);
            }
            self.flush().await.context("sending pong")?;
        }
        Ok(())
    }

    /// Waits for bytes from the server and reads what is there (one `read`).
    /// Cancel-safe: a cancelled read has read nothing.
    pub async fn read(&mut self) -> Result<(), Ended> {
        match self.stream.read_buf(self.dec.read_buf()).await {
            Ok(0) => Err(Ended::Broken("stream ended".into())),
            Ok(_) => Ok(()),
            Err(e) => Err(Ended::Broken(e.to_string())),
        }
    }

    /// Hands every complete message read so far to `on_frame`, which
    /// returns how many server pings (JSON `{}`, Protobuf empty replies) it
    /// held; queues a protocol pong for each and a WebSocket pong for each
    /// WebSocket ping. Call [`Conn::flush`] afterwards.
    pub fn handle(&mut self, mut on_frame: impl FnMut(Frame<'_>) -> usize) -> Result<(), Ended> {
        loop {
            let msg = self.dec.next_msg().map_err(|e| Ended::Broken(e.to_string()))?;
            let pings = match (msg, self.protocol) {
                (None, _) => return Ok(()),
                (Some(Msg::Text(bytes)), Protocol::Json) => {
                    let text = std::str::from_utf8(bytes)
                        .map_err(|_| Ended::Broken("text frame is not UTF-8".into()))?;
                    on_frame(Frame::Text(text))
                }
                (Some(Msg::Binary(bytes)), Protocol::Protobuf) => on_frame(Frame::Binary(bytes)),
                (Some(Msg::Binary(_)), Protocol::Json) => {
                    return Err(Ended::Broken("binary frame on a JSON connection".into()));
                }
                (Some(Msg::Text(_)), Protocol::Protobuf) => {
                    return Err(Ended::Broken("text frame on a Protobuf connection".into()));
                }
                (Some(other), _) => {
                    control(&mut self.out, &mut self.rng, &self.stream, other)?;
                    0
                }
            };
            let (opcode, pong): (u8, &[u8]) = match self.protocol {
                Protocol::Json => (ws::OP_TEXT, b"{}"),
                Protocol::Protobuf => (ws::OP_BINARY, protobuf::PONG),
            };
            for _ in 0..pings {
                let mask = self.rng.mask();
                ws::push_frame(&mut self.out, opcode, pong, mask);
            }
        }
    }

    /// Sends a normal close and waits for the server's close or EOF.
    pub async fn close(mut self) {
        let mask = self.rng.mask();
        ws::push_close(&mut self.out, ws::CLOSE_NORMAL, "", mask);
        if self.flush().await.is_err() {
            return;
        }
        while self.read().await.is_ok() {
            if self.handle(|_| 0).is_err() {
                return;
            }
            self.out.clear();
        }
    }
}
