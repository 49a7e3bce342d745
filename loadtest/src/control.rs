//! What the coordinator and its workers tell each other. A worker in another
//! process gets these as JSON lines on stdin and answers on stdout; an
//! in-process worker gets the same values over channels.

use anyhow::Context;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use serde::{Deserialize, Serialize};

use crate::options::{Plan, Share};

/// Coordinator -> worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToWorker {
    /// First message: the plan and this worker's share. The worker connects
    /// its clients and answers `Ready`.
    Start { plan: Box<Plan>, share: Share },
    /// Start the main phase (publishing; idle hold).
    Go,
    /// Stop publishing; answer `Drained` once in-flight publications arrived.
    StopPublishing,
    /// Drop every connection and reconnect at once; answer `StormDone`.
    Storm { round: usize },
    /// Close everything and answer `Done`.
    Finish,
}

/// Worker -> coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromWorker {
    Progress(Progress),
    Ready(Ready),
    Drained,
    StormDone(StormRound),
    Done(Box<WorkerResult>),
}

/// Cumulative counters, sent about once a second.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Progress {
    pub open: u64,
    pub connected: u64,
    pub failed: u64,
    pub published: u64,
    pub delivered: u64,
    /// p99 publish-to-receive latency so far, microseconds.
    pub p99_us: u64,
}

/// End of the connect phase.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Ready {
    /// Clients connected and subscribed (publisher connections excluded).
    pub connected: u64,
    pub failed: u64,
    pub publishers_connected: u64,
    /// Unix nanoseconds of the first handshake start and the last handshake end.
    pub first_start_ns: u64,
    pub last_done_ns: u64,
    /// Handshake latency (TCP connect + upgrade + connect reply), µs, V2 + hex.
    pub connect_hist: String,
    pub errors: Errors,
}

/// One storm round at one worker.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StormRound {
    pub round: usize,
    /// Clients that were connected when the round began.
    pub participants: u64,
    /// Clients connected and subscribed again.
    pub relived: u64,
    pub failed: u64,
    /// Unix nanoseconds when the last client was live again.
    pub last_live_ns: u64,
    /// Handshake attempts that failed and were retried.
    pub retries: u64,
    pub errors: Errors,
}

/// Everything a worker measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerResult {
    pub published: u64,
    pub publish_errors: u64,
    /// Publications sent whose reply never came (counted as published).
    pub unacked: u64,
    pub received: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    /// Connections closed by the server or the network during the run.
    pub unexpected_disconnects: u64,
    /// Unix nanoseconds of the last publication received.
    pub last_delivery_ns: u64,
    /// Publish-to-receive latency, µs, V2 + hex.
    pub latency_hist: String,
    /// Live subscriptions per channel index.
    pub subs_per_channel: Vec<u32>,
    /// Publications accepted per channel index.
    pub published_per_channel: Vec<u64>,
    pub errors: Errors,
}

/// A count of errors and the first few messages.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Errors {
    pub count: u64,
    pub samples: Vec<String>,
}

impl Errors {
    const KEEP: usize = 8;

    pub fn add(&mut self, msg: impl Into<String>) {
        self.count += 1;
        if self.samples.len() < Self::KEEP {
            self.samples.push(msg.into());
        }
    }

    pub fn merge(&mut self, other: &Errors) {
        self.count += other.count;
        for s in &other.samples {
            if self.samples.len() < Self::KEEP && !self.samples.contains(s) {
                self.samples.push(s.clone());
            }
        }
    }
}

/// A histogram of microseconds from 1 µs to one hour, 3 significant digits.
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant bounds are valid")
}

/// Hex of the V2 serialization (stdout lines stay plain JSON).
pub fn hist_to_hex(h: &Histogram<u64>) -> String {
    let mut buf = Vec::new();
    V2Serializer::new().serialize(h, &mut buf).expect("serializing into a Vec cannot fail");
    let mut s = String::with_capacity(buf.len() * 2);
    for b in buf {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

pub fn hist_from_hex(s: &str) -> anyhow::Result<Histogram<u64>> {
    if s.is_empty() {
        return Ok(new_hist());
    }
    let bytes = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2).unwrap_or("x"), 16))
        .collect::<Result<Vec<u8>, _>>()
        .context("histogram hex")?;
    let h: Histogram<u64> =
        Deserializer::new().deserialize(&mut &bytes[..]).context("histogram V2 bytes")?;
    let mut out = new_hist();
    out.add(&h).context("merging a histogram")?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_survive_hex_and_merge() {
        let mut h = new_hist();
        for v in 1..=1000u64 {
            h.record(v * 10).unwrap();
        }
        let back = hist_from_hex(&hist_to_hex(&h)).unwrap();
        assert_eq!(back.len(), 1000);
        assert_eq!(back.value_at_quantile(0.5), h.value_at_quantile(0.5));
        assert_eq!(hist_from_hex("").unwrap().len(), 0);
    }

    #[test]
    fn messages_are_tagged_json() {
        let s = serde_json::to_string(&ToWorker::Storm { round: 2 }).unwrap();
        assert_eq!(s, r#"{"type":"storm","round":2}"#);
        let back: FromWorker = serde_json::from_str(r#"{"type":"drained"}"#).unwrap();
        assert!(matches!(back, FromWorker::Drained));
    }
}
