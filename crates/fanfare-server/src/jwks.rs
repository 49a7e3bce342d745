//! Fetches the JWKS of `auth.jwks_url` into the verifier's key set
//! (`fanfare_core::auth::JwksKeys`; ARCHITECTURE decision 28).
//!
//! One task per node: it fetches at start, every `auth.jwks_refresh_interval`,
//! and when a token names a `kid` the set lacks — at most once per
//! `auth.jwks_refetch_interval`, so made-up `kid`s cannot turn the node into a
//! load generator against the issuer. Verification never waits for I/O except
//! that one bounded wait for an unknown `kid` (`auth::JWKS_WAIT`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use fanfare_core::Authenticator;
use fanfare_core::auth::{AuthConfig, JWKS_WAIT, JwksKeys};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::outbound::{HttpClient, error_chain};

/// Largest JWKS document read: a few dozen keys take a few KiB.
const MAX_JWKS_BYTES: usize = 1 << 20;

/// Checks the `auth.jwks_*` keys; errors name the key.
pub fn validate(cfg: &AuthConfig) -> anyhow::Result<()> {
    if cfg.jwks_url.is_empty() {
        if !cfg.jwks_ca.is_empty() {
            bail!("auth.jwks_ca: set only next to auth.jwks_url");
        }
        return Ok(());
    }
    let uri: http::Uri =
        cfg.jwks_url.parse().map_err(|_| anyhow::anyhow!("auth.jwks_url: not a URL"))?;
    let host = uri.host().unwrap_or("");
    match uri.scheme_str() {
        Some("https") if !host.is_empty() => {}
        // Keys fetched in clear text could be swapped on the way; a sidecar on
        // the same host (and the tests) may still serve plain HTTP.
        Some("http") if matches!(host, "127.0.0.1" | "localhost" | "[::1]" | "::1") => {}
        _ => bail!("auth.jwks_url: must be https:// (http:// only to a loopback address)"),
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        bail!(
            "auth.jwks_url: user:password@ is not sent (and would reach the HTTP client's logs); \
             a JWKS is public, serve it without credentials"
        );
    }
    if !cfg.jwks_ca.is_empty() {
        roots(cfg).context("auth.jwks_ca")?;
    }
    if cfg.jwks_refresh_interval < Duration::from_secs(10)
        || cfg.jwks_refresh_interval > Duration::from_secs(7 * 86400)
    {
        bail!("auth.jwks_refresh_interval: must be between 10s and 7d");
    }
    if cfg.jwks_refetch_interval < Duration::from_secs(1)
        || cfg.jwks_refetch_interval > cfg.jwks_refresh_interval
    {
        bail!(
            "auth.jwks_refetch_interval: must be at least 1s and at most auth.jwks_refresh_interval"
        );
    }
    Ok(())
}

/// The web roots, plus the certificates of `auth.jwks_ca`.
fn roots(cfg: &AuthConfig) -> anyhow::Result<rustls::RootCertStore> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    if !cfg.jwks_ca.is_empty() {
        let pem =
            std::fs::read(&cfg.jwks_ca).with_context(|| format!("cannot read {}", cfg.jwks_ca))?;
        let mut n = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert =
                cert.map_err(|e| anyhow::anyhow!("{}: not PEM certificates: {e}", cfg.jwks_ca))?;
            roots.add(cert).map_err(|e| anyhow::anyhow!("{}: {e}", cfg.jwks_ca))?;
            n += 1;
        }
        if n == 0 {
            bail!("{}: no certificate found", cfg.jwks_ca);
        }
    }
    Ok(roots)
}

/// A client for the JWKS host: like `outbound::client`, with `auth.jwks_ca`
/// trusted too.
fn client(cfg: &AuthConfig) -> anyhow::Result<HttpClient> {
    // ring, as hyper-rustls uses for every other outbound call of the node.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(cfg)?)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(JWKS_WAIT));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new()).build(https))
}

/// A URL as logs and `check-config` show it: its query (an access key some
/// issuers put there) replaced.
pub fn shown_url(url: &str) -> String {
    match url.split_once('?') {
        Some((base, _)) => format!("{base}?********"),
        None => url.to_string(),
    }
}

/// Starts fetching when `auth.jwks_url` is set. The first fetch is awaited
/// (bounded by `JWKS_WAIT`) so a node starts with keys; if it fails the node
/// starts anyway and the first token asks again.
pub async fn start(cfg: &AuthConfig, auth: &Authenticator) -> anyhow::Result<()> {
    let Some(keys) = auth.jwks().cloned() else { return Ok(()) };
    metrics::describe_counter!("fanfare_jwks_fetches_total", "JWKS fetches by result (ok, error).");
    metrics::describe_gauge!("fanfare_jwks_keys", "Signing keys in the last JWKS fetched.");
    let fetcher = Fetcher {
        client: client(cfg)?,
        url: cfg.jwks_url.clone(),
        shown: shown_url(&cfg.jwks_url),
        keys,
        refresh: cfg.jwks_refresh_interval,
        quiet: cfg.jwks_refetch_interval,
    };
    let ok = fetcher.fetch().await;
    tokio::spawn(fetcher.run(ok));
    Ok(())
}

struct Fetcher {
    client: HttpClient,
    url: String,
    /// `url` for logs: without its query, which may carry an access key.
    shown: String,
    keys: Arc<JwksKeys>,
    refresh: Duration,
    quiet: Duration,
}

impl Fetcher {
    async fn run(self, mut ok: bool) {
        loop {
            // After a failure, try again after the quiet interval rather than
            // a whole refresh interval.
            let next = tokio::time::Instant::now() + if ok { self.refresh } else { self.quiet };
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(next) => break,
                    // A request left over from during the last fetch finds
                    // the quiet interval running and is dropped: whoever asked
                    // was woken by that fetch.
                    _ = self.keys.wanted() => if self.keys.may_fetch() { break },
                }
            }
            ok = self.fetch().await;
        }
    }

    /// One fetch; the key set is replaced only by a good document.
    async fn fetch(&self) -> bool {
        let result = tokio::time::timeout(JWKS_WAIT, self.get())
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {}s", JWKS_WAIT.as_secs())));
        let ok = match result.and_then(|body| self.keys.load(&body).map_err(anyhow::Error::msg)) {
            Ok(n) => {
                tracing::info!(url = %self.shown, keys = n, "JWKS fetched");
                metrics::gauge!("fanfare_jwks_keys").set(n as f64);
                true
            }
            Err(e) => {
                // The keys fetched before stay in use.
                tracing::warn!(url = %self.shown, error = %e, "JWKS fetch failed");
                false
            }
        };
        let result = if ok { "ok" } else { "error" };
        metrics::counter!("fanfare_jwks_fetches_total", "result" => result).increment(1);
        self.keys.fetch_done(self.quiet);
        ok
    }

    async fn get(&self) -> anyhow::Result<Bytes> {
        let req = http::Request::get(&self.url)
            .header(http::header::ACCEPT, "application/json")
            .body(Full::new(Bytes::new()))?;
        let resp = self.client.request(req).await.map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
        if resp.status() != http::StatusCode::OK {
            bail!("status {}", resp.status());
        }
        let body = Limited::new(resp.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("body: {e}"))?;
        Ok(body.to_bytes())
    }
}
