"""Summaries of scripts/bench/proxy.sh runs.

    proxy_summary.py line REPORT.json   one line for a run (REPORT.backend beside it)
    proxy_summary.py table OUT_DIR      medians per variant, Markdown
"""

import glob
import json
import os
import re
import statistics
import sys

TICK_US = 1e6 / os.sysconf("SC_CLK_TCK")


def load(path):
    r = json.load(open(path))
    b = path[: -len(".json")] + ".backend"
    calls = ticks = None
    if os.path.exists(b):
        t0, c0, t1, c1 = (int(x) for x in open(b).read().split())
        ticks, calls = t1 - t0, c1 - c0
    r["_backend"] = {"calls": calls, "cpu_us": None if ticks is None else ticks * TICK_US}
    return r


def figures(r):
    """The figures of one run, by name."""
    be = r["_backend"]
    # Other processes' CPU over the measured window (connect phase for idle).
    machine = r["machine"] if r.get("messages") else r["machine_connect"]
    out = {"ok": r["ok"], "other_cpu": machine.get("other_cpu_seconds_per_second")}
    if r.get("messages"):
        m = r["messages"]
        out.update(
            rate=m["publish_rate_per_second"],
            errors=m["publish_errors"],
            node_us=m["server_cpu_us_per_delivery"],
            node_cpu=r["server"]["cpu_seconds_per_second"],
            p50_us=m["latency_us"]["p50"],
            p99_us=m["latency_us"]["p99"],
            lost=m["lost"],
        )
        n = m["published"]
        secs = m["publish_seconds"]
    else:
        k = r["connect"]
        out.update(
            rate=k["rate_per_second"],
            node_us=k["server_cpu_us_per_connect"],
            node_cpu=k["server_cpu_seconds_per_second"],
            p50_us=k["handshake_us"]["p50"],
            p99_us=k["handshake_us"]["p99"],
            failed=r["connections"]["failed"],
        )
        n = r["connections"]["connected"]
        secs = k["seconds"]
    if be["calls"]:
        out["backend_us_per_call"] = be["cpu_us"] / be["calls"]
        out["backend_calls"] = be["calls"]
        out["backend_cpu"] = be["cpu_us"] / 1e6 / secs if secs else None
    out["count"] = n
    return out


def fmt(v, nd=1):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return f"{v:,}"


def line(path):
    f = figures(load(path))
    name = os.path.basename(path)[: -len(".json")]
    extra = (f" backend {fmt(f.get('backend_us_per_call'))} us/call"
             f" ({fmt(f.get('backend_calls'))} calls, {fmt(f.get('backend_cpu'), 2)} CPU s/s)"
             if "backend_calls" in f else "")
    print(f"{name:22} {fmt(f['rate'], 0):>8}/s  node {fmt(f['node_us'])} us/op"
          f" ({fmt(f['node_cpu'], 2)} CPU s/s)  p50 {fmt(f['p50_us'])} us p99 {fmt(f['p99_us'])} us"
          f"{extra}  other {fmt(f['other_cpu'], 2)}  ok {f['ok']}")


def table(out_dir):
    groups = {}
    for path in sorted(glob.glob(os.path.join(out_dir, "*.json"))):
        name = os.path.basename(path)[: -len(".json")]
        key = re.sub(r"-\d+$", "", name)
        groups.setdefault(key, []).append(figures(load(path)))
    med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
    print("| variant | runs | rate /s | node CPU µs per op | node CPU s/s | p50 µs | p99 µs "
          "| backend CPU µs per call | backend CPU s/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key, runs in groups.items():
        col = lambda k: med([r[k] for r in runs if r.get(k) is not None])  # noqa: E731
        print(f"| {key} | {len(runs)} | {fmt(col('rate'), 0)} | {fmt(col('node_us'))} "
              f"| {fmt(col('node_cpu'), 2)} | {fmt(col('p50_us'))} | {fmt(col('p99_us'))} "
              f"| {fmt(col('backend_us_per_call'))} | {fmt(col('backend_cpu'), 2)} |")


if __name__ == "__main__":
    {"line": line, "table": table}[sys.argv[1]](sys.argv[2])
