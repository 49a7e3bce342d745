//! A worker runs its share of the clients and publishers: connects them at the
//! ramp rate, then follows the coordinator's phases (go, stop publishing,
//! storm, finish) and reports what it measured.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{MissedTickBehavior, sleep, timeout};

use crate::client::{Commands, Conn, Ended, Endpoint, Frame};
use crate::control::{
    Errors, FromWorker, Progress, Ready, StormRound, ToWorker, WorkerResult, hist_to_hex, new_hist,
};
use crate::grpc_publish::GrpcClient;
use crate::http_publish::ApiClient;
use crate::options::{Plan, PublishMode, Scenario, Share};
use crate::protobuf;
use crate::track::Streams;
use crate::wire::{self, Fast, Line, Probe};

/// Unix time in nanoseconds (publication timestamps compare across processes).
pub fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// Publish commands per frame stay under the server's 64 KiB message limit.
const MAX_FRAME_BYTES: usize = 48 * 1024;
/// Publisher pacing tick.
const TICK: Duration = Duration::from_millis(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Setup,
    Go,
    StopPublishing,
    Storm(usize),
    Finish,
}

/// What one task of this worker is.
#[derive(Debug, Clone, Copy)]
enum Role {
    /// Client `g`: subscribes (idle, fanout, storm), or subscribes and publishes (chat).
    Client(usize),
    /// Fanout publisher `p` over WebSocket.
    WsPublisher(usize),
    /// Fanout publisher `p` over the HTTP API.
    ApiPublisher(usize),
}

/// Counters shared by every task of the worker. The mutexes are never held
/// across an `.await`.
struct Stats {
    open: AtomicU64,
    connected: AtomicU64,
    failed: AtomicU64,
    publishers_connected: AtomicU64,
    setup_done: AtomicU64,
    first_start_ns: AtomicU64,
    last_done_ns: AtomicU64,
    published: AtomicU64,
    delivered: AtomicU64,
    last_delivery_ns: AtomicU64,
    active_publishers: AtomicU64,
    tasks_done: AtomicU64,
    connect_hist: Mutex<Histogram<u64>>,
    latency: Mutex<Histogram<u64>>,
    result: Mutex<WorkerResult>,
    storm: Mutex<StormRound>,
    setup_errors: Mutex<Errors>,
}

struct Ctx {
    plan: Plan,
    /// The `connect` command (id 1, in the plan's protocol) every client
    /// sends, when all use one token.
    connect_cmd: Vec<u8>,
    endpoints: Vec<Endpoint>,
    phase: watch::Receiver<Phase>,
    handshake: Semaphore,
    stats: Stats,
}

impl Ctx {
    /// The `connect` command (id 1) of client slot `slot`.
    fn connect_cmd_for(&self, slot: usize) -> std::borrow::Cow<'_, [u8]> {
        if self.plan.hmac_secret.is_empty() {
            return self.connect_cmd.as_slice().into();
        }
        let exp = now_ns() / 1_000_000_000 + 24 * 3600;
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &serde_json::json!({"sub": format!("lt-{slot}"), "exp": exp}),
            &jsonwebtoken::EncodingKey::from_secret(self.plan.hmac_secret.as_bytes()),
        )
        .unwrap_or_default();
        Commands::connect(self.plan.protocol, 1, &token).into()
    }

    fn error(&self, msg: impl Into<String>) {
        self.stats.result.lock().expect("stats lock").errors.add(msg);
    }
}

/// Runs one worker until `Finish` (or until the coordinator goes away).
pub async fn run(
    mut rx: mpsc::Receiver<ToWorker>,
    tx: mpsc::Sender<FromWorker>,
) -> anyhow::Result<()> {
    let Some(ToWorker::Start { plan, share }) = rx.recv().await else {
        bail!("worker: the first message must be `start`");
    };
    let plan = *plan;
    let mut endpoints = Vec::new();
    for url in &plan.urls {
        endpoints.push(Endpoint::resolve(url, plan.protocol).await?);
    }
    let roles = roles(&plan, &share);
    let (phase_tx, phase_rx) = watch::channel(Phase::Setup);
    let concurrency = (plan.concurrency / share.count).max(1);
    let ctx = Arc::new(Ctx {
        stats: Stats {
            open: AtomicU64::new(0),
            connected: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            publishers_connected: AtomicU64::new(0),
            setup_done: AtomicU64::new(0),
            first_start_ns: AtomicU64::new(u64::MAX),
            last_done_ns: AtomicU64::new(0),
            published: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            last_delivery_ns: AtomicU64::new(0),
            active_publishers: AtomicU64::new(0),
            tasks_done: AtomicU64::new(0),
            connect_hist: Mutex::new(new_hist()),
            latency: Mutex::new(new_hist()),
            result: Mutex::new(WorkerResult {
                subs_per_channel: vec![0; plan.channels],
                published_per_channel: vec![0; plan.channels],
                ..Default::default()
            }),
            storm: Mutex::new(StormRound::default()),
            setup_errors: Mutex::new(Errors::default()),
        },
        connect_cmd: Commands::connect(plan.protocol, 1, &plan.token),
        plan,
        endpoints,
        phase: phase_rx,
        handshake: Semaphore::new(concurrency),
    });

    let progress = tokio::spawn(progress_loop(ctx.clone(), tx.clone()));
    let mut tasks = JoinSet::new();
    let total = roles.len() as u64;
    let ramp = ctx.plan.ramp / share.count as f64;
    let t0 = tokio::time::Instant::now();
    let mut clients_spawned = 0u64;
    for role in roles {
        if let (Role::Client(_), true) = (role, ramp > 0.0) {
            let at = t0 + Duration::from_secs_f64(clients_spawned as f64 / ramp);
            tokio::time::sleep_until(at).await;
            clients_spawned += 1;
        }
        tasks.spawn(task(ctx.clone(), role));
    }
    while ctx.stats.setup_done.load(Relaxed) < total {
        sleep(Duration::from_millis(20)).await;
    }
    let s = &ctx.stats;
    let ready = Ready {
        connected: s.connected.load(Relaxed),
        failed: s.failed.load(Relaxed),
        publishers_connected: s.publishers_connected.load(Relaxed),
        first_start_ns: s.first_start_ns.load(Relaxed),
        last_done_ns: s.last_done_ns.load(Relaxed),
        connect_hist: hist_to_hex(&s.connect_hist.lock().expect("stats lock")),
        errors: s.setup_errors.lock().expect("stats lock").clone(),
    };
    tx.send(FromWorker::Ready(ready)).await.ok();

    loop {
        let msg = rx.recv().await.unwrap_or(ToWorker::Finish);
        match msg {
            ToWorker::Start { .. } => bail!("worker: `start` sent twice"),
            ToWorker::Go => {
                phase_tx.send_replace(Phase::Go);
            }
            ToWorker::StopPublishing => {
                phase_tx.send_replace(Phase::StopPublishing);
                drain(&ctx).await;
                tx.send(FromWorker::Drained).await.ok();
            }
            ToWorker::Storm { round } => {
                let participants = ctx.stats.open.load(Relaxed);
                *ctx.stats.storm.lock().expect("stats lock") =
                    StormRound { round, participants, ..Default::default() };
                phase_tx.send_replace(Phase::Storm(round));
                let deadline = Instant::now() + ctx.plan.storm_timeout + Duration::from_secs(5);
                loop {
                    let st = ctx.stats.storm.lock().expect("stats lock").clone();
                    if st.relived + st.failed >= participants || Instant::now() > deadline {
                        tx.send(FromWorker::StormDone(st)).await.ok();
                        break;
                    }
                    sleep(Duration::from_millis(10)).await;
                }
            }
            ToWorker::Finish => break,
        }
    }

    phase_tx.send_replace(Phase::Finish);
    let ended =
        timeout(Duration::from_secs(10), async { while tasks.join_next().await.is_some() {} })
            .await;
    if ended.is_err() {
        ctx.error("some connections did not close within 10 s");
        tasks.abort_all();
    }
    progress.abort();
    let mut result = ctx.stats.result.lock().expect("stats lock").clone();
    result.published = ctx.stats.published.load(Relaxed);
    result.last_delivery_ns = ctx.stats.last_delivery_ns.load(Relaxed);
    result.latency_hist = hist_to_hex(&ctx.stats.latency.lock().expect("stats lock"));
    tx.send(FromWorker::Done(Box::new(result))).await.ok();
    Ok(())
}

/// Publishers first (few, needed by everyone), then clients in index order.
fn roles(plan: &Plan, share: &Share) -> Vec<Role> {
    let mut roles = Vec::new();
    if plan.scenario == Scenario::Fanout {
        for &p in &share.publishers {
            roles.push(match plan.publish_mode {
                PublishMode::Client => Role::WsPublisher(p),
                PublishMode::Http | PublishMode::Grpc => Role::ApiPublisher(p),
            });
        }
    }
    roles.extend((share.clients.0..share.clients.1).map(Role::Client));
    roles
}

/// Waits until local publishers got their replies, then until no publication
/// arrived for a second (bounded by `plan.drain`).
async fn drain(ctx: &Ctx) {
    let deadline = Instant::now() + ctx.plan.drain;
    while ctx.stats.active_publishers.load(Relaxed) > 0 && Instant::now() < deadline {
        sleep(Duration::from_millis(10)).await;
    }
    let mut last = ctx.stats.delivered.load(Relaxed);
    let mut quiet_since = Instant::now();
    while Instant::now() < deadline && quiet_since.elapsed() < Duration::from_secs(1) {
        sleep(Duration::from_millis(50)).await;
        let now = ctx.stats.delivered.load(Relaxed);
        if now != last {
            last = now;
            quiet_since = Instant::now();
        }
    }
}

async fn progress_loop(ctx: Arc<Ctx>, tx: mpsc::Sender<FromWorker>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let s = &ctx.stats;
        let p = Progress {
            open: s.open.load(Relaxed),
            connected: s.connected.load(Relaxed),
            failed: s.failed.load(Relaxed),
            published: s.published.load(Relaxed),
            delivered: s.delivered.load(Relaxed),
            p99_us: s.latency.lock().expect("stats lock").value_at_quantile(0.99),
        };
        if tx.send(FromWorker::Progress(p)).await.is_err() {
            return;
        }
    }
}

async fn task(ctx: Arc<Ctx>, role: Role) {
    match role {
        Role::ApiPublisher(p) => api_publisher(&ctx, p).await,
        Role::Client(_) | Role::WsPublisher(_) => ws_client(&ctx, role).await,
    }
    ctx.stats.tasks_done.fetch_add(1, Relaxed);
}

/// One publishing stream owner: sequence numbers per channel, pacing, replies.
struct Publisher {
    id: u32,
    channels: Vec<u32>,
    names: Vec<String>,
    rate: f64,
    payload_size: usize,
    seqs: Vec<u64>,
    next: usize,
    started: Option<Instant>,
    sent: u64,
    /// Command id -> channel position, for publications awaiting their reply.
    in_flight: HashMap<u32, usize>,
    accepted: Vec<u64>,
    errors: u64,
    stopping: bool,
    finished: bool,
}

impl Publisher {
    fn new(plan: &Plan, id: usize) -> Publisher {
        let channels = plan.publisher_channels(id);
        Publisher {
            id: id as u32,
            names: channels.iter().map(|&c| plan.channel_name(c)).collect(),
            seqs: vec![0; channels.len()],
            accepted: vec![0; channels.len()],
            channels,
            rate: plan.publisher_rate(),
            payload_size: plan.payload_size,
            next: 0,
            started: None,
            sent: 0,
            in_flight: HashMap::new(),
            errors: 0,
            stopping: false,
            finished: false,
        }
    }

    /// Publications due by now and not sent yet. The k-th publication (from 0)
    /// is due at (k - phase) / rate, with a phase in [0, 1) that differs per
    /// publisher: many slow publishers spread out instead of firing together,
    /// and the count over a window is right on average.
    fn due(&self) -> u64 {
        let Some(start) = self.started else { return 0 };
        ((start.elapsed().as_secs_f64() * self.rate + self.phase()) as u64)
            .saturating_sub(self.sent)
    }

    fn phase(&self) -> f64 {
        (f64::from(self.id) * 0.618_033_988_75).fract()
    }

    /// The next publication: (channel position, channel name, probe JSON).
    fn next_publication(&mut self) -> (usize, String) {
        let pos = self.next % self.channels.len();
        self.next += 1;
        self.seqs[pos] += 1;
        self.sent += 1;
        let probe = Probe { ts: now_ns(), seq: self.seqs[pos], p: self.id };
        (pos, probe.encode(self.payload_size))
    }

    /// Sends every due publication, batched into frames.
    async fn publish_due(&mut self, conn: &mut Conn, ctx: &Ctx) -> std::io::Result<()> {
        let room = ctx.plan.max_in_flight.saturating_sub(self.in_flight.len()) as u64;
        let n = self.due().min(room);
        let mut frame = Commands::new(conn.protocol());
        for _ in 0..n {
            let (pos, data) = self.next_publication();
            let id = conn.next_id();
            frame.publish(id, &self.names[pos], &data);
            self.in_flight.insert(id, pos);
            if frame.buf.len() >= MAX_FRAME_BYTES {
                conn.send(&frame.buf);
                frame.buf.clear();
            }
        }
        if !frame.buf.is_empty() {
            conn.send(&frame.buf);
        }
        if n > 0 {
            conn.flush().await?;
            ctx.stats.published.fetch_add(n, Relaxed);
        }
        Ok(())
    }

    /// The reply to command `id`, with its error (code, message) if any.
    fn on_reply(&mut self, id: u32, error: Option<(u32, &str)>, ctx: &Ctx) {
        let Some(pos) = self.in_flight.remove(&id) else { return };
        match error {
            None => self.accepted[pos] += 1,
            Some((code, message)) => {
                self.errors += 1;
                ctx.error(format!("publish error {code} {message}"));
            }
        }
    }

    /// Adds this publisher's figures to the worker's, once.
    fn finish(&mut self, ctx: &Ctx) {
        if self.finished {
            return;
        }
        self.finished = true;
        let mut r = ctx.stats.result.lock().expect("stats lock");
        for (pos, &c) in self.channels.iter().enumerate() {
            r.published_per_channel[c as usize] += self.accepted[pos];
        }
        for &pos in self.in_flight.values() {
            r.published_per_channel[self.channels[pos] as usize] += 1;
        }
        r.unacked += self.in_flight.len() as u64;
        r.publish_errors += self.errors;
        drop(r);
        if self.started.is_some() {
            ctx.stats.active_publishers.fetch_sub(1, Relaxed);
        }
    }
}

/// Connects, subscribes, then serves one WebSocket client until `Finish`.
async fn ws_client(ctx: &Ctx, role: Role) {
    let plan = &ctx.plan;
    let (slot, channels, mut publisher) = match role {
        Role::Client(g) => {
            let publisher = (plan.scenario == Scenario::Chat).then(|| Publisher::new(plan, g));
            (g, plan.client_channels(g), publisher)
        }
        Role::WsPublisher(p) => (plan.connections + p, Vec::new(), Some(Publisher::new(plan, p))),
        Role::ApiPublisher(_) => unreachable!("API publishers have no WebSocket"),
    };
    let is_client = matches!(role, Role::Client(_));
    let names: Vec<String> = channels.iter().map(|&c| plan.channel_name(c)).collect();
    let ep = &ctx.endpoints[slot % ctx.endpoints.len()];
    let source = ep.source_for(slot, plan.source_ips);
    let connect_cmd = ctx.connect_cmd_for(slot);
    let s = &ctx.stats;

    let setup = {
        let _permit = ctx.handshake.acquire().await.expect("semaphore is never closed");
        s.first_start_ns.fetch_min(now_ns(), Relaxed);
        let started = Instant::now();
        let r = timeout(plan.connect_timeout, async {
            let mut c = Conn::open(ep, source, &connect_cmd).await?;
            let handshake = started.elapsed();
            c.subscribe(&names).await?;
            anyhow::Ok((c, handshake))
        })
        .await;
        match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(format!("{e:#}")),
            Err(_) => Err(format!("handshake timed out after {:?}", plan.connect_timeout)),
        }
    };
    let mut conn = match setup {
        Ok((c, handshake)) => {
            s.last_done_ns.fetch_max(now_ns(), Relaxed);
            if is_client {
                s.connected.fetch_add(1, Relaxed);
                let us = (handshake.as_micros() as u64).max(1);
                s.connect_hist.lock().expect("stats lock").saturating_record(us);
                let mut r = s.result.lock().expect("stats lock");
                for &c in &channels {
                    r.subs_per_channel[c as usize] += 1;
                }
            } else {
                s.publishers_connected.fetch_add(1, Relaxed);
            }
            s.open.fetch_add(1, Relaxed);
            s.setup_done.fetch_add(1, Relaxed);
            Some(c)
        }
        Err(e) => {
            s.failed.fetch_add(1, Relaxed);
            s.setup_errors.lock().expect("stats lock").add(e);
            s.setup_done.fetch_add(1, Relaxed);
            publisher = None;
            None
        }
    };

    let mut phase_rx = ctx.phase.clone();
    let mut streams = Streams::default();
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut publishing = false;
    loop {
        let phase = match conn.as_mut() {
            None => match phase_rx.changed().await {
                Ok(()) => *phase_rx.borrow_and_update(),
                Err(_) => Phase::Finish,
            },
            Some(c) => {
                // Serve the connection until the phase changes or it ends. The
                // phase future lives across reads: arming one per read costs.
                let served = {
                    let changed = phase_rx.changed();
                    tokio::pin!(changed);
                    loop {
                        tokio::select! {
                            r = &mut changed => break Ok(r.is_ok()),
                            r = c.read() => {
                                if let Err(e) = r {
                                    break Err(e);
                                }
                                if let Err(e) = serve(ctx, c, &mut streams, publisher.as_mut()).await {
                                    break Err(e);
                                }
                            }
                            _ = ticker.tick(), if publishing => {
                                let Some(p) = publisher.as_mut() else { continue };
                                if let Err(e) = p.publish_due(c, ctx).await {
                                    ctx.error(format!("publishing: {e}"));
                                    publishing = false;
                                }
                            }
                        }
                    }
                };
                match served {
                    Ok(true) => *phase_rx.borrow_and_update(),
                    Ok(false) => Phase::Finish,
                    Err(e) => {
                        conn = None;
                        s.open.fetch_sub(1, Relaxed);
                        publishing = false;
                        let mut r = s.result.lock().expect("stats lock");
                        r.unexpected_disconnects += 1;
                        r.errors.add(e.to_string());
                        continue;
                    }
                }
            }
        };
        match phase {
            Phase::Go => {
                if let (Some(p), true) = (publisher.as_mut(), conn.is_some()) {
                    p.started = Some(Instant::now());
                    s.active_publishers.fetch_add(1, Relaxed);
                    publishing = true;
                    ticker.reset();
                }
            }
            Phase::StopPublishing => {
                publishing = false;
                if let Some(p) = publisher.as_mut() {
                    p.stopping = true;
                    if p.in_flight.is_empty() {
                        p.finish(ctx);
                    }
                }
            }
            Phase::Storm(_) => {
                if conn.take().is_some() {
                    s.open.fetch_sub(1, Relaxed);
                    conn = reconnect(ctx, ep, source, &connect_cmd, &names).await;
                }
            }
            Phase::Finish => break,
            Phase::Setup => {}
        }
    }
    if let Some(p) = publisher.as_mut() {
        p.finish(ctx);
    }
    if let Some(c) = conn.take() {
        s.open.fetch_sub(1, Relaxed);
        let _ = timeout(Duration::from_secs(2), c.close()).await;
    }
    let mut r = s.result.lock().expect("stats lock");
    r.received += streams.tally.received;
    r.duplicated += streams.tally.duplicated;
    r.out_of_order += streams.tally.out_of_order;
}

/// Handles what one read brought: publications, publish replies, pings
/// (answered), unexpected pushes. `Err` when the server closed or broke the
/// connection.
async fn serve(
    ctx: &Ctx,
    c: &mut Conn,
    streams: &mut Streams,
    publisher: Option<&mut Publisher>,
) -> Result<(), Ended> {
    let now = now_ns();
    let delivered;
    let publisher = {
        let mut hist = ctx.stats.latency.lock().expect("stats lock");
        let mut sink = Sink { ctx, now, streams, hist: &mut hist, delivered: 0, publisher };
        c.handle(|frame| match frame {
            Frame::Text(text) => on_json(&mut sink, text),
            Frame::Binary(bytes) => on_protobuf(&mut sink, bytes),
        })?;
        delivered = sink.delivered;
        sink.publisher
    };
    if delivered > 0 {
        ctx.stats.delivered.fetch_add(delivered, Relaxed);
        ctx.stats.last_delivery_ns.fetch_max(now, Relaxed);
    }
    if let Some(p) = publisher
        && p.stopping
        && p.in_flight.is_empty()
    {
        p.finish(ctx);
    }
    if let Err(e) = c.flush().await {
        ctx.error(format!("sending pong: {e}"));
    }
    Ok(())
}

/// Where the messages of one read go, whatever the protocol. (`'h`: the
/// latency histogram's lock is held for one read only.)
struct Sink<'a, 'h> {
    ctx: &'a Ctx,
    /// When the read returned (latency = now - the probe's send time).
    now: u64,
    streams: &'a mut Streams,
    hist: &'h mut Histogram<u64>,
    delivered: u64,
    publisher: Option<&'a mut Publisher>,
}

impl Sink<'_, '_> {
    fn probe(&mut self, channel: &str, probe: Probe) {
        if let Some(ch) = self.ctx.plan.channel_index(channel) {
            self.streams.record(ch, probe.p, probe.seq);
            self.hist.saturating_record((self.now.saturating_sub(probe.ts) / 1000).max(1));
            self.delivered += 1;
        }
    }

    fn reply(&mut self, id: u32, error: Option<(u32, &str)>) {
        if let Some(p) = self.publisher.as_deref_mut() {
            p.on_reply(id, error, self.ctx);
        }
    }

    fn disconnect(&self, code: u32, reason: &str) {
        self.ctx.error(format!("disconnect push {code} {reason}"));
    }

    fn unsubscribed(&self, channel: &str, code: u32) {
        self.ctx.error(format!("server unsubscribed {channel} (code {code})"));
    }

    fn undecodable(&self, e: impl std::fmt::Display) {
        self.ctx.error(format!("undecodable message: {e}"));
    }
}

/// Handles one JSON text message; returns how many server pings it held.
fn on_json(sink: &mut Sink<'_, '_>, text: &str) -> usize {
    let mut pings = 0;
    for line in text.split('\n') {
        let line = line.trim_ascii();
        if line.is_empty() {
            continue;
        }
        let m = match wire::fast(line) {
            Fast::Ping => {
                pings += 1;
                continue;
            }
            Fast::Probe { channel, probe } => {
                sink.probe(channel, probe);
                continue;
            }
            Fast::Reply(id) => {
                sink.reply(id, None);
                continue;
            }
            // Everything else: the complete decode.
            Fast::Other => match wire::lines(line).next() {
                Some(Ok(Line::Message(m))) => m,
                Some(Ok(Line::Ping)) | None => continue,
                Some(Err(e)) => {
                    sink.undecodable(e);
                    continue;
                }
            },
        };
        if m.id != 0 {
            sink.reply(m.id, m.error.as_ref().map(|e| (e.code, e.message.as_str())));
            continue;
        }
        let Some(push) = m.push else { continue };
        if let Some(publication) = push.publication {
            if let Some(probe) = publication.probe() {
                sink.probe(&push.channel, probe);
            }
        } else if let Some(d) = push.disconnect {
            sink.disconnect(d.code, &d.reason);
        } else if let Some(u) = push.unsubscribe {
            sink.unsubscribed(&push.channel, u.code);
        }
    }
    pings
}

/// Handles one Protobuf binary message (length-delimited replies); returns
/// how many server pings (empty replies) it held.
fn on_protobuf(sink: &mut Sink<'_, '_>, frame: &[u8]) -> usize {
    let mut pings = 0;
    for msg in protobuf::messages(frame) {
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                sink.undecodable(e);
                break;
            }
        };
        let r = match protobuf::fast(msg) {
            Fast::Ping => {
                pings += 1;
                continue;
            }
            Fast::Probe { channel, probe } => {
                sink.probe(channel, probe);
                continue;
            }
            Fast::Reply(id) => {
                sink.reply(id, None);
                continue;
            }
            Fast::Other => match protobuf::decode(msg) {
                Ok(r) => r,
                Err(e) => {
                    sink.undecodable(e);
                    continue;
                }
            },
        };
        if r.id != 0 {
            sink.reply(r.id, r.error.as_ref().map(|e| (e.code, e.message.as_str())));
            continue;
        }
        let Some(push) = r.push else { continue };
        if let Some(publication) = push.r#pub {
            let probe = std::str::from_utf8(&publication.data)
                .ok()
                .and_then(|d| serde_json::from_str::<Probe>(d).ok());
            if let Some(probe) = probe {
                sink.probe(&push.channel, probe);
            }
        } else if let Some(d) = push.disconnect {
            sink.disconnect(d.code, &d.reason);
        } else if let Some(u) = push.unsubscribe {
            sink.unsubscribed(&push.channel, u.code);
        }
    }
    pings
}

/// Reconnects and resubscribes after a storm drop, retrying with jittered
/// exponential backoff (as SDKs do) until the storm timeout.
async fn reconnect(
    ctx: &Ctx,
    ep: &Endpoint,
    source: Option<std::net::Ipv4Addr>,
    connect_cmd: &[u8],
    names: &[String],
) -> Option<Conn> {
    let deadline = Instant::now() + ctx.plan.storm_timeout;
    let mut backoff = Duration::from_millis(100);
    let mut attempt = 0u64;
    loop {
        let r = timeout(ctx.plan.connect_timeout, async {
            let mut c = Conn::open(ep, source, connect_cmd).await?;
            c.subscribe(names).await?;
            anyhow::Ok(c)
        })
        .await
        .map_err(|_| anyhow::anyhow!("handshake timed out"))
        .and_then(|r| r);
        {
            let mut st = ctx.stats.storm.lock().expect("stats lock");
            match r {
                Ok(c) => {
                    st.relived += 1;
                    st.last_live_ns = st.last_live_ns.max(now_ns());
                    ctx.stats.open.fetch_add(1, Relaxed);
                    return Some(c);
                }
                Err(e) => {
                    st.errors.add(format!("{e:#}"));
                    if Instant::now() + backoff > deadline {
                        st.failed += 1;
                        return None;
                    }
                    st.retries += 1;
                }
            }
        }
        // Jitter between half and the full backoff, different per client.
        attempt += 1;
        let mix = (source.map(u32::from).unwrap_or(0) as u64 ^ names.len() as u64 ^ now_ns())
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(attempt);
        let frac = 0.5 + (mix >> 40) as f64 / (1u64 << 25) as f64;
        sleep(backoff.mul_f64(frac.min(1.0))).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// The control API a publisher calls: HTTP or gRPC.
enum Api {
    Http(ApiClient),
    Grpc(GrpcClient),
}

impl Api {
    async fn connect(plan: &Plan) -> anyhow::Result<Api> {
        Ok(match plan.publish_mode {
            PublishMode::Grpc => {
                Api::Grpc(GrpcClient::connect(&plan.grpc_url, &plan.api_key).await?)
            }
            _ => Api::Http(ApiClient::connect(&plan.api_url, &plan.api_key).await?),
        })
    }

    async fn publish(&mut self, channel: &str, data: &str) -> anyhow::Result<()> {
        match self {
            Api::Http(c) => c.publish(channel, data).await,
            Api::Grpc(c) => c.publish(channel, data).await,
        }
    }
}

/// A fanout publisher over the control API (`POST /api/publish` or gRPC
/// `Publish`): one call at a time, paced.
async fn api_publisher(ctx: &Ctx, p: usize) {
    let plan = &ctx.plan;
    let s = &ctx.stats;
    let client = timeout(plan.connect_timeout, Api::connect(plan))
        .await
        .map_err(|_| anyhow::anyhow!("API connect timed out"))
        .and_then(|r| r);
    let mut client = match client {
        Ok(c) => {
            s.publishers_connected.fetch_add(1, Relaxed);
            s.setup_done.fetch_add(1, Relaxed);
            c
        }
        Err(e) => {
            s.failed.fetch_add(1, Relaxed);
            s.setup_errors.lock().expect("stats lock").add(format!("{e:#}"));
            s.setup_done.fetch_add(1, Relaxed);
            return;
        }
    };
    let mut phase_rx = ctx.phase.clone();
    while *phase_rx.borrow_and_update() == Phase::Setup {
        if phase_rx.changed().await.is_err() {
            return;
        }
    }
    let mut publisher = Publisher::new(plan, p);
    if *phase_rx.borrow() != Phase::Go {
        return;
    }
    publisher.started = Some(Instant::now());
    s.active_publishers.fetch_add(1, Relaxed);
    let start = Instant::now();
    while *phase_rx.borrow() == Phase::Go {
        if publisher.due() == 0 {
            let k = (publisher.sent + 1) as f64 - publisher.phase();
            let next = start + Duration::from_secs_f64(k.max(0.0) / publisher.rate);
            tokio::select! {
                _ = tokio::time::sleep_until(next.into()) => {}
                _ = phase_rx.changed() => {}
            }
            continue;
        }
        let (pos, data) = publisher.next_publication();
        s.published.fetch_add(1, Relaxed);
        match client.publish(&publisher.names[pos], &data).await {
            Ok(()) => publisher.accepted[pos] += 1,
            Err(e) => {
                publisher.errors += 1;
                ctx.error(format!("{e:#}"));
            }
        }
    }
    publisher.finish(ctx);
}

/// Runs a worker in this process as the child of a coordinator: control
/// messages are JSON lines on stdin, reports JSON lines on stdout.
/// One thread per worker process: its tasks never contend for locks or
/// wake each other across threads; `--workers N` uses N cores.
pub fn main_child() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let (to_tx, to_rx) = mpsc::channel::<ToWorker>(16);
        let (from_tx, mut from_rx) = mpsc::channel::<FromWorker>(64);
        tokio::spawn(async move {
            let mut lines = BufReader::new(tokio::io::stdin()).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<ToWorker>(&line) {
                    Ok(msg) => {
                        if let ToWorker::Start { plan, .. } = &msg {
                            // Bound the process even if the coordinator vanishes.
                            let limit = plan.max_time + Duration::from_secs(30);
                            tokio::spawn(async move {
                                sleep(limit).await;
                                eprintln!("fanfare-loadtest worker: max time exceeded, exiting");
                                std::process::exit(3);
                            });
                        }
                        if to_tx.send(msg).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => eprintln!("fanfare-loadtest worker: bad control line: {e}"),
                }
            }
        });
        let writer = tokio::spawn(async move {
            let mut out = tokio::io::stdout();
            while let Some(msg) = from_rx.recv().await {
                let mut line = serde_json::to_string(&msg).expect("reports always serialize");
                line.push('\n');
                if out.write_all(line.as_bytes()).await.is_err() || out.flush().await.is_err() {
                    break;
                }
            }
        });
        let r = run(to_rx, from_tx).await;
        writer.await.context("stdout writer")?;
        r
    })
}
