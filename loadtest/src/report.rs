//! The result of a run: every figure as JSON, and a human summary table.

use std::collections::BTreeMap;
use std::fmt::Write;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::control::Errors;
use crate::options::{Plan, Protocol};

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: h.len(),
            mean: (h.mean() * 10.0).round() / 10.0,
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub tool: String,
    pub version: String,
    pub scenario: String,
    pub command_line: Vec<String>,
    pub git_commit: String,
    /// UTC start time, RFC 3339.
    pub date: String,
    pub cpus: usize,
    pub plan: Option<Plan>,
    /// False when a check failed (see `problems`).
    pub ok: bool,
    pub problems: Vec<String>,
    /// Conditions that make figures unreliable (e.g. other processes busy).
    pub warnings: Vec<String>,
    pub elapsed_seconds: f64,
    pub connections: Connections,
    pub connect: Connect,
    pub server: Server,
    pub loadgen: Loadgen,
    /// Whole-machine CPU over the main phase.
    pub machine: Machine,
    /// Whole-machine CPU over the connect phase.
    pub machine_connect: Machine,
    pub messages: Option<Messages>,
    pub storm: Option<Storm>,
    pub errors: Errors,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Connections {
    pub target: u64,
    pub connected: u64,
    pub failed: u64,
    pub publishers_connected: u64,
    pub subscriptions: u64,
    /// Closed by the server or the network before the end of the run.
    pub unexpected_disconnects: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Connect {
    /// First handshake start to last handshake end.
    pub seconds: f64,
    /// Clients connected and subscribed per second over that window.
    pub rate_per_second: f64,
    /// TCP connect + WebSocket upgrade + `connect` reply, µs.
    pub handshake_us: Percentiles,
    pub server_cpu_seconds_per_second: Option<f64>,
    pub loadgen_cpu_seconds_per_second: f64,
    /// Server CPU over the connect phase per client connected, µs.
    pub server_cpu_us_per_connect: Option<f64>,
    /// Generator CPU (all its processes) over the connect phase per client
    /// connected, µs: TCP connect, upgrade, `connect` and `subscribe` included.
    pub loadgen_cpu_us_per_connect: Option<f64>,
    /// Kernel (system) time / all CPU time of the server over the connect
    /// phase (softirq work done on its CPU time included).
    pub server_kernel_share: Option<f64>,
    /// The same for the generator's processes.
    pub loadgen_kernel_share: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Server {
    pub pids: Vec<u32>,
    pub rss_before_bytes: Option<u64>,
    pub rss_after_bytes: Option<u64>,
    /// (after - before) / connected clients.
    pub rss_per_connection_bytes: Option<f64>,
    /// The main phase (idle hold, publishing, storms) over which CPU was measured.
    pub window_seconds: f64,
    pub cpu_seconds_per_second: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Loadgen {
    pub workers: usize,
    /// This process and its workers over the main phase.
    pub cpu_seconds_per_second: f64,
    pub cpu_seconds_total: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Machine {
    /// All CPUs busy (user, system, irq, softirq, steal), CPU s/s.
    pub cpu_busy_seconds_per_second: Option<f64>,
    /// Of that, interrupts (irq, softirq): mostly loopback networking.
    pub irq_cpu_seconds_per_second: Option<f64>,
    /// Process time (user, system, steal) neither the server (`--server-pid`)
    /// nor the load generator used: other processes on the machine.
    pub other_cpu_seconds_per_second: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Messages {
    pub publish_seconds: f64,
    pub published: u64,
    pub publish_rate_per_second: f64,
    pub publish_errors: u64,
    /// Sent without a reply by the end (counted as published).
    pub unacked: u64,
    /// Deliveries the subscriptions should have seen.
    pub expected: u64,
    /// Publications received, duplicates included.
    pub received: u64,
    /// Distinct publications received.
    pub delivered: u64,
    /// `delivered` over first publish to last receipt.
    pub deliveries_per_second: f64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub latency_us: Percentiles,
    /// Server CPU s/s over the main phase / `deliveries_per_second`, µs.
    pub server_cpu_us_per_delivery: Option<f64>,
    /// Generator CPU s/s over the main phase / `deliveries_per_second`, µs
    /// (publishing, receiving and checking together).
    pub loadgen_cpu_us_per_delivery: Option<f64>,
    /// Kernel (system) time / all CPU time of the server over the main phase.
    pub server_kernel_share: Option<f64>,
    /// The same for the generator's processes.
    pub loadgen_kernel_share: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct StormRoundReport {
    pub round: usize,
    pub participants: u64,
    pub resubscribed: u64,
    pub failed: u64,
    pub retries: u64,
    /// From the disconnect order until every subscription was live again.
    pub seconds: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Storm {
    pub rounds: Vec<StormRoundReport>,
    pub median_seconds: f64,
    /// Redis commands spent over all rounds (`INFO commandstats` delta).
    pub redis_commands: Option<BTreeMap<String, u64>>,
    pub redis_commands_total: Option<u64>,
}

/// `git rev-parse HEAD` in the current directory, else in the directory of
/// this binary (a build inside the repository), else "unknown".
pub fn git_commit() -> String {
    let exe_dir = std::env::current_exe().ok().and_then(|p| p.parent().map(|d| d.to_path_buf()));
    let dirs = [Some(std::path::PathBuf::from(".")), exe_dir];
    dirs.into_iter()
        .flatten()
        .find_map(|dir| {
            let out = std::process::Command::new("git")
                .arg("-C")
                .arg(dir)
                .args(["rev-parse", "HEAD"])
                .stderr(std::process::Stdio::null())
                .output()
                .ok()?;
            let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
            (out.status.success() && !s.is_empty()).then_some(s)
        })
        .unwrap_or_else(|| "unknown".into())
}

/// RFC 3339 UTC time of a unix timestamp (seconds).
pub fn rfc3339(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let rem = unix % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

fn ms(us: u64) -> String {
    format!("{:.3} ms", us as f64 / 1000.0)
}

fn bytes(b: f64) -> String {
    if b.abs() >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / 1024.0 / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

fn opt<T>(v: Option<T>, f: impl Fn(T) -> String) -> String {
    v.map(f).unwrap_or_else(|| "– (no --server-pid)".into())
}

/// A share as a whole percentage, "–" when unknown.
fn percent(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{:.0} %", v * 100.0))
}

impl Report {
    /// The human summary.
    pub fn table(&self) -> String {
        let mut rows: Vec<(String, String)> = Vec::new();
        let mut row = |k: &str, v: String| rows.push((k.to_string(), v));
        let protocol = self.plan.as_ref().map_or(Protocol::Json, |p| p.protocol);
        row("scenario", format!("{} ({protocol:?} protocol)", self.scenario).to_lowercase());
        row("result", if self.ok { "ok".into() } else { "PROBLEMS (see below)".into() });
        row("git commit / date", format!("{} / {}", self.git_commit, self.date));
        let c = &self.connections;
        row("clients connected", format!("{} of {} ({} failed)", c.connected, c.target, c.failed));
        if c.publishers_connected > 0 {
            row("publishers connected", c.publishers_connected.to_string());
        }
        row("subscriptions", c.subscriptions.to_string());
        row("unexpected disconnects", c.unexpected_disconnects.to_string());
        let k = &self.connect;
        row(
            "connect rate",
            format!(
                "{:.0}/s over {:.2} s (server cpu {}, loadgen cpu {:.2})",
                k.rate_per_second,
                k.seconds,
                opt(k.server_cpu_seconds_per_second, |v| format!("{v:.2}")),
                k.loadgen_cpu_seconds_per_second
            ),
        );
        row(
            "cpu per connect server/loadgen",
            format!(
                "{} / {} µs (kernel {} / {})",
                opt(k.server_cpu_us_per_connect, |v| format!("{v:.1}")),
                k.loadgen_cpu_us_per_connect.map_or("?".into(), |v| format!("{v:.1}")),
                percent(k.server_kernel_share),
                percent(k.loadgen_kernel_share)
            ),
        );
        row(
            "handshake p50/p99/max",
            format!(
                "{} / {} / {}",
                ms(k.handshake_us.p50),
                ms(k.handshake_us.p99),
                ms(k.handshake_us.max)
            ),
        );
        let s = &self.server;
        row(
            "server RSS before/after",
            format!(
                "{} / {}",
                opt(s.rss_before_bytes, |b| bytes(b as f64)),
                opt(s.rss_after_bytes, |b| bytes(b as f64))
            ),
        );
        row("server RSS per connection", opt(s.rss_per_connection_bytes, bytes));
        row(
            "server cpu (main phase)",
            format!(
                "{} s/s over {:.1} s",
                opt(s.cpu_seconds_per_second, |v| format!("{v:.3}")),
                s.window_seconds
            ),
        );
        row(
            "loadgen cpu (main phase)",
            format!(
                "{:.3} s/s ({} worker process(es), {:.1} s in total)",
                self.loadgen.cpu_seconds_per_second,
                self.loadgen.workers,
                self.loadgen.cpu_seconds_total
            ),
        );
        row(
            "machine cpu busy / irq / other",
            format!(
                "{} / {} / {} s/s",
                self.machine.cpu_busy_seconds_per_second.map_or("?".into(), |v| format!("{v:.2}")),
                self.machine.irq_cpu_seconds_per_second.map_or("?".into(), |v| format!("{v:.2}")),
                self.machine.other_cpu_seconds_per_second.map_or("?".into(), |v| format!("{v:.2}"))
            ),
        );
        if let Some(m) = &self.messages {
            row(
                "published",
                format!(
                    "{} in {:.1} s = {:.0}/s ({} errors, {} unacked)",
                    m.published,
                    m.publish_seconds,
                    m.publish_rate_per_second,
                    m.publish_errors,
                    m.unacked
                ),
            );
            row(
                "delivered",
                format!(
                    "{} of {} expected = {:.0}/s (loadgen cpu {:.2})",
                    m.delivered,
                    m.expected,
                    m.deliveries_per_second,
                    self.loadgen.cpu_seconds_per_second
                ),
            );
            row(
                "cpu per delivery server/loadgen",
                format!(
                    "{} / {} µs (kernel {} / {})",
                    opt(m.server_cpu_us_per_delivery, |v| format!("{v:.2}")),
                    m.loadgen_cpu_us_per_delivery.map_or("?".into(), |v| format!("{v:.2}")),
                    percent(m.server_kernel_share),
                    percent(m.loadgen_kernel_share)
                ),
            );
            row(
                "lost / duplicated / out of order",
                format!("{} / {} / {}", m.lost, m.duplicated, m.out_of_order),
            );
            let l = &m.latency_us;
            row(
                "latency p50/p90/p99/p99.9/max",
                format!(
                    "{} / {} / {} / {} / {}",
                    ms(l.p50),
                    ms(l.p90),
                    ms(l.p99),
                    ms(l.p999),
                    ms(l.max)
                ),
            );
        }
        if let Some(st) = &self.storm {
            for r in &st.rounds {
                row(
                    &format!("storm round {}", r.round),
                    format!(
                        "{} of {} live again in {:.3} s ({} failed, {} retries)",
                        r.resubscribed, r.participants, r.seconds, r.failed, r.retries
                    ),
                );
            }
            row("storm median", format!("{:.3} s", st.median_seconds));
            if let Some(total) = st.redis_commands_total {
                row(
                    "redis commands",
                    format!("{total} {:?}", st.redis_commands.clone().unwrap_or_default()),
                );
            }
        }
        if self.errors.count > 0 {
            row("errors", format!("{} (e.g. {:?})", self.errors.count, self.errors.samples));
        }
        for w in &self.warnings {
            row("WARNING", w.clone());
        }
        for p in &self.problems {
            row("PROBLEM", p.clone());
        }
        let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut out = String::new();
        for (k, v) in rows {
            let _ = writeln!(out, "{k:<w$} | {v}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_764_237_600), "2025-11-27T10:00:00Z");
    }
}
