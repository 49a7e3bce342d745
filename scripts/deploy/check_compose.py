#!/usr/bin/env python3
"""Checks deploy/compose without Docker: the compose file parses and everything
it references exists and agrees.

- services: redis, three or more fanfare nodes built from deploy/Dockerfile, a
  load balancer, prometheus, grafana; depends_on targets exist, and
  `service_healthy` only on services with a healthcheck (the fanfare image has
  a HEALTHCHECK);
- every bind-mount source exists;
- nginx.conf: upstream servers are fanfare services on the ports their
  configuration listens on; the WebSocket location passes Upgrade/Connection;
- prometheus.yml: the fanfare job scrapes exactly the fanfare services;
- Grafana provisioning: datasource points at the prometheus service, the
  dashboards path is a mount holding the dashboard JSON;
- the Dockerfile: COPY sources exist and pass .dockerignore, EXPOSE matches the
  ports, USER 10001 (the chart's runAsUser), HEALTHCHECK and ENTRYPOINT set;
  no `# syntax=` line (BuildKit would pull a frontend image), base images are
  build arguments defaulting to the official ones, and the `runtime-prebuilt`
  target comes before the builder and uses no BuildKit-only syntax (the legacy
  builder builds every stage up to the target; test-deploy.sh builds it).
Prints the nodes' environment (defaults of ${VAR:-default}) as KEY=VALUE lines
to ENV_OUT, for `fanfare check-config` with the compose configuration.

Usage: check_compose.py REPO_ROOT ENV_OUT
"""
import fnmatch
import os
import re
import sys

import yaml

errors = []


def err(msg):
    errors.append(msg)


def expand(v):
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), str(v))


def dockerignore_allows(root, path):
    """Last matching pattern wins (Docker semantics, enough for our allowlist)."""
    allowed = True
    with open(os.path.join(root, ".dockerignore")) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            neg = line.startswith("!")
            pat = line[1:] if neg else line
            pat = pat.rstrip("/")
            parts = path.split("/")
            prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
            if any(fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.replace("**/", "")) for p in prefixes):
                allowed = neg
    return allowed


def main():
    root, env_out = sys.argv[1:3]
    cdir = os.path.join(root, "deploy/compose")
    with open(os.path.join(cdir, "docker-compose.yml")) as f:
        compose = yaml.safe_load(f)
    services = compose.get("services") or {}

    dockerfile = os.path.join(root, "deploy/Dockerfile")
    nodes = []
    for name, svc in services.items():
        b = svc.get("build")
        if b:
            ctx = os.path.normpath(os.path.join(cdir, b["context"]))
            if os.path.normpath(os.path.join(ctx, b.get("dockerfile", "Dockerfile"))) != os.path.normpath(dockerfile):
                err(f"{name}: builds {b} instead of deploy/Dockerfile")
            if ctx != os.path.normpath(root):
                err(f"{name}: build context {ctx} is not the repository root")
            nodes.append(name)
    if len(nodes) < 3:
        err(f"expected three or more fanfare nodes built from deploy/Dockerfile, found {nodes}")
    for need in ("redis", "prometheus", "grafana"):
        if need not in services:
            err(f"service {need} is missing")
    lbs = [n for n, s in services.items() if re.match(r"(nginx|haproxy)", str(s.get("image", "")))]
    if not lbs:
        err("no nginx/haproxy load balancer service")

    def healthy(name):
        return "healthcheck" in services[name] or name in nodes  # the image has a HEALTHCHECK

    mounts = {}
    for name, svc in services.items():
        deps = svc.get("depends_on") or []
        for dep, cond in (deps.items() if isinstance(deps, dict) else [(d, {}) for d in deps]):
            if dep not in services:
                err(f"{name}: depends_on unknown service {dep}")
            elif (cond or {}).get("condition") == "service_healthy" and not healthy(dep):
                err(f"{name}: waits for {dep} to be healthy, which has no healthcheck")
        for v in svc.get("volumes") or []:
            src, dst = v.split(":")[:2]
            if src.startswith(".") or src.startswith("/"):
                p = os.path.normpath(os.path.join(cdir, src))
                if not os.path.exists(p):
                    err(f"{name}: mount source {src} does not exist")
                mounts[(name, dst)] = p

    # The nodes' configuration and environment.
    node = services[nodes[0]] if nodes else {}
    cmd = node.get("command") or []
    cfg_path = None
    if "--config" in cmd:
        target = cmd[cmd.index("--config") + 1]
        for (svc, dst), src in mounts.items():
            if svc == nodes[0] and (target == dst or target.startswith(dst + "/")):
                cfg_path = src if target == dst else os.path.join(src, target[len(dst) + 1:])
        if not cfg_path:
            err(f"--config {target} is not mounted into {nodes[0]}")
    http_port, grpc_port = 8000, 9000
    if cfg_path:
        import tomllib
        with open(cfg_path, "rb") as f:
            cfg = tomllib.load(f)
        http_port = int(cfg.get("http", {}).get("listen", "0.0.0.0:8000").rsplit(":", 1)[1])
        grpc_port = int(cfg.get("grpc", {}).get("listen", "0.0.0.0:9000").rsplit(":", 1)[1])
        for url in cfg.get("redis", {}).get("urls", []):
            host = re.match(r"rediss?://(?:[^@]*@)?([^:/]+)", url).group(1)
            if host not in services:
                err(f"redis.urls {url}: {host} is not a compose service")
    with open(env_out, "w") as f:
        env = node.get("environment") or {}
        if isinstance(env, list):
            env = dict(e.split("=", 1) for e in env)
        for k, v in env.items():
            f.write(f"{k}={expand(v)}\n")
        f.write(f"CONFIG={cfg_path or ''}\n")

    # nginx
    for lb in lbs:
        conf = next((src for (svc, dst), src in mounts.items() if svc == lb and dst.endswith(".conf")), None)
        if not conf:
            err(f"{lb}: no configuration file mounted")
            continue
        text = open(conf).read()
        for host, port in re.findall(r"^\s*server\s+([\w.-]+):(\d+)", text, re.M):
            if host not in nodes:
                err(f"{lb}: upstream server {host} is not a fanfare node")
            if int(port) not in (http_port, grpc_port):
                err(f"{lb}: upstream port {port} is neither http ({http_port}) nor grpc ({grpc_port})")
        for n in nodes:
            if f"{n}:{http_port}" not in text:
                err(f"{lb}: {n}:{http_port} is not an upstream")
        ws = re.search(r"location\s*=?\s*/connection/websocket\s*\{(.*?)\}", text, re.S)
        if not ws or "Upgrade $http_upgrade" not in ws.group(1) or "$connection_upgrade" not in ws.group(1):
            err(f"{lb}: the /connection/websocket location does not pass the WebSocket upgrade")
        if "proxy_http_version 1.1" not in (ws.group(1) if ws else ""):
            err(f"{lb}: WebSocket proxying needs proxy_http_version 1.1")

    # prometheus
    prom = next((src for (svc, dst), src in mounts.items() if svc == "prometheus" and dst.endswith("prometheus.yml")), None)
    if not prom:
        err("prometheus: prometheus.yml is not mounted")
    else:
        pc = yaml.safe_load(open(prom))
        job = next((j for j in pc.get("scrape_configs", []) if j["job_name"] == "fanfare"), None)
        if not job:
            err("prometheus.yml: no job fanfare")
        else:
            targets = {t for sc in job.get("static_configs", []) for t in sc["targets"]}
            want = {f"{n}:{http_port}" for n in nodes}
            if targets != want:
                err(f"prometheus.yml: fanfare targets {sorted(targets)} != nodes {sorted(want)}")
        for rf in pc.get("rule_files", []):
            if not any(svc == "prometheus" and dst.endswith("/" + rf) for (svc, dst) in mounts):
                err(f"prometheus: rule file {rf} is not mounted next to prometheus.yml")

    # grafana
    prov = next((src for (svc, dst), src in mounts.items() if svc == "grafana" and dst == "/etc/grafana/provisioning"), None)
    if not prov:
        err("grafana: provisioning directory is not mounted")
    else:
        for fn in os.listdir(os.path.join(prov, "datasources")):
            for ds in yaml.safe_load(open(os.path.join(prov, "datasources", fn)))["datasources"]:
                host = re.match(r"https?://([^:/]+)", ds["url"]).group(1)
                if host not in services:
                    err(f"grafana datasource {ds['name']}: {host} is not a service")
        for fn in os.listdir(os.path.join(prov, "dashboards")):
            for p in yaml.safe_load(open(os.path.join(prov, "dashboards", fn)))["providers"]:
                path = p["options"]["path"]
                src = mounts.get(("grafana", path))
                if not src or not os.path.exists(os.path.join(src, "fanfare.json")):
                    err(f"grafana dashboards path {path} does not hold fanfare.json")

    # Dockerfile
    df = open(dockerfile).read()
    for src in re.findall(r"^COPY\s+(?!--from)(?:--\S+\s+)*(.+?)\s+\S+$", df, re.M):
        for s in src.split():
            if s.startswith("$"):
                continue  # a build argument: runtime-prebuilt's own context
            if not os.path.exists(os.path.join(root, s)):
                err(f"Dockerfile: COPY source {s} does not exist")
            elif not dockerignore_allows(root, s.rstrip("/")):
                err(f"Dockerfile: COPY source {s} is excluded by .dockerignore")
    if not dockerignore_allows(root, "Cargo.toml") or dockerignore_allows(root, "target"):
        err(".dockerignore: must allow Cargo.toml and exclude target/")
    expose = set(map(int, re.findall(r"^EXPOSE\s+(.+)$", df, re.M)[0].split()))
    if expose != {http_port, grpc_port}:
        err(f"Dockerfile: EXPOSE {expose} != ports {http_port}, {grpc_port}")
    if not re.search(r"^USER\s+10001(:10001)?\s*$", df, re.M):
        err("Dockerfile: USER is not 10001")
    if "HEALTHCHECK" not in df or not re.search(r'^ENTRYPOINT \["/usr/local/bin/fanfare"\]', df, re.M):
        err("Dockerfile: HEALTHCHECK or ENTRYPOINT missing")
    if not re.search(r"cargo build --release --locked", df):
        err("Dockerfile: the build is not `cargo build --release --locked`")
    if re.search(r"^#\s*syntax\s*=", df, re.M):
        err("Dockerfile: a `# syntax=` line makes BuildKit pull a frontend image")
    for arg, default in (("BUILDER_IMAGE", r"rust:\S*bookworm"), ("RUNTIME_IMAGE", r"debian:bookworm-slim")):
        if not re.search(rf"^ARG {arg}={default}\s*$", df, re.M):
            err(f"Dockerfile: no `ARG {arg}=` with the official default ({default})")
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", df, re.M | re.I)
    if "runtime-prebuilt" not in stages or "builder" not in stages:
        err(f"Dockerfile: stages {stages} lack runtime-prebuilt or builder")
    else:
        head = df[: re.search(r"^FROM\s+\S+\s+AS\s+builder\b", df, re.M | re.I).start()]
        if stages.index("runtime-prebuilt") > stages.index("builder"):
            err("Dockerfile: runtime-prebuilt must come before the builder stage")
        elif re.search(r"--mount|--chmod|--link|<<", head):
            err("Dockerfile: the stages up to runtime-prebuilt use BuildKit-only syntax")

    if errors:
        print("\n".join(f"compose: {e}" for e in errors), file=sys.stderr)
        sys.exit(1)
    print(f"compose: {len(services)} services ({', '.join(services)}), references and ports agree; Dockerfile consistent")


if __name__ == "__main__":
    main()
