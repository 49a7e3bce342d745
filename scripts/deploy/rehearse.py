#!/usr/bin/env python3
"""Rehearses the Deployment that `helm template` rendered, without a cluster.

Takes the fanfare container of the rendered Deployment and runs the real binary
with exactly its args and environment: ConfigMap and Secret volumes are written
to a temporary directory (paths in args rewritten to it), env values resolved
from the rendered ConfigMaps/Secrets and the downward API. Local Redis servers
stand in for the configured ones (a Redis Cluster when redis.cluster is true,
as many standalone servers as URLs otherwise): FANFARE__REDIS__URLS is the one
override. The node then has to pass its startup, liveness and readiness probes
(the paths and ports the Deployment declares), serve one WebSocket client and
one control API call (with the API key and a token signed by the rendered JWT
secret), and on SIGTERM close a connected client with 3001 and exit 0 within
the grace period.

When `unshare --net` works (root) everything runs in a private network
namespace, so the rendered listen addresses (0.0.0.0:8000, ...) are used as they
are; otherwise the listeners move to free loopback ports (printed).

Usage: rehearse.py MANIFESTS.yaml --bin target/debug/fanfare
       [--existing-secret KEY=VALUE ...]   stand-ins for keys of a Secret the
                                           chart does not render (existingSecret)
Only processes this script started are stopped, by PID.
"""
import argparse
import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
POD_NAME = "fanfare-rehearsal-0"


def log(msg):
    print(f"rehearse: {msg}", flush=True)


def fail(msg):
    print(f"rehearse: FAILED: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def find(docs, kind, name):
    for d in docs:
        if d.get("kind") == kind and d["metadata"]["name"] == name:
            return d
    return None


def secret_data(secret):
    out = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    out.update(secret.get("stringData") or {})
    return out


class Pod:
    """The parts of the rendered Deployment the rehearsal needs."""

    def __init__(self, docs, stand_ins):
        deps = [d for d in docs if d.get("kind") == "Deployment"]
        self.dep = next(
            (d for d in deps for c in d["spec"]["template"]["spec"]["containers"] if c["name"] == "fanfare"),
            None,
        )
        if not self.dep:
            fail("no Deployment with a container named fanfare in the manifests")
        self.docs = docs
        self.ns = self.dep["metadata"].get("namespace", "default")
        self.spec = self.dep["spec"]["template"]["spec"]
        self.c = next(c for c in self.spec["containers"] if c["name"] == "fanfare")
        self.stand_ins = stand_ins

    def _secret(self, name, key, optional):
        s = find(self.docs, "Secret", name)
        if s is not None:
            data = secret_data(s)
            if key in data:
                return data[key]
        elif key in self.stand_ins:
            log(f"secret {name}/{key} is not rendered (existingSecret): using the stand-in value")
            return self.stand_ins[key]
        if optional:
            return None
        fail(f"secret {name} key {key} is neither rendered nor given with --existing-secret")

    def _configmap(self, name, key, optional):
        cm = find(self.docs, "ConfigMap", name)
        if cm is not None and key in (cm.get("data") or {}):
            return cm["data"][key]
        if optional:
            return None
        fail(f"configmap {name} key {key} is not rendered")

    def env(self):
        env = {}
        for src in self.c.get("envFrom") or []:
            if "secretRef" in src:
                s = find(self.docs, "Secret", src["secretRef"]["name"])
                if s is None and not src["secretRef"].get("optional"):
                    fail(f"envFrom secret {src['secretRef']['name']} is not rendered")
                env.update({src.get("prefix", "") + k: v for k, v in secret_data(s or {}).items()})
            elif "configMapRef" in src:
                cm = find(self.docs, "ConfigMap", src["configMapRef"]["name"]) or {}
                env.update({src.get("prefix", "") + k: v for k, v in (cm.get("data") or {}).items()})
        for e in self.c.get("env") or []:
            if "value" in e:
                env[e["name"]] = str(e["value"])
                continue
            vf = e.get("valueFrom", {})
            val = None
            if "secretKeyRef" in vf:
                r = vf["secretKeyRef"]
                val = self._secret(r["name"], r["key"], r.get("optional", False))
            elif "configMapKeyRef" in vf:
                r = vf["configMapKeyRef"]
                val = self._configmap(r["name"], r["key"], r.get("optional", False))
            elif "fieldRef" in vf:
                val = {
                    "metadata.name": POD_NAME,
                    "metadata.namespace": self.ns,
                    "status.podIP": "127.0.0.1",
                    "spec.nodeName": "rehearsal-node",
                    "spec.serviceAccountName": self.spec.get("serviceAccountName", "default"),
                }.get(vf["fieldRef"]["fieldPath"])
                if val is None:
                    fail(f"fieldRef {vf['fieldRef']['fieldPath']} is not supported by the rehearsal")
            else:
                fail(f"env {e['name']}: unsupported valueFrom {vf}")
            if val is not None:
                env[e["name"]] = val
        return env

    def write_volumes(self, root):
        """Writes ConfigMap/Secret volumes under root; returns {mountPath: dir}."""
        vols = {v["name"]: v for v in self.spec.get("volumes") or []}
        mounts = {}
        for m in self.c.get("volumeMounts") or []:
            v = vols.get(m["name"])
            if v is None:
                fail(f"volumeMount {m['name']} has no volume")
            d = os.path.join(root, m["mountPath"].lstrip("/"))
            os.makedirs(d, exist_ok=True)
            if "configMap" in v:
                cm = find(self.docs, "ConfigMap", v["configMap"]["name"])
                if cm is None:
                    fail(f"volume {m['name']}: ConfigMap {v['configMap']['name']} is not rendered")
                files = dict(cm.get("data") or {})
            elif "secret" in v:
                s = find(self.docs, "Secret", v["secret"]["secretName"])
                if s is None:
                    fail(f"volume {m['name']}: Secret {v['secret']['secretName']} is not rendered")
                files = secret_data(s)
            elif "emptyDir" in v:
                files = {}
            else:
                fail(f"volume {m['name']}: kind {list(v)} is not supported by the rehearsal")
            for item in (v.get("configMap") or v.get("secret") or {}).get("items") or []:
                files[item["path"]] = files.pop(item["key"])
            for name, content in files.items():
                with open(os.path.join(d, name), "w") as f:
                    f.write(content)
            mounts[m["mountPath"]] = d
        return mounts

    def port(self, ref):
        if isinstance(ref, int):
            return ref
        for p in self.c.get("ports") or []:
            if p["name"] == ref:
                return p["containerPort"]
        fail(f"probe port {ref!r} is not a container port")

    def probe(self, kind):
        p = self.c.get(kind)
        if not p:
            return None
        if "httpGet" not in p:
            fail(f"{kind} is not an httpGet probe")
        return p["httpGet"]["path"], self.port(p["httpGet"]["port"]), p


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def http_status(url, timeout=2):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except OSError:
        return None, ""


class Procs:
    """Processes started here; stopped by PID only."""

    def __init__(self):
        self.procs = []

    def start(self, argv, **kw):
        p = subprocess.Popen(argv, **kw)
        self.procs.append(p)
        return p

    def stop_all(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)


def wait_port(port, deadline):
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def start_redis(procs, tmp, ports, cluster):
    redis_server = shutil.which("redis-server") or fail("redis-server is not installed")
    for port in ports:
        argv = [redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", tmp, "--logfile", os.path.join(tmp, f"redis-{port}.log")]
        if cluster:
            argv += ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf"]
        procs.start(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for port in ports:
        if not wait_port(port, time.time() + 10):
            fail(f"redis-server on {port} did not start")
    if cluster:
        cli = shutil.which("redis-cli") or fail("redis-cli is not installed")
        r = subprocess.run([cli, "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports],
                            "--cluster-replicas", "0", "--cluster-yes"],
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            fail(f"redis-cli --cluster create failed: {r.stdout}{r.stderr}")
        deadline = time.time() + 30
        while time.time() < deadline:
            info = subprocess.run([cli, "-p", str(ports[0]), "cluster", "info"],
                                  capture_output=True, text=True, timeout=5).stdout
            if "cluster_state:ok" in info:
                break
            time.sleep(0.2)
        else:
            fail("the local Redis Cluster did not reach cluster_state:ok")
    return [f"redis://127.0.0.1:{p}" for p in ports]


def env_value(env, key, file_cfg, section, name, default=None):
    if key in env:
        return env[key]
    return file_cfg.get(section, {}).get(name, default)


def truthy(v):
    return v is True or str(v).lower() == "true"


def rehearse(args):
    pod = Pod(load(args.manifests), dict(kv.split("=", 1) for kv in args.existing_secret))
    procs = Procs()
    tmp = tempfile.mkdtemp(prefix="fanfare-rehearsal.")
    node_log = os.path.join(tmp, "fanfare.log")
    try:
        mounts = pod.write_volumes(tmp)
        argv = [args.bin]
        for a in (pod.c.get("command") or [])[1:] + (pod.c.get("args") or []):
            for mount, d in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
                if a == mount or a.startswith(mount + "/"):
                    a = d + a[len(mount):]
                    break
            argv.append(a)
        env = pod.env()
        log(f"container args: {pod.c.get('args')}")
        log(f"container env: {sorted(env)}")

        # The configuration file given with --config (to see the broker settings).
        file_cfg = {}
        if "--config" in argv:
            with open(argv[argv.index("--config") + 1], "rb") as f:
                file_cfg = tomllib.load(f)
        overrides = {}
        kind = env_value(env, "FANFARE__BROKER__KIND", file_cfg, "broker", "kind", "memory")
        if kind == "redis":
            urls = env_value(env, "FANFARE__REDIS__URLS", file_cfg, "redis", "urls", [])
            if isinstance(urls, str):
                urls = [u for u in urls.split(",") if u]
            cluster = truthy(env_value(env, "FANFARE__REDIS__CLUSTER", file_cfg, "redis", "cluster", False))
            n = max(len(urls), 3) if cluster else max(len(urls), 1)
            base = 7000 if args.netns else None
            ports = [base + i for i in range(n)] if base else [free_port() for _ in range(n)]
            local = start_redis(procs, tmp, ports, cluster)
            what = f"a local Redis Cluster of {n} masters" if cluster else f"{n} local Redis server(s)"
            log(f"broker: redis, {len(urls)} URL(s), cluster={cluster}: {what} stand in")
            overrides["FANFARE__REDIS__URLS"] = ",".join(local)
        else:
            log(f"broker: {kind}")

        ready = pod.probe("readinessProbe") or fail("the Deployment has no readinessProbe")
        live = pod.probe("livenessProbe") or fail("the Deployment has no livenessProbe")
        startup = pod.probe("startupProbe")
        http_port = ready[1]
        if not args.netns:
            hp, gp = free_port(), free_port()
            overrides["FANFARE__HTTP__LISTEN"] = f"127.0.0.1:{hp}"
            overrides["FANFARE__GRPC__LISTEN"] = f"127.0.0.1:{gp}"
            http_port = hp
            log("no private network namespace: listeners moved to free loopback ports")
        for k, v in overrides.items():
            log(f"override {k}={v}")
        run_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env, **overrides}

        # Startup: the startup probe's budget (or 60 s).
        budget = 60
        if startup:
            sp = startup[2]
            budget = sp.get("initialDelaySeconds", 0) + sp.get("periodSeconds", 10) * sp.get("failureThreshold", 3)
        with open(node_log, "w") as lf:
            node = procs.start(argv, env=run_env, cwd=tmp, stdout=lf, stderr=subprocess.STDOUT)
        base_url = f"http://127.0.0.1:{http_port}"
        deadline = time.time() + budget
        path = (startup or live)[0]
        while time.time() < deadline:
            if node.poll() is not None:
                fail(f"fanfare exited with {node.returncode} during start-up:\n{open(node_log).read()}")
            if http_status(base_url + path)[0] == 200:
                break
            time.sleep(0.1)
        else:
            fail(f"{path} did not answer 200 within the startup budget of {budget}s:\n{open(node_log).read()}")
        log(f"startup probe {path}: 200")
        status, body = http_status(base_url + live[0])
        if status != 200:
            fail(f"liveness {live[0]} answered {status}")
        log(f"liveness probe {live[0]}: 200")
        deadline = time.time() + 30
        while time.time() < deadline:
            status, body = http_status(base_url + ready[0])
            if status == 200:
                break
            time.sleep(0.1)
        else:
            fail(f"readiness {ready[0]} answered {status} {body!r}:\n{open(node_log).read()}")
        log(f"readiness probe {ready[0]}: 200")
        status, metrics = http_status(base_url + "/metrics")
        if status != 200 or "fanfare_node_ready 1" not in metrics:
            fail("/metrics does not report fanfare_node_ready 1")

        # One client and one API call with the rendered secrets.
        client = [sys.executable, os.path.join(HERE, "drive.py"), f"127.0.0.1:{http_port}"]
        if run_env.get("FANFARE__AUTH__HMAC_SECRET"):
            tok = subprocess.run(argv[:1] + ["token", "--user", "rehearsal", "--ttl", "300"] + argv[1:],
                                 env=run_env, cwd=tmp, capture_output=True, text=True, timeout=30)
            if tok.returncode != 0:
                fail(f"fanfare token failed: {tok.stderr}")
            client += ["--token", tok.stdout.strip()]
        drive = list(client)
        if run_env.get("FANFARE__API__KEY"):
            drive += ["--api-key", run_env["FANFARE__API__KEY"]]
        r = subprocess.run(drive, capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            fail(f"client/API check failed: {r.stdout}{r.stderr}\n{open(node_log).read()}")
        log(r.stdout.strip())

        # A client that stays connected: SIGTERM must close it with 3001 (reconnect).
        holder = procs.start(client + ["--hold", "30", "--expect-close", "3001"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if holder.stdout.readline().strip() != "subscribed":
            fail(f"the held client did not subscribe: {holder.stdout.read()}")

        # SIGTERM: exit 0 within the grace period left after the preStop sleep.
        grace = pod.spec.get("terminationGracePeriodSeconds", 30)
        pre = (pod.c.get("lifecycle") or {}).get("preStop") or {}
        pre_sleep = (pre.get("sleep") or {}).get("seconds", 0)
        if "exec" in pre:
            cmd = pre["exec"]["command"]
            pre_sleep = int(cmd[1]) if len(cmd) == 2 and cmd[0] == "sleep" else 0
        t0 = time.time()
        node.send_signal(signal.SIGTERM)
        try:
            rc = node.wait(grace - pre_sleep)
        except subprocess.TimeoutExpired:
            fail(f"fanfare did not stop within {grace - pre_sleep}s after SIGTERM (grace {grace}s - preStop {pre_sleep}s)")
        if rc != 0:
            fail(f"fanfare exited with {rc} after SIGTERM:\n{open(node_log).read()}")
        try:
            out, _ = holder.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            fail("the held client was not closed on SIGTERM")
        if holder.returncode != 0:
            fail(f"the held client: {out}")
        log(f"SIGTERM: the connected client was closed with 3001, node exit 0 after "
            f"{time.time() - t0:.1f}s (grace {grace}s, preStop {pre_sleep}s)")
    finally:
        procs.stop_all()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    log("ok")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("manifests")
    ap.add_argument("--bin", required=True)
    ap.add_argument("--existing-secret", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--netns", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-netns", action="store_true", help="do not use a private network namespace")
    args = ap.parse_args()
    args.bin = os.path.abspath(args.bin)
    if not args.netns and not args.no_netns and shutil.which("unshare") and shutil.which("ip"):
        probe = subprocess.run(["unshare", "--net", "true"], capture_output=True)
        if probe.returncode == 0:
            # Re-run inside a private network namespace with loopback up.
            inner = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--netns"]
            script = 'ip link set lo up && exec "$@"'
            sys.exit(subprocess.call(["unshare", "--net", "sh", "-c", script, "sh", *inner]))
    rehearse(args)


if __name__ == "__main__":
    main()
