//! The coordinator's view of its workers: in this process or child processes
//! (this binary re-executed as `fanfare-loadtest worker`), driven the same way.

use std::io::IsTerminal;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

use crate::control::{FromWorker, Progress, ToWorker};
use crate::procfs;

/// Workers and the progress line.
pub struct Fleet {
    senders: Vec<mpsc::Sender<ToWorker>>,
    /// (worker index, message); `None` when the worker's output ended.
    rx: mpsc::Receiver<(usize, Option<FromWorker>)>,
    children: Vec<tokio::process::Child>,
    progress: Vec<Progress>,
    printer: Printer,
    tick: tokio::time::Interval,
}

impl Fleet {
    /// Starts `workers` child processes, or one in-process worker for 0.
    pub fn spawn(workers: usize, quiet: bool, target: u64) -> anyhow::Result<Fleet> {
        let (all_tx, rx) = mpsc::channel(256);
        let mut senders = Vec::new();
        let mut children = Vec::new();
        if workers == 0 {
            let (to_tx, to_rx) = mpsc::channel(16);
            let (from_tx, mut from_rx) = mpsc::channel(64);
            tokio::spawn(async move {
                if let Err(e) = crate::worker::run(to_rx, from_tx).await {
                    eprintln!("fanfare-loadtest: worker failed: {e:#}");
                }
            });
            tokio::spawn(async move {
                while let Some(m) = from_rx.recv().await {
                    if all_tx.send((0, Some(m))).await.is_err() {
                        return;
                    }
                }
                all_tx.send((0, None)).await.ok();
            });
            senders.push(to_tx);
        } else {
            let exe = std::env::current_exe().context("locating this binary")?;
            for i in 0..workers {
                let mut child = tokio::process::Command::new(&exe)
                    .arg("worker")
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::inherit())
                    .kill_on_drop(true)
                    .spawn()
                    .with_context(|| format!("starting worker {i}"))?;
                let mut stdin = child.stdin.take().expect("stdin is piped");
                let stdout = child.stdout.take().expect("stdout is piped");
                let (to_tx, mut to_rx) = mpsc::channel::<ToWorker>(16);
                tokio::spawn(async move {
                    while let Some(msg) = to_rx.recv().await {
                        let mut line =
                            serde_json::to_string(&msg).expect("control messages serialize");
                        line.push('\n');
                        if stdin.write_all(line.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
                let tx = all_tx.clone();
                tokio::spawn(async move {
                    let mut lines = BufReader::new(stdout).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        match serde_json::from_str::<FromWorker>(&line) {
                            Ok(m) => {
                                if tx.send((i, Some(m))).await.is_err() {
                                    return;
                                }
                            }
                            Err(e) => eprintln!("fanfare-loadtest: worker {i} said {line:?}: {e}"),
                        }
                    }
                    tx.send((i, None)).await.ok();
                });
                senders.push(to_tx);
                children.push(child);
            }
        }
        let n = senders.len();
        Ok(Fleet {
            senders,
            rx,
            children,
            progress: vec![Progress::default(); n],
            printer: Printer::new(quiet, target),
            tick: tokio::time::interval_at(
                tokio::time::Instant::now() + Duration::from_secs(1),
                Duration::from_secs(1),
            ),
        })
    }

    pub fn len(&self) -> usize {
        self.senders.len()
    }

    /// CPU seconds of this process and every worker process.
    pub fn cpu_seconds(&self) -> f64 {
        self.cpu_times().total()
    }

    /// User and system CPU of this process and every worker process.
    pub fn cpu_times(&self) -> procfs::CpuTimes {
        let own = procfs::cpu_times("self").unwrap_or_default();
        own + self
            .children
            .iter()
            .filter_map(|c| c.id())
            .filter_map(|pid| procfs::cpu_times(&pid.to_string()).ok())
            .sum::<procfs::CpuTimes>()
    }

    pub async fn send(&self, i: usize, msg: ToWorker) -> anyhow::Result<()> {
        self.senders[i].send(msg).await.map_err(|_| anyhow::anyhow!("worker {i} is gone"))
    }

    pub async fn send_all(&self, msg: ToWorker) -> anyhow::Result<()> {
        for i in 0..self.len() {
            self.send(i, msg.clone()).await?;
        }
        Ok(())
    }

    /// Waits for one message accepted by `pick` from every worker, showing
    /// progress meanwhile; fails at `deadline` or when a worker ends first.
    pub async fn wait_all<T>(
        &mut self,
        what: &str,
        deadline: Instant,
        mut pick: impl FnMut(FromWorker) -> Option<T>,
    ) -> anyhow::Result<Vec<T>> {
        let mut got: Vec<Option<T>> = (0..self.len()).map(|_| None).collect();
        while got.iter().any(Option::is_none) {
            tokio::select! {
                m = self.rx.recv() => match m {
                    None => bail!("workers ended while waiting for {what}"),
                    Some((i, None)) => {
                        if got[i].is_none() {
                            bail!("worker {i} ended while waiting for {what}");
                        }
                    }
                    Some((i, Some(FromWorker::Progress(p)))) => self.progress[i] = p,
                    Some((i, Some(m))) => {
                        if let Some(t) = pick(m) {
                            got[i] = Some(t);
                        }
                    }
                },
                _ = self.tick.tick() => {
                    let cpu = self.cpu_seconds();
                    self.printer.show(&self.progress, cpu);
                }
                _ = tokio::time::sleep_until(deadline.into()) => {
                    bail!("the run exceeded --max-time while waiting for {what}");
                }
            }
        }
        Ok(got.into_iter().map(|g| g.expect("all present")).collect())
    }

    /// Sleeps `d` (bounded by `deadline`) while showing progress.
    pub async fn pause(&mut self, d: Duration, deadline: Instant) -> anyhow::Result<()> {
        let until = (Instant::now() + d).min(deadline);
        loop {
            tokio::select! {
                m = self.rx.recv() => match m {
                    Some((i, Some(FromWorker::Progress(p)))) => self.progress[i] = p,
                    Some((i, None)) => bail!("worker {i} ended early"),
                    Some(_) => {}
                    None => bail!("workers ended early"),
                },
                _ = self.tick.tick() => {
                    let cpu = self.cpu_seconds();
                    self.printer.show(&self.progress, cpu);
                }
                _ = tokio::time::sleep_until(until.into()) => break,
            }
        }
        if Instant::now() >= deadline {
            bail!("the run exceeded --max-time");
        }
        Ok(())
    }

    /// Waits (up to 10 s) for worker processes to exit; kills what is left.
    pub async fn shutdown(mut self) {
        self.printer.end();
        for c in &mut self.children {
            if tokio::time::timeout(Duration::from_secs(10), c.wait()).await.is_err() {
                let _ = c.kill().await;
            }
        }
    }
}

/// The progress line on stderr, about once a second.
struct Printer {
    quiet: bool,
    tty: bool,
    target: u64,
    start: Instant,
    last: Option<(Instant, Progress, f64)>,
    printed: bool,
}

impl Printer {
    fn new(quiet: bool, target: u64) -> Printer {
        Printer {
            quiet,
            tty: std::io::stderr().is_terminal(),
            target,
            start: Instant::now(),
            last: None,
            printed: false,
        }
    }

    fn show(&mut self, per_worker: &[Progress], cpu: f64) {
        let mut sum = Progress::default();
        for p in per_worker {
            sum.open += p.open;
            sum.connected += p.connected;
            sum.failed += p.failed;
            sum.published += p.published;
            sum.delivered += p.delivered;
            sum.p99_us = sum.p99_us.max(p.p99_us);
        }
        let now = Instant::now();
        let (pub_rate, del_rate, cpu_rate) = match self.last {
            Some((t, prev, prev_cpu)) => {
                let dt = now.duration_since(t).as_secs_f64().max(1e-3);
                (
                    (sum.published.saturating_sub(prev.published)) as f64 / dt,
                    (sum.delivered.saturating_sub(prev.delivered)) as f64 / dt,
                    (cpu - prev_cpu) / dt,
                )
            }
            None => (0.0, 0.0, 0.0),
        };
        self.last = Some((now, sum, cpu));
        if self.quiet {
            return;
        }
        let line = format!(
            "[{:>6.1}s] open {}/{} failed {} | pub {:.0}/s recv {:.0}/s | p99 {:.2} ms | loadgen cpu {:.2}",
            self.start.elapsed().as_secs_f64(),
            sum.open,
            self.target,
            sum.failed,
            pub_rate,
            del_rate,
            sum.p99_us as f64 / 1000.0,
            cpu_rate,
        );
        if self.tty {
            eprint!("\r\x1b[K{line}");
        } else {
            eprintln!("{line}");
        }
        self.printed = true;
    }

    fn end(&mut self) {
        if self.printed && self.tty && !self.quiet {
            eprintln!();
        }
    }
}
