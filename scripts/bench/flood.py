#!/usr/bin/env python3
"""One abusive client for scripts/bench/flood-latency.sh: a WebSocket
connection sending PER_TICK `publish` commands every 10 ms (50 000/s with the
default 500) and reading everything the node answers, reconnecting whenever
it is closed, until TERM/INT or DURATION seconds pass.

  flood.py PORT [DURATION] [PER_TICK] [SOURCE_IP]

Prints one JSON line at the end: connections opened, frames sent, closes by
code. Standard library only; frames are masked with a zero key (valid, and
no per-byte Python work).
"""
import base64
import json
import os
import signal
import socket
import struct
import sys
import threading
import time

port = int(sys.argv[1])
duration = float(sys.argv[2]) if len(sys.argv) > 2 else 30.0
per_tick = int(sys.argv[3]) if len(sys.argv) > 3 else 500
source = sys.argv[4] if len(sys.argv) > 4 else "127.0.0.2"


def text_frame(payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes([0x81, 0x80 | n])
    elif n < 65536:
        head = bytes([0x81, 0x80 | 126]) + struct.pack("!H", n)
    else:
        head = bytes([0x81, 0x80 | 127]) + struct.pack("!Q", n)
    return head + b"\0\0\0\0" + payload


CONNECT = text_frame(b'{"id":1,"connect":{}}')
FLOOD = text_frame("\n".join(
    json.dumps({"id": 2 + i, "publish": {"channel": "flood", "data": {"i": i}}})
    for i in range(per_tick)).encode())
stats = {"connections": 0, "frames": 0, "commands": 0, "closes": {}}


def close_code(buf: bytes):
    """The code of the close frame that ends what the server sent, if any."""
    for n in range(2, 126):
        if len(buf) >= n + 2 and buf[-(n + 2)] == 0x88 and buf[-(n + 1)] == n:
            return struct.unpack("!H", buf[-n:-n + 2])[0]
    return None


def one_connection(deadline: float):
    s = socket.socket()
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET /connection/websocket HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            return "refused"
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        return head.split(b"\r\n")[0].decode()
    stats["connections"] += 1
    tail = bytearray()
    done = threading.Event()

    def reader():
        # Keeps only the last bytes: enough to find the close frame.
        while True:
            try:
                chunk = s.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            tail.extend(chunk)
            del tail[:-4096]
        done.set()

    threading.Thread(target=reader, daemon=True).start()
    s.sendall(CONNECT)
    next_tick = time.monotonic()
    while not done.is_set() and time.monotonic() < deadline:
        try:
            s.sendall(FLOOD)
        except OSError:
            break
        stats["frames"] += 1
        stats["commands"] += per_tick
        next_tick += 0.01
        time.sleep(max(0.0, next_tick - time.monotonic()))
    done.wait(2)
    s.close()
    return close_code(bytes(tail))


def stop(*_):
    raise KeyboardInterrupt


# A background job of a script ignores SIGINT: the bench stops it with TERM.
signal.signal(signal.SIGTERM, stop)
deadline = time.monotonic() + duration
try:
    while time.monotonic() < deadline:
        code = str(one_connection(deadline))
        stats["closes"][code] = stats["closes"].get(code, 0) + 1
        time.sleep(0.05)
except KeyboardInterrupt:
    pass
finally:
    print(json.dumps(stats), flush=True)
