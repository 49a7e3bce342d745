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

/// CPU seconds a process used so far, split as /proc/<pid>/stat does: user
/// space (`utime`) and kernel (`stime`; on this tick-accounted kernel it
/// includes softirq work that ran while the process was on the CPU, which on
/// loopback is much of the peer's TCP receive path).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuTimes {
    pub user: f64,
    pub system: f64,
}

impl CpuTimes {
    pub fn total(self) -> f64 {
        self.user + self.system
    }
}

impl std::ops::Add for CpuTimes {
    type Output = CpuTimes;
    fn add(self, o: CpuTimes) -> CpuTimes {
        CpuTimes { user: self.user + o.user, system: self.system + o.system }
    }
}

impl std::ops::Sub for CpuTimes {
    type Output = CpuTimes;
    fn sub(self, o: CpuTimes) -> CpuTimes {
        CpuTimes { user: self.user - o.user, system: self.system - o.system }
    }
}

impl std::iter::Sum for CpuTimes {
    fn sum<I: Iterator<Item = CpuTimes>>(it: I) -> CpuTimes {
        it.fold(CpuTimes::default(), |a, b| a + b)
    }
}

/// User and system CPU seconds used so far (utime, stime in /proc/<pid>/stat).
pub fn cpu_times(pid: &str) -> anyhow::Result<CpuTimes> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) may contain spaces; fields after it are fixed.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // After ")" : state is field 3, so utime (14) and stime (15) are at 11, 12.
    if f.len() < 13 {
        bail!("short /proc/{pid}/stat");
    }
    let ticks = clock_ticks();
    Ok(CpuTimes {
        user: f[11].parse::<u64>()? as f64 / ticks,
        system: f[12].parse::<u64>()? as f64 / ticks,
    })
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
        // Spin in user space until the process has been charged user time
        // (10 ms ticks), at most 5 s.
        let start = cpu_times("self").unwrap();
        let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut x = 0u64;
        let mut t = start;
        while t.user <= start.user && std::time::Instant::now() < until {
            for i in 0..1_000_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
            t = cpu_times("self").unwrap();
        }
        std::hint::black_box(x);
        assert!(t.user > start.user, "user time did not grow: {start:?} -> {t:?}");
        assert!(t.system >= start.system, "{start:?} -> {t:?}");
        assert!(sum(&[], cpu_times).is_none());
        let one = sum(&[std::process::id()], cpu_times).unwrap();
        let two = sum(&[std::process::id(), std::process::id()], cpu_times).unwrap();
        assert!(two.user >= 2.0 * t.user && two.user >= one.user, "{two:?} vs {one:?}");
        assert!(machine_busy_seconds().unwrap().0 > 0.0);
    }
}
