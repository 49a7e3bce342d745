//! One client connection: TCP from a chosen source address, the WebSocket
//! upgrade, `connect`, `subscribe`, and reading frames while answering pings.
//! The WebSocket framing is our own (`ws.rs`): one read buffer per connection
//! that yields every complete message of a read without copying, and one
//! write buffer that sends everything queued in one `write`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{Context, anyhow, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::wire::{self, Line};
use crate::ws::{self, Decoder, Msg, Rng};

/// A node to connect to: its resolved address and the upgrade request (all
/// but the key), built once.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    request_head: Vec<u8>,
}

impl Endpoint {
    /// Resolves `ws://host:port/path` (port 80 when absent).
    pub async fn resolve(url: &str) -> anyhow::Result<Endpoint> {
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
        Ok(Endpoint { addr, request_head: ws::request_head(&path, authority) })
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
    dec: Decoder,
    /// Frames queued for the next [`Conn::flush`].
    out: Vec<u8>,
    rng: Rng,
    next_id: u32,
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
    /// `connect` command `connect_cmd` (which must use id 1) and its reply.
    pub async fn open(
        ep: &Endpoint,
        source: Option<Ipv4Addr>,
        connect_cmd: &str,
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
        let mut conn =
            Conn { stream, dec: Decoder::with_capacity(1024), out: Vec::new(), rng, next_id: 1 };
        ws::push_request(&mut conn.out, &ep.request_head, &key);
        conn.flush().await.context("WebSocket upgrade")?;
        loop {
            if conn.stream.read_buf(conn.dec.read_buf()).await.context("WebSocket upgrade")? == 0 {
                bail!("WebSocket upgrade: connection closed before the response");
            }
            if let Some(n) = ws::parse_response(conn.dec.unread(), &key)
                .map_err(|e| anyhow!("WebSocket upgrade: {e}"))?
            {
                conn.dec.consume(n);
                break;
            }
        }
        let id = conn.next_id();
        debug_assert_eq!(id, 1);
        conn.send_text(connect_cmd);
        conn.flush().await.context("sending connect")?;
        conn.await_replies(&[id]).await.context("connect")?;
        Ok(conn)
    }

    pub fn next_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Queues one text frame.
    pub fn send_text(&mut self, text: &str) {
        let mask = self.rng.mask();
        ws::push_frame(&mut self.out, ws::OP_TEXT, text.as_bytes(), mask);
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
        let mut frame = String::new();
        let mut ids = Vec::with_capacity(channels.len());
        for ch in channels {
            let id = self.next_id();
            wire::subscribe(&mut frame, id, ch);
            ids.push(id);
        }
        self.send_text(&frame);
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
            self.handle(|text| {
                let mut pings = 0;
                for line in wire::lines(text) {
                    match line {
                        Err(e) => {
                            failed.get_or_insert(anyhow!("undecodable reply: {e}"));
                        }
                        Ok(Line::Ping) => pings += 1,
                        Ok(Line::Message(m)) if m.id != 0 && ids.contains(&m.id) => {
                            if let Some(e) = m.error {
                                failed.get_or_insert(anyhow!("error {} {}", e.code, e.message));
                            }
                            left -= 1;
                        }
                        Ok(Line::Message(m)) => {
                            if let Some(d) = m.push.and_then(|p| p.disconnect) {
                                failed.get_or_insert(anyhow!(
                                    "disconnect push {} {}",
                                    d.code,
                                    d.reason
                                ));
                            }
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

    /// Hands every complete text message read so far to `on_text`, which
    /// returns how many server pings (`{}`) it held; queues a `{}` for each
    /// and a pong for each WebSocket ping. Call [`Conn::flush`] afterwards.
    pub fn handle(&mut self, mut on_text: impl FnMut(&str) -> usize) -> Result<(), Ended> {
        loop {
            let msg = self.dec.next_msg().map_err(|e| Ended::Broken(e.to_string()))?;
            match msg {
                None => return Ok(()),
                Some(Msg::Text(bytes)) => {
                    let text = std::str::from_utf8(bytes)
                        .map_err(|_| Ended::Broken("text frame is not UTF-8".into()))?;
                    for _ in 0..on_text(text) {
                        let mask = self.rng.mask();
                        ws::push_frame(&mut self.out, ws::OP_TEXT, b"{}", mask);
                    }
                }
                Some(Msg::Binary(_)) => {
                    return Err(Ended::Broken("binary frame on a JSON connection".into()));
                }
                Some(Msg::Ping(payload)) => {
                    let mask = self.rng.mask();
                    ws::push_frame(&mut self.out, ws::OP_PONG, payload, mask);
                }
                Some(Msg::Pong) => {}
                Some(Msg::Close(code, reason)) => {
                    // Echo the close (best effort: we stop reading now).
                    let mask = self.rng.mask();
                    match code {
                        Some(c) => ws::push_close(&mut self.out, c, "", mask),
                        None => ws::push_frame(&mut self.out, ws::OP_CLOSE, b"", mask),
                    }
                    let _ = self.stream.try_write(&self.out);
                    self.out.clear();
                    // A close frame without a code is 1005 "no status
                    // received" (RFC 6455 7.1.5), as browsers report it.
                    return Err(Ended::Closed {
                        code: code.unwrap_or(1005),
                        reason: reason.to_string(),
                    });
                }
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
