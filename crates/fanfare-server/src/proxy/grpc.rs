//! Proxy calls over gRPC: `centrifugal.centrifugo.proxy.CentrifugoProxy` on
//! one lazily connected tonic channel per proxy (HTTP/2: calls of all
//! connections share it). Forwarded headers travel as metadata.

use bytes::Bytes;
use fanfare_core::proxy::{
    CallContext, ConnectAnswer, ProxyAnswer, ProxyBackend, ProxyFailure, ProxyFuture, ProxyRequest,
    ProxyResult, PublishAnswer, RefreshAnswer, SubOptions, SubscribeAnswer,
};
use fanfare_server::proxy_pb as pb;
use pb::centrifugo_proxy_client::CentrifugoProxyClient;
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue};
use tonic::transport::Channel;

pub struct GrpcBackend {
    client: CentrifugoProxyClient<Channel>,
    allow: Vec<String>,
    statics: Vec<(AsciiMetadataKey, AsciiMetadataValue)>,
}

impl GrpcBackend {
    /// Connects when the first call is made (and again after failures).
    pub fn new(
        addr: &str,
        allow: Vec<String>,
        statics: &[(String, String)],
    ) -> anyhow::Result<Self> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect_lazy();
        let statics = statics
            .iter()
            .map(|(k, v)| Ok((k.parse()?, v.parse()?)))
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { client: CentrifugoProxyClient::new(channel), allow, statics })
    }

    fn request<T>(&self, ctx: &CallContext, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        let md = req.metadata_mut();
        for (name, value) in super::forwarded(&self.allow, ctx) {
            if let (Ok(k), Ok(v)) = (name.parse::<AsciiMetadataKey>(), value.parse()) {
                md.append(k, v);
            }
        }
        for (k, v) in &self.statics {
            md.insert(k.clone(), v.clone());
        }
        req
    }
}

/// The error or disconnect a response carries instead of a result.
fn refusal(error: Option<pb::Error>, disconnect: Option<pb::Disconnect>) -> Option<ProxyAnswer> {
    if let Some(d) = disconnect {
        let code = u16::try_from(d.code).unwrap_or(0);
        return Some(ProxyAnswer::Disconnect { code, reason: d.reason });
    }
    error.map(|e| ProxyAnswer::Error { code: e.code, message: e.message, temporary: e.temporary })
}

/// A response's result, or what it carries instead.
macro_rules! result_of {
    ($r:expr) => {{
        let r = $r;
        if let Some(a) = refusal(r.error, r.disconnect) {
            return Ok(a);
        }
        match r.result {
            Some(x) => x,
            None => {
                return Err(ProxyFailure::BadAnswer("no result, error or disconnect".into()));
            }
        }
    }};
}

/// Bytes given either raw or base64 (`b64` fields).
fn either(raw: Bytes, b64: &str, what: &str) -> Result<Bytes, ProxyFailure> {
    if !raw.is_empty() || b64.is_empty() {
        return Ok(raw);
    }
    data_encoding::BASE64
        .decode(b64.as_bytes())
        .map(Bytes::from)
        .map_err(|e| ProxyFailure::BadAnswer(format!("b64{what}: {e}")))
}

fn status(s: tonic::Status) -> ProxyFailure {
    ProxyFailure::Unavailable(format!("gRPC {:?}: {}", s.code(), s.message()))
}

/// Fields every request has: client, transport, protocol, encoding. As the
/// HTTP proxy says it: encoding `binary` only for data that is not JSON.
fn common(ctx: &CallContext, data: &[u8]) -> (String, String, String, String) {
    let binary = ctx.protocol != "json" && !data.is_empty() && !fanfare_protocol::is_json(data);
    let encoding = if binary { "binary" } else { "json" };
    (ctx.client.to_string(), ctx.transport.to_string(), ctx.protocol.to_string(), encoding.into())
}

impl ProxyBackend for GrpcBackend {
    fn call(&self, ctx: &CallContext, request: &ProxyRequest) -> ProxyFuture {
        let mut client = self.client.clone();
        let user = ctx.user.to_string();
        let meta = ctx.meta.clone();
        match request {
            ProxyRequest::Connect { data, name, version } => {
                let (client_id, transport, protocol, encoding) = common(ctx, data);
                let req = self.request(
                    ctx,
                    pb::ConnectRequest {
                        client: client_id,
                        transport,
                        protocol,
                        encoding,
                        data: data.clone(),
                        name: name.clone(),
                        version: version.clone(),
                        ..Default::default()
                    },
                );
                Box::pin(async move {
                    let c = result_of!(client.connect(req).await.map_err(status)?.into_inner());
                    let mut subs: Vec<(String, SubOptions)> = Vec::new();
                    for (channel, o) in c.subs {
                        let opts = SubOptions {
                            expire_at: o.expire_at,
                            info: either(o.info, &o.b64info, "info")?,
                            data: either(o.data, &o.b64data, "data")?,
                        };
                        subs.push((channel, opts));
                    }
                    subs.sort_by(|a, b| a.0.cmp(&b.0));
                    Ok(ProxyAnswer::Result(ProxyResult::Connect(ConnectAnswer {
                        user: c.user,
                        expire_at: c.expire_at,
                        info: either(c.info, &c.b64info, "info")?,
                        data: either(c.data, &c.b64data, "data")?,
                        channels: c.channels,
                        subs,
                        meta: c.meta,
                    })))
                })
            }
            ProxyRequest::Refresh => {
                let (client_id, transport, protocol, encoding) = common(ctx, &[]);
                let req = self.request(
                    ctx,
                    pb::RefreshRequest {
                        client: client_id,
                        transport,
                        protocol,
                        encoding,
                        user,
                        meta,
                    },
                );
                Box::pin(async move {
                    let r = result_of!(client.refresh(req).await.map_err(status)?.into_inner());
                    let info = either(r.info, &r.b64info, "info")?;
                    let (expired, expire_at) = (r.expired, r.expire_at);
                    Ok(ProxyAnswer::Result(ProxyResult::Refresh(RefreshAnswer {
                        expired,
                        expire_at,
                        info,
                    })))
                })
            }
            ProxyRequest::SubRefresh { channel } => {
                let (client_id, transport, protocol, encoding) = common(ctx, &[]);
                let req = self.request(
                    ctx,
                    pb::SubRefreshRequest {
                        client: client_id,
                        transport,
                        protocol,
                        encoding,
                        user,
                        channel: channel.clone(),
                        meta,
                    },
                );
                Box::pin(async move {
                    let r = result_of!(client.sub_refresh(req).await.map_err(status)?.into_inner());
                    let info = either(r.info, &r.b64info, "info")?;
                    let (expired, expire_at) = (r.expired, r.expire_at);
                    Ok(ProxyAnswer::Result(ProxyResult::Refresh(RefreshAnswer {
                        expired,
                        expire_at,
                        info,
                    })))
                })
            }
            ProxyRequest::Subscribe { channel, data } => {
                let (client_id, transport, protocol, encoding) = common(ctx, data);
                let req = self.request(
                    ctx,
                    pb::SubscribeRequest {
                        client: client_id,
                        transport,
                        protocol,
                        encoding,
                        user,
                        channel: channel.clone(),
                        meta,
                        data: data.clone(),
                        ..Default::default()
                    },
                );
                Box::pin(async move {
                    let s = result_of!(client.subscribe(req).await.map_err(status)?.into_inner());
                    let o = s.r#override.unwrap_or_default();
                    Ok(ProxyAnswer::Result(ProxyResult::Subscribe(SubscribeAnswer {
                        expire_at: s.expire_at,
                        info: either(s.info, &s.b64info, "info")?,
                        data: either(s.data, &s.b64data, "data")?,
                        presence: o.presence.map(|b| b.value),
                        join_leave: o.join_leave.map(|b| b.value),
                        force_recovery: o.force_recovery.map(|b| b.value),
                        force_positioning: o.force_positioning.map(|b| b.value),
                    })))
                })
            }
            ProxyRequest::Publish { channel, data } => {
                let (client_id, transport, protocol, encoding) = common(ctx, data);
                let req = self.request(
                    ctx,
                    pb::PublishRequest {
                        client: client_id,
                        transport,
                        protocol,
                        encoding,
                        user,
                        channel: channel.clone(),
                        data: data.clone(),
                        meta,
                        ..Default::default()
                    },
                );
                Box::pin(async move {
                    let p = result_of!(client.publish(req).await.map_err(status)?.into_inner());
                    let data = either(p.data, &p.b64data, "data")?;
                    Ok(ProxyAnswer::Result(ProxyResult::Publish(PublishAnswer {
                        data: (!data.is_empty()).then_some(data),
                        skip_history: p.skip_history,
                        idempotency_key: p.idempotency_key,
                        tags: p.tags.into_iter().collect(),
                    })))
                })
            }
            ProxyRequest::Rpc { method, data } => {
                let (client_id, transport, protocol, encoding) = common(ctx, data);
                let req = self.request(
                    ctx,
                    pb::RpcRequest {
                        client: client_id,
                        transport,
                        protocol,
                        encoding,
                        user,
                        method: method.clone(),
                        data: data.clone(),
                        meta,
                        ..Default::default()
                    },
                );
                Box::pin(async move {
                    let p = result_of!(client.rpc(req).await.map_err(status)?.into_inner());
                    Ok(ProxyAnswer::Result(ProxyResult::Rpc(either(p.data, &p.b64data, "data")?)))
                })
            }
        }
    }
}
