#!/usr/bin/env python3
"""Summary of scripts/bench/compare-protocols.sh: per shape, the median of
each figure per protocol (min - max in brackets) and the protobuf/json ratio
of the medians, as Markdown; then every run with its load averages.

usage: compare_protocols.py OUT_DIR
       compare_protocols.py --one REPORT.json     # one line about one run

Reads OUT_DIR/meta.json and OUT_DIR/runs/<shape>-<protocol>-<run>.json
(fanfare-loadtest --json reports) with <same>.uptime beside each.
"""
import glob
import json
import os
import re
import statistics
import sys

# The report readers of the Centrifugo comparison (same directory).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_summary import get, load  # noqa: E402

PROTOCOLS = ["json", "protobuf"]


def per_cpu(r):
    d, c = get(r, "messages", "deliveries_per_second"), get(r, "server", "cpu_seconds_per_second")
    return d / c if d and c else None


def us_per_delivery(r):
    d, c = get(r, "messages", "deliveries_per_second"), get(r, "server", "cpu_seconds_per_second")
    return c / d * 1e6 if d and c else None


def ms(v):
    return v / 1000 if v is not None else None


# (label, extractor, format, which way is better)
FIGURES = [
    ("deliveries/s", lambda r: get(r, "messages", "deliveries_per_second"), "rate", "higher"),
    ("server CPU", lambda r: get(r, "server", "cpu_seconds_per_second"), "cpu", "lower"),
    ("**deliveries per server CPU-second**", per_cpu, "rate", "higher"),
    ("server CPU per delivery", us_per_delivery, "us", "lower"),
    ("server CPU in the kernel", lambda r: get(r, "messages", "server_kernel_share"), "share", "-"),
    ("latency p50", lambda r: ms(get(r, "messages", "latency_us", "p50")), "ms", "lower"),
    ("latency p99", lambda r: ms(get(r, "messages", "latency_us", "p99")), "ms", "lower"),
    ("load generator CPU", lambda r: get(r, "loadgen", "cpu_seconds_per_second"), "cpu", "-"),
    ("other processes' CPU", lambda r: get(r, "machine", "other_cpu_seconds_per_second"), "cpu", "-"),
]


def fmt(v, kind):
    if v is None:
        return "–"
    if kind == "rate":
        return f"{v:,.0f}/s".replace(",", " ")
    if kind == "cpu":
        return f"{v:.3f} s/s"
    if kind == "us":
        return f"{v:.2f} µs"
    if kind == "ms":
        return f"{v:.1f} ms"
    if kind == "share":
        return f"{v * 100:.0f} %"
    return f"{v}"


def loads(path):
    """The three load averages of an `uptime` line, as a string."""
    try:
        text = open(path).read()
    except OSError:
        return "?"
    m = re.search(r"load average: ([\d.]+), ([\d.]+), ([\d.]+)", text)
    return " / ".join(m.groups()) if m else "?"


def exactness(r):
    m = r.get("messages", {})
    return (f"{m.get('lost', '?')}/{m.get('duplicated', '?')}/{m.get('out_of_order', '?')}, "
            f"{get(r, 'connections', 'unexpected_disconnects')}")


def one(path):
    r = load(path)
    name = os.path.basename(path)[:-5]
    if r is None:
        print(f"{name}: no report")
        return
    up = loads(path[:-5] + ".uptime")
    print(f"{name}: {fmt(per_cpu(r), 'rate')} per server CPU-s, "
          f"{fmt(get(r, 'messages', 'deliveries_per_second'), 'rate')}, "
          f"lost/dup/reordered, disconnects {exactness(r)}, load {up}"
          + ("" if r.get("ok") else f"; PROBLEMS: {'; '.join(r.get('problems', []))}"))


def summary(out):
    meta = load(os.path.join(out, "meta.json")) or {}
    runs = {}
    for path in sorted(glob.glob(os.path.join(out, "runs", "*.json"))):
        m = re.match(r"(.+)-(json|protobuf)-(\d+)\.json$", os.path.basename(path))
        r = load(path)
        if m and r:
            runs.setdefault(m.group(1), {}).setdefault(m.group(2), []).append(
                (int(m.group(3)), r, loads(path[:-5] + ".uptime")))
    print(f"- Date: {meta.get('date', '?')}; fanfare commit `{meta.get('fanfare_commit', '?')}`")
    print(f"- Machine: {meta.get('machine', '?')}")
    print(f"- Command: `{meta.get('command', '?')}`")
    for shape, by in runs.items():
        n = min(len(by.get(p, [])) for p in PROTOCOLS)
        print(f"\n#### {shape} (median of {n} + {n} alternating runs, min – max in brackets)\n")
        print("| figure | JSON | Protobuf | Protobuf / JSON |")
        print("|---|---:|---:|---:|")
        for label, f, kind, _better in FIGURES:
            cells, meds = [], []
            for p in PROTOCOLS:
                vals = [v for v in (f(r) for _, r, _ in by.get(p, [])) if v is not None]
                if not vals:
                    cells.append("–")
                    meds.append(None)
                    continue
                med = statistics.median(vals)
                meds.append(med)
                cells.append(f"{fmt(med, kind)} ({fmt(min(vals), kind)} – {fmt(max(vals), kind)})")
            ratio = f"{meds[1] / meds[0]:.2f}" if meds[0] and meds[1] is not None else "–"
            print(f"| {label} | {cells[0]} | {cells[1]} | {ratio} |")
        print("\nRuns in order (deliveries per server CPU-second; lost/duplicated/reordered,"
              " unexpected disconnects; `uptime` load averages 1/5/15 min before the run;"
              " other processes' CPU during the run):\n")
        order = sorted((run, p, r, up) for p in PROTOCOLS for run, r, up in by.get(p, []))
        for run, p, r, up in order:
            other = fmt(get(r, "machine", "other_cpu_seconds_per_second"), "cpu")
            print(f"- {p} {run}: {fmt(per_cpu(r), 'rate')}; {exactness(r)}; load {up}; other {other}"
                  + ("" if r.get("ok") else f"; problems: {'; '.join(r.get('problems', []))}"))
        pairs = []
        for run, r, _ in by.get("json", []):
            other = [x for k, x, _ in by.get("protobuf", []) if k == run]
            if other and per_cpu(r) and per_cpu(other[0]):
                pairs.append(per_cpu(other[0]) / per_cpu(r))
        if pairs:
            print(f"\nProtobuf / JSON per run pair: {', '.join(f'{p:.2f}' for p in pairs)}")


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        one(sys.argv[2])
    elif len(sys.argv) == 2:
        summary(sys.argv[1])
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
