//! Memory and CPU of processes, read from /proc (Linux).

use anyhow::{Context, bail};

/// Resident set size in bytes (`VmRSS` in /proc/<pid>/status).
pub fn rss_bytes(pid: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("bad VmRSS line {line:?}"))?;
    Ok(kb * 1024)
}

/// User + system CPU seconds used so far (utime + stime in /proc/<pid>/stat).
pub fn cpu_seconds(pid: &str) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) may contain spaces; fields after it are fixed.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // After ")" : state is field 3, so utime (14) and stime (15) are at 11, 12.
    if f.len() < 13 {
        bail!("short /proc/{pid}/stat");
    }
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    Ok(ticks as f64 / clock_ticks())
}

/// CPU seconds the whole machine spent so far (all CPUs): `(process time,
/// interrupt time)`. Process time is user, nice, system and steal; interrupt
/// time (irq, softirq) is kept apart because loopback networking of the server
/// and the load generator themselves is mostly accounted there.
pub fn machine_busy_seconds() -> anyhow::Result<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let f: Vec<u64> = line.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    if f.len() < 8 {
        bail!("short cpu line in /proc/stat");
    }
    // user nice system idle iowait irq softirq steal
    let process = f[0] + f[1] + f[2] + f[7];
    let irq = f[5] + f[6];
    Ok((process as f64 / clock_ticks(), irq as f64 / clock_ticks()))
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Sums `f` over several PIDs; `None` when there are none or one fails.
pub fn sum<T: std::iter::Sum>(pids: &[u32], f: impl Fn(&str) -> anyhow::Result<T>) -> Option<T> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|p| f(&p.to_string()).ok()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_rss_and_cpu() {
        assert!(rss_bytes("self").unwrap() > 100_000);
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(cpu_seconds("self").unwrap() >= 0.0);
        assert!(sum(&[std::process::id()], cpu_seconds).is_some());
        assert!(sum(&[], cpu_seconds).is_none());
        assert!(machine_busy_seconds().unwrap().0 > 0.0);
    }
}
