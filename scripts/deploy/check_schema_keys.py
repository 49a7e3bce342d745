#!/usr/bin/env python3
"""The chart's values schema and the binary agree on configuration keys.

- every key the binary has (from `fanfare check-config`, which prints the full
  effective configuration) is in values.schema.json's `config`, or is one the
  chart manages itself (listen addresses, broker, Redis URLs, secrets);
- every key the schema allows is accepted by the binary: a file setting all of
  them passes `fanfare check-config`.
Usage: check_schema_keys.py FANFARE_BIN helm/fanfare/values.schema.json
"""
import json
import os
import subprocess
import sys
import tempfile
import tomllib

MANAGED = {"http.listen", "grpc.listen", "broker.kind", "redis.urls", "redis.cluster", "api.key", "auth.hmac_secret",
           "auth.hmac_previous_secret", "webhooks.secret", "http.tls_cert", "http.tls_key", "grpc.tls_cert", "grpc.tls_key",
           # the chart's admin.* values (credentials from a Secret)
           "admin.enabled", "admin.password", "admin.password_hash", "admin.secret"}
SAMPLE = {"boolean": False, "integer": None, "string": "", "array": []}


def check_config(binary, text):
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(text)
    try:
        r = subprocess.run([binary, "check-config", "--config", f.name], capture_output=True, text=True,
                           timeout=30, env={"PATH": os.environ.get("PATH", "")})
    finally:
        os.unlink(f.name)
    return r


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(v)


def main():
    binary, schema_path = sys.argv[1:3]
    # One entry of each list section, so its keys show up.
    r = check_config(binary, '[[namespaces]]\nname = "x"\n\n'
                             '[[proxies]]\nname = "p"\nendpoint = "http://127.0.0.1:9/p"\n')
    if r.returncode != 0:
        sys.exit(f"schema keys: check-config failed: {r.stderr}")
    effective = tomllib.loads(r.stdout)
    server = {}
    for section, body in effective.items():
        if isinstance(body, dict):
            for k, v in body.items():
                server[f"{section}.{k}"] = v
        elif isinstance(body, list):
            for k, v in body[0].items():
                server[f"{section}[].{k}"] = v
    schema = json.load(open(schema_path))["properties"]["config"]["properties"]
    allowed = {}
    for section, sub in schema.items():
        props = sub["items"]["properties"] if sub.get("type") == "array" else sub["properties"]
        for k, ps in props.items():
            allowed[f"{section}[].{k}" if sub.get("type") == "array" else f"{section}.{k}"] = ps
    errors = []
    for key in sorted(set(server) - set(allowed) - MANAGED):
        errors.append(f"the binary has `{key}`, which values.schema.json (config) does not allow")
    for key in sorted(set(allowed) & MANAGED):
        errors.append(f"`{key}` is managed by the chart but the schema lets values.config set it")
    # A file with every key the schema allows, valid values taken from the binary's defaults.
    sections = {}
    for key, ps in allowed.items():
        section, name = key.split(".", 1)
        value = server.get(key)
        if value is None:
            t = ps.get("type") or "string"
            value = SAMPLE[t] if SAMPLE.get(t) is not None else ps.get("minimum", 1)
        sections.setdefault(section, {})[name] = value
    text = ""
    for section, body in sections.items():
        header = f"[[{section[:-2]}]]" if section.endswith("[]") else f"[{section}]"
        text += header + "\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in body.items()) + "\n"
    r = check_config(binary, text)
    if r.returncode != 0:
        errors.append(f"a file with every schema key fails check-config: {r.stderr.strip()}")
    if errors:
        print("\n".join(f"schema keys: {e}" for e in errors), file=sys.stderr)
        sys.exit(1)
    print(f"schema keys: {len(allowed)} config keys in the schema, {len(server)} in the binary "
          f"({len(MANAGED)} managed by the chart); all agree")


if __name__ == "__main__":
    main()
