//! Redis outages: how soon publishing and delivery resume after Redis comes
//! back (issue 16; docs/BENCHMARKS.md, "Redis killed and restarted"). Each run
//! is the scenario of the CI test `tests/redis_outage.rs` (`common::outage`:
//! three nodes on one `redis-server`, SIGKILLed, restarted 3 s later); this
//! program makes `FANFARE_OUTAGE_RUNS` runs (default 7), one line each, and
//! the medians. A time can be negative: a node got a publish through before
//! the PING watcher (every 2 ms, late on a busy machine) saw Redis answer.
//!
//! `cargo bench -p fanfare-server --bench redis_outage` measures the release
//! binary the bench profile builds; `FANFARE_TEST_BIN=target/debug/fanfare`
//! another build (the debug rows of the table). About 6 s per run.

#[path = "../tests/common/mod.rs"]
mod common;

use common::median;
use common::outage::one_run;

/// "median`unit` (min–max)" of `v`, or "none" when no run got there.
fn spread(v: &[f64], unit: &str) -> String {
    match median(v) {
        None => "none".into(),
        Some(m) => {
            let min = v.iter().copied().fold(f64::INFINITY, f64::min);
            let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            format!("{m:.0}{unit} ({min:.0}–{max:.0})")
        }
    }
}

/// A time of one run in ms, or "never" (it did not happen within 15 s).
fn ms(t: Option<f64>) -> String {
    t.map_or("never".into(), |t| format!("{t:.0} ms"))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs: usize =
        std::env::var("FANFARE_OUTAGE_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(7);
    println!("binary: {}", common::server_bin());
    let (mut acks, mut deliveries, mut gaps, mut refused) = (vec![], vec![], vec![], vec![]);
    let mut lost = 0;
    for k in 1..=runs {
        let out = one_run(false).await;
        println!(
            "run {k}: Redis up -> first ack {}, -> delivered on every node {}; lost silently {}, missed in a reported gap {}, acked {}, refused {}",
            ms(out.first_ack),
            ms(out.all_delivered),
            out.lost_silently,
            out.missed_in_reported_gap,
            out.acked,
            out.refused
        );
        acks.extend(out.first_ack);
        deliveries.extend(out.all_delivered);
        lost += out.lost_silently;
        gaps.push(out.missed_in_reported_gap as f64);
        refused.push(out.refused as f64);
    }
    println!(
        "median of {runs} runs (min–max): Redis up -> first ack {}; -> delivered on every node {}; \
         lost silently {lost} in all runs; missed in a reported gap {} per run; refused {} per run",
        spread(&acks, " ms"),
        spread(&deliveries, " ms"),
        spread(&gaps, ""),
        spread(&refused, ""),
    );
    // A run where publishing or delivery never resumed, or an acknowledged
    // publication vanished unreported, is a failure, not a figure.
    assert_eq!(lost, 0, "acknowledged publications lost without a reported gap");
    assert_eq!(acks.len(), runs, "publishing did not resume in every run");
    assert_eq!(deliveries.len(), runs, "delivery did not resume on every node in every run");
}
