//! Publishing through the server's HTTP API: `POST /api/publish` with a JSON
//! body `{"channel":..,"data":..}` and `X-API-Key` (Centrifugo's shape).

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// One keep-alive HTTP/1.1 connection to the API; one request at a time.
pub struct ApiClient {
    sender: SendRequest<Full<Bytes>>,
    uri: Uri,
    host: String,
    key: String,
}

impl ApiClient {
    pub async fn connect(url: &str, key: &str) -> anyhow::Result<ApiClient> {
        let uri: Uri = url.parse().with_context(|| format!("--api-url {url:?}"))?;
        if uri.scheme_str() != Some("http") {
            bail!("--api-url {url}: only http:// is supported");
        }
        let host = uri.host().context("--api-url has no host")?.to_string();
        let port = uri.port_u16().unwrap_or(80);
        let stream = TcpStream::connect((host.as_str(), port))
            .await
            .with_context(|| format!("connecting to {host}:{port}"))?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP handshake")?;
        tokio::spawn(conn);
        Ok(ApiClient { sender, uri, host: format!("{host}:{port}"), key: key.to_string() })
    }

    /// Publishes `data` (raw JSON) to `channel`; an HTTP error status or an
    /// `error` member in the reply is an error.
    pub async fn publish(&mut self, channel: &str, data: &str) -> anyhow::Result<()> {
        self.sender.ready().await.context("API connection closed")?;
        let mut req = Request::post(self.uri.clone())
            .header(hyper::header::HOST, &self.host)
            .header(hyper::header::CONTENT_TYPE, "application/json");
        if !self.key.is_empty() {
            req = req.header("X-API-Key", &self.key);
        }
        let body = Full::new(Bytes::from(crate::wire::api_publish(channel, data)));
        let resp = self.sender.send_request(req.body(body)?).await.context("API request")?;
        let status = resp.status();
        let body = resp.into_body().collect().await.context("API reply body")?.to_bytes();
        if !status.is_success() {
            bail!("HTTP {status}: {}", String::from_utf8_lossy(&body[..body.len().min(200)]));
        }
        let reply: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        if let Some(e) = reply.get("error") {
            bail!("API error {e}");
        }
        Ok(())
    }
}
