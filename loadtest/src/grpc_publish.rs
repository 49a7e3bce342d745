//! Publishing through fanfare's gRPC control API (`fanfare.v1.ControlService/
//! Publish`), with `authorization: apikey <key>` when a key is given.

use anyhow::{Context, bail};
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

pub mod pb {
    tonic::include_proto!("fanfare.v1");
}

/// One HTTP/2 connection to the control API; one call at a time.
pub struct GrpcClient {
    client: pb::control_service_client::ControlServiceClient<Channel>,
    auth: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl GrpcClient {
    pub async fn connect(url: &str, key: &str) -> anyhow::Result<GrpcClient> {
        if !url.starts_with("http://") {
            bail!("--grpc-url {url}: only http:// is supported");
        }
        let channel = Endpoint::from_shared(url.to_string())
            .with_context(|| format!("--grpc-url {url:?}"))?
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("connecting to {url}"))?;
        let auth = if key.is_empty() {
            None
        } else {
            Some(format!("apikey {key}").parse().context("--api-key is not valid ASCII")?)
        };
        Ok(GrpcClient {
            client: pb::control_service_client::ControlServiceClient::new(channel),
            auth,
        })
    }

    /// Publishes `data` (raw JSON) to `channel`; a non-OK status is an error.
    pub async fn publish(&mut self, channel: &str, data: &str) -> anyhow::Result<()> {
        let mut req = tonic::Request::new(pb::PublishRequest {
            channel: channel.to_string(),
            data: data.as_bytes().to_vec(),
            ..Default::default()
        });
        if let Some(a) = &self.auth {
            req.metadata_mut().insert("authorization", a.clone());
        }
        match self.client.publish(req).await {
            Ok(_) => Ok(()),
            Err(s) => bail!("gRPC {:?}: {}", s.code(), s.message()),
        }
    }
}
