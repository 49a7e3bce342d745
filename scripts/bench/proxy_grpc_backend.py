"""A trivial gRPC proxy backend for scripts/bench/proxy.sh: CentrifugoProxy
(proto/centrifugo/proxy.proto, stubs generated now with grpcio-tools) on
grpc.aio, answering every call at once: Connect with user `bench-<client>`,
Publish with an empty result (the client's data unchanged).

    python proxy_grpc_backend.py PORT GEN_DIR     (tests/api/.venv has grpcio)

The number of calls answered is written to GEN_DIR/count every 0.2 s and
on SIGTERM (the driver reads it around each run).
"""

import asyncio
import importlib
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def stubs(gen: Path):
    gen.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}",
         f"--python_out={gen}", f"--grpc_python_out={gen}",
         str(ROOT / "proto" / "centrifugo" / "proxy.proto")],
        check=True, timeout=60)
    sys.path.insert(0, str(gen))
    return (importlib.import_module("centrifugo.proxy_pb2"),
            importlib.import_module("centrifugo.proxy_pb2_grpc"))


async def main(port: int, gen: Path):
    import grpc

    pb2, pb2_grpc = stubs(gen)
    calls = 0

    class Backend(pb2_grpc.CentrifugoProxyServicer):
        async def Connect(self, request, context):
            nonlocal calls
            calls += 1
            return pb2.ConnectResponse(result=pb2.ConnectResult(user=f"bench-{request.client}"))

        async def Publish(self, request, context):
            nonlocal calls
            calls += 1
            r = pb2.PublishResponse()
            r.result.SetInParent()
            return r

    server = grpc.aio.server()
    pb2_grpc.add_CentrifugoProxyServicer_to_server(Backend(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    count, tmp = gen / "count", gen / "count.tmp"

    def write_count():  # atomically: the driver may read it at any time
        tmp.write_text(str(calls))
        tmp.replace(count)

    while not stop.is_set():
        write_count()
        try:
            await asyncio.wait_for(stop.wait(), 0.2)
        except asyncio.TimeoutError:
            pass
    write_count()
    await server.stop(0)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), Path(sys.argv[2])))
