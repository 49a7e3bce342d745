//! Proxy calls as JSON POSTs, in the shapes Centrifugo's HTTP proxy sends and
//! reads, on the node's pooled outbound client (`crate::outbound`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use data_encoding::BASE64;
use fanfare_core::proxy::{
    CallContext, ConnectAnswer, ProxyAnswer, ProxyBackend, ProxyFailure, ProxyFuture, ProxyKind,
    ProxyRequest, ProxyResult, PublishAnswer, RefreshAnswer, SubOptions, SubscribeAnswer,
};
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

pub use crate::outbound::HttpClient;

/// Largest answer read from a backend; a larger one is a failure.
const MAX_ANSWER: usize = 4 << 20;

pub struct HttpBackend {
    client: Arc<HttpClient>,
    uri: hyper::Uri,
    allow: Vec<String>,
    statics: Vec<(HeaderName, HeaderValue)>,
}

impl HttpBackend {
    pub fn new(
        client: Arc<HttpClient>,
        uri: hyper::Uri,
        allow: Vec<String>,
        statics: &[(String, String)],
    ) -> anyhow::Result<Self> {
        let statics = statics
            .iter()
            .map(|(k, v)| Ok((HeaderName::from_bytes(k.as_bytes())?, HeaderValue::from_str(v)?)))
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { client, uri, allow, statics })
    }
}

impl ProxyBackend for HttpBackend {
    fn call(&self, ctx: &CallContext, request: &ProxyRequest) -> ProxyFuture {
        let kind = request.kind();
        let body = match request_body(ctx, request) {
            Ok(b) => b,
            Err(e) => return Box::pin(async move { Err(e) }),
        };
        let mut req = hyper::Request::post(self.uri.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(Full::new(body))
            .expect("a POST to a parsed URI is a valid request");
        let headers = req.headers_mut();
        for (name, value) in super::forwarded(&self.allow, ctx) {
            if let (Ok(n), Ok(v)) =
                (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value))
            {
                headers.append(n, v);
            }
        }
        for (name, value) in &self.statics {
            headers.insert(name.clone(), value.clone());
        }
        let sent = self.client.request(req);
        Box::pin(async move {
            let resp = sent
                .await
                .map_err(|e| ProxyFailure::Unavailable(crate::outbound::error_chain(&e)))?;
            if resp.status() != hyper::StatusCode::OK {
                return Err(ProxyFailure::Unavailable(format!("HTTP status {}", resp.status())));
            }
            let body = Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| ProxyFailure::Unavailable(format!("reading the answer: {e}")))?
                .to_bytes();
            parse_answer(kind, &body)
        })
    }
}

#[derive(Serialize, Default)]
struct RequestJson<'a> {
    client: &'a str,
    transport: &'a str,
    protocol: &'a str,
    encoding: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    method: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    b64data: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    meta: Option<&'a RawValue>,
}

/// The JSON body of a call. Data that is JSON goes as `data` (a JSON
/// client's always is); a Protobuf client's binary data as `b64data`, with
/// `encoding: "binary"`.
fn request_body(ctx: &CallContext, request: &ProxyRequest) -> Result<Bytes, ProxyFailure> {
    let mut r = RequestJson {
        client: &ctx.client,
        transport: ctx.transport,
        protocol: ctx.protocol,
        encoding: "json",
        ..Default::default()
    };
    if !matches!(request, ProxyRequest::Connect { .. }) {
        r.user = Some(&ctx.user);
    }
    // Meta came from a backend answer, checked as JSON then.
    r.meta = (!ctx.meta.is_empty()).then(|| raw(&ctx.meta)).flatten();
    let data = match request {
        ProxyRequest::Connect { data, name, version } => {
            r.name = (!name.is_empty()).then_some(name.as_str());
            r.version = (!version.is_empty()).then_some(version.as_str());
            data
        }
        ProxyRequest::Subscribe { channel, data } | ProxyRequest::Publish { channel, data } => {
            r.channel = Some(channel);
            data
        }
        ProxyRequest::Rpc { method, data } => {
            r.method = Some(method);
            data
        }
        ProxyRequest::SubRefresh { channel } => {
            r.channel = Some(channel);
            &Bytes::new()
        }
        ProxyRequest::Refresh => &Bytes::new(),
    };
    if !data.is_empty() {
        match raw(data) {
            Some(v) => r.data = Some(v),
            None => {
                r.encoding = "binary";
                r.b64data = Some(BASE64.encode(data));
            }
        }
    }
    Ok(Bytes::from(serde_json::to_vec(&r).expect("the request serializes")))
}

/// `b` as a JSON value, if it is one.
fn raw(b: &[u8]) -> Option<&RawValue> {
    serde_json::from_slice(b).ok()
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow, default)]
    result: Option<&'a RawValue>,
    #[serde(default)]
    error: Option<ErrorJson>,
    #[serde(default)]
    disconnect: Option<DisconnectJson>,
}

#[derive(Deserialize)]
struct ErrorJson {
    code: u32,
    #[serde(default)]
    message: String,
    #[serde(default)]
    temporary: bool,
}

#[derive(Deserialize)]
struct DisconnectJson {
    code: u32,
    #[serde(default)]
    reason: String,
}

/// An RPC result: `data` as JSON or base64 (`b64data`).
#[derive(Deserialize, Default)]
#[serde(default)]
struct RpcJson<'a> {
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    b64data: String,
}

/// `info` / `data` given as JSON, or else base64 (`b64info` / `b64data`).
fn either(json: Option<&RawValue>, b64: &str, what: &str) -> Result<Bytes, ProxyFailure> {
    match json {
        Some(v) if v.get() != "null" => Ok(Bytes::copy_from_slice(v.get().as_bytes())),
        _ if b64.is_empty() => Ok(Bytes::new()),
        _ => BASE64
            .decode(b64.as_bytes())
            .map(Bytes::from)
            .map_err(|e| ProxyFailure::BadAnswer(format!("b64{what}: {e}"))),
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ConnectJson<'a> {
    user: String,
    expire_at: i64,
    #[serde(borrow)]
    info: Option<&'a RawValue>,
    b64info: String,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    b64data: String,
    channels: Vec<String>,
    #[serde(borrow)]
    subs: HashMap<String, SubOptionsJson<'a>>,
    #[serde(borrow)]
    meta: Option<&'a RawValue>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct SubOptionsJson<'a> {
    expire_at: i64,
    #[serde(borrow)]
    info: Option<&'a RawValue>,
    b64info: String,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    b64data: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct SubscribeJson<'a> {
    expire_at: i64,
    #[serde(borrow)]
    info: Option<&'a RawValue>,
    b64info: String,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    b64data: String,
    #[serde(rename = "override")]
    overrides: Overrides,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Overrides {
    presence: Option<BoolValue>,
    join_leave: Option<BoolValue>,
    force_recovery: Option<BoolValue>,
    force_positioning: Option<BoolValue>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct BoolValue {
    value: bool,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct PublishJson<'a> {
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    b64data: String,
    skip_history: bool,
    idempotency_key: String,
    tags: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RefreshJson<'a> {
    expired: bool,
    expire_at: i64,
    #[serde(borrow)]
    info: Option<&'a RawValue>,
    b64info: String,
}

/// Where the answer went wrong, without serde's quote of it (`invalid type:
/// string "..."`): the message is logged, and answers carry tokens and data.
fn bad(e: serde_json::Error) -> ProxyFailure {
    let what = match e.classify() {
        serde_json::error::Category::Data => "a field of an unexpected type or value",
        serde_json::error::Category::Eof => "unexpected end",
        serde_json::error::Category::Syntax | serde_json::error::Category::Io => "not JSON",
    };
    ProxyFailure::BadAnswer(format!("{what} at line {} column {}", e.line(), e.column()))
}

/// Reads a backend's answer to a call of `kind`. Fields the protocol has
/// but fanfare does not use are ignored.
pub(super) fn parse_answer(kind: ProxyKind, body: &[u8]) -> Result<ProxyAnswer, ProxyFailure> {
    let env: Envelope = serde_json::from_slice(body).map_err(bad)?;
    if let Some(d) = env.disconnect {
        let code = u16::try_from(d.code).unwrap_or(0);
        return Ok(ProxyAnswer::Disconnect { code, reason: d.reason });
    }
    if let Some(e) = env.error {
        return Ok(ProxyAnswer::Error { code: e.code, message: e.message, temporary: e.temporary });
    }
    let Some(result) = env.result else {
        return Err(ProxyFailure::BadAnswer("no result, error or disconnect".into()));
    };
    let text = result.get();
    let result = match kind {
        ProxyKind::Connect => {
            let c: ConnectJson = serde_json::from_str(text).map_err(bad)?;
            let mut subs = Vec::with_capacity(c.subs.len());
            for (channel, o) in &c.subs {
                let opts = SubOptions {
                    expire_at: o.expire_at,
                    info: either(o.info, &o.b64info, "info")?,
                    data: either(o.data, &o.b64data, "data")?,
                };
                subs.push((channel.clone(), opts));
            }
            subs.sort_by(|a, b| a.0.cmp(&b.0));
            ProxyResult::Connect(ConnectAnswer {
                info: either(c.info, &c.b64info, "info")?,
                data: either(c.data, &c.b64data, "data")?,
                user: c.user,
                expire_at: c.expire_at,
                channels: c.channels,
                subs,
                meta: either(c.meta, "", "meta")?,
            })
        }
        ProxyKind::Subscribe => {
            let s: SubscribeJson = serde_json::from_str(text).map_err(bad)?;
            ProxyResult::Subscribe(SubscribeAnswer {
                expire_at: s.expire_at,
                info: either(s.info, &s.b64info, "info")?,
                data: either(s.data, &s.b64data, "data")?,
                presence: s.overrides.presence.map(|b| b.value),
                join_leave: s.overrides.join_leave.map(|b| b.value),
                force_recovery: s.overrides.force_recovery.map(|b| b.value),
                force_positioning: s.overrides.force_positioning.map(|b| b.value),
            })
        }
        ProxyKind::Publish => {
            let p: PublishJson = serde_json::from_str(text).map_err(bad)?;
            let data = either(p.data, &p.b64data, "data")?;
            ProxyResult::Publish(PublishAnswer {
                data: (!data.is_empty()).then_some(data),
                skip_history: p.skip_history,
                idempotency_key: p.idempotency_key,
                tags: p.tags,
            })
        }
        ProxyKind::Refresh | ProxyKind::SubRefresh => {
            let r: RefreshJson = serde_json::from_str(text).map_err(bad)?;
            ProxyResult::Refresh(RefreshAnswer {
                expired: r.expired,
                expire_at: r.expire_at,
                info: either(r.info, &r.b64info, "info")?,
            })
        }
        ProxyKind::Rpc => {
            let p: RpcJson = serde_json::from_str(text).map_err(bad)?;
            ProxyResult::Rpc(either(p.data, &p.b64data, "data")?)
        }
    };
    Ok(ProxyAnswer::Result(result))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(protocol: &'static str) -> CallContext {
        CallContext {
            client: "c1".into(),
            transport: "websocket",
            protocol,
            user: "u1".into(),
            meta: Bytes::from_static(br#"{"tenant":7}"#),
            headers: None,
            rules: Default::default(),
        }
    }

    #[test]
    fn requests_carry_json_data_as_json_and_binary_data_as_base64() {
        let req = ProxyRequest::Publish {
            channel: "chat:1".into(),
            data: Bytes::from_static(br#"{"t":"hi"}"#),
        };
        let body: serde_json::Value =
            serde_json::from_slice(&request_body(&ctx("json"), &req).unwrap()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"client": "c1", "transport": "websocket", "protocol": "json",
                "encoding": "json", "user": "u1", "channel": "chat:1", "data": {"t": "hi"},
                "meta": {"tenant": 7}})
        );
        let req = ProxyRequest::Rpc { method: "m".into(), data: Bytes::from_static(b"\x01\x02") };
        let body: serde_json::Value =
            serde_json::from_slice(&request_body(&ctx("protobuf"), &req).unwrap()).unwrap();
        assert_eq!(body["encoding"], "binary");
        assert_eq!(body["b64data"], "AQI=");
        assert_eq!(body["method"], "m");
        let connect =
            ProxyRequest::Connect { data: Bytes::new(), name: "js".into(), version: String::new() };
        let body: serde_json::Value =
            serde_json::from_slice(&request_body(&ctx("json"), &connect).unwrap()).unwrap();
        assert!(body.get("user").is_none() && body.get("data").is_none());
        assert_eq!(body["name"], "js");
    }

    #[test]
    fn answers_are_read_as_centrifugo_backends_write_them() {
        let a = parse_answer(
            ProxyKind::Connect,
            br#"{"result":{"user":"42","expire_at":1700000000,"info":{"n":"Ann"},"channels":["news"],
                "subs":{"room":{"info":{"r":1},"b64data":"AQ=="}},"meta":{"m":1},"caps":[]}}"#,
        )
        .unwrap();
        let ProxyAnswer::Result(ProxyResult::Connect(c)) = a else { panic!("{a:?}") };
        assert_eq!((c.user.as_str(), c.expire_at), ("42", 1700000000));
        assert_eq!(&c.info[..], br#"{"n":"Ann"}"#);
        assert_eq!(c.channels, vec!["news".to_string()]);
        assert_eq!(c.subs[0].0, "room");
        assert_eq!(&c.subs[0].1.data[..], b"\x01");
        assert_eq!(&c.meta[..], br#"{"m":1}"#);

        let e = parse_answer(ProxyKind::Subscribe, br#"{"error":{"code":1000,"message":"no"}}"#);
        assert_eq!(
            e,
            Ok(ProxyAnswer::Error { code: 1000, message: "no".into(), temporary: false })
        );
        let d = parse_answer(ProxyKind::Rpc, br#"{"disconnect":{"code":4501,"reason":"banned"}}"#);
        assert_eq!(d, Ok(ProxyAnswer::Disconnect { code: 4501, reason: "banned".into() }));
        let s = parse_answer(
            ProxyKind::Subscribe,
            br#"{"result":{"override":{"presence":{"value":true}}}}"#,
        );
        let Ok(ProxyAnswer::Result(ProxyResult::Subscribe(s))) = s else { panic!() };
        assert_eq!((s.presence, s.join_leave), (Some(true), None));
        let p = parse_answer(ProxyKind::Publish, br#"{"result":{}}"#);
        assert_eq!(p, Ok(ProxyAnswer::Result(ProxyResult::Publish(PublishAnswer::default()))));
        for bad_body in [&b"{}"[..], b"nope", br#"{"result":{"b64data":"!!"}}"#] {
            assert!(matches!(
                parse_answer(ProxyKind::Rpc, bad_body),
                Err(ProxyFailure::BadAnswer(_))
            ));
        }
    }
}
