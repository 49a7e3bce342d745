//! What encoding one publication push costs per codec (the work done once per
//! publication and codec, shared by every subscriber), and how much of the
//! JSON cost is the check that the data is JSON (`is_json`).
//!
//! `cargo run --release -p fanfare-protocol --example encode_cost`

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use fanfare_protocol::{ClientInfo, Codec, Publication, PushBody, Reply, is_json};

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

fn main() {
    let info = Arc::new(ClientInfo {
        user: "user-42".into(),
        client: "6f1c2a9e-8d3b-4f6a-9c1e-2b7d5e4a3f10".into(),
        ..Default::default()
    });
    for size in [64usize, 512, 4096] {
        let mut text = String::from(r#"{"text":""#);
        while text.len() < size - 2 {
            text.push('x');
        }
        text.push_str(r#""}"#);
        let data = Bytes::from(text);
        let reply = Reply::push(
            "chat:room-1",
            PushBody::Pub(Publication {
                data: data.clone(),
                info: Some(info.clone()),
                offset: 12345,
                ..Default::default()
            }),
        );
        let n = 200_000;
        let json = per_op(n, || drop(black_box(Codec::Json.encode(black_box(&reply)))));
        let pb = per_op(n, || drop(black_box(Codec::Protobuf.encode(black_box(&reply)))));
        let check = per_op(n, || {
            black_box(is_json(black_box(&data)));
        });
        println!(
            "data {size:>5} B: JSON push {json:>7.0} ns (of which is_json {check:>6.0} ns), Protobuf push {pb:>7.0} ns"
        );
    }
}
