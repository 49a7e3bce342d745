//! What fossil delta compression costs the node per publication (the fossil
//! delta and the extra encodings, done once per publication and codec) and
//! per subscriber (a fan-out to delta subscribers against one to plain ones).
//!
//! `cargo run --release -p fanfare-core --example delta_cost`

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use fanfare_core::delta;
use fanfare_core::hub::{PreparedPush, Subscriber};
use fanfare_core::{Hub, Outbox};
use fanfare_protocol::{Codec, Publication, PushBody, Reply};

fn per_op(n: u32, mut f: impl FnMut()) -> f64 {
    for _ in 0..n / 10 {
        f();
    }
    let start = Instant::now();
    for _ in 0..n {
        f();
    }
    start.elapsed().as_nanos() as f64 / n as f64
}

/// Version `v` of a JSON document of about `fields` × 55 bytes whose field
/// `v % fields` and version change.
fn document(v: u64, fields: u64) -> Bytes {
    let mut s = String::from("{");
    for i in 0..fields {
        let touched = if i == v % fields { v } else { 0 };
        s.push_str(&format!(
            "\"field{i:02}\":\"value of field {i}, last touched by version {touched}\","
        ));
    }
    s.push_str(&format!("\"version\":{v}}}"));
    Bytes::from(s)
}

fn publication(v: u64, fields: u64) -> Publication {
    Publication { data: document(v, fields), offset: v, ..Default::default() }
}

/// Nanoseconds per publication fanned out to `subs` subscribers of `codec`
/// (delta ones or not), queues drained after each.
fn fan_out(subs: usize, codec: Codec, with_delta: bool, fields: u64) -> f64 {
    let hub = Hub::new();
    let outboxes: Vec<_> = (0..subs).map(|_| Arc::new(Outbox::new(codec, 1 << 30))).collect();
    for (i, o) in outboxes.iter().enumerate() {
        let s = Arc::new(Subscriber::with_delta(o.clone(), with_delta));
        hub.subscribe("doc:x", i as u64, s.clone());
        s.go_live(0);
    }
    let pubs: Vec<_> = (1..=2_000).map(|v| publication(v, fields)).collect();
    let mut offset = 0u64;
    let mut sink = Vec::new();
    per_op(2_000, || {
        let mut p = pubs[offset as usize % pubs.len()].clone();
        offset += 1;
        p.offset = offset;
        let push = PreparedPush::new(Reply::push("doc:x", PushBody::Pub(p)), offset);
        black_box(hub.fan_out("doc:x", &push));
        for o in &outboxes {
            o.drain(&mut sink);
            sink.clear();
        }
    })
}

fn main() {
    for fields in [36u64, 290] {
        let (a, b) = (publication(1, fields), publication(2, fields));
        let n = 20_000;
        let fossil = per_op(n, || drop(black_box(delta::fossil(&a.data, &b.data))));
        let patch = delta::fossil(&a.data, &b.data).expect("a delta");
        let json_full = per_op(n, || {
            let f = delta::full_form(&b, Codec::Json).expect("JSON");
            drop(black_box(Codec::Json.encode(&Reply::push("doc:x", PushBody::Pub(f)))));
        });
        let json_delta = per_op(n, || {
            let f = delta::delta_form(&b, &patch, Codec::Json).expect("UTF-8");
            drop(black_box(Codec::Json.encode(&Reply::push("doc:x", PushBody::Pub(f)))));
        });
        let pb_delta = per_op(n, || {
            let f = delta::delta_form(&b, &patch, Codec::Protobuf).expect("bytes");
            drop(black_box(Codec::Protobuf.encode(&Reply::push("doc:x", PushBody::Pub(f)))));
        });
        println!(
            "data {:>5} B, delta {:>3} B: fossil delta {fossil:>7.0} ns; JSON full form {json_full:>6.0} ns, \
             JSON delta form {json_delta:>6.0} ns, Protobuf delta form {pb_delta:>5.0} ns",
            b.data.len(),
            patch.len()
        );
        for codec in [Codec::Json, Codec::Protobuf] {
            for subs in [1, 100] {
                let plain = fan_out(subs, codec, false, fields);
                let with = fan_out(subs, codec, true, fields);
                println!(
                    "  fan-out to {subs:>3} {codec:?} subscribers: plain {plain:>8.0} ns, delta {with:>8.0} ns per publication"
                );
            }
        }
    }
}
