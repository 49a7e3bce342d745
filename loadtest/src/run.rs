//! The coordinator: runs a plan's phases over the workers, measures the
//! server around them, merges what the workers measured into a [`Report`].

use std::time::{Duration, Instant};

use crate::control::{
    Errors, FromWorker, Ready, StormRound, ToWorker, WorkerResult, hist_from_hex, new_hist,
};
use crate::fleet::Fleet;
use crate::options::{Plan, Scenario, Share};
use crate::procfs::{self, CpuTimes};
use crate::redis_stats;
use crate::report::{
    Connect, Connections, Loadgen, Machine, Messages, Percentiles, Report, Server, Storm,
    StormRoundReport, git_commit, rfc3339,
};
use crate::worker::now_ns;

/// Server CPU (sum over `--server-pid`s), if any.
fn server_cpu(plan: &Plan) -> Option<CpuTimes> {
    procfs::sum(&plan.server_pids, procfs::cpu_times)
}

fn server_rss(plan: &Plan) -> Option<u64> {
    procfs::sum(&plan.server_pids, procfs::rss_bytes)
}

fn rate(delta: Option<f64>, secs: f64) -> Option<f64> {
    delta.map(|d| if secs > 0.0 { d / secs } else { 0.0 })
}

/// A window of CPU measurements: server and load generator.
struct CpuMark {
    at: Instant,
    server: Option<CpuTimes>,
    loadgen: CpuTimes,
    /// Machine-wide (process time, interrupt time).
    machine: Option<(f64, f64)>,
}

impl CpuMark {
    fn now(plan: &Plan, fleet: &Fleet) -> CpuMark {
        CpuMark {
            at: Instant::now(),
            server: server_cpu(plan),
            loadgen: fleet.cpu_times(),
            machine: procfs::machine_busy_seconds().ok(),
        }
    }

    /// Machine-wide CPU s/s since `self`: busy, interrupts, and process time
    /// used by neither the server nor the load generator.
    fn machine_to(&self, end: &CpuMark) -> Machine {
        let secs = end.at.duration_since(self.at).as_secs_f64();
        // /proc/stat counts 10 ms ticks: over a shorter window than this the
        // rates are noise (a 100-client connect phase takes ~10 ms and showed
        // "other processes used 1.2 CPU s/s").
        let diff = match (self.machine, end.machine) {
            (Some(a), Some(b)) if secs >= MIN_RATE_WINDOW_SECS => {
                Some(((b.0 - a.0) / secs, (b.1 - a.1) / secs))
            }
            _ => None,
        };
        let (_, server, loadgen) = self.rates_to(end);
        Machine {
            cpu_busy_seconds_per_second: diff.map(|(p, i)| p + i),
            irq_cpu_seconds_per_second: diff.map(|(_, i)| i),
            other_cpu_seconds_per_second: diff
                .map(|(p, _)| (p - server.unwrap_or(0.0) - loadgen).max(0.0)),
        }
    }

    /// CPU the server (if measured) and the generator used since `self`.
    fn cpu_to(&self, end: &CpuMark) -> (Option<CpuTimes>, CpuTimes) {
        (self.server.zip(end.server).map(|(a, b)| b - a), end.loadgen - self.loadgen)
    }

    /// (seconds, server CPU s/s, loadgen CPU s/s) since `self`.
    fn rates_to(&self, end: &CpuMark) -> (f64, Option<f64>, f64) {
        let secs = end.at.duration_since(self.at).as_secs_f64();
        let (server, loadgen) = self.cpu_to(end);
        (
            secs,
            rate(server.map(CpuTimes::total), secs),
            rate(Some(loadgen.total()), secs).unwrap_or(0.0),
        )
    }

    /// The kernel's part (system time / all CPU time) of the server's and the
    /// generator's CPU since `self`; `None` where no CPU time was charged.
    fn kernel_shares_to(&self, end: &CpuMark) -> (Option<f64>, Option<f64>) {
        let share = |d: CpuTimes| (d.total() > 0.0).then(|| d.system / d.total());
        let (server, loadgen) = self.cpu_to(end);
        (server.and_then(share), share(loadgen))
    }
}

/// Runs the plan to the end; every phase is bounded by `plan.max_time`.
pub async fn run(plan: Plan, command_line: Vec<String>, quiet: bool) -> anyhow::Result<Report> {
    let started = Instant::now();
    let deadline = started + plan.max_time;
    let mut report = Report {
        tool: "fanfare-loadtest".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        scenario: format!("{:?}", plan.scenario).to_lowercase(),
        command_line,
        git_commit: git_commit(),
        date: rfc3339(now_ns() / 1_000_000_000),
        cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        ..Default::default()
    };

    let mut fleet = Fleet::spawn(plan.workers, quiet, plan.connections as u64)?;
    let rss_before = server_rss(&plan);
    let setup_start = CpuMark::now(&plan, &fleet);
    for (i, share) in Share::split(&plan, fleet.len()).into_iter().enumerate() {
        fleet.send(i, ToWorker::Start { plan: Box::new(plan.clone()), share }).await?;
    }
    let readies = fleet
        .wait_all("the connect phase", deadline, |m| match m {
            FromWorker::Ready(r) => Some(r),
            _ => None,
        })
        .await?;
    let setup_end = CpuMark::now(&plan, &fleet);
    report.connections = connections(&plan, &readies);
    report.connect = connect(&readies, &setup_start, &setup_end);
    report.machine_connect = setup_start.machine_to(&setup_end);
    let mut errors = Errors::default();
    for r in &readies {
        errors.merge(&r.errors);
    }

    fleet.pause(plan.settle, deadline).await?;
    let rss_after = server_rss(&plan);

    let main_start = CpuMark::now(&plan, &fleet);
    let go_ns = now_ns();
    let mut publish_seconds = 0.0;
    let mut storm = None;
    let mut main_end = None;
    match plan.scenario {
        Scenario::Idle => {
            fleet.send_all(ToWorker::Go).await?;
            fleet.pause(plan.hold, deadline).await?;
        }
        Scenario::Fanout | Scenario::Chat => {
            fleet.send_all(ToWorker::Go).await?;
            fleet.pause(plan.duration, deadline).await?;
            fleet.send_all(ToWorker::StopPublishing).await?;
            publish_seconds = main_start.at.elapsed().as_secs_f64();
            main_end = Some(CpuMark::now(&plan, &fleet));
            fleet
                .wait_all("in-flight publications", deadline, |m| {
                    matches!(m, FromWorker::Drained).then_some(())
                })
                .await?;
        }
        Scenario::Storm => {
            storm = Some(run_storms(&plan, &mut fleet, deadline, &mut errors).await?);
        }
    }
    let main_end = main_end.unwrap_or_else(|| CpuMark::now(&plan, &fleet));
    let (window, server_rate, loadgen_rate) = main_start.rates_to(&main_end);
    report.machine = main_start.machine_to(&main_end);

    fleet.send_all(ToWorker::Finish).await?;
    let results = fleet
        .wait_all("the final report", deadline, |m| match m {
            FromWorker::Done(r) => Some(*r),
            _ => None,
        })
        .await?;
    let total_cpu = fleet.cpu_seconds();
    fleet.shutdown().await;

    report.server = Server {
        pids: plan.server_pids.clone(),
        rss_before_bytes: rss_before,
        rss_after_bytes: rss_after,
        rss_per_connection_bytes: match (rss_before, rss_after, report.connections.connected) {
            (Some(b), Some(a), n) if n > 0 => Some((a as f64 - b as f64) / n as f64),
            _ => None,
        },
        window_seconds: window,
        cpu_seconds_per_second: server_rate,
    };
    report.loadgen = Loadgen {
        workers: plan.workers,
        cpu_seconds_per_second: loadgen_rate,
        cpu_seconds_total: total_cpu,
    };
    for r in &results {
        errors.merge(&r.errors);
        report.connections.unexpected_disconnects += r.unexpected_disconnects;
    }
    if matches!(plan.scenario, Scenario::Fanout | Scenario::Chat) {
        let mut m = messages(&results, publish_seconds, go_ns)?;
        let dps = m.deliveries_per_second;
        let per_delivery = |rate: f64| (dps > 0.0).then(|| rate * 1e6 / dps);
        m.server_cpu_us_per_delivery = server_rate.and_then(per_delivery);
        m.loadgen_cpu_us_per_delivery = per_delivery(loadgen_rate);
        (m.server_kernel_share, m.loadgen_kernel_share) = main_start.kernel_shares_to(&main_end);
        report.messages = Some(m);
    }
    report.storm = storm;
    report.errors = errors;
    report.elapsed_seconds = started.elapsed().as_secs_f64();
    report.problems = problems(&plan, &report);
    report.warnings = warnings(&plan, &report);
    report.ok = report.problems.is_empty();
    report.plan = Some(plan);
    Ok(report)
}

fn connections(plan: &Plan, readies: &[Ready]) -> Connections {
    let connected: u64 = readies.iter().map(|r| r.connected).sum();
    Connections {
        target: plan.connections as u64,
        connected,
        failed: readies.iter().map(|r| r.failed).sum(),
        publishers_connected: readies.iter().map(|r| r.publishers_connected).sum(),
        subscriptions: connected * plan.subs as u64,
        unexpected_disconnects: 0,
    }
}

fn connect(readies: &[Ready], start: &CpuMark, end: &CpuMark) -> Connect {
    let first = readies.iter().map(|r| r.first_start_ns).min().unwrap_or(0);
    let last = readies.iter().map(|r| r.last_done_ns).max().unwrap_or(0);
    let seconds = last.saturating_sub(first) as f64 / 1e9;
    let connected: u64 = readies.iter().map(|r| r.connected).sum();
    let mut h = new_hist();
    for r in readies {
        if let Ok(w) = hist_from_hex(&r.connect_hist) {
            h.add(&w).ok();
        }
    }
    let (window, server, loadgen) = start.rates_to(end);
    let (server_kernel_share, loadgen_kernel_share) = start.kernel_shares_to(end);
    let per_connect = |rate: f64| (connected > 0).then(|| rate * window * 1e6 / connected as f64);
    Connect {
        seconds,
        rate_per_second: if seconds > 0.0 { connected as f64 / seconds } else { 0.0 },
        handshake_us: Percentiles::of(&h),
        server_cpu_seconds_per_second: server,
        loadgen_cpu_seconds_per_second: loadgen,
        server_cpu_us_per_connect: server.and_then(per_connect),
        loadgen_cpu_us_per_connect: per_connect(loadgen),
        server_kernel_share,
        loadgen_kernel_share,
    }
}

fn messages(
    results: &[WorkerResult],
    publish_seconds: f64,
    go_ns: u64,
) -> anyhow::Result<Messages> {
    let channels = results.first().map(|r| r.subs_per_channel.len()).unwrap_or(0);
    let mut subs = vec![0u64; channels];
    let mut published = vec![0u64; channels];
    let mut h = new_hist();
    let mut m = Messages { publish_seconds, ..Default::default() };
    let mut last_ns = 0;
    for r in results {
        for c in 0..channels {
            subs[c] += u64::from(r.subs_per_channel[c]);
            published[c] += r.published_per_channel[c];
        }
        h.add(&hist_from_hex(&r.latency_hist)?)?;
        m.published += r.published;
        m.publish_errors += r.publish_errors;
        m.unacked += r.unacked;
        m.received += r.received;
        m.duplicated += r.duplicated;
        m.out_of_order += r.out_of_order;
        last_ns = last_ns.max(r.last_delivery_ns);
    }
    m.expected = subs.iter().zip(&published).map(|(s, p)| s * p).sum();
    m.delivered = m.received - m.duplicated;
    m.lost = m.expected.saturating_sub(m.delivered);
    m.publish_rate_per_second =
        if publish_seconds > 0.0 { m.published as f64 / publish_seconds } else { 0.0 };
    let span = last_ns.saturating_sub(go_ns) as f64 / 1e9;
    m.deliveries_per_second = if span > 0.0 { m.delivered as f64 / span } else { 0.0 };
    m.latency_us = Percentiles::of(&h);
    Ok(m)
}

async fn run_storms(
    plan: &Plan,
    fleet: &mut Fleet,
    deadline: Instant,
    errors: &mut Errors,
) -> anyhow::Result<Storm> {
    let redis_before = match &plan.redis_url {
        Some(url) => Some(redis_stats::command_calls(url).await?),
        None => None,
    };
    let mut rounds = Vec::new();
    for round in 0..plan.storms {
        if round > 0 {
            fleet.pause(plan.settle, deadline).await?;
        }
        let t0 = now_ns();
        fleet.send_all(ToWorker::Storm { round }).await?;
        let parts: Vec<StormRound> = fleet
            .wait_all("the reconnect storm", deadline, |m| match m {
                FromWorker::StormDone(s) if s.round == round => Some(s),
                _ => None,
            })
            .await?;
        let last = parts.iter().map(|p| p.last_live_ns).max().unwrap_or(t0);
        for p in &parts {
            errors.merge(&p.errors);
        }
        rounds.push(StormRoundReport {
            round,
            participants: parts.iter().map(|p| p.participants).sum(),
            resubscribed: parts.iter().map(|p| p.relived).sum(),
            failed: parts.iter().map(|p| p.failed).sum(),
            retries: parts.iter().map(|p| p.retries).sum(),
            seconds: last.saturating_sub(t0) as f64 / 1e9,
        });
    }
    // Let the last round's subscriptions reach Redis before counting.
    fleet.pause(Duration::from_millis(500), deadline).await?;
    let redis_commands = match (&plan.redis_url, redis_before) {
        (Some(url), Some(before)) => {
            Some(redis_stats::delta(&before, &redis_stats::command_calls(url).await?))
        }
        _ => None,
    };
    let mut secs: Vec<f64> = rounds.iter().map(|r| r.seconds).collect();
    secs.sort_by(f64::total_cmp);
    Ok(Storm {
        median_seconds: secs.get(secs.len() / 2).copied().unwrap_or(0.0),
        rounds,
        redis_commands_total: redis_commands.as_ref().map(|m| m.values().sum()),
        redis_commands,
    })
}

/// Checks a healthy run passes; each failure is one line.
fn problems(plan: &Plan, r: &Report) -> Vec<String> {
    let mut p = Vec::new();
    let c = &r.connections;
    if c.failed > 0 {
        p.push(format!("{} of {} clients failed to connect", c.failed, c.target));
    }
    if c.unexpected_disconnects > 0 {
        p.push(format!("{} connections were closed unexpectedly", c.unexpected_disconnects));
    }
    if let Some(m) = &r.messages {
        if m.lost > 0 || m.duplicated > 0 || m.out_of_order > 0 {
            p.push(format!(
                "{} lost, {} duplicated, {} out of order publications",
                m.lost, m.duplicated, m.out_of_order
            ));
        }
        if m.publish_errors > 0 {
            p.push(format!("{} publish errors", m.publish_errors));
        }
        if m.published == 0 {
            p.push("nothing was published".into());
        }
        let target = plan.rate * m.publish_seconds;
        if (m.published as f64) < 0.9 * target {
            p.push(format!(
                "published {:.0}/s, below 90% of the target {:.0}/s (load generator or server saturated)",
                m.publish_rate_per_second, plan.rate
            ));
        }
    }
    if let Some(s) = &r.storm {
        for round in &s.rounds {
            if round.failed > 0 || round.resubscribed < round.participants {
                p.push(format!(
                    "storm round {}: {} of {} clients live again",
                    round.round, round.resubscribed, round.participants
                ));
            }
        }
    }
    p
}

/// Shortest window over which machine-wide CPU rates are reported.
const MIN_RATE_WINDOW_SECS: f64 = 0.5;

/// Conditions that make figures unreliable without making the run fail.
fn warnings(plan: &Plan, r: &Report) -> Vec<String> {
    let mut w = Vec::new();
    for (phase, m) in [("connect phase", &r.machine_connect), ("main phase", &r.machine)] {
        if let Some(other) = m.other_cpu_seconds_per_second.filter(|o| *o > 0.1) {
            let what = if plan.server_pids.is_empty() {
                "the server or other processes"
            } else {
                "other processes"
            };
            w.push(format!(
                "{what} used {other:.2} CPU s/s during the {phase}: CPU-bound figures are unreliable"
            ));
        }
    }
    if r.loadgen.cpu_seconds_per_second > 0.8 * r.cpus as f64 {
        w.push("the load generator used most of the CPUs: it may have been the limit".into());
    }
    w
}
