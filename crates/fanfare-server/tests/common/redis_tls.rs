//! Redis over TLS and Redis Sentinel for the broker tests: certificates of
//! the test CA of `tls.rs` (made at test time with the `openssl` CLI),
//! `redis-server` processes serving TLS only (`--port 0 --tls-port N`), a TLS
//! Redis Cluster (`--tls-cluster yes`, made with `redis-cli --tls --cluster
//! create`), and `redis-server --sentinel` processes. Every process is started by the test, stopped by its PID on
//! drop, and every wait is bounded.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::free_port;
use super::tls::Issued;

/// A CA ([`super::tls::TestCa`]), a server certificate for 127.0.0.1 and a
/// client certificate. The server's carries both serverAuth and clientAuth:
/// Redis also presents it as a client certificate on the cluster bus.
pub struct TestCa {
    ca: super::tls::TestCa,
    server: Issued,
    client: Issued,
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

impl TestCa {
    /// A new CA named `name` with its server and client certificates.
    pub fn generate(name: &str) -> TestCa {
        let ca = super::tls::TestCa::named(&format!("{name} test CA"));
        let server = ca.issue_for("redis-server", "serverAuth,clientAuth");
        let client = ca.issue_for("fanfare-client", "clientAuth");
        TestCa { ca, server, client }
    }

    fn ca_path(&self) -> String {
        path(&self.ca.ca_pem())
    }

    /// `redis.tls_*` lines: the CA, and the client certificate when `client_cert`.
    pub fn redis_toml(&self, client_cert: bool) -> String {
        let mut s = format!("tls_ca = {:?}\n", self.ca_path());
        if client_cert {
            s.push_str(&format!(
                "tls_cert = {:?}\ntls_key = {:?}\n",
                path(&self.client.cert),
                path(&self.client.key)
            ));
        }
        s
    }

    /// `redis-server` options serving TLS with this CA's server certificate.
    fn server_args(&self, auth_clients: &str) -> Vec<String> {
        [
            ("--tls-cert-file", path(&self.server.cert)),
            ("--tls-key-file", path(&self.server.key)),
            ("--tls-ca-cert-file", self.ca_path()),
            ("--tls-auth-clients", auth_clients.to_string()),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_string(), v])
        .collect()
    }

    /// `redis-cli` options for a TLS connection with the client certificate.
    fn cli_args(&self) -> Vec<String> {
        vec![
            "--tls".into(),
            "--cacert".into(),
            self.ca_path(),
            "--cert".into(),
            path(&self.client.cert),
            "--key".into(),
            path(&self.client.key),
        ]
    }
}

/// A `redis-server` serving TLS only (`--port 0`), SIGKILLed by PID on drop.
pub struct TlsRedis {
    child: Option<Child>,
    pub port: u16,
    ca: Arc<TestCa>,
    dir: Arc<tempfile::TempDir>,
}

impl TlsRedis {
    /// `auth_clients`: `yes` (a client certificate is required) or `optional`.
    pub fn start(ca: Arc<TestCa>, auth_clients: &str) -> TlsRedis {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir for redis"));
        Self::start_in(ca, dir, auth_clients, &[], |_| Vec::new())
    }

    fn start_in(
        ca: Arc<TestCa>,
        dir: Arc<tempfile::TempDir>,
        auth_clients: &str,
        extra: &[&str],
        per_port: impl Fn(u16) -> Vec<String>,
    ) -> TlsRedis {
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port();
            let log = dir.path().join(format!("redis-{port}.log"));
            let child = Command::new("redis-server")
                .args(["--port", "0", "--tls-port", &port.to_string()])
                .args(["--bind", "127.0.0.1", "--protected-mode", "no", "--save", ""])
                .arg("--dir")
                .arg(dir.path())
                .arg("--logfile")
                .arg(&log)
                .args(ca.server_args(auth_clients))
                .args(extra)
                .args(per_port(port))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("running redis-server (apt redis-server)");
            let mut r = TlsRedis { child: Some(child), port, ca: ca.clone(), dir: dir.clone() };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                // This process, not another test's server on the port.
                let pid = r.child.as_ref().map(Child::id);
                if pid.is_some() && super::redis::pid_in_info(&r.cli(&["INFO", "server"])) == pid {
                    return r;
                }
                let exited = r.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
                if exited.is_some() || Instant::now() > deadline {
                    last = std::fs::read_to_string(&log).unwrap_or_default();
                    r.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("TLS redis-server did not start:\n{last}");
    }

    /// `redis-cli --tls ... -p PORT args` (with the client certificate): stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(self.ca.cli_args())
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running redis-cli (apt redis-tools)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("redis-{}.log", self.port)))
            .unwrap_or_default()
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        if std::thread::panicking() && self.child.is_some() {
            eprintln!("---- TLS redis :{} log ----\n{}", self.port, self.log());
        }
        self.kill();
    }
}

/// A Redis Cluster of TLS-only masters (`--tls-cluster yes`: the cluster
/// bus and the addresses CLUSTER SLOTS and MOVED give are TLS too).
pub struct TlsCluster {
    pub masters: Vec<TlsRedis>,
}

impl TlsCluster {
    pub fn start(ca: Arc<TestCa>, n: usize, auth_clients: &str) -> TlsCluster {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir for the cluster"));
        let opts =
            ["--cluster-enabled", "yes", "--cluster-node-timeout", "2000", "--tls-cluster", "yes"];
        let masters: Vec<TlsRedis> = (0..n)
            .map(|_| {
                TlsRedis::start_in(ca.clone(), dir.clone(), auth_clients, &opts, |port| {
                    vec![
                        "--cluster-config-file".into(),
                        format!("nodes-{port}.conf"),
                        "--cluster-port".into(),
                        free_port().to_string(),
                    ]
                })
            })
            .collect();
        let mut cmd = Command::new("redis-cli");
        cmd.args(ca.cli_args()).args(["--cluster", "create"]);
        for m in &masters {
            cmd.arg(format!("127.0.0.1:{}", m.port));
        }
        let out = cmd
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("running redis-cli --cluster create");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "redis-cli --tls --cluster create failed:\n{text}");
        let deadline = Instant::now() + Duration::from_secs(30);
        let known = format!("cluster_known_nodes:{n}");
        loop {
            let ok = masters.iter().all(|m| {
                let info = m.cli(&["CLUSTER", "INFO"]);
                info.contains("cluster_state:ok") && info.contains(&known)
            });
            if ok {
                return TlsCluster { masters };
            }
            assert!(Instant::now() < deadline, "TLS cluster not ok within 30 s\n{text}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn urls(&self) -> Vec<String> {
        self.masters.iter().map(TlsRedis::url).collect()
    }
}

/// A `redis-server --sentinel` process watching `master_name`; SIGKILLed by
/// PID on drop.
pub struct Sentinel {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Sentinel {
    /// Watches the primary on `primary_port` (quorum `quorum`), declaring it
    /// down after 1 s without answers.
    pub fn start(master_name: &str, primary_port: u16, quorum: u32) -> Sentinel {
        let mut last = String::new();
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("temp dir for a sentinel");
            let port = free_port();
            let conf: PathBuf = dir.path().join("sentinel.conf");
            let log = dir.path().join("sentinel.log");
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {dir}\nlogfile {log}\n\
                     sentinel monitor {master_name} 127.0.0.1 {primary_port} {quorum}\n\
                     sentinel down-after-milliseconds {master_name} 1000\n\
                     sentinel failover-timeout {master_name} 5000\n\
                     sentinel parallel-syncs {master_name} 1\n",
                    dir = dir.path().display(),
                    log = log.display(),
                ),
            )
            .expect("writing sentinel.conf");
            let child = Command::new("redis-server")
                .arg(&conf)
                .arg("--sentinel")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("running redis-server --sentinel");
            let mut s = Sentinel { child: Some(child), port, dir };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let pid = s.child.as_ref().map(Child::id);
                if pid.is_some() && super::redis::redis_pid(port) == pid {
                    return s;
                }
                let exited = s.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
                if exited.is_some() || Instant::now() > deadline {
                    last = std::fs::read_to_string(&log).unwrap_or_default();
                    s.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("redis sentinel did not start:\n{last}");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sentinel.log")).unwrap_or_default()
    }

    /// The port of the primary this sentinel names now.
    pub fn primary_port(&self, master_name: &str) -> Option<u16> {
        let r = super::redis::redis_cmd(
            self.port,
            &["SENTINEL", "get-master-addr-by-name", master_name],
        )
        .ok()?;
        let super::redis::Resp::Array(Some(items)) = r else { return None };
        items.get(1)?.text().parse().ok()
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        if std::thread::panicking() && self.child.is_some() {
            eprintln!("---- sentinel :{} log ----\n{}", self.port, self.log());
        }
        self.kill();
    }
}
