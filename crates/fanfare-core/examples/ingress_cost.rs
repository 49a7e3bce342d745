//! CPU cost of the ingress rule (`DataRules::check`) per publication, for
//! docs/BENCHMARKS.md: `cargo run --release -p fanfare-core --example ingress_cost`.
//! Prints the median of 5 runs of 200 000 checks per shape.

use std::time::Instant;

use bytes::Bytes;
use fanfare_core::DataRules;

fn doc(pretty: bool, size: usize) -> Bytes {
    let mut fields = Vec::new();
    let mut n = 0;
    while fields.iter().map(|f: &String| f.len() + 2).sum::<usize>() < size {
        fields.push(format!("\"field{n}\": {{\"text\": \"hello world {n}\", \"n\": [1, 2, {n}]}}"));
        n += 1;
    }
    let s = if pretty {
        format!("{{\n  {}\n}}", fields.join(",\n  "))
    } else {
        format!("{{{}}}", fields.join(",")).replace(": ", ":").replace(", ", ",")
    };
    Bytes::from(s)
}

fn main() {
    let rules = DataRules::default();
    for (name, data) in [
        ("compact 100 B", doc(false, 100)),
        ("compact 1 KB", doc(false, 1000)),
        ("pretty 1 KB", doc(true, 1000)),
        ("compact 16 KB", doc(false, 16000)),
    ] {
        let iters = 200_000;
        let mut runs = Vec::new();
        for _ in 0..5 {
            let start = Instant::now();
            for _ in 0..iters {
                let out = rules.check(std::hint::black_box(data.clone())).expect("valid");
                std::hint::black_box(out);
            }
            runs.push(start.elapsed().as_nanos() as f64 / iters as f64);
        }
        runs.sort_by(f64::total_cmp);
        println!("{name:>14} ({} bytes): {:.0} ns per check (median of 5)", data.len(), runs[2]);
        let t = Instant::now();
        for _ in 0..iters {
            std::hint::black_box(std::str::from_utf8(std::hint::black_box(&data)).is_ok());
        }
        let utf8 = t.elapsed().as_nanos() as f64 / iters as f64;
        let t = Instant::now();
        for _ in 0..iters {
            std::hint::black_box(
                serde_json::from_slice::<serde::de::IgnoredAny>(std::hint::black_box(&data))
                    .is_ok(),
            );
        }
        let serde = t.elapsed().as_nanos() as f64 / iters as f64;
        let t = Instant::now();
        for _ in 0..iters {
            std::hint::black_box(rules.check_parsed(std::hint::black_box(data.clone())).is_ok());
        }
        let parsed = t.elapsed().as_nanos() as f64 / iters as f64;
        println!(
            "    of which UTF-8 {utf8:.0} ns, grammar (serde IgnoredAny) {serde:.0} ns; \
             check_parsed (client frames) {parsed:.0} ns"
        );
    }
}
