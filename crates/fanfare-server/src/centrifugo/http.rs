//! `POST /centrifugo/api/<method>`: Centrifugo's HTTP server API. Success is
//! `200 {"result": {...}}`, an API error `200 {"error": {"code", "message"}}`
//! (as Centrifugo answers), a batch `200 {"replies": [...]}`. What is not an
//! API call gets an HTTP status as in Centrifugo: 401 for a missing or wrong
//! key, 400 for a body that is not JSON, 404 for an unknown method; those
//! carry an `error` body too.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fanfare_core::Node;
use fanfare_protocol::StreamPosition;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::{CompatError, Done, Params, is_pro_snake, observe_call, run, run_batch};
use crate::api::{ApiContext, AuthFailure};
use crate::api_http::{Refused, history_json, info_json, json_response, raw_data, read_call};
use crate::http::Body;
use crate::methods::{Api, Method};

pub const PREFIX: &str = "/centrifugo/api/";
const PROTOCOL: &str = "centrifugo_http";

fn error_json(e: &CompatError) -> Value {
    json!({"error": {"code": e.code, "message": e.message}})
}

fn answer(status: StatusCode, body: String) -> Response<Body> {
    json_response(status, Bytes::from(body))
}

/// Handles `/centrifugo/api/<method>`.
pub async fn handle(
    req: Request<Incoming>,
    node: &Node,
    ctx: &ApiContext,
    peer: SocketAddr,
    body_timeout: Duration,
) -> Response<Body> {
    let start = Instant::now();
    let name = req.uri().path().strip_prefix(PREFIX).unwrap_or_default();
    let (method, pro) = match Method::from_snake(Api::Centrifugo, name) {
        Some(m) => (Some(m), None),
        None => match is_pro_snake(name) {
            Some(p) => (None, Some(p)),
            None => {
                let e = CompatError::method_not_found(name);
                return answer(StatusCode::NOT_FOUND, error_json(&e).to_string());
            }
        },
    };
    let label = method.map_or_else(|| pro.unwrap_or_default(), Method::snake);
    let body = match read_call(req, ctx, peer, body_timeout).await {
        Ok(b) => b,
        Err(refused) => {
            let (_, message) = refused.status_and_message();
            let code = match refused {
                Refused::Auth(
                    AuthFailure::BadKey | AuthFailure::NotLoopback | AuthFailure::BadToken,
                ) => CompatError::UNAUTHORIZED,
                Refused::TooLarge(_) => CompatError::LIMIT_EXCEEDED,
                Refused::NotPost | Refused::Timeout(_) => CompatError::BAD_REQUEST,
            };
            let e = CompatError::new(code, message);
            observe_call(label, PROTOCOL, Err(&e), start);
            return refused.response(&error_json(&e));
        }
    };
    let Some(method) = method else {
        let e = CompatError::pro(label);
        observe_call(label, PROTOCOL, Err(&e), start);
        return answer(StatusCode::OK, error_json(&e).to_string());
    };
    let (status, body, result) = call(method, &body, node, ctx).await;
    observe_call(label, PROTOCOL, result.as_ref().map(|_| ()), start);
    answer(status, body)
}

/// Runs one request body: the HTTP status, the answer, and the outcome for
/// the metrics.
async fn call(
    method: Method,
    body: &[u8],
    node: &Node,
    ctx: &ApiContext,
) -> (StatusCode, String, Result<(), CompatError>) {
    let malformed = |e: serde_json::Error| {
        let e = CompatError::bad_request(format!("body: {e}"));
        (StatusCode::BAD_REQUEST, error_json(&e).to_string(), Err(e))
    };
    if method == Method::Batch {
        let batch: BatchJson<'_> = match serde_json::from_slice(body) {
            Ok(b) => b,
            Err(e) => return malformed(e),
        };
        let commands = batch.commands.into_iter().map(command).collect();
        let replies = run_batch(node, ctx, commands, batch.parallel).await;
        let replies: Vec<String> = replies
            .into_iter()
            .map(|r| match r {
                Ok((m, done)) => format!("{{\"{}\":{}}}", m.snake(), result_json(done)),
                Err(e) => error_json(&e).to_string(),
            })
            .collect();
        return (StatusCode::OK, format!("{{\"replies\":[{}]}}", replies.join(",")), Ok(()));
    }
    let params = match serde_json::from_slice::<ParamsJson<'_>>(body) {
        Ok(p) => p.into(),
        Err(e) => return malformed(e),
    };
    match run(node, ctx, method, params).await {
        Ok(done) => (StatusCode::OK, format!("{{\"result\":{}}}", result_json(done)), Ok(())),
        Err(e) => (StatusCode::OK, error_json(&e).to_string(), Err(e)),
    }
}

#[derive(Deserialize)]
struct BatchJson<'a> {
    #[serde(borrow, default)]
    commands: Vec<BTreeMap<String, &'a RawValue>>,
    #[serde(default)]
    parallel: bool,
}

/// One batch command: `{"<method>": {params}}`.
fn command(c: BTreeMap<String, &RawValue>) -> super::Command {
    let mut entries = c.into_iter();
    let (Some((name, raw)), None) = (entries.next(), entries.next()) else {
        return Err(CompatError::bad_request(
            "commands: each command is an object with one key, the method name",
        ));
    };
    let Some(method) = Method::from_snake(Api::Centrifugo, &name) else {
        return Err(match is_pro_snake(&name) {
            Some(p) => CompatError::pro(p),
            None => CompatError::method_not_found(&name),
        });
    };
    let params: ParamsJson<'_> = serde_json::from_str(raw.get())
        .map_err(|e| CompatError::bad_request(format!("{name}: {e}")))?;
    Ok((method, params.into()))
}

/// Every method's request fields (see [`Params`]). Unknown fields are
/// ignored, as Centrifugo does, so clients of newer versions still work.
#[derive(Deserialize, Default)]
#[serde(default)]
struct ParamsJson<'a> {
    channel: String,
    channels: Vec<String>,
    user: String,
    client: String,
    session: String,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    b64data: String,
    skip_history: bool,
    tags: BTreeMap<String, String>,
    idempotency_key: String,
    version: u64,
    expire_at: i64,
    #[serde(borrow)]
    info: Option<&'a RawValue>,
    b64info: String,
    recover_since: Option<IgnoredAny>,
    #[serde(rename = "override")]
    override_options: Option<IgnoredAny>,
    disconnect: Option<DisconnectJson>,
    whitelist: Vec<String>,
    expired: bool,
    limit: i32,
    since: Option<PositionJson>,
    reverse: bool,
    pattern: String,
    method: String,
    #[serde(borrow)]
    params: Option<&'a RawValue>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct DisconnectJson {
    code: u32,
    reason: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct PositionJson {
    offset: u64,
    epoch: String,
}

fn raw_bytes(v: Option<&RawValue>) -> Bytes {
    v.map(|v| Bytes::copy_from_slice(v.get().as_bytes())).unwrap_or_default()
}

impl From<ParamsJson<'_>> for Params {
    fn from(p: ParamsJson<'_>) -> Params {
        Params {
            channel: p.channel,
            channels: p.channels,
            user: p.user,
            client: p.client,
            session: p.session,
            data: raw_bytes(p.data),
            b64data: p.b64data,
            skip_history: p.skip_history,
            tags: p.tags,
            idempotency_key: p.idempotency_key,
            version: p.version,
            expire_at: p.expire_at,
            info: raw_bytes(p.info),
            b64info: p.b64info,
            recover_since: p.recover_since.is_some(),
            override_options: p.override_options.is_some(),
            disconnect: p.disconnect.map(|d| (d.code, d.reason)),
            whitelist: p.whitelist,
            expired: p.expired,
            limit: p.limit,
            since: p.since.map(|s| StreamPosition { offset: s.offset, epoch: s.epoch }),
            reverse: p.reverse,
            pattern: p.pattern,
            method: p.method,
            params: raw_bytes(p.params),
        }
    }
}

/// A method's result as Centrifugo's JSON.
fn result_json(done: Done) -> String {
    let v = match done {
        Done::Empty => json!({}),
        Done::Publish(p) => json!({"offset": p.offset, "epoch": p.epoch}),
        Done::Broadcast(results) => {
            let responses: Vec<Value> = results
                .into_iter()
                .map(|r| match r {
                    Ok(p) => json!({"result": {"offset": p.offset, "epoch": p.epoch}}),
                    Err(e) => error_json(&e),
                })
                .collect();
            json!({ "responses": responses })
        }
        Done::Presence(m) => {
            let presence: serde_json::Map<String, Value> =
                m.iter().map(|(k, v)| (k.clone(), info_json(v))).collect();
            json!({ "presence": presence })
        }
        Done::PresenceStats { num_clients, num_users } => {
            json!({"num_clients": num_clients, "num_users": num_users})
        }
        Done::History(page) => {
            return String::from_utf8(history_json(&page)).expect("serde_json writes UTF-8");
        }
        Done::Channels(m) => {
            let channels: serde_json::Map<String, Value> =
                m.into_iter().map(|(c, n)| (c, json!({"num_clients": n}))).collect();
            json!({ "channels": channels })
        }
        Done::Info(nodes) => {
            let nodes: Vec<Value> = nodes
                .iter()
                .map(|n| {
                    json!({
                        "uid": n.uid, "name": n.name, "version": n.version,
                        "num_clients": n.num_clients, "num_subs": n.num_subscriptions,
                        "num_channels": n.num_channels, "uptime": n.uptime_secs,
                    })
                })
                .collect();
            json!({ "nodes": nodes })
        }
        Done::Rpc(data) => {
            return format!("{{\"data\":{}}}", raw_data(&data).get());
        }
    };
    v.to_string()
}
