"""Fixtures of the Python control-API tests.

Everything talks to real processes: the fanfare binary named by $FANFARE_BIN
and redis-server, each on free loopback ports, stopped by PID at the end. The
gRPC client is generated from proto/fanfare/v1/control.proto at test time with
grpcio-tools, independently of the server's Rust code.
"""

import base64
import hashlib
import hmac
import importlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from websockets.sync.client import connect as ws_connect

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
API_KEY = "py-api-key"
SECRET = "py-test-secret"
TIMEOUT = 5.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- generated code


def _generate(tmp_path_factory, proto: str):
    """`(<name>_pb2, <name>_pb2_grpc)` of `proto` (a path below proto/),
    compiled now by grpc_tools.protoc."""
    out = tmp_path_factory.mktemp("gen")
    cmd = [
        sys.executable, "-m", "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        str(PROTO_DIR / proto),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"protoc failed: {r.stderr}"
    module = proto.removesuffix(".proto").replace("/", ".")
    sys.path.insert(0, str(out))
    try:
        return (importlib.import_module(f"{module}_pb2"),
                importlib.import_module(f"{module}_pb2_grpc"))
    finally:
        sys.path.remove(str(out))


@pytest.fixture(scope="session")
def pb(tmp_path_factory):
    """`(control_pb2, control_pb2_grpc)` of fanfare's control API."""
    return _generate(tmp_path_factory, "fanfare/v1/control.proto")


@pytest.fixture(scope="session")
def cpb(tmp_path_factory):
    """`(api_pb2, api_pb2_grpc)` of Centrifugo's server API, from our
    proto/centrifugo/api.proto."""
    return _generate(tmp_path_factory, "centrifugo/api.proto")


# ---------------------------------------------------------------- processes



def kill_and_reap(proc: subprocess.Popen):
    """SIGKILL a process this suite started (by PID) and reap it (bounded)."""
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


class Redis:
    def __init__(self):
        for _ in range(3):
            self.port = free_port()
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None:
                if self._ping():
                    return
                time.sleep(0.02)
            self.kill()
        raise RuntimeError("redis-server did not start")

    def _ping(self) -> bool:
        """Whether the server on the port answers and is this process (a PONG
        alone may come from another suite's server that took the port)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"INFO server\r\n")
                data = b""
                while b"\r\nprocess_id:" not in data or not data.split(b"\r\nprocess_id:", 1)[1].count(b"\r\n"):
                    chunk = s.recv(4096)
                    if not chunk or data.startswith(b"-"):
                        return False
                    data += chunk
                pid = data.split(b"\r\nprocess_id:", 1)[1].split(b"\r\n", 1)[0]
                return int(pid) == self.proc.pid
        except (OSError, ValueError):
            return False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def kill(self):
        """SIGKILL by PID and reap."""
        kill_and_reap(self.proc)


class Node:
    """A running fanfare binary."""

    def __init__(self, tmp: Path, extra_toml: str, name: str = "node"):
        binary = os.environ.get("FANFARE_BIN")
        if not binary:
            pytest.fail("FANFARE_BIN must name the fanfare binary")
        self.name = name
        last = ""
        for _ in range(3):
            self.port, self.grpc_port = free_port(), free_port()
            cfg = tmp / f"{name}-{self.port}.toml"
            cfg.write_text(
                f'[http]\nlisten = "127.0.0.1:{self.port}"\n\n'
                f'[grpc]\nlisten = "127.0.0.1:{self.grpc_port}"\n\n'
                f'[node]\nname = "{name}"\n\n{extra_toml}\n'
            )
            self.log_path = tmp / f"{name}-{self.port}.log"
            env = {k: v for k, v in os.environ.items()
                   if not k.startswith("FANFARE_") and k != "RUST_LOG"}
            # Stopped with SIGTERM and expected gone at once: no drain delay or period.
            env.update(FANFARE__SHUTDOWN__DRAIN_DELAY="0s", FANFARE__SHUTDOWN__DRAIN_PERIOD="0s")
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(
                    [binary, "--config", str(cfg)], stdin=subprocess.DEVNULL,
                    stdout=log, stderr=subprocess.STDOUT, env=env,
                )
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self.proc.poll() is None:
                # Ready once this process logged that it holds both ports: a
                # /health answer alone may come from another suite's node
                # that took the port first (this one then exits: retry).
                if "control API listening" not in self.log():
                    time.sleep(0.02)
                    continue
                try:
                    if http_get(self.port, "/health")[0] == 200:
                        return
                except OSError:
                    pass
                time.sleep(0.02)
            last = self.log()
            self.kill()
        raise RuntimeError(f"fanfare did not start:\n{last}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def kill(self):
        kill_and_reap(self.proc)

    # --- clients

    def channel(self) -> grpc.Channel:
        ch = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")
        grpc.channel_ready_future(ch).result(timeout=TIMEOUT)
        return ch

    def stub(self, pb, key=API_KEY):
        """A ControlService stub; `key` None sends no authorization metadata."""
        _, pb2_grpc = pb
        return Api(pb2_grpc.ControlServiceStub(self.channel()), key)

    def api(self, method: str, body, key=API_KEY, headers=None):
        """POST /api/<method>: `(status, parsed JSON body)`."""
        h = {"Content-Type": "application/json"}
        if key is not None:
            h["Authorization"] = f"apikey {key}"
        h.update(headers or {})
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return http_post(self.port, f"/api/{method}", data, h)

    def ws(self, user: str | None = None) -> "WsClient":
        c = WsClient(self.port)
        c.connect(token(user) if user else None)
        return c


class Api:
    """Calls a stub method with the API key as `authorization` metadata."""

    def __init__(self, stub, key):
        self._stub = stub
        self._md = [("authorization", f"apikey {key}")] if key is not None else []

    def __getattr__(self, method):
        rpc = getattr(self._stub, method)
        return lambda req, **kw: rpc(req, metadata=self._md, timeout=10, **kw)


def http_get(port: int, path: str):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def http_post(port: int, path: str, data: bytes, headers: dict):
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def metric(port: int, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    _, body = http_get(port, "/metrics")
    total = 0.0
    for line in body.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        key, value = line.rsplit(" ", 1)
        n, _, rest = key.partition("{")
        if n == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += float(value)
    return total


# ---------------------------------------------------------------- tokens


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def token(user: str, secret: str = SECRET) -> str:
    """An HS256 connection JWT for `user`, valid for 5 minutes."""
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = _b64(json.dumps({"sub": user, "exp": int(time.time()) + 300}).encode())
    sig = hmac.new(secret.encode(), f"{head}.{claims}".encode(), hashlib.sha256).digest()
    return f"{head}.{claims}.{_b64(sig)}"


# ---------------------------------------------------------------- WebSocket


class Closed(Exception):
    def __init__(self, code, reason):
        super().__init__(f"closed {code} {reason!r}")
        self.code, self.reason = code, reason


class WsClient:
    """The Centrifugo JSON protocol over `websockets`' sync client: commands,
    replies, pushes; server pings (`{}`) are answered and hidden."""

    def __init__(self, port: int, headers: dict | None = None):
        self.ws = ws_connect(f"ws://127.0.0.1:{port}/connection/websocket",
                             open_timeout=TIMEOUT, close_timeout=2, legacy=True,
                             additional_headers=headers)
        self.buf = []
        self.next_id = 1
        self.client_id = ""

    def _fill(self, deadline: float):
        from websockets.exceptions import ConnectionClosed

        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        try:
            msg = self.ws.recv(timeout=left)
        except ConnectionClosed as e:
            rcvd = e.rcvd
            raise Closed(rcvd.code if rcvd else None, rcvd.reason if rcvd else "") from None
        for line in msg.splitlines():
            if not line.strip():
                continue
            v = json.loads(line)
            if v == {}:
                self.ws.send("{}")
            else:
                self.buf.append(v)

    def recv_matching(self, pred, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        while True:
            for i, v in enumerate(self.buf):
                if pred(v):
                    return self.buf.pop(i)
            self._fill(deadline)

    def push(self, timeout=TIMEOUT):
        return self.recv_matching(lambda v: "push" in v, timeout)

    def command(self, body: dict):
        i = self.next_id
        self.next_id += 1
        self.ws.send(json.dumps({"id": i, **body}))
        return self.recv_matching(lambda v: v.get("id") == i)

    def connect(self, tok):
        r = self.command({"connect": {"token": tok} if tok else {}})
        assert "connect" in r, r
        self.client_id = r["connect"]["client"]

    def subscribe(self, channel):
        r = self.command({"subscribe": {"channel": channel}})
        assert "subscribe" in r, r

    def assert_silent(self, within=0.3):
        assert not self.buf, self.buf
        try:
            self._fill(time.monotonic() + within)
        except TimeoutError:
            return
        assert not self.buf, f"unexpected: {self.buf}"

    def expect_close(self, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        while True:
            self.buf.clear()
            try:
                self._fill(deadline)
            except Closed as c:
                return c.code, c.reason

    def close(self):
        self.ws.close()


# ---------------------------------------------------------------- clusters


def node_toml(redis: Redis | None = None, max_broadcast: int = 1000) -> str:
    broker = f'[broker]\nkind = "redis"\n\n[redis]\nurls = ["{redis.url}"]\n' if redis else ""
    return f"""{broker}
[api]
key = "{API_KEY}"
max_request_size = 4096
max_broadcast_channels = {max_broadcast}

[auth]
hmac_secret = "{SECRET}"

[[namespaces]]
name = ""
presence = true
history_size = 100
history_ttl = "300s"
allow_publish = true

[[namespaces]]
name = "plain"
allow_publish = true
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Redis and three nodes A, B, C on it."""
    tmp = tmp_path_factory.mktemp("cluster")
    redis = Redis()
    nodes = []
    try:
        for name in ("node-a", "node-b", "node-c"):
            nodes.append(Node(tmp, node_toml(redis, max_broadcast=3), name))
        yield nodes
    finally:
        for n in nodes:
            n.kill()
        redis.kill()


@pytest.fixture
def lonely(tmp_path):
    """One node on its own Redis, which the test may kill."""
    redis = Redis()
    node = None
    try:
        node = Node(tmp_path, node_toml(redis), "lonely")
        yield node, redis
    finally:
        if node:
            node.kill()
        redis.kill()


@pytest.fixture(autouse=True)
def _dump_logs_on_failure(request):
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for name in ("cluster", "lonely"):
            if name in request.fixturenames:
                v = request.getfixturevalue(name)
                nodes = v if isinstance(v, list) else [v[0]]
                for n in nodes:
                    print(f"---- {n.name} log ----\n" + "\n".join(n.log().splitlines()[-30:]))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep
