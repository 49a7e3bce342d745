//! Redis dies and comes back (issue 16): nothing acknowledged is lost without
//! the node saying so, and publishing and delivery resume. The scenario is
//! `common::outage` (three nodes on one `redis-server`, SIGKILLed and
//! restarted); this test makes one run and asserts what must hold every time,
//! never a timed threshold. The figures of several runs and their medians:
//! `cargo bench -p fanfare-server --bench redis_outage` (docs/BENCHMARKS.md).

mod common;

use common::outage::one_run;

/// The CI form: one run; nothing acknowledged is lost without the node saying
/// so, and publishing and delivery on every node resume after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_redis_is_killed_and_restarted_publishing_resumes_and_no_acknowledged_publication_is_missed_unreported()
 {
    let out = one_run(true).await;
    assert_eq!(out.lost_silently, 0, "{out:?}");
    assert!(out.first_ack.is_some(), "no publish was acknowledged after the restart: {out:?}");
    assert!(out.all_delivered.is_some(), "delivery did not resume on every node: {out:?}");
    assert!(out.refused > 0, "publishes during the outage must be refused: {out:?}");
}
