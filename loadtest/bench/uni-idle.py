"""Idle RSS per connection of the HTTP transports (docs/BENCHMARKS.md).

Usage: python3 loadtest/bench/uni-idle.py PORT NODE_PID N KIND
KIND: sse | http_stream (unidirectional: uni_sse, uni_http_stream) or
      emu_sse | emu_http_stream (bidirectional emulation: /connection/sse,
      /connection/http_stream; the connect command subscribes nothing, one
      emulation request per connection then subscribes it).

Opens N connections to a running node (transports.uni_sse /
transports.uni_http_stream on, a namespace anyone may subscribe to), waits for
each connect push, holds them 5 s and prints the node's VmRSS growth per
connection as JSON. Source addresses are spread over 127.0.0.2-201 so N may
exceed one address's ephemeral ports.
"""
import asyncio, sys, json, urllib.parse, time

PORT, PID, N, KIND = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

def rss():
    for line in open(f"/proc/{PID}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

async def one(i, conns, sem):
    async with sem:
        src = f"127.0.0.{2 + i % 200}"
        r, w = await asyncio.open_connection("127.0.0.1", PORT, local_addr=(src, 0))
        connect = json.dumps({"subs": {f"idle{i % 100}": {}}})
        command = json.dumps({"id": 1, "connect": {}})
        if KIND == "emu_sse":
            q = urllib.parse.quote(command)
            w.write(f"GET /connection/sse?cf_connect={q} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        elif KIND == "emu_http_stream":
            w.write(f"POST /connection/http_stream HTTP/1.1\r\nHost: x\r\nContent-Length: {len(command)}\r\n\r\n{command}".encode())
        elif KIND == "sse":
            q = urllib.parse.quote(connect)
            w.write(f"GET /connection/uni_sse?cf_connect={q} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        else:
            w.write(f"POST /connection/uni_http_stream HTTP/1.1\r\nHost: x\r\nContent-Length: {len(connect)}\r\n\r\n{connect}".encode())
        await w.drain()
        data = b""
        while b"connect" not in data:
            chunk = await r.read(4096)
            if not chunk:
                raise RuntimeError("closed")
            data += chunk
        if KIND.startswith("emu_"):
            reply = data[data.index(b"{"):]
            reply = json.loads(reply[:reply.index(b"}}") + 2])["connect"]
            sub = json.dumps({"id": 2, "subscribe": {"channel": f"idle{i % 100}"}})
            body = json.dumps({"session": reply["session"], "node": reply["node"], "data": sub})
            er, ew = await asyncio.open_connection("127.0.0.1", PORT, local_addr=(src, 0))
            ew.write(f"POST /emulation HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
            await ew.drain()
            status = (await er.read(4096)).split(b" ")[1]
            ew.close()
            if status != b"200":
                raise RuntimeError(f"emulation request answered {status}")
            while b'"subscribe"' not in data:
                chunk = await r.read(4096)
                if not chunk:
                    raise RuntimeError("closed")
                data += chunk
        conns.append((r, w))

async def main():
    before = rss()
    conns, sem = [], asyncio.Semaphore(200)
    await asyncio.gather(*(one(i, conns, sem) for i in range(N)))
    await asyncio.sleep(5)
    after = rss()
    print(json.dumps({"kind": KIND, "n": len(conns), "rss_before": before, "rss_after": after,
                      "per_conn": (after - before) / len(conns)}))
    for _, w in conns:
        w.close()

asyncio.run(main())
