//! Runs every scenario briefly against the real `fanfare` binary (memory
//! broker, free loopback ports) through the real `fanfare-loadtest` binary
//! with `--json`, and checks the figures a user relies on.
//!
//! The server binary is `$FANFARE_BIN`, else `<workspace>/target/debug/fanfare`,
//! built with `cargo build -p fanfare-server` first so it is never stale.

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

const LOADTEST: &str = env!("CARGO_BIN_EXE_fanfare-loadtest");

/// One scenario at a time: they measure CPU and time on a 2-core machine.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("crate is inside the workspace").into()
}

/// The fanfare binary, built once per test process unless FANFARE_BIN is set.
fn fanfare_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("FANFARE_BIN") {
            return PathBuf::from(p);
        }
        let status = Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", "fanfare-server"])
            .current_dir(workspace())
            .status()
            .expect("running cargo build -p fanfare-server");
        assert!(status.success(), "cargo build -p fanfare-server failed");
        let target = std::env::var("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| workspace().join("target"));
        target.join("debug").join("fanfare")
    })
    .clone()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A running fanfare node; killed when dropped.
struct Node {
    child: Child,
    port: u16,
    /// The gRPC control API port (0 for the floor endpoint).
    grpc: u16,
    _dir: tempfile::TempDir,
}

impl Node {
    fn start() -> Node {
        let grpc = free_port();
        let mut node = Node::spawn("fanfare", |port, dir| {
            let config = dir.join("fanfare.toml");
            std::fs::write(
                &config,
                format!(
                    "[http]\nlisten = \"127.0.0.1:{port}\"\n[grpc]\nlisten = \"127.0.0.1:{grpc}\"\n\
                     [client]\nping_interval = \"2s\"\npong_timeout = \"1500ms\"\n[log]\nlevel = \"warn\"\n\
                     [[namespaces]]\nname = \"\"\nallow_publish = true\n"
                ),
            )
            .expect("writing config");
            let mut c = Command::new(fanfare_bin());
            c.arg("--config").arg(&config).env_remove("RUST_LOG").env_remove("FANFARE_CONFIG");
            c
        });
        node.grpc = grpc;
        node
    }

    /// `fanfare-loadtest floor-server` (the calibration endpoint) instead of a node.
    fn start_floor() -> Node {
        Node::spawn("floor-server", |port, _| {
            let mut c = Command::new(LOADTEST);
            c.args(["floor-server", &format!("127.0.0.1:{port}")]);
            c
        })
    }

    /// Starts `command(port, dir)` until it listens on `port` (three tries:
    /// a free port may be taken meanwhile); its stderr goes to `dir/log`.
    fn spawn(what: &str, command: impl Fn(u16, &Path) -> Command) -> Node {
        let mut last_log = String::new();
        for _ in 0..3 {
            let port = free_port();
            let dir = tempfile::tempdir().expect("temp dir");
            let mut child = command(port, dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.path().join("log")).expect("log file"))
                .spawn()
                .unwrap_or_else(|e| panic!("starting {what}: {e}"));
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Node { child, port, grpc: 0, _dir: dir };
                }
                if child.try_wait().expect("polling the server").is_some() {
                    break; // port taken meanwhile: try others
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            last_log = std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
        }
        panic!("{what} did not start:\n{last_log}");
    }

    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/connection/websocket", self.port)
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// Status of `POST /api/publish` with an empty JSON body.
    fn api_status(&self) -> u16 {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        write!(
            s,
            "POST /api/publish HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}"
        )
        .expect("write");
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the load generator with `--json --quiet`, bounded at 90 s; returns
/// (exit code, report).
fn loadtest(node: &Node, args: &[&str]) -> (i32, Value) {
    let mut child = Command::new(LOADTEST)
        .args(args)
        .args(["--url", &node.url(), "--server-pid", &node.pid(), "--json", "--quiet"])
        .args(["--max-time", "80s", "--settle", "500ms"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting fanfare-loadtest");
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).ok();
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        stderr.read_to_string(&mut s).ok();
        s
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(s) = child.try_wait().expect("polling loadtest") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("fanfare-loadtest {args:?} did not stop within 90 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (out, err) = (out.join().expect("stdout"), err.join().expect("stderr"));
    let report: Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("no JSON report ({e}); stdout:\n{out}\nstderr:\n{err}"));
    eprintln!("{err}");
    (status.code().unwrap_or(-1), report)
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Checks the figures every message scenario must have.
fn assert_exact_delivery(r: &Value) {
    let m = &r["messages"];
    assert_eq!(u(&m["lost"]), 0, "{m}");
    assert_eq!(u(&m["duplicated"]), 0, "{m}");
    assert_eq!(u(&m["out_of_order"]), 0, "{m}");
    assert_eq!(u(&m["publish_errors"]), 0, "{m}");
    assert!(u(&m["published"]) > 0, "{m}");
    assert_eq!(u(&m["delivered"]), u(&m["expected"]), "{m}");
    let lat = &m["latency_us"];
    assert_eq!(u(&lat["count"]), u(&m["received"]), "{lat}");
    assert!(u(&lat["p50"]) >= 1 && u(&lat["p50"]) <= u(&lat["p99"]), "{lat}");
    assert!(u(&lat["p99"]) <= u(&lat["max"]) && u(&lat["max"]) < 10_000_000, "{lat}");
    assert!(f(&r["loadgen"]["cpu_seconds_per_second"]) > 0.0, "{r}");
}

#[test]
fn idle_holds_connections_answers_pings_and_measures_the_server() {
    let _g = serial();
    let node = Node::start();
    // Server pings every 2 s: a 5 s hold needs pong answers or clients get 3012.
    let (code, r) =
        loadtest(&node, &["idle", "-n", "300", "--ramp", "0", "--subs", "2", "--hold", "5s"]);
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(r["ok"], true, "{r:#}");
    let c = &r["connections"];
    assert_eq!(u(&c["connected"]), 300);
    assert_eq!(u(&c["subscriptions"]), 600);
    assert_eq!(u(&c["unexpected_disconnects"]), 0);
    assert!(f(&r["connect"]["rate_per_second"]) > 10.0, "{r:#}");
    assert_eq!(u(&r["connect"]["handshake_us"]["count"]), 300);
    let s = &r["server"];
    let per_conn = f(&s["rss_per_connection_bytes"]);
    assert!(per_conn > 0.0 && per_conn < 1_000_000.0, "{s}");
    assert!(f(&s["cpu_seconds_per_second"]) >= 0.0 && f(&s["window_seconds"]) >= 4.9, "{s}");
    assert_eq!(r["scenario"], "idle");
    assert!(r["command_line"].as_array().is_some_and(|a| a.len() > 3));
    assert!(r["git_commit"].as_str().is_some_and(|s| !s.is_empty()));
}

#[test]
fn fanout_delivers_every_publication_once_and_in_order() {
    let _g = serial();
    let node = Node::start();
    let r = exact_fanout(&node, &[]);
    assert_eq!(u(&r["connections"]["publishers_connected"]), 2);
}

/// 200 subscribers over 5 channels, 2 publishers at 500/s for 2 s (plus
/// `extra` flags): every publication reaches its 40 subscribers exactly once,
/// in order. The report.
fn exact_fanout(node: &Node, extra: &[&str]) -> Value {
    let mut args = vec!["fanout"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[
        "-n",
        "200",
        "--channels",
        "5",
        "--publishers",
        "2",
        "--rate",
        "500",
        "-d",
        "2s",
    ]);
    let (code, r) = loadtest(node, &args);
    assert_eq!(code, 0, "{r:#}");
    assert_exact_delivery(&r);
    let m = &r["messages"];
    // 200 subscribers over 5 channels: every publication reaches 40 of them.
    assert_eq!(u(&m["expected"]), u(&m["published"]) * 40, "{m}");
    assert!(f(&m["publish_rate_per_second"]) > 400.0, "{m}");
    r
}

#[test]
fn the_floor_endpoint_serves_connects_and_fanout_exactly_and_kernel_shares_are_reported() {
    let _g = serial();
    let floor = Node::start_floor();
    let (code, r) =
        loadtest(&floor, &["idle", "-n", "200", "--ramp", "0", "--subs", "1", "--hold", "1s"]);
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(u(&r["connections"]["connected"]), 200);
    assert_eq!(u(&r["connections"]["subscriptions"]), 200);
    let (code, r) = loadtest(
        &floor,
        &[
            "fanout",
            "-n",
            "100",
            "--channels",
            "2",
            "--publishers",
            "2",
            "--rate",
            "400",
            "-d",
            "2s",
        ],
    );
    assert_eq!(code, 0, "{r:#}");
    assert_exact_delivery(&r);
    assert_eq!(u(&r["messages"]["expected"]), u(&r["messages"]["published"]) * 50);
    // Shares of CPU time spent in the kernel, for the server and the generator.
    for share in [&r["messages"]["server_kernel_share"], &r["messages"]["loadgen_kernel_share"]] {
        assert!((0.0..=1.0).contains(&f(share)), "{share} in {:#}", r["messages"]);
    }
}

#[test]
fn chat_in_two_worker_processes_merges_their_figures() {
    let _g = serial();
    let node = Node::start();
    let (code, r) = loadtest(
        &node,
        &["chat", "--workers", "2", "-n", "100", "--room-size", "10", "--rate", "200", "-d", "2s"],
    );
    assert_eq!(code, 0, "{r:#}");
    assert_exact_delivery(&r);
    let m = &r["messages"];
    assert_eq!(u(&m["expected"]), u(&m["published"]) * 10, "{m}");
    assert_eq!(u(&r["loadgen"]["workers"]), 2);
    assert_eq!(u(&r["connections"]["connected"]), 100);
}

#[test]
fn storm_reconnects_every_client() {
    let _g = serial();
    let node = Node::start();
    let (code, r) = loadtest(&node, &["storm", "--workers", "2", "-n", "200", "--storms", "2"]);
    assert_eq!(code, 0, "{r:#}");
    let rounds = r["storm"]["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), 2);
    for round in rounds {
        assert_eq!(u(&round["participants"]), 200, "{round}");
        assert_eq!(u(&round["resubscribed"]), 200, "{round}");
        let secs = f(&round["seconds"]);
        assert!(secs > 0.0 && secs < 30.0, "{round}");
    }
    assert!(r["storm"]["redis_commands"].is_null());
}

#[test]
fn http_publish_mode_reports_the_api_outcome() {
    let _g = serial();
    let node = Node::start();
    let api = node.api_status();
    let (code, r) = loadtest(
        &node,
        &[
            "fanout",
            "--publish-mode",
            "http",
            "-n",
            "50",
            "--channels",
            "2",
            "--rate",
            "100",
            "-d",
            "1s",
        ],
    );
    // The node's HTTP API answers (an empty body is a client error, not 404).
    assert_ne!(api, 404, "POST /api/publish is served");
    assert_eq!(code, 0, "{r:#}");
    assert_exact_delivery(&r);
}

#[test]
fn grpc_publish_mode_delivers_every_publication_once_and_in_order() {
    let _g = serial();
    let node = Node::start();
    let grpc_url = format!("http://127.0.0.1:{}", node.grpc);
    let args = ["fanout", "--publish-mode", "grpc", "--grpc-url", &grpc_url, "-n", "50"];
    let (code, r) =
        loadtest(&node, &[&args[..], &["--channels", "2", "--rate", "100", "-d", "1s"]].concat());
    assert_eq!(code, 0, "{r:#}");
    assert_exact_delivery(&r);
    assert_eq!(u(&r["connections"]["publishers_connected"]), 1, "{r:#}");
    // 50 subscribers over 2 channels: every publication reaches 25.
    let m = &r["messages"];
    assert_eq!(u(&m["expected"]), u(&m["published"]) * 25, "{m}");
    // Without --grpc-url the mode is refused with a usage error naming the flag.
    let out = Command::new(LOADTEST)
        .args(["fanout", "--publish-mode", "grpc", "--url", &node.url()])
        .output()
        .expect("running fanfare-loadtest");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--grpc-url"), "{out:?}");
}

#[test]
fn protobuf_clients_answer_pings_with_empty_commands_while_idle() {
    let _g = serial();
    let node = Node::start();
    // Server pings every 2 s: a 5 s hold needs Protobuf pongs or clients get 3012.
    let (code, r) = loadtest(
        &node,
        &[
            "idle",
            "--protocol",
            "protobuf",
            "-n",
            "200",
            "--ramp",
            "0",
            "--subs",
            "2",
            "--hold",
            "5s",
        ],
    );
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(r["plan"]["protocol"], "protobuf");
    let c = &r["connections"];
    assert_eq!(u(&c["connected"]), 200);
    assert_eq!(u(&c["subscriptions"]), 400);
    assert_eq!(u(&c["unexpected_disconnects"]), 0);
}

#[test]
fn protobuf_fanout_and_chat_deliver_every_publication_once_and_in_order() {
    let _g = serial();
    let node = Node::start();
    exact_fanout(&node, &["--protocol", "protobuf"]);

    // Every client publishes and receives, in two worker processes.
    let (code, r) = loadtest(
        &node,
        &[
            "chat",
            "--protocol",
            "protobuf",
            "--workers",
            "2",
            "-n",
            "100",
            "--room-size",
            "10",
            "--rate",
            "200",
            "-d",
            "2s",
        ],
    );
    assert_eq!(code, 0, "{r:#}");
    assert_exact_delivery(&r);
    assert_eq!(u(&r["messages"]["expected"]), u(&r["messages"]["published"]) * 10);
}

#[test]
fn the_floor_endpoint_serves_protobuf_fanout_exactly() {
    let _g = serial();
    let floor = Node::start_floor();
    let (code, r) = loadtest(
        &floor,
        &[
            "fanout",
            "--protocol",
            "protobuf",
            "-n",
            "100",
            "--channels",
            "2",
            "--publishers",
            "2",
            "--rate",
            "400",
            "-d",
            "2s",
        ],
    );
    assert_eq!(code, 0, "{r:#}");
    assert_exact_delivery(&r);
    assert_eq!(u(&r["messages"]["expected"]), u(&r["messages"]["published"]) * 50);
}
