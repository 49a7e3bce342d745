//! Connection and subscription JWT verification.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Token settings (`auth.*`).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Shared secret for HS256/HS384/HS512 tokens.
    pub hmac_secret: String,
    /// PEM public key for RS256/ES256/EdDSA tokens.
    pub public_key_pem: String,
    /// Accept connects without a token. Default: true only when no key is set.
    pub allow_anonymous: Option<bool>,
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("token expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("no token verification key configured")]
    NoKey,
}

/// Claims of a connection token.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
pub struct ConnectClaims {
    #[serde(default)]
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<serde_json::Value>,
}

/// Verifies tokens with the configured key. Cheap to share behind an `Arc`.
pub struct Authenticator {
    key: Option<(DecodingKey, Validation)>,
    signing: Option<EncodingKey>,
    allow_anonymous: bool,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("has_key", &self.key.is_some())
            .field("allow_anonymous", &self.allow_anonymous)
            .finish()
    }
}

fn validation(algs: &[Algorithm]) -> Validation {
    let mut v = Validation::new(algs[0]);
    v.algorithms = algs.to_vec();
    v.required_spec_claims.clear();
    v.validate_aud = false;
    v.leeway = 0;
    v
}

impl Authenticator {
    /// Builds the verifier; errors name the bad key.
    pub fn new(cfg: &AuthConfig) -> Result<Self, String> {
        let (key, signing) = if !cfg.hmac_secret.is_empty() {
            let secret = cfg.hmac_secret.as_bytes();
            (
                Some((
                    DecodingKey::from_secret(secret),
                    validation(&[Algorithm::HS256, Algorithm::HS384, Algorithm::HS512]),
                )),
                Some(EncodingKey::from_secret(secret)),
            )
        } else if !cfg.public_key_pem.is_empty() {
            let pem = cfg.public_key_pem.as_bytes();
            let key = if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
                (k, validation(&[Algorithm::RS256, Algorithm::RS384, Algorithm::RS512]))
            } else if let Ok(k) = DecodingKey::from_ec_pem(pem) {
                (k, validation(&[Algorithm::ES256, Algorithm::ES384]))
            } else if let Ok(k) = DecodingKey::from_ed_pem(pem) {
                (k, validation(&[Algorithm::EdDSA]))
            } else {
                return Err(
                    "auth.public_key_pem: not a PEM RSA, EC or Ed25519 public key".to_string()
                );
            };
            (Some(key), None)
        } else {
            (None, None)
        };
        let allow_anonymous = cfg.allow_anonymous.unwrap_or(key.is_none());
        Ok(Self { key, signing, allow_anonymous })
    }

    pub fn allow_anonymous(&self) -> bool {
        self.allow_anonymous
    }

    pub fn has_key(&self) -> bool {
        self.key.is_some()
    }

    fn verify<T: serde::de::DeserializeOwned>(&self, token: &str) -> Result<T, AuthError> {
        let (key, validation) = self.key.as_ref().ok_or(AuthError::NoKey)?;
        jsonwebtoken::decode::<T>(token, key, validation).map(|d| d.claims).map_err(|e| {
            match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Invalid(e.to_string()),
            }
        })
    }

    pub fn verify_connect(&self, token: &str) -> Result<ConnectClaims, AuthError> {
        self.verify(token)
    }

    pub fn verify_subscribe(&self, token: &str) -> Result<SubscribeClaims, AuthError> {
        self.verify(token)
    }

    /// Signs claims with the HMAC secret (HS256): for `fanfare token` and tests.
    pub fn sign<T: Serialize>(&self, claims: &T) -> Result<String, AuthError> {
        let key = self.signing.as_ref().ok_or(AuthError::NoKey)?;
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, key)
            .map_err(|e| AuthError::Invalid(e.to_string()))
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
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
        assert!(matches!(other.verify_connect(&t), Err(AuthError::Invalid(_))));
        let none = Authenticator::new(&AuthConfig::default()).unwrap();
        assert!(none.allow_anonymous());
        assert_eq!(none.verify_connect(&t), Err(AuthError::NoKey));
    }
}
