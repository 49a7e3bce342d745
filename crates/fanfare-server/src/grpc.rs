//! The gRPC control API: `fanfare.v1.ControlService`, the standard health
//! service and server reflection. The HTTP/2 side is in `grpc_transport`
//! (which also serves `centrifugal.centrifugo.api.CentrifugoApi`, see
//! `crate::centrifugo::grpc`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use fanfare_core::{ApiError, ApiPublish, Node};
use fanfare_protocol::StreamPosition;
use tonic::{Request, Response, Status};

use crate::api::{ApiContext, code_name, observe};
use crate::grpc_transport::GrpcService;
use crate::methods::Method;

pub use fanfare_server::{FILE_DESCRIPTOR_SET, pb};

use pb::control_service_server::{ControlService, ControlServiceServer};

fn status(e: &ApiError) -> Status {
    match e {
        ApiError::InvalidArgument(m)
        | ApiError::UnknownNamespace(m)
        | ApiError::UnrecoverablePosition(m) => Status::invalid_argument(m.clone()),
        ApiError::NotFound(m) => Status::not_found(m.clone()),
        ApiError::ResourceExhausted(m) | ApiError::TooLarge(m) => {
            Status::resource_exhausted(m.clone())
        }
        ApiError::Unavailable(m) => Status::unavailable(m.clone()),
    }
}

/// The ControlService implementation: thin translation onto `Node`'s API
/// methods (the HTTP/2 side is `grpc_transport`).
pub struct ControlApi {
    node: Node,
    ctx: Arc<ApiContext>,
}

async fn run<T, R>(
    method: Method,
    f: impl std::future::Future<Output = Result<T, ApiError>>,
    into: impl FnOnce(T) -> R,
) -> Result<Response<R>, Status> {
    let start = Instant::now();
    match f.await {
        Ok(v) => {
            observe(method.snake(), "grpc", "OK", start);
            Ok(Response::new(into(v)))
        }
        Err(e) => {
            observe(method.snake(), "grpc", code_name(&e), start);
            Err(status(&e))
        }
    }
}

/// The publish fields shared by Publish, Broadcast and PublishToUser.
fn api_publish(
    data: Vec<u8>,
    idempotency_key: String,
    tags: HashMap<String, String>,
    skip_history: bool,
) -> ApiPublish {
    ApiPublish {
        data: data.into(),
        idempotency_key,
        tags: tags.into_iter().collect(),
        skip_history,
    }
}

fn position(p: StreamPosition) -> pb::PublishResponse {
    pb::PublishResponse { offset: p.offset, epoch: p.epoch }
}

fn client_info(i: fanfare_protocol::ClientInfo) -> pb::ClientInfo {
    pb::ClientInfo {
        user: i.user.to_string(),
        client: i.client.to_string(),
        conn_info: i.conn_info.to_vec(),
        chan_info: i.chan_info.to_vec(),
    }
}

#[tonic::async_trait]
impl ControlService for ControlApi {
    async fn publish(
        &self,
        req: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let r = req.into_inner();
        let p = api_publish(r.data, r.idempotency_key, r.tags, r.skip_history);
        run(Method::Publish, self.node.api_publish(&r.channel, &p, &self.ctx.limits), position)
            .await
    }

    async fn broadcast(
        &self,
        req: Request<pb::BroadcastRequest>,
    ) -> Result<Response<pb::BroadcastResponse>, Status> {
        let r = req.into_inner();
        let p = api_publish(r.data, r.idempotency_key, r.tags, r.skip_history);
        let channels = r.channels;
        let fut = self.node.api_broadcast(&channels, &p, &self.ctx.limits);
        run(Method::Broadcast, fut, |results| pb::BroadcastResponse {
            results: channels
                .iter()
                .zip(results)
                .map(|(c, res)| match res {
                    Ok(pos) => pb::BroadcastResult {
                        channel: c.clone(),
                        offset: pos.offset,
                        epoch: pos.epoch,
                        error: None,
                    },
                    Err(e) => pb::BroadcastResult {
                        channel: c.clone(),
                        offset: 0,
                        epoch: String::new(),
                        error: Some(pb::Error {
                            code: code_name(&e).into(),
                            message: e.to_string(),
                        }),
                    },
                })
                .collect(),
        })
        .await
    }

    async fn publish_to_user(
        &self,
        req: Request<pb::PublishToUserRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let r = req.into_inner();
        let p = api_publish(r.data, r.idempotency_key, r.tags, false);
        run(
            Method::PublishToUser,
            self.node.api_publish_to_user(&r.user, &p, &self.ctx.limits),
            position,
        )
        .await
    }

    async fn subscribe(
        &self,
        req: Request<pb::SubscribeRequest>,
    ) -> Result<Response<pb::SubscribeResponse>, Status> {
        let r = req.into_inner();
        run(Method::Subscribe, self.node.api_subscribe(&r.user, &r.client, &r.channel), |_| {
            pb::SubscribeResponse {}
        })
        .await
    }

    async fn unsubscribe(
        &self,
        req: Request<pb::UnsubscribeRequest>,
    ) -> Result<Response<pb::UnsubscribeResponse>, Status> {
        let r = req.into_inner();
        run(Method::Unsubscribe, self.node.api_unsubscribe(&r.user, &r.client, &r.channel), |_| {
            pb::UnsubscribeResponse {}
        })
        .await
    }

    async fn disconnect(
        &self,
        req: Request<pb::DisconnectRequest>,
    ) -> Result<Response<pb::DisconnectResponse>, Status> {
        let r = req.into_inner();
        run(
            Method::Disconnect,
            self.node.api_disconnect(&r.user, &r.client, r.code, &r.reason),
            |_| pb::DisconnectResponse {},
        )
        .await
    }

    async fn presence(
        &self,
        req: Request<pb::PresenceRequest>,
    ) -> Result<Response<pb::PresenceResponse>, Status> {
        let r = req.into_inner();
        run(Method::Presence, self.node.api_presence(&r.channel), |m| pb::PresenceResponse {
            clients: m.into_iter().map(|(k, v)| (k, client_info(v))).collect(),
        })
        .await
    }

    async fn presence_stats(
        &self,
        req: Request<pb::PresenceStatsRequest>,
    ) -> Result<Response<pb::PresenceStatsResponse>, Status> {
        let r = req.into_inner();
        run(Method::PresenceStats, self.node.api_presence_stats(&r.channel), |(c, u)| {
            pb::PresenceStatsResponse { num_clients: c, num_users: u }
        })
        .await
    }

    async fn history(
        &self,
        req: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        let r = req.into_inner();
        let since = (!r.epoch.is_empty())
            .then(|| StreamPosition { offset: r.since_offset, epoch: r.epoch.clone() });
        run(Method::History, self.node.api_history(&r.channel, r.limit, since, r.reverse), |page| {
            pb::HistoryResponse {
                publications: page
                    .publications
                    .into_iter()
                    .map(|p| pb::Publication {
                        data: p.data.to_vec(),
                        info: p.info.map(|i| client_info((*i).clone())),
                        offset: p.offset,
                        tags: p
                            .tags
                            .map(|t| (*t).clone().into_iter().collect())
                            .unwrap_or_default(),
                    })
                    .collect(),
                offset: page.position.offset,
                epoch: page.position.epoch,
            }
        })
        .await
    }

    async fn channels(
        &self,
        req: Request<pb::ChannelsRequest>,
    ) -> Result<Response<pb::ChannelsResponse>, Status> {
        let r = req.into_inner();
        run(Method::Channels, self.node.api_channels(&r.pattern, &self.ctx.limits), |m| {
            pb::ChannelsResponse {
                channels: m
                    .into_iter()
                    .map(|(c, n)| (c, pb::ChannelInfo { num_clients: n }))
                    .collect::<HashMap<_, _>>(),
            }
        })
        .await
    }

    async fn info(
        &self,
        _req: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        run(Method::Info, self.node.api_info(), |nodes| pb::InfoResponse {
            nodes: nodes
                .into_iter()
                .map(|n| pb::NodeInfo {
                    uid: n.uid,
                    name: n.name,
                    version: n.version,
                    num_clients: n.num_clients,
                    num_subscriptions: n.num_subscriptions,
                    num_channels: n.num_channels,
                    uptime_secs: n.uptime_secs,
                })
                .collect(),
        })
        .await
    }
}

/// The control service, the standard health service and server reflection,
/// for [`grpc_transport::serve`](crate::grpc_transport::serve) (the
/// dependency points one way: this module implements the calls, the
/// transport carries them).
pub async fn service(node: Node, ctx: Arc<ApiContext>) -> anyhow::Result<GrpcService<ControlApi>> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<ControlServiceServer<ControlApi>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let routes = tonic::service::Routes::new(health).add_service(reflection);
    Ok(GrpcService::new(ControlApi { node: node.clone(), ctx: ctx.clone() }, node, ctx, routes))
}
