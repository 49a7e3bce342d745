//! Tokens facing the internet (issue 16): every refusal on the connect, the
//! refresh, the subscribe and the sub_refresh paths with its exact code, key
//! rotation (HMAC previous secret, several PEM keys, JWKS over HTTP and HTTPS
//! from a local server that counts its fetches), the WebSocket upgrade checks
//! and private namespaces. Each refusal also checks that a bystander on the
//! same node kept receiving.

mod common;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Bystander, Client, ReadEnd, Server, assert_survived, sign, unix_now};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECRET: &str = "current-secret";
const PREVIOUS: &str = "previous-secret";

fn key_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/keys").join(name)
}

fn key_text(name: &str) -> String {
    std::fs::read_to_string(key_path(name)).expect("test key")
}

/// Signs with a PEM private key from `tests/keys`.
fn sign_pem(alg: Algorithm, kid: Option<&str>, file: &str, claims: &Value) -> String {
    let pem = key_text(file);
    let key = match alg {
        Algorithm::EdDSA => EncodingKey::from_ed_pem(pem.as_bytes()),
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(pem.as_bytes()),
        _ => EncodingKey::from_rsa_pem(pem.as_bytes()),
    }
    .expect("test private key");
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, &key).expect("signing")
}

/// An Ed25519 key of `tests/keys` (ed1, ed2, ed3) signing with `kid`.
fn sign_ed(n: u8, kid: &str, claims: &Value) -> String {
    sign_pem(Algorithm::EdDSA, Some(kid), &format!("ed{n}.pem"), claims)
}

/// The JWK of Ed25519 public key `n` under `kid`.
fn ed_jwk(n: u8, kid: &str) -> Value {
    let pem = key_text(&format!("ed{n}.pub.pem"));
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = data_encoding::BASE64.decode(b64.as_bytes()).expect("PEM body");
    let x = data_encoding::BASE64URL_NOPAD.encode(&der[der.len() - 32..]);
    json!({"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "use": "sig", "alg": "EdDSA"})
}

/// The JWK of EC public key `file` (`ec256-1.pub.pem`, ...) under `kid`; with
/// `alg` when given (without, the curve decides the algorithm).
fn ec_jwk(file: &str, kid: &str, alg: Option<&str>) -> Value {
    let pem = key_text(file);
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = data_encoding::BASE64.decode(b64.as_bytes()).expect("PEM body");
    // The SPKI ends with the uncompressed point 04 || x || y.
    let (crv, n) = if file.starts_with("ec256") { ("P-256", 32) } else { ("P-384", 48) };
    let point = &der[der.len() - (2 * n + 1)..];
    assert_eq!(point[0], 4, "{file}: not an uncompressed point");
    let coord = |b: &[u8]| data_encoding::BASE64URL_NOPAD.encode(b);
    let mut jwk = json!({"kty": "EC", "crv": crv, "x": coord(&point[1..=n]),
        "y": coord(&point[n + 1..]), "kid": kid, "use": "sig"});
    if let Some(alg) = alg {
        jwk["alg"] = alg.into();
    }
    jwk
}

/// Signs with HMAC `secret` and `alg` (HS256, HS384 or HS512).
fn sign_hs(alg: Algorithm, secret: &str, claims: &Value) -> String {
    let key = EncodingKey::from_secret(secret.as_bytes());
    jsonwebtoken::encode(&Header::new(alg), claims, &key).expect("signing")
}

/// A token with `alg: none` and no signature.
fn unsigned(claims: &Value) -> String {
    let enc = |v: &Value| data_encoding::BASE64URL_NOPAD.encode(v.to_string().as_bytes());
    format!("{}.{}.", enc(&json!({"alg": "none", "typ": "JWT"})), enc(claims))
}

fn in_5_min() -> u64 {
    unix_now() + 300
}

fn conn_claims(user: &str) -> Value {
    json!({"sub": user, "exp": in_5_min()})
}

fn sub_claims(user: &str, channel: &str) -> Value {
    json!({"sub": user, "channel": channel, "exp": in_5_min()})
}

/// How a command ended.
#[derive(Debug, PartialEq)]
enum Outcome {
    Ok,
    Error(u64),
    Closed(u16),
}

/// Sends `body` with a fresh id and sees how it ends: its reply, or the
/// close. Other messages before the reply are dropped.
async fn outcome(c: &mut Client, body: Value) -> Outcome {
    let id = c.next_id();
    let mut cmd = body.as_object().expect("object").clone();
    cmd.insert("id".into(), id.into());
    c.send_json(&Value::Object(cmd)).await;
    loop {
        match c.try_recv_json(Duration::from_secs(8)).await {
            Ok(v) if v["id"] == id => {
                return match v["error"]["code"].as_u64() {
                    Some(code) => Outcome::Error(code),
                    None => Outcome::Ok,
                };
            }
            Ok(_) => continue,
            Err(ReadEnd::Closed(code, _)) => return Outcome::Closed(code),
            Err(e) => panic!("no reply and no close: {e:?}"),
        }
    }
}

/// What `token` gets as a connection token: on connect, and on refresh of a
/// connection made with a good token.
async fn as_connection_token(server: &Server, good: &str, token: &str) -> (Outcome, Outcome) {
    let mut c = server.client().await;
    let connect = outcome(&mut c, json!({"connect": {"token": token}})).await;
    let mut c = server.client().await;
    c.connect_ok(good).await;
    let refresh = outcome(&mut c, json!({"refresh": {"token": token}})).await;
    (connect, refresh)
}

/// What `token` gets as a subscription token for `channel`: on subscribe, and
/// on sub_refresh of a subscription made with `good_sub`.
async fn as_subscription_token(
    server: &Server,
    good_conn: &str,
    channel: &str,
    good_sub: &str,
    token: &str,
) -> (Outcome, Outcome) {
    let mut c = server.client().await;
    c.connect_ok(good_conn).await;
    let subscribe =
        outcome(&mut c, json!({"subscribe": {"channel": channel, "token": token}})).await;
    let mut c = server.client().await;
    c.connect_ok(good_conn).await;
    c.subscribe_ok(channel, json!({"token": good_sub})).await;
    let sub_refresh =
        outcome(&mut c, json!({"sub_refresh": {"channel": channel, "token": token}})).await;
    (subscribe, sub_refresh)
}

/// For nodes where [`Bystander`] cannot sign its token: a connected client
/// subscribes to a `health:` channel and checks that it still receives.
async fn receiving_bystander(server: &Server, token: &str) -> Client {
    let mut c = server.client().await;
    c.connect_ok(token).await;
    c.subscribe_ok("health:tokens-bystander", json!({})).await;
    assert_receives(&mut c, 0).await;
    c
}

async fn assert_receives(c: &mut Client, n: u64) {
    let r = c.publish("health:tokens-bystander", json!({"n": n})).await;
    assert!(r.get("publish").is_some(), "bystander publish failed: {r}");
    let push = c.recv_push().await;
    assert_eq!(push["push"]["pub"]["data"], json!({"n": n}), "{push}");
}

/// A node with HMAC (current and previous secret) and two PEM public keys
/// (RSA and Ed25519), and a private namespace.
fn static_keys_node() -> Server {
    let pem = format!("{}{}", key_text("rsa.pub.pem"), key_text("ed1.pub.pem"));
    Server::start(&format!(
        "[auth]\nhmac_secret = \"{SECRET}\"\nhmac_previous_secret = \"{PREVIOUS}\"\n\
         public_key_pem = \"\"\"\n{pem}\"\"\"\n\n\
         [[namespaces]]\nname = \"priv\"\nprivate = true\nallow_publish = true\n"
    ))
}

const CHANNEL: &str = "priv:room";

/// Checks `conn_token` on connect and refresh and `sub_token` on subscribe
/// and sub_refresh (user "u", channel [`CHANNEL`]) against `want`, then the
/// bystander.
async fn assert_refused_everywhere(
    server: &Server,
    bystander: &mut Bystander,
    what: &str,
    conn_token: &str,
    sub_token: &str,
    want: Outcome,
) {
    let good = sign(SECRET, &conn_claims("u"));
    let good_sub = sign(SECRET, &sub_claims("u", CHANNEL));
    let (connect, refresh) = as_connection_token(server, &good, conn_token).await;
    // An expired token at connect is an error reply (the SDK asks for a new
    // token); elsewhere the same code.
    assert_eq!(connect, want, "{what}: connect");
    assert_eq!(refresh, want, "{what}: refresh");
    let (subscribe, sub_refresh) =
        as_subscription_token(server, &good, CHANNEL, &good_sub, sub_token).await;
    assert_eq!(subscribe, want, "{what}: subscribe");
    assert_eq!(sub_refresh, want, "{what}: sub_refresh");
    assert_survived(server, bystander).await;
}

/// [`assert_refused_everywhere`] with a connection token and a subscription
/// token (user "u", channel [`CHANNEL`]) that `sign` made from their claims.
async fn assert_signed_everywhere(
    server: &Server,
    bystander: &mut Bystander,
    what: &str,
    sign: impl Fn(&Value) -> String,
    want: Outcome,
) {
    let conn = sign(&conn_claims("u"));
    let sub = sign(&sub_claims("u", CHANNEL));
    assert_refused_everywhere(server, bystander, what, &conn, &sub, want).await;
}

#[tokio::test]
async fn an_unsigned_alg_none_token_is_refused_with_3500_on_every_path() {
    let server = static_keys_node();
    let mut bystander = Bystander::join(&server).await;
    assert_signed_everywhere(&server, &mut bystander, "alg none", unsigned, Outcome::Closed(3500))
        .await;
}

#[tokio::test]
async fn an_hmac_token_keyed_with_the_public_key_is_refused_with_3500_on_every_path() {
    // The classic confusion: HS256 with the RSA public key's PEM as secret,
    // against a node that only knows public keys.
    let server = Server::start(&format!(
        "[auth]\npublic_key_pem = \"\"\"\n{}\"\"\"\n\n\
         [[namespaces]]\nname = \"priv\"\nprivate = true\n",
        key_text("rsa.pub.pem")
    ));
    let bystander_token = sign_pem(Algorithm::RS256, None, "rsa.pem", &conn_claims("bystander"));
    let mut by = receiving_bystander(&server, &bystander_token).await;
    let pem = key_text("rsa.pub.pem");
    let forged = sign(&pem, &conn_claims("u"));
    let forged_sub = sign(&pem, &sub_claims("u", CHANNEL));
    let good = sign_pem(Algorithm::RS256, None, "rsa.pem", &conn_claims("u"));
    let good_sub = sign_pem(Algorithm::RS256, None, "rsa.pem", &sub_claims("u", CHANNEL));
    let (connect, refresh) = as_connection_token(&server, &good, &forged).await;
    assert_eq!((connect, refresh), (Outcome::Closed(3500), Outcome::Closed(3500)));
    let (subscribe, sub_refresh) =
        as_subscription_token(&server, &good, CHANNEL, &good_sub, &forged_sub).await;
    assert_eq!((subscribe, sub_refresh), (Outcome::Closed(3500), Outcome::Closed(3500)));
    // The RSA-signed bystander still receives.
    assert_receives(&mut by, 1).await;
}

#[tokio::test]
async fn a_token_with_a_bad_signature_is_refused_with_3500_on_every_path() {
    let server = static_keys_node();
    let mut bystander = Bystander::join(&server).await;
    assert_signed_everywhere(
        &server,
        &mut bystander,
        "hmac",
        |c| sign("some-other-secret", c),
        Outcome::Closed(3500),
    )
    .await;
    // A public-key token whose payload was swapped after signing.
    let rs = sign_pem(Algorithm::RS256, None, "rsa.pem", &conn_claims("u"));
    let parts: Vec<&str> = rs.split('.').collect();
    let other = data_encoding::BASE64URL_NOPAD.encode(conn_claims("admin").to_string().as_bytes());
    let tampered = format!("{}.{}.{}", parts[0], other, parts[2]);
    let rs_sub = sign_pem(Algorithm::RS256, None, "rsa.pem", &sub_claims("u", CHANNEL));
    let parts: Vec<&str> = rs_sub.split('.').collect();
    let other =
        data_encoding::BASE64URL_NOPAD.encode(sub_claims("admin", CHANNEL).to_string().as_bytes());
    let tampered_sub = format!("{}.{}.{}", parts[0], other, parts[2]);
    assert_refused_everywhere(
        &server,
        &mut bystander,
        "tampered RS256",
        &tampered,
        &tampered_sub,
        Outcome::Closed(3500),
    )
    .await;
}

#[tokio::test]
async fn an_expired_token_gets_error_109_on_every_path() {
    let server = static_keys_node();
    let mut bystander = Bystander::join(&server).await;
    let past = unix_now() - 10;
    let conn = sign(SECRET, &json!({"sub": "u", "exp": past}));
    let sub = sign(SECRET, &json!({"sub": "u", "channel": CHANNEL, "exp": past}));
    assert_refused_everywhere(&server, &mut bystander, "expired", &conn, &sub, Outcome::Error(109))
        .await;
    // Signed by a public key too.
    let conn = sign_pem(Algorithm::EdDSA, None, "ed1.pem", &json!({"sub": "u", "exp": past}));
    let sub = sign_pem(
        Algorithm::EdDSA,
        None,
        "ed1.pem",
        &json!({"sub": "u", "channel": CHANNEL, "exp": past}),
    );
    assert_refused_everywhere(
        &server,
        &mut bystander,
        "expired EdDSA",
        &conn,
        &sub,
        Outcome::Error(109),
    )
    .await;
}

#[tokio::test]
async fn a_subscription_token_is_not_a_connection_token_nor_the_reverse() {
    let server = static_keys_node();
    let mut bystander = Bystander::join(&server).await;
    // A subscription token (it has a `channel` claim) on connect and refresh;
    // a connection token on subscribe and sub_refresh.
    let sub_token = sign(SECRET, &sub_claims("u", CHANNEL));
    let conn_token = sign(SECRET, &conn_claims("u"));
    assert_refused_everywhere(
        &server,
        &mut bystander,
        "swapped kinds",
        &sub_token,
        &conn_token,
        Outcome::Closed(3500),
    )
    .await;
    // An empty `channel` claim still makes it a subscription token.
    let empty = sign(SECRET, &json!({"sub": "u", "channel": "", "exp": in_5_min()}));
    let mut c = server.client().await;
    assert_eq!(outcome(&mut c, json!({"connect": {"token": empty}})).await, Outcome::Closed(3500));
}

#[tokio::test]
async fn a_token_not_valid_before_a_future_time_is_refused_with_3500_on_every_path() {
    let server = static_keys_node();
    let mut bystander = Bystander::join(&server).await;
    let nbf = unix_now() + 120;
    let conn = sign(SECRET, &json!({"sub": "u", "exp": in_5_min(), "nbf": nbf}));
    let sub = sign(SECRET, &json!({"sub": "u", "channel": CHANNEL, "exp": in_5_min(), "nbf": nbf}));
    assert_refused_everywhere(&server, &mut bystander, "nbf", &conn, &sub, Outcome::Closed(3500))
        .await;
    // nbf in the past is fine, fractional too.
    let past = unix_now() as f64 - 30.5;
    let conn = sign(SECRET, &json!({"sub": "u", "exp": in_5_min(), "nbf": past}));
    let sub =
        sign(SECRET, &json!({"sub": "u", "channel": CHANNEL, "exp": in_5_min(), "nbf": past}));
    assert_refused_everywhere(&server, &mut bystander, "nbf past", &conn, &sub, Outcome::Ok).await;
}

#[tokio::test]
async fn a_fractional_exp_is_accepted_on_every_path() {
    let server = static_keys_node();
    let mut bystander = Bystander::join(&server).await;
    let exp = unix_now() as f64 + 300.75;
    let conn = sign(SECRET, &json!({"sub": "u", "exp": exp}));
    let sub = sign(SECRET, &json!({"sub": "u", "channel": CHANNEL, "exp": exp}));
    assert_refused_everywhere(&server, &mut bystander, "fractional exp", &conn, &sub, Outcome::Ok)
        .await;
    // And a fractional exp in the past is expired, not malformed.
    let past = unix_now() as f64 - 2.5;
    let mut c = server.client().await;
    let t = sign(SECRET, &json!({"sub": "u", "exp": past}));
    assert_eq!(outcome(&mut c, json!({"connect": {"token": t}})).await, Outcome::Error(109));
}

#[tokio::test]
async fn tokens_of_the_previous_secret_and_of_every_listed_public_key_are_accepted() {
    let server = static_keys_node();
    let mut bystander = Bystander::join(&server).await;
    for (what, conn, sub) in [
        (
            "previous secret",
            sign(PREVIOUS, &conn_claims("u")),
            sign(PREVIOUS, &sub_claims("u", CHANNEL)),
        ),
        (
            "RS256 key",
            sign_pem(Algorithm::RS256, None, "rsa.pem", &conn_claims("u")),
            sign_pem(Algorithm::RS256, None, "rsa.pem", &sub_claims("u", CHANNEL)),
        ),
        (
            "PS256 by the same key",
            sign_pem(Algorithm::PS256, None, "rsa.pem", &conn_claims("u")),
            sign_pem(Algorithm::PS256, None, "rsa.pem", &sub_claims("u", CHANNEL)),
        ),
        (
            "Ed25519 key",
            sign_pem(Algorithm::EdDSA, None, "ed1.pem", &conn_claims("u")),
            sign_pem(Algorithm::EdDSA, None, "ed1.pem", &sub_claims("u", CHANNEL)),
        ),
    ] {
        assert_refused_everywhere(&server, &mut bystander, what, &conn, &sub, Outcome::Ok).await;
    }
    // A key that is not listed is not.
    assert_signed_everywhere(
        &server,
        &mut bystander,
        "unlisted",
        |c| sign_pem(Algorithm::EdDSA, None, "ed2.pem", c),
        Outcome::Closed(3500),
    )
    .await;
}

#[tokio::test]
async fn hs384_and_hs512_tokens_of_the_hmac_secret_are_accepted_and_of_another_secret_refused_with_3500()
 {
    let server = static_keys_node();
    let mut bystander = Bystander::join(&server).await;
    for alg in [Algorithm::HS384, Algorithm::HS512] {
        let what = format!("{alg:?}");
        assert_signed_everywhere(
            &server,
            &mut bystander,
            &what,
            |c| sign_hs(alg, SECRET, c),
            Outcome::Ok,
        )
        .await;
        // The previous secret is tried for every HMAC algorithm, too.
        let what = format!("{alg:?} previous secret");
        assert_signed_everywhere(
            &server,
            &mut bystander,
            &what,
            |c| sign_hs(alg, PREVIOUS, c),
            Outcome::Ok,
        )
        .await;
        let what = format!("{alg:?} other secret");
        assert_signed_everywhere(
            &server,
            &mut bystander,
            &what,
            |c| sign_hs(alg, "some-other-secret", c),
            Outcome::Closed(3500),
        )
        .await;
    }
}

/// `token` with its header's `alg` replaced (payload and signature kept).
fn with_alg(token: &str, alg: &str) -> String {
    let (head, rest) = token.split_once('.').expect("a JWT");
    let head = data_encoding::BASE64URL_NOPAD.decode(head.as_bytes()).expect("header");
    let mut head: Value = serde_json::from_slice(&head).expect("header JSON");
    head["alg"] = alg.into();
    format!("{}.{rest}", data_encoding::BASE64URL_NOPAD.encode(head.to_string().as_bytes()))
}

#[tokio::test]
async fn es256_and_es384_tokens_of_the_listed_pem_keys_are_accepted_and_of_other_keys_refused_with_3500()
 {
    let pem = format!("{}{}", key_text("ec256-1.pub.pem"), key_text("ec384-1.pub.pem"));
    let server = Server::start(&format!(
        "[auth]\nhmac_secret = \"{SECRET}\"\npublic_key_pem = \"\"\"\n{pem}\"\"\"\n\n\
         [[namespaces]]\nname = \"priv\"\nprivate = true\n"
    ));
    let mut bystander = Bystander::join(&server).await;
    for (alg, listed, other) in [
        (Algorithm::ES256, "ec256-1.pem", "ec256-2.pem"),
        (Algorithm::ES384, "ec384-1.pem", "ec384-2.pem"),
    ] {
        let what = format!("{alg:?} by {listed}");
        assert_signed_everywhere(
            &server,
            &mut bystander,
            &what,
            |c| sign_pem(alg, None, listed, c),
            Outcome::Ok,
        )
        .await;
        // A key of the same curve that is not listed.
        let what = format!("{alg:?} by {other}");
        assert_signed_everywhere(
            &server,
            &mut bystander,
            &what,
            |c| sign_pem(alg, None, other, c),
            Outcome::Closed(3500),
        )
        .await;
    }
    // A PEM EC key is offered for both ES algorithms (the PEM does not say
    // which): a P-256 signature relabelled ES384 must still fail.
    let conn =
        with_alg(&sign_pem(Algorithm::ES256, None, "ec256-1.pem", &conn_claims("u")), "ES384");
    let sub = with_alg(
        &sign_pem(Algorithm::ES256, None, "ec256-1.pem", &sub_claims("u", CHANNEL)),
        "ES384",
    );
    assert_refused_everywhere(
        &server,
        &mut bystander,
        "ES256 signature labelled ES384",
        &conn,
        &sub,
        Outcome::Closed(3500),
    )
    .await;
}

#[tokio::test]
async fn audience_and_issuer_are_required_when_configured() {
    let server = Server::start(&format!(
        "[auth]\nhmac_secret = \"{SECRET}\"\naudience = \"fanfare\"\nissuer = \"https://id.example\"\n\n\
         [[namespaces]]\nname = \"priv\"\nprivate = true\n"
    ));
    let good = |extra: Value| {
        let mut c = conn_claims("u");
        c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        c
    };
    let ok_claims = json!({"aud": "fanfare", "iss": "https://id.example"});
    let bystander_token = sign(
        SECRET,
        &json!({"sub": "b", "exp": in_5_min(), "aud": "fanfare", "iss": "https://id.example"}),
    );
    let mut by = receiving_bystander(&server, &bystander_token).await;
    let good_conn = sign(SECRET, &good(ok_claims.clone()));
    let sub_with = |extra: Value| {
        let mut c = sub_claims("u", CHANNEL);
        c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        sign(SECRET, &c)
    };
    let good_sub = sub_with(ok_claims.clone());
    for (what, extra, want) in [
        ("right aud and iss", ok_claims.clone(), Outcome::Ok),
        (
            "aud among several",
            json!({"aud": ["other", "fanfare"], "iss": "https://id.example"}),
            Outcome::Ok,
        ),
        ("no aud", json!({"iss": "https://id.example"}), Outcome::Closed(3500)),
        ("other aud", json!({"aud": "other", "iss": "https://id.example"}), Outcome::Closed(3500)),
        ("no iss", json!({"aud": "fanfare"}), Outcome::Closed(3500)),
        (
            "other iss",
            json!({"aud": "fanfare", "iss": "https://evil.example"}),
            Outcome::Closed(3500),
        ),
    ] {
        let conn = sign(SECRET, &good(extra.clone()));
        let (connect, refresh) = as_connection_token(&server, &good_conn, &conn).await;
        assert_eq!((&connect, &refresh), (&want, &want), "{what}: connect, refresh");
        let sub = sub_with(extra);
        let (subscribe, sub_refresh) =
            as_subscription_token(&server, &good_conn, CHANNEL, &good_sub, &sub).await;
        assert_eq!((&subscribe, &sub_refresh), (&want, &want), "{what}: subscribe, sub_refresh");
    }
    assert_receives(&mut by, 1).await;
}

// ---------------------------------------------------------------- JWKS

/// A JWKS endpoint on a loopback port: serves whatever `doc` holds and
/// counts the requests it answered. HTTP/1.1, one request per connection;
/// with `tls`, over TLS with that server config.
struct JwksServer {
    port: u16,
    doc: Arc<Mutex<Value>>,
    fetches: Arc<AtomicUsize>,
    /// While set, requests are read and never answered.
    stall: Arc<std::sync::atomic::AtomicBool>,
}

impl JwksServer {
    async fn start(doc: Value, tls: Option<Arc<rustls::ServerConfig>>) -> JwksServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().unwrap().port();
        let doc = Arc::new(Mutex::new(doc));
        let fetches = Arc::new(AtomicUsize::new(0));
        let stall = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (d, f, s) = (doc.clone(), fetches.clone(), stall.clone());
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else { return };
                let (d, f, s, acceptor) = (d.clone(), f.clone(), s.clone(), acceptor.clone());
                tokio::spawn(async move {
                    match acceptor {
                        Some(a) => {
                            if let Ok(tls) = a.accept(sock).await {
                                serve_one(tls, d, f, s).await
                            }
                        }
                        None => serve_one(sock, d, f, s).await,
                    }
                });
            }
        });
        JwksServer { port, doc, fetches, stall }
    }

    fn set(&self, doc: Value) {
        *self.doc.lock().unwrap() = doc;
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

async fn serve_one<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut sock: S,
    doc: Arc<Mutex<Value>>,
    fetches: Arc<AtomicUsize>,
    stall: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match sock.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 16 * 1024 {
            return;
        }
    }
    if stall.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_secs(30)).await;
        return;
    }
    fetches.fetch_add(1, Ordering::SeqCst);
    let body = doc.lock().unwrap().to_string();
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = sock.write_all(resp.as_bytes()).await;
    let _ = sock.shutdown().await;
}

fn jwks(keys: &[(u8, &str)]) -> Value {
    json!({"keys": keys.iter().map(|(n, kid)| ed_jwk(*n, kid)).collect::<Vec<_>>()})
}

/// A node with an HMAC secret (for the bystander) and a JWKS whose quiet
/// interval is `quiet_secs`.
fn jwks_node(url: &str, quiet_secs: u64, extra: &str) -> Server {
    Server::start(&format!(
        "[auth]\nhmac_secret = \"{SECRET}\"\njwks_url = \"{url}\"\njwks_refetch_interval = \"{quiet_secs}s\"\n{extra}\n\
         [[namespaces]]\nname = \"priv\"\nprivate = true\n"
    ))
}

/// Waits until a quiet interval of `secs` after the last fetch has passed.
async fn quiet_passes(secs: u64) {
    tokio::time::sleep(Duration::from_millis(secs * 1000 + 300)).await;
}

// Multi-threaded: `Server::start` blocks its thread while the node fetches
// from the JWKS server, which runs on this runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_keys_rotate_without_downtime_and_unknown_kids_cannot_drive_fetches() {
    let jwks_server = JwksServer::start(jwks(&[(1, "k1")]), None).await;
    // A long quiet interval, so the steps that must fall inside it do on a
    // busy machine too.
    let quiet = 5;
    let server = jwks_node(&format!("http://127.0.0.1:{}/jwks.json", jwks_server.port), quiet, "");
    let mut bystander = Bystander::join(&server).await;
    assert_eq!(jwks_server.fetches(), 1, "fetched once at start");

    let conn = |n: u8, kid: &str| sign_ed(n, kid, &conn_claims("u"));
    let sub = |n: u8, kid: &str| sign_ed(n, kid, &sub_claims("u", CHANNEL));
    assert_refused_everywhere(
        &server,
        &mut bystander,
        "k1",
        &conn(1, "k1"),
        &sub(1, "k1"),
        Outcome::Ok,
    )
    .await;
    assert_eq!(jwks_server.fetches(), 1, "a known kid needs no fetch");

    // The issuer publishes k2 next to k1 and starts signing with it: the
    // first token with k2 fetches the set, the connect waits for it.
    jwks_server.set(jwks(&[(1, "k1"), (2, "k2")]));
    quiet_passes(quiet).await;
    let mut c = server.client().await;
    assert_eq!(outcome(&mut c, json!({"connect": {"token": conn(2, "k2")}})).await, Outcome::Ok);
    assert_eq!(jwks_server.fetches(), 2, "k2 fetched on first sight");

    // Made-up kids within the quiet interval: refused at once, no fetch.
    for i in 0..10 {
        let mut c = server.client().await;
        let t = sign_ed(3, &format!("made-up-{i}"), &conn_claims("u"));
        assert_eq!(outcome(&mut c, json!({"connect": {"token": t}})).await, Outcome::Closed(3500));
    }
    assert_eq!(jwks_server.fetches(), 2, "unknown kids within the quiet interval fetch nothing");

    assert_refused_everywhere(
        &server,
        &mut bystander,
        "k2",
        &conn(2, "k2"),
        &sub(2, "k2"),
        Outcome::Ok,
    )
    .await;
    // k1 stays good while it is listed.
    assert_refused_everywhere(
        &server,
        &mut bystander,
        "k1 still",
        &conn(1, "k1"),
        &sub(1, "k1"),
        Outcome::Ok,
    )
    .await;
    // Signed by ed2 under k1's kid: the listed key does not verify it.
    assert_refused_everywhere(
        &server,
        &mut bystander,
        "wrong key for kid",
        &conn(2, "k1"),
        &sub(2, "k1"),
        Outcome::Closed(3500),
    )
    .await;
    assert_eq!(jwks_server.fetches(), 2, "known kids, good or bad signature, fetch nothing");

    // k1 is withdrawn. After the quiet interval a burst of unknown kids asks
    // once (fetch 3): they wait for it, are still unknown and refused.
    jwks_server.set(jwks(&[(2, "k2")]));
    quiet_passes(quiet).await;
    let mut tasks = Vec::new();
    for i in 0..10 {
        let port = server.port;
        tasks.push(tokio::spawn(async move {
            let mut c = Client::open(port).await;
            let t = sign_ed(3, &format!("burst-{i}"), &conn_claims("u"));
            outcome(&mut c, json!({"connect": {"token": t}})).await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), Outcome::Closed(3500));
    }
    let after_burst = jwks_server.fetches();
    assert_eq!(after_burst, 3, "a burst of 10 unknown kids fetched {} times", after_burst - 2);
    // That fetch dropped k1.
    let mut c = server.client().await;
    assert_eq!(
        outcome(&mut c, json!({"connect": {"token": conn(1, "k1")}})).await,
        Outcome::Closed(3500)
    );
    assert_survived(&server, &mut bystander).await;
    assert_eq!(common::metric(server.port, "fanfare_jwks_keys"), 1.0);
}

// Multi-threaded: `Server::start` blocks its thread while the node fetches
// from the JWKS server, which runs on this runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_and_es384_keys_of_a_jwks_verify_tokens_by_kid_and_other_keys_under_that_kid_are_refused()
 {
    // The P-256 JWK names its `alg`; the P-384 one leaves it to the curve.
    let doc = json!({"keys": [
        ec_jwk("ec256-1.pub.pem", "p256", Some("ES256")),
        ec_jwk("ec384-1.pub.pem", "p384", None),
    ]});
    let jwks_server = JwksServer::start(doc, None).await;
    let server = jwks_node(&format!("http://127.0.0.1:{}/jwks.json", jwks_server.port), 5, "");
    let mut bystander = Bystander::join(&server).await;
    assert_eq!(jwks_server.fetches(), 1, "fetched once at start");
    assert_eq!(common::metric(server.port, "fanfare_jwks_keys"), 2.0, "both EC keys loaded");
    for (alg, kid, listed, other) in [
        (Algorithm::ES256, "p256", "ec256-1.pem", "ec256-2.pem"),
        (Algorithm::ES384, "p384", "ec384-1.pem", "ec384-2.pem"),
    ] {
        let conn = sign_pem(alg, Some(kid), listed, &conn_claims("u"));
        let sub = sign_pem(alg, Some(kid), listed, &sub_claims("u", CHANNEL));
        let what = format!("{alg:?} kid {kid}");
        assert_refused_everywhere(&server, &mut bystander, &what, &conn, &sub, Outcome::Ok).await;
        // Another key of the same curve under the listed kid.
        let conn = sign_pem(alg, Some(kid), other, &conn_claims("u"));
        let sub = sign_pem(alg, Some(kid), other, &sub_claims("u", CHANNEL));
        let what = format!("{alg:?} kid {kid} signed by {other}");
        assert_refused_everywhere(
            &server,
            &mut bystander,
            &what,
            &conn,
            &sub,
            Outcome::Closed(3500),
        )
        .await;
    }
    // A P-384 token under the P-256 key's kid: that key does not do ES384.
    let conn = sign_pem(Algorithm::ES384, Some("p256"), "ec384-1.pem", &conn_claims("u"));
    let mut c = server.client().await;
    assert_eq!(outcome(&mut c, json!({"connect": {"token": conn}})).await, Outcome::Closed(3500));
    assert_eq!(jwks_server.fetches(), 1, "known kids, good or bad signature, fetch nothing");
    assert_survived(&server, &mut bystander).await;
}

// Multi-threaded: `Server::start` blocks its thread while the node fetches
// from the JWKS server, which runs on this runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jwks_is_fetched_again_every_refresh_interval_so_a_withdrawn_kid_is_refused_unasked() {
    // 10 s is the shortest `auth.jwks_refresh_interval` allowed; the quiet
    // interval is as long, so no token in this test can ask for a fetch.
    let jwks_server = JwksServer::start(jwks(&[(1, "k1"), (2, "k2")]), None).await;
    let url = format!("http://127.0.0.1:{}/jwks.json", jwks_server.port);
    let server = jwks_node(&url, 10, "jwks_refresh_interval = \"10s\"\n");
    let mut bystander = Bystander::join(&server).await;
    assert_eq!(jwks_server.fetches(), 1, "fetched once at start");
    let connect = |n: u8, kid: &'static str| {
        let port = server.port;
        async move {
            let mut c = Client::open(port).await;
            outcome(&mut c, json!({"connect": {"token": sign_ed(n, kid, &conn_claims("u"))}})).await
        }
    };
    assert_eq!(connect(1, "k1").await, Outcome::Ok);

    // Waits (bounded) until the node has loaded the keys of `n` fetches: its
    // counter moves once a fetched set is in use, while the JWKS server
    // counts a fetch before it even answers (a connect right after that
    // could still meet the old set).
    let port = server.port;
    let fetches_reach = |n: usize| async move {
        let loaded = || {
            let ok = [("result", "ok")];
            common::api::metric_with(port, "fanfare_jwks_fetches_total", &ok)
        };
        let started = std::time::Instant::now();
        while loaded() < n as f64 {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "fetch {n} did not come within 30 s of a 10 s refresh interval"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        started.elapsed()
    };

    // The issuer withdraws k1. Nothing asks; the periodic fetch picks it up.
    jwks_server.set(jwks(&[(2, "k2")]));
    fetches_reach(2).await;
    assert_eq!(
        connect(1, "k1").await,
        Outcome::Closed(3500),
        "k1 still accepted after the refresh"
    );
    assert_eq!(connect(2, "k2").await, Outcome::Ok);
    assert_eq!(common::metric(server.port, "fanfare_jwks_keys"), 1.0);

    // And again: the refresh repeats, and a key put back is accepted.
    jwks_server.set(jwks(&[(1, "k1"), (2, "k2")]));
    let waited = fetches_reach(3).await;
    assert!(waited > Duration::from_secs(3), "fetch 3 came {waited:?} after fetch 2's check");
    assert_eq!(connect(1, "k1").await, Outcome::Ok, "k1 refused after it was listed again");
    assert_eq!(common::metric(server.port, "fanfare_jwks_keys"), 2.0);
    // Every fetch was a periodic one: the refused k1 asked for none (the
    // quiet interval after fetch 2 was running).
    assert_eq!(jwks_server.fetches(), 3);
    assert_survived(&server, &mut bystander).await;
}

// Multi-threaded: `Server::start` blocks its thread while the node fetches
// from the JWKS server, which runs on this runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_server_that_never_answers_costs_a_connect_at_most_the_fetch_wait() {
    let jwks_server = JwksServer::start(jwks(&[(1, "k1")]), None).await;
    let server = jwks_node(&format!("http://127.0.0.1:{}/jwks.json", jwks_server.port), 1, "");
    let mut bystander = Bystander::join(&server).await;
    jwks_server.stall.store(true, Ordering::SeqCst);
    quiet_passes(1).await;
    let started = std::time::Instant::now();
    let mut c = server.client().await;
    let t = sign_ed(2, "k2", &conn_claims("u"));
    assert_eq!(outcome(&mut c, json!({"connect": {"token": t}})).await, Outcome::Closed(3500));
    // Bounded by the 3 s fetch wait (not the 30 s stall); generous for a busy machine.
    assert!(started.elapsed() < Duration::from_secs(8), "took {:?}", started.elapsed());
    // Keys fetched before stay in use.
    let mut c = server.client().await;
    let t = sign_ed(1, "k1", &conn_claims("u"));
    assert_eq!(outcome(&mut c, json!({"connect": {"token": t}})).await, Outcome::Ok);
    assert_survived(&server, &mut bystander).await;
}

fn tls_config(cert: &std::path::Path, key: &std::path::Path) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<_> =
        CertificateDer::pem_file_iter(cert).unwrap().collect::<Result<_, _>>().unwrap();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap(),
    )
}

// Multi-threaded: `Server::start` blocks its thread while the node fetches
// from the JWKS server, which runs on this runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_served_over_https_by_a_private_ca_is_trusted_through_jwks_ca() {
    let pki = common::tls::TestCa::new();
    let (ca, leaf) = (pki.ca_pem(), pki.issue("jwks"));
    let (cert, key) = (&leaf.cert, &leaf.key);
    let jwks_server = JwksServer::start(jwks(&[(1, "k1")]), Some(tls_config(cert, key))).await;
    let url = format!("https://127.0.0.1:{}/jwks.json", jwks_server.port);
    let server = jwks_node(&url, 2, &format!("jwks_ca = \"{}\"\n", ca.display()));
    let mut bystander = Bystander::join(&server).await;
    assert_eq!(jwks_server.fetches(), 1);
    let conn = sign_ed(1, "k1", &conn_claims("u"));
    let sub = sign_ed(1, "k1", &sub_claims("u", CHANNEL));
    assert_refused_everywhere(&server, &mut bystander, "https k1", &conn, &sub, Outcome::Ok).await;

    // Without the CA the certificate is not trusted: nothing is fetched and
    // JWKS tokens are refused, HMAC ones still work.
    let untrusting = jwks_node(&url, 2, "");
    let mut by2 = Bystander::join(&untrusting).await;
    assert_eq!(jwks_server.fetches(), 1, "the TLS handshake failed before any request");
    let mut c = untrusting.client().await;
    assert_eq!(outcome(&mut c, json!({"connect": {"token": conn}})).await, Outcome::Closed(3500));
    assert!(untrusting.log().contains("JWKS fetch failed"), "{}", untrusting.log());
    assert_survived(&untrusting, &mut by2).await;
}

#[test]
fn jwks_settings_are_checked_at_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let check = |toml: &str, key: &str| {
        let path = dir.path().join("fanfare.toml");
        std::fs::write(&path, toml).unwrap();
        let (status, _, stderr) =
            common::run_cli(&["check-config", "--config", path.to_str().unwrap()], &[]);
        assert!(!status.success(), "accepted: {toml}");
        assert!(stderr.contains(key), "{key} not named: {stderr}");
    };
    check("[auth]\njwks_url = \"http://keys.example/jwks.json\"\n", "auth.jwks_url");
    check("[auth]\njwks_url = \"ftp://keys.example/jwks.json\"\n", "auth.jwks_url");
    check(
        "[auth]\njwks_url = \"https://keys.example/jwks.json\"\njwks_ca = \"/nonexistent.pem\"\n",
        "auth.jwks_ca",
    );
    check("[auth]\njwks_ca = \"/etc/hostname\"\n", "auth.jwks_ca");
    check(
        "[auth]\njwks_url = \"https://keys.example/j\"\njwks_refetch_interval = \"100ms\"\n",
        "auth.jwks_refetch_interval",
    );
    // Below the 10 s floor the issuer would be polled too often.
    check(
        "[auth]\njwks_url = \"https://keys.example/j\"\njwks_refresh_interval = \"1s\"\n",
        "auth.jwks_refresh_interval",
    );
    check("[auth]\nhmac_previous_secret = \"x\"\n", "auth.hmac_previous_secret");
    check("[auth]\npublic_key_pem = \"not a key\"\n", "auth.public_key_pem");
}

// ------------------------------------------------------ the upgrade itself

/// The status line's code of a raw upgrade request.
fn raw_upgrade(port: u16, request: &str) -> u16 {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("{head}"))
}

fn upgrade_request(version: &str, key: &str) -> String {
    format!(
        "GET /connection/websocket {version}\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
    )
}

#[tokio::test]
async fn an_http_1_0_upgrade_or_a_key_that_is_not_16_base64_bytes_gets_400() {
    let server = Server::start("");
    let mut bystander = Bystander::join(&server).await;
    let good_key = "dGhlIHNhbXBsZSBub25jZQ==";
    assert_eq!(raw_upgrade(server.port, &upgrade_request("HTTP/1.1", good_key)), 101);
    assert_eq!(raw_upgrade(server.port, &upgrade_request("HTTP/1.0", good_key)), 400);
    for key in [
        "dGhlIHNhbXBsZSBub25jZQ",   // no padding
        "dGhlIHNhbXBsZSBub25j",     // 15 bytes
        "dGhlIHNhbXBsZSBub25jZSE=", // 17 bytes
        "dGhlIHNhbXBsZSBub25jZR==", // non-zero trailing bits
        "!!!!!!!!!!!!!!!!!!!!!!==", // not base64
        "a-key-of-no-particular-form",
    ] {
        assert_eq!(raw_upgrade(server.port, &upgrade_request("HTTP/1.1", key)), 400, "{key}");
    }
    assert_survived(&server, &mut bystander).await;
}

// ------------------------------------------------------ private namespaces

#[tokio::test]
async fn publishing_into_a_private_channel_needs_a_subscription_even_with_allow_publish() {
    let server = static_keys_node();
    let mut bystander = Bystander::join(&server).await;
    let mut outsider = server.client().await;
    outsider.connect_ok(&sign(SECRET, &conn_claims("outsider"))).await;
    let mut member = server.client().await;
    member.connect_ok(&sign(SECRET, &conn_claims("u"))).await;
    member.subscribe_ok(CHANNEL, json!({"token": sign(SECRET, &sub_claims("u", CHANNEL))})).await;
    assert_eq!(
        outcome(&mut outsider, json!({"publish": {"channel": CHANNEL, "data": {"x": 1}}})).await,
        Outcome::Error(103)
    );
    member.assert_silent(Duration::from_millis(300)).await;
    // (`Client::publish` keeps the push that may come before the reply.)
    let r = member.publish(CHANNEL, json!({"x": 2})).await;
    assert!(r.get("publish").is_some(), "{r}");
    let push = member.recv_push().await;
    assert_eq!(push["push"]["pub"]["data"], json!({"x": 2}), "{push}");
    assert_survived(&server, &mut bystander).await;
}

#[tokio::test]
async fn a_client_cannot_refresh_its_personal_channel_or_other_server_side_subscriptions() {
    let server = Server::start(&format!(
        "[auth]\nhmac_secret = \"{SECRET}\"\n\n[[namespaces]]\nname = \"news\"\n"
    ));
    let mut bystander = Bystander::join(&server).await;
    let mut c = server.client().await;
    let connect = c
        .connect_ok(&sign(SECRET, &json!({"sub": "u", "exp": in_5_min(), "channels": ["news:u"]})))
        .await;
    assert!(
        connect["subs"].get("#u").is_some() || connect["subs"].get("news:u").is_some(),
        "{connect}"
    );
    for channel in ["#u", "news:u"] {
        // Even a token the application signed for that channel.
        let t = sign(SECRET, &json!({"sub": "u", "channel": channel, "exp": unix_now() + 5}));
        assert_eq!(
            outcome(&mut c, json!({"sub_refresh": {"channel": channel, "token": t}})).await,
            Outcome::Error(103),
            "{channel}"
        );
    }
    // The connection and its personal channel still work.
    let r = common::api::http_api_with(
        &server,
        "publish",
        &[],
        &json!({"channel": "#u", "data": {"to": "u"}}),
    );
    assert_eq!(r.status, 200);
    let push = c.recv_push().await;
    assert_eq!(push["push"]["channel"], "#u", "{push}");
    assert_survived(&server, &mut bystander).await;
}
