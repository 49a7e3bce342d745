#!/usr/bin/env python3
"""Drives a live fanfare node so that its metrics exist: one WebSocket client
(connect, subscribe, publish, one pushed publication) and one control API call.

Standard library only (a minimal RFC 6455 client), so it runs anywhere python3 is.
Usage: drive.py HOST:PORT [--api-key KEY] [--token JWT]
       drive.py HOST:PORT --hold SECONDS   subscribe, print "subscribed", then wait
                                           for the node to unsubscribe us (a stream
                                           gap after a broker reconnect)
       drive.py HOST:PORT --hold SECONDS --expect-close CODE
                                           subscribe, print "subscribed", then wait
                                           for the node to close with CODE (3001 on
                                           shutdown)
"""
import argparse
import base64
import json
import os
import socket
import struct
import urllib.request


def ws_connect(host, port, timeout=5.0):
    s = socket.create_connection((host, port), timeout=timeout)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        (
            f"GET /connection/websocket HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            raise RuntimeError("connection closed during the WebSocket handshake")
        head += chunk
    status = head.split(b"\r\n", 1)[0]
    if b" 101 " not in status:
        raise RuntimeError(f"handshake failed: {status!r}")
    return s, head.split(b"\r\n\r\n", 1)[1]


def ws_send(s, text, opcode=1):
    payload = text.encode() if isinstance(text, str) else text
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    s.sendall(header + mask + masked)


class Reader:
    def __init__(self, s, buf):
        self.s, self.buf = s, buf
        self.close_code = None

    def _need(self, n):
        while len(self.buf) < n:
            chunk = self.s.recv(65536)
            if not chunk:
                raise RuntimeError("connection closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def frame(self):
        b0, b1 = self._need(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", self._need(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", self._need(8))
        return b0 & 0x0F, self._need(n)


def messages(reader):
    """Yields decoded JSON messages (a frame may carry several, newline-delimited).
    Ends at a close frame, whose code is kept in reader.close_code."""
    while True:
        op, data = reader.frame()
        if op == 8:
            reader.close_code = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else None
            return
        if op == 1:
            for line in data.decode().split("\n"):
                if line.strip():
                    yield json.loads(line)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("addr", help="HOST:PORT of the node's HTTP port")
    ap.add_argument("--api-key", default="")
    ap.add_argument("--token", default="", help="connection JWT")
    ap.add_argument("--hold", type=float, default=0)
    ap.add_argument("--expect-close", type=int, default=0)
    a = ap.parse_args()
    host, port = a.addr.rsplit(":", 1)
    port = int(port)
    api_key = a.api_key
    s, rest = ws_connect(host, port)
    r = Reader(s, rest)
    connect = {"id": 1, "connect": {"token": a.token} if a.token else {}}
    ws_send(s, json.dumps(connect) + '\n{"id":2,"subscribe":{"channel":"drive"}}')
    got = {}
    it = messages(r)
    while not (1 in got and 2 in got):
        m = next(it)
        if "id" in m:
            got[m["id"]] = m
    for i in (1, 2):
        if "error" in got[i]:
            raise RuntimeError(f"command {i} failed: {got[i]}")
    if a.hold:
        print("subscribed", flush=True)
        s.settimeout(a.hold)
        if a.expect_close:
            for _ in it:
                pass
            if r.close_code != a.expect_close:
                raise RuntimeError(f"closed with {r.close_code}, expected {a.expect_close}")
            print(f"drive: closed by the node with {r.close_code}")
            return
        for m in it:
            if "push" in m and "unsubscribe" in m["push"]:
                print(f"drive: unsubscribed by the node: {m['push']}")
                return
        raise RuntimeError("connection closed before an unsubscribe push")
    # A control API call; the publication is then pushed to our subscription.
    req = urllib.request.Request(
        f"http://{host}:{port}/api/publish",
        data=json.dumps({"channel": "drive", "data": {"n": 1}}).encode(),
        method="POST",
    )
    if api_key:
        req.add_header("X-API-Key", api_key)
    with urllib.request.urlopen(req, timeout=5) as resp:
        body = json.load(resp)
        if "offset" not in body and "epoch" not in body and body != {}:
            raise RuntimeError(f"unexpected publish reply {body}")
    for m in it:
        if "push" in m and m["push"].get("channel") == "drive":
            break
    ws_send(s, struct.pack("!H", 1000), opcode=8)
    s.close()
    print("drive: connected, subscribed, published via API, received the push")


if __name__ == "__main__":
    main()
