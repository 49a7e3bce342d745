//! What one `Authenticator::verify_connect` costs per key kind: the CPU a
//! connect, refresh or subscribe with a token spends before anything else, and
//! so what a flood of forged tokens costs a node (docs/BENCHMARKS.md, "Token
//! verification cost").
//!
//! `cargo bench -p fanfare-core --bench tokens` (release profile; a few
//! seconds). `FANFARE_TOKEN_ROUNDS` (default 3) rounds, each timing every case
//! `FANFARE_TOKEN_RUNS` times (default 2 001) one verification at a time; the
//! cases take turns within a round, so a busy moment of the machine spreads
//! over all of them. Prints each round's median, the median of the rounds and
//! the ratio to an HS256 token signed with the current secret.
//!
//! The node is the one of `crates/fanfare-server/tests/tokens.rs`: HMAC current
//! and previous secret, and two PEM public keys (RSA 2048-bit and Ed25519).

use std::hint::black_box;
use std::time::{Duration, Instant};

use fanfare_core::auth::unix_now;
use fanfare_core::{AuthConfig, Authenticator};
use jsonwebtoken::{Algorithm, EncodingKey, Header};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let rounds = env_or("FANFARE_TOKEN_ROUNDS", 3).max(1);
    let runs = env_or("FANFARE_TOKEN_RUNS", 2001).max(1);
    let keys = concat!(env!("CARGO_MANIFEST_DIR"), "/../fanfare-server/tests/keys/");
    let read = |f: &str| std::fs::read(format!("{keys}{f}")).expect("a test key");
    let claims = serde_json::json!({"sub": "u", "exp": unix_now() + 3600});
    let sign = |alg: Algorithm, key: &EncodingKey| {
        jsonwebtoken::encode(&Header::new(alg), &claims, key).expect("signing")
    };
    let hs = |secret: &str| sign(Algorithm::HS256, &EncodingKey::from_secret(secret.as_bytes()));
    let rsa = EncodingKey::from_rsa_pem(&read("rsa.pem")).expect("rsa.pem");
    let ed = EncodingKey::from_ed_pem(&read("ed1.pem")).expect("ed1.pem");
    let pem = format!(
        "{}{}",
        String::from_utf8(read("rsa.pub.pem")).expect("PEM is text"),
        String::from_utf8(read("ed1.pub.pem")).expect("PEM is text")
    );
    let node = Authenticator::new(&AuthConfig {
        hmac_secret: "current".into(),
        hmac_previous_secret: "previous".into(),
        public_key_pem: pem,
        ..Default::default()
    })
    .expect("the benchmark's auth config");
    // (what, token, whether the node accepts it): checked before timing, so
    // a case never measures a different path than its name says.
    let cases = [
        ("HS256, current secret", hs("current"), true),
        ("HS256, previous secret (current tried first)", hs("previous"), true),
        ("HS256, bad signature (both secrets tried)", hs("nope"), false),
        ("RS256, 2048-bit PEM key", sign(Algorithm::RS256, &rsa), true),
        ("EdDSA, PEM key (the RSA key skipped by family)", sign(Algorithm::EdDSA, &ed), true),
    ];
    for (what, token, accepted) in &cases {
        let r = node.verify_connect(token);
        assert_eq!(r.is_ok(), *accepted, "{what}: {r:?}");
    }

    let mut medians: Vec<Vec<Duration>> = vec![Vec::new(); cases.len()];
    for _ in 0..rounds {
        for (i, (_, token, _)) in cases.iter().enumerate() {
            let times = (0..runs)
                .map(|_| {
                    let t = Instant::now();
                    let _ = black_box(node.verify_connect(black_box(token)));
                    t.elapsed()
                })
                .collect();
            medians[i].push(median(times));
        }
    }
    println!("verify_connect, median of {runs} verifications per round, {rounds} rounds:");
    let base = median(medians[0].clone()).as_secs_f64();
    for ((what, _, _), per_round) in cases.iter().zip(medians) {
        let rounds: Vec<String> =
            per_round.iter().map(|d| format!("{:.1}", d.as_secs_f64() * 1e6)).collect();
        let m = median(per_round).as_secs_f64();
        println!(
            "  {what:<48} rounds {:>20} µs   median {:>7.1} µs   {:>6.1}× HS256",
            rounds.join(" / "),
            m * 1e6,
            m / base
        );
    }
}
