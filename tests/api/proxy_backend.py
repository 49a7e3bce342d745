"""Application backends that answer fanfare's proxy calls, as a Centrifugo
backend would: over HTTP (aiohttp, one path per call kind:
`/centrifugo/<kind>`) and over gRPC (grpcio, service
`centrifugal.centrifugo.proxy.CentrifugoProxy`, stubs generated from
proto/centrifugo/proxy.proto at test time with grpcio-tools).

Both record every call they get as a `Call` (kind, request fields, headers or
metadata) and answer through the same per-kind handlers, so one scenario runs
against both. A handler gets the normalised request and returns the answer in
the HTTP JSON shape (`{"result": ...}`, `{"error": ...}` or
`{"disconnect": ...}`); payload fields (`data`, `info`, `meta`, and `info` /
`data` of `subs`) hold a JSON value, or `bytes` for a binary payload (HTTP:
sent as `b64data` / `b64info`). Extra keys steer the transport:
`_sleep` (seconds before answering), `_status` (HTTP status / gRPC status code
name, no answer body), `_raw` (HTTP body sent as is).
"""

import asyncio
import base64
import importlib
import json
import subprocess
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from aiohttp import web

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"

KINDS = ("connect", "refresh", "subscribe", "publish", "rpc", "sub_refresh")
# gRPC method name of each kind.
GRPC_METHODS = {
    "connect": "Connect",
    "refresh": "Refresh",
    "subscribe": "Subscribe",
    "publish": "Publish",
    "rpc": "RPC",
    "sub_refresh": "SubRefresh",
}
# Result fields that carry a payload; HTTP has a `b64<name>` twin for binary.
PAYLOAD_FIELDS = ("data", "info", "meta")


@dataclass
class Call:
    """One proxy call as the backend received it."""

    kind: str
    # Request fields; payloads decoded: a JSON value, or bytes when they are
    # not JSON (binary). `data` is set whether it came as data or b64data.
    req: dict
    # The request as it came on the wire: the HTTP JSON body, or for gRPC
    # the fields set (bytes left as bytes).
    raw: dict
    # Header names lowercase (HTTP headers or gRPC metadata).
    headers: dict
    at: float = field(default_factory=time.monotonic)


def decode_payload(b: bytes):
    try:
        return json.loads(b)
    except (ValueError, UnicodeDecodeError):
        return b


class Backend:
    """What both transports share: handlers and the record of calls."""

    def __init__(self):
        self._lock = threading.Condition()
        self.calls: list[Call] = []
        self.handlers = {}
        self.reset()

    def reset(self, **handlers):
        """Forget the calls; handlers back to the defaults, then `handlers`."""
        with self._lock:
            self.calls.clear()
            self.handlers = {k: getattr(self, f"default_{k}") for k in KINDS}
            self.handlers.update(handlers)

    def on(self, kind, fn):
        assert kind in KINDS, kind
        self.handlers[kind] = fn

    def _record(self, call: Call) -> dict:
        with self._lock:
            self.calls.append(call)
            handler = self.handlers[call.kind]
            self._lock.notify_all()
        return handler(call.req, call.headers)

    def of(self, kind, **match) -> list[Call]:
        """The calls of `kind` so far whose request has the `match` fields."""
        with self._lock:
            return [c for c in self.calls if c.kind == kind
                    and all(c.req.get(k) == v for k, v in match.items())]

    def wait(self, kind, n=1, timeout=10.0, **match) -> list[Call]:
        """Waits until there are `n` calls of `kind` (matching); returns them."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                got = [c for c in self.calls if c.kind == kind
                       and all(c.req.get(k) == v for k, v in match.items())]
                if len(got) >= n:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(got)}/{n} {kind} calls {match}: {self.calls}")
                self._lock.wait(left)

    # --- default scenario: a chat backend -------------------------------------
    # connect: the user is the `session` cookie (or `user` of the connect data);
    #   none: disconnect 4501. User "expiring" gets expire_at in 2 s.
    # subscribe: channels containing "deny" -> 103, "custom" -> 1000, else ok
    #   with info/data. "expiring" channels get expire_at in 2 s.
    # publish: "reject" -> 1001; else the data is rewritten.
    # rpc: echo, fail (1002), kick (disconnect 4501), bounce (disconnect 4001),
    #   http500 (HTTP 500 / gRPC INTERNAL), garbage (HTTP body not JSON).
    # refresh / sub_refresh: extend by 2 s.

    @staticmethod
    def default_connect(req, headers):
        user = cookie(headers, "session")
        data = req.get("data")
        if user is None and isinstance(data, dict):
            user = data.get("user")
        if not user:
            return {"disconnect": {"code": 4501, "reason": "no session"}}
        result = {
            "user": user,
            "info": {"name": user.title()},
            "data": {"welcome": user},
            "channels": ["news"],
            "meta": {"tenant": "t1", "user": user},
        }
        if user.startswith("expiring"):
            result["expire_at"] = int(time.time()) + 2
        if user.startswith("vip"):
            result["subs"] = {"chat:vip": {"info": {"vip": True}, "data": {"hello": "vip"}}}
        return {"result": result}

    @staticmethod
    def default_refresh(req, headers):
        return {"result": {"expire_at": int(time.time()) + 2, "info": {"refreshed": True}}}

    @staticmethod
    def default_subscribe(req, headers):
        channel = req["channel"]
        if "deny" in channel:
            return {"error": {"code": 103, "message": "permission denied"}}
        if "custom" in channel:
            return {"error": {"code": 1000, "message": "not a member", "temporary": "temp" in channel}}
        result = {"info": {"role": "member"}, "data": {"motd": f"welcome to {channel}"}}
        if "expiring" in channel:
            result["expire_at"] = int(time.time()) + 2
        if "quiet" in channel:
            result["override"] = {"presence": {"value": False}}
        return {"result": result}

    @staticmethod
    def default_publish(req, headers):
        if "reject" in req["channel"]:
            return {"error": {"code": 1001, "message": "moderated"}}
        data = req.get("data")
        if isinstance(data, bytes):
            return {"result": {"data": b"rewritten:" + data}}
        return {"result": {"data": {"original": data, "by": req.get("user"), "moderated": True}}}

    @staticmethod
    def default_rpc(req, headers):
        method = req.get("method")
        if method == "echo":
            data = req.get("data")
            if isinstance(data, bytes):
                return {"result": {"data": b"echo:" + data}}
            return {"result": {"data": {"echo": data, "user": req.get("user"), "meta": req.get("meta")}}}
        if method == "fail":
            return {"error": {"code": 1002, "message": "rpc failed"}}
        if method == "kick":
            return {"disconnect": {"code": 4501, "reason": "kicked by backend"}}
        if method == "bounce":
            return {"disconnect": {"code": 4001, "reason": "come back"}}
        if method == "http500":
            return {"_status": 500}
        if method == "garbage":
            return {"_raw": b"this is not json"}
        return {"error": {"code": 1404, "message": f"no method {method}"}}

    @staticmethod
    def default_sub_refresh(req, headers):
        return {"result": {"expire_at": int(time.time()) + 2}}


def cookie(headers: dict, name: str):
    for part in headers.get("cookie", "").split(";"):
        k, _, v = part.strip().partition("=")
        if k == name:
            return v
    return None


# ---------------------------------------------------------------- HTTP


def http_request_to_call(kind: str, body: dict, headers: dict) -> Call:
    req = dict(body)
    for f in PAYLOAD_FIELDS:
        b64 = body.get(f"b64{f}")
        if b64:
            req[f] = decode_payload(base64.b64decode(b64))
    return Call(kind, req, body, headers)


def http_answer(ans: dict) -> dict:
    """The answer in Centrifugo's HTTP JSON shape: bytes payloads as b64<name>."""

    def fix(obj: dict) -> dict:
        out = {}
        for k, v in obj.items():
            if k in ("data", "info") and isinstance(v, bytes):
                out[f"b64{k}"] = base64.b64encode(v).decode()
            elif k == "subs" and isinstance(v, dict):
                out[k] = {ch: fix(o) for ch, o in v.items()}
            else:
                out[k] = v
        return out

    return {k: fix(v) if k == "result" else v for k, v in ans.items() if not k.startswith("_")}


class HttpBackend(Backend):
    """aiohttp on 127.0.0.1, in a thread of its own with its own event loop."""

    def __init__(self):
        super().__init__()
        self.port = None
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="http-backend")
        self._thread.start()
        if not self._ready.wait(15) or self.port is None:
            raise RuntimeError("HTTP backend did not start")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/centrifugo"

    def endpoint(self, kind: str) -> str:
        return f"{self.base}/{kind}"

    def _run(self):
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/centrifugo/{kind}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, request: web.Request):
        kind = request.match_info["kind"]
        if kind not in KINDS:
            return web.Response(status=404)
        body = await request.json()
        headers = {k.lower(): v for k, v in request.headers.items()}
        ans = self._record(http_request_to_call(kind, body, headers))
        if ans.get("_sleep"):
            await asyncio.sleep(ans["_sleep"])
        if "_status" in ans:
            return web.Response(status=ans["_status"], text="backend failure")
        if "_raw" in ans:
            return web.Response(body=ans["_raw"], content_type="application/json")
        return web.json_response(http_answer(ans))

    def stop(self):
        async def shutdown():
            await self._runner.cleanup()

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


# ---------------------------------------------------------------- gRPC

_stubs = None


def proxy_stubs(out_dir: Path):
    """`(proxy_pb2, proxy_pb2_grpc)` compiled from proto/centrifugo/proxy.proto
    into `out_dir` by grpc_tools.protoc (once per process)."""
    global _stubs
    if _stubs is None:
        out_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_DIR}",
            f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
            str(PROTO_DIR / "centrifugo" / "proxy.proto"),
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"protoc failed: {r.stderr}"
        sys.path.insert(0, str(out_dir))
        try:
            _stubs = (importlib.import_module("centrifugo.proxy_pb2"),
                      importlib.import_module("centrifugo.proxy_pb2_grpc"))
        finally:
            sys.path.remove(str(out_dir))
    return _stubs


def message_to_dict(msg) -> tuple[dict, dict]:
    """`(req, raw)` of a request message: the fields set; bytes payloads
    decoded in `req`."""
    raw, req = {}, {}
    for fd, value in msg.ListFields():
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            value = dict(value)
        elif fd.is_repeated:
            value = list(value)
        raw[fd.name] = value
        req[fd.name] = decode_payload(value) if isinstance(value, bytes) else value
    b64 = req.get("b64data")
    if b64:
        req["data"] = decode_payload(base64.b64decode(b64))
    return req, raw


def fill_message(msg, d: dict):
    """Sets the fields of `msg` from `d` (HTTP JSON shape): a bytes field takes
    bytes as they are and any other value JSON-encoded; messages and maps of
    messages recurse."""
    fields = msg.DESCRIPTOR.fields_by_name
    for k, v in d.items():
        fd = fields[k]
        if fd.type == fd.TYPE_BYTES:
            setattr(msg, k, v if isinstance(v, bytes) else json.dumps(v).encode())
        elif fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            target = getattr(msg, k)
            value_fd = fd.message_type.fields_by_name["value"]
            for mk, mv in v.items():
                if value_fd.message_type is not None:
                    fill_message(target[mk], mv)
                else:
                    target[mk] = mv
        elif fd.message_type is not None:
            # Present even when empty: {"result": {}} is a result.
            getattr(msg, k).SetInParent()
            fill_message(getattr(msg, k), v)
        elif fd.is_repeated:
            getattr(msg, k).extend(v)
        else:
            setattr(msg, k, v)
    return msg


class GrpcBackend(Backend):
    """A grpcio server of CentrifugoProxy on 127.0.0.1."""

    def __init__(self, gen_dir: Path):
        super().__init__()
        pb2, pb2_grpc = proxy_stubs(gen_dir)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
        backend = self

        def method(kind):
            response_type = getattr(pb2, f"{GRPC_METHODS[kind]}Response")

            def handle(_self, request, context):
                headers = {k.lower(): v for k, v in context.invocation_metadata()}
                req, raw = message_to_dict(request)
                ans = backend._record(Call(kind, req, raw, headers))
                if ans.get("_sleep"):
                    time.sleep(ans["_sleep"])
                if "_status" in ans:
                    code = ans["_status"]
                    code = code if isinstance(code, str) else "INTERNAL"
                    context.abort(getattr(grpc.StatusCode, code), "backend failure")
                return fill_message(response_type(),
                                    {k: v for k, v in ans.items() if not k.startswith("_")})

            return handle

        servicer = type("Servicer", (pb2_grpc.CentrifugoProxyServicer,),
                        {GRPC_METHODS[k]: method(k) for k in KINDS})()
        pb2_grpc.add_CentrifugoProxyServicer_to_server(servicer, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def endpoint_url(self) -> str:
        return f"grpc://127.0.0.1:{self.port}"

    def endpoint(self, kind: str) -> str:
        return self.endpoint_url

    def stop(self):
        self.server.stop(grace=0).wait(10)
