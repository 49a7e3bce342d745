//! The `fanfare` binary: runs an edge node, checks configuration, mints tokens.

mod admin;
mod api;
mod api_http;
mod centrifugo;
mod config;
mod grpc;
mod grpc_transport;
mod heap;
mod http;
mod jwks;
mod limits;
mod methods;
mod outbound;
mod proxy;
mod tls;
mod transport;
mod webhooks;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fanfare_core::auth::unix_now;
use fanfare_core::{Authenticator, Broker, ConnectClaims, MemoryBroker, Node};
use fanfare_protocol::DisconnectCode;
use fanfare_redis::RedisBroker;
use tokio::sync::watch;

use crate::config::{BrokerKind, LogFormat, Settings};

/// fanfare: a horizontally scalable WebSocket gateway and pub/sub broker
/// speaking the Centrifugo client protocol v2.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    /// TOML configuration file. Every key can also be set as
    /// FANFARE__<SECTION>__<KEY> in the environment (lists comma-separated).
    #[arg(long, short, global = true, env = "FANFARE_CONFIG")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a node (the default).
    Run,
    /// Validate the configuration and print the effective settings (secrets masked).
    CheckConfig,
    /// Print a connection JWT signed with auth.hmac_secret.
    Token {
        /// User id (the `sub` claim).
        #[arg(long)]
        user: String,
        /// Server-side subscriptions, comma-separated (the `channels` claim).
        #[arg(long, value_delimiter = ',')]
        channels: Vec<String>,
        /// Lifetime in seconds; 0 = no expiry.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// JSON for the `info` claim.
        #[arg(long)]
        info: Option<String>,
    },
    /// Read a password from standard input (one line) and print its Argon2id
    /// PHC string for admin.password_hash.
    HashPassword,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fanfare: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = Settings::load(cli.config.as_deref())?;
    match cli.command.unwrap_or(Command::Run) {
        Command::CheckConfig => {
            // The certificate files are checked too: a node would refuse them.
            tls::Certificates::load(&settings)?;
            use std::io::Write;
            // A closed pipe (`check-config | head`) is not an error worth a panic.
            let _ = writeln!(
                std::io::stdout(),
                "# configuration is valid\n{}",
                settings.to_masked_toml()
            );
            Ok(())
        }
        Command::Token { user, channels, ttl, info } => {
            let auth = Authenticator::new(&settings.auth).map_err(|e| anyhow::anyhow!(e))?;
            if !auth.has_key() || settings.auth.hmac_secret.is_empty() {
                anyhow::bail!("auth.hmac_secret: must be set to sign tokens");
            }
            let info = info
                .map(|s| serde_json::from_str(&s).context("--info: not valid JSON"))
                .transpose()?;
            let claims = ConnectClaims {
                sub: user,
                exp: (ttl > 0).then(|| unix_now() + ttl),
                info,
                channels,
            };
            println!("{}", auth.sign(&claims).map_err(|e| anyhow::anyhow!(e))?);
            Ok(())
        }
        Command::HashPassword => {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).context("reading the password from stdin")?;
            let password = line.strip_suffix('\n').unwrap_or(&line);
            let password = password.strip_suffix('\r').unwrap_or(password);
            if password.is_empty() {
                anyhow::bail!("hash-password: give the password as one line on standard input");
            }
            println!("{}", admin::hash_password(password)?);
            Ok(())
        }
        Command::Run => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the tokio runtime")?;
            rt.block_on(run_node(settings))
        }
    }
}

fn init_logging(log: &config::LogSection) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a terminal: escape codes in a log file or collector
    // split `key=value` pairs apart.
    use std::io::IsTerminal;
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::stdout().is_terminal());
    match log.format {
        LogFormat::Text => fmt.init(),
        // One object per line, the event's fields at the top level and the
        // innermost span's (a request's `request_id`) under `span`.
        LogFormat::Json => {
            fmt.json().flatten_event(true).with_current_span(true).with_span_list(false).init()
        }
    }
}

/// Reloads the certificates on every SIGHUP. A failed reload keeps the
/// certificate in use and logs why; connections are never touched.
fn reload_on_sighup(certs: Vec<Arc<tls::Certificate>>) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    // Installed even without TLS: SIGHUP's default action would end the node.
    let mut hup = signal(SignalKind::hangup()).context("installing a SIGHUP handler")?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            if certs.is_empty() {
                tracing::info!("SIGHUP: no TLS certificate to reload");
            }
            for c in &certs {
                match c.reload() {
                    Ok(()) => tracing::info!(key = c.cert_key(), "TLS certificate reloaded"),
                    Err(e) => tracing::error!(
                        error = %format!("{e:#}"),
                        "TLS certificate reload failed; the previous certificate stays in use"
                    ),
                }
            }
        }
    });
    Ok(())
}

async fn run_node(settings: Settings) -> anyhow::Result<()> {
    init_logging(&settings.log);
    let shutdown = shutdown_signal()?;
    let tls::Certificates { http: http_cert, grpc: grpc_cert } =
        tls::Certificates::load(&settings)?;
    reload_on_sighup(http_cert.iter().chain(grpc_cert.iter()).cloned().collect())?;
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
        ])
        .context("metrics buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    fanfare_core::metrics::describe();
    api::describe_metrics();
    metrics::describe_gauge!(
        "fanfare_node_uptime_seconds",
        metrics::Unit::Seconds,
        "Seconds since this node started."
    );
    metrics::describe_gauge!("fanfare_node_ready", "1 while /ready answers 200, else 0.");

    let auth = Authenticator::new(&settings.auth).map_err(|e| anyhow::anyhow!(e))?;
    jwks::start(&settings.auth, &auth).await?;
    if auth.allow_anonymous() {
        tracing::warn!(
            "anonymous connections are allowed (no auth key set or auth.allow_anonymous = true)"
        );
    }
    if settings.api.key.is_empty() {
        tracing::warn!("api.key is not set: the control API will answer loopback callers only");
    }
    let mut node_cfg = settings.node_config();
    fanfare_core::proxy::describe_metrics();
    node_cfg.proxies = proxy::build(&settings)?;
    let (broker, redis): (Arc<dyn Broker>, _) = match settings.broker.kind {
        BrokerKind::Memory => {
            (Arc::new(MemoryBroker::with_config(settings.memory.broker_config())), None)
        }
        BrokerKind::Redis => {
            let redis = Arc::new(
                RedisBroker::connect(settings.redis.broker_config())
                    .await
                    .context("broker.kind = \"redis\"")?,
            );
            (redis.clone(), Some(redis))
        }
    };
    let broker_kind = match settings.broker.kind {
        BrokerKind::Memory => "memory",
        BrokerKind::Redis => "redis",
    };
    let node = Node::new(node_cfg.clone(), broker, auth, settings.channel_rules()?);
    let webhooks = webhooks::start(&settings.webhooks, &node, redis.as_deref()).await?;
    tokio::spawn(node.clone().announce_forever(Duration::from_secs(5)));
    tokio::spawn(
        node.clone().sweep_forever(settings.memory.sweep_interval, heap::trim_after_sweeps()),
    );

    let addr = settings.http_addr()?;
    let listener = listen(addr).with_context(|| format!("http.listen: cannot listen on {addr}"))?;
    tracing::info!(node = %node_cfg.name, http = %listener.local_addr()?, tls = http_cert.is_some(), broker = broker_kind, "fanfare node started");

    let grpc_addr: std::net::SocketAddr = settings.grpc.listen.parse().context("grpc.listen")?;
    let grpc_listener =
        listen(grpc_addr).with_context(|| format!("grpc.listen: cannot listen on {grpc_addr}"))?;
    tracing::info!(grpc = %grpc_listener.local_addr()?, tls = grpc_cert.is_some(), "control API listening");
    let admin = admin::Admin::new(&settings.admin, settings.limits.trusted()?).map(Arc::new);
    if admin.is_some() {
        tracing::info!("admin console at /admin (admin.enabled)");
    }
    let api_ctx =
        Arc::new(crate::api::ApiContext { admin: admin.clone(), ..settings.api.context() });
    let (stop_tx, stop_rx) = watch::channel(false);
    let api_calls = Arc::new(http::InFlight::default());
    let state = http::HttpState {
        node: node.clone(),
        ws: Arc::new(transport::WsOptions {
            allowed_origins: settings.websocket.allowed_origins.clone(),
            max_message_size: settings.websocket.max_message_size,
            read_buffer_size: settings.websocket.read_buffer_size,
            write_timeout: settings.websocket.write_timeout,
        }),
        metrics,
        api: api_ctx.clone(),
        deadlines: http::Deadlines {
            header: settings.http.header_read_timeout,
            body: settings.http.body_read_timeout,
        },
        admission: Arc::new(limits::Admission::new(&settings.limits)?),
        http_stream: settings.transports.http_stream,
        sse: settings.transports.sse,
        uni_sse: settings.transports.uni_sse,
        uni_http_stream: settings.transports.uni_http_stream,
        uni_websocket: settings.transports.uni_websocket,
        api_calls: api_calls.clone(),
        admin,
    };
    // Histogram samples are kept raw until the recorder's upkeep folds them into
    // buckets; `install_recorder` runs no upkeep, so without this they would
    // pile up between scrapes (without bound when nothing scrapes /metrics).
    let upkeep = state.metrics.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    // HTTP/1.1 only: hyper serves no HTTP/2 on this port.
    let http_tls = http_cert.map(|c| c.acceptor(&[b"http/1.1"]));
    let server = tokio::spawn(http::serve(listener, state, http_tls, stop_rx.clone()));
    let grpc = {
        let stop = stop_rx.clone();
        let threads = settings.grpc.worker_threads();
        let service = grpc::service(node.clone(), api_ctx).await?;
        let tls = grpc_cert.map(|c| c.acceptor(&[b"h2"]));
        tokio::spawn(async move {
            if let Err(e) = grpc_transport::serve(grpc_listener, threads, service, tls, stop).await
            {
                tracing::error!(error = %e, "gRPC server failed");
            }
        })
    };

    shutdown.await;
    let drain = settings.shutdown.clone();
    tracing::info!(
        delay = ?drain.drain_delay,
        period = ?drain.drain_period,
        clients = node.num_connections(),
        "draining: /ready answers 503, clients are closed with 3001 after the delay"
    );
    node.start_drain();
    let started = tokio::time::Instant::now();
    let spread = async {
        tokio::time::sleep(drain.drain_delay).await;
        node.close_spread(DisconnectCode::SHUTDOWN, drain.drain_period).await
    };
    // A second SIGTERM or SIGINT (an impatient operator) cuts the drain short.
    let second = shutdown_signal()?;
    let closed = tokio::select! {
        closed = spread => closed,
        () = second => {
            tracing::warn!("second signal: closing every client now");
            let open = node.num_connections();
            node.drain(DisconnectCode::SHUTDOWN);
            open
        }
    };
    // The listeners stay open until here: API calls (HTTP and gRPC) are
    // served during the whole drain; clients are refused with 3001.
    let deadline = tokio::time::Instant::now() + drain.drain_timeout;
    while node.num_connections() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(true);
    let _ = server.await;
    // In-flight HTTP API calls finish (bounded by drain_timeout); gRPC
    // drains gracefully (GOAWAY, in-flight calls finish), but a client that
    // never answers would hold it up forever: bounded too.
    while api_calls.count() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if tokio::time::timeout_at(deadline, grpc).await.is_err() {
        tracing::warn!("gRPC connections still open after shutdown.drain_timeout; exiting");
    }
    // Events of the closed sessions (and, with the memory queue, everything
    // not yet delivered) get what is left of the drain timeout.
    if let Some(w) = webhooks {
        w.stop(deadline).await;
    }
    tracing::info!(
        closed,
        remaining = node.num_connections(),
        api_calls = api_calls.count(),
        took = ?started.elapsed(),
        "stopped"
    );
    Ok(())
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is
/// called, not when it is first polled: before the ports answer, a signal
/// must already start a drain rather than kill the process.
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// Listen backlog. `TcpListener::bind` uses 128 (the standard library's
/// value); a burst of reconnecting clients overflows that, and every dropped
/// SYN costs its client a 1 s retransmission. The kernel caps the value at
/// `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 4096;

fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}
