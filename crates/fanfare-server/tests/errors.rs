//! Bad input: every reply error and close code a client can provoke, and the
//! node keeps serving well-behaved clients afterwards.

mod common;

use common::{
    Bystander, Client, SECRET, Server, assert_error, assert_survived, sign, unix_now, user_token,
};
use serde_json::json;
use tokio_tungstenite::tungstenite;

const OPEN_NS: &str = r#"
[[namespaces]]
name = ""
allow_publish = true
"#;

/// Opens a connection, lets `misbehave` do its thing and expects the close.
async fn expect_closed_after<F>(server: &Server, connect: bool, misbehave: F) -> (u16, String)
where
    F: AsyncFnOnce(&mut Client),
{
    let mut c = server.client().await;
    if connect {
        c.connect_ok(&server.token_for("bad")).await;
    }
    misbehave(&mut c).await;
    c.expect_close().await
}

#[tokio::test]
async fn close_3501_bad_request() {
    let server = Server::start(OPEN_NS);
    let mut bystander = Bystander::join(&server).await;
    let bad_request = (3501, "bad request".to_string());

    // A command before connect.
    let got = expect_closed_after(&server, false, async |c| {
        c.send_text(r#"{"id":1,"subscribe":{"channel":"a"}}"#).await;
    })
    .await;
    assert_eq!(got, bad_request, "command before connect");
    assert_survived(&server, &mut bystander).await;

    // A pong before connect.
    let got = expect_closed_after(&server, false, async |c| c.send_text("{}").await).await;
    assert_eq!(got, bad_request, "pong before connect");
    assert_survived(&server, &mut bystander).await;

    // Malformed JSON.
    let got = expect_closed_after(&server, true, async |c| {
        c.send_text(r#"{"id":2,"publish":"#).await;
    })
    .await;
    assert_eq!(got, bad_request, "malformed JSON");
    assert_survived(&server, &mut bystander).await;

    // Malformed JSON before connect.
    let got = expect_closed_after(&server, false, async |c| c.send_text("hello").await).await;
    assert_eq!(got, bad_request, "malformed JSON before connect");

    // A command without id.
    let got = expect_closed_after(&server, true, async |c| {
        c.send_text(r#"{"subscribe":{"channel":"a"}}"#).await;
    })
    .await;
    assert_eq!(got, bad_request, "missing id");
    assert_survived(&server, &mut bystander).await;

    // A frame with no command at all.
    let got = expect_closed_after(&server, true, async |c| c.send_text(" \n").await).await;
    assert_eq!(got, bad_request, "empty frame");

    // A binary frame on the JSON protocol.
    let got = expect_closed_after(&server, true, async |c| {
        c.send_binary(br#"{"id":2,"ping":{}}"#).await;
    })
    .await;
    assert_eq!(got, bad_request, "binary frame");
    assert_survived(&server, &mut bystander).await;

    // A second connect.
    let got = expect_closed_after(&server, true, async |c| {
        let id = c.next_id();
        c.send_text(&format!(r#"{{"id":{id},"connect":{{}}}}"#)).await;
    })
    .await;
    assert_eq!(got, bad_request, "second connect");
    assert_survived(&server, &mut bystander).await;

    // A pong nobody asked for.
    let got = expect_closed_after(&server, true, async |c| c.send_text("{}").await).await;
    assert_eq!(got, bad_request, "unsolicited pong");
    assert_survived(&server, &mut bystander).await;

    // A batch whose last command lacks an id.
    let mut c = server.connected("batch").await;
    c.send_text("{\"id\":2,\"subscribe\":{\"channel\":\"b\"}}\n{\"id\":3,\"publish\":{\"channel\":\"b\",\"data\":1}}\n{\"id\":4}\n{\"subscribe\":{}}")
        .await;
    assert_eq!(c.expect_close().await, bad_request, "batch with a bad command");
    assert_survived(&server, &mut bystander).await;
}

#[tokio::test]
async fn close_3500_invalid_token_and_109_expired() {
    let server = Server::start(&format!(
        r#"
[auth]
hmac_secret = "{SECRET}"

[[namespaces]]
name = ""
allow_publish = true
"#
    ));
    let mut bystander = Bystander::join(&server).await;
    let invalid = (3500, "invalid token".to_string());

    // No token while anonymous connections are not allowed.
    let mut c = server.client().await;
    c.send_text(r#"{"id":1,"connect":{}}"#).await;
    assert_eq!(c.expect_close().await, invalid, "no token");
    assert_survived(&server, &mut bystander).await;

    // Garbage.
    let mut c = server.client().await;
    c.send_text(r#"{"id":1,"connect":{"token":"not.a.jwt"}}"#).await;
    assert_eq!(c.expect_close().await, invalid, "garbage token");
    assert_survived(&server, &mut bystander).await;

    // Signed with another key.
    let forged = sign("some-other-secret", &json!({"sub": "42", "exp": unix_now() + 60}));
    let mut c = server.client().await;
    c.send_text(&format!(r#"{{"id":1,"connect":{{"token":"{forged}"}}}}"#)).await;
    assert_eq!(c.expect_close().await, invalid, "token signed with another key");
    assert_survived(&server, &mut bystander).await;

    // Expired: error 109, the connection stays and may connect with a fresh token.
    let expired = sign(SECRET, &json!({"sub": "42", "exp": unix_now() - 30}));
    let mut c = server.client().await;
    let r = c.connect(&expired).await;
    assert_error(&r, 109);
    let ok = c.connect_ok(&user_token("42")).await;
    assert!(ok["subs"].as_object().is_some_and(|s| s.contains_key("#42")), "{ok}");
    assert_survived(&server, &mut bystander).await;
}

#[tokio::test]
async fn close_1009_message_too_big_and_1007_invalid_utf8() {
    let server = Server::start(&format!(
        r#"
[websocket]
max_message_size = 1024
{OPEN_NS}"#
    ));
    let mut bystander = Bystander::join(&server).await;

    // Just under the limit is fine.
    let mut c = server.connected("big").await;
    let data = "x".repeat(900);
    let r = c.publish("any", json!({ "pad": data })).await;
    assert_eq!(r["publish"], json!({}), "{r}");
    // Over the limit: 1009.
    let id = c.next_id();
    let data = "x".repeat(2000);
    c.send_text(
        &json!({"id": id, "publish": {"channel": "any", "data": {"pad": data}}}).to_string(),
    )
    .await;
    let (code, _) = c.expect_close().await;
    assert_eq!(code, 1009, "frame over websocket.max_message_size");
    assert_survived(&server, &mut bystander).await;

    // Also before connect.
    let mut c = server.client().await;
    c.send_text(&"y".repeat(5000)).await;
    assert_eq!(c.expect_close().await.0, 1009, "big frame before connect");
    assert_survived(&server, &mut bystander).await;

    // A text frame that is not UTF-8: 1007.
    let mut c = server.connected("utf8").await;
    c.send_raw_text(b"{\"id\":2,\"publish\":{\"channel\":\"a\",\"data\":\"\xff\xfe\"}}").await;
    assert_eq!(c.expect_close().await.0, 1007, "invalid UTF-8 text frame");
    assert_survived(&server, &mut bystander).await;
}

#[tokio::test]
async fn reply_errors_keep_the_connection() {
    let server = Server::start(
        r#"
[client]
max_channels = 2

[[namespaces]]
name = ""

[[namespaces]]
name = "pub"
allow_publish = true

[[namespaces]]
name = "secret"
private = true
allow_publish = true

[[namespaces]]
name = "ro"
allow_subscribe = false

[[namespaces]]
name = "pres"
presence = true
"#,
    );
    let mut bystander = Bystander::join(&server).await;
    let mut c = server.connected("").await;

    // 103 permission denied.
    let r = c.publish("news", json!({"x": 1})).await;
    assert_error(&r, 103);
    let r = c.subscribe("secret:x", json!({})).await;
    assert_error(&r, 103);
    let r = c.subscribe("ro:x", json!({})).await;
    assert_error(&r, 103);
    let r = c.presence("pres:x").await;
    assert_error(&r, 103);
    let r = c.presence_stats("pres:x").await;
    assert_error(&r, 103);

    // 102 unknown channel (namespace).
    let r = c.subscribe("nope:x", json!({})).await;
    assert_error(&r, 102);
    let r = c.publish("nope:x", json!({"x": 1})).await;
    assert_error(&r, 102);

    // 107 bad request.
    let r = c.subscribe("", json!({})).await;
    assert_error(&r, 107);
    let r = c.subscribe("has space", json!({})).await;
    assert_error(&r, 107);
    let r = c.command(json!({"publish": {"channel": "pub:a"}})).await;
    assert_error(&r, 107);
    let r = c.publish("pub:a", json!(null)).await;
    assert_error(&r, 107);

    // 104 method not found: an id and no method. An rpc without a handler
    // is 108 not available, as Centrifugo answers (namespace_options.rs).
    let r = c.command(json!({})).await;
    assert_error(&r, 104);
    let r = c.command(json!({"rpc": {"method": "sum", "data": [1, 2]}})).await;
    assert_error(&r, 108);

    // 105 already subscribed.
    c.subscribe_ok("pub:a", json!({})).await;
    let r = c.subscribe("pub:a", json!({})).await;
    assert_error(&r, 105);

    // 108 not available: presence where the namespace has none.
    let r = c.presence("pub:a").await;
    assert_error(&r, 108);
    let r = c.presence_stats("pub:a").await;
    assert_error(&r, 108);

    // 106 limit exceeded: max_channels = 2.
    c.subscribe_ok("pres:a", json!({})).await;
    let r = c.subscribe("pub:c", json!({})).await;
    assert_error(&r, 106);
    // Leaving one makes room again.
    c.unsubscribe("pres:a").await;
    c.subscribe_ok("pub:c", json!({})).await;

    // The error reply carries the command's id; the connection still works.
    let id = c.next_id();
    c.send_text(&format!(r#"{{"id":{id},"subscribe":{{"channel":"nope:y"}}}}"#)).await;
    let r = c.recv_json().await;
    assert_eq!(r["id"], id, "{r}");
    assert_error(&r, 102);
    let r = c.publish("pub:a", json!({"still": "ok"})).await;
    assert_eq!(r["publish"], json!({}), "{r}");
    let push = c.recv_push().await;
    assert_eq!(push["push"]["pub"]["data"], json!({"still": "ok"}), "{push}");
    assert_survived(&server, &mut bystander).await;
}

#[tokio::test]
async fn upgrade_with_disallowed_origin_is_403() {
    let server = Server::start(&format!(
        r#"
[websocket]
allowed_origins = ["https://good.example"]
{OPEN_NS}"#
    ));
    let mut bystander = Bystander::join(&server).await;
    match Client::try_open(server.port, Some("https://evil.example"), None).await {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 403),
        Err(e) => panic!("expected HTTP 403, got {e}"),
        Ok(_) => panic!("upgrade with a disallowed Origin succeeded"),
    }
    let mut good = Client::try_open(server.port, Some("https://good.example"), None)
        .await
        .expect("allowed origin");
    good.connect_ok("").await;
    assert_survived(&server, &mut bystander).await;
}
