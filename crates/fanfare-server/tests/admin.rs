//! The admin console (`[admin]`, decision 33) on a real node: absent when off,
//! its sign-in (wrong password 401 without detail, 429 past the limit, an
//! Argon2 hash), its session token on the control API (accepted while valid;
//! 401 when missing, forged or expired), the page's security headers, and
//! the config errors naming the key. The browser side is
//! tests/browser/admin.mjs.

mod common;

use std::time::Duration;

use common::api::{API_KEY_TOML, HttpResponse, http_api_with, http_request};
use common::{Server, run_cli};
use serde_json::json;

const PASSWORD: &str = "correct horse battery staple";
const SECRET: &str = "0123456789abcdef0123456789abcdef";

fn admin_toml(extra: &str) -> String {
    format!(
        "{API_KEY_TOML}\n[admin]\nenabled = true\npassword = \"{PASSWORD}\"\nsecret = \"{SECRET}\"\n{extra}\n"
    )
}

fn login(server: &Server, password: &str) -> HttpResponse {
    let body = json!({ "password": password }).to_string();
    http_request(
        server.port,
        "POST",
        "/admin/login",
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    )
}

#[track_caller]
fn token_of(r: &HttpResponse) -> String {
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    r.json()["token"].as_str().expect("a token").to_string()
}

fn info_with_token(server: &Server, token: &str) -> HttpResponse {
    http_api_with(server, "info", &[("Authorization", &format!("token {token}"))], &json!({}))
}

#[test]
fn a_node_without_admin_enabled_has_no_console_and_refuses_session_tokens() {
    let server = Server::start(API_KEY_TOML);
    for (method, path) in [
        ("GET", "/admin"),
        ("GET", "/admin/"),
        ("GET", "/admin/console.js"),
        ("POST", "/admin/login"),
    ] {
        let r = http_request(server.port, method, path, &[], b"{\"password\":\"x\"}");
        assert_eq!(r.status, 404, "{method} {path}");
    }
    // A token signed with the secret another node would use is still refused.
    let enabled = Server::start(&admin_toml(""));
    let token = token_of(&login(&enabled, PASSWORD));
    let r = info_with_token(&server, &token);
    assert_eq!(r.status, 401, "{:?}", r.json());
    assert_eq!(r.json()["error"]["code"], "UNAUTHENTICATED");
}

#[test]
fn the_page_and_its_assets_are_served_from_the_binary_with_a_strict_policy() {
    let server = Server::start(&admin_toml(""));
    let page = http_request(server.port, "GET", "/admin", &[], b"");
    assert_eq!(page.status, 200);
    assert_eq!(page.header("content-type"), Some("text/html; charset=utf-8"));
    let csp = page.header("content-security-policy").expect("a CSP");
    assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_eq!(page.header("x-frame-options"), Some("DENY"));
    let html = String::from_utf8_lossy(&page.body);
    for hook in
        ["password", "login", "nodes", "channels", "publish-channel", "publish-data", "publish"]
    {
        assert!(html.contains(&format!("data-testid=\"{hook}\"")), "no data-testid {hook}");
    }
    assert!(!html.contains("<script>") && !html.contains("http"), "inline script or a remote URL");
    let js = http_request(server.port, "GET", "/admin/console.js", &[], b"");
    assert_eq!(js.status, 200);
    assert_eq!(js.header("content-type"), Some("text/javascript; charset=utf-8"));
    assert!(String::from_utf8_lossy(&js.body).contains("/admin/login"));
    let css = http_request(server.port, "GET", "/admin/console.css", &[], b"");
    assert_eq!(css.header("content-type"), Some("text/css; charset=utf-8"));
    assert_eq!(http_request(server.port, "GET", "/admin/nothing", &[], b"").status, 404);
    assert_eq!(http_request(server.port, "DELETE", "/admin", &[], b"").status, 405);
}

#[test]
fn a_wrong_password_gets_401_with_nothing_and_the_right_one_a_token_the_api_accepts() {
    let server = Server::start(&admin_toml(""));
    let wrong = login(&server, "hunter2");
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.json(), json!({}), "a refusal says nothing");
    let ok = login(&server, PASSWORD);
    assert_eq!(ok.header("cache-control"), Some("no-store"));
    let token = token_of(&ok);
    let r = info_with_token(&server, &token);
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(r.json()["nodes"].as_array().map(Vec::len), Some(1));
    // Other methods too: the console uses the control API as it is.
    let auth = format!("token {token}");
    let p = http_api_with(
        &server,
        "publish",
        &[("Authorization", &auth)],
        &json!({"channel": "health:x", "data": {"n": 1}}),
    );
    assert_eq!(p.status, 200, "{:?}", p.json());
    assert_eq!(log_mentions_secrets(&server, &token), None);
}

fn log_mentions_secrets(server: &Server, token: &str) -> Option<String> {
    let log = server.log();
    [PASSWORD, SECRET, token].into_iter().find(|s| log.contains(s)).map(str::to_string)
}

#[test]
fn api_calls_without_a_valid_session_token_get_401() {
    let server = Server::start(&admin_toml(""));
    let token = token_of(&login(&server, PASSWORD));
    let (expires, tag) = token.split_once('.').unwrap();
    let later = expires.parse::<u64>().unwrap() + 3_600_000;
    let forged = [
        String::new(),
        format!("{later}.{tag}"),
        format!("{expires}.{}", "A".repeat(tag.len())),
        "garbage".into(),
    ];
    for t in &forged {
        let r = info_with_token(&server, t);
        assert_eq!(r.status, 401, "token {t:?}: {:?}", r.json());
        let message = r.json()["error"]["message"].as_str().unwrap_or_default().to_string();
        assert!(message.contains("session token"), "{message}");
    }
    let none = http_api_with(&server, "info", &[], &json!({}));
    assert_eq!(none.status, 401);
}

#[test]
fn a_session_token_stops_working_when_it_expires() {
    let server = Server::start(&admin_toml("session_ttl = \"1s\""));
    let token = token_of(&login(&server, PASSWORD));
    assert_eq!(info_with_token(&server, &token).status, 200);
    std::thread::sleep(Duration::from_millis(1300));
    let r = info_with_token(&server, &token);
    assert_eq!(r.status, 401, "{:?}", r.json());
}

#[test]
fn the_sixth_failed_sign_in_within_a_minute_gets_429_even_with_the_right_password() {
    let server = Server::start(&admin_toml(""));
    for i in 0..5 {
        assert_eq!(login(&server, &format!("guess {i}")).status, 401, "attempt {i}");
    }
    let limited = login(&server, PASSWORD);
    assert_eq!(limited.status, 429);
    let retry: u64 = limited.header("retry-after").expect("Retry-After").parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    // The node and its other users are unaffected.
    assert_eq!(http_request(server.port, "GET", "/health", &[], b"").status, 200);
}

#[test]
fn a_sign_in_that_is_not_a_password_object_gets_a_specific_answer_and_costs_no_attempt() {
    let server = Server::start(&admin_toml(""));
    for _ in 0..6 {
        let r = http_request(server.port, "POST", "/admin/login", &[], b"{\"pass\": 1}");
        assert_eq!(r.status, 400);
        assert!(
            r.json()["error"].as_str().unwrap_or_default().contains("password"),
            "{:?}",
            r.json()
        );
    }
    let big = vec![b' '; 8192];
    assert_eq!(http_request(server.port, "POST", "/admin/login", &[], &big).status, 413);
    assert_eq!(http_request(server.port, "GET", "/admin/login", &[], b"").status, 405);
    token_of(&login(&server, PASSWORD));
}

#[test]
fn a_right_password_does_not_use_up_the_sign_in_budget() {
    let server = Server::start(&admin_toml(""));
    for _ in 0..8 {
        token_of(&login(&server, PASSWORD));
    }
}

#[test]
fn an_argon2_hash_from_fanfare_hash_password_opens_the_console() {
    let hash = hash_password(PASSWORD);
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert_ne!(hash, hash_password(PASSWORD), "each hash has its own salt");
    let toml = format!(
        "{API_KEY_TOML}\n[admin]\nenabled = true\npassword_hash = \"{hash}\"\nsecret = \"{SECRET}\"\n"
    );
    let server = Server::start(&toml);
    assert_eq!(login(&server, "wrong").status, 401);
    let token = token_of(&login(&server, PASSWORD));
    assert_eq!(info_with_token(&server, &token).status, 200);
}

/// `fanfare hash-password` with `password` on standard input.
fn hash_password(password: &str) -> String {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(common::server_bin())
        .arg("hash-password")
        .env_remove("FANFARE_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("running fanfare hash-password");
    writeln!(child.stdin.take().expect("stdin"), "{password}").expect("writing the password");
    let out = child.wait_with_output().expect("waiting for fanfare hash-password");
    assert!(out.status.success());
    String::from_utf8(out.stdout).expect("UTF-8").trim().to_string()
}

#[test]
fn bad_admin_settings_stop_the_node_with_an_error_naming_the_key() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("FANFARE__ADMIN__ENABLED", "true"), ("FANFARE__ADMIN__SECRET", SECRET)],
            "admin.password:",
        ),
        (
            &[
                ("FANFARE__ADMIN__ENABLED", "true"),
                ("FANFARE__ADMIN__PASSWORD", "pw"),
                ("FANFARE__ADMIN__PASSWORD_HASH", "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA"),
                ("FANFARE__ADMIN__SECRET", SECRET),
            ],
            "admin.password_hash:",
        ),
        (
            &[("FANFARE__ADMIN__ENABLED", "true"), ("FANFARE__ADMIN__PASSWORD", "pw")],
            "admin.secret:",
        ),
        (
            &[
                ("FANFARE__ADMIN__ENABLED", "true"),
                ("FANFARE__ADMIN__PASSWORD", "pw"),
                ("FANFARE__ADMIN__SECRET", "short"),
            ],
            "admin.secret: must be at least 32",
        ),
        (
            &[
                ("FANFARE__ADMIN__ENABLED", "true"),
                ("FANFARE__ADMIN__PASSWORD_HASH", "$2b$12$notargon"),
                ("FANFARE__ADMIN__SECRET", SECRET),
            ],
            "admin.password_hash: not an Argon2 PHC string",
        ),
        (
            &[
                ("FANFARE__ADMIN__ENABLED", "true"),
                ("FANFARE__ADMIN__PASSWORD", "pw"),
                ("FANFARE__ADMIN__SECRET", SECRET),
                ("FANFARE__ADMIN__SESSION_TTL", "30d"),
            ],
            "admin.session_ttl:",
        ),
    ];
    for (env, expected) in cases {
        let (status, _, stderr) = run_cli(&["check-config"], env);
        assert!(!status.success(), "{env:?} was accepted");
        assert!(stderr.contains(expected), "{env:?}: expected {expected:?} in {stderr}");
        assert!(!stderr.contains(SECRET), "the secret is in the error: {stderr}");
    }
    // Secrets are masked by check-config.
    let (status, stdout, stderr) = run_cli(
        &["check-config"],
        &[
            ("FANFARE__ADMIN__ENABLED", "true"),
            ("FANFARE__ADMIN__PASSWORD", PASSWORD),
            ("FANFARE__ADMIN__SECRET", SECRET),
        ],
    );
    assert!(status.success(), "{stderr}");
    assert!(!stdout.contains(PASSWORD) && !stdout.contains(SECRET), "{stdout}");
}
