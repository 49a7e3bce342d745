"""The control API from an independent client: grpcio stubs generated from
proto/ at test time, plain HTTP with urllib, WebSocket subscribers with
`websockets`; three fanfare nodes on one redis-server."""

import json
import time

import grpc
import pytest

from conftest import API_KEY, metric

C = grpc.StatusCode


def jdata(v) -> bytes:
    return json.dumps(v).encode()


def status_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert e.value.details(), e.value
    return e.value.code()


def assert_http_error(resp, status, code):
    st, body = resp
    assert st == status, (st, body)
    assert body["error"]["code"] == code, body
    assert body["error"]["message"], body


# ---------------------------------------------------------------- cluster scenarios


def test_info_reports_all_three_nodes(cluster, pb):
    pb2, _ = pb
    for node in cluster:
        api = node.stub(pb)
        deadline = time.monotonic() + 10
        while True:
            names = sorted(n.name for n in api.Info(pb2.InfoRequest()).nodes)
            if names == ["node-a", "node-b", "node-c"] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert names == ["node-a", "node-b", "node-c"]
    st, body = cluster[1].api("info", {})
    assert st == 200, body
    assert sorted(n["name"] for n in body["nodes"]) == ["node-a", "node-b", "node-c"]
    assert len({n["uid"] for n in body["nodes"]}) == 3


def test_publish_on_a_reaches_subscriber_on_c(cluster, pb):
    pb2, _ = pb
    a, b, c = cluster
    sub = c.ws("reader")
    sub.subscribe("pynews")
    r = a.stub(pb).Publish(pb2.PublishRequest(channel="pynews", data=jdata({"from": "a"}),
                                              tags={"k": "v"}))
    assert r.offset == 1 and r.epoch
    p = sub.push()
    assert p["push"]["channel"] == "pynews"
    assert p["push"]["pub"]["data"] == {"from": "a"}
    assert p["push"]["pub"]["tags"] == {"k": "v"}
    # HTTP on B, too.
    st, body = b.api("publish", {"channel": "pynews", "data": [1, "two"]})
    assert (st, body["offset"], body["epoch"]) == (200, 2, r.epoch)
    assert sub.push()["push"]["pub"]["data"] == [1, "two"]
    # History through any node.
    h = c.stub(pb).History(pb2.HistoryRequest(channel="pynews", limit=-1))
    assert [json.loads(p.data) for p in h.publications] == [{"from": "a"}, [1, "two"]]
    sub.assert_silent()
    sub.close()


def test_idempotent_publish_is_delivered_once(cluster, pb):
    pb2, _ = pb
    a, b, c = cluster
    sub = c.ws("reader")
    sub.subscribe("orders")
    req = pb2.PublishRequest(channel="orders", data=jdata({"order": 1}), idempotency_key="o-1")
    first = a.stub(pb).Publish(req)
    again = b.stub(pb).Publish(req)
    assert (again.offset, again.epoch) == (first.offset, first.epoch)
    st, body = a.api("publish", {"channel": "orders", "data": {"order": 1},
                                 "idempotency_key": "o-1"})
    assert (st, body["offset"]) == (200, first.offset)
    other = a.stub(pb).Publish(pb2.PublishRequest(channel="orders", data=jdata({"order": 2}),
                                                  idempotency_key="o-2"))
    assert other.offset == first.offset + 1
    assert sub.push()["push"]["pub"]["data"] == {"order": 1}
    assert sub.push()["push"]["pub"]["data"] == {"order": 2}
    sub.assert_silent(0.5)
    sub.close()


def test_user_methods_across_nodes(cluster, pb):
    pb2, _ = pb
    a, b, c = cluster
    on_b, on_c1, on_c2 = b.ws("42"), c.ws("42"), c.ws("42")
    bystander = c.ws("7")
    everyone = (on_b, on_c1, on_c2)

    # PublishToUser on A reaches every connection of the user on B and C.
    a.stub(pb).PublishToUser(pb2.PublishToUserRequest(user="42", data=jdata({"dm": 1})))
    for u in everyone:
        p = u.push()
        assert p["push"]["channel"] == "#42", p
        assert p["push"]["pub"]["data"] == {"dm": 1}, p
    bystander.assert_silent()

    # Subscribe on A: each SDK connection gets a `subscribe` push.
    a.stub(pb).Subscribe(pb2.SubscribeRequest(user="42", channel="pyroom"))
    for u in everyone:
        p = u.push()
        assert p["push"]["channel"] == "pyroom" and "subscribe" in p["push"], p
    st, _ = b.api("publish", {"channel": "pyroom", "data": {"hi": "room"}})
    assert st == 200
    for u in everyone:
        assert u.push()["push"]["pub"]["data"] == {"hi": "room"}

    # Channels on any node counts the subscribers of all nodes.
    chans = a.stub(pb).Channels(pb2.ChannelsRequest(pattern="pyroom")).channels
    assert dict((k, v.num_clients) for k, v in chans.items()) == {"pyroom": 3}
    st, body = c.api("channels", {"pattern": "#4?"})
    assert (st, body) == (200, {"channels": {"#42": {"num_clients": 3}}})
    stats = b.stub(pb).PresenceStats(pb2.PresenceStatsRequest(channel="pyroom"))
    assert (stats.num_clients, stats.num_users) == (3, 1)
    presence = c.stub(pb).Presence(pb2.PresenceRequest(channel="pyroom")).clients
    assert sorted(presence) == sorted(u.client_id for u in everyone)

    # Unsubscribe over HTTP on C: an unsubscribe push everywhere.
    st, body = c.api("unsubscribe", {"user": "42", "channel": "pyroom"})
    assert (st, body) == (200, {})
    for u in everyone:
        p = u.push()
        assert p["push"]["unsubscribe"]["code"] == 2000, p

    # Disconnect on A closes the user's connections on B and C with the code.
    a.stub(pb).Disconnect(pb2.DisconnectRequest(user="42", code=4005, reason="py kick"))
    for u in everyone:
        assert u.expect_close() == (4005, "py kick")
    bystander.assert_silent()
    bystander.close()


def test_grpc_error_statuses(cluster, pb):
    pb2, _ = pb
    a = cluster[0]
    api = a.stub(pb)
    P = pb2.PublishRequest
    for req in [
        P(channel="bad channel", data=b"{}"),
        P(channel="", data=b"{}"),
        P(channel="nope:x", data=b"{}"),  # unknown namespace
        P(channel="ok", data=b""),  # empty data
        P(channel="ok", data=b"{oops"),  # not JSON
    ]:
        assert status_of(lambda: api.Publish(req)) == C.INVALID_ARGUMENT, req
    assert status_of(lambda: api.PublishToUser(pb2.PublishToUserRequest(data=b"1"))) \
        == C.INVALID_ARGUMENT
    assert status_of(lambda: api.Disconnect(pb2.DisconnectRequest(user="x", code=1000))) \
        == C.INVALID_ARGUMENT
    # NOT_FOUND: the `plain` namespace has neither presence nor history.
    assert status_of(lambda: api.Presence(pb2.PresenceRequest(channel="plain:x"))) == C.NOT_FOUND
    assert status_of(lambda: api.History(pb2.HistoryRequest(channel="plain:x"))) == C.NOT_FOUND
    # RESOURCE_EXHAUSTED: more than max_broadcast_channels (3).
    req = pb2.BroadcastRequest(channels=["a", "b", "c", "d"], data=b"1")
    assert status_of(lambda: api.Broadcast(req)) == C.RESOURCE_EXHAUSTED
    # Oversize request (max_request_size = 4096).
    big = P(channel="ok", data=jdata({"blob": "z" * 5000}))
    assert status_of(lambda: api.Publish(big)) in (C.RESOURCE_EXHAUSTED, C.OUT_OF_RANGE)
    # UNAUTHENTICATED: missing or wrong key.
    for key in (None, "wrong", ""):
        s = a.stub(pb, key=key)
        assert status_of(lambda: s.Publish(P(channel="ok", data=b"1"))) == C.UNAUTHENTICATED
        assert status_of(lambda: s.Info(pb2.InfoRequest())) == C.UNAUTHENTICATED
    # The key as a bare value or another scheme is refused too.
    _, pb2_grpc = pb
    raw = pb2_grpc.ControlServiceStub(a.channel())
    for value in (API_KEY, f"Bearer {API_KEY}"):
        with pytest.raises(grpc.RpcError) as e:
            raw.Info(pb2.InfoRequest(), metadata=[("authorization", value)], timeout=5)
        assert e.value.code() == C.UNAUTHENTICATED
    # Metrics carry method, protocol and code.
    assert metric(a.port, "fanfare_api_requests_total",
                  method="publish", protocol="grpc", code="INVALID_ARGUMENT") >= 5
    assert metric(a.port, "fanfare_api_requests_total",
                  method="broadcast", protocol="grpc", code="RESOURCE_EXHAUSTED") >= 1


def test_http_error_statuses(cluster):
    a = cluster[0]
    assert_http_error(a.api("publish", {"channel": "bad channel", "data": 1}), 400,
                      "INVALID_ARGUMENT")
    assert_http_error(a.api("publish", {"channel": "nope:x", "data": 1}), 400, "INVALID_ARGUMENT")
    assert_http_error(a.api("publish", {"channel": "ok"}), 400, "INVALID_ARGUMENT")
    assert_http_error(a.api("publish", b"{not json"), 400, "INVALID_ARGUMENT")
    assert_http_error(a.api("publish", {"channel": "ok", "data": 1}, key=None), 401,
                      "UNAUTHENTICATED")
    assert_http_error(a.api("publish", {"channel": "ok", "data": 1}, key="wrong"), 401,
                      "UNAUTHENTICATED")
    assert_http_error(a.api("info", {}, key=None, headers={"X-API-Key": "wrong"}), 401,
                      "UNAUTHENTICATED")
    st, _ = a.api("info", {}, key=None, headers={"X-API-Key": API_KEY})
    assert st == 200
    assert_http_error(a.api("presence", {"channel": "plain:x"}), 404, "NOT_FOUND")
    assert_http_error(a.api("history", {"channel": "plain:x"}), 404, "NOT_FOUND")
    assert_http_error(a.api("nonexistent", {}), 404, "NOT_FOUND")
    assert_http_error(a.api("broadcast", {"channels": ["a", "b", "c", "d"], "data": 1}), 429,
                      "RESOURCE_EXHAUSTED")
    assert_http_error(a.api("publish", {"channel": "ok", "data": "z" * 5000}), 413,
                      "RESOURCE_EXHAUSTED")
    assert metric(a.port, "fanfare_api_requests_total",
                  method="publish", protocol="http", code="INVALID_ARGUMENT") >= 4


def test_health_and_reflection(cluster):
    a = cluster[0]
    ch = a.channel()
    # grpc.health.v1.Health/Check, encoded by hand: request {service: ""} is
    # empty; the reply {status: SERVING} is field 1 = 1.
    check = ch.unary_unary("/grpc.health.v1.Health/Check",
                           request_serializer=lambda b: b, response_deserializer=lambda b: b)
    assert check(b"", timeout=5) == b"\x08\x01"
    svc = b"fanfare.v1.ControlService"
    assert check(b"\x0a" + bytes([len(svc)]) + svc, timeout=5) == b"\x08\x01"
    # Reflection: ServerReflectionRequest {list_services: ""} (field 7).
    for version in ("v1", "v1alpha"):
        info = ch.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                                request_serializer=lambda b: b,
                                response_deserializer=lambda b: b)
        try:
            replies = list(info(iter([b"\x3a\x00"]), timeout=5))
        except grpc.RpcError as e:
            assert version == "v1alpha" and e.code() == C.UNIMPLEMENTED, e
            continue
        assert len(replies) == 1
        assert svc in replies[0] and b"grpc.health.v1.Health" in replies[0], replies


def test_grpc_metrics_in_prometheus(cluster, pb):
    pb2, _ = pb
    b = cluster[1]
    before = metric(b.port, "fanfare_api_requests_total",
                    method="publish", protocol="grpc", code="OK")
    for i in range(3):
        b.stub(pb).Publish(pb2.PublishRequest(channel="metered", data=jdata(i)))
    after = metric(b.port, "fanfare_api_requests_total",
                   method="publish", protocol="grpc", code="OK")
    assert after - before == 3
    assert metric(b.port, "fanfare_api_request_duration_seconds_count",
                  method="publish", protocol="grpc") >= 3


# ---------------------------------------------------------------- broker down


def test_broker_down_is_unavailable(lonely, pb):
    pb2, _ = pb
    node, redis = lonely
    api = node.stub(pb)
    api.Publish(pb2.PublishRequest(channel="x", data=b"1"))
    redis.kill()
    t = time.monotonic()
    assert status_of(lambda: api.Publish(pb2.PublishRequest(channel="x", data=b"2"))) \
        == C.UNAVAILABLE
    assert status_of(lambda: api.Publish(pb2.PublishRequest(channel="x", data=b"3"))) \
        == C.UNAVAILABLE
    assert_http_error(node.api("publish", {"channel": "x", "data": 4}), 503, "UNAVAILABLE")
    assert time.monotonic() - t < 5
    # The node itself stays up and says so.
    assert node.proc.poll() is None
