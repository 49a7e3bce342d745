//! Connection and subscription JWT verification.
//!
//! Keys by family, chosen by the token's `alg` header (never by trying every
//! key with every algorithm, which is how HMAC-with-public-key confusion works):
//! HS256/384/512 verify with `hmac_secret`, then `hmac_previous_secret`;
//! RS/PS/ES/EdDSA verify with the key a JWKS lists under the token's `kid`,
//! else with the `public_key_pem` keys of that family. Verification is
//! synchronous; the JWKS key set ([`JwksKeys`]) is filled by the server crate,
//! which asks for it over HTTP (core does no I/O).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Deserializer, Serialize};

/// Tolerance for `nbf` only: an issuer whose clock runs a little ahead would
/// otherwise mint tokens a node refuses for good (3500 makes SDKs give up).
/// `exp` has none: an expired token gets 109 and the SDK fetches a new one.
pub const NBF_LEEWAY_SECS: u64 = 5;

/// Longest a command whose token names an unknown `kid` waits for the JWKS
/// fetch it asked for (a connect also no longer than `client.connect_timeout`).
/// The fetch itself is bounded by the same time.
pub const JWKS_WAIT: Duration = Duration::from_secs(3);

/// Token settings (`auth.*`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Shared secret for HS256/HS384/HS512 tokens.
    pub hmac_secret: String,
    /// The secret before the last rotation: still accepted (after
    /// `hmac_secret`) until removed. Tokens are signed with `hmac_secret` only.
    pub hmac_previous_secret: String,
    /// PEM public keys (one or more blocks) for RS*/PS*/ES256/ES384/EdDSA tokens.
    pub public_key_pem: String,
    /// JWKS endpoint (https://, or http:// to a loopback address): public keys
    /// by `kid`, cached, refetched on an unknown `kid` and every
    /// `jwks_refresh_interval`.
    pub jwks_url: String,
    /// PEM file of extra CA certificates trusted for `jwks_url` (next to the
    /// built-in web roots): a private CA.
    pub jwks_ca: String,
    /// How often the JWKS is fetched even when every `kid` is known.
    #[serde(with = "humantime_serde")]
    pub jwks_refresh_interval: Duration,
    /// Least time between two fetches: an unknown `kid` within it is refused
    /// without a fetch, so made-up `kid`s cannot drive requests to the issuer.
    #[serde(with = "humantime_serde")]
    pub jwks_refetch_interval: Duration,
    /// Required `aud` (tokens without it, or for another audience, are refused).
    pub audience: String,
    /// Required `iss`.
    pub issuer: String,
    /// Accept connects without a token. Default: true only when no key is set.
    pub allow_anonymous: Option<bool>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            hmac_secret: String::new(),
            hmac_previous_secret: String::new(),
            public_key_pem: String::new(),
            jwks_url: String::new(),
            jwks_ca: String::new(),
            jwks_refresh_interval: Duration::from_secs(3600),
            jwks_refetch_interval: Duration::from_secs(10),
            audience: String::new(),
            issuer: String::new(),
            allow_anonymous: None,
        }
    }
}

/// Why a token was refused. `Invalid` carries a short kind for logs, never
/// the token or a library's message about its contents.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("token expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(&'static str),
    /// Signed with a `kid` the JWKS does not list (yet): the caller may ask
    /// for a refetch ([`Authenticator::await_jwks`]) and try once more.
    #[error("invalid token: unknown kid")]
    UnknownKey,
    #[error("no token verification key configured")]
    NoKey,
}

/// A JWT NumericDate: RFC 7519 allows fractions ("1700000000.5"); kept as
/// whole seconds, rounded down (a fractional `exp` expires up to 1 s early).
fn numeric_date<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match Option::<f64>::deserialize(d)? {
        None => Ok(None),
        Some(x) if x.is_finite() && x >= 0.0 => Ok(Some(x as u64)),
        Some(_) => Err(serde::de::Error::custom("not a NumericDate")),
    }
}

/// Claims of a connection token.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
pub struct ConnectClaims {
    #[serde(default)]
    pub sub: String,
    #[serde(default, deserialize_with = "numeric_date", skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<serde_json::Value>,
    /// Server-side subscriptions made at connect.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub channels: Vec<String>,
}

/// Claims of a subscription token.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
pub struct SubscribeClaims {
    #[serde(default)]
    pub sub: String,
    #[serde(default)]
    pub channel: String,
    #[serde(default, deserialize_with = "numeric_date", skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<serde_json::Value>,
}

/// What every token must be besides its claims: `nbf` honoured.
#[derive(Deserialize)]
struct Envelope<T> {
    #[serde(flatten)]
    claims: T,
    #[serde(default, deserialize_with = "numeric_date")]
    nbf: Option<u64>,
}

/// A connection token as sent: it must not name a `channel`, or a
/// subscription token could stand in for it.
#[derive(Deserialize)]
struct ConnectToken {
    #[serde(flatten)]
    claims: ConnectClaims,
    #[serde(default)]
    channel: Option<serde::de::IgnoredAny>,
}

trait Token: serde::de::DeserializeOwned {
    type Claims;
    fn exp(&self) -> Option<u64>;
    /// The claims, if the token is of this kind.
    fn claims(self) -> Option<Self::Claims>;
}

impl Token for ConnectToken {
    type Claims = ConnectClaims;
    fn exp(&self) -> Option<u64> {
        self.claims.exp
    }
    fn claims(self) -> Option<ConnectClaims> {
        self.channel.is_none().then_some(self.claims)
    }
}

impl Token for SubscribeClaims {
    type Claims = SubscribeClaims;
    fn exp(&self) -> Option<u64> {
        self.exp
    }
    fn claims(self) -> Option<SubscribeClaims> {
        (!self.channel.is_empty()).then_some(self)
    }
}

/// One public key and the algorithms it verifies.
struct PublicKey {
    key: DecodingKey,
    algs: Vec<Algorithm>,
}

const RSA_ALGS: [Algorithm; 6] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];

/// The public keys of a JWKS by `kid`, shared between the verifier (reads,
/// on every token) and the server's fetcher (writes, on every fetch).
pub struct JwksKeys {
    keys: RwLock<Arc<HashMap<String, PublicKey>>>,
    /// Fetches finished (whether they worked): what a waiter watches.
    fetched: tokio::sync::watch::Sender<u64>,
    /// Rung by an unknown `kid`; the fetcher listens.
    wanted: tokio::sync::Notify,
    /// Unix ms before which no fetch is asked for (`jwks_refetch_interval`).
    quiet_until_ms: AtomicU64,
}

impl Default for JwksKeys {
    fn default() -> Self {
        Self {
            keys: RwLock::default(),
            fetched: tokio::sync::watch::Sender::new(0),
            wanted: tokio::sync::Notify::new(),
            quiet_until_ms: AtomicU64::new(0),
        }
    }
}

impl JwksKeys {
    /// Replaces the key set with the keys of a JWKS document and returns how
    /// many it holds. Keys fanfare cannot use (`use: enc`, symmetric `oct`,
    /// unknown curves, no `kid`) are skipped, not fatal: issuers list more
    /// than signing keys.
    pub fn load(&self, json: &[u8]) -> Result<usize, String> {
        #[derive(Deserialize)]
        struct Set {
            keys: Vec<serde_json::Value>,
        }
        let set: Set = serde_json::from_slice(json).map_err(|e| format!("not a JWKS: {e}"))?;
        let mut keys = HashMap::new();
        for v in set.keys {
            let Ok(jwk) = serde_json::from_value::<Jwk>(v) else { continue };
            let Some(kid) = jwk.common.key_id.clone() else { continue };
            if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
                continue;
            }
            let Some(key) = public_jwk(&jwk) else { continue };
            keys.insert(kid, key);
        }
        let n = keys.len();
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
        Ok(n)
    }

    /// Marks a fetch finished (worked or not) and starts the quiet interval.
    pub fn fetch_done(&self, quiet: Duration) {
        self.quiet_until_ms.store(unix_now_ms() + quiet.as_millis() as u64, Ordering::Relaxed);
        self.fetched.send_modify(|n| *n += 1);
    }

    /// Whether an unknown `kid` may ask for a fetch now.
    pub fn may_fetch(&self) -> bool {
        unix_now_ms() >= self.quiet_until_ms.load(Ordering::Relaxed)
    }

    /// Resolves when a fetch is asked for (the fetcher's loop).
    pub fn wanted(&self) -> tokio::sync::futures::Notified<'_> {
        self.wanted.notified()
    }

    pub fn kids(&self) -> Vec<String> {
        self.snapshot().keys().cloned().collect()
    }

    fn snapshot(&self) -> Arc<HashMap<String, PublicKey>> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A JWK's verifying key and the algorithms allowed with it: the JWK's own
/// `alg` if it names one, else those of its key type and curve.
fn public_jwk(jwk: &Jwk) -> Option<PublicKey> {
    let family: Vec<Algorithm> = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => RSA_ALGS.to_vec(),
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
            vec![Algorithm::EdDSA]
        }
        // `oct` (a shared secret in a public document) and the rest.
        _ => return None,
    };
    let algs = match jwk.common.key_algorithm {
        None => family,
        Some(ka) => {
            let alg = key_algorithm(ka)?;
            if !family.contains(&alg) {
                return None;
            }
            vec![alg]
        }
    };
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some(PublicKey { key, algs })
}

fn key_algorithm(ka: KeyAlgorithm) -> Option<Algorithm> {
    Some(match ka {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

/// Verifies tokens with the configured keys. Cheap to share behind an `Arc`.
pub struct Authenticator {
    /// `hmac_secret`, then `hmac_previous_secret`.
    hmac: Vec<DecodingKey>,
    public: Vec<PublicKey>,
    jwks: Option<Arc<JwksKeys>>,
    signing: Option<EncodingKey>,
    audience: Option<String>,
    issuer: Option<String>,
    allow_anonymous: bool,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("hmac_keys", &self.hmac.len())
            .field("public_keys", &self.public.len())
            .field("jwks", &self.jwks.is_some())
            .field("allow_anonymous", &self.allow_anonymous)
            .finish()
    }
}

/// The PEM blocks of a text holding one or more.
fn pem_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with("-----BEGIN ") {
            cur.clear();
        }
        cur.push_str(line);
        cur.push('\n');
        if line.starts_with("-----END ") {
            blocks.push(std::mem::take(&mut cur));
        }
    }
    blocks
}

fn public_pem(pem: &[u8]) -> Option<PublicKey> {
    if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
        return Some(PublicKey { key, algs: RSA_ALGS.to_vec() });
    }
    if let Ok(key) = DecodingKey::from_ec_pem(pem) {
        // The curve decides the algorithm; jsonwebtoken's EC key does not say
        // which, so both are listed and the signature check refuses a mismatch.
        return Some(PublicKey { key, algs: vec![Algorithm::ES256, Algorithm::ES384] });
    }
    if let Ok(key) = DecodingKey::from_ed_pem(pem) {
        return Some(PublicKey { key, algs: vec![Algorithm::EdDSA] });
    }
    None
}

fn is_hmac(alg: Algorithm) -> bool {
    matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

impl Authenticator {
    /// Builds the verifier; errors name the bad key. The JWKS key set starts
    /// empty: the server's fetcher fills it ([`Authenticator::jwks`]).
    pub fn new(cfg: &AuthConfig) -> Result<Self, String> {
        if !cfg.hmac_previous_secret.is_empty() && cfg.hmac_secret.is_empty() {
            return Err("auth.hmac_previous_secret: set only next to auth.hmac_secret".into());
        }
        let mut hmac = Vec::new();
        let mut signing = None;
        if !cfg.hmac_secret.is_empty() {
            hmac.push(DecodingKey::from_secret(cfg.hmac_secret.as_bytes()));
            signing = Some(EncodingKey::from_secret(cfg.hmac_secret.as_bytes()));
        }
        if !cfg.hmac_previous_secret.is_empty() {
            hmac.push(DecodingKey::from_secret(cfg.hmac_previous_secret.as_bytes()));
        }
        let mut public = Vec::new();
        if !cfg.public_key_pem.trim().is_empty() {
            let blocks = pem_blocks(&cfg.public_key_pem);
            if blocks.is_empty() {
                return Err("auth.public_key_pem: no PEM block found".into());
            }
            for (i, block) in blocks.iter().enumerate() {
                public.push(public_pem(block.as_bytes()).ok_or_else(|| {
                    format!(
                        "auth.public_key_pem: block {} is not a PEM RSA, EC or Ed25519 public key",
                        i + 1
                    )
                })?);
            }
        }
        let jwks = (!cfg.jwks_url.is_empty()).then(|| Arc::new(JwksKeys::default()));
        let has_key = !hmac.is_empty() || !public.is_empty() || jwks.is_some();
        let allow_anonymous = cfg.allow_anonymous.unwrap_or(!has_key);
        let set = |s: &str| (!s.is_empty()).then(|| s.to_string());
        Ok(Self {
            hmac,
            public,
            jwks,
            signing,
            audience: set(&cfg.audience),
            issuer: set(&cfg.issuer),
            allow_anonymous,
        })
    }

    pub fn allow_anonymous(&self) -> bool {
        self.allow_anonymous
    }

    pub fn has_key(&self) -> bool {
        !self.hmac.is_empty() || !self.public.is_empty() || self.jwks.is_some()
    }

    /// The JWKS key set, when `auth.jwks_url` is set: the server fetches into it.
    pub fn jwks(&self) -> Option<&Arc<JwksKeys>> {
        self.jwks.as_ref()
    }

    /// After [`AuthError::UnknownKey`]: asks the fetcher for the JWKS and
    /// waits until a fetch finished or `deadline`. False, without waiting,
    /// when the last fetch was less than `jwks_refetch_interval` ago: the
    /// `kid` was not listed then either.
    pub async fn await_jwks(&self, deadline: tokio::time::Instant) -> bool {
        let Some(jwks) = &self.jwks else { return false };
        if !jwks.may_fetch() {
            return false;
        }
        let mut rx = jwks.fetched.subscribe();
        jwks.wanted.notify_one();
        matches!(tokio::time::timeout_at(deadline, rx.changed()).await, Ok(Ok(())))
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        v.required_spec_claims.clear();
        // exp and nbf are checked by `check_times`: jsonwebtoken reads them
        // as integers only, and RFC 7519 allows fractions.
        v.validate_exp = false;
        v.validate_nbf = false;
        v.leeway = 0;
        v.validate_aud = false;
        if let Some(aud) = &self.audience {
            v.set_audience(&[aud]);
            v.validate_aud = true;
            v.required_spec_claims.insert("aud".into());
        }
        if let Some(iss) = &self.issuer {
            v.set_issuer(&[iss]);
            v.required_spec_claims.insert("iss".into());
        }
        v
    }

    fn verify<T: Token>(&self, token: &str) -> Result<T::Claims, AuthError> {
        if !self.has_key() {
            return Err(AuthError::NoKey);
        }
        // `alg: none` and unknown algorithms fail here: jsonwebtoken's
        // `Algorithm` has no `none`.
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| AuthError::Invalid("malformed"))?;
        let alg = header.alg;
        let validation = self.validation(alg);
        let snapshot;
        // A `kid` the JWKS lacks: if no PEM key verifies the token either,
        // the caller may have the set fetched again.
        let mut unknown_kid = false;
        let candidates: Vec<&DecodingKey> = if is_hmac(alg) {
            self.hmac.iter().collect()
        } else {
            let listed = match (&self.jwks, &header.kid) {
                (Some(jwks), Some(kid)) => {
                    snapshot = jwks.snapshot();
                    snapshot.get(kid)
                }
                _ => None,
            };
            match listed {
                Some(k) if k.algs.contains(&alg) => vec![&k.key],
                Some(_) => return Err(AuthError::Invalid("algorithm")),
                None => {
                    unknown_kid = self.jwks.is_some() && header.kid.is_some();
                    self.public.iter().filter(|k| k.algs.contains(&alg)).map(|k| &k.key).collect()
                }
            }
        };
        if candidates.is_empty() {
            return Err(if unknown_kid {
                AuthError::UnknownKey
            } else {
                AuthError::Invalid("algorithm")
            });
        }
        let mut last = AuthError::Invalid("signature");
        for key in candidates {
            match jsonwebtoken::decode::<Envelope<T>>(token, key, &validation) {
                Ok(d) => return check(d.claims),
                Err(e) => {
                    last = match e.kind() {
                        // The next key (previous secret, another PEM key) may fit.
                        ErrorKind::InvalidSignature
                        | ErrorKind::InvalidEcdsaKey
                        | ErrorKind::InvalidRsaKey(_)
                        | ErrorKind::InvalidKeyFormat => AuthError::Invalid("signature"),
                        ErrorKind::InvalidAudience => return Err(AuthError::Invalid("audience")),
                        ErrorKind::InvalidIssuer => return Err(AuthError::Invalid("issuer")),
                        ErrorKind::MissingRequiredClaim(_) => {
                            return Err(AuthError::Invalid("missing claim"));
                        }
                        ErrorKind::InvalidAlgorithm => return Err(AuthError::Invalid("algorithm")),
                        ErrorKind::Json(_) | ErrorKind::Utf8(_) | ErrorKind::Base64(_) => {
                            return Err(AuthError::Invalid("malformed"));
                        }
                        _ => return Err(AuthError::Invalid("other")),
                    };
                }
            }
        }
        Err(if unknown_kid && last == AuthError::Invalid("signature") {
            AuthError::UnknownKey
        } else {
            last
        })
    }

    pub fn verify_connect(&self, token: &str) -> Result<ConnectClaims, AuthError> {
        self.verify::<ConnectToken>(token)
    }

    pub fn verify_subscribe(&self, token: &str) -> Result<SubscribeClaims, AuthError> {
        self.verify::<SubscribeClaims>(token)
    }

    /// Signs claims with the HMAC secret (HS256): for `fanfare token` and tests.
    pub fn sign<T: Serialize>(&self, claims: &T) -> Result<String, AuthError> {
        let key = self.signing.as_ref().ok_or(AuthError::NoKey)?;
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, key)
            .map_err(|_| AuthError::Invalid("encode"))
    }
}

/// The checks after the signature: `nbf`, `exp`, kind.
fn check<T: Token>(envelope: Envelope<T>) -> Result<T::Claims, AuthError> {
    let now = unix_now();
    if envelope.nbf.is_some_and(|nbf| nbf > now + NBF_LEEWAY_SECS) {
        return Err(AuthError::Invalid("not yet valid"));
    }
    if envelope.claims.exp().is_some_and(|exp| exp <= now) {
        return Err(AuthError::Expired);
    }
    envelope.claims.claims().ok_or(AuthError::Invalid("token kind"))
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn unix_now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The `info` claim as raw JSON bytes for `ClientInfo`.
pub fn info_bytes(info: &Option<serde_json::Value>) -> Bytes {
    match info {
        None | Some(serde_json::Value::Null) => Bytes::new(),
        Some(v) => Bytes::from(serde_json::to_vec(v).expect("a Value always serializes")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_roundtrip_expiry_and_tamper() {
        let a = Authenticator::new(&AuthConfig { hmac_secret: "s3".into(), ..Default::default() })
            .unwrap();
        assert!(!a.allow_anonymous());
        let t = a
            .sign(&ConnectClaims {
                sub: "42".into(),
                exp: Some(unix_now() + 60),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(a.verify_connect(&t).unwrap().sub, "42");
        let old = a
            .sign(&ConnectClaims {
                sub: "42".into(),
                exp: Some(unix_now() - 5),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(a.verify_connect(&old), Err(AuthError::Expired));
        let other =
            Authenticator::new(&AuthConfig { hmac_secret: "x".into(), ..Default::default() })
                .unwrap();
        assert_eq!(other.verify_connect(&t), Err(AuthError::Invalid("signature")));
        let none = Authenticator::new(&AuthConfig::default()).unwrap();
        assert!(none.allow_anonymous());
        assert_eq!(none.verify_connect(&t), Err(AuthError::NoKey));
    }

    fn hmac(secret: &str, previous: &str) -> Authenticator {
        Authenticator::new(&AuthConfig {
            hmac_secret: secret.into(),
            hmac_previous_secret: previous.into(),
            ..Default::default()
        })
        .unwrap()
    }

    fn hs256(secret: &str, claims: &serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn the_previous_secret_verifies_until_removed() {
        let claims = serde_json::json!({"sub": "u", "exp": unix_now() + 60});
        let a = hmac("new", "old");
        assert_eq!(a.verify_connect(&hs256("old", &claims)).unwrap().sub, "u");
        assert_eq!(a.verify_connect(&hs256("new", &claims)).unwrap().sub, "u");
        assert_eq!(
            a.verify_connect(&hs256("other", &claims)),
            Err(AuthError::Invalid("signature"))
        );
        let rotated = hmac("new", "");
        assert_eq!(
            rotated.verify_connect(&hs256("old", &claims)),
            Err(AuthError::Invalid("signature"))
        );
        assert!(
            Authenticator::new(&AuthConfig {
                hmac_previous_secret: "x".into(),
                ..Default::default()
            })
            .unwrap_err()
            .contains("auth.hmac_previous_secret")
        );
    }

    #[test]
    fn alg_none_and_kind_swaps_are_invalid() {
        let a = hmac("s", "");
        let enc =
            |v: serde_json::Value| data_encoding::BASE64URL_NOPAD.encode(v.to_string().as_bytes());
        let none = format!(
            "{}.{}.",
            enc(serde_json::json!({"alg": "none"})),
            enc(serde_json::json!({"sub": "u"}))
        );
        assert_eq!(a.verify_connect(&none), Err(AuthError::Invalid("malformed")));
        let sub = hs256("s", &serde_json::json!({"sub": "u", "channel": "c"}));
        assert_eq!(a.verify_connect(&sub), Err(AuthError::Invalid("token kind")));
        assert_eq!(a.verify_subscribe(&sub).unwrap().channel, "c");
        let conn = hs256("s", &serde_json::json!({"sub": "u"}));
        assert_eq!(a.verify_subscribe(&conn), Err(AuthError::Invalid("token kind")));
        // A public-key algorithm on a node with only a secret.
        let forged = format!(
            "{}.{}.c2ln",
            enc(serde_json::json!({"alg": "RS256"})),
            enc(serde_json::json!({"sub": "u"}))
        );
        assert_eq!(a.verify_connect(&forged), Err(AuthError::Invalid("algorithm")));
    }

    #[test]
    fn numeric_dates_may_be_fractional_and_nbf_is_honoured() {
        let a = hmac("s", "");
        let now = unix_now() as f64;
        let t = hs256("s", &serde_json::json!({"sub": "u", "exp": now + 60.5}));
        assert_eq!(a.verify_connect(&t).unwrap().exp, Some(unix_now() + 60));
        let t = hs256("s", &serde_json::json!({"sub": "u", "exp": now - 1.5}));
        assert_eq!(a.verify_connect(&t), Err(AuthError::Expired));
        let t = hs256("s", &serde_json::json!({"sub": "u", "nbf": now + 60.0}));
        assert_eq!(a.verify_connect(&t), Err(AuthError::Invalid("not yet valid")));
        let t = hs256("s", &serde_json::json!({"sub": "u", "nbf": now + 1.0}));
        assert!(a.verify_connect(&t).is_ok(), "within the nbf leeway");
        let t = hs256("s", &serde_json::json!({"sub": "u", "exp": "tomorrow"}));
        assert_eq!(a.verify_connect(&t), Err(AuthError::Invalid("malformed")));
        let t = hs256("s", &serde_json::json!({"sub": "u", "exp": -5}));
        assert_eq!(a.verify_connect(&t), Err(AuthError::Invalid("malformed")));
    }

    #[test]
    fn audience_and_issuer_when_configured() {
        let a = Authenticator::new(&AuthConfig {
            hmac_secret: "s".into(),
            audience: "app".into(),
            issuer: "me".into(),
            ..Default::default()
        })
        .unwrap();
        let t = |c: serde_json::Value| hs256("s", &c);
        assert!(a.verify_connect(&t(serde_json::json!({"aud": "app", "iss": "me"}))).is_ok());
        assert!(
            a.verify_connect(&t(serde_json::json!({"aud": ["x", "app"], "iss": "me"}))).is_ok()
        );
        assert_eq!(
            a.verify_connect(&t(serde_json::json!({"iss": "me"}))),
            Err(AuthError::Invalid("missing claim"))
        );
        assert_eq!(
            a.verify_connect(&t(serde_json::json!({"aud": "x", "iss": "me"}))),
            Err(AuthError::Invalid("audience"))
        );
        assert_eq!(
            a.verify_connect(&t(serde_json::json!({"aud": "app", "iss": "you"}))),
            Err(AuthError::Invalid("issuer"))
        );
        // Not configured: aud and iss are not looked at.
        assert!(
            hmac("s", "").verify_connect(&t(serde_json::json!({"aud": "x", "iss": "y"}))).is_ok()
        );
    }

    #[test]
    fn jwks_documents_keep_usable_signing_keys_only() {
        let a = Authenticator::new(&AuthConfig {
            jwks_url: "https://x/jwks".into(),
            ..Default::default()
        })
        .unwrap();
        assert!(a.has_key() && !a.allow_anonymous());
        let jwks = a.jwks().unwrap();
        let doc = serde_json::json!({"keys": [
            {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo", "kid": "ok", "alg": "EdDSA"},
            {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo", "kid": "enc", "use": "enc"},
            {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty": "oct", "k": "c2VjcmV0", "kid": "sym"},
            {"kty": "XYZ", "kid": "strange"}
        ]});
        assert_eq!(jwks.load(doc.to_string().as_bytes()), Ok(1));
        assert_eq!(jwks.kids(), vec!["ok".to_string()]);
        assert!(jwks.load(b"[]").is_err());
        // An unknown kid asks for a fetch; an HS token with a kid never does.
        let enc =
            |v: serde_json::Value| data_encoding::BASE64URL_NOPAD.encode(v.to_string().as_bytes());
        let body = enc(serde_json::json!({"sub": "u"}));
        let t = format!("{}.{body}.c2ln", enc(serde_json::json!({"alg": "EdDSA", "kid": "new"})));
        assert_eq!(a.verify_connect(&t), Err(AuthError::UnknownKey));
        let t = format!("{}.{body}.c2ln", enc(serde_json::json!({"alg": "EdDSA", "kid": "ok"})));
        assert_eq!(a.verify_connect(&t), Err(AuthError::Invalid("signature")));
        let t = format!("{}.{body}.c2ln", enc(serde_json::json!({"alg": "HS256", "kid": "new"})));
        assert_eq!(a.verify_connect(&t), Err(AuthError::Invalid("algorithm")));
        let t = format!("{}.{body}.c2ln", enc(serde_json::json!({"alg": "RS256", "kid": "ok"})));
        assert_eq!(a.verify_connect(&t), Err(AuthError::Invalid("algorithm")));
        // PEM keys of the family next to the JWKS: an unlisted kid they do not
        // verify still asks for a fetch.
        let pem = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../fanfare-server/tests/keys/ed2.pub.pem"
        ))
        .unwrap();
        let both = Authenticator::new(&AuthConfig {
            jwks_url: "https://x/jwks".into(),
            public_key_pem: pem,
            ..Default::default()
        })
        .unwrap();
        let t = format!("{}.{body}.c2ln", enc(serde_json::json!({"alg": "EdDSA", "kid": "new"})));
        assert_eq!(both.verify_connect(&t), Err(AuthError::UnknownKey));
    }
}
