//! One client connection: TCP from a chosen source address, the WebSocket
//! upgrade, `connect`, `subscribe`, and reading frames while answering pings.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{Context, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use crate::wire::{self, Line};

/// A node to connect to: its WebSocket URL and resolved address.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub url: String,
    pub addr: SocketAddr,
}

impl Endpoint {
    /// Resolves `ws://host:port/path` (port 80 when absent).
    pub async fn resolve(url: &str) -> anyhow::Result<Endpoint> {
        let rest = url
            .strip_prefix("ws://")
            .with_context(|| format!("{url}: only ws:// URLs are supported"))?;
        let authority = rest.split('/').next().unwrap_or(rest);
        let hostport =
            if authority.contains(':') { authority.to_string() } else { format!("{authority}:80") };
        let addr = tokio::net::lookup_host(&hostport)
            .await
            .with_context(|| format!("resolving {hostport}"))?
            .find(SocketAddr::is_ipv4)
            .with_context(|| format!("{hostport} has no IPv4 address"))?;
        Ok(Endpoint { url: url.to_string(), addr })
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
    pub ws: WebSocketStream<TcpStream>,
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

fn ws_config() -> WebSocketConfig {
    // Small buffers: a load generator holds tens of thousands of these.
    WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0)
}

impl Conn {
    /// TCP connect (from `source` when given), WebSocket upgrade, `connect`
    /// command and its reply.
    pub async fn open(
        ep: &Endpoint,
        source: Option<Ipv4Addr>,
        token: &str,
    ) -> anyhow::Result<Conn> {
        let socket = TcpSocket::new_v4().context("socket")?;
        if let Some(ip) = source {
            socket.bind(SocketAddr::new(ip.into(), 0)).with_context(|| format!("bind {ip}"))?;
        }
        let stream =
            socket.connect(ep.addr).await.with_context(|| format!("connect {}", ep.addr))?;
        stream.set_nodelay(true)?;
        let (ws, _) =
            tokio_tungstenite::client_async_with_config(ep.url.as_str(), stream, Some(ws_config()))
                .await
                .context("WebSocket upgrade")?;
        let mut conn = Conn { ws, next_id: 1 };
        let id = conn.next_id();
        conn.ws.send(Message::text(wire::connect(id, token))).await.context("sending connect")?;
        conn.await_replies(&[id]).await.context("connect")?;
        Ok(conn)
    }

    pub fn next_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        id
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
        self.ws.send(Message::text(frame)).await.context("sending subscribe")?;
        self.await_replies(&ids).await.context("subscribe")
    }

    /// Reads until every id in `ids` got a reply; an error reply fails.
    /// Pings are answered; anything else is dropped (nothing is published yet).
    async fn await_replies(&mut self, ids: &[u32]) -> anyhow::Result<()> {
        let mut left = ids.len();
        while left > 0 {
            let text = self.read_text().await.map_err(|e| anyhow!("{e}"))?;
            let mut pings = 0;
            for line in wire::lines(&text) {
                match line.context("undecodable reply")? {
                    Line::Ping => pings += 1,
                    Line::Message(m) if m.id != 0 && ids.contains(&m.id) => {
                        if let Some(e) = m.error {
                            bail!("error {} {}", e.code, e.message);
                        }
                        left -= 1;
                    }
                    Line::Message(m) => {
                        if let Some(d) = m.push.and_then(|p| p.disconnect) {
                            bail!("disconnect push {} {}", d.code, d.reason);
                        }
                    }
                }
            }
            self.pong(pings).await?;
        }
        Ok(())
    }

    /// Answers `n` server pings with `{}` each.
    pub async fn pong(&mut self, n: usize) -> anyhow::Result<()> {
        for _ in 0..n {
            self.ws.feed(Message::text("{}")).await.context("sending pong")?;
        }
        if n > 0 {
            self.ws.flush().await.context("sending pong")?;
        }
        Ok(())
    }

    /// The next text frame. WebSocket-level pings are answered by tungstenite.
    pub async fn read_text(&mut self) -> Result<Utf8Bytes, Ended> {
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Text(t))) => return Ok(t),
                Some(Ok(Message::Binary(_))) => {
                    return Err(Ended::Broken("binary frame on a JSON connection".into()));
                }
                Some(Ok(Message::Close(c))) => {
                    let (code, reason) =
                        c.map(|c| (u16::from(c.code), c.reason.to_string())).unwrap_or_default();
                    return Err(Ended::Closed { code, reason });
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(Ended::Broken(e.to_string())),
                None => return Err(Ended::Broken("stream ended".into())),
            }
        }
    }
}
