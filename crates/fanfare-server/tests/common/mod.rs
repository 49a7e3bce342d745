//! Shared helpers of the integration tests: start the real `fanfare` binary on
//! free loopback ports and drive it with a WebSocket client speaking the JSON
//! client protocol.
#![allow(dead_code)]

pub mod api;
pub mod outage;
pub mod redis;
pub mod redis_tls;
pub mod stream;
pub mod tls;

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::{self, Message};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_fanfare");

/// The binary [`Server`] starts: `FANFARE_TEST_BIN` when set (e.g. a release
/// build for measurements), else [`BIN`].
pub fn server_bin() -> String {
    std::env::var("FANFARE_TEST_BIN").unwrap_or_else(|_| BIN.to_string())
}

/// Resident set size of process `pid` in bytes (`VmRSS` in /proc/<pid>/status).
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status");
    kb * 1024
}

/// HMAC secret used by tests that enable token auth.
pub const SECRET: &str = "integration-test-secret";

/// Default time to wait for a message from the server.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// A loopback port that was free a moment ago (bind, read, drop), and that
/// this test process has not handed out before: tests run in parallel
/// threads, and the kernel may give a port just dropped to the next
/// `bind(0)`. Another process can still take it; [`Server::spawn`] notices
/// that (the node exits) and the callers retry.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
        let port = l.local_addr().expect("local addr").port();
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// The median of `v` (the upper one of an even count), for the benches'
/// figures; `None` when empty.
pub fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_secs()
}

/// Signs `claims` with HS256 and `secret`.
pub fn sign(secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("signing a token")
}

/// A connection token for `user`, signed with [`SECRET`], valid for 5 minutes.
pub fn user_token(user: &str) -> String {
    sign(SECRET, &json!({"sub": user, "exp": unix_now() + 300}))
}

/// `[auth]` of the broker tests: tokens signed with [`SECRET`], and anonymous
/// connects allowed (clients connecting with `""`).
pub fn auth_with_anonymous() -> String {
    format!("\n[auth]\nhmac_secret = \"{SECRET}\"\nallow_anonymous = true\n")
}

/// The node config most broker tests share (redis_*, delta, drain): the
/// [`auth_with_anonymous`] part and the default namespace open to client
/// publishing, with a history of `history_size` publications kept 300 s
/// (`None`: no history). Tests append their own `[[namespaces]]`.
pub fn open_namespaces(history_size: Option<u32>) -> String {
    let mut toml =
        format!("{}\n[[namespaces]]\nname = \"\"\nallow_publish = true\n", auth_with_anonymous());
    if let Some(n) = history_size {
        toml.push_str(&format!("history_size = {n}\nhistory_ttl = \"300s\"\n"));
    }
    toml
}

/// Minimal HTTP/1.0 GET over a plain TCP stream: `(status, body)`.
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:?}")))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// The value of an unlabelled counter or gauge in the Prometheus text at
/// `/metrics` (0 when absent).
pub fn metric(port: u16, name: &str) -> f64 {
    let Ok((200, body)) = http_get(port, "/metrics") else {
        return 0.0;
    };
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(' '))
        .filter(|(k, _)| *k == name)
        .filter_map(|(_, v)| v.trim().parse::<f64>().ok())
        .sum()
}

/// Runs `fanfare <args>` with an optional config and extra environment, waiting
/// for it to finish: `(status, stdout, stderr)`.
pub fn run_cli(args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_remove("FANFARE_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("running the fanfare binary");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A running `fanfare` process; killed (SIGKILL) when dropped.
pub struct Server {
    child: Option<Child>,
    /// The HTTP/WebSocket port.
    pub port: u16,
    /// The gRPC control API port (`grpc.listen`), 0 when the config sets none.
    pub grpc_port: u16,
    pub config_path: PathBuf,
    /// `auth.hmac_secret` when the config sets one (tokens are then needed
    /// unless anonymous access is allowed).
    pub secret: Option<String>,
    /// Set when the HTTP port speaks TLS ([`Server::start_tls`]): the client
    /// configuration [`Server::client`] connects with.
    pub tls: Option<std::sync::Arc<tokio_rustls::rustls::ClientConfig>>,
    dir: tempfile::TempDir,
}

/// Extracts the quoted value of `hmac_secret = "..."` from a TOML snippet.
fn find_secret(toml: &str) -> Option<String> {
    let rest = &toml[toml.find("hmac_secret")?..];
    let rest = &rest[rest.find('"')? + 1..];
    Some(rest[..rest.find('"')?].to_string())
}

/// The port of `listen = "127.0.0.1:PORT"` in the `[grpc]` section of a config.
fn grpc_port_of(config: &str) -> u16 {
    let Some(section) = config.split("[grpc]").nth(1) else { return 0 };
    let Some(line) = section.lines().find(|l| l.trim_start().starts_with("listen")) else {
        return 0;
    };
    line.trim().trim_end_matches('"').rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or(0)
}

impl Server {
    /// Starts a node on free ports with `toml_extra` appended to the config
    /// (anything but `[http]` and `[grpc]`). A namespace `health` (publish
    /// allowed) is added for [`assert_healthy`] unless the extra defines it.
    pub fn start(toml_extra: &str) -> Server {
        Self::start_with_env(toml_extra, &[])
    }

    /// Like [`Server::start`] with TLS on the HTTP port: `http_toml` goes into
    /// the `[http]` section (`tls_cert`, `tls_key`), `grpc_toml` into
    /// `[grpc]`, and clients made with [`Server::client`] connect over TLS
    /// with `client`.
    pub fn start_tls(
        http_toml: &str,
        grpc_toml: &str,
        toml_extra: &str,
        client: std::sync::Arc<tokio_rustls::rustls::ClientConfig>,
    ) -> Server {
        let mut s = Self::start_with((http_toml, grpc_toml), toml_extra, &[]);
        s.tls = Some(client);
        s
    }

    /// Like [`Server::start`] with extra environment variables for the process.
    pub fn start_with_env(toml_extra: &str, env: &[(&str, &str)]) -> Server {
        Self::start_with(("", ""), toml_extra, env)
    }

    fn start_with(
        (http_toml, grpc_toml): (&str, &str),
        toml_extra: &str,
        env: &[(&str, &str)],
    ) -> Server {
        let mut last_log = String::new();
        // A port picked free can be taken before the node binds it: retry.
        for _ in 0..3 {
            let port = free_port();
            let grpc = free_port();
            let mut config = format!(
                "[http]\nlisten = \"127.0.0.1:{port}\"\n{http_toml}\n\n[grpc]\nlisten = \"127.0.0.1:{grpc}\"\n{grpc_toml}\n\n{toml_extra}\n"
            );
            if !toml_extra.contains("name = \"health\"") {
                config.push_str(
                    "\n[[namespaces]]\nname = \"health\"\nallow_publish = true\nallow_subscribe = true\n",
                );
            }
            match Self::spawn(&config, port, env) {
                Ok(mut s) => {
                    s.secret = find_secret(toml_extra);
                    return s;
                }
                Err(log) => last_log = log,
            }
        }
        panic!("fanfare did not start; last log:\n{last_log}");
    }

    /// Writes `config` to a temp file, starts the binary with it and waits until
    /// `GET /health` on `port` answers 200. `Err` carries the process log when
    /// the process exited early.
    pub fn spawn(config: &str, port: u16, env: &[(&str, &str)]) -> Result<Server, String> {
        let dir = tempfile::tempdir().expect("creating a temp dir");
        let config_path = dir.path().join("fanfare.toml");
        std::fs::write(&config_path, config).expect("writing the config");
        let log_path = dir.path().join("fanfare.log");
        let log = std::fs::File::create(&log_path).expect("creating the log file");
        let mut cmd = Command::new(server_bin());
        cmd.arg("--config")
            .arg(&config_path)
            .env_remove("FANFARE_CONFIG")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cloning a file handle"))
            .stderr(log);
        // Tests stop nodes with SIGTERM and expect them gone at once: no
        // drain delay or period unless the test sets them (tests/drain.rs).
        for (key, var) in [
            ("drain_delay", "FANFARE__SHUTDOWN__DRAIN_DELAY"),
            ("drain_period", "FANFARE__SHUTDOWN__DRAIN_PERIOD"),
        ] {
            if !config.contains(key) {
                cmd.env(var, "0s");
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawning fanfare");
        let grpc_port = grpc_port_of(config);
        let mut server = Server {
            child: Some(child),
            port,
            grpc_port,
            config_path,
            secret: None,
            tls: None,
            dir,
        };
        // Ready once this process logged that it holds both ports: a
        // `/health` answer alone may come from another test's node that took
        // the port first (this node then exits with "Address already in use",
        // and the caller retries on new ports). A TLS port cannot answer the
        // cleartext probe; the log line is enough there.
        let tls = config.split("[grpc]").next().is_some_and(|http| http.contains("tls_cert"));
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let ready = server.log().contains("control API listening")
                && (tls || matches!(http_get(port, "/health"), Ok((200, _))));
            if ready {
                return Ok(server);
            }
            let child = server.child.as_mut().expect("child present");
            if let Some(status) = child.try_wait().expect("polling the child") {
                let log = server.log();
                server.child = None;
                return Err(format!("exited with {status}:\n{log}"));
            }
            if Instant::now() > deadline {
                panic!("fanfare did not answer /health within 15 s; log:\n{}", server.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything the process logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("fanfare.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server is running").id()
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/connection/websocket", self.port)
    }

    /// Sends SIGTERM to the process (by PID) without waiting.
    pub fn send_sigterm(&self) {
        self.signal("TERM");
    }

    /// Sends signal `name` (`TERM`, `STOP`, `CONT`, ...) to the process by PID.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{name} failed: {status}");
    }

    /// Waits (bounded) for the process to exit and returns its status.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        let child = self.child.as_mut().expect("server is running");
        loop {
            if let Some(status) = child.try_wait().expect("polling the child") {
                self.child = None;
                return status;
            }
            if Instant::now() > deadline {
                panic!("fanfare did not exit within {within:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then wait (up to 15 s) for the exit status.
    pub fn sigterm(&mut self) -> ExitStatus {
        self.send_sigterm();
        self.wait_exit(Duration::from_secs(15))
    }

    /// A token for `user` when the node checks tokens, else "" (anonymous).
    pub fn token_for(&self, user: &str) -> String {
        match &self.secret {
            Some(secret) => sign(secret, &json!({"sub": user, "exp": unix_now() + 300})),
            None => String::new(),
        }
    }

    /// A fresh WebSocket connection (over TLS when the node's HTTP port
    /// speaks it), not yet `connect`ed.
    pub async fn client(&self) -> Client {
        match &self.tls {
            None => Client::open(self.port).await,
            Some(config) => Client::open_tls(config.clone(), self.port).await,
        }
    }

    /// A fresh connection that sent `connect` with `token` and got a
    /// successful reply.
    pub async fn connected_with_token(&self, token: &str) -> Client {
        let mut c = self.client().await;
        c.connect_ok(token).await;
        c
    }

    /// Sends SIGHUP to the process (by PID): reload the TLS certificates.
    pub fn send_sighup(&self) {
        let status = Command::new("kill")
            .arg("-HUP")
            .arg(self.pid().to_string())
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -HUP failed: {status}");
    }

    /// A fresh connection that sent `connect` as `user` (anonymous when the
    /// node has no secret) and got a successful reply.
    pub async fn connected(&self, user: &str) -> Client {
        let mut c = self.client().await;
        c.connect_ok(&self.token_for(user)).await;
        c
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            let log = self.log();
            let tail: String = log
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            eprintln!("---- fanfare log (last 40 lines) ----\n{tail}\n----");
        }
    }
}

static HEALTH_SEQ: AtomicU32 = AtomicU32::new(1);

/// Proves the node still serves well-behaved clients: two fresh connections,
/// one subscribes, the other publishes, the first receives it.
pub async fn assert_healthy(server: &Server) {
    let n = HEALTH_SEQ.fetch_add(1, Ordering::Relaxed);
    let channel = format!("health:{n}");
    let mut sub = server.connected("healthy-sub").await;
    let mut publisher = server.connected("healthy-pub").await;
    let r = sub.subscribe(&channel, json!({})).await;
    assert!(r.get("subscribe").is_some(), "health subscribe failed: {r}");
    let r = publisher.publish(&channel, json!({"healthy": n})).await;
    assert!(r.get("publish").is_some(), "health publish failed: {r}");
    let push = sub.recv_push().await;
    assert_eq!(push["push"]["channel"], channel.as_str(), "{push}");
    assert_eq!(push["push"]["pub"]["data"], json!({"healthy": n}), "{push}");
    sub.close().await;
    publisher.close().await;
}

/// The socket under a test [`Client`]: plain TCP, or TLS over it.
pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl tokio::io::AsyncRead for ClientStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for ClientStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => std::pin::Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => std::pin::Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// How reading from the server ended, when it did not yield a message.
#[derive(Debug)]
pub enum ReadEnd {
    Timeout,
    Closed(u16, String),
    /// The stream ended without a close frame, or failed.
    Broken(String),
}

/// A WebSocket client speaking the JSON protocol. Server pings (`{}`) are
/// counted and, when `auto_pong` is set (the default), answered with `{}`;
/// they never show up in [`Client::recv_json`].
pub struct Client {
    ws: WebSocketStream<ClientStream>,
    buf: VecDeque<Value>,
    next_id: u32,
    pub auto_pong: bool,
    pub pings: usize,
    pub timeout: Duration,
    /// The client id from the connect reply.
    pub client_id: String,
    /// Payload bytes of every text frame received so far (pings included):
    /// what the server put on the wire for this client, less frame headers.
    pub bytes_received: usize,
}

impl Client {
    /// Opens a WebSocket connection to the node on `port`.
    pub async fn open(port: u16) -> Client {
        Self::try_open(port, None, None).await.expect("WebSocket handshake")
    }

    /// Opens a connection whose socket has a small receive buffer, so that a
    /// client that stops reading pushes back on the server quickly.
    pub async fn open_small_rcvbuf(port: u16, rcvbuf: u32) -> Client {
        Self::try_open(port, None, Some(rcvbuf)).await.expect("WebSocket handshake")
    }

    /// Opens a connection, optionally with an `Origin` header and a receive
    /// buffer size; the handshake error is returned as is.
    pub async fn try_open(
        port: u16,
        origin: Option<&str>,
        rcvbuf: Option<u32>,
    ) -> Result<Client, tungstenite::Error> {
        let origin: Vec<(&str, &str)> = origin.map(|o| ("Origin", o)).into_iter().collect();
        Self::try_open_with(port, &origin, rcvbuf).await
    }

    /// Opens a connection from the loopback address `source` (127.0.0.2 to
    /// 127.0.0.254 work without setup on Linux) with `headers`; a refused
    /// handshake comes back as `Err(status)`.
    pub async fn open_from(
        port: u16,
        source: std::net::Ipv4Addr,
        headers: &[(&str, &str)],
    ) -> Result<Client, u16> {
        match Self::open_inner(port, headers, None, Some(source)).await {
            Ok(c) => Ok(c),
            Err(tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
            Err(e) => panic!("WebSocket handshake from {source}: {e}"),
        }
    }

    /// The status a WebSocket handshake is answered with when it is refused
    /// (`Ok` when it is accepted).
    pub async fn try_open_status(port: u16) -> Result<Client, u16> {
        Self::open_from(port, std::net::Ipv4Addr::LOCALHOST, &[]).await
    }

    /// Opens a connection whose handshake request carries `headers` (a
    /// browser's cookies, say).
    pub async fn open_with_headers(port: u16, headers: &[(&str, &str)]) -> Client {
        Self::try_open_with(port, headers, None).await.expect("WebSocket handshake")
    }

    async fn try_open_with(
        port: u16,
        headers: &[(&str, &str)],
        rcvbuf: Option<u32>,
    ) -> Result<Client, tungstenite::Error> {
        Self::open_inner(port, headers, rcvbuf, None).await
    }

    async fn open_inner(
        port: u16,
        headers: &[(&str, &str)],
        rcvbuf: Option<u32>,
        source: Option<std::net::Ipv4Addr>,
    ) -> Result<Client, tungstenite::Error> {
        let url = format!("ws://127.0.0.1:{port}/connection/websocket");
        let mut req = url.into_client_request()?;
        for (name, value) in headers {
            let name = http::HeaderName::from_bytes(name.as_bytes()).expect("header name");
            req.headers_mut().append(name, HeaderValue::from_str(value).expect("header value"));
        }
        let socket = TcpSocket::new_v4()?;
        if let Some(size) = rcvbuf {
            socket.set_recv_buffer_size(size)?;
        }
        if let Some(ip) = source {
            socket.bind((ip, 0).into())?;
        }
        let stream = socket.connect(([127, 0, 0, 1], port).into()).await?;
        stream.set_nodelay(true)?;
        Self::handshake(req, ClientStream::Plain(stream)).await
    }

    /// Opens a connection over TLS (`wss://`), verifying the node's
    /// certificate with `config`.
    pub async fn open_tls(
        config: std::sync::Arc<tokio_rustls::rustls::ClientConfig>,
        port: u16,
    ) -> Client {
        let tls = tls::connect(config, port).await.expect("TLS handshake");
        let req = format!("wss://localhost:{port}/connection/websocket")
            .into_client_request()
            .expect("a request");
        Self::handshake(req, ClientStream::Tls(Box::new(tls))).await.expect("WebSocket handshake")
    }

    async fn handshake(
        req: tungstenite::handshake::client::Request,
        stream: ClientStream,
    ) -> Result<Client, tungstenite::Error> {
        let (ws, _resp) = tokio_tungstenite::client_async(req, stream).await?;
        Ok(Client {
            ws,
            buf: VecDeque::new(),
            next_id: 1,
            auto_pong: true,
            pings: 0,
            timeout: TIMEOUT,
            client_id: String::new(),
            bytes_received: 0,
        })
    }

    /// The id for the next command (ids start at 1 and increase).
    pub fn next_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.expect("sending a text frame");
    }

    pub async fn send_binary(&mut self, data: &[u8]) {
        self.ws.send(Message::binary(data.to_vec())).await.expect("sending a binary frame");
    }

    /// Sends a text frame whose payload is not checked for UTF-8.
    pub async fn send_raw_text(&mut self, payload: &[u8]) {
        let frame = Frame::message(payload.to_vec(), OpCode::Data(Data::Text), true);
        self.ws.send(Message::Frame(frame)).await.expect("sending a raw text frame");
    }

    pub async fn send_json(&mut self, v: &Value) {
        self.send_text(&v.to_string()).await;
    }

    /// Reads one WebSocket message and buffers the JSON objects it carries.
    async fn fill(&mut self, deadline: Instant) -> Result<(), ReadEnd> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = match tokio::time::timeout(left, self.ws.next()).await {
                Err(_) => return Err(ReadEnd::Timeout),
                Ok(None) => return Err(ReadEnd::Broken("stream ended".into())),
                Ok(Some(Err(e))) => return Err(ReadEnd::Broken(e.to_string())),
                Ok(Some(Ok(m))) => m,
            };
            match msg {
                Message::Text(text) => {
                    self.bytes_received += text.len();
                    let mut pings = 0;
                    let mut added = false;
                    for item in serde_json::Deserializer::from_str(&text).into_iter::<Value>() {
                        let v =
                            item.unwrap_or_else(|e| panic!("bad JSON from server: {e}: {text}"));
                        if v.as_object().is_some_and(|o| o.is_empty()) {
                            pings += 1;
                        } else {
                            self.buf.push_back(v);
                            added = true;
                        }
                    }
                    self.pings += pings;
                    if self.auto_pong {
                        for _ in 0..pings {
                            // The pong may race with a close; ignore send errors.
                            let _ = self.ws.send(Message::text("{}")).await;
                        }
                    }
                    if added {
                        return Ok(());
                    }
                }
                Message::Close(frame) => {
                    return Err(match frame {
                        Some(f) => ReadEnd::Closed(f.code.into(), f.reason.to_string()),
                        None => ReadEnd::Closed(1005, String::new()),
                    });
                }
                Message::Binary(b) => panic!("binary frame from a JSON server: {b:?}"),
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            }
        }
    }

    fn fail(&self, what: &str, end: ReadEnd) -> ! {
        panic!("{what}: {end:?}; buffered: {:?}", self.buf)
    }

    /// The next JSON object from the server (reply or push), waiting up to
    /// `self.timeout`.
    pub async fn recv_json(&mut self) -> Value {
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(v) = self.buf.pop_front() {
                return v;
            }
            if let Err(e) = self.fill(deadline).await {
                self.fail("waiting for a message", e);
            }
        }
    }

    /// The next JSON object, or how reading ended within `within`.
    pub async fn try_recv_json(&mut self, within: Duration) -> Result<Value, ReadEnd> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(v) = self.buf.pop_front() {
                return Ok(v);
            }
            self.fill(deadline).await?;
        }
    }

    /// Takes the first buffered or arriving object matching `pred`; others stay
    /// buffered in order.
    pub async fn recv_matching(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + self.timeout;
        let mut scanned = 0;
        loop {
            if let Some(i) = self.buf.iter().skip(scanned).position(&pred) {
                return self.buf.remove(scanned + i).expect("index in range");
            }
            scanned = self.buf.len();
            if let Err(e) = self.fill(deadline).await {
                self.fail(&format!("waiting for {what}"), e);
            }
        }
    }

    /// The objects of the next WebSocket message carrying any (pings aside):
    /// shows how the server grouped its messages into frames.
    pub async fn recv_frame(&mut self) -> Vec<Value> {
        assert!(self.buf.is_empty(), "messages already buffered: {:?}", self.buf);
        let deadline = Instant::now() + self.timeout;
        if let Err(e) = self.fill(deadline).await {
            self.fail("waiting for a frame", e);
        }
        self.buf.drain(..).collect()
    }

    /// The reply to command `id` (pushes that arrive meanwhile stay buffered).
    pub async fn reply(&mut self, id: u32) -> Value {
        self.recv_matching(&format!("the reply to command {id}"), |v| {
            v.get("id").and_then(Value::as_u64) == Some(id.into())
        })
        .await
    }

    /// The next push (replies that arrive meanwhile stay buffered).
    pub async fn recv_push(&mut self) -> Value {
        self.recv_matching("a push", |v| v.get("push").is_some()).await
    }

    /// Asserts that nothing but pings arrives within `within`.
    pub async fn assert_silent(&mut self, within: Duration) {
        if let Some(v) = self.buf.front() {
            panic!("unexpected buffered message: {v}");
        }
        match self.try_recv_json(within).await {
            Err(ReadEnd::Timeout) => {}
            Ok(v) => panic!("unexpected message: {v}"),
            Err(e) => panic!("connection ended while expecting silence: {e:?}"),
        }
    }

    /// Reads (answering pings per `auto_pong`) for `dur`, buffering messages;
    /// panics when the connection ends.
    pub async fn idle(&mut self, dur: Duration) {
        let deadline = Instant::now() + dur;
        loop {
            match self.fill(deadline).await {
                Ok(()) => {}
                Err(ReadEnd::Timeout) => return,
                Err(e) => self.fail("connection ended while idling", e),
            }
        }
    }

    /// Sends `{"id":N, ...body}` and returns the reply with that id.
    pub async fn command(&mut self, body: Value) -> Value {
        let id = self.next_id();
        let mut cmd = serde_json::Map::new();
        cmd.insert("id".into(), id.into());
        cmd.extend(body.as_object().expect("command body is an object").clone());
        self.send_json(&Value::Object(cmd)).await;
        self.reply(id).await
    }

    /// Sends `connect` (with `token` unless empty); returns the whole reply.
    pub async fn connect(&mut self, token: &str) -> Value {
        let req = if token.is_empty() { json!({}) } else { json!({"token": token}) };
        self.connect_with(req).await
    }

    /// Sends `connect` with the given request object; returns the whole reply.
    pub async fn connect_with(&mut self, req: Value) -> Value {
        let r = self.command(json!({"connect": req})).await;
        if let Some(c) = r["connect"]["client"].as_str() {
            self.client_id = c.to_string();
        }
        r
    }

    /// `connect` that must succeed; returns the connect result.
    pub async fn connect_ok(&mut self, token: &str) -> Value {
        let r = self.connect(token).await;
        assert!(r.get("connect").is_some(), "connect failed: {r}");
        r["connect"].clone()
    }

    /// `subscribe` to `channel` with extra request fields; returns the reply.
    pub async fn subscribe(&mut self, channel: &str, extra: Value) -> Value {
        let mut req = extra.as_object().cloned().unwrap_or_default();
        req.insert("channel".into(), channel.into());
        self.command(json!({"subscribe": req})).await
    }

    /// `subscribe` that must succeed; returns the subscribe result.
    pub async fn subscribe_ok(&mut self, channel: &str, extra: Value) -> Value {
        let r = self.subscribe(channel, extra).await;
        assert!(r.get("subscribe").is_some(), "subscribe {channel} failed: {r}");
        r["subscribe"].clone()
    }

    pub async fn unsubscribe(&mut self, channel: &str) -> Value {
        self.command(json!({"unsubscribe": {"channel": channel}})).await
    }

    pub async fn publish(&mut self, channel: &str, data: Value) -> Value {
        self.command(json!({"publish": {"channel": channel, "data": data}})).await
    }

    pub async fn presence(&mut self, channel: &str) -> Value {
        self.command(json!({"presence": {"channel": channel}})).await
    }

    pub async fn presence_stats(&mut self, channel: &str) -> Value {
        self.command(json!({"presence_stats": {"channel": channel}})).await
    }

    /// `presence_stats` of `channel`, asked again every 20 ms until its
    /// result is `want` or `deadline` passed: the last reply. For changes
    /// the node makes shortly after an event (a close seen, a Redis write).
    pub async fn presence_stats_until(
        &mut self,
        channel: &str,
        want: &Value,
        deadline: Instant,
    ) -> Value {
        loop {
            let r = self.presence_stats(channel).await;
            if r["presence_stats"] == *want || Instant::now() >= deadline {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `history` of `channel` with extra request fields; returns the reply.
    pub async fn history(&mut self, channel: &str, extra: Value) -> Value {
        let mut req = extra.as_object().cloned().unwrap_or_default();
        req.insert("channel".into(), channel.into());
        self.command(json!({"history": req})).await
    }

    /// Waits (up to `self.timeout`) for the server's close frame, discarding
    /// messages before it: `(code, reason)`.
    pub async fn expect_close(&mut self) -> (u16, String) {
        self.expect_close_within(self.timeout).await
    }

    pub async fn expect_close_within(&mut self, within: Duration) -> (u16, String) {
        let deadline = Instant::now() + within;
        loop {
            self.buf.clear();
            match self.fill(deadline).await {
                Ok(()) => {}
                Err(ReadEnd::Closed(code, reason)) => return (code, reason),
                Err(e) => panic!("expected a close frame, got {e:?}"),
            }
        }
    }

    /// Closes the connection from the client side (normal closure).
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }
}

/// Asserts that `reply` is an error reply with `code`.
#[track_caller]
pub fn assert_error(reply: &Value, code: u64) {
    assert_eq!(reply["error"]["code"].as_u64(), Some(code), "expected error {code}, got {reply}");
    assert!(
        reply["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error without message: {reply}"
    );
}

static BYSTANDER_SEQ: AtomicU32 = AtomicU32::new(1);

/// A well-behaved client that is connected and subscribed before a test
/// misbehaves, and must still work afterwards.
pub struct Bystander {
    pub client: Client,
    channel: String,
    n: u64,
}

impl Bystander {
    pub async fn join(server: &Server) -> Bystander {
        let channel = format!("health:bystander-{}", BYSTANDER_SEQ.fetch_add(1, Ordering::Relaxed));
        let mut client = server.connected("bystander").await;
        client.subscribe_ok(&channel, json!({})).await;
        Bystander { client, channel, n: 0 }
    }

    /// Publishes into its own channel and receives the publication.
    pub async fn check(&mut self) {
        self.n += 1;
        let data = json!({"bystander": self.n});
        let r = self.client.publish(&self.channel, data.clone()).await;
        assert!(r.get("publish").is_some(), "bystander publish failed: {r}");
        let push = self.client.recv_push().await;
        assert_eq!(push["push"]["channel"], self.channel.as_str(), "{push}");
        assert_eq!(push["push"]["pub"]["data"], data, "{push}");
    }
}

/// The bystander still works and fresh clients still work.
pub async fn assert_survived(server: &Server, bystander: &mut Bystander) {
    bystander.check().await;
    assert_healthy(server).await;
}

/// Publishes three publications into `channel` (history on, client publishing
/// allowed) and checks that a position beyond the stream's top in its current
/// epoch is answered with no publications and the current position: by
/// `POST /api/history` (forward and reverse), and by a recovering subscribe,
/// which is not recovered (a client cannot be ahead of the stream).
pub async fn assert_history_past_the_top_is_empty(server: &Server, channel: &str) {
    let mut p = server.connected("past-top-publisher").await;
    for n in 1..=3 {
        let r = p.publish(channel, json!({"n": n})).await;
        assert!(r.get("publish").is_some(), "{r}");
    }
    let history = |body: Value| {
        let r = api::http_api_with(server, "history", &[], &body);
        assert_eq!(r.status, 200, "{body}: {:?}", String::from_utf8_lossy(&r.body));
        r.json()
    };
    let r = history(json!({"channel": channel}));
    let epoch = r["epoch"].as_str().expect("epoch").to_string();
    assert_eq!(r["offset"], 3, "{r}");
    for reverse in [false, true] {
        let r = history(json!({
            "channel": channel, "limit": -1, "since_offset": 999_999, "epoch": epoch,
            "reverse": reverse,
        }));
        assert_eq!(r["publications"], json!([]), "reverse {reverse}: {r}");
        assert_eq!((r["offset"].as_u64(), r["epoch"].as_str()), (Some(3), Some(epoch.as_str())));
    }
    let mut c = server.connected("past-top-reader").await;
    let sub =
        c.subscribe_ok(channel, json!({"recover": true, "epoch": epoch, "offset": 999_999})).await;
    assert!(sub.get("recovered").is_none() || sub["recovered"] == false, "{sub}");
    assert_eq!(sub["was_recovering"], true, "{sub}");
    assert!(sub.get("publications").is_none(), "{sub}");
    assert_eq!((sub["offset"].as_u64(), sub["epoch"].as_str()), (Some(3), Some(epoch.as_str())));
    // Still live from the current position.
    p.publish(channel, json!({"n": 4})).await;
    let push = c.recv_push().await;
    assert_eq!(push["push"]["pub"]["offset"], 4, "{push}");
    p.close().await;
    c.close().await;
}
