//! The HTTP client of the calls the node makes to the application backend
//! (HTTP proxies, webhooks): hyper-util's pooled keep-alive client, HTTP/1.1,
//! TLS by rustls (ring, webpki roots) for `https://`.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

pub type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A pooled client; idle connections are kept 90 s, so a busy node calls
/// over warm connections. `connect_timeout` bounds the TCP connect.
pub fn client(connect_timeout: Option<Duration>) -> HttpClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(connect_timeout);
    let tls = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(90)).build(tls)
}

/// An error with its causes ("client error (Connect): tcp connect error:
/// Connection refused"): hyper's top-level message alone says little.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
