//! Control API publish throughput: keeps many unary `Publish` calls in flight
//! over a few HTTP/2 connections for a fixed time and reports calls/s, latency
//! percentiles and CPU use of the generator (and of the node, given its PID).
//!
//! ```text
//! cargo run --release -p fanfare-server --example api_bench -- \
//!     --addr 127.0.0.1:9000 --key KEY --connections 4 --concurrency 256 --duration 10
//! ```
//! `scripts/bench-api.sh` starts a release node with the memory broker and runs
//! this three times.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fanfare_server::pb;
use pb::control_service_client::ControlServiceClient;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

#[derive(Debug, Clone)]
struct Opts {
    addr: String,
    key: String,
    connections: usize,
    concurrency: usize,
    duration: Duration,
    warmup: Duration,
    channels: usize,
    payload: usize,
    threads: usize,
    node_pid: Option<u32>,
    /// Raw HTTP/2 (the `h2` crate, request encoded once) instead of tonic.
    raw: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: api_bench [--addr HOST:PORT] [--key KEY] [--connections N] [--concurrency N]\n\
         \x20                [--duration SECS] [--warmup SECS] [--channels N] [--payload BYTES]\n\
         \x20                [--threads N] [--node-pid PID] [--raw]"
    );
    std::process::exit(2)
}

fn parse_args() -> Opts {
    let mut o = Opts {
        addr: "127.0.0.1:9000".into(),
        key: String::new(),
        connections: 4,
        concurrency: 256,
        duration: Duration::from_secs(10),
        warmup: Duration::from_secs(2),
        channels: 16,
        payload: 64,
        threads: 1,
        node_pid: None,
        raw: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        let num = |s: String| s.parse::<u64>().unwrap_or_else(|_| usage());
        match flag.as_str() {
            "--addr" => o.addr = val(),
            "--key" => o.key = val(),
            "--connections" => o.connections = num(val()).max(1) as usize,
            "--concurrency" => o.concurrency = num(val()).max(1) as usize,
            "--duration" => o.duration = Duration::from_secs(num(val()).clamp(1, 600)),
            "--warmup" => o.warmup = Duration::from_secs(num(val()).min(60)),
            "--channels" => o.channels = num(val()).max(1) as usize,
            "--payload" => o.payload = num(val()).max(8) as usize,
            "--threads" => o.threads = num(val()).max(1) as usize,
            "--node-pid" => o.node_pid = Some(num(val()) as u32),
            "--raw" => o.raw = true,
            _ => usage(),
        }
    }
    o
}

/// utime + stime of a process in seconds (`/proc/<pid>/stat`, clock ticks of 100 Hz).
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// What one generator thread measured.
struct Part {
    latencies: Vec<u32>,
    errors: u64,
}

/// The shared clock of all generator threads.
struct Phase {
    measuring: AtomicBool,
    stop: AtomicBool,
}

impl Phase {
    /// Counts one call if the measured window is open: its latency, or an error.
    fn record(&self, ok: bool, start: Instant, lat: &mut Vec<u32>, errors: &AtomicU64) {
        if !self.measuring.load(Ordering::Relaxed) {
            return;
        }
        if ok {
            lat.push(start.elapsed().as_micros().min(u32::MAX as u128) as u32);
        } else {
            errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The latencies of every call loop and the error count of this generator.
async fn collect(
    tasks: Vec<tokio::task::JoinHandle<Vec<u32>>>,
    errors: &AtomicU64,
) -> anyhow::Result<Part> {
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await?);
    }
    Ok(Part { latencies, errors: errors.load(Ordering::Relaxed) })
}

/// One generator thread: its own current-thread runtime, `connections` HTTP/2
/// connections and `concurrency` call loops. (A current-thread runtime lets
/// each connection write many queued requests per syscall; on a multi-thread
/// runtime a woken connection task tends to run after every single request.)
async fn generate(o: Opts, id: usize, phase: Arc<Phase>) -> anyhow::Result<Part> {
    let mut clients = Vec::new();
    for _ in 0..o.connections {
        // One Channel = one HTTP/2 connection; calls on it are multiplexed.
        let ch = Channel::from_shared(format!("http://{}", o.addr))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .connect()
            .await?;
        clients.push(ControlServiceClient::new(ch));
    }
    let auth: Option<MetadataValue<_>> =
        (!o.key.is_empty()).then(|| format!("apikey {}", o.key).parse()).transpose()?;
    let pad = "x".repeat(o.payload.saturating_sub(20));
    let channels: Arc<Vec<String>> =
        Arc::new((0..o.channels).map(|i| format!("bench-{i}")).collect());
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..o.concurrency {
        let mut client = clients[t % clients.len()].clone();
        let auth = auth.clone();
        let channels = channels.clone();
        let (phase, errors) = (phase.clone(), errors.clone());
        let data = format!("{{\"t\":{t},\"g\":{id},\"pad\":\"{pad}\"}}").into_bytes();
        tasks.push(tokio::spawn(async move {
            let mut lat: Vec<u32> = Vec::with_capacity(1 << 14);
            let mut i = t;
            while !phase.stop.load(Ordering::Relaxed) {
                let mut req = tonic::Request::new(pb::PublishRequest {
                    channel: channels[i % channels.len()].clone(),
                    data: data.clone(),
                    ..Default::default()
                });
                if let Some(a) = &auth {
                    req.metadata_mut().insert("authorization", a.clone());
                }
                i += 1;
                let start = Instant::now();
                let ok = client.publish(req).await.is_ok();
                phase.record(ok, start, &mut lat, &errors);
            }
            lat
        }));
    }
    collect(tasks, &errors).await
}

/// Like [`generate`] over raw HTTP/2: each request's gRPC message is encoded
/// once and the headers are static, so the generator costs less per call and
/// leaves more of a small machine to the node.
async fn generate_raw(o: Opts, id: usize, phase: Arc<Phase>) -> anyhow::Result<Part> {
    let mut conns = Vec::new();
    for _ in 0..o.connections {
        let tcp = tokio::net::TcpStream::connect(&o.addr).await?;
        tcp.set_nodelay(true)?;
        // Many small gRPC replies may be buffered before their tasks read them:
        // a larger window and small-frame budget than h2's defaults (which
        // would close the connection with ENHANCE_YOUR_CALM past ~200 in flight).
        let (send, conn) = h2::client::Builder::new()
            .initial_window_size(1 << 20)
            .initial_connection_window_size(8 << 20)
            .data_frame_budget(8 << 20)
            .handshake(tcp)
            .await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        conns.push(send);
    }
    let pad = "x".repeat(o.payload.saturating_sub(20));
    let uri: http::Uri = format!("http://{}/fanfare.v1.ControlService/Publish", o.addr).parse()?;
    let auth = format!("apikey {}", o.key);
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..o.concurrency {
        let mut send = conns[t % conns.len()].clone();
        let (phase, errors, uri, auth) = (phase.clone(), errors.clone(), uri.clone(), auth.clone());
        // One gRPC message per channel: 5-byte prefix + protobuf.
        let bodies: Vec<bytes::Bytes> = (0..o.channels)
            .map(|c| {
                let msg = prost::Message::encode_to_vec(&pb::PublishRequest {
                    channel: format!("bench-{c}"),
                    data: format!("{{\"t\":{t},\"g\":{id},\"pad\":\"{pad}\"}}").into_bytes(),
                    ..Default::default()
                });
                let mut framed = Vec::with_capacity(5 + msg.len());
                framed.push(0);
                framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
                framed.extend_from_slice(&msg);
                bytes::Bytes::from(framed)
            })
            .collect();
        let key = !o.key.is_empty();
        tasks.push(tokio::spawn(async move {
            let mut lat: Vec<u32> = Vec::with_capacity(1 << 14);
            let mut i = t;
            while !phase.stop.load(Ordering::Relaxed) {
                let mut req = http::Request::post(uri.clone())
                    .header("content-type", "application/grpc")
                    .header("te", "trailers");
                if key {
                    req = req.header("authorization", auth.as_str());
                }
                let req = req.body(()).expect("a valid request");
                let body = bodies[i % bodies.len()].clone();
                i += 1;
                let start = Instant::now();
                let call = async {
                    send = send.clone().ready().await?;
                    let (resp, mut stream) = send.send_request(req, false)?;
                    stream.send_data(body, true)?;
                    let (parts, mut recv) = resp.await?.into_parts();
                    while let Some(chunk) = recv.data().await {
                        let chunk = chunk?;
                        let _ = recv.flow_control().release_capacity(chunk.len());
                    }
                    let trailers = recv.trailers().await?;
                    // A trailers-only reply carries grpc-status in the headers.
                    let status = trailers
                        .as_ref()
                        .and_then(|t| t.get("grpc-status"))
                        .or_else(|| parts.headers.get("grpc-status"));
                    Ok::<bool, h2::Error>(parts.status == 200 && status.is_some_and(|s| s == "0"))
                };
                let ok = match call.await {
                    Ok(ok) => ok,
                    Err(e) => {
                        // Report the first failure; do not spin on a broken connection.
                        if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                            eprintln!("api_bench: call failed: {e}");
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                phase.record(ok, start, &mut lat, &errors);
            }
            lat
        }));
    }
    collect(tasks, &errors).await
}

fn run(o: Opts) -> anyhow::Result<()> {
    let phase = Arc::new(Phase { measuring: AtomicBool::new(false), stop: AtomicBool::new(false) });
    // Connections and call loops are split across the generator threads.
    let mut threads = Vec::new();
    for id in 0..o.threads {
        let mut part = o.clone();
        part.connections =
            (o.connections / o.threads + usize::from(id < o.connections % o.threads)).max(1);
        part.concurrency =
            (o.concurrency / o.threads + usize::from(id < o.concurrency % o.threads)).max(1);
        let phase = phase.clone();
        threads.push(std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            if part.raw {
                rt.block_on(generate_raw(part, id, phase))
            } else {
                rt.block_on(generate(part, id, phase))
            }
        }));
    }

    std::thread::sleep(o.warmup);
    let node_pid = o.node_pid.map(|p| p.to_string());
    let node_cpu0 = node_pid.as_deref().and_then(cpu_seconds);
    let gen_cpu0 = cpu_seconds("self");
    let t0 = Instant::now();
    phase.measuring.store(true, Ordering::Relaxed);
    std::thread::sleep(o.duration);
    phase.measuring.store(false, Ordering::Relaxed);
    let wall = t0.elapsed().as_secs_f64();
    let node_cpu = node_pid.as_deref().and_then(cpu_seconds).zip(node_cpu0).map(|(b, a)| b - a);
    let gen_cpu = cpu_seconds("self").zip(gen_cpu0).map(|(b, a)| b - a);
    phase.stop.store(true, Ordering::Relaxed);

    let mut lat = Vec::new();
    let mut errors = 0;
    for t in threads {
        let part = t.join().map_err(|_| anyhow::anyhow!("generator thread panicked"))??;
        lat.extend(part.latencies);
        errors += part.errors;
    }
    lat.sort_unstable();
    let calls = lat.len() as f64;
    let pct = |c: Option<f64>| c.map(|c| format!("{:.0}%", 100.0 * c / wall)).unwrap_or("-".into());
    let per_call = |c: Option<f64>| {
        c.filter(|_| calls > 0.0).map(|c| format!("{:.1}", 1e6 * c / calls)).unwrap_or("-".into())
    };
    println!(
        "calls/s {:.0}  calls {}  errors {}  p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  \
         node CPU {} ({} us/call)  generator CPU {} ({} us/call)  \
         ({} client, connections {}, concurrency {}, threads {}, {:.1} s)",
        calls / wall,
        lat.len(),
        errors,
        percentile(&lat, 0.50),
        percentile(&lat, 0.99),
        percentile(&lat, 0.999),
        pct(node_cpu),
        per_call(node_cpu),
        pct(gen_cpu),
        per_call(gen_cpu),
        if o.raw { "raw h2" } else { "tonic" },
        o.connections,
        o.concurrency,
        o.threads,
        wall,
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let o = parse_args();
    run(o)
}
