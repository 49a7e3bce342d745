//! Shared pieces of the control API transports: authentication, limits and
//! per-method metrics.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use fanfare_core::{ApiError, ApiLimits};

/// The span of one API request (HTTP `/api/*` or a gRPC call) and the
/// `X-Request-Id` to echo: the caller's when it is a plain token (1 to 128
/// bytes of `A-Z a-z 0-9 . _ : -`), else a fresh one. Only such tokens are
/// logged and echoed, so the header cannot forge log lines or carry arbitrary
/// data into them. A fresh id (a per-process random prefix and a counter:
/// unique without a syscall) is made only when the span is enabled: with
/// `info` filtered out nothing could be found by it, and the id, its header
/// and its span cost a gRPC call about 1 µs (docs/BENCHMARKS.md). The value
/// is marked sensitive so that HTTP/2 does not put each unique id into its
/// header compression table.
pub fn request_span(
    incoming: Option<&http::HeaderValue>,
) -> (tracing::Span, Option<http::HeaderValue>) {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    let span = tracing::info_span!("request", request_id = tracing::field::Empty);
    let plain = |v: &&http::HeaderValue| {
        let b = v.as_bytes();
        (1..=128).contains(&b.len())
            && b.iter().all(|c| c.is_ascii_alphanumeric() || b"._:-".contains(c))
    };
    let mut id = match incoming.filter(plain) {
        Some(v) => v.clone(),
        None if span.is_disabled() => return (span, None),
        None => {
            static PREFIX: OnceLock<u64> = OnceLock::new();
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let prefix = *PREFIX.get_or_init(|| {
                use std::hash::{BuildHasher, RandomState};
                RandomState::new().hash_one(std::process::id())
            });
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            http::HeaderValue::try_from(format!("{prefix:016x}-{n}"))
                .expect("hex digits, a dash and digits make a header value")
        }
    };
    id.set_sensitive(true);
    span.record("request_id", tracing::field::display(id.to_str().unwrap_or_default()));
    (span, Some(id))
}

/// The name of the request id header (lowercase, as HTTP/2 needs it).
pub const REQUEST_ID: &str = "x-request-id";

/// API settings every transport needs.
#[derive(Debug, Clone)]
pub struct ApiContext {
    /// Empty = no key: only loopback callers are served.
    pub key: String,
    pub limits: ApiLimits,
    /// Largest request body / message in bytes.
    pub max_request_size: usize,
    /// The admin console, when on: its session tokens are accepted as
    /// `authorization: token <token>` besides the key.
    pub admin: Option<Arc<crate::admin::Admin>>,
}

/// Why a caller was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// Wrong or missing key.
    BadKey,
    /// No key configured and the caller is not on loopback.
    NotLoopback,
    /// `authorization: token ...` that is not a valid, unexpired session
    /// token of the admin console (or the console is off).
    BadToken,
}

impl AuthFailure {
    pub fn message(self) -> &'static str {
        match self {
            AuthFailure::BadKey => "missing or wrong API key (send `authorization: apikey <key>`)",
            AuthFailure::NotLoopback => {
                "no api.key is configured: the control API answers loopback callers only"
            }
            AuthFailure::BadToken => "session token invalid or expired: sign in again",
        }
    }
}

impl ApiContext {
    /// Checks the `authorization` value (or HTTP `X-API-Key`) of a caller.
    pub fn authorize(
        &self,
        authorization: Option<&str>,
        x_api_key: Option<&str>,
        peer: Option<SocketAddr>,
    ) -> Result<(), AuthFailure> {
        // A session token is judged by itself, also where loopback callers
        // need no key: a console whose session ended must learn it.
        if let Some(v) = authorization
            && let (scheme, token) = v.trim().split_once(' ').unwrap_or((v.trim(), ""))
            && scheme.eq_ignore_ascii_case("token")
        {
            return match &self.admin {
                Some(admin) if admin.verify(token.trim()) => Ok(()),
                _ => Err(AuthFailure::BadToken),
            };
        }
        if self.key.is_empty() {
            return match peer {
                Some(p) if p.ip().is_loopback() => Ok(()),
                _ => Err(AuthFailure::NotLoopback),
            };
        }
        let from_auth = authorization.and_then(|v| {
            let (scheme, key) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("apikey").then(|| key.trim())
        });
        let given = from_auth.or(x_api_key.map(str::trim));
        match given {
            Some(k) if constant_time_eq(k.as_bytes(), self.key.as_bytes()) => Ok(()),
            _ => Err(AuthFailure::BadKey),
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The gRPC code name of an error (also the HTTP error `code`).
pub fn code_name(e: &ApiError) -> &'static str {
    match e {
        ApiError::InvalidArgument(_)
        | ApiError::UnknownNamespace(_)
        | ApiError::UnrecoverablePosition(_) => "INVALID_ARGUMENT",
        ApiError::NotFound(_) => "NOT_FOUND",
        ApiError::ResourceExhausted(_) | ApiError::TooLarge(_) => "RESOURCE_EXHAUSTED",
        ApiError::Unavailable(_) => "UNAVAILABLE",
    }
}

pub const REQUESTS: &str = "fanfare_api_requests_total";
pub const DURATION: &str = "fanfare_api_request_duration_seconds";

pub fn describe_metrics() {
    metrics::describe_counter!(
        REQUESTS,
        "Control API requests by method, protocol and result code."
    );
    metrics::describe_histogram!(
        DURATION,
        metrics::Unit::Seconds,
        "Control API request duration by method and protocol."
    );
}

/// Records one API call.
///
/// The labelled handles are looked up in the recorder once per thread and
/// label set, then kept: a lookup hashes and compares the whole key, which
/// cost more than the rest of the bookkeeping at 100 000 calls/s.
pub fn observe(method: &'static str, protocol: &'static str, code: &'static str, start: Instant) {
    type Key = (usize, usize, usize);
    thread_local! {
        static HANDLES: RefCell<HashMap<Key, (metrics::Counter, metrics::Histogram)>> =
            RefCell::new(HashMap::new());
    }
    let elapsed = start.elapsed().as_secs_f64();
    // Static strings: their addresses identify them (two copies of one
    // string at different addresses just mean two entries for one metric).
    let key = (method.as_ptr() as usize, protocol.as_ptr() as usize, code.as_ptr() as usize);
    HANDLES.with_borrow_mut(|h| {
        let (count, duration) = h.entry(key).or_insert_with(|| {
            (
                metrics::counter!(REQUESTS, "method" => method, "protocol" => protocol, "code" => code),
                metrics::histogram!(DURATION, "method" => method, "protocol" => protocol),
            )
        });
        count.increment(1);
        duration.record(elapsed);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(key: &str) -> ApiContext {
        ApiContext {
            key: key.into(),
            limits: ApiLimits::default(),
            max_request_size: 1024,
            admin: None,
        }
    }

    #[test]
    fn key_and_loopback_rules() {
        let lo: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let remote: SocketAddr = "10.0.0.1:1".parse().unwrap();
        assert_eq!(ctx("").authorize(None, None, Some(lo)), Ok(()));
        assert_eq!(ctx("").authorize(None, None, Some(remote)), Err(AuthFailure::NotLoopback));
        let k = ctx("s3cret");
        assert_eq!(k.authorize(Some("apikey s3cret"), None, Some(remote)), Ok(()));
        assert_eq!(k.authorize(Some("ApiKey  s3cret "), None, Some(remote)), Ok(()));
        assert_eq!(k.authorize(None, Some("s3cret"), Some(remote)), Ok(()));
        assert_eq!(k.authorize(Some("apikey nope"), None, Some(lo)), Err(AuthFailure::BadKey));
        assert_eq!(k.authorize(Some("Bearer s3cret"), None, Some(lo)), Err(AuthFailure::BadKey));
        assert_eq!(k.authorize(None, None, Some(lo)), Err(AuthFailure::BadKey));
        // Without the console, a session token is refused even on loopback.
        assert_eq!(
            ctx("").authorize(Some("token 1.x"), None, Some(lo)),
            Err(AuthFailure::BadToken)
        );
    }
}
