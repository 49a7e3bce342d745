//! The backends of `[[proxies]]`: how a proxy call travels to the
//! application backend, as a JSON POST ([`http`]) or a gRPC call ([`grpc`]).
//! What the calls mean, their deadlines and metrics are
//! `fanfare_core::proxy`'s.

mod grpc;
mod http;

use std::sync::Arc;

use fanfare_core::proxy::{CallContext, Proxies, Proxy, ProxyBackend};

use crate::config::Settings;

/// Where a proxy sends its calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// Each call is a POST of JSON to this URL.
    Http(::http::Uri),
    /// `centrifugal.centrifugo.proxy.CentrifugoProxy` at this `host:port`.
    Grpc(String),
}

impl Endpoint {
    pub fn parse(s: &str) -> Result<Endpoint, String> {
        if let Some(addr) = s.strip_prefix("grpc://") {
            let addr = addr.trim_end_matches('/');
            let ok = addr.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && !addr.contains('/') && port.parse::<u16>().is_ok()
            });
            if !ok {
                return Err(format!("{s:?} must look like grpc://host:port"));
            }
            return Ok(Endpoint::Grpc(addr.to_string()));
        }
        let uri: ::http::Uri = s.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
        match (uri.scheme_str(), uri.host()) {
            (Some("http" | "https"), Some(_)) => Ok(Endpoint::Http(uri)),
            _ => Err(format!("{s:?} must start with http://, https:// or grpc://")),
        }
    }
}

/// The client headers of `ctx` this proxy forwards (its `http_headers`,
/// lowercased).
fn forwarded<'a>(
    allow: &'a [String],
    ctx: &'a CallContext,
) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
    ctx.headers
        .iter()
        .flat_map(|h| h.0.iter())
        .filter(|(name, _)| allow.iter().any(|a| a == name))
        .map(|(n, v)| (n.as_str(), v.as_str()))
}

/// Builds every `[[proxies]]` entry and names the client proxies. The HTTP
/// ones share one pooled keep-alive client. Must run inside the runtime
/// (gRPC channels start their connection task lazily there).
pub fn build(settings: &Settings) -> anyhow::Result<Proxies> {
    let client = Arc::new(crate::outbound::client(None));
    let mut proxies = Vec::new();
    let mut header_names = Vec::new();
    for p in &settings.proxies {
        let allow: Vec<String> = p.http_headers.iter().map(|h| h.to_ascii_lowercase()).collect();
        header_names.extend(allow.iter().cloned());
        let statics: Vec<(String, String)> =
            p.static_headers.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.clone())).collect();
        let endpoint = Endpoint::parse(&p.endpoint).map_err(anyhow::Error::msg)?;
        let backend: Box<dyn ProxyBackend> = match endpoint {
            Endpoint::Http(uri) => {
                Box::new(http::HttpBackend::new(client.clone(), uri, allow, &statics)?)
            }
            Endpoint::Grpc(addr) => Box::new(grpc::GrpcBackend::new(&addr, allow, &statics)?),
        };
        proxies.push(Proxy::new(&p.name, p.timeout, backend));
    }
    let c = &settings.client;
    Ok(Proxies::new(proxies, header_names).with_client_proxies(
        &c.connect_proxy,
        &c.refresh_proxy,
        &c.rpc_proxy,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_http_https_or_grpc_host_port() {
        assert!(matches!(Endpoint::parse("http://127.0.0.1:3000/connect"), Ok(Endpoint::Http(_))));
        assert!(matches!(Endpoint::parse("https://backend/x"), Ok(Endpoint::Http(_))));
        assert_eq!(
            Endpoint::parse("grpc://127.0.0.1:9000"),
            Ok(Endpoint::Grpc("127.0.0.1:9000".into()))
        );
        for bad in ["ftp://x/y", "grpc://nohost", "grpc://h:port", "127.0.0.1:3000", "grpc://h:1/x"]
        {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }
}
