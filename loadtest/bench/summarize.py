#!/usr/bin/env python3
"""Medians of fanfare-loadtest --json reports, grouped by scenario and size.

usage: summarize.py DIR...   (reads DIR/*.json written by single-node.sh)
"""
import glob
import json
import statistics
import sys


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def main(dirs):
    groups = {}
    for path in sorted(p for d in dirs for p in glob.glob(f"{d}/*.json")):
        try:
            r = json.load(open(path))
        except (ValueError, OSError):
            print(f"skipping {path}: no report", file=sys.stderr)
            continue
        p = r["plan"]
        if r["scenario"] == "idle":
            key = ("idle", p["connections"], p["hold"])
        else:
            key = (r["scenario"], p["connections"], p["channels"], p["rate"])
        groups.setdefault(key, []).append(r)
    for key, rs in groups.items():
        out = {"runs": len(rs), "ok": [r["ok"] for r in rs], "commit": rs[0]["git_commit"]}
        out["other_cpu"] = [round(r["machine"]["other_cpu_seconds_per_second"] or 0, 2) for r in rs]
        out["connect_rate"] = med([r["connect"]["rate_per_second"] for r in rs])
        out["connect_server_cpu"] = med([r["connect"]["server_cpu_seconds_per_second"] for r in rs])
        out["connect_loadgen_cpu"] = med([r["connect"]["loadgen_cpu_seconds_per_second"] for r in rs])
        out["connect_loadgen_cpu_us"] = med([r["connect"].get("loadgen_cpu_us_per_connect") for r in rs])
        out["connect_server_cpu_us"] = med([r["connect"].get("server_cpu_us_per_connect") for r in rs])
        out["handshake_p50_ms"] = med([r["connect"]["handshake_us"]["p50"] / 1000 for r in rs])
        out["handshake_p99_ms"] = med([r["connect"]["handshake_us"]["p99"] / 1000 for r in rs])
        out["rss_per_conn"] = med([r["server"]["rss_per_connection_bytes"] for r in rs])
        out["rss_after_mib"] = med([r["server"]["rss_after_bytes"] / 2**20 for r in rs])
        out["server_cpu"] = med([r["server"]["cpu_seconds_per_second"] for r in rs])
        out["loadgen_cpu"] = med([r["loadgen"]["cpu_seconds_per_second"] for r in rs])
        m = [r["messages"] for r in rs if r.get("messages")]
        if m:
            out["published_per_s"] = med([x["publish_rate_per_second"] for x in m])
            out["deliveries_per_s"] = med([x["deliveries_per_second"] for x in m])
            out["loadgen_cpu_us_per_delivery"] = med([x.get("loadgen_cpu_us_per_delivery") for x in m])
            out["server_cpu_us_per_delivery"] = med([x.get("server_cpu_us_per_delivery") for x in m])
            out["lost_dup_ooo"] = [(x["lost"], x["duplicated"], x["out_of_order"]) for x in m]
            for q in ["p50", "p90", "p99", "p999", "max"]:
                out[f"lat_{q}_ms"] = med([x["latency_us"][q] / 1000 for x in m])
        print(key, json.dumps(out, default=str))


if __name__ == "__main__":
    main(sys.argv[1:])
