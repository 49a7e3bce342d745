//! The admin console (decision 33): a page at `/admin` on the HTTP port, its
//! sign-in (`POST /admin/login`, password → session token) and the session
//! tokens `/api/*` accepts as `authorization: token <token>`. The console
//! has no API of its own: it calls the control API methods with its token.
//! Off unless `admin.enabled`; then every `/admin` path answers 404 and no
//! token is accepted.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use data_encoding::BASE64URL_NOPAD;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::config::AdminSection;
use crate::http::Body;
use crate::limits::Cidr;

/// Failed sign-ins one client IP (IPv6: one /64) may make per window; the
/// next attempt is answered 429 until the window ends. With a password hash
/// each attempt costs an Argon2 verification (about 50 ms of one core with
/// the crate's default parameters), so this also bounds the CPU one address
/// can burn.
pub const LOGIN_FAILURES: u32 = 5;
/// The window of [`LOGIN_FAILURES`].
pub const LOGIN_WINDOW: Duration = Duration::from_secs(60);
/// Most addresses tracked at once (about 40 bytes each). When a flood from
/// more addresses than this fills the table, sign-in is refused (429) for
/// everyone until windows expire: the console fails closed rather than
/// forgetting whom it is limiting.
const MAX_TRACKED: usize = 65_536;
/// Largest sign-in body: a JSON object with a password.
const MAX_LOGIN_BODY: usize = 4096;

/// What a session token's HMAC covers besides its expiry, so that a MAC of
/// the same secret made for another purpose can never pass as a token.
const TOKEN_CONTEXT: &[u8] = b"fanfare admin session v1\0";

/// The password the console is opened with.
enum Password {
    /// SHA-256 of `admin.password`: compared with the digest of the attempt,
    /// so the comparison neither stops early nor depends on the lengths.
    Plain([u8; 32]),
    /// `admin.password_hash`, a PHC string checked at load.
    Hash(String),
}

/// The console's state: its password, token key and sign-in limits.
/// Shared (`Arc`) by the HTTP routes and the API's authorization.
pub struct Admin {
    password: Password,
    secret: Vec<u8>,
    ttl: Duration,
    trusted: Vec<Cidr>,
    /// Failed sign-ins per client address: (window start, count). A
    /// `std` mutex: held for a lookup, never across an `.await`.
    failures: Mutex<HashMap<u128, (Instant, u32)>>,
}

impl std::fmt::Debug for Admin {
    /// Names no secret: `ApiContext`'s `Debug` includes this.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").field("ttl", &self.ttl).finish_non_exhaustive()
    }
}

/// Checks that `phc` is an Argon2 PHC string (`admin.password_hash`).
pub fn parse_hash(phc: &str) -> Result<(), String> {
    let hash = argon2::PasswordHash::new(phc).map_err(|e| e.to_string())?;
    let alg = hash.algorithm.as_str();
    if !matches!(alg, "argon2id" | "argon2i" | "argon2d") {
        return Err(format!("algorithm {alg:?}, expected argon2id"));
    }
    if hash.hash.is_none() {
        return Err("no hash part".into());
    }
    Ok(())
}

/// An Argon2id PHC string of `password` with a random salt and the `argon2`
/// crate's default cost (OWASP's minimum: 19 MiB, 2 passes), for
/// `fanfare hash-password`.
pub fn hash_password(password: &str) -> anyhow::Result<String> {
    use argon2::password_hash::{PasswordHasher, SaltString, rand_core::OsRng};
    let salt = SaltString::generate(&mut OsRng);
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("hashing the password: {e}"))
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Admin {
    /// The console of a validated `[admin]`, or `None` when it is off.
    pub fn new(cfg: &AdminSection, trusted: Vec<Cidr>) -> Option<Self> {
        if !cfg.enabled {
            return None;
        }
        let password = if cfg.password_hash.is_empty() {
            Password::Plain(Sha256::digest(cfg.password.as_bytes()).into())
        } else {
            Password::Hash(cfg.password_hash.clone())
        };
        Some(Self {
            password,
            secret: cfg.secret.as_bytes().to_vec(),
            ttl: cfg.session_ttl,
            trusted,
            failures: Mutex::new(HashMap::new()),
        })
    }

    fn mac(&self, expires_ms: u64) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.secret).expect("HMAC takes any key");
        mac.update(TOKEN_CONTEXT);
        mac.update(expires_ms.to_string().as_bytes());
        mac
    }

    /// A session token valid until `expires_ms` (Unix milliseconds):
    /// `<expires_ms>.<HMAC-SHA256, base64url>`. Stateless, so every node
    /// sharing `admin.secret` accepts it; it cannot be revoked before it
    /// expires except by changing the secret.
    fn token(&self, expires_ms: u64) -> String {
        let tag = self.mac(expires_ms).finalize().into_bytes();
        format!("{expires_ms}.{}", BASE64URL_NOPAD.encode(&tag))
    }

    /// Whether `token` was made with this secret and has not expired.
    pub fn verify(&self, token: &str) -> bool {
        let Some((expires, tag)) = token.split_once('.') else { return false };
        let (Ok(expires_ms), Ok(tag)) =
            (expires.parse::<u64>(), BASE64URL_NOPAD.decode(tag.as_bytes()))
        else {
            return false;
        };
        // The MAC first (constant time), then the clock.
        self.mac(expires_ms).verify_slice(&tag).is_ok() && unix_ms() < expires_ms
    }

    async fn password_matches(&self, attempt: String) -> bool {
        match &self.password {
            Password::Plain(digest) => {
                let given: [u8; 32] = Sha256::digest(attempt.as_bytes()).into();
                given.iter().zip(digest).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
            }
            Password::Hash(phc) => {
                use argon2::PasswordVerifier;
                // Milliseconds of CPU: off the async workers.
                let phc = phc.clone();
                tokio::task::spawn_blocking(move || {
                    let Ok(hash) = argon2::PasswordHash::new(&phc) else { return false };
                    argon2::Argon2::default().verify_password(attempt.as_bytes(), &hash).is_ok()
                })
                .await
                .unwrap_or(false)
            }
        }
    }

    /// Takes one sign-in attempt from `ip`'s budget; `Err(retry_after)`
    /// when it is spent. Counted before the password is checked, so
    /// attempts racing each other cannot exceed the budget; a right
    /// password gives its attempt back ([`Admin::give_back`]).
    fn take_attempt(&self, ip: IpAddr) -> Result<(), Duration> {
        let now = Instant::now();
        let mut failures = self.failures.lock().expect("no panic while held");
        if failures.len() >= MAX_TRACKED {
            failures.retain(|_, (start, _)| now.duration_since(*start) < LOGIN_WINDOW);
            if failures.len() >= MAX_TRACKED {
                return Err(LOGIN_WINDOW);
            }
        }
        let entry = failures.entry(crate::limits::rate_key(ip)).or_insert((now, 0));
        let age = now.duration_since(entry.0);
        if age >= LOGIN_WINDOW {
            *entry = (now, 0);
        }
        if entry.1 >= LOGIN_FAILURES {
            return Err(LOGIN_WINDOW.saturating_sub(now.duration_since(entry.0)));
        }
        entry.1 += 1;
        Ok(())
    }

    fn give_back(&self, ip: IpAddr) {
        let mut failures = self.failures.lock().expect("no panic while held");
        if let Some(entry) = failures.get_mut(&crate::limits::rate_key(ip)) {
            entry.1 = entry.1.saturating_sub(1);
        }
    }

    /// `POST /admin/login` with `{"password": "..."}`: 200 with a token,
    /// 401 with no detail for a wrong password, 429 past the limit.
    async fn login(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        body_timeout: Duration,
    ) -> Response<Body> {
        if req.method() != Method::POST {
            return json_reply(StatusCode::METHOD_NOT_ALLOWED, json!({"error": "use POST"}));
        }
        let ip = crate::limits::client_ip(peer.ip(), req.headers(), &self.trusted);
        if let Err(wait) = self.take_attempt(ip) {
            tracing::warn!(%ip, "admin sign-in refused: too many failed attempts");
            let mut r = json_reply(
                StatusCode::TOO_MANY_REQUESTS,
                json!({"error": "too many failed sign-ins from this address; try again later"}),
            );
            let secs = wait.as_secs().max(1).to_string();
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_str(&secs).expect("digits"));
            return r;
        }
        let collect = Limited::new(req.into_body(), MAX_LOGIN_BODY).collect();
        let body = match tokio::time::timeout(body_timeout, collect).await {
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(_)) => {
                self.give_back(ip);
                let e = format!("body: larger than {MAX_LOGIN_BODY} bytes");
                return json_reply(StatusCode::PAYLOAD_TOO_LARGE, json!({ "error": e }));
            }
            Err(_) => {
                self.give_back(ip);
                let e = "body: not received within http.body_read_timeout";
                let mut r = json_reply(StatusCode::REQUEST_TIMEOUT, json!({ "error": e }));
                // The rest of the body may never come: the connection is not kept.
                r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
                return r;
            }
        };
        #[derive(serde::Deserialize)]
        struct Login {
            password: String,
        }
        let Ok(Login { password }) = serde_json::from_slice::<Login>(&body) else {
            self.give_back(ip);
            return json_reply(
                StatusCode::BAD_REQUEST,
                json!({"error": "body: expected {\"password\": \"...\"}"}),
            );
        };
        if !self.password_matches(password).await {
            tracing::warn!(%ip, "admin sign-in failed: wrong password");
            return json_reply(StatusCode::UNAUTHORIZED, json!({}));
        }
        self.give_back(ip);
        let expires_ms = unix_ms() + self.ttl.as_millis() as u64;
        tracing::info!(%ip, "admin signed in");
        let mut r = json_reply(
            StatusCode::OK,
            json!({"token": self.token(expires_ms), "expires_at_ms": expires_ms}),
        );
        // The token is a credential: no cache may keep the answer.
        r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        r
    }
}

fn json_reply(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    crate::api_http::json_response(status, Bytes::from(v.to_string()))
}

/// The page and its assets, compiled into the binary (no CDN, no files to
/// deploy beside it).
const INDEX: &str = include_str!("admin/index.html");
const SCRIPT: &str = include_str!("admin/console.js");
const STYLE: &str = include_str!("admin/console.css");

/// Everything the page may load: its own script, style and API, nothing
/// inline, nothing from elsewhere, no framing (clickjacking).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; \
                   frame-ancestors 'none'";

fn asset(content_type: &'static str, text: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Assets change with the binary and are tiny: revalidated each time
    // rather than risking a stale script against a newer node.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    r
}

/// Answers `/admin` and `/admin/*` (only called while the console is on).
pub async fn handle(
    admin: &Admin,
    req: Request<Incoming>,
    peer: SocketAddr,
    body_timeout: Duration,
) -> Response<Body> {
    let path = req.uri().path();
    let get = req.method() == Method::GET || req.method() == Method::HEAD;
    match path {
        "/admin/login" => admin.login(req, peer, body_timeout).await,
        "/admin" | "/admin/" if get => asset("text/html; charset=utf-8", INDEX),
        "/admin/console.js" if get => asset("text/javascript; charset=utf-8", SCRIPT),
        "/admin/console.css" if get => asset("text/css; charset=utf-8", STYLE),
        "/admin" | "/admin/" | "/admin/console.js" | "/admin/console.css" => {
            crate::http::plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => crate::http::plain(StatusCode::NOT_FOUND, "not found\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admin(ttl: Duration) -> Admin {
        let cfg = AdminSection {
            enabled: true,
            password: "pw".into(),
            secret: "s".repeat(32),
            session_ttl: ttl,
            ..AdminSection::default()
        };
        Admin::new(&cfg, Vec::new()).unwrap()
    }

    #[test]
    fn a_token_passes_until_it_expires_and_not_when_altered() {
        let a = admin(Duration::from_secs(60));
        let t = a.token(unix_ms() + 60_000);
        assert!(a.verify(&t));
        let (exp, tag) = t.split_once('.').unwrap();
        let later = exp.parse::<u64>().unwrap() + 1;
        assert!(!a.verify(&format!("{later}.{tag}")), "a longer expiry under the old MAC");
        assert!(!a.verify(&a.token(unix_ms() - 1)), "an expired token");
        let other = Admin::new(
            &AdminSection {
                secret: "t".repeat(32),
                ..AdminSection { enabled: true, password: "pw".into(), ..Default::default() }
            },
            Vec::new(),
        )
        .unwrap();
        assert!(!other.verify(&t), "a token of another secret");
        assert!(!a.verify("") && !a.verify("1.") && !a.verify("x.y"));
    }

    #[test]
    fn the_sixth_failure_within_a_minute_is_refused_and_other_addresses_are_not() {
        let a = admin(Duration::from_secs(60));
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..LOGIN_FAILURES {
            assert!(a.take_attempt(ip).is_ok());
        }
        let wait = a.take_attempt(ip).unwrap_err();
        assert!(wait > Duration::from_secs(55) && wait <= LOGIN_WINDOW, "{wait:?}");
        assert!(a.take_attempt("10.0.0.2".parse().unwrap()).is_ok());
        // IPv6: a /64 is one client.
        let v6a: IpAddr = "2001:db8::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8::2".parse().unwrap();
        for _ in 0..LOGIN_FAILURES {
            a.take_attempt(v6a).unwrap();
        }
        assert!(a.take_attempt(v6b).is_err());
    }

    #[test]
    fn argon2_phc_strings_are_accepted_and_other_hashes_are_not() {
        assert!(parse_hash("$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$qnzSbl1Rh6p4lNqAsrNlnvOYVzIpCkDsRczQZaDu1Q8").is_ok());
        assert!(parse_hash("$2b$12$abcdefghijklmnopqrstuu").is_err());
        assert!(parse_hash("hunter2").is_err());
    }
}
