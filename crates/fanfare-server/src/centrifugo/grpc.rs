//! `centrifugal.centrifugo.api.CentrifugoApi` (proto/centrifugo/api.proto),
//! run by the gRPC transport in the connection's task like ControlService
//! calls (`crate::grpc_transport`). As in Centrifugo an API error is the
//! response's `error` field with gRPC status OK; only a message that does not
//! decode gets a status (INVALID_ARGUMENT).

use std::time::Instant;

use bytes::{Buf, Bytes};
use fanfare_core::Node;
use fanfare_protocol::StreamPosition;
use fanfare_server::centrifugo_pb as pb;
use prost::Message;
use prost::encoding::{DecodeContext, WireType, decode_key, decode_varint, skip_field};
use tonic::Status;

use super::{Command, CompatError, Done, Params, observe_call, run, run_batch};
use crate::api::ApiContext;
use crate::methods::{Api, CENTRIFUGO_PRO, Method};

pub const PREFIX: &str = "/centrifugal.centrifugo.api.CentrifugoApi/";
const PROTOCOL: &str = "centrifugo_grpc";

/// A method called on the service: one fanfare has, or one of the paid
/// edition (answered with 108).
#[derive(Debug, Clone, Copy)]
pub enum Target {
    Ours(Method),
    Pro(&'static str),
}

impl Target {
    /// The method named by the gRPC path after [`PREFIX`].
    pub fn from_name(name: &str) -> Option<Target> {
        Method::from_grpc(Api::Centrifugo, name).map(Target::Ours).or_else(|| {
            CENTRIFUGO_PRO.iter().find(|(g, _)| *g == name).map(|(_, s)| Target::Pro(s))
        })
    }
}

/// Every response message of the service has the same shape, `Error error = 1`
/// and the method's result as field 2, so one message type encodes them all.
#[derive(Clone, PartialEq, Message)]
struct AnyResponse {
    #[prost(message, optional, tag = "1")]
    error: Option<pb::Error>,
    #[prost(bytes = "vec", optional, tag = "2")]
    result: Option<Vec<u8>>,
}

/// `BatchRequest` with its commands left encoded (see [`command`]).
#[derive(Clone, PartialEq, Message)]
struct RawBatchRequest {
    #[prost(bytes = "bytes", repeated, tag = "1")]
    commands: Vec<Bytes>,
    #[prost(bool, tag = "2")]
    parallel: bool,
}

/// `BatchResponse` with its replies encoded by [`reply`].
#[derive(Clone, PartialEq, Message)]
struct RawBatchResponse {
    #[prost(bytes = "vec", repeated, tag = "1")]
    replies: Vec<Vec<u8>>,
}

fn error_pb(e: CompatError) -> pb::Error {
    pb::Error { code: e.code, message: e.message }
}

/// Runs one call; the encoded response message (without the gRPC prefix).
pub async fn call(
    node: &Node,
    ctx: &ApiContext,
    target: Target,
    msg: Bytes,
) -> Result<Vec<u8>, Status> {
    let start = Instant::now();
    let method = match target {
        Target::Pro(name) => {
            let e = CompatError::pro(name);
            observe_call(name, PROTOCOL, Err(&e), start);
            return Ok(AnyResponse { error: Some(error_pb(e)), result: None }.encode_to_vec());
        }
        Target::Ours(m) => m,
    };
    let invalid = |e: prost::DecodeError| {
        Status::invalid_argument(format!(
            "not a valid centrifugal.centrifugo.api request for {}: {e}",
            method.grpc_name()
        ))
    };
    if method == Method::Batch {
        let batch = RawBatchRequest::decode(msg).map_err(invalid)?;
        let commands = batch.commands.into_iter().map(command).collect();
        let replies = run_batch(node, ctx, commands, batch.parallel).await;
        observe_call(method.snake(), PROTOCOL, Ok(()), start);
        let replies = replies.into_iter().map(reply).collect();
        return Ok(RawBatchResponse { replies }.encode_to_vec());
    }
    let params = params(method, msg).map_err(invalid)?;
    let response = match run(node, ctx, method, params).await {
        Ok(done) => {
            observe_call(method.snake(), PROTOCOL, Ok(()), start);
            AnyResponse { error: None, result: Some(result(done)) }
        }
        Err(e) => {
            observe_call(method.snake(), PROTOCOL, Err(&e), start);
            AnyResponse { error: Some(error_pb(e)), result: None }
        }
    };
    Ok(response.encode_to_vec())
}

/// The field of `Command` (request) and `Reply` (result) of each method.
fn batch_field(method: Method) -> Option<u32> {
    Some(match method {
        Method::Publish => 4,
        Method::Broadcast => 5,
        Method::Subscribe => 6,
        Method::Unsubscribe => 7,
        Method::Disconnect => 8,
        Method::Presence => 9,
        Method::PresenceStats => 10,
        Method::History => 11,
        Method::HistoryRemove => 12,
        Method::Info => 13,
        Method::Rpc => 14,
        Method::Refresh => 15,
        Method::Channels => 16,
        Method::PublishToUser | Method::Batch => return None,
    })
}

/// The paid edition's `Command` fields: 17-35, in [`CENTRIFUGO_PRO`] order.
const FIRST_PRO_FIELD: u32 = 17;

/// Decodes one batch `Command`: its first field that names a method.
fn command(mut buf: Bytes) -> Command {
    let bad = |e: prost::DecodeError| CompatError::bad_request(format!("commands: {e}"));
    while buf.has_remaining() {
        let (tag, wire_type) = decode_key(&mut buf).map_err(bad)?;
        if wire_type != WireType::LengthDelimited {
            skip_field(wire_type, tag, &mut buf, DecodeContext::default()).map_err(bad)?;
            continue;
        }
        let len = decode_varint(&mut buf).map_err(bad)?;
        if len > buf.remaining() as u64 {
            return Err(CompatError::bad_request("commands: a field ends past the command"));
        }
        let body = buf.split_to(len as usize);
        if let Some(method) = Method::ALL.iter().copied().find(|m| batch_field(*m) == Some(tag)) {
            let p = params(method, body)
                .map_err(|e| CompatError::bad_request(format!("{}: {e}", method.snake())))?;
            return Ok((method, p));
        }
        if let Some((_, snake)) =
            tag.checked_sub(FIRST_PRO_FIELD).and_then(|i| CENTRIFUGO_PRO.get(i as usize))
        {
            return Err(CompatError::pro(snake));
        }
    }
    Err(CompatError::method_not_found("(a batch command with no method set)"))
}

/// One batch reply: the method's result in its field, or `error` (field 2).
fn reply(r: Result<(Method, Done), CompatError>) -> Vec<u8> {
    let mut out = Vec::new();
    match r {
        Ok((method, done)) => {
            let field = batch_field(method).expect("a batch runs only batch methods");
            prost::encoding::bytes::encode(field, &result(done), &mut out);
        }
        Err(e) => prost::encoding::message::encode(2, &error_pb(e), &mut out),
    }
    out
}

/// A request message as [`Params`].
fn params(method: Method, msg: Bytes) -> Result<Params, prost::DecodeError> {
    Ok(match method {
        Method::Publish => {
            let r = pb::PublishRequest::decode(msg)?;
            let p = publish_params(r.data, r.b64data, r.skip_history, r.tags, r.idempotency_key);
            Params { channel: r.channel, version: r.version, ..p }
        }
        Method::Broadcast => {
            let r = pb::BroadcastRequest::decode(msg)?;
            let p = publish_params(r.data, r.b64data, r.skip_history, r.tags, r.idempotency_key);
            Params { channels: r.channels, version: r.version, ..p }
        }
        Method::Subscribe => {
            let r = pb::SubscribeRequest::decode(msg)?;
            Params {
                channel: r.channel,
                user: r.user,
                client: r.client,
                session: r.session,
                expire_at: r.expire_at,
                info: r.info.into(),
                b64info: r.b64info,
                data: r.data.into(),
                b64data: r.b64data,
                recover_since: r.recover_since.is_some(),
                override_options: r.r#override.is_some(),
                ..Params::default()
            }
        }
        Method::Unsubscribe => {
            let r = pb::UnsubscribeRequest::decode(msg)?;
            Params {
                channel: r.channel,
                user: r.user,
                client: r.client,
                session: r.session,
                ..Params::default()
            }
        }
        Method::Disconnect => {
            let r = pb::DisconnectRequest::decode(msg)?;
            Params {
                user: r.user,
                client: r.client,
                session: r.session,
                whitelist: r.whitelist,
                disconnect: r.disconnect.map(|d| (d.code, d.reason)),
                ..Params::default()
            }
        }
        Method::Refresh => {
            let r = pb::RefreshRequest::decode(msg)?;
            Params {
                user: r.user,
                client: r.client,
                session: r.session,
                expired: r.expired,
                expire_at: r.expire_at,
                info: r.info.into(),
                ..Params::default()
            }
        }
        Method::Presence => {
            Params { channel: pb::PresenceRequest::decode(msg)?.channel, ..Params::default() }
        }
        Method::PresenceStats => {
            Params { channel: pb::PresenceStatsRequest::decode(msg)?.channel, ..Params::default() }
        }
        Method::History => {
            let r = pb::HistoryRequest::decode(msg)?;
            Params {
                channel: r.channel,
                limit: r.limit,
                since: r.since.map(|s| StreamPosition { offset: s.offset, epoch: s.epoch }),
                reverse: r.reverse,
                ..Params::default()
            }
        }
        Method::HistoryRemove => {
            Params { channel: pb::HistoryRemoveRequest::decode(msg)?.channel, ..Params::default() }
        }
        Method::Channels => {
            Params { pattern: pb::ChannelsRequest::decode(msg)?.pattern, ..Params::default() }
        }
        Method::Info => {
            pb::InfoRequest::decode(msg)?;
            Params::default()
        }
        Method::Rpc => {
            let r = pb::RpcRequest::decode(msg)?;
            Params { method: r.method, params: r.params.into(), ..Params::default() }
        }
        // Not methods of this service (`run` refuses them).
        Method::Batch | Method::PublishToUser => Params::default(),
    })
}

/// The fields publish and broadcast share.
fn publish_params(
    data: Vec<u8>,
    b64data: String,
    skip_history: bool,
    tags: std::collections::HashMap<String, String>,
    idempotency_key: String,
) -> Params {
    Params {
        data: data.into(),
        b64data,
        skip_history,
        tags: tags.into_iter().collect(),
        idempotency_key,
        ..Params::default()
    }
}

fn client_info(i: &fanfare_protocol::ClientInfo) -> pb::ClientInfo {
    pb::ClientInfo {
        user: i.user.to_string(),
        client: i.client.to_string(),
        conn_info: i.conn_info.to_vec(),
        chan_info: i.chan_info.to_vec(),
    }
}

fn publish_result(p: StreamPosition) -> pb::PublishResult {
    pb::PublishResult { offset: p.offset, epoch: p.epoch }
}

/// A method's result message, encoded.
fn result(done: Done) -> Vec<u8> {
    match done {
        Done::Empty => Vec::new(),
        Done::Publish(p) => publish_result(p).encode_to_vec(),
        Done::Broadcast(results) => pb::BroadcastResult {
            responses: results
                .into_iter()
                .map(|r| match r {
                    Ok(p) => pb::PublishResponse { error: None, result: Some(publish_result(p)) },
                    Err(e) => pb::PublishResponse { error: Some(error_pb(e)), result: None },
                })
                .collect(),
        }
        .encode_to_vec(),
        Done::Presence(m) => pb::PresenceResult {
            presence: m.iter().map(|(k, v)| (k.clone(), client_info(v))).collect(),
        }
        .encode_to_vec(),
        Done::PresenceStats { num_clients, num_users } => {
            pb::PresenceStatsResult { num_clients, num_users }.encode_to_vec()
        }
        Done::History(page) => pb::HistoryResult {
            publications: page
                .publications
                .iter()
                .map(|p| pb::Publication {
                    data: p.data.to_vec(),
                    info: p.info.as_deref().map(client_info),
                    offset: p.offset,
                    tags: p
                        .tags
                        .as_deref()
                        .map(|t| t.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                        .unwrap_or_default(),
                })
                .collect(),
            epoch: page.position.epoch,
            offset: page.position.offset,
        }
        .encode_to_vec(),
        Done::Channels(m) => pb::ChannelsResult {
            channels: m.into_iter().map(|(c, n)| (c, pb::ChannelInfo { num_clients: n })).collect(),
        }
        .encode_to_vec(),
        Done::Info(nodes) => {
            let small = |n: u64| n.min(u32::MAX as u64) as u32;
            pb::InfoResult {
                nodes: nodes
                    .into_iter()
                    .map(|n| pb::NodeResult {
                        uid: n.uid,
                        name: n.name,
                        version: n.version,
                        num_clients: small(n.num_clients),
                        // Not counted by fanfare's nodes.
                        num_users: 0,
                        num_channels: small(n.num_channels),
                        uptime: small(n.uptime_secs),
                        num_subs: small(n.num_subscriptions),
                    })
                    .collect(),
            }
            .encode_to_vec()
        }
        Done::Rpc(data) => pb::RpcResult { data: data.to_vec() }.encode_to_vec(),
    }
}
