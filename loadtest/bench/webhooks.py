#!/usr/bin/env python3
"""Webhook delivery throughput (issue 15, docs/BENCHMARKS.md "Webhooks").

Starts a fanfare node (memory broker, or Redis broker with a redis-server of
its own) whose webhooks go to a trivial receiver in this process (reads the
body, counts `"id":`, answers 200; no signature check, no JSON parsing, so
the node's side is what is measured). While the receiver answers 500, N
WebSocket clients connect, subscribe to one channel and leave: the events
pile up (memory queue or Redis outbox). Then the receiver answers 200 and the
time until the last event arrives gives the delivery rate in events/s.

Usage: python3 loadtest/bench/webhooks.py FANFARE_BIN [--redis] [-n 2000] [--batch 100]
Needs `websockets` (tests/api/.venv has it) and redis-server for --redis.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from websockets.sync.client import connect as ws_connect


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Counter:
    def __init__(self):
        self.lock = threading.Lock()
        self.ok = False
        self.events = 0
        self.posts = 0
        self.first = self.last = None


def receiver(counter):
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with counter.lock:
                status = 200 if counter.ok else 500
                if status == 200:
                    now = time.monotonic()
                    counter.first = counter.first or now
                    counter.last = now
                    counter.events += body.count(b'"id":')
                    counter.posts += 1
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", free_port()), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def metric(port, name):
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(l.rsplit(" ", 1)[1]) for l in body.splitlines()
               if l.startswith(name + " ") or l.startswith(name + "{"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bin")
    ap.add_argument("--redis", action="store_true")
    ap.add_argument("-n", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=100)
    a = ap.parse_args()
    counter = Counter()
    srv = receiver(counter)
    procs = []
    tmp = tempfile.mkdtemp()
    try:
        broker = ""
        if a.redis:
            rport = free_port()
            procs.append(subprocess.Popen(
                ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no"], stdout=subprocess.DEVNULL))
            time.sleep(0.3)
            broker = f'[broker]\nkind = "redis"\n[redis]\nurls = ["redis://127.0.0.1:{rport}"]\n'
        port, gport = free_port(), free_port()
        cfg = os.path.join(tmp, "node.toml")
        events = ["connect", "disconnect", "subscribe", "unsubscribe",
                  "channel_occupied", "channel_vacated"]
        open(cfg, "w").write(
            f'[http]\nlisten = "127.0.0.1:{port}"\n[grpc]\nlisten = "127.0.0.1:{gport}"\n{broker}'
            f'[webhooks]\nurl = "http://127.0.0.1:{srv.server_address[1]}/h"\nsecret = "s"\n'
            f'events = {json.dumps(events)}\nbatch_size = {a.batch}\nqueue_size = 1000000\n'
            f'retry_backoff = "10ms"\nretry_backoff_max = "20ms"\n'
            # Thousands of connects a second from loopback: limits off, as in every bench.
            '[limits]\nconnect_rate = 0\nip_connect_rate = 0\nnode_connections = 0\n'
            'user_connections = 0\nclient_commands = 0\nuser_commands = 0\n')
        env = {k: v for k, v in os.environ.items() if not k.startswith("FANFARE_")}
        node = subprocess.Popen([a.bin, "--config", cfg], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=env)
        procs.append(node)
        for _ in range(200):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.05)
        for i in range(a.n):
            ws = ws_connect(f"ws://127.0.0.1:{port}/connection/websocket", legacy=True)
            ws.send('{"id":1,"connect":{}}\n{"id":2,"subscribe":{"channel":"bench"}}')
            got = ""
            while got.count('"id":') < 2:
                got += ws.recv(timeout=5) + "\n"
            ws.close()
        # Every connection: connect, subscribe, unsubscribe, disconnect, and
        # the channel's occupied / vacated (one client at a time).
        deadline = time.monotonic() + 30
        while metric(port, "fanfare_webhook_events_total") < 6 * a.n:
            if time.monotonic() > deadline:
                sys.exit("events were not all queued")
            time.sleep(0.1)
        total = int(metric(port, "fanfare_webhook_events_total"))
        cpu0 = cpu_seconds(node.pid)
        with counter.lock:
            counter.ok = True
        deadline = time.monotonic() + 120
        while True:
            with counter.lock:
                if counter.events >= total:
                    break
            if time.monotonic() > deadline:
                sys.exit(f"only {counter.events} of {total} delivered")
            time.sleep(0.01)
        cpu = cpu_seconds(node.pid) - cpu0
        took = counter.last - counter.first
        print(json.dumps({
            "broker": "redis" if a.redis else "memory", "events": total, "batch": a.batch,
            "posts": counter.posts, "seconds": round(took, 3),
            "events_per_s": round(total / took), "node_cpu_s": round(cpu, 3),
            "node_cpu_us_per_event": round(cpu / total * 1e6, 1),
        }))
    finally:
        for p in procs:
            p.kill()
            p.wait()
        srv.shutdown()


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
