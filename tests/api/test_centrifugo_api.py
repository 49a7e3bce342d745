"""Centrifugo's server API on fanfare, driven the way a backend built for
Centrifugo drives it: `cent` (PyPI, Centrifugo's Python API client) pointed at
`http://<node>/centrifugo/api`, and a grpcio client of
`centrifugal.centrifugo.api.CentrifugoApi` generated at test time from our
proto/centrifugo/api.proto. Effects are watched from WebSocket clients on
another node of the same three-node cluster (one redis-server)."""

import base64
import json
import time

import grpc
import pytest
from cent import (
    BatchRequest,
    BroadcastRequest,
    ChannelsRequest,
    Client,
    Disconnect,
    DisconnectRequest,
    HistoryRemoveRequest,
    HistoryRequest,
    InfoRequest,
    PresenceRequest,
    PresenceStatsRequest,
    PublishRequest,
    RefreshRequest,
    SubscribeRequest,
    UnsubscribeRequest,
    UpdateUserStatusRequest,
)
from cent.exceptions import CentApiResponseError, CentTransportError, CentUnauthorizedError

from conftest import API_KEY, http_post, metric

GRPC_PREFIX = "/centrifugal.centrifugo.api.CentrifugoApi/"


def cent(node, key=API_KEY) -> Client:
    return Client(f"http://127.0.0.1:{node.port}/centrifugo/api", key, timeout=10)


def api_error(call) -> CentApiResponseError:
    with pytest.raises(CentApiResponseError) as e:
        call()
    assert e.value.message, e.value
    return e.value


def post(node, method, body, key=API_KEY):
    """A raw POST /centrifugo/api/<method> with `X-API-Key`."""
    return http_post(node.port, f"/centrifugo/api/{method}", json.dumps(body).encode(),
                     {"X-API-Key": key, "Content-Type": "application/json"})


def pub_push(ws, channel):
    return ws.recv_matching(lambda v: v.get("push", {}).get("channel") == channel
                            and "pub" in v["push"])["push"]["pub"]


def grpc_api(node, cpb, key=API_KEY):
    _, pb2_grpc = cpb
    md = [("authorization", f"apikey {key}")]
    stub = pb2_grpc.CentrifugoApiStub(node.channel())

    class Api:
        def __getattr__(self, method):
            rpc = getattr(stub, method)
            return lambda req: rpc(req, metadata=md, timeout=10)

    return Api()


# ---------------------------------------------------------------- cent over HTTP


def test_a_publish_through_cent_reaches_a_subscriber_on_another_node(cluster):
    a, b = cluster[0], cluster[1]
    ws = b.ws("cent-reader")
    ws.subscribe("cent-news")
    r = cent(a).publish(PublishRequest(channel="cent-news", data={"text": "hi"},
                                       tags={"k": "v"}, idempotency_key="once"))
    assert r.offset >= 1 and r.epoch
    assert pub_push(ws, "cent-news")["data"] == {"text": "hi"}
    # The same idempotency key again: the first result, nothing delivered.
    again = cent(a).publish(PublishRequest(channel="cent-news", data={"text": "hi"},
                                           idempotency_key="once"))
    assert (again.offset, again.epoch) == (r.offset, r.epoch)
    ws.assert_silent()
    # b64data: binary-safe form of the same JSON.
    cent(a).publish(PublishRequest(channel="cent-news", data=None,
                                   b64data=base64.b64encode(b'{"n":2}').decode()))
    assert pub_push(ws, "cent-news")["data"] == {"n": 2}
    ws.close()


def test_a_broadcast_answers_per_channel_and_a_bad_channel_fails_alone(cluster):
    ws = cluster[2].ws("cent-bc")
    ws.subscribe("cent-bc-1")
    r = cent(cluster[0]).broadcast(BroadcastRequest(channels=["cent-bc-1", "nope:x"], data=[1]))
    assert len(r.responses) == 2
    assert r.responses[0].error is None and r.responses[0].result.offset >= 1
    assert r.responses[1].error.code == 102
    assert pub_push(ws, "cent-bc-1")["data"] == [1]
    ws.close()


def test_presence_channels_and_stats_show_a_subscriber_of_another_node(cluster):
    ws = cluster[1].ws("cent-present")
    ws.subscribe("cent-room")
    c = cent(cluster[0])
    p = c.presence(PresenceRequest(channel="cent-room")).presence
    assert p[ws.client_id].user == "cent-present"
    assert p[ws.client_id].client == ws.client_id
    stats = c.presence_stats(PresenceStatsRequest(channel="cent-room"))
    assert (stats.num_clients, stats.num_users) == (1, 1)
    chans = c.channels(ChannelsRequest(pattern="cent-room*")).channels
    assert chans["cent-room"].num_clients == 1
    ws.close()


def test_info_lists_every_node_in_centrifugos_shape(cluster):
    deadline = time.monotonic() + 10
    while True:
        nodes = cent(cluster[2]).info(InfoRequest()).nodes
        names = sorted(n.name for n in nodes)
        if names == ["node-a", "node-b", "node-c"] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert names == ["node-a", "node-b", "node-c"]
    assert all(n.uid and n.version and n.uptime >= 0 for n in nodes)


def test_history_remove_drops_publications_and_keeps_the_position(cluster):
    c = cent(cluster[0])
    for i in range(3):
        c.publish(PublishRequest(channel="cent-hist", data={"i": i}))
    h = c.history(HistoryRequest(channel="cent-hist", limit=-1))
    assert [p.data for p in h.publications] == [{"i": 0}, {"i": 1}, {"i": 2}]
    newest = c.history(HistoryRequest(channel="cent-hist", limit=1, reverse=True))
    assert [p.data for p in newest.publications] == [{"i": 2}]
    c.history_remove(HistoryRemoveRequest(channel="cent-hist"))
    after = cent(cluster[1]).history(HistoryRequest(channel="cent-hist", limit=-1))
    assert after.publications == []
    assert (after.offset, after.epoch) == (h.offset, h.epoch)


def test_refresh_moves_a_connections_expiry_and_expired_closes_it(cluster):
    ws = cluster[1].ws("cent-refresh")
    cent(cluster[0]).refresh(RefreshRequest(user="cent-refresh", expire_at=int(time.time()) + 2))
    push = ws.push()["push"]
    assert push["refresh"]["expires"] is True and push["refresh"]["ttl"] <= 2
    code, _ = ws.expect_close(timeout=6)
    assert code == 3005
    other = cluster[2].ws("cent-refresh-2")
    cent(cluster[0]).refresh(RefreshRequest(user="cent-refresh-2", expired=True))
    assert other.expect_close()[0] == 3005


def test_subscribe_unsubscribe_and_disconnect_reach_a_users_connection(cluster):
    ws = cluster[2].ws("cent-target")
    c = cent(cluster[0])
    c.subscribe(SubscribeRequest(user="cent-target", channel="cent-server-side"))
    assert ws.push()["push"]["channel"] == "cent-server-side"
    c.unsubscribe(UnsubscribeRequest(user="cent-target", channel="cent-server-side"))
    assert "unsubscribe" in ws.push()["push"]
    c.disconnect(DisconnectRequest(user="cent-target",
                                   disconnect=Disconnect(code=4501, reason="go away")))
    assert ws.expect_close() == (4501, "go away")


def test_a_batch_runs_its_commands_in_order_or_in_parallel(cluster):
    ws = cluster[1].ws("cent-batch")
    ws.subscribe("cent-batch")
    c = cent(cluster[0])
    for parallel in (False, True):
        r = c.batch(BatchRequest(requests=[
            PublishRequest(channel="cent-batch", data={"p": parallel}),
            PresenceStatsRequest(channel="cent-batch"),
        ], parallel=parallel))
        assert r.replies[0].offset >= 1
        assert r.replies[1].num_clients == 1
        assert pub_push(ws, "cent-batch")["data"] == {"p": parallel}
    ws.close()


def test_each_error_answers_with_centrifugos_code(cluster):
    node = cluster[0]
    with pytest.raises(CentUnauthorizedError):
        cent(node, key="wrong").info(InfoRequest())
    c = cent(node)
    assert api_error(lambda: c.publish(PublishRequest(channel="nope:x", data=1))).code == 102
    assert api_error(lambda: c.publish(PublishRequest(channel="", data=1))).code == 107
    assert api_error(lambda: c.publish(PublishRequest(channel="cent-e", data=None))).code == 107
    # The cluster allows 3 channels per broadcast.
    four = [f"cent-l{i}" for i in range(4)]
    assert api_error(lambda: c.broadcast(BroadcastRequest(channels=four, data=1))).code == 106
    # Presence is off in namespace "plain": not available.
    assert api_error(lambda: c.presence(PresenceRequest(channel="plain:x"))).code == 108
    pro = api_error(lambda: c.update_user_status(UpdateUserStatusRequest(users=["u"], state="x")))
    assert pro.code == 108 and "PRO" in pro.message
    # A field fanfare does not support is refused rather than ignored.
    e = api_error(lambda: c.subscribe(SubscribeRequest(user="u", channel="x", session="s")))
    assert e.code == 107 and "session" in e.message
    # cent has no rpc call: the raw HTTP request a backend would send.
    st, body = post(node, "rpc", {"method": "sum", "params": {"a": 1}})
    assert st == 200 and body["error"]["code"] == 108, body
    assert "rpc_proxy" in body["error"]["message"]
    st, body = post(node, "no_such_method", {})
    assert st == 404 and body["error"]["code"] == 104, body
    with pytest.raises(CentTransportError) as t:
        Client(f"http://127.0.0.1:{node.port}/centrifugo/api/nested", API_KEY).info(InfoRequest())
    assert t.value.status_code == 404
    st, body = http_post(node.port, "/centrifugo/api/publish", b"{not json",
                         {"X-API-Key": API_KEY})
    assert st == 400 and body["error"]["code"] == 107, body
    st, body = post(node, "batch", {"commands": [{"get_user_status": {}}, {"zzz": {}},
                                                 {"info": {}, "publish": {}}]})
    assert st == 200, body
    assert [r["error"]["code"] for r in body["replies"]] == [108, 104, 107]


# Every request field fanfare refuses (`Unsupported` in
# crates/fanfare-server/src/centrifugo/mod.rs), with the method that has it and
# a value that sets it. Ignoring one would do something else than asked (a
# disconnect meant for one session would close all of the user's), so each
# must be answered 107 and change nothing.
REFUSED_FIELDS = [
    ("publish", "version", 2),
    ("broadcast", "version", 2),
    ("subscribe", "session", "s1"),
    ("subscribe", "expire_at", 4102444800),
    ("subscribe", "info", {"role": "guest"}),
    ("subscribe", "b64info", base64.b64encode(b'{"role":"guest"}').decode()),
    ("subscribe", "data", {"welcome": 1}),
    ("subscribe", "b64data", base64.b64encode(b'{"welcome":1}').decode()),
    ("subscribe", "recover_since", {"offset": 1, "epoch": "e"}),
    ("subscribe", "override", {"presence": {"value": False}}),
    ("unsubscribe", "session", "s1"),
    ("disconnect", "session", "s1"),
    ("disconnect", "whitelist", ["some-client"]),
    ("refresh", "session", "s1"),
    ("refresh", "info", {"role": "guest"}),
]
REFUSED_IDS = [f"{m}-{f}" for m, f, _ in REFUSED_FIELDS]


def refused_request(method, name):
    """A valid request of `method` about user and channel `name`: without a
    refused field it would publish into the channel, subscribe the user to
    another one, unsubscribe it, disconnect it or send it a refresh."""
    return {
        "publish": {"channel": name, "data": {"refused": True}},
        "broadcast": {"channels": [name], "data": {"refused": True}},
        "subscribe": {"user": name, "channel": name + "-other"},
        "unsubscribe": {"user": name, "channel": name},
        "disconnect": {"user": name, "disconnect": {"code": 4501, "reason": "refused"}},
        "refresh": {"user": name, "expire_at": int(time.time()) + 3600},
    }[method]


def first_push_is_the_publication(ws, channel, data):
    """The still-connected, still-subscribed user hears of nothing before the
    publication made after the refused call."""
    push = ws.push()["push"]
    assert push.get("channel") == channel and push["pub"]["data"] == data, push


@pytest.mark.parametrize("method,field,value", REFUSED_FIELDS, ids=REFUSED_IDS)
def test_an_unsupported_field_is_refused_with_107_naming_it_and_changes_nothing(
        cluster, method, field, value):
    node = cluster[0]
    name = f"cent-refused-{method}-{field}"
    ws = node.ws(name)
    ws.subscribe(name)
    st, body = post(node, method, {**refused_request(method, name), field: value})
    assert st == 200 and "result" not in body, body
    assert body["error"]["code"] == 107, body
    assert body["error"]["message"].startswith(f"{field}:"), body
    # The node goes on serving: a normal publish succeeds.
    st, body = post(node, "publish", {"channel": name, "data": {"after": field}})
    assert st == 200 and body["result"]["offset"] >= 1, body
    first_push_is_the_publication(ws, name, {"after": field})
    ws.close()


@pytest.mark.parametrize("method,field,value", REFUSED_FIELDS, ids=REFUSED_IDS)
def test_an_unsupported_field_is_refused_with_107_over_grpc_too(cluster, cpb, method, field,
                                                                 value):
    pb2, _ = cpb
    node = cluster[0]
    name = f"grpc-refused-{method}-{field}"
    ws = node.ws(name)
    ws.subscribe(name)
    # The same request as Protobuf: JSON fields are bytes, objects messages.
    req = refused_request(method, name)
    if "data" in req:
        req["data"] = json.dumps(req["data"]).encode()
    if "disconnect" in req:
        req["disconnect"] = pb2.Disconnect(**req["disconnect"])
    if field == "recover_since":
        value = pb2.StreamPosition(**value)
    elif field == "override":
        value = pb2.SubscribeOptionOverride(presence=pb2.BoolValue(**value["presence"]))
    elif isinstance(value, dict):
        value = json.dumps(value).encode()
    call = method.capitalize()
    request = getattr(pb2, f"{call}Request")(**req, **{field: value})
    r = getattr(grpc_api(node, cpb), call)(request)
    assert not r.HasField("result"), r
    assert r.error.code == 107 and r.error.message.startswith(f"{field}:"), r
    after = grpc_api(node, cpb).Publish(pb2.PublishRequest(channel=name, data=b'{"after":1}'))
    assert not after.HasField("error") and after.result.offset >= 1, after
    first_push_is_the_publication(ws, name, {"after": 1})
    ws.close()


def test_calls_are_counted_per_method_under_their_own_protocol(cluster, cpb):
    pb2, _ = cpb
    node = cluster[2]
    before = metric(node.port, "fanfare_api_requests_total", method="presence_stats",
                    protocol="centrifugo_http", code="OK")
    cent(node).presence_stats(PresenceStatsRequest(channel="cent-m"))
    after = metric(node.port, "fanfare_api_requests_total", method="presence_stats",
                   protocol="centrifugo_http", code="OK")
    assert after == before + 1
    grpc_api(node, cpb).Publish(pb2.PublishRequest(channel="nope:m", data=b"1"))
    assert metric(node.port, "fanfare_api_requests_total", method="publish",
                  protocol="centrifugo_grpc", code="102") >= 1


# ---------------------------------------------------------------- gRPC


def test_grpc_publish_history_and_remove_as_centrifugos_service(cluster, cpb):
    pb2, _ = cpb
    ws = cluster[1].ws("grpc-reader")
    ws.subscribe("grpc-news")
    api = grpc_api(cluster[0], cpb)
    r = api.Publish(pb2.PublishRequest(channel="grpc-news", data=b'{"g":1}'))
    assert not r.HasField("error") and r.result.offset >= 1
    assert pub_push(ws, "grpc-news")["data"] == {"g": 1}
    h = api.History(pb2.HistoryRequest(channel="grpc-news", limit=-1))
    assert [json.loads(p.data) for p in h.result.publications] == [{"g": 1}]
    assert not api.HistoryRemove(pb2.HistoryRemoveRequest(channel="grpc-news")).HasField("error")
    h2 = api.History(pb2.HistoryRequest(channel="grpc-news", limit=-1))
    assert list(h2.result.publications) == [] and h2.result.offset == h.result.offset
    p = api.Presence(pb2.PresenceRequest(channel="grpc-news"))
    assert p.result.presence[ws.client_id].user == "grpc-reader"
    info = api.Info(pb2.InfoRequest())
    assert len(info.result.nodes) == 3
    ws.close()


def test_grpc_errors_are_in_the_response_as_centrifugo_sends_them(cluster, cpb):
    pb2, _ = cpb
    api = grpc_api(cluster[0], cpb)
    r = api.Publish(pb2.PublishRequest(channel="nope:g", data=b"1"))
    assert r.error.code == 102 and not r.HasField("result")
    assert api.Publish(pb2.PublishRequest(channel="grpc-e", data=b"{bad")).error.code == 107
    assert api.RPC(pb2.RPCRequest(method="sum", params=b"{}")).error.code == 108
    b = api.Broadcast(pb2.BroadcastRequest(channels=["a", "b", "c", "d"], data=b"1"))
    assert b.error.code == 106
    batch = api.Batch(pb2.BatchRequest(commands=[
        pb2.Command(publish=pb2.PublishRequest(channel="grpc-batch", data=b"1")),
        pb2.Command(update_user_status=pb2.NotAvailableRequest()),
        pb2.Command(),
    ], parallel=True))
    assert batch.replies[0].publish.offset >= 1
    assert [r.error.code for r in batch.replies[1:]] == [108, 104]
    # A paid-edition method at its usual path: a response with error 108.
    ch = cluster[0].channel()
    pro = ch.unary_unary(GRPC_PREFIX + "UpdateUserStatus",
                         request_serializer=lambda b: b,
                         response_deserializer=pb2.PublishResponse.FromString)
    assert pro(b"", metadata=[("authorization", f"apikey {API_KEY}")], timeout=5).error.code == 108
    unknown = ch.unary_unary(GRPC_PREFIX + "NoSuchMethod",
                             request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as e:
        unknown(b"", metadata=[("authorization", f"apikey {API_KEY}")], timeout=5)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with pytest.raises(grpc.RpcError) as e:
        grpc_api(cluster[0], cpb, key="wrong").Info(pb2.InfoRequest())
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
