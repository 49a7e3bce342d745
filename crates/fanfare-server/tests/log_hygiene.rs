//! Log hygiene: a node at `log.level = "trace"` (text and json) goes through
//! the paths that handle secrets, tokens, API keys and message payloads, and
//! none of them may appear anywhere in its output. In json format every line
//! is a JSON object, and API request lines carry `request_id`, connection
//! lines `session`.
//!
//! To cover a new code path: use its secrets through [`Canaries::add`] in
//! [`scenario`] (or in a function it calls), and put its config into
//! [`node_toml`] with values taken from [`Canaries`].

mod common;

use std::time::Duration;

use common::api::{grpc_client, http_api_with, http_request};
use common::{Client, Server, assert_error, sign, unix_now};
use fanfare_server::pb;
use serde_json::{Value, json};

/// Every secret, token and payload the scenario hands the node: none may
/// show up in its log.
#[derive(Default)]
struct Canaries(Vec<(&'static str, String)>);

impl Canaries {
    /// Registers `value` (what it is, for the failure message) and returns it.
    fn add(&mut self, what: &'static str, value: impl Into<String>) -> String {
        let value = value.into();
        self.0.push((what, value.clone()));
        value
    }

    /// A JWT and, separately, its signature (a log that cut the token at a
    /// dot would still leak that).
    fn token(&mut self, what: &'static str, token: String) -> String {
        let signature = token.rsplit('.').next().unwrap_or_default().to_string();
        self.0.push((what, signature));
        self.add(what, token)
    }

    fn assert_absent_from(&self, log: &str) {
        for (what, value) in &self.0 {
            assert!(!value.is_empty(), "empty canary {what}");
            if let Some(at) = log.find(value.as_str()) {
                let line = log[..at].rsplit('\n').next().unwrap_or_default();
                let rest = log[at..].split('\n').next().unwrap_or_default();
                panic!("{what} ({value}) is in the log:\n{line}{rest}");
            }
        }
    }
}

/// The secrets of the node's configuration.
struct Config {
    hmac: String,
    hmac_previous: String,
    jwks_password: String,
    api_key: String,
    webhook_secret: String,
    proxy_header: String,
    redis_password: String,
    admin_password: String,
    admin_secret: String,
}

impl Config {
    fn new(c: &mut Canaries) -> Config {
        Config {
            hmac: c.add("auth.hmac_secret", "hmac-CANARY-7d1e90b2"),
            hmac_previous: c.add("auth.hmac_previous_secret", "hmac-previous-CANARY-3e88"),
            jwks_password: c.add("auth.jwks_url access key", "jwkskey-CANARY-90ad"),
            api_key: c.add("api.key", "apikey-CANARY-51c0aa4f"),
            webhook_secret: c.add("webhooks.secret", "webhook-CANARY-0b7f2c1d"),
            proxy_header: c.add("proxies.static_headers value", "Bearer proxy-CANARY-6a2d"),
            redis_password: c.add("redis.urls password", "redispw-CANARY-11f4"),
            admin_password: c.add("admin.password", "adminpw-CANARY-5e21"),
            admin_secret: c.add("admin.secret", "adminsecret-CANARY-0123456789abcdef"),
        }
    }
}

/// A node with every secret-bearing feature on that needs no other process:
/// webhooks and an RPC proxy point at a closed port (their failures are
/// logged), Redis is configured but unused (memory broker).
fn node_toml(cfg: &Config, format: &str) -> String {
    let dead = common::free_port();
    format!(
        r#"[log]
level = "trace"
format = "{format}"

[auth]
hmac_secret = "{hmac}"
hmac_previous_secret = "{hmac_previous}"
jwks_url = "http://127.0.0.1:{dead}/jwks?access_key={jwks_pw}"

[limits]
client_commands = 20
client_command_burst = 20

[api]
key = "{api_key}"

[admin]
enabled = true
password = "{admin_pw}"
secret = "{admin_secret}"

[redis]
urls = ["redis://:{redis_pw}@127.0.0.1:{dead}/0"]

[webhooks]
url = "http://127.0.0.1:{dead}/hook"
secret = "{hook_secret}"
events = ["connect", "subscribe"]
retry_backoff = "100ms"
max_attempts = 1

[client]
rpc_proxy = "rpc"

[[proxies]]
name = "rpc"
endpoint = "http://127.0.0.1:{dead}/rpc"
timeout = "500ms"
http_headers = ["Cookie"]
static_headers = {{ "Authorization" = "{proxy_header}" }}

[[namespaces]]
name = "private"
private = true

[[namespaces]]
name = "open"
allow_subscribe = true
allow_publish = true
history_size = 10
history_ttl = "60s"
"#,
        hmac = cfg.hmac,
        hmac_previous = cfg.hmac_previous,
        jwks_pw = cfg.jwks_password,
        api_key = cfg.api_key,
        redis_pw = cfg.redis_password,
        hook_secret = cfg.webhook_secret,
        proxy_header = cfg.proxy_header,
        admin_pw = cfg.admin_password,
        admin_secret = cfg.admin_secret,
    )
}

/// What a client, a backend and an operator do with secrets and payloads.
async fn scenario(server: &Server, cfg: &Config, c: &mut Canaries) {
    let secret = &cfg.hmac;
    // Connect with a JWT (and a cookie the RPC proxy forwards).
    let token = c.token(
        "connection token",
        sign(secret, &json!({"sub": "alice", "exp": unix_now() + 300, "info": {"i": "x"}})),
    );
    let cookie = c.add("cookie", "session=cookie-CANARY-2f9a");
    let mut alice = Client::open_with_headers(server.port, &[("Cookie", &cookie)]).await;
    alice.connect_ok(&token).await;

    // Subscribe with a subscription token.
    let sub_token = c.token(
        "subscription token",
        sign(secret, &json!({"sub": "alice", "channel": "private:room", "exp": unix_now() + 300})),
    );
    let r = alice.subscribe("private:room", json!({"token": sub_token})).await;
    assert!(r.get("subscribe").is_some(), "{r}");
    alice.subscribe_ok("open:chat", json!({})).await;

    // Publish a payload and receive it.
    let payload = c.add("client publication", "client-payload-CANARY-c3a8");
    let r = alice.publish("open:chat", json!({"text": payload})).await;
    assert!(r.get("publish").is_some(), "{r}");
    alice.recv_push().await;

    // An RPC through the (unreachable) proxy: error 100, logged.
    let rpc = c.add("rpc data", "rpc-payload-CANARY-44d0");
    let r = alice.command(json!({"rpc": {"method": "m", "data": {"q": rpc}}})).await;
    assert_error(&r, 100);

    // The API over HTTP: a publication, then a wrong key.
    let api_payload = c.add("HTTP API publication", "http-api-payload-CANARY-e1b7");
    let auth = format!("apikey {}", cfg.api_key);
    let r = http_api_with(
        server,
        "publish",
        &[("Authorization", &auth), ("X-Request-Id", "hygiene-1")],
        &json!({"channel": "open:chat", "data": {"text": api_payload}}),
    );
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.header("x-request-id"), Some("hygiene-1"));
    alice.recv_push().await;
    let wrong_key = c.add("wrong API key", "wrong-apikey-CANARY-8c02");
    let r = http_api_with(
        server,
        "publish",
        &[("Authorization", &format!("apikey {wrong_key}"))],
        &json!({"channel": "open:chat", "data": {}}),
    );
    assert_eq!(r.status, 401);
    // The admin console: a wrong password, a sign-in, an API call with its
    // session token, one with a forged token.
    let login = |password: &str| {
        let body = json!({ "password": password }).to_string();
        http_request(server.port, "POST", "/admin/login", &[], body.as_bytes())
    };
    let wrong_password = c.add("wrong admin password", "wrong-adminpw-CANARY-77b3");
    assert_eq!(login(&wrong_password).status, 401);
    let r = login(&cfg.admin_password);
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    let session = r.json()["token"].as_str().expect("a session token").to_string();
    let session = c.token("admin session token", session);
    let r = http_api_with(
        server,
        "info",
        &[("Authorization", &format!("token {session}"))],
        &json!({}),
    );
    assert_eq!(r.status, 200);
    let forged_session = c.add("forged admin session token", "99999999999999.forged-CANARY-a1");
    let r = http_api_with(
        server,
        "info",
        &[("Authorization", &format!("token {forged_session}"))],
        &json!({}),
    );
    assert_eq!(r.status, 401);
    // A request id that is not a plain token is replaced, not echoed.
    let forged = c.add("forged request id", "forged CANARY\" injected=1");
    let r = http_request(
        server.port,
        "POST",
        "/api/info",
        &[("Authorization", &auth), ("X-Request-Id", &forged)],
        b"{}",
    );
    assert_eq!(r.status, 200);
    assert!(r.header("x-request-id").is_some_and(|id| !id.contains("CANARY")));

    // The API over gRPC: a publication, then a wrong key.
    let grpc_payload = c.add("gRPC API publication", "grpc-api-payload-CANARY-5f3e");
    let mut api = grpc_client(server, Some(&cfg.api_key)).await;
    let data = json!({"text": grpc_payload}).to_string().into_bytes();
    api.publish(pb::PublishRequest { channel: "open:chat".into(), data, ..Default::default() })
        .await
        .expect("gRPC publish");
    alice.recv_push().await;
    let wrong_grpc_key = c.add("wrong gRPC API key", "wrong-grpc-key-CANARY-77aa");
    let mut bad = grpc_client(server, Some(&wrong_grpc_key)).await;
    assert!(bad.info(pb::InfoRequest {}).await.is_err());

    // Bad tokens: a forged connection token, a forged subscription token.
    let forged = c.token(
        "forged connection token",
        sign("not-the-secret", &json!({"sub": "mallory-CANARY", "exp": unix_now() + 300})),
    );
    let mut mallory = server.client().await;
    let (code, _) = {
        mallory.send_json(&json!({"id": 1, "connect": {"token": forged}})).await;
        mallory.expect_close().await
    };
    assert_eq!(code, 3500);
    let forged_sub = c.token(
        "forged subscription token",
        sign("not-the-secret", &json!({"sub": "alice", "channel": "private:other"})),
    );
    let mut bob = server.connected_with_token(&sign(secret, &json!({"sub": "bob"}))).await;
    bob.send_json(
        &json!({"id": 9, "subscribe": {"channel": "private:other", "token": forged_sub}}),
    )
    .await;
    assert_eq!(bob.expect_close().await.0, 3500);

    // Issue 16's refusals: a token signed with the previous secret (accepted),
    // `alg: none`, a token not valid yet, a subscription token offered as a
    // connection token, a public-key token whose `kid` the (unreachable)
    // JWKS does not know, and a client flooding past its command limit.
    let previous = c.token(
        "token signed with auth.hmac_previous_secret",
        sign(&cfg.hmac_previous, &json!({"sub": "carol", "exp": unix_now() + 300})),
    );
    let carol = server.connected_with_token(&previous).await;
    let b64 = |v: &Value| data_encoding::BASE64URL_NOPAD.encode(v.to_string().as_bytes());
    let none_claims = c.add("alg none subject", "none-CANARY-5d21");
    let none = format!("{}.{}.", b64(&json!({"alg": "none"})), b64(&json!({"sub": none_claims})));
    let early = sign(secret, &json!({"sub": "dave", "nbf": unix_now() + 600}));
    let kind = sign(secret, &json!({"sub": "dave", "channel": "private:room"}));
    let kid_claims = c.add("unknown kid subject", "kid-CANARY-0f3b");
    let unknown_kid = format!(
        "{}.{}.{}",
        b64(&json!({"alg": "RS256", "kid": "kid-CANARY-0f3b"})),
        b64(&json!({"sub": kid_claims})),
        "c2lnbmF0dXJl"
    );
    for (what, token) in [
        ("alg none token", none),
        ("token not valid before", early),
        ("subscription token as connection token", kind),
        ("token with an unknown kid", unknown_kid),
    ] {
        // An unsigned token has no signature to look for on its own.
        let token = if token.ends_with('.') { c.add(what, token) } else { c.token(what, token) };
        let mut m = server.client().await;
        m.send_json(&json!({"id": 1, "connect": {"token": token}})).await;
        assert_eq!(m.expect_close().await.0, 3500, "{what}");
    }
    let flood = c.add("flooded publication", "flood-payload-CANARY-72e1");
    let mut flooder = server.connected_with_token(&sign(secret, &json!({"sub": "flo"}))).await;
    for _ in 0..80 {
        flooder
            .send_json(
                &json!({"id": 3, "publish": {"channel": "open:chat", "data": {"text": flood}}}),
            )
            .await;
    }
    assert_eq!(flooder.expect_close().await.0, 3013);
    carol.close().await;

    // Malformed frames that quote secrets: serde's errors must not echo them.
    let in_frame = c.add("value in a malformed frame", "frame-CANARY-19bd");
    let mut eve = server.client().await;
    eve.send_text(&format!(r#"{{"id":"{in_frame}","connect":{{}}}}"#)).await;
    assert_eq!(eve.expect_close().await.0, 3501);
    let bad_data = c.add("value in malformed publish data", "data-CANARY-a0c4");
    let mut eve = server.connected_with_token(&sign(secret, &json!({"sub": "eve"}))).await;
    eve.send_json(&json!({"id": 2, "publish": {"channel": ["x", bad_data], "data": {}}})).await;
    assert_eq!(eve.expect_close().await.0, 3501);

    // Let the webhook deliveries fail and be logged.
    tokio::time::sleep(Duration::from_millis(300)).await;
    alice.close().await;
}

async fn run(format: &str) -> String {
    let mut c = Canaries::default();
    let cfg = Config::new(&mut c);
    let mut server = Server::start(&node_toml(&cfg, format));
    scenario(&server, &cfg, &mut c).await;
    // `check-config` prints the configuration too (masked).
    let (status, out, err) =
        common::run_cli(&["--config", server.config_path.to_str().unwrap(), "check-config"], &[]);
    assert!(status.success(), "{err}");
    c.assert_absent_from(&out);
    server.sigterm();
    let log = server.log();
    assert!(log.contains("fanfare node started"), "{log}");
    c.assert_absent_from(&log);
    log
}

#[tokio::test]
async fn a_trace_level_text_log_holds_no_secret_token_key_or_payload() {
    let log = run("text").await;
    // The lines a reader needs are there, with their ids.
    assert!(log.lines().any(|l| l.contains("request_id=hygiene-1")), "{log}");
    assert!(log.lines().any(|l| l.contains("connected") && l.contains("client=")), "{log}");
}

#[tokio::test]
async fn a_trace_level_json_log_holds_no_secret_and_every_line_is_json_with_its_ids() {
    let log = run("json").await;
    let lines: Vec<Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let by_message =
        |m: &str| lines.iter().filter(|v| v["message"] == m).cloned().collect::<Vec<_>>();
    let api = by_message("api request");
    assert!(!api.is_empty(), "{log}");
    for line in &api {
        assert!(line["span"]["request_id"].as_str().is_some_and(|id| !id.is_empty()), "{line}");
    }
    assert!(api.iter().any(|l| l["span"]["request_id"] == "hygiene-1"), "{log}");
    let grpc = by_message("grpc request");
    assert!(!grpc.is_empty(), "{log}");
    assert!(grpc.iter().all(|l| l["span"]["request_id"].is_string()), "{log}");
    let connected = by_message("connected");
    assert!(connected.len() >= 3, "{log}");
    for line in connected.iter().chain(&by_message("closed")) {
        assert!(line["session"].is_u64(), "{line}");
    }
    assert!(connected.iter().all(|l| l["client"].is_string()), "{log}");
}
