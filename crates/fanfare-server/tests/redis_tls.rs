//! Redis over TLS (`rediss://`, `redis.tls_ca`, `redis.tls_cert`,
//! `redis.tls_key`): real `redis-server` processes serving TLS only, a test CA
//! made at test time, clients publishing and receiving through two fanfare
//! nodes; standalone with a required client certificate and a 3-master Redis
//! Cluster whose redirects (MOVED) and slot map stay on TLS; and the clear
//! refusals: a node without the client certificate, a Redis certificate from
//! another CA, bad TLS settings.

mod common;

use std::sync::Arc;

use common::redis::{broker_toml, collect_pubs, start_nodes_with};
use common::redis_tls::{TestCa, TlsCluster, TlsRedis};
use common::{Bystander, Server, assert_survived, free_port, run_cli};
use serde_json::json;

fn namespaces() -> String {
    common::open_namespaces(Some(100))
}

/// A subscriber on `b` gets what a client publishes on `a`, for every channel.
async fn publish_on_a_receive_on_b(a: &Server, b: &Server, channels: &[&str]) {
    let mut sub = b.connected("sub").await;
    for ch in channels {
        sub.subscribe_ok(ch, json!({"recoverable": true})).await;
    }
    let mut publisher = a.connected("pub").await;
    for (n, ch) in channels.iter().enumerate() {
        let r = publisher.publish(ch, json!({"n": n})).await;
        assert_eq!(r["publish"], json!({}), "publish into {ch} failed: {r}");
    }
    let got = collect_pubs(&mut sub, channels.len()).await;
    for (n, ch) in channels.iter().enumerate() {
        assert!(
            got.iter().any(|s| s.channel == *ch && s.data == json!({"n": n}) && s.offset == 1),
            "{ch}: {got:?}"
        );
    }
    // History reads go through the same TLS connections.
    let h = sub.history(channels[0], json!({"limit": 10})).await;
    assert_eq!(h["history"]["publications"].as_array().map(Vec::len), Some(1), "{h}");
}

#[tokio::test]
async fn two_nodes_publish_and_deliver_through_a_tls_redis_that_requires_a_client_certificate() {
    let ca = Arc::new(TestCa::generate("standalone"));
    let redis = TlsRedis::start(ca.clone(), "yes");
    let nodes = start_nodes_with(2, &[redis.url()], false, &ca.redis_toml(true), &namespaces());
    publish_on_a_receive_on_b(&nodes[0], &nodes[1], &["tls-a", "tls-b"]).await;
    // Both nodes' connections are TLS with our client certificate: Redis
    // serves nothing else (`--port 0`, `--tls-auth-clients yes`).
    let clients = redis.cli(&["CLIENT", "LIST"]);
    assert!(clients.lines().count() >= 4, "{clients}");
}

#[tokio::test]
async fn two_nodes_publish_and_deliver_through_a_tls_redis_cluster_following_redirects_over_tls() {
    let ca = Arc::new(TestCa::generate("cluster"));
    let cluster = TlsCluster::start(ca.clone(), 3, "optional");
    // One seed only: every other master is learnt from CLUSTER SLOTS / MOVED,
    // and must be reached over TLS as well.
    let seeds = vec![cluster.urls()[0].clone()];
    let nodes = start_nodes_with(2, &seeds, true, &ca.redis_toml(false), &namespaces());
    // Channels on slots of all three masters.
    let channels: Vec<String> = (0..12).map(|i| format!("spread-{i}")).collect();
    let refs: Vec<&str> = channels.iter().map(String::as_str).collect();
    publish_on_a_receive_on_b(&nodes[0], &nodes[1], &refs).await;
    for m in &cluster.masters {
        let n = m.cli(&["DBSIZE"]).trim().parse::<u64>().unwrap_or(0);
        assert!(n > 0, "master :{} holds no stream: every master is used", m.port);
    }
}

/// Starts a node that must fail: its exit status is an error and its log
/// names the cause.
fn start_fails(config: &str) -> String {
    let port = free_port();
    let grpc = free_port();
    let toml = format!(
        "[http]\nlisten = \"127.0.0.1:{port}\"\n\n[grpc]\nlisten = \"127.0.0.1:{grpc}\"\n\n{config}"
    );
    match Server::spawn(&toml, port, &[]) {
        Ok(_) => panic!("the node started although it must not:\n{toml}"),
        Err(log) => log,
    }
}

#[tokio::test]
async fn a_node_without_a_client_certificate_is_refused_by_redis_and_says_so_while_others_keep_working()
 {
    let ca = Arc::new(TestCa::generate("refusals"));
    let redis = TlsRedis::start(ca.clone(), "yes");
    let good = start_nodes_with(1, &[redis.url()], false, &ca.redis_toml(true), &namespaces());
    let mut bystander = Bystander::join(&good[0]).await;

    // No client certificate: Redis ends the handshake; the node gives up
    // after redis.startup_timeout with the reason.
    let quick = |tls: String| {
        let broker = broker_toml(&[redis.url()], false, &tls);
        let broker = broker.replace("startup_timeout = \"10s\"", "startup_timeout = \"1s\"");
        format!("{broker}\n{}", namespaces())
    };
    let no_cert = quick(ca.redis_toml(false));
    let log = start_fails(&no_cert);
    // The address only: a URL may carry a password (decision 30.a).
    let addr = format!("redis: cannot reach 127.0.0.1:{}", redis.port);
    assert!(log.contains(&addr) && log.contains("CertificateRequired"), "{log}");

    // A server certificate from another CA is not trusted.
    let other = TestCa::generate("other");
    let wrong_ca = quick(other.redis_toml(true));
    let log = start_fails(&wrong_ca);
    assert!(
        log.contains("redis: cannot reach") && log.to_lowercase().contains("certificate"),
        "{log}"
    );

    assert_survived(&good[0], &mut bystander).await;
}

#[test]
fn bad_redis_tls_settings_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let check = |redis: &str| {
        let path = dir.path().join("fanfare.toml");
        std::fs::write(
            &path,
            format!("[broker]\nkind = \"redis\"\n\n[redis]\nurls = [\"rediss://127.0.0.1:1\"]\n{redis}\n"),
        )
        .expect("writing config");
        let (status, _, stderr) =
            run_cli(&["check-config", "--config", path.to_str().expect("utf-8 path")], &[]);
        assert!(!status.success(), "accepted: {redis}");
        stderr
    };
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "hello").expect("writing");
    let missing = dir.path().join("missing.pem");

    let e = check(&format!("tls_ca = {:?}", missing.display().to_string()));
    assert!(e.contains("redis.tls_ca: cannot read"), "{e}");
    let e = check(&format!("tls_ca = {:?}", not_pem.display().to_string()));
    assert!(e.contains("redis.tls_ca:") && e.contains("no PEM certificate"), "{e}");
    let e = check(&format!("tls_cert = {:?}", not_pem.display().to_string()));
    assert!(e.contains("redis.tls_key: needed"), "{e}");
    let e = check("sentinel_master = \"m\"");
    assert!(e.contains("redis.sentinel_urls: needed"), "{e}");
    let e = check("sentinel_urls = [\"redis://127.0.0.1:1\"]");
    assert!(e.contains("redis.sentinel_master: needed"), "{e}");
    let e = check("sentinel_urls = [\"http://127.0.0.1:1\"]\nsentinel_master = \"m\"");
    assert!(e.contains("redis.sentinel_urls: \"http://127.0.0.1:1\" must start with"), "{e}");
}
