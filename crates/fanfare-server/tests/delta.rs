//! Fossil delta compression (issue 14): a subscription asking for
//! `delta: "fossil"` in a namespace that allows it receives publications as
//! deltas against the previous one, and reconstructs exactly what a
//! subscriber without delta receives, across a recovery.

mod common;

use std::time::Duration;

use common::redis::{RedisServer, start_nodes};
use common::{Bystander, Client, Server, assert_survived, run_cli};
use serde_json::{Value, json};

fn server() -> Server {
    Server::start(&namespaces())
}

/// `doc:` with fossil deltas, `plain:` without; both with history.
fn namespaces() -> String {
    format!(
        r#"{auth}
[[namespaces]]
name = "doc"
allow_publish = true
history_size = 200
history_ttl = "300s"
allowed_delta_types = ["fossil"]

[[namespaces]]
name = "plain"
allow_publish = true
history_size = 200
history_ttl = "300s"

[[namespaces]]
name = "health"
allow_publish = true
"#,
        auth = common::auth_with_anonymous()
    )
}

/// Version `v` of a ~2 KB document that changes slowly: one of its 40
/// fields and the version number change per publication.
fn document(v: u64) -> Value {
    let mut doc = serde_json::Map::new();
    for i in 0..40u64 {
        let touched = if i == v % 40 { v } else { 0 };
        doc.insert(
            format!("field{i:02}"),
            json!(format!("value of field {i}, last touched by version {touched}")),
        );
    }
    doc.insert("version".into(), json!(v));
    Value::Object(doc)
}

/// What a delta subscription's client keeps: the base of the next delta.
#[derive(Default)]
struct DeltaReader {
    base: Vec<u8>,
    deltas: usize,
}

impl DeltaReader {
    /// The full data of a publication as a delta subscription received it
    /// over JSON: a string holding either the JSON text or a fossil delta.
    fn apply(&mut self, publication: &Value) -> Vec<u8> {
        let s = publication["data"].as_str().unwrap_or_else(|| panic!("a string: {publication}"));
        self.base = if publication["delta"] == true {
            self.deltas += 1;
            fossil_delta::apply(&self.base, s.as_bytes()).expect("the delta applies")
        } else {
            s.as_bytes().to_vec()
        };
        self.base.clone()
    }
}

/// Connects and subscribes to `channel`, recovering from `since` if given;
/// returns the client and the subscribe result.
async fn subscriber(
    server: &Server,
    channel: &str,
    delta: bool,
    since: Option<(u64, &str)>,
) -> (Client, Value) {
    let mut c = server.client().await;
    c.connect_ok("").await;
    let mut req = json!({"recoverable": true});
    if delta {
        req["delta"] = json!("fossil");
    }
    if let Some((offset, epoch)) = since {
        req["recover"] = json!(true);
        req["offset"] = json!(offset);
        req["epoch"] = json!(epoch);
    }
    let sub = c.subscribe_ok(channel, req).await;
    (c, sub)
}

#[tokio::test]
async fn a_delta_subscriber_reconstructs_every_publication_exactly_across_a_recovery_for_far_fewer_bytes()
 {
    let server = server();
    let channel = "doc:report";
    let mut publisher = server.client().await;
    publisher.connect_ok("").await;

    let (mut plain, plain_sub) = subscriber(&server, channel, false, None).await;
    let (mut delta, delta_sub) = subscriber(&server, channel, true, None).await;
    assert_eq!(delta_sub["delta"], true, "delta negotiated: {delta_sub}");
    assert!(plain_sub.get("delta").is_none(), "{plain_sub}");
    let epoch = delta_sub["epoch"].as_str().expect("epoch").to_string();
    let (plain_start, delta_start) = (plain.bytes_received, delta.bytes_received);

    let mut reader = DeltaReader::default();
    let mut published = Vec::new();
    let publish = async |publisher: &mut Client, v: u64| {
        let doc = document(v);
        let r = publisher.publish(channel, doc.clone()).await;
        assert!(r.get("publish").is_some(), "{r}");
        doc
    };
    // Checks one received publication of each subscriber against what was published.
    let check = |v: u64, plain_pub: &Value, delta_pub: &Value, reader: &mut DeltaReader| {
        let sent = document(v);
        assert_eq!(plain_pub["data"], sent, "the subscriber without delta, version {v}");
        assert!(plain_pub.get("delta").is_none());
        let rebuilt = reader.apply(delta_pub);
        assert_eq!(rebuilt, sent.to_string().into_bytes(), "byte for byte, version {v}");
        assert_eq!(plain_pub["offset"], delta_pub["offset"]);
    };

    for v in 1..=50 {
        published.push(publish(&mut publisher, v).await);
        let p = plain.recv_push().await;
        let d = delta.recv_push().await;
        check(v, &p["push"]["pub"], &d["push"]["pub"], &mut reader);
    }
    // Both go away after offset 50 and miss ten publications.
    let (plain_before, delta_before) =
        (plain.bytes_received - plain_start, delta.bytes_received - delta_start);
    plain.close().await;
    delta.close().await;
    for v in 51..=60 {
        published.push(publish(&mut publisher, v).await);
    }
    let (mut plain, plain_sub) = subscriber(&server, channel, false, Some((50, &epoch))).await;
    let (mut delta, delta_sub) = subscriber(&server, channel, true, Some((50, &epoch))).await;
    assert_eq!(delta_sub["recovered"], true, "{delta_sub}");
    assert_eq!(delta_sub["delta"], true, "{delta_sub}");
    let plain_pubs = plain_sub["publications"].as_array().expect("recovered").clone();
    let delta_pubs = delta_sub["publications"].as_array().expect("recovered").clone();
    assert_eq!((plain_pubs.len(), delta_pubs.len()), (10, 10));
    // The client's base may be gone after a reconnect: the first recovered
    // one comes in full, the rest as deltas against the one before.
    assert!(delta_pubs[0].get("delta").is_none(), "{}", delta_pubs[0]);
    assert!(delta_pubs[1..].iter().all(|p| p["delta"] == true), "{delta_sub}");
    let mut reader = DeltaReader::default();
    for (i, (p, d)) in plain_pubs.iter().zip(&delta_pubs).enumerate() {
        check(51 + i as u64, p, d, &mut reader);
    }
    let deltas_before_live = reader.deltas;
    for v in 61..=100 {
        published.push(publish(&mut publisher, v).await);
        let p = plain.recv_push().await;
        let d = delta.recv_push().await;
        check(v, &p["push"]["pub"], &d["push"]["pub"], &mut reader);
    }
    // The first live publication follows the last recovered one: a delta.
    assert_eq!(reader.deltas - deltas_before_live, 40, "every live one after a recovery");
    assert_eq!(published.len(), 100);

    // Bytes on the wire (WebSocket payloads: subscribe replies with the
    // recovered publications, and the pushes), with and without delta.
    let plain_bytes = plain_before + plain.bytes_received;
    let delta_bytes = delta_before + delta.bytes_received;
    let data_bytes: usize = published.iter().map(|d| d.to_string().len()).sum();
    eprintln!(
        "delta bytes: 100 publications, {data_bytes} B of data; without delta {plain_bytes} B, \
         with fossil delta {delta_bytes} B ({:.1}x less)",
        plain_bytes as f64 / delta_bytes as f64
    );
    assert!(delta_bytes * 5 < plain_bytes, "{delta_bytes} B with delta, {plain_bytes} B without");

    // History stays full data, also for a delta subscriber.
    let h = delta.history(channel, json!({"limit": 3, "reverse": true})).await;
    let pubs = h["history"]["publications"].as_array().expect("history").clone();
    let got: Vec<&Value> = pubs.iter().map(|p| &p["data"]).collect();
    assert_eq!(got, [&document(100), &document(99), &document(98)], "{h}");
    assert!(pubs.iter().all(|p| p.get("delta").is_none()), "{h}");
}

#[tokio::test]
async fn deltas_work_across_nodes_sharing_redis() {
    let redis = RedisServer::start();
    let nodes = start_nodes(2, &[redis.url()], false, &namespaces());
    let (a, b) = (&nodes[0], &nodes[1]);
    let channel = "doc:cluster";
    let mut publisher = a.client().await;
    publisher.connect_ok("").await;
    let (mut on_b, sub) = subscriber(b, channel, true, None).await;
    assert_eq!(sub["delta"], true, "{sub}");
    let mut reader = DeltaReader::default();
    for v in 1..=20 {
        let r = publisher.publish(channel, document(v)).await;
        assert!(r.get("publish").is_some(), "{r}");
        let p = on_b.recv_push().await;
        assert_eq!(reader.apply(&p["push"]["pub"]), document(v).to_string().into_bytes());
    }
    assert_eq!(reader.deltas, 19, "all but the first, computed by node B");
}

#[tokio::test]
async fn a_delta_type_the_namespace_does_not_allow_is_declined_and_publications_come_in_full() {
    let server = server();
    let mut bystander = Bystander::join(&server).await;
    let mut publisher = server.client().await;
    publisher.connect_ok("").await;
    // Centrifugo answers such a subscribe without error and without `delta`;
    // SDKs then take full payloads. So does fanfare.
    for (channel, delta) in [("plain:x", "fossil"), ("doc:y", "xdelta")] {
        let mut c = server.client().await;
        c.connect_ok("").await;
        let sub = c.subscribe_ok(channel, json!({"delta": delta})).await;
        assert!(sub.get("delta").is_none(), "{channel} with {delta}: {sub}");
        for v in 1..=3 {
            publisher.publish(channel, document(v)).await;
            let p = c.recv_push().await;
            assert_eq!(p["push"]["pub"]["data"], document(v), "raw JSON, not a string: {p}");
            assert!(p["push"]["pub"].get("delta").is_none(), "{p}");
        }
    }
    assert_survived(&server, &mut bystander).await;
}

#[tokio::test]
async fn a_subscriber_that_joins_mid_stream_gets_a_full_publication_first() {
    let server = server();
    let channel = "doc:late";
    let mut publisher = server.client().await;
    publisher.connect_ok("").await;
    let (mut early, _) = subscriber(&server, channel, true, None).await;
    for v in 1..=3 {
        publisher.publish(channel, document(v)).await;
        early.recv_push().await;
    }
    // It never saw offset 3, so offset 4 cannot be a delta for it, although
    // it is one for the subscriber that was there all along.
    let (mut late, _) = subscriber(&server, channel, true, None).await;
    publisher.publish(channel, document(4)).await;
    let e = early.recv_push().await;
    let l = late.recv_push().await;
    assert_eq!(e["push"]["pub"]["delta"], true, "{e}");
    assert!(l["push"]["pub"].get("delta").is_none(), "{l}");
    let mut reader = DeltaReader::default();
    assert_eq!(reader.apply(&l["push"]["pub"]), document(4).to_string().into_bytes());
    publisher.publish(channel, document(5)).await;
    let l = late.recv_push().await;
    assert_eq!(l["push"]["pub"]["delta"], true, "then deltas: {l}");
    assert_eq!(reader.apply(&l["push"]["pub"]), document(5).to_string().into_bytes());
    late.assert_silent(Duration::from_millis(200)).await;
}

#[test]
fn an_unknown_delta_type_in_the_configuration_is_refused_naming_the_option() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = dir.path().join("f.toml");
    std::fs::write(&cfg, "[[namespaces]]\nname = \"x\"\nallowed_delta_types = [\"xdelta\"]\n")
        .expect("write");
    let (status, _, err) =
        run_cli(&["check-config", "--config", cfg.to_str().expect("utf-8")], &[]);
    assert!(!status.success());
    assert!(err.contains("xdelta") && err.contains("fossil"), "{err}");
}
