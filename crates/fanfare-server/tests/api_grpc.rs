//! The gRPC control API of one node (memory broker), driven by a tonic client
//! generated from proto/ (`fanfare_server::pb`): every method, the error
//! statuses, API keys, idempotent publish, message size limits, the health and
//! reflection services and the per-method metrics.

mod common;

use std::time::Duration;

use common::api::{
    API_KEY, api, api_node_toml, code_of, data, grpc_channel, grpc_client, grpc_client_raw,
    http_api, metric_with, pb, publish_req, start_api_node, subscribe_req,
};
use common::{Server, assert_healthy};
use serde_json::{Value, json};
use tonic::Code;

fn pub_data(push: &Value) -> &Value {
    &push["push"]["pub"]["data"]
}

#[tokio::test]
async fn publish_broadcast_and_history_over_grpc() {
    let server = start_api_node();
    let mut api = api(&server).await;
    let mut sub = server.connected("reader").await;
    sub.subscribe_ok("news", json!({})).await;
    sub.subscribe_ok("sport", json!({})).await;

    let mut req = publish_req("news", json!({"headline": "one"}));
    req.tags.insert("k".into(), "v".into());
    let r = api.publish(req).await.expect("publish").into_inner();
    assert_eq!(r.offset, 1, "{r:?}");
    assert!(!r.epoch.is_empty(), "{r:?}");
    let push = sub.recv_push().await;
    assert_eq!(push["push"]["channel"], "news", "{push}");
    assert_eq!(*pub_data(&push), json!({"headline": "one"}), "{push}");
    assert_eq!(push["push"]["pub"]["tags"], json!({"k": "v"}), "{push}");
    assert_eq!(push["push"]["pub"]["offset"], 1, "{push}");

    // skip_history: delivered, not kept.
    let mut req = publish_req("news", json!({"headline": "ephemeral"}));
    req.skip_history = true;
    api.publish(req).await.expect("publish skip_history");
    assert_eq!(*pub_data(&sub.recv_push().await), json!({"headline": "ephemeral"}));

    let h = api
        .history(pb::HistoryRequest { channel: "news".into(), limit: -1, ..Default::default() })
        .await
        .expect("history")
        .into_inner();
    assert_eq!(h.publications.len(), 1, "{h:?}");
    assert_eq!(h.publications[0].data, data(json!({"headline": "one"})));
    assert_eq!(h.publications[0].tags.get("k").map(String::as_str), Some("v"));
    assert_eq!((h.offset, h.epoch.as_str()), (1, r.epoch.as_str()));
    // limit 0: only the stream position.
    let h0 = api
        .history(pb::HistoryRequest { channel: "news".into(), limit: 0, ..Default::default() })
        .await
        .expect("history limit 0")
        .into_inner();
    assert!(h0.publications.is_empty() && h0.offset == 1, "{h0:?}");
    // A stale epoch is refused.
    let stale = api
        .history(pb::HistoryRequest {
            channel: "news".into(),
            limit: -1,
            since_offset: 0,
            epoch: "not-the-epoch".into(),
            reverse: false,
        })
        .await;
    assert_eq!(code_of(stale), Code::InvalidArgument);

    // Broadcast: one result per channel, a bad channel fails alone.
    let b = api
        .broadcast(pb::BroadcastRequest {
            channels: vec!["news".into(), "sport".into(), "bad channel".into()],
            data: data(json!({"all": true})),
            ..Default::default()
        })
        .await
        .expect("broadcast")
        .into_inner();
    assert_eq!(b.results.len(), 3, "{b:?}");
    assert_eq!((b.results[0].channel.as_str(), b.results[0].offset), ("news", 2));
    assert_eq!((b.results[1].channel.as_str(), b.results[1].offset), ("sport", 1));
    assert!(b.results[0].error.is_none() && b.results[1].error.is_none(), "{b:?}");
    let err = b.results[2].error.as_ref().expect("error for the bad channel");
    assert_eq!(err.code, "INVALID_ARGUMENT", "{b:?}");
    let mut got = vec![];
    for _ in 0..2 {
        let p = sub.recv_push().await;
        assert_eq!(*pub_data(&p), json!({"all": true}), "{p}");
        got.push(p["push"]["channel"].as_str().unwrap_or_default().to_string());
    }
    got.sort();
    assert_eq!(got, ["news", "sport"]);
    sub.assert_silent(Duration::from_millis(200)).await;
    assert_healthy(&server).await;
}

#[tokio::test]
async fn user_methods_presence_channels_and_info_over_grpc() {
    let server = start_api_node();
    let mut api = api(&server).await;
    let mut a1 = server.connected("42").await;
    let mut a2 = server.connected("42").await;
    let mut other = server.connected("7").await;

    // PublishToUser reaches every connection of the user, nobody else.
    let r = api
        .publish_to_user(pb::PublishToUserRequest {
            user: "42".into(),
            data: data(json!({"hello": 42})),
            ..Default::default()
        })
        .await
        .expect("publish_to_user")
        .into_inner();
    assert!(r.offset >= 1, "{r:?}");
    for c in [&mut a1, &mut a2] {
        let p = c.recv_push().await;
        assert_eq!(p["push"]["channel"], "#42", "{p}");
        assert_eq!(*pub_data(&p), json!({"hello": 42}), "{p}");
    }
    other.assert_silent(Duration::from_millis(200)).await;

    // Subscribe: every connection of the user gets a `subscribe` push, then publications.
    api.subscribe(subscribe_req("42", "room")).await.expect("subscribe");
    for c in [&mut a1, &mut a2] {
        let p = c.recv_push().await;
        assert_eq!(p["push"]["channel"], "room", "{p}");
        assert!(p["push"]["subscribe"].is_object(), "{p}");
    }
    api.publish(publish_req("room", json!({"in": "room"}))).await.expect("publish room");
    for c in [&mut a1, &mut a2] {
        assert_eq!(*pub_data(&c.recv_push().await), json!({"in": "room"}));
    }
    other.assert_silent(Duration::from_millis(200)).await;

    let p = api
        .presence(pb::PresenceRequest { channel: "room".into() })
        .await
        .expect("presence")
        .into_inner();
    let mut ids: Vec<&str> = p.clients.keys().map(String::as_str).collect();
    ids.sort();
    let mut want = vec![a1.client_id.as_str(), a2.client_id.as_str()];
    want.sort();
    assert_eq!(ids, want, "{p:?}");
    assert!(p.clients.values().all(|i| i.user == "42"), "{p:?}");
    let s = api
        .presence_stats(pb::PresenceStatsRequest { channel: "room".into() })
        .await
        .expect("presence_stats")
        .into_inner();
    assert_eq!((s.num_clients, s.num_users), (2, 1));

    let ch = api
        .channels(pb::ChannelsRequest { pattern: "ro?m".into() })
        .await
        .expect("channels")
        .into_inner();
    assert_eq!(ch.channels.len(), 1, "{ch:?}");
    assert_eq!(ch.channels["room"].num_clients, 2, "{ch:?}");
    let all = api.channels(pb::ChannelsRequest::default()).await.expect("channels").into_inner();
    for c in ["room", "#42", "#7"] {
        assert!(all.channels.contains_key(c), "{c} missing: {all:?}");
    }

    let info = api.info(pb::InfoRequest {}).await.expect("info").into_inner();
    assert_eq!(info.nodes.len(), 1, "{info:?}");
    let n = &info.nodes[0];
    assert_eq!(n.num_clients, 3, "{n:?}");
    assert!(n.num_channels >= 3 && !n.uid.is_empty() && n.version.contains("fanfare"), "{n:?}");

    // Unsubscribe one client only: it gets an unsubscribe push (code 2000).
    api.unsubscribe(pb::UnsubscribeRequest {
        user: "42".into(),
        channel: "room".into(),
        client: a1.client_id.clone(),
    })
    .await
    .expect("unsubscribe");
    let p = a1.recv_push().await;
    assert_eq!(p["push"]["channel"], "room", "{p}");
    assert_eq!(p["push"]["unsubscribe"]["code"], 2000, "{p}");
    a2.assert_silent(Duration::from_millis(200)).await;

    // Disconnect one client with a code, then the whole user with the default 3503.
    api.disconnect(pb::DisconnectRequest {
        user: String::new(),
        client: a1.client_id.clone(),
        code: 4001,
        reason: "go away".into(),
    })
    .await
    .expect("disconnect client");
    assert_eq!(a1.expect_close().await, (4001, "go away".into()));
    a2.assert_silent(Duration::from_millis(200)).await;
    api.disconnect(pb::DisconnectRequest { user: "42".into(), ..Default::default() })
        .await
        .expect("disconnect user");
    assert_eq!(a2.expect_close().await.0, 3503);
    other.assert_silent(Duration::from_millis(200)).await;
    assert_healthy(&server).await;
}

#[tokio::test]
async fn api_key_is_required_on_grpc() {
    let server = start_api_node();
    for key in [None, Some("wrong"), Some("")] {
        let mut c = grpc_client(&server, key).await;
        let r = c.publish(publish_req("news", json!(1))).await;
        assert_eq!(code_of(r), Code::Unauthenticated, "key {key:?}");
        let r = c.info(pb::InfoRequest {}).await;
        assert_eq!(code_of(r), Code::Unauthenticated, "key {key:?}");
    }
    for auth in [format!("Bearer {API_KEY}"), API_KEY.to_string(), format!("apikey {API_KEY}x")] {
        let mut c = grpc_client_raw(&server, Some(auth.clone())).await;
        let r = c.publish(publish_req("news", json!(1))).await;
        assert_eq!(code_of(r), Code::Unauthenticated, "authorization {auth:?}");
    }
    // The scheme is case-insensitive; the right key works.
    let mut c = grpc_client_raw(&server, Some(format!("ApiKey {API_KEY}"))).await;
    c.publish(publish_req("news", json!(1))).await.expect("publish with ApiKey scheme");
    // Refused calls published nothing: the one accepted publish has offset 1.
    let h = c
        .history(pb::HistoryRequest { channel: "news".into(), limit: -1, ..Default::default() })
        .await
        .expect("history")
        .into_inner();
    assert_eq!(h.publications.len(), 1, "{h:?}");
}

#[tokio::test]
async fn no_key_serves_loopback_callers() {
    let server = Server::start("[[namespaces]]\nname = \"\"\nallow_publish = true\n");
    let mut c = grpc_client(&server, None).await;
    c.publish(publish_req("news", json!({"x": 1}))).await.expect("loopback publish without key");
    // A key is not checked when none is configured.
    let mut c = grpc_client(&server, Some("anything")).await;
    c.info(pb::InfoRequest {}).await.expect("info");
}

#[tokio::test]
async fn grpc_error_statuses() {
    let server = start_api_node();
    let mut api = api(&server).await;
    let publish_code = |channel: &str, payload: &[u8]| pb::PublishRequest {
        channel: channel.into(),
        data: payload.to_vec(),
        ..Default::default()
    };
    let long = "x".repeat(256);
    // INVALID_ARGUMENT: bad channel names, unknown namespace, empty or non-JSON data.
    for (channel, payload) in [
        ("", &b"{}"[..]),
        ("bad channel", b"{}"),
        (long.as_str(), b"{}"),
        ("nope:x", b"{}"),
        ("news", b""),
        ("news", b"{not json"),
    ] {
        let r = api.publish(publish_code(channel, payload)).await;
        assert_eq!(code_of(r), Code::InvalidArgument, "{channel:?} {payload:?}");
    }
    let r = api
        .publish_to_user(pb::PublishToUserRequest { data: data(json!(1)), ..Default::default() });
    assert_eq!(code_of(r.await), Code::InvalidArgument);
    let r = api.subscribe(pb::SubscribeRequest { channel: "news".into(), ..Default::default() });
    assert_eq!(code_of(r.await), Code::InvalidArgument, "no user nor client");
    let r = api.subscribe(pb::SubscribeRequest {
        user: "42".into(),
        channel: "nope:x".into(),
        ..Default::default()
    });
    assert_eq!(code_of(r.await), Code::InvalidArgument, "unknown namespace");
    for (code, reason) in [(1000, ""), (5000, ""), (4000, "r".repeat(124).as_str())] {
        let r = api.disconnect(pb::DisconnectRequest {
            user: "42".into(),
            code,
            reason: reason.into(),
            ..Default::default()
        });
        assert_eq!(code_of(r.await), Code::InvalidArgument, "code {code}");
    }
    let r = api.broadcast(pb::BroadcastRequest { data: data(json!(1)), ..Default::default() });
    assert_eq!(code_of(r.await), Code::InvalidArgument, "no channels");
    let r = api.presence(pb::PresenceRequest { channel: "nope:x".into() });
    assert_eq!(code_of(r.await), Code::InvalidArgument);

    // NOT_FOUND: presence / history where the namespace has them off.
    let r = api.presence(pb::PresenceRequest { channel: "plain:x".into() });
    assert_eq!(code_of(r.await), Code::NotFound);
    let r = api.presence_stats(pb::PresenceStatsRequest { channel: "plain:x".into() });
    assert_eq!(code_of(r.await), Code::NotFound);
    let r = api.history(pb::HistoryRequest { channel: "plain:x".into(), ..Default::default() });
    assert_eq!(code_of(r.await), Code::NotFound);

    // RESOURCE_EXHAUSTED: more channels than api.max_broadcast_channels (3).
    let r = api.broadcast(pb::BroadcastRequest {
        channels: (0..4).map(|i| format!("c{i}")).collect(),
        data: data(json!(1)),
        ..Default::default()
    });
    assert_eq!(code_of(r.await), Code::ResourceExhausted);

    // A message over api.max_request_size (4096) is refused before it is handled.
    let big = json!({"blob": "z".repeat(5000)});
    let r = api.publish(publish_req("news", big)).await;
    let code = code_of(r);
    assert!(matches!(code, Code::ResourceExhausted | Code::OutOfRange), "oversize: {code:?}");
    // Just under the limit is fine; nothing oversize reached history.
    api.publish(publish_req("news", json!({"blob": "z".repeat(3000)})))
        .await
        .expect("a message under the limit");
    let h = api
        .history(pb::HistoryRequest { channel: "news".into(), limit: -1, ..Default::default() })
        .await
        .expect("history")
        .into_inner();
    assert_eq!(h.publications.len(), 1, "only the accepted publish is kept");
    // The channel keeps working after all those errors.
    api.info(pb::InfoRequest {}).await.expect("info after errors");
    assert_healthy(&server).await;
}

#[tokio::test]
async fn idempotent_publish_is_delivered_once() {
    let server = start_api_node();
    let mut api = api(&server).await;
    let mut sub = server.connected("reader").await;
    sub.subscribe_ok("orders", json!({})).await;

    let req = |n: u32, key: &str| {
        let mut r = publish_req("orders", json!({"n": n}));
        r.idempotency_key = key.into();
        r
    };
    let first = api.publish(req(1, "order-1")).await.expect("first").into_inner();
    // Same key: the first result, nothing published (even with other data).
    for n in [1, 2] {
        let again = api.publish(req(n, "order-1")).await.expect("repeat").into_inner();
        assert_eq!((again.offset, &again.epoch), (first.offset, &first.epoch));
    }
    // The HTTP mirror shares the window.
    let (status, v) = http_api(
        &server,
        "publish",
        &json!({"channel": "orders", "data": {"n": 3}, "idempotency_key": "order-1"}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["offset"], first.offset, "{v}");
    // Another key publishes.
    let second = api.publish(req(4, "order-2")).await.expect("second").into_inner();
    assert_eq!(second.offset, first.offset + 1);

    let p = sub.recv_push().await;
    assert_eq!(*pub_data(&p), json!({"n": 1}), "{p}");
    let p = sub.recv_push().await;
    assert_eq!(*pub_data(&p), json!({"n": 4}), "{p}");
    sub.assert_silent(Duration::from_millis(300)).await;

    // The key is per channel: the same key elsewhere publishes.
    let mut other = publish_req("orders2", json!({"n": 5}));
    other.idempotency_key = "order-1".into();
    let r = api.publish(other).await.expect("other channel").into_inner();
    assert_eq!(r.offset, 1);
}

#[tokio::test]
async fn health_reflection_and_metrics() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::{ServerReflectionRequest, ServiceResponse};

    let server = start_api_node();
    let channel = grpc_channel(&server).await;

    // Health: the standard service answers without an API key.
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "fanfare.v1.ControlService"] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest { service: service.into() })
            .await
            .unwrap_or_else(|e| panic!("health check {service:?}: {e}"))
            .into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "{service:?}");
    }
    let r = health
        .check(tonic_health::pb::HealthCheckRequest { service: "no.such.Service".into() })
        .await;
    assert_eq!(code_of(r), Code::NotFound);

    // Reflection lists the services and serves the control API's descriptor.
    let mut refl = ServerReflectionClient::new(channel);
    let reqs = vec![
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        },
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "fanfare.v1.ControlService".into(),
            )),
        },
    ];
    let mut stream = refl
        .server_reflection_info(futures_util::stream::iter(reqs))
        .await
        .expect("reflection stream")
        .into_inner();
    let first = stream.message().await.expect("reflection reply").expect("a reply");
    let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else {
        panic!("expected a service list: {first:?}");
    };
    let names: Vec<&str> = list.service.iter().map(|s: &ServiceResponse| s.name.as_str()).collect();
    for s in ["fanfare.v1.ControlService", "grpc.health.v1.Health"] {
        assert!(names.contains(&s), "{s} not listed: {names:?}");
    }
    assert!(names.iter().any(|n| n.starts_with("grpc.reflection.")), "{names:?}");
    let second = stream.message().await.expect("reflection reply").expect("a reply");
    let Some(MessageResponse::FileDescriptorResponse(fd)) = second.message_response else {
        panic!("expected a file descriptor: {second:?}");
    };
    assert!(!fd.file_descriptor_proto.is_empty());

    // Per-method metrics, by protocol and code.
    let mut api = api(&server).await;
    api.publish(publish_req("news", json!(1))).await.expect("publish");
    api.publish(publish_req("news", json!(2))).await.expect("publish");
    let _ = api.publish(publish_req("bad channel", json!(1))).await;
    let _ = grpc_client(&server, Some("wrong")).await.info(pb::InfoRequest {}).await;
    http_api(&server, "publish", &json!({"channel": "news", "data": 3}));
    let ok = [("method", "publish"), ("protocol", "grpc"), ("code", "OK")];
    assert_eq!(metric_with(server.port, "fanfare_api_requests_total", &ok), 2.0);
    let bad = [("method", "publish"), ("protocol", "grpc"), ("code", "INVALID_ARGUMENT")];
    assert_eq!(metric_with(server.port, "fanfare_api_requests_total", &bad), 1.0);
    let http = [("method", "publish"), ("protocol", "http"), ("code", "OK")];
    assert_eq!(metric_with(server.port, "fanfare_api_requests_total", &http), 1.0);
    let dur = [("method", "publish"), ("protocol", "grpc")];
    let n = metric_with(server.port, "fanfare_api_request_duration_seconds_count", &dur);
    assert_eq!(n, 3.0, "duration histogram counts every call");
}

// Multi-thread: the clients' connections must keep running (answering the
// server's GOAWAY/PING) while the test thread blocks waiting for the exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_threads_serve_every_connection_and_stop_on_sigterm() {
    // `[grpc]` is written by the helper; `threads` comes from the environment.
    let mut server = Server::start_with_env(&api_node_toml(), &[("FANFARE__GRPC__THREADS", "3")]);
    let mut clients = Vec::new();
    for i in 0..5 {
        let mut c = api(&server).await;
        c.publish(publish_req("news", json!({"conn": i}))).await.expect("publish");
        clients.push(c);
    }
    // Every connection keeps working, in any order.
    for c in clients.iter_mut().rev() {
        c.info(pb::InfoRequest {}).await.expect("info");
    }
    let h = clients[0]
        .history(pb::HistoryRequest { channel: "news".into(), limit: -1, ..Default::default() })
        .await
        .expect("history")
        .into_inner();
    assert_eq!(h.publications.len(), 5);
    // Idle gRPC connections are closed gracefully on SIGTERM, promptly.
    let t = std::time::Instant::now();
    let status = server.sigterm();
    assert!(status.success(), "exit status {status}");
    assert!(t.elapsed() < Duration::from_secs(4), "shutdown took {:?}", t.elapsed());
    drop(clients);
}

#[tokio::test]
async fn unresponsive_grpc_client_does_not_block_shutdown() {
    let mut server = Server::start(&format!(
        "{}
[shutdown]
drain_timeout = \"2s\"\n",
        api_node_toml()
    ));
    let mut c = api(&server).await;
    c.info(pb::InfoRequest {}).await.expect("info");
    // This test's runtime has one thread, blocked below: the client's
    // connection cannot answer the server's graceful GOAWAY/PING.
    let t = std::time::Instant::now();
    let status = server.sigterm();
    assert!(status.success(), "exit status {status}");
    assert!(t.elapsed() < Duration::from_secs(6), "shutdown took {:?}", t.elapsed());
}

/// One raw HTTP/2 request to the gRPC port: (HTTP status, headers and
/// trailers merged, response body).
async fn raw_call(
    send: &mut h2::client::SendRequest<bytes::Bytes>,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, http::HeaderMap, Vec<u8>) {
    let mut req = http::Request::post(format!("http://127.0.0.1{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let (resp, mut stream) = send
        .clone()
        .ready()
        .await
        .expect("h2 ready")
        .send_request(req.body(()).unwrap(), false)
        .expect("send");
    stream.send_data(body.into(), true).expect("send body");
    let resp = tokio::time::timeout(Duration::from_secs(5), resp)
        .await
        .expect("answer in time")
        .expect("response");
    let (parts, mut recv) = resp.into_parts();
    let mut all = parts.headers;
    let mut out = Vec::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.expect("body");
        let _ = recv.flow_control().release_capacity(chunk.len());
        out.extend_from_slice(&chunk);
    }
    if let Some(t) = recv.trailers().await.expect("trailers") {
        all.extend(t);
    }
    (parts.status.as_u16(), all, out)
}

fn grpc_frame(msg: &[u8]) -> Vec<u8> {
    let mut f = vec![0];
    f.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    f.extend_from_slice(msg);
    f
}

#[tokio::test]
async fn malformed_grpc_requests_get_specific_statuses() {
    use prost::Message;
    let server = start_api_node();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", server.grpc_port)).await.unwrap();
    let (mut send, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(conn);
    let auth = format!("apikey {API_KEY}");
    let grpc = [("content-type", "application/grpc"), ("te", "trailers"), ("authorization", &auth)];
    let publish = pb::PublishRequest {
        channel: "news".into(),
        data: data(json!({"n": 1})),
        ..Default::default()
    }
    .encode_to_vec();
    let status =
        |h: &http::HeaderMap| h.get("grpc-status").map(|v| v.to_str().unwrap().to_string());
    let message = |h: &http::HeaderMap| {
        h.get("grpc-message").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default()
    };
    let publish_path = "/fanfare.v1.ControlService/Publish";

    // A well-formed call: 200, a response message, grpc-status 0.
    let (code, h, body) = raw_call(&mut send, publish_path, &grpc, grpc_frame(&publish)).await;
    assert_eq!((code, status(&h).as_deref()), (200, Some("0")));
    let reply = pb::PublishResponse::decode(&body[5..]).expect("a PublishResponse");
    assert_eq!(reply.offset, 1, "the first publication into news");

    // UNIMPLEMENTED (12): a method the service does not have.
    let (_, h, _) =
        raw_call(&mut send, "/fanfare.v1.ControlService/Nope", &grpc, grpc_frame(b"")).await;
    assert_eq!(status(&h).as_deref(), Some("12"), "{}", message(&h));
    // UNIMPLEMENTED (12) plus the encodings we accept: a compressed call.
    let mut gz = grpc.to_vec();
    gz.push(("grpc-encoding", "gzip"));
    let (_, h, _) = raw_call(&mut send, publish_path, &gz, grpc_frame(&publish)).await;
    assert_eq!(status(&h).as_deref(), Some("12"));
    assert_eq!(h.get("grpc-accept-encoding").unwrap(), "identity");
    // HTTP 415: not a gRPC content type.
    let mut plain = grpc.to_vec();
    plain[0] = ("content-type", "application/json");
    let (code, _, _) = raw_call(&mut send, publish_path, &plain, grpc_frame(&publish)).await;
    assert_eq!(code, 415);
    // INTERNAL (13): framing errors, each with its own message.
    let mut two = grpc_frame(&publish);
    two.extend(grpc_frame(&publish));
    let mut flagged = grpc_frame(&publish);
    flagged[0] = 1;
    let mut cut = grpc_frame(&publish);
    cut.truncate(cut.len() - 3);
    for (body, what) in [
        (two, "more than one"),
        (flagged, "compressed"),
        (cut, "ends inside"),
        (vec![], "no message"),
    ] {
        let (_, h, _) = raw_call(&mut send, publish_path, &grpc, body).await;
        assert_eq!(status(&h).as_deref(), Some("13"), "{what}");
        assert!(message(&h).contains(what), "{what}: {}", message(&h));
    }
    // INVALID_ARGUMENT (3): bytes that are not a PublishRequest.
    let (_, h, _) = raw_call(&mut send, publish_path, &grpc, grpc_frame(&[0xff, 0xff, 0xff])).await;
    assert_eq!(status(&h).as_deref(), Some("3"));
    assert!(message(&h).contains("PublishRequest"), "{}", message(&h));
    // RESOURCE_EXHAUSTED (8): a declared length over api.max_request_size.
    let mut huge = vec![0];
    huge.extend_from_slice(&(64u32 << 20).to_be_bytes());
    let (_, h, _) = raw_call(&mut send, publish_path, &grpc, huge).await;
    assert_eq!(status(&h).as_deref(), Some("8"));
    // A grpc-timeout that is not one.
    let mut bad_timeout = grpc.to_vec();
    bad_timeout.push(("grpc-timeout", "soon"));
    let (_, h, _) = raw_call(&mut send, publish_path, &bad_timeout, grpc_frame(&publish)).await;
    assert_eq!(status(&h).as_deref(), Some("3"));
    assert!(message(&h).contains("grpc-timeout"), "{}", message(&h));
    // UNAUTHENTICATED (16) without the key.
    let (_, h, _) = raw_call(&mut send, publish_path, &grpc[..2], grpc_frame(&publish)).await;
    assert_eq!(status(&h).as_deref(), Some("16"));

    // The same connection still serves calls, with a valid grpc-timeout too.
    let mut timed = grpc.to_vec();
    timed.push(("grpc-timeout", "5S"));
    let (code, h, body) = raw_call(&mut send, publish_path, &timed, grpc_frame(&publish)).await;
    assert_eq!((code, status(&h).as_deref()), (200, Some("0")));
    // None of the refused calls published anything.
    let reply = pb::PublishResponse::decode(&body[5..]).expect("a PublishResponse");
    assert_eq!(reply.offset, 2, "only the two good calls published");
    assert_healthy(&server).await;
}
