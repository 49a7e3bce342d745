//! The HTTP/JSON mirror of the control API: `POST /api/<snake_case_method>` on
//! the public port, same methods, fields and auth as gRPC; `data` is any JSON value.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fanfare_core::{ApiError, ApiPublish, Node};
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

fn reply(status: StatusCode, body: &Value) -> Response<Body> {
    json_response(status, Bytes::from(body.to_string()))
}

fn json_response(status: StatusCode, body: Bytes) -> Response<Body> {
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
        ApiError::InvalidArgument(_) => StatusCode::BAD_REQUEST,
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
fn raw_data(b: &[u8]) -> Box<RawValue> {
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

fn info_json(i: &ClientInfo) -> Value {
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

fn method_name(path: &str) -> Option<&'static str> {
    Some(match path {
        "publish" => "publish",
        "broadcast" => "broadcast",
        "publish_to_user" => "publish_to_user",
        "subscribe" => "subscribe",
        "unsubscribe" => "unsubscribe",
        "disconnect" => "disconnect",
        "presence" => "presence",
        "presence_stats" => "presence_stats",
        "history" => "history",
        "channels" => "channels",
        "info" => "info",
        _ => return None,
    })
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
    let Some(method) = req.uri().path().strip_prefix("/api/").and_then(method_name) else {
        return error(StatusCode::NOT_FOUND, "NOT_FOUND", "no such API method");
    };
    if req.method() != Method::POST {
        return error(StatusCode::METHOD_NOT_ALLOWED, "INVALID_ARGUMENT", "use POST");
    }
    let h = req.headers();
    let authorization = h.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let x_api_key = h.get("x-api-key").and_then(|v| v.to_str().ok());
    if let Err(f) = ctx.authorize(authorization, x_api_key, Some(peer)) {
        let (status, code) = match f {
            AuthFailure::BadKey => (StatusCode::UNAUTHORIZED, "UNAUTHENTICATED"),
            AuthFailure::NotLoopback => (StatusCode::FORBIDDEN, "PERMISSION_DENIED"),
        };
        observe(method, "http", code, start);
        return error(status, code, f.message());
    }
    let collect = Limited::new(req.into_body(), ctx.max_request_size).collect();
    let body = match tokio::time::timeout(body_timeout, collect).await {
        Ok(Ok(b)) => b.to_bytes(),
        Err(_) => {
            observe(method, "http", "DEADLINE_EXCEEDED", start);
            let mut r = error(
                StatusCode::REQUEST_TIMEOUT,
                "DEADLINE_EXCEEDED",
                &format!(
                    "request body not received within {body_timeout:?} (http.body_read_timeout)"
                ),
            );
            // The rest of the body may never come: do not wait for it.
            r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            return r;
        }
        Ok(Err(_)) => {
            observe(method, "http", "RESOURCE_EXHAUSTED", start);
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RESOURCE_EXHAUSTED",
                &format!("request body larger than {} bytes", ctx.max_request_size),
            );
        }
    };
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) { b"{}" } else { &body };
    let result = call(method, body, node, ctx).await;
    let code = match &result {
        Ok(_) => "OK",
        Err(Fail::Body(_)) => "INVALID_ARGUMENT",
        Err(Fail::Api(e)) => code_name(e),
    };
    observe(method, "http", code, start);
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

async fn call(method: &str, body: &[u8], node: &Node, ctx: &ApiContext) -> Result<Out, Fail> {
    let limits = &ctx.limits;
    Ok(Out::Value(match method {
        "publish" | "broadcast" | "publish_to_user" => {
            let b: PublishBody<'_> = parse(body)?;
            let p = b.publish();
            match method {
                "publish" => position_json(&node.api_publish(&b.channel, &p, limits).await?),
                "publish_to_user" => {
                    position_json(&node.api_publish_to_user(&b.user, &p, limits).await?)
                }
                _ => {
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
            }
        }
        _ => {
            let t: TargetBody = parse(body)?;
            match method {
                "subscribe" => {
                    node.api_subscribe(&t.user, &t.client, &t.channel).await?;
                    json!({})
                }
                "unsubscribe" => {
                    node.api_unsubscribe(&t.user, &t.client, &t.channel).await?;
                    json!({})
                }
                "disconnect" => {
                    node.api_disconnect(&t.user, &t.client, t.code, &t.reason).await?;
                    json!({})
                }
                "presence" => {
                    let m = node.api_presence(&t.channel).await?;
                    let clients: serde_json::Map<String, Value> =
                        m.iter().map(|(k, v)| (k.clone(), info_json(v))).collect();
                    json!({ "clients": clients })
                }
                "presence_stats" => {
                    let (c, u) = node.api_presence_stats(&t.channel).await?;
                    json!({"num_clients": c, "num_users": u})
                }
                "history" => {
                    let since = (!t.epoch.is_empty())
                        .then(|| StreamPosition { offset: t.since_offset, epoch: t.epoch.clone() });
                    let page = node.api_history(&t.channel, t.limit, since, t.reverse).await?;
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
                    return Ok(Out::Raw(
                        serde_json::to_vec(&out).expect("history serializes").into(),
                    ));
                }
                "channels" => {
                    let m = node.api_channels(&t.pattern, limits).await?;
                    let channels: serde_json::Map<String, Value> =
                        m.into_iter().map(|(c, n)| (c, json!({"num_clients": n}))).collect();
                    json!({ "channels": channels })
                }
                _ => {
                    let nodes = node.api_info().await?;
                    json!({ "nodes": nodes.iter().map(|n| json!({
                        "uid": n.uid, "name": n.name, "version": n.version,
                        "num_clients": n.num_clients, "num_subscriptions": n.num_subscriptions,
                        "num_channels": n.num_channels, "uptime_secs": n.uptime_secs,
                    })).collect::<Vec<_>>() })
                }
            }
        }
    }))
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
