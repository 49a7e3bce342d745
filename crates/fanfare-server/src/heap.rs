//! Giving memory the broker freed back to the operating system.
//!
//! glibc's malloc keeps freed chunks in its arenas when longer-lived
//! allocations sit between them: after 2 000 publications of 60 KB expired
//! from history, with the broker holding nothing, RSS stayed 63 MiB up in a
//! debug build and 5 MiB up in the release build; 5 MiB after 100 000 channel
//! entries were freed (docs/BENCHMARKS.md, "Memory under channel churn").
//! `malloc_trim(0)` returns the free pages of every arena: under 1.1 MiB left.

use fanfare_core::Sweep;

use std::time::{Duration, Instant};

/// Freed memory after which the heap is trimmed: a trim walks every arena
/// (0.04–2.7 ms with up to 120 MiB of heap on the 2-core VM), so it is not
/// worth it for a few kilobytes.
const TRIM_AFTER_BYTES: usize = 1 << 20;

/// Roughly what a channel entry the broker freed held (name, stream meta,
/// empty maps, the map slot).
const CHANNEL_BYTES: usize = 256;

/// At most one trim per this period, whatever `memory.sweep_interval` is.
const MIN_TRIM_PERIOD: Duration = Duration::from_secs(1);

/// A hook for [`fanfare_core::Node::sweep_forever`]: trims the heap once
/// sweeps freed about [`TRIM_AFTER_BYTES`] (expired publications and channel
/// entries) since the last trim, and at the end of a burst (a sweep that
/// freed nothing after some that did), so the tail of a burst is returned too.
pub fn trim_after_sweeps() -> impl FnMut(&Sweep) + Send + 'static {
    let mut freed = 0usize;
    let mut last: Option<Instant> = None;
    move |sweep| {
        let quiet = sweep.expired_bytes == 0 && sweep.freed == 0;
        freed += sweep.expired_bytes + sweep.freed * CHANNEL_BYTES;
        let due = freed >= TRIM_AFTER_BYTES || (quiet && freed > 0);
        if due && last.is_none_or(|t| t.elapsed() >= MIN_TRIM_PERIOD) {
            let start = Instant::now();
            trim();
            tracing::debug!(freed, took = ?start.elapsed(), "heap trimmed");
            freed = 0;
            last = Some(start);
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim only releases free memory of the allocator's own
    // arenas; it takes their locks and is safe to call from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Other allocators (musl) return memory on their own or offer no trim.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}
