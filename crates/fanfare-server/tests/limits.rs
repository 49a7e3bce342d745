//! `[limits]`: each limit answers with its own code or status, counts the
//! refusal in `fanfare_limit_refusals_total{limit}`, and leaves the other
//! clients of the node receiving (a [`Bystander`] checks after each).

mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::api::metric_with;
use common::stream::Stream;
use common::{
    Bystander, Client, ReadEnd, SECRET, Server, assert_error, sign, unix_now, user_token,
};
use serde_json::json;

fn refusals(server: &Server, limit: &str) -> f64 {
    metric_with(server.port, "fanfare_limit_refusals_total", &[("limit", limit)])
}

/// A node checking tokens (so connections have users), with `limits` as its
/// `[limits]` section.
fn node(limits: &str) -> Server {
    Server::start(&format!("[auth]\nhmac_secret = \"{SECRET}\"\n\n[limits]\n{limits}\n"))
}

/// The most requests a token bucket of `rate` per second (burst `rate`,
/// refilled continuously, limits.rs) can admit over `elapsed`: the full
/// burst plus the refill, with 1 ms for the node's millisecond clock.
fn admissible(rate: u32, elapsed: Duration) -> usize {
    rate as usize + ((elapsed.as_millis() as usize + 1) * rate as usize) / 1000
}

/// Opens WebSocket connections from `source` (attempt `n` with the headers
/// `headers(n)`) until `refusals` were refused, at most 30 attempts, and
/// checks a connect-rate bucket of `rate` per second: the first `rate`
/// pass, every refusal is `status`, and no more passed than the bucket
/// admits over the time the attempts took. Judging against the measured
/// time, not a fixed window, keeps a loaded machine (slow handshakes, so
/// more refill) from failing a working limiter, while a missing or
/// too-generous one still fails. Returns the refused count.
async fn open_until_refused(
    port: u16,
    source: Ipv4Addr,
    headers: impl Fn(usize) -> Vec<(String, String)>,
    rate: u32,
    refusals: usize,
    status: u16,
) -> usize {
    let start = Instant::now();
    let mut statuses: Vec<Option<u16>> = Vec::new();
    while statuses.iter().filter(|s| s.is_some()).count() < refusals && statuses.len() < 30 {
        let h = headers(statuses.len());
        let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        statuses.push(Client::open_from(port, source, &h).await.err());
    }
    let elapsed = start.elapsed();
    let passed = statuses.iter().filter(|s| s.is_none()).count();
    let refused = statuses.len() - passed;
    let burst_passed = statuses.iter().take(rate as usize).all(Option::is_none);
    assert!(burst_passed, "a burst passes: {statuses:?}");
    assert!(statuses.iter().flatten().all(|s| *s == status), "{statuses:?}");
    assert!(refused >= refusals, "{refusals} refusals expected in {elapsed:?}: {statuses:?}");
    assert!(
        passed <= admissible(rate, elapsed),
        "{passed} passed in {elapsed:?} at {rate}/s: {statuses:?}"
    );
    refused
}

#[tokio::test]
async fn the_connection_past_limits_node_connections_is_answered_503_before_its_upgrade() {
    let server = node("node_connections = 3");
    let mut bystander = Bystander::join(&server).await;
    let a = server.connected("a").await;
    let _b = server.connected("b").await;
    // Three open: the fourth is refused on every transport, before the upgrade.
    assert_eq!(Client::try_open_status(server.port).await.err(), Some(503));
    let sse = Stream::open(server.port, "GET", "/connection/sse?cf_connect=%7B%7D", &[], "").await;
    assert_eq!(sse.status, 503);
    assert!(sse.headers.get("retry-after").is_some());
    assert!(sse.text().await.contains("limits.node_connections"));
    assert_eq!(refusals(&server, "node_connections"), 2.0);
    bystander.check().await;
    // A connection closing makes room again.
    a.close().await;
    let mut again = None;
    for _ in 0..50 {
        if let Ok(c) = Client::try_open_status(server.port).await {
            again = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut c = again.expect("room after a close");
    c.connect_ok(&user_token("c")).await;
    bystander.check().await;
}

#[tokio::test]
async fn a_users_connection_past_limits_user_connections_is_closed_with_3504() {
    let server = node("user_connections = 2");
    let mut bystander = Bystander::join(&server).await;
    let one = server.connected("u").await;
    let _two = server.connected("u").await;
    let mut third = server.client().await;
    third.send_json(&json!({"id": 1, "connect": {"token": user_token("u")}})).await;
    assert_eq!(third.expect_close().await.0, 3504);
    assert_eq!(refusals(&server, "user_connections"), 1.0);
    // Other users are not affected, and the bystander keeps receiving.
    server.connected("v").await;
    bystander.check().await;
    // Once one of u's connections is gone, u may connect again.
    one.close().await;
    let mut ok = false;
    for _ in 0..50 {
        let mut c = server.client().await;
        if c.connect(&user_token("u")).await.get("connect").is_some() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "u could not connect after closing one connection");
}

#[tokio::test]
async fn new_connections_past_limits_connect_rate_are_answered_503() {
    let server = node("connect_rate = 2");
    // The bystander takes one of the two tokens of this second; wait for a refill.
    let mut bystander = Bystander::join(&server).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // A second's worth passes, then 503s (two of them: refusing does not
    // spend the refill).
    let refused = open_until_refused(server.port, Ipv4Addr::LOCALHOST, |_| vec![], 2, 2, 503).await;
    assert_eq!(refusals(&server, "connect_rate"), refused as f64);
    bystander.check().await;
}

#[tokio::test]
async fn one_address_past_limits_ip_connect_rate_gets_429_while_other_addresses_connect() {
    let server = node("ip_connect_rate = 3");
    let mut bystander = Bystander::join(&server).await;
    let flooder = Ipv4Addr::new(127, 0, 0, 9);
    let refused = open_until_refused(server.port, flooder, |_| vec![], 3, 3, 429).await;
    // Another address has its own budget.
    let other = Client::open_from(server.port, Ipv4Addr::new(127, 0, 0, 10), &[]).await;
    other.expect("another address connects");
    assert_eq!(refusals(&server, "ip_connect_rate"), refused as f64);
    bystander.check().await;
}

#[tokio::test]
async fn behind_a_trusted_proxy_clients_are_counted_by_x_forwarded_for_and_others_by_address() {
    let server = node("ip_connect_rate = 2\ntrusted_proxies = [\"127.0.0.20/32\"]");
    let mut bystander = Bystander::join(&server).await;
    let proxy = Ipv4Addr::new(127, 0, 0, 20);
    // Through the proxy: each forwarded client has its own budget (a burst
    // passes for each, though all come from the proxy's address) and is
    // refused past it. Each client's refusal comes right after its burst.
    for client in ["203.0.113.1", "203.0.113.2", "203.0.113.3"] {
        let xff = |_| vec![("X-Forwarded-For".into(), format!("{client}, 127.0.0.20"))];
        open_until_refused(server.port, proxy, xff, 2, 1, 429).await;
    }
    // X-Real-IP counts when there is no X-Forwarded-For.
    let real = |_| vec![("X-Real-IP".into(), "203.0.113.9".into())];
    open_until_refused(server.port, proxy, real, 2, 1, 429).await;
    // An untrusted peer's headers are its own word: it is counted by address
    // (a different forwarded client each time, refused all the same).
    let liar = Ipv4Addr::new(127, 0, 0, 21);
    let xff = |n| vec![("X-Forwarded-For".into(), format!("198.51.100.{n}"))];
    open_until_refused(server.port, liar, xff, 2, 1, 429).await;
    bystander.check().await;
}

/// `n` publish commands in one frame; their ids start at `first`.
fn publishes(first: u32, n: u32, channel: &str) -> String {
    (first..first + n)
        .map(|id| json!({"id": id, "publish": {"channel": channel, "data": {"n": id}}}).to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn commands_past_limits_client_commands_get_111_and_another_burst_of_them_closes_3013() {
    let server = node("client_commands = 10\nclient_command_burst = 5");
    let mut bystander = Bystander::join(&server).await;
    // The bystander's own publishes stay within its budget: one per check.
    let mut c = server.connected("flooder").await;
    // connect took no token: a burst of 5 passes, the next 5 get 111, and a
    // second burst refused closes the connection. The bucket refills while
    // the node works through the frame (10 tokens/s, so 0.01 per ms): when a
    // millisecond passed, the debt after the 10th is just short of the burst
    // and the 11th gets one more 111; the 12th closes at the latest.
    c.send_text(&publishes(100, 12, "health:flood")).await;
    for id in 100..105 {
        assert!(c.reply(id).await.get("publish").is_some(), "command {id} within the burst");
    }
    for id in 105..110 {
        assert_error(&c.reply(id).await, 111);
    }
    let mut refused = 5.0;
    let code = loop {
        match c.try_recv_json(common::TIMEOUT).await {
            Ok(r) if r["id"] == 110 => {
                assert_error(&r, 111);
                refused += 1.0;
            }
            Ok(r) => panic!("after the 10th command only 110's 111 or the close may come: {r}"),
            Err(ReadEnd::Closed(code, _)) => break code,
            Err(e) => panic!("expected the close after the second burst, got {e:?}"),
        }
    };
    assert_eq!(code, 3013);
    // Every 111 and the close count as refusals.
    assert_eq!(refusals(&server, "client_commands"), refused + 1.0);
    bystander.check().await;

    // A client that slows down after its 111s is served again.
    let mut slow = server.connected("slow").await;
    slow.send_text(&publishes(200, 7, "health:slow")).await;
    for id in 200..205 {
        assert!(slow.reply(id).await.get("publish").is_some());
    }
    for id in 205..207 {
        assert_error(&slow.reply(id).await, 111);
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let r = slow.publish("health:slow", json!({"after": "a pause"})).await;
    assert!(r.get("publish").is_some(), "{r}");
    bystander.check().await;
}

#[tokio::test]
async fn commands_of_one_user_past_limits_user_commands_get_111_across_its_connections() {
    let server = node("user_commands = 4");
    let mut bystander = Bystander::join(&server).await;
    let mut a = server.connected("busy").await;
    let mut b = server.connected("busy").await;
    let mut other = server.connected("calm").await;
    // Three commands on each connection, sent at once: each connection
    // stays within four a second, the user does not. The user's burst of
    // four passes; the rest get 111 unless the bucket refilled meanwhile,
    // so the passes are judged against the measured time (a loaded
    // machine answers slower; a per-connection limit still fails).
    let start = Instant::now();
    a.send_text(&publishes(1, 3, "health:a")).await;
    b.send_text(&publishes(1, 3, "health:b")).await;
    let mut passed = 0;
    for id in 1..4 {
        for r in [a.reply(id).await, b.reply(id).await] {
            if r.get("publish").is_some() {
                passed += 1;
            } else {
                assert_error(&r, 111);
            }
        }
    }
    let elapsed = start.elapsed();
    assert!(
        (4..6).contains(&passed) && passed <= admissible(4, elapsed),
        "{passed} of 6 passed in {elapsed:?} at 4/s"
    );
    // Another user has its own budget; 111 does not close (no debt here).
    let r = other.publish("health:c", json!({})).await;
    assert!(r.get("publish").is_some(), "{r}");
    assert_eq!(refusals(&server, "user_commands"), (6 - passed) as f64);
    tokio::time::sleep(Duration::from_millis(600)).await;
    a.send_text(&publishes(4, 1, "health:a")).await;
    assert!(a.reply(4).await.get("publish").is_some(), "refilled");
    bystander.check().await;
}

#[tokio::test]
async fn a_token_granting_more_channels_than_client_max_channels_is_closed_with_3505() {
    let server = Server::start(&format!(
        "[auth]\nhmac_secret = \"{SECRET}\"\n\n[client]\nmax_channels = 4\n\n\
         [[namespaces]]\nname = \"\"\n"
    ));
    let mut bystander = Bystander::join(&server).await;
    let token = |n: usize| {
        let channels: Vec<String> = (0..n).map(|i| format!("room{i}")).collect();
        sign(SECRET, &json!({"sub": "t", "exp": unix_now() + 300, "channels": channels}))
    };
    // Three claimed and the personal channel `#t`: four, the limit.
    let mut ok = server.client().await;
    let r = ok.connect_ok(&token(3)).await;
    assert_eq!(r["subs"].as_object().map(|s| s.len()), Some(4), "{r}");
    // A fourth claimed: five subscriptions would be one too many.
    let mut over = server.client().await;
    over.send_json(&json!({"id": 1, "connect": {"token": token(4)}})).await;
    assert_eq!(over.expect_close().await.0, 3505);
    // 300 claimed (the case) is refused as well, not 301 subscriptions.
    let mut many = server.client().await;
    many.send_json(&json!({"id": 1, "connect": {"token": token(300)}})).await;
    assert_eq!(many.expect_close().await.0, 3505);
    assert_eq!(refusals(&server, "channels"), 2.0);
    // A client subscribing past the limit still gets error 106.
    let r = ok.subscribe("room9", json!({})).await;
    assert_error(&r, 106);
    bystander.check().await;
}

#[test]
fn bad_limits_are_refused_at_start_up_naming_the_key() {
    for (key, value) in [
        ("FANFARE__LIMITS__TRUSTED_PROXIES", "10.0.0.0/40"),
        ("FANFARE__LIMITS__TRUSTED_PROXIES", "proxy.local"),
        ("FANFARE__LIMITS__CLIENT_COMMAND_BURST", "0"),
        ("FANFARE__LIMITS__NODE_CONNECTIONS", "-1"),
    ] {
        let (status, _, err) = common::run_cli(&["check-config"], &[(key, value)]);
        assert!(!status.success(), "{key}={value} accepted");
        let name = key.trim_start_matches("FANFARE__").to_lowercase().replace("__", ".");
        assert!(err.contains(&name), "{key}={value}: {err}");
    }
}

#[tokio::test]
async fn every_limit_has_its_refusal_counter_from_the_start() {
    let server = node("");
    for limit in [
        "node_connections",
        "user_connections",
        "connect_rate",
        "ip_connect_rate",
        "client_commands",
        "user_commands",
        "channels",
    ] {
        let (_, body) = common::http_get(server.port, "/metrics").expect("metrics");
        let line = format!("fanfare_limit_refusals_total{{limit=\"{limit}\"}} 0");
        assert!(body.contains(&line), "{line} missing");
    }
}

/// Sends `head` and `body` (a body shorter than the head's Content-Length
/// leaves the request unfinished) and returns the status line the node
/// answers with, and how long it took.
async fn answer_to(port: u16, head: String, body: &[u8]) -> (String, Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let start = std::time::Instant::now();
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    s.write_all(head.as_bytes()).await.expect("head");
    let _ = s.write_all(body).await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "no answer within 10 s to {head:?}");
    let text = String::from_utf8_lossy(&got);
    (text.lines().next().unwrap_or("").to_string(), start.elapsed())
}

#[tokio::test]
async fn every_http_transport_answers_a_late_body_with_408_and_a_large_one_with_413() {
    let server = Server::start_with_env(
        "[transports]\nuni_http_stream = true\n",
        &[
            ("FANFARE__HTTP__BODY_READ_TIMEOUT", "1s"),
            ("FANFARE__WEBSOCKET__MAX_MESSAGE_SIZE", "1024"),
        ],
    );
    let mut bystander = Bystander::join(&server).await;
    for path in ["/connection/http_stream", "/connection/uni_http_stream", "/emulation"] {
        let head = |len: usize| {
            format!(
                "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
                 Content-Length: {len}\r\n\r\n"
            )
        };
        let (status, took) = answer_to(server.port, head(100), b"{").await;
        assert!(status.starts_with("HTTP/1.1 408"), "{path}: {status}");
        assert!(took >= Duration::from_millis(900), "{path}: answered after {took:?}");
        let (status, _) = answer_to(server.port, head(4096), &[b' '; 4096]).await;
        assert!(status.starts_with("HTTP/1.1 413"), "{path}: {status}");
    }
    bystander.check().await;
}
