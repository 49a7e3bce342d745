//! The HTTP/JSON mirror of the control API: `POST /api/<snake_case_method>` on
//! the public port, same methods, fields and auth as gRPC; `data` is any JSON value.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fanfare_core::{ApiError, ApiPublish, HistoryPage, Node};
use fanfare_protocol::{ClientInfo, StreamPosition};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::api::{ApiContext, AuthFailure, code_name, observe};
use crate::http::Body;
use crate::methods::{Api, Method as ApiMethod};

fn reply(status: StatusCode, body: &Value) -> Response<Body> {
    json_response(status, Bytes::from(body.to_string()))
}

pub(crate) fn json_response(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    reply(status, &json!({"error": {"code": code, "message": message}}))
}

fn api_error(e: &ApiError) -> Response<Body> {
    let status = match e {
        ApiError::InvalidArgument(_)
        | ApiError::UnknownNamespace(_)
        | ApiError::UnrecoverablePosition(_) => StatusCode::BAD_REQUEST,
        ApiError::NotFound(_) => StatusCode::NOT_FOUND,
        ApiError::ResourceExhausted(_) => StatusCode::TOO_MANY_REQUESTS,
        ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    error(status, code_name(e), &e.to_string())
}

/// Raw JSON bytes as a JSON value (they were validated when they came in).
/// Only for small values from tokens (connection and channel info); data goes
/// through [`raw_data`].
fn raw_json(b: &[u8]) -> Value {
    serde_json::from_slice(b).unwrap_or(Value::Null)
}

/// Publication data embedded verbatim. Not parsed into a `Value`: that stops
/// at 128 levels of nesting and turned deeper data into `null`. Bytes that are
/// not JSON (written by an older version) become a JSON string of their text
/// rather than breaking the reply.
pub(crate) fn raw_data(b: &[u8]) -> Box<RawValue> {
    let text = String::from_utf8_lossy(b);
    RawValue::from_string(text.to_string()).unwrap_or_else(|_| {
        let quoted = serde_json::to_string(&text).expect("a string serializes");
        RawValue::from_string(quoted).expect("a JSON string is JSON")
    })
}

#[derive(serde::Serialize)]
struct HistoryOut<'a> {
    publications: Vec<PublicationOut<'a>>,
    offset: u64,
    epoch: &'a str,
}

#[derive(serde::Serialize)]
struct PublicationOut<'a> {
    data: Box<RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    info: Option<Value>,
    offset: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    tags: Option<&'a BTreeMap<String, String>>,
}

pub(crate) fn info_json(i: &ClientInfo) -> Value {
    let mut o = serde_json::Map::new();
    o.insert("user".into(), Value::from(i.user.as_ref()));
    o.insert("client".into(), Value::from(i.client.as_ref()));
    if !i.conn_info.is_empty() {
        o.insert("conn_info".into(), raw_json(&i.conn_info));
    }
    if !i.chan_info.is_empty() {
        o.insert("chan_info".into(), raw_json(&i.chan_info));
    }
    Value::Object(o)
}

fn position_json(p: &StreamPosition) -> Value {
    json!({"offset": p.offset, "epoch": p.epoch})
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody<'a> {
    #[serde(default)]
    channel: String,
    #[serde(default)]
    channels: Vec<String>,
    #[serde(default)]
    user: String,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    idempotency_key: String,
    #[serde(default)]
    tags: BTreeMap<String, String>,
    #[serde(default)]
    skip_history: bool,
}

impl PublishBody<'_> {
    fn publish(&self) -> ApiPublish {
        ApiPublish {
            data: self.data.map(|d| Bytes::copy_from_slice(d.get().as_bytes())).unwrap_or_default(),
            idempotency_key: self.idempotency_key.clone(),
            tags: self.tags.clone(),
            skip_history: self.skip_history,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct TargetBody {
    user: String,
    client: String,
    channel: String,
    code: u32,
    reason: String,
    limit: i32,
    since_offset: u64,
    epoch: String,
    reverse: bool,
    pattern: String,
}

/// Why a request was refused before its body could be run.
pub(crate) enum Refused {
    NotPost,
    Auth(AuthFailure),
    /// The body did not arrive within `http.body_read_timeout`.
    Timeout(Duration),
    /// The body is larger than `api.max_request_size`.
    TooLarge(usize),
}

/// What both HTTP APIs check before running a call: POST, the API key, and
/// the body within its size and time limits. Returns the body (`{}` when it
/// is empty).
pub(crate) async fn read_call(
    req: Request<Incoming>,
    ctx: &ApiContext,
    peer: SocketAddr,
    body_timeout: Duration,
) -> Result<Bytes, Refused> {
    if req.method() != Method::POST {
        return Err(Refused::NotPost);
    }
    let h = req.headers();
    let authorization = h.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let x_api_key = h.get("x-api-key").and_then(|v| v.to_str().ok());
    ctx.authorize(authorization, x_api_key, Some(peer)).map_err(Refused::Auth)?;
    let collect = Limited::new(req.into_body(), ctx.max_request_size).collect();
    match tokio::time::timeout(body_timeout, collect).await {
        Ok(Ok(b)) => {
            let body = b.to_bytes();
            Ok(if body.iter().all(u8::is_ascii_whitespace) {
                Bytes::from_static(b"{}")
            } else {
                body
            })
        }
        Err(_) => Err(Refused::Timeout(body_timeout)),
        Ok(Err(_)) => Err(Refused::TooLarge(ctx.max_request_size)),
    }
}

impl Refused {
    /// The HTTP status, and the message telling the caller what to change.
    pub(crate) fn status_and_message(&self) -> (StatusCode, String) {
        match self {
            Refused::NotPost => (StatusCode::METHOD_NOT_ALLOWED, "use POST".into()),
            Refused::Auth(f @ (AuthFailure::BadKey | AuthFailure::BadToken)) => {
                (StatusCode::UNAUTHORIZED, f.message().into())
            }
            Refused::Auth(f @ AuthFailure::NotLoopback) => {
                (StatusCode::FORBIDDEN, f.message().into())
            }
            Refused::Timeout(t) => (
                StatusCode::REQUEST_TIMEOUT,
                format!("request body not received within {t:?} (http.body_read_timeout)"),
            ),
            Refused::TooLarge(max) => {
                (StatusCode::PAYLOAD_TOO_LARGE, format!("request body larger than {max} bytes"))
            }
        }
    }

    /// A refusal as an answer: the rest of a body that timed out may never
    /// come, so that connection is not kept.
    pub(crate) fn response(&self, body: &Value) -> Response<Body> {
        let (status, _) = self.status_and_message();
        let mut r = reply(status, body);
        if matches!(self, Refused::Timeout(_)) {
            r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }
}

/// Handles `/api/<method>`.
pub async fn handle(
    req: Request<Incoming>,
    node: &Node,
    ctx: &ApiContext,
    peer: SocketAddr,
    body_timeout: Duration,
) -> Response<Body> {
    let start = Instant::now();
    let name = req.uri().path().strip_prefix("/api/").unwrap_or_default();
    let Some(method) = ApiMethod::from_snake(Api::Control, name) else {
        return error(StatusCode::NOT_FOUND, "NOT_FOUND", "no such API method");
    };
    let body = match read_call(req, ctx, peer, body_timeout).await {
        Ok(body) => body,
        Err(refused) => {
            let code = match &refused {
                Refused::NotPost => "INVALID_ARGUMENT",
                Refused::Auth(AuthFailure::BadKey | AuthFailure::BadToken) => "UNAUTHENTICATED",
                Refused::Auth(AuthFailure::NotLoopback) => "PERMISSION_DENIED",
                Refused::Timeout(_) => "DEADLINE_EXCEEDED",
                Refused::TooLarge(_) => "RESOURCE_EXHAUSTED",
            };
            if !matches!(refused, Refused::NotPost) {
                observe(method.snake(), "http", code, start);
            }
            let (_, message) = refused.status_and_message();
            return refused.response(&json!({"error": {"code": code, "message": message}}));
        }
    };
    let result = call(method, &body, node, ctx).await;
    let code = match &result {
        Ok(_) => "OK",
        Err(Fail::Body(_)) => "INVALID_ARGUMENT",
        Err(Fail::Api(e)) => code_name(e),
    };
    observe(method.snake(), "http", code, start);
    match result {
        Ok(Out::Value(v)) => reply(StatusCode::OK, &v),
        Ok(Out::Raw(b)) => json_response(StatusCode::OK, b),
        Err(Fail::Body(m)) => error(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", &m),
        Err(Fail::Api(e)) => api_error(&e),
    }
}

enum Fail {
    Body(String),
    Api(ApiError),
}

impl From<ApiError> for Fail {
    fn from(e: ApiError) -> Self {
        Fail::Api(e)
    }
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Fail> {
    serde_json::from_slice(body).map_err(|e| Fail::Body(format!("body: {e}")))
}

/// A reply body: a `Value`, or JSON already serialized (where a `Value`
/// cannot hold the data, see [`raw_data`]).
enum Out {
    Value(Value),
    Raw(Bytes),
}

async fn call(method: ApiMethod, body: &[u8], node: &Node, ctx: &ApiContext) -> Result<Out, Fail> {
    let limits = &ctx.limits;
    let publish = |body| -> Result<(PublishBody<'_>, ApiPublish), Fail> {
        let b: PublishBody<'_> = parse(body)?;
        let p = b.publish();
        Ok((b, p))
    };
    Ok(Out::Value(match method {
        ApiMethod::Publish => {
            let (b, p) = publish(body)?;
            position_json(&node.api_publish(&b.channel, &p, limits).await?)
        }
        ApiMethod::PublishToUser => {
            let (b, p) = publish(body)?;
            position_json(&node.api_publish_to_user(&b.user, &p, limits).await?)
        }
        ApiMethod::Broadcast => {
            let (b, p) = publish(body)?;
            let results = node.api_broadcast(&b.channels, &p, limits).await?;
            let results: Vec<Value> = b
                .channels
                .iter()
                .zip(results)
                .map(|(c, r)| match r {
                    Ok(pos) => json!({"channel": c, "offset": pos.offset, "epoch": pos.epoch}),
                    Err(e) => json!({"channel": c, "error": {"code": code_name(&e), "message": e.to_string()}}),
                })
                .collect();
            json!({ "results": results })
        }
        ApiMethod::Subscribe => {
            let t: TargetBody = parse(body)?;
            node.api_subscribe(&t.user, &t.client, &t.channel).await?;
            json!({})
        }
        ApiMethod::Unsubscribe => {
            let t: TargetBody = parse(body)?;
            node.api_unsubscribe(&t.user, &t.client, &t.channel).await?;
            json!({})
        }
        ApiMethod::Disconnect => {
            let t: TargetBody = parse(body)?;
            node.api_disconnect(&t.user, &t.client, t.code, &t.reason).await?;
            json!({})
        }
        ApiMethod::Presence => {
            let t: TargetBody = parse(body)?;
            let m = node.api_presence(&t.channel).await?;
            let clients: serde_json::Map<String, Value> =
                m.iter().map(|(k, v)| (k.clone(), info_json(v))).collect();
            json!({ "clients": clients })
        }
        ApiMethod::PresenceStats => {
            let t: TargetBody = parse(body)?;
            let (c, u) = node.api_presence_stats(&t.channel).await?;
            json!({"num_clients": c, "num_users": u})
        }
        ApiMethod::History => {
            let t: TargetBody = parse(body)?;
            let since = (!t.epoch.is_empty())
                .then(|| StreamPosition { offset: t.since_offset, epoch: t.epoch.clone() });
            let page = node.api_history(&t.channel, t.limit, since, t.reverse).await?;
            return Ok(Out::Raw(history_json(&page).into()));
        }
        ApiMethod::Channels => {
            let t: TargetBody = parse(body)?;
            let m = node.api_channels(&t.pattern, limits).await?;
            let channels: serde_json::Map<String, Value> =
                m.into_iter().map(|(c, n)| (c, json!({"num_clients": n}))).collect();
            json!({ "channels": channels })
        }
        ApiMethod::Info => {
            parse::<TargetBody>(body)?;
            let nodes = node.api_info().await?;
            json!({ "nodes": nodes.iter().map(|n| json!({
                "uid": n.uid, "name": n.name, "version": n.version,
                "num_clients": n.num_clients, "num_subscriptions": n.num_subscriptions,
                "num_channels": n.num_channels, "uptime_secs": n.uptime_secs,
            })).collect::<Vec<_>>() })
        }
        // Only the Centrifugo-compatible API has these (`crate::centrifugo`);
        // `from_snake(Api::Control, ..)` never returns them.
        ApiMethod::Refresh | ApiMethod::HistoryRemove | ApiMethod::Rpc | ApiMethod::Batch => {
            return Err(Fail::Body(format!("{}: not a method of /api", method.snake())));
        }
    }))
}

/// A history page as JSON (both HTTP APIs): publication data embedded
/// verbatim (see [`raw_data`]).
pub(crate) fn history_json(page: &HistoryPage) -> Vec<u8> {
    let out = HistoryOut {
        publications: page
            .publications
            .iter()
            .map(|p| PublicationOut {
                data: raw_data(&p.data),
                info: p.info.as_deref().map(info_json),
                offset: p.offset,
                tags: p.tags.as_deref(),
            })
            .collect(),
        offset: page.position.offset,
        epoch: &page.position.epoch,
    };
    serde_json::to_vec(&out).expect("history serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_data_is_embedded_verbatim_at_any_depth() {
        // A Value stops at 128 levels: this used to come back as `null`.
        let deep = format!("{}1{}", "[".repeat(1000), "]".repeat(1000));
        let out =
            PublicationOut { data: raw_data(deep.as_bytes()), info: None, offset: 7, tags: None };
        let json = serde_json::to_string(&out).unwrap();
        assert_eq!(json, format!(r#"{{"data":{deep},"offset":7}}"#));
    }

    #[test]
    fn stored_bytes_that_are_not_json_become_a_string_not_a_broken_reply() {
        assert_eq!(raw_data(b"{\"a\":").get(), r#""{\"a\":""#);
        assert_eq!(raw_data(b"\xff1").get(), "\"\u{fffd}1\"");
    }
}
