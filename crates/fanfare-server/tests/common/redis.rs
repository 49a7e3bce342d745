//! Real `redis-server` processes for the Redis broker tests: a standalone server
//! on a free loopback port (that can be killed and restarted on the same port),
//! and a Redis Cluster made with `redis-cli --cluster create`: masters only, or
//! with a replica each (AOF on) for failover tests. Every process is started by
//! the test, stopped by its PID on drop, and every wait is bounded.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::free_port;

/// A RESP2 reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Resp>>),
}

impl Resp {
    /// The reply as text (simple or bulk string), else panics.
    pub fn text(&self) -> String {
        match self {
            Resp::Simple(s) => s.clone(),
            Resp::Bulk(Some(b)) => String::from_utf8_lossy(b).into_owned(),
            Resp::Int(i) => i.to_string(),
            other => panic!("expected a string reply, got {other:?}"),
        }
    }

    pub fn int(&self) -> i64 {
        match self {
            Resp::Int(i) => *i,
            other => panic!("expected an integer reply, got {other:?}"),
        }
    }

    /// The elements of an array reply, each as text.
    pub fn texts(&self) -> Vec<String> {
        match self {
            Resp::Array(Some(items)) => items.iter().map(Resp::text).collect(),
            other => panic!("expected an array reply, got {other:?}"),
        }
    }
}

fn read_line(r: &mut impl BufRead) -> std::io::Result<String> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "redis closed"));
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

fn parse_len(s: &str) -> std::io::Result<i64> {
    s.parse().map_err(|_| std::io::Error::other(format!("bad RESP length {s:?}")))
}

fn read_resp(r: &mut impl BufRead) -> std::io::Result<Resp> {
    let line = read_line(r)?;
    let (kind, rest) = line.split_at(1.min(line.len()));
    Ok(match kind {
        "+" => Resp::Simple(rest.to_string()),
        "-" => Resp::Error(rest.to_string()),
        ":" => Resp::Int(parse_len(rest)?),
        "$" => {
            let n = parse_len(rest)?;
            if n < 0 {
                Resp::Bulk(None)
            } else {
                let mut buf = vec![0; n as usize + 2];
                r.read_exact(&mut buf)?;
                buf.truncate(n as usize);
                Resp::Bulk(Some(buf))
            }
        }
        "*" => {
            let n = parse_len(rest)?;
            if n < 0 {
                Resp::Array(None)
            } else {
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(read_resp(r)?);
                }
                Resp::Array(Some(items))
            }
        }
        _ => return Err(std::io::Error::other(format!("bad RESP line {line:?}"))),
    })
}

/// Sends one command to the Redis on `port` over a fresh connection.
/// The PID of the Redis answering on loopback `port` (`INFO server`). A
/// launcher waits for its own child's PID there: a PONG alone may come from
/// another test's server that took the port first.
pub fn redis_pid(port: u16) -> Option<u32> {
    match redis_cmd(port, &["INFO", "server"]) {
        Ok(Resp::Bulk(Some(info))) => pid_in_info(&String::from_utf8_lossy(&info)),
        _ => None,
    }
}

/// `process_id` of an `INFO server` answer.
pub fn pid_in_info(info: &str) -> Option<u32> {
    info.lines().find_map(|l| l.strip_prefix("process_id:")).and_then(|v| v.trim().parse().ok())
}

pub fn redis_cmd(port: u16, args: &[&str]) -> std::io::Result<Resp> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    (&s).write_all(&out)?;
    read_resp(&mut BufReader::new(&s))
}

/// `calls` per command from `INFO commandstats` text, e.g. `"subscribe" -> 3`.
pub fn parse_commandstats(info: &str) -> BTreeMap<String, u64> {
    info.lines()
        .filter_map(|l| l.strip_prefix("cmdstat_"))
        .filter_map(|l| {
            let (name, fields) = l.split_once(':')?;
            let calls = fields.split(',').find_map(|f| f.strip_prefix("calls="))?;
            Some((name.to_string(), calls.parse().ok()?))
        })
        .collect()
}

/// A `redis-server` child process on a loopback port; SIGKILLed (by PID) on drop.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    args: Vec<String>,
    dir: Arc<tempfile::TempDir>,
}

impl RedisServer {
    /// A throw-away server: no RDB snapshots, no AOF.
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// A server with extra command-line options (`--name value` pairs).
    pub fn start_with(extra: &[&str]) -> RedisServer {
        let dir = Arc::new(tempfile::tempdir().expect("creating a temp dir for redis"));
        Self::start_in(dir, extra, |_| Vec::new())
    }

    /// Starts in `dir`; `per_port` adds options that depend on the chosen port.
    fn start_in(
        dir: Arc<tempfile::TempDir>,
        extra: &[&str],
        per_port: impl Fn(u16) -> Vec<String>,
    ) -> RedisServer {
        let mut last = String::new();
        // A port picked free can be taken before redis binds it: retry.
        for _ in 0..5 {
            let port = free_port();
            let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
            args.extend(per_port(port));
            let mut r = RedisServer { child: None, port, args, dir: dir.clone() };
            match r.spawn() {
                Ok(()) => return r,
                Err(e) => last = e,
            }
        }
        panic!("redis-server did not start: {last}");
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("redis-{}.log", self.port))
    }

    /// Starts the process with this server's port, directory and options and
    /// waits (up to 10 s) until the server on the port is this process.
    fn spawn(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "redis-server already running");
        let mut cmd = Command::new("redis-server");
        cmd.arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--protected-mode", "no", "--save", ""])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.log_path())
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().map_err(|e| {
            format!("cannot run redis-server ({e}); scripts/test.sh installs it (apt redis-server)")
        })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pid = self.child.as_ref().map(Child::id);
            if pid.is_some() && redis_pid(self.port) == pid {
                return Ok(());
            }
            let child = self.child.as_mut().expect("child present");
            if let Some(status) = child.try_wait().expect("polling redis-server") {
                self.child = None;
                return Err(format!("redis-server exited with {status}:\n{}", self.log()));
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(format!("redis-server did not answer PING in 10 s:\n{}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("redis-server is running").id()
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL (by PID) and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same port, in the same directory, with the same options.
    pub fn restart(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // The port may linger briefly after the kill; retry within the bound.
            match self.spawn() {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => panic!("redis restart failed: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Runs a command; panics on an I/O error or an error reply.
    pub fn cmd(&self, args: &[&str]) -> Resp {
        match redis_cmd(self.port, args) {
            Ok(Resp::Error(e)) => panic!("redis {args:?} on :{}: {e}", self.port),
            Ok(r) => r,
            Err(e) => panic!("redis {args:?} on :{}: {e}", self.port),
        }
    }

    /// Command calls since start or the last [`RedisServer::reset_stats`].
    pub fn commandstats(&self) -> BTreeMap<String, u64> {
        parse_commandstats(&self.cmd(&["INFO", "commandstats"]).text())
    }

    /// Calls of one command (lower case, e.g. `"subscribe"`), 0 when never called.
    pub fn calls(&self, command: &str) -> u64 {
        self.commandstats().get(command).copied().unwrap_or(0)
    }

    pub fn reset_stats(&self) {
        self.cmd(&["CONFIG", "RESETSTAT"]);
    }

    /// Pub/sub channels with at least one subscriber, matching `pattern`.
    pub fn pubsub_channels(&self, pattern: &str) -> Vec<String> {
        self.cmd(&["PUBSUB", "CHANNELS", pattern]).texts()
    }

    /// Sharded pub/sub channels (SSUBSCRIBE) with at least one subscriber.
    pub fn pubsub_shardchannels(&self, pattern: &str) -> Vec<String> {
        self.cmd(&["PUBSUB", "SHARDCHANNELS", pattern]).texts()
    }

    /// The first element of `ROLE`: `master` or `slave`.
    pub fn role(&self) -> String {
        match self.cmd(&["ROLE"]) {
            Resp::Array(Some(items)) if !items.is_empty() => items[0].text(),
            other => panic!("ROLE on :{}: {other:?}", self.port),
        }
    }

    /// One field of `CLUSTER INFO` (e.g. `cluster_state`).
    pub fn cluster_info(&self, field: &str) -> Option<String> {
        let info = redis_cmd(self.port, &["CLUSTER", "INFO"]).ok()?;
        let Resp::Bulk(Some(b)) = info else { return None };
        String::from_utf8_lossy(&b)
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':').map(|v| v.trim().to_string()))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if std::thread::panicking() && self.child.is_some() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            eprintln!(
                "---- redis :{} log (last 20 lines) ----\n{}\n----",
                self.port,
                tail.join("\n")
            );
        }
        self.kill();
    }
}

/// A Redis Cluster made with `redis-cli --cluster create`.
pub struct RedisCluster {
    /// The servers that were masters at creation (a failover changes roles,
    /// see [`RedisCluster::owner`]).
    pub masters: Vec<RedisServer>,
    /// With [`RedisCluster::start_with_replicas`]: one replica per master.
    pub replicas: Vec<RedisServer>,
}

/// A node of `CLUSTER NODES`.
#[derive(Debug, Clone)]
pub struct ClusterNode {
    pub id: String,
    pub port: u16,
    pub flags: String,
    /// The master's id for a replica, `-` for a master.
    pub master: String,
    /// Slot ranges (`first`, `last`) served by a master.
    pub slots: Vec<(u16, u16)>,
}

impl RedisCluster {
    /// Starts `n` (>= 3) cluster-enabled masters without replicas, joins them
    /// and waits for `cluster_state:ok` on every one.
    pub fn start(n: usize) -> RedisCluster {
        Self::create(n, 0)
    }

    /// `n` (>= 3) masters with one replica each (`--cluster-replicas 1`),
    /// `cluster-node-timeout 2000` and `appendonly yes`, like a production
    /// cluster that fails over; waits until every replica is in sync.
    pub fn start_with_replicas(n: usize) -> RedisCluster {
        Self::create(n, 1)
    }

    fn create(n: usize, replicas: usize) -> RedisCluster {
        let dir = Arc::new(tempfile::tempdir().expect("creating a temp dir for the cluster"));
        let mut opts = vec!["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"];
        if replicas > 0 {
            opts.extend(["--appendonly", "yes"]);
        }
        let servers: Vec<RedisServer> = (0..n * (1 + replicas))
            .map(|_| {
                RedisServer::start_in(dir.clone(), &opts, |port| {
                    vec![
                        "--cluster-config-file".into(),
                        format!("nodes-{port}.conf"),
                        // The bus port defaults to port + 10000, which may be
                        // taken or out of range for an ephemeral port.
                        "--cluster-port".into(),
                        free_port().to_string(),
                        // AOF files per server in the shared directory.
                        "--appenddirname".into(),
                        format!("aof-{port}"),
                    ]
                })
            })
            .collect();
        let mut cmd = Command::new("redis-cli");
        cmd.args(["--cluster", "create"]);
        for m in &servers {
            cmd.arg(format!("127.0.0.1:{}", m.port));
        }
        cmd.args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("running redis-cli (apt redis-tools)");
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().expect("polling redis-cli") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("redis-cli --cluster create did not finish within 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut out = String::new();
        if let Some(mut o) = child.stdout.take() {
            let _ = o.read_to_string(&mut out);
        }
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut out);
        }
        assert!(status.success(), "redis-cli --cluster create failed ({status}):\n{out}");
        let known = servers.len().to_string();
        let mut cluster = RedisCluster { masters: servers, replicas: Vec::new() };
        if replicas > 0 {
            // Which servers redis-cli made replicas is its choice: ask each.
            let (r, m): (Vec<RedisServer>, Vec<RedisServer>) =
                cluster.masters.drain(..).partition(|s| s.role() == "slave");
            (cluster.masters, cluster.replicas) = (m, r);
            assert_eq!(cluster.masters.len(), n, "masters after create:\n{out}");
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = cluster.servers().all(|s| {
                s.cluster_info("cluster_state").as_deref() == Some("ok")
                    && s.cluster_info("cluster_known_nodes").as_deref() == Some(known.as_str())
            }) && cluster.replicas.iter().all(|r| {
                redis_cmd(r.port, &["INFO", "replication"])
                    .is_ok_and(|i| matches!(i, Resp::Bulk(Some(b)) if String::from_utf8_lossy(&b).contains("master_link_status:up")))
            });
            if ready {
                return cluster;
            }
            assert!(
                Instant::now() < deadline,
                "cluster not ok (state, {known} known nodes, replicas in sync) within 30 s\n{out}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every server, masters first.
    pub fn servers(&self) -> impl Iterator<Item = &RedisServer> {
        self.masters.iter().chain(self.replicas.iter())
    }

    /// The server on `port`.
    pub fn server_mut(&mut self, port: u16) -> &mut RedisServer {
        self.masters
            .iter_mut()
            .chain(self.replicas.iter_mut())
            .find(|s| s.port == port)
            .unwrap_or_else(|| panic!("no cluster server on port {port}"))
    }

    /// `CLUSTER NODES` as a running server sees it.
    pub fn nodes(&self) -> Vec<ClusterNode> {
        let live = self.servers().find(|s| s.is_running()).expect("a running cluster server");
        live.cmd(&["CLUSTER", "NODES"])
            .text()
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                let addr = f[1].split('@').next().expect("ip:port@cport");
                ClusterNode {
                    id: f[0].to_string(),
                    port: addr.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port"),
                    flags: f[2].to_string(),
                    master: f[3].to_string(),
                    slots: f[8..]
                        .iter()
                        .filter_map(|r| {
                            let (a, b) = r.split_once('-').unwrap_or((r, r));
                            Some((a.parse().ok()?, b.parse().ok()?))
                        })
                        .collect(),
                }
            })
            .collect()
    }

    /// The ports of the master serving `key`'s slot and of its replica.
    pub fn owner(&self, key: &str) -> (u16, u16) {
        let live = self.servers().find(|s| s.is_running()).expect("a running cluster server");
        let slot = live.cmd(&["CLUSTER", "KEYSLOT", key]).int() as u16;
        let nodes = self.nodes();
        let master = nodes
            .iter()
            .find(|n| {
                n.flags.contains("master")
                    && !n.flags.contains("fail")
                    && n.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot))
            })
            .unwrap_or_else(|| panic!("no master serves slot {slot}: {nodes:?}"));
        let replica = nodes
            .iter()
            .find(|n| n.master == master.id)
            .unwrap_or_else(|| panic!("master :{} has no replica: {nodes:?}", master.port));
        (master.port, replica.port)
    }

    /// Seed URLs for `[redis] cluster = true`: the masters at creation.
    pub fn urls(&self) -> Vec<String> {
        self.masters.iter().map(RedisServer::url).collect()
    }
}

/// The `[broker]` and `[redis]` sections for a node using these Redis URLs;
/// `redis_extra` are more `key = value` lines of the `[redis]` section.
pub fn broker_toml(urls: &[String], cluster: bool, redis_extra: &str) -> String {
    let urls: Vec<String> = urls.iter().map(|u| format!("{u:?}")).collect();
    format!(
        "[broker]\nkind = \"redis\"\n\n[redis]\nurls = [{}]\ncluster = {cluster}\nstartup_timeout = \"10s\"\n{redis_extra}\n",
        urls.join(", ")
    )
}

/// Starts `n` fanfare nodes sharing the given Redis (or cluster), each with
/// `extra` appended to its config.
pub fn start_nodes(n: usize, urls: &[String], cluster: bool, extra: &str) -> Vec<super::Server> {
    start_nodes_with(n, urls, cluster, "", extra)
}

/// [`start_nodes`] with more `[redis]` settings.
pub fn start_nodes_with(
    n: usize,
    urls: &[String],
    cluster: bool,
    redis_extra: &str,
    extra: &str,
) -> Vec<super::Server> {
    let toml = format!("{}\n{extra}", broker_toml(urls, cluster, redis_extra));
    (0..n).map(|_| super::Server::start(&toml)).collect()
}

/// One publication push as a subscriber saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    pub channel: String,
    pub offset: u64,
    pub data: serde_json::Value,
}

/// Publishes every `(channel, data)` from `client`, `per_frame` commands per
/// WebSocket frame, without waiting between frames; then checks every reply.
pub async fn publish_pipelined(
    client: &mut super::Client,
    items: &[(String, serde_json::Value)],
    per_frame: usize,
) {
    let mut ids = Vec::with_capacity(items.len());
    for chunk in items.chunks(per_frame.max(1)) {
        let mut frame = String::new();
        for (channel, data) in chunk {
            let id = client.next_id();
            ids.push(id);
            if !frame.is_empty() {
                frame.push('\n');
            }
            let cmd = serde_json::json!({"id": id, "publish": {"channel": channel, "data": data}});
            frame.push_str(&cmd.to_string());
        }
        client.send_text(&frame).await;
    }
    for id in ids {
        let r = client.reply(id).await;
        assert_eq!(r["publish"], serde_json::json!({}), "publish failed: {r}");
    }
}

/// The next `n` publication pushes of `client` (each within the client's timeout).
pub async fn collect_pubs(client: &mut super::Client, n: usize) -> Vec<Seen> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let v = client.recv_push().await;
        let push = &v["push"];
        let p = push.get("pub").unwrap_or_else(|| panic!("expected a publication push: {v}"));
        out.push(Seen {
            channel: push["channel"].as_str().expect("push channel").to_string(),
            offset: p["offset"].as_u64().unwrap_or(0),
            data: p["data"].clone(),
        });
    }
    out
}
