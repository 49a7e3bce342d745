"""Lifecycle webhooks (issue 15, decision 26) against real fanfare binaries,
real redis-server processes and a real HTTP receiver in this process.

The receiver (stdlib http.server in a thread) does what a backend should:
verifies `X-Fanfare-Signature` (HMAC-SHA256 of "<t>.<body>", refusing a bad
one or a timestamp older than five minutes with 401), drops event ids it has
seen, and can be told to answer 500 for a while.
"""

import hashlib
import hmac
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import Node, Redis, free_port, metric, node_toml

HOOK_SECRET = "hook-secret"
MAX_AGE = 300


def verify(secret: str, header: str, body: bytes, now: float | None = None) -> bool:
    """What a receiver does with `X-Fanfare-Signature: t=<unix>,v1=<hex>`."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        t = int(parts["t"])
    except (ValueError, KeyError):
        return False
    if abs((now or time.time()) - t) > MAX_AGE:
        return False
    want = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(want, parts.get("v1", ""))


class Receiver:
    """A webhook endpoint: verifies, dedups by id, keeps arrival order."""

    def __init__(self, secret: str = HOOK_SECRET):
        self.secret = secret
        self.lock = threading.Lock()
        self.failing = False
        self.events = []  # accepted, first copy of each id, in arrival order
        self.seen = set()
        self.duplicates = 0
        self.posts = defaultdict(int)  # status -> count
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status = receiver.handle(self.headers.get("X-Fanfare-Signature", ""), body)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks"

    def handle(self, signature: str, body: bytes) -> int:
        with self.lock:
            if not verify(self.secret, signature, body):
                status = 401
            elif self.failing:
                status = 500
            else:
                status = 200
                for e in json.loads(body)["events"]:
                    if e["id"] in self.seen:
                        self.duplicates += 1
                        continue
                    self.seen.add(e["id"])
                    self.events.append(e)
            self.posts[status] += 1
            return status

    def of(self, **match):
        with self.lock:
            return [e for e in self.events if all(e.get(k) == v for k, v in match.items())]

    def wait_for(self, pred, timeout=15.0, what="events"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            time.sleep(0.05)
        with self.lock:
            got = [(e["type"], e.get("channel"), e.get("user")) for e in self.events]
        raise AssertionError(f"timed out waiting for {what}; got {got}")

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def post(url: str, body: bytes, signature: str) -> int:
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"X-Fanfare-Signature": signature})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def redis_cmd(port: int, *args):
    """One command over RESP2 to the test's redis-server; the parsed reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        out = f"*{len(args)}\r\n".encode()
        for a in args:
            a = str(a).encode()
            out += b"$%d\r\n%s\r\n" % (len(a), a)
        s.sendall(out)
        f = s.makefile("rb")

        def read():
            line = f.readline()[:-2]
            kind, rest = line[:1], line[1:]
            if kind in (b"+", b"-"):
                return rest.decode()
            if kind == b":":
                return int(rest)
            if kind == b"$":
                return None if rest == b"-1" else f.read(int(rest) + 2)[:-2].decode()
            return None if rest == b"-1" else [read() for _ in range(int(rest))]

        return read()


def hooks_toml(url: str, events, **extra) -> str:
    settings = {"timeout": "1s", "retry_backoff": "50ms", "retry_backoff_max": "200ms",
                "lease_ttl": "2s", **extra}
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items())
    return (f'\n[webhooks]\nurl = "{url}"\nsecret = "{HOOK_SECRET}"\n'
            f"events = {json.dumps(events)}\n{lines}\n")


def per_channel(events, channel):
    return [(e["type"], e.get("user", "")) for e in events if e.get("channel") == channel]


ALL = ["connect", "disconnect", "subscribe", "unsubscribe", "channel_occupied",
       "channel_vacated", "presence_join", "presence_leave"]


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def test_the_receiver_refuses_a_tampered_body_and_an_old_timestamp(receiver):
    body = b'{"events":[]}'
    now = int(time.time())
    good = f"t={now},v1=" + hmac.new(HOOK_SECRET.encode(), f"{now}.".encode() + body,
                                     hashlib.sha256).hexdigest()
    assert post(receiver.url, body, good) == 200
    assert post(receiver.url, b'{"events":[{}]}', good) == 401
    old = now - MAX_AGE - 60
    stale = f"t={old},v1=" + hmac.new(HOOK_SECRET.encode(), f"{old}.".encode() + body,
                                      hashlib.sha256).hexdigest()
    assert post(receiver.url, body, stale) == 401


def test_a_receiver_failing_for_a_while_gets_every_event_once_in_channel_order(tmp_path, receiver):
    receiver.failing = True
    node = Node(tmp_path, node_toml() + hooks_toml(receiver.url, ALL, batch_size=4), "hooks")
    try:
        alice = node.ws("alice")
        bob = node.ws("bob")
        alice.subscribe("room")
        bob.subscribe("room")
        alice.subscribe("lobby")
        alice.command({"unsubscribe": {"channel": "room"}})
        bob.command({"unsubscribe": {"channel": "room"}})
        alice.close()
        bob.close()
        # Some POSTs were refused with 500 and retried before the receiver recovers.
        receiver.wait_for(lambda: receiver.posts[500] >= 3, what="failed POSTs")
        receiver.failing = False
        receiver.wait_for(lambda: len(receiver.of(type="disconnect")) == 2, what="disconnects")
        receiver.wait_for(lambda: receiver.of(type="channel_vacated", channel="lobby"),
                          what="lobby vacated")

        events = receiver.events
        assert receiver.duplicates == 0, "a 500 answer means not delivered: nothing came twice"
        assert receiver.posts[401] == 0, "every POST carried a valid signature"
        assert per_channel(events, "room") == [
            ("channel_occupied", ""), ("presence_join", "alice"), ("subscribe", "alice"),
            ("presence_join", "bob"), ("subscribe", "bob"),
            ("presence_leave", "alice"), ("unsubscribe", "alice"),
            ("presence_leave", "bob"), ("unsubscribe", "bob"), ("channel_vacated", ""),
        ]
        assert per_channel(events, "lobby") == [
            ("channel_occupied", ""), ("presence_join", "alice"), ("subscribe", "alice"),
            ("presence_leave", "alice"), ("unsubscribe", "alice"), ("channel_vacated", ""),
        ]
        client = [e["type"] for e in events if e.get("user") == "alice" and "channel" not in e]
        assert client == ["connect", "disconnect"]
        disconnect = receiver.of(type="disconnect", user="alice")[0]
        assert isinstance(disconnect["code"], int) and disconnect["reason"]
        assert metric(node.port, "fanfare_webhook_deliveries_total", result="status") >= 3
        assert metric(node.port, "fanfare_webhook_delivered_events_total") == len(events)
    finally:
        node.kill()


def test_occupied_and_vacated_are_cluster_wide_with_subscribers_on_three_nodes(tmp_path, receiver):
    redis = Redis()
    nodes = []
    try:
        for name in ("a", "b", "c"):
            nodes.append(Node(tmp_path, node_toml(redis) + hooks_toml(
                receiver.url, ["channel_occupied", "channel_vacated"]), name))
        clients = [n.ws(f"user-{n.name}") for n in nodes]
        for c in clients:
            c.subscribe("plain:shared")
            time.sleep(0.2)
        receiver.wait_for(lambda: receiver.of(channel="plain:shared"), what="occupied")
        time.sleep(0.5)
        assert per_channel(receiver.events, "plain:shared") == [("channel_occupied", "")], \
            "the second and third node's first subscriber changes nothing cluster-wide"
        for c in clients[:2]:
            c.command({"unsubscribe": {"channel": "plain:shared"}})
            time.sleep(0.2)
        time.sleep(0.5)
        assert per_channel(receiver.events, "plain:shared") == [("channel_occupied", "")], \
            "still subscribed on the third node"
        clients[2].command({"unsubscribe": {"channel": "plain:shared"}})
        receiver.wait_for(lambda: len(per_channel(receiver.events, "plain:shared")) == 2,
                          what="vacated")
        assert per_channel(receiver.events, "plain:shared") == [
            ("channel_occupied", ""), ("channel_vacated", "")]
        assert receiver.duplicates == 0
    finally:
        for n in nodes:
            n.kill()
        redis.kill()


def test_events_pending_on_a_killed_node_are_delivered_by_the_others(tmp_path, receiver):
    redis = Redis()
    receiver.failing = True
    toml = node_toml(redis) + hooks_toml(receiver.url, ALL, batch_size=3)
    a = b = None
    try:
        # The first node takes the delivery lease and keeps it while alive.
        a = Node(tmp_path, toml, "a")
        time.sleep(0.3)
        b = Node(tmp_path, toml, "b")
        on_a = [a.ws(f"a{i}") for i in range(3)]
        for i, c in enumerate(on_a):
            c.subscribe("plain:a-room")
            c.subscribe(f"plain:own-{i}")
        on_b = b.ws("b0")
        on_b.subscribe("plain:a-room")
        on_b.subscribe("plain:b-room")
        # `a` is delivering (and failing) batch after batch of the outbox.
        receiver.wait_for(lambda: receiver.posts[500] >= 2, what="failed POSTs from a")
        time.sleep(0.3)  # every event written to Redis
        stream = "{fanfare.webhooks}.stream"
        pending, _, _, owners = redis_cmd(redis.port, "XPENDING", stream, "delivery")
        assert pending >= 1 and len(owners) == 1, "a holds the batch it keeps failing to deliver"
        assert redis_cmd(redis.port, "XLEN", stream) > pending, "and more wait behind it"
        a.kill()
        receiver.failing = False
        # `b` takes the lease once a's expires, claims what a had taken,
        # and vacates a's channels when a's liveness key expires.
        for i in range(3):
            receiver.wait_for(
                lambda i=i: receiver.of(type="channel_vacated", channel=f"plain:own-{i}"),
                timeout=20, what=f"plain:own-{i} vacated after the kill")
        events = receiver.events
        for i in range(3):
            assert receiver.of(type="connect", user=f"a{i}"), f"connect of a{i} lost"
            assert per_channel(events, f"plain:own-{i}") == [
                ("channel_occupied", ""), ("subscribe", f"a{i}"), ("channel_vacated", "")]
        room = per_channel(events, "plain:a-room")
        assert room[0] == ("channel_occupied", "")
        assert [u for t, u in room if t == "subscribe"] == ["a0", "a1", "a2", "b0"]
        assert ("channel_vacated", "") not in room, "b0 is still subscribed on b"
        assert receiver.of(type="connect", user="b0")
        assert receiver.duplicates == 0, "a never had a batch accepted, so nothing came twice"
        receiver.wait_for(lambda: redis_cmd(redis.port, "XLEN", stream) == 0,
                          what="the outbox emptied")
    finally:
        for n in (a, b):
            if n:
                n.kill()
        redis.kill()


def test_a_full_memory_queue_drops_events_and_counts_them(tmp_path, receiver):
    receiver.failing = True
    node = Node(tmp_path, node_toml() + hooks_toml(
        receiver.url, ["connect", "disconnect"], queue_size=4, batch_size=2), "small")
    try:
        for i in range(5):
            node.ws(f"u{i}").close()
        deadline = time.monotonic() + 5
        while metric(node.port, "fanfare_webhook_dropped_total", reason="queue_full") < 6:
            assert time.monotonic() < deadline, "no drops counted"
            time.sleep(0.05)
        assert "webhook queue full" in node.log()
        receiver.failing = False
        receiver.wait_for(lambda: len(receiver.events) == 4, what="the 4 queued events")
        time.sleep(0.3)
        assert len(receiver.events) == 4, "what overflowed is gone, the rest arrives"
    finally:
        node.kill()


def test_a_node_whose_liveness_lapsed_gets_its_channels_back_as_occupied(tmp_path, receiver):
    redis = Redis()
    toml = node_toml(redis) + hooks_toml(receiver.url, ["channel_occupied", "channel_vacated"])
    a = b = None
    try:
        a = Node(tmp_path, toml, "a")  # delivers, and sweeps dead nodes
        time.sleep(0.3)
        b = Node(tmp_path, toml, "b")
        client = b.ws("bee")
        client.subscribe("plain:kept")
        receiver.wait_for(lambda: receiver.of(channel="plain:kept"), what="occupied")
        (uid,) = redis_cmd(redis.port, "SMEMBERS", "{fanfare.webhooks}.nodes")
        # b's liveness key keeps vanishing (as if b could not reach Redis):
        # a takes b for dead and vacates its channels.
        deadline = time.monotonic() + 10
        while not receiver.of(type="channel_vacated", channel="plain:kept"):
            assert time.monotonic() < deadline, "a never vacated b's channel"
            redis_cmd(redis.port, "DEL", "{fanfare.webhooks}.alive." + uid)
            time.sleep(0.05)
        # b is back: its next heartbeat finds its key gone and writes its
        # channels again.
        receiver.wait_for(
            lambda: per_channel(receiver.events, "plain:kept")[-1] == ("channel_occupied", ""),
            what="occupied again")
        time.sleep(1.5)
        kinds = [t for t, _ in per_channel(receiver.events, "plain:kept")]
        assert kinds[-1] == "channel_occupied"
        assert all(x != y for x, y in zip(kinds, kinds[1:])), f"alternating: {kinds}"
        assert uid in redis_cmd(redis.port, "SMEMBERS", "{fanfare.webhooks}.nodes")
        client.command({"unsubscribe": {"channel": "plain:kept"}})
        receiver.wait_for(
            lambda: per_channel(receiver.events, "plain:kept")[-1] == ("channel_vacated", ""),
            what="vacated by b itself")
    finally:
        for n in (a, b):
            if n:
                n.kill()
        redis.kill()


def test_a_delivering_node_stopped_with_sigterm_hands_over_without_waiting_for_its_lease(
        tmp_path, receiver):
    redis = Redis()
    receiver.failing = True
    toml = node_toml(redis) + hooks_toml(receiver.url, ["connect", "disconnect"],
                                         lease_ttl="20s")
    a = b = None
    try:
        a = Node(tmp_path, toml, "a")  # takes the lease
        time.sleep(0.3)
        b = Node(tmp_path, toml, "b")
        a.ws("on-a")
        b.ws("on-b")
        receiver.wait_for(lambda: receiver.posts[500] >= 1, what="a delivering")
        a.proc.terminate()
        assert a.proc.wait(timeout=15) == 0
        stopped = time.monotonic()
        receiver.failing = False
        receiver.wait_for(lambda: receiver.of(type="disconnect", user="on-a"), timeout=10,
                          what="a's disconnect, delivered by b")
        assert time.monotonic() - stopped < 5, "b did not wait out a's 20 s lease"
        assert receiver.of(type="connect", user="on-a") and receiver.of(type="connect", user="on-b")
    finally:
        for n in (a, b):
            if n:
                n.kill()
        redis.kill()
