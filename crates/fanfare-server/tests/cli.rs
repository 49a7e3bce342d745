//! The command line: check-config errors naming the bad key, environment
//! overrides, and `fanfare token`.

mod common;

use common::{Server, free_port, http_get, run_cli};
use serde_json::json;

fn write_config(dir: &tempfile::TempDir, text: &str) -> String {
    let path = dir.path().join("fanfare.toml");
    std::fs::write(&path, text).expect("writing config");
    path.to_str().expect("utf-8 path").to_string()
}

#[test]
fn check_config_names_the_bad_key() {
    let dir = tempfile::tempdir().expect("temp dir");

    // check-config on `toml` fails and its error names `key`.
    let rejected = |toml: &str, key: &str, what: &str| {
        let cfg = write_config(&dir, toml);
        let (status, _, stderr) = run_cli(&["check-config", "--config", &cfg], &[]);
        assert!(!status.success(), "{what} accepted");
        assert!(stderr.contains(key), "stderr does not name {key}: {stderr}");
    };
    rejected("[http]\nlisen = \"127.0.0.1:1\"\n", "http.lisen", "unknown key");
    rejected("[client]\nping_interval = \"soon\"\n", "client.ping_interval", "bad duration");
    // Values out of range.
    rejected("[client]\nwrite_delay = \"2s\"\n", "client.write_delay", "a 2 s write delay");
    rejected(
        "[client]\nwrite_delay = \"100us\"\n",
        "client.write_delay",
        "a delay below the timer's 1 ms resolution",
    );

    // Bad value from the environment.
    let cfg = write_config(&dir, "");
    let (status, _, stderr) = run_cli(
        &["check-config", "--config", &cfg],
        &[("FANFARE__HTTP__LISTEN", "not-an-address")],
    );
    assert!(!status.success(), "bad http.listen accepted");
    assert!(stderr.contains("http.listen"), "{stderr}");

    // A missing file.
    let missing = dir.path().join("missing.toml");
    let (status, _, stderr) =
        run_cli(&["check-config", "--config", missing.to_str().expect("utf-8")], &[]);
    assert!(!status.success(), "missing config file accepted");
    assert!(stderr.contains("does not exist"), "{stderr}");

    // Valid: exit 0, effective settings printed with secrets masked.
    let cfg = write_config(
        &dir,
        "[auth]\nhmac_secret = \"topsecret\"\n\n[client]\nping_interval = \"5s\"\npong_timeout = \"2s\"\n",
    );
    let (status, stdout, stderr) = run_cli(&["check-config", "--config", &cfg], &[]);
    assert!(status.success(), "valid config refused: {stderr}");
    assert!(stdout.contains("configuration is valid"), "{stdout}");
    assert!(!stdout.contains("topsecret"), "secret printed: {stdout}");
    assert!(stdout.contains("ping_interval"), "{stdout}");
}

#[test]
fn env_overrides_the_listen_address() {
    let file_port = free_port();
    let env_port = free_port();
    let config = format!(
        "[http]\nlisten = \"127.0.0.1:{file_port}\"\n\n[grpc]\nlisten = \"127.0.0.1:{}\"\n",
        free_port()
    );
    let env_addr = format!("127.0.0.1:{env_port}");
    let server = Server::spawn(&config, env_port, &[("FANFARE__HTTP__LISTEN", &env_addr)])
        .unwrap_or_else(|log| panic!("node did not listen on the env address: {log}"));
    assert_eq!(http_get(env_port, "/health").expect("GET /health").0, 200);
    assert!(http_get(file_port, "/health").is_err(), "the node also listens on the file's address");
    drop(server);
}

#[tokio::test]
async fn token_subcommand_mints_usable_tokens() {
    let server = Server::start(&format!("[auth]\nhmac_secret = \"{}\"\n", common::SECRET));
    let cfg = server.config_path.to_str().expect("utf-8 path");
    let (status, stdout, stderr) = run_cli(
        &["token", "--user", "42", "--ttl", "60", "--channels", "news", "--config", cfg],
        &[],
    );
    assert!(status.success(), "fanfare token failed: {stderr}");
    let token = stdout.trim();
    assert_eq!(token.split('.').count(), 3, "not a JWT: {stdout}");
    let mut c = server.client().await;
    let reply = c.connect_ok(token).await;
    let subs = reply["subs"].as_object().expect("subs");
    assert!(subs.contains_key("#42") && subs.contains_key("news"), "{reply}");
    assert_eq!(reply["expires"], true, "{reply}");
    let r = c.subscribe("health:t", json!({})).await;
    assert!(r.get("subscribe").is_some(), "{r}");

    // Without a secret there is nothing to sign with.
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = write_config(&dir, "");
    let (status, _, stderr) = run_cli(&["token", "--user", "1", "--config", &cfg], &[]);
    assert!(!status.success());
    assert!(stderr.contains("auth.hmac_secret"), "{stderr}");
}

#[tokio::test]
async fn token_info_shows_in_presence_and_in_the_publications_of_its_holder() {
    let server = Server::start(&format!(
        "[auth]\nhmac_secret = \"{}\"\n\n[[namespaces]]\nname = \"room\"\npresence = true\n\
         allow_publish = true\n",
        common::SECRET
    ));
    let cfg = server.config_path.to_str().expect("utf-8 path");
    let info = r#"{"name":"Ann","roles":["admin"]}"#;
    let (status, stdout, stderr) =
        run_cli(&["token", "--user", "42", "--info", info, "--config", cfg], &[]);
    assert!(status.success(), "fanfare token --info failed: {stderr}");
    let mut ann = server.client().await;
    ann.connect_ok(stdout.trim()).await;
    ann.subscribe_ok("room:1", json!({})).await;

    // Another user sees Ann's info in the channel's presence.
    let mut other = server.connected("7").await;
    other.subscribe_ok("room:1", json!({})).await;
    let p = other.presence("room:1").await;
    let entries = p["presence"]["presence"].as_object().unwrap_or_else(|| panic!("{p}"));
    let mine: Vec<_> = entries.values().filter(|e| e["user"] == "42").collect();
    assert_eq!(mine.len(), 1, "{p}");
    assert_eq!(mine[0]["conn_info"], json!({"name": "Ann", "roles": ["admin"]}), "{p}");

    // And in what she publishes.
    let r = ann.publish("room:1", json!({"text": "hi"})).await;
    assert_eq!(r["publish"], json!({}), "{r}");
    let push = other.recv_push().await;
    assert_eq!(push["push"]["pub"]["info"]["user"], "42", "{push}");
    assert_eq!(
        push["push"]["pub"]["info"]["conn_info"],
        json!({"name": "Ann", "roles": ["admin"]})
    );

    // `--info` that is not JSON mints nothing and says which flag is wrong.
    let (status, stdout, stderr) =
        run_cli(&["token", "--user", "42", "--info", "{name: Ann}", "--config", cfg], &[]);
    assert!(!status.success(), "minted a token with bad --info: {stdout}");
    assert!(stdout.trim().is_empty(), "{stdout}");
    assert!(stderr.contains("--info"), "{stderr}");
}
