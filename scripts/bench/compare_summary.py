#!/usr/bin/env python3
"""Summary of scripts/bench/compare-centrifugo.sh: medians per server and the
fanfare/Centrifugo ratio of every figure, as Markdown tables (one per broker).

usage: compare_summary.py OUT_DIR [--write-docs docs/BENCHMARKS.md]
       compare_summary.py --one REPORT.json     # one line about one run

Reads OUT_DIR/meta.json and OUT_DIR/runs/<broker>-<scenario>-<server>-<run>.json
(fanfare-loadtest --json reports). With --write-docs the section
"## Side by side with Centrifugo" of the given file is replaced (or appended).
"""
import glob
import json
import os
import re
import statistics
import sys

SECTION = "## Side by side with Centrifugo"
SERVERS = ["fanfare", "centrifugo", "floor"]


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def get(r, *path):
    for k in path:
        if not isinstance(r, dict) or r.get(k) is None:
            return None
        r = r[k]
    return r


def ratio(a, b):
    return a / b if a is not None and b else None


# (label, scenario, extractor, format, which way is better)
FIGURES = [
    ("RSS per connection (idle, 1 sub)", "idle",
     lambda r: get(r, "server", "rss_per_connection_bytes"), "bytes", "lower"),
    ("server RSS with all idle clients", "idle",
     lambda r: (get(r, "server", "rss_after_bytes") or 0) / 2**20 or None, "mib", "lower"),
    ("idle server CPU (pings)", "idle",
     lambda r: get(r, "server", "cpu_seconds_per_second"), "cpu", "lower"),
    ("connect rate (--ramp 0)", "idle",
     lambda r: get(r, "connect", "rate_per_second"), "rate", "higher"),
    ("server CPU per connect (TCP+WS+connect+subscribe)", "idle",
     lambda r: scale(ratio(get(r, "connect", "server_cpu_seconds_per_second"),
                           get(r, "connect", "rate_per_second")), 1e6), "us", "lower"),
    ("server CPU in the kernel (connect)", "idle",
     lambda r: get(r, "connect", "server_kernel_share"), "share", "-"),
    ("handshake p50", "idle", lambda r: us_ms(get(r, "connect", "handshake_us", "p50")), "ms", "lower"),
    ("handshake p99", "idle", lambda r: us_ms(get(r, "connect", "handshake_us", "p99")), "ms", "lower"),
    ("fanout deliveries/s", "fanout",
     lambda r: get(r, "messages", "deliveries_per_second"), "rate", "higher"),
    ("fanout server CPU", "fanout",
     lambda r: get(r, "server", "cpu_seconds_per_second"), "cpu", "lower"),
    ("deliveries per server CPU-second", "fanout",
     lambda r: ratio(get(r, "messages", "deliveries_per_second"),
                     get(r, "server", "cpu_seconds_per_second")), "rate", "higher"),
    ("server CPU in the kernel (fanout)", "fanout",
     lambda r: get(r, "messages", "server_kernel_share"), "share", "-"),
    ("fanout latency p50", "fanout",
     lambda r: us_ms(get(r, "messages", "latency_us", "p50")), "ms", "lower"),
    ("fanout latency p99", "fanout",
     lambda r: us_ms(get(r, "messages", "latency_us", "p99")), "ms", "lower"),
    ("fanout latency max", "fanout",
     lambda r: us_ms(get(r, "messages", "latency_us", "max")), "ms", "lower"),
    ("load generator CPU (fanout)", "fanout",
     lambda r: get(r, "loadgen", "cpu_seconds_per_second"), "cpu", "-"),
]


def scale(v, k):
    return v * k if v is not None else None


def us_ms(v):
    return v / 1000 if v is not None else None


def fmt(v, kind):
    if v is None:
        return "–"
    if kind == "bytes":
        return f"{v:,.0f} B".replace(",", " ")
    if kind == "mib":
        return f"{v:.1f} MiB"
    if kind == "cpu":
        return f"{v:.3f} s/s"
    if kind == "rate":
        return f"{v:,.0f}/s".replace(",", " ")
    if kind == "share":
        return f"{100 * v:.0f} %"
    if kind == "us":
        return f"{v:.0f} µs"
    if kind == "ms":
        return f"{v:.1f} ms" if v < 100 else f"{v:.0f} ms"
    return str(v)


def cell(vals, kind):
    vals = [v for v in vals if v is not None]
    if not vals:
        return None, "–"
    m = statistics.median(vals)
    if len(vals) == 1:
        return m, fmt(m, kind)
    return m, f"{fmt(m, kind)} ({fmt(min(vals), kind)} – {fmt(max(vals), kind)})"


def reports(out):
    """{(broker, scenario, server): [report, ...]} and the list of problems."""
    groups, notes, noisy = {}, [], []
    for path in sorted(glob.glob(os.path.join(out, "runs", "*.json"))):
        name = os.path.basename(path)[:-5]
        m = re.fullmatch(r"(memory|redis)-(idle|fanout)-(fanfare|centrifugo|floor)-(\d+)", name)
        if not m:
            continue
        r = load(path)
        if r is None:
            notes.append(f"{name}: no report (see {name}.txt)")
            continue
        broker, scenario, server, _ = m.groups()
        groups.setdefault((broker, scenario, server), []).append(r)
        if not r.get("ok"):
            notes.append(f"{name}: " + "; ".join(r.get("problems") or ["not ok"]))
        other = [get(r, ph, "other_cpu_seconds_per_second") for ph in ("machine_connect", "machine")]
        if any(o is not None and o > 0.1 for o in other):
            noisy.append(f"{name} ({' / '.join('?' if o is None else f'{o:.2f}' for o in other)})")
    if noisy:
        notes.append("other processes used more than 0.1 CPU s/s (connect / main phase) in "
                     + ", ".join(noisy) + ": CPU-bound figures of these runs are unreliable")
    return groups, notes


def tables(out):
    groups, notes = reports(out)
    lines = []
    for broker in ["memory", "redis"]:
        if not any(k[0] == broker for k in groups):
            continue
        runs = {s: max(len(groups.get((broker, sc, s), [])) for sc in ("idle", "fanout"))
                for s in SERVERS}
        lines.append(f"### {'In-memory broker' if broker == 'memory' else 'Redis broker'}")
        lines.append("")
        floor = runs["floor"] > 0
        lines.append(f"Median of {runs['fanfare']} fanfare and {runs['centrifugo']} Centrifugo "
                     + (f"and {runs['floor']} floor-server " if floor else "")
                     + "runs (min – max in brackets).")
        lines.append("")
        if floor:
            lines.append("| figure | fanfare | Centrifugo | floor | fanfare / Centrifugo "
                         "| floor / Centrifugo | better |")
            lines.append("|---|---:|---:|---:|---:|---:|---|")
        else:
            lines.append("| figure | fanfare | Centrifugo | fanfare / Centrifugo | better |")
            lines.append("|---|---:|---:|---:|---|")
        for label, scenario, f, kind, better in FIGURES:
            meds, cells = {}, {}
            for s in SERVERS:
                rs = groups.get((broker, scenario, s), [])
                meds[s], cells[s] = cell([f(r) for r in rs], kind)
            if meds["fanfare"] is None and meds["centrifugo"] is None:
                continue
            q = ratio(meds["fanfare"], meds["centrifugo"])
            q = "–" if q is None or kind == "share" else f"{q:.2f}"
            if floor:
                fq = ratio(meds["floor"], meds["centrifugo"])
                fq = "–" if fq is None or kind == "share" else f"{fq:.2f}"
                lines.append(f"| {label} | {cells['fanfare']} | {cells['centrifugo']} | "
                             f"{cells['floor']} | {q} | {fq} | {better} |")
            else:
                lines.append(f"| {label} | {cells['fanfare']} | {cells['centrifugo']} | "
                             f"{q} | {better} |")
        loads = []
        for s in SERVERS:
            for scenario in ("idle", "fanout"):
                for path in sorted(glob.glob(os.path.join(
                        out, "runs", f"{broker}-{scenario}-{s}-*.uptime"))):
                    m = re.search(r"load average: ([\d.]+), ([\d.]+), ([\d.]+)", open(path).read())
                    if m:
                        loads.append(f"{os.path.basename(path)[:-7]} {' / '.join(m.groups())}")
        if loads:
            lines.append("")
            lines.append("`uptime` load averages (1 / 5 / 15 min) before each run: "
                         + ", ".join(loads) + ".")
        lost = []
        for s in SERVERS:
            for r in groups.get((broker, "fanout", s), []):
                m = r.get("messages") or {}
                lost.append((s, m.get("lost"), m.get("duplicated"), m.get("out_of_order"),
                             r.get("connections", {}).get("unexpected_disconnects")))
        if lost:
            lines.append("")
            lines.append("Fanout lost / duplicated / reordered, unexpected disconnects: " + ", ".join(
                f"{s} {a}/{b}/{c}, {d}" for s, a, b, c, d in lost) + ".")
        lines.append("")
    if notes:
        lines.append("Runs with problems or warnings:")
        lines.append("")
        lines += [f"- {n}" for n in notes]
        lines.append("")
    return "\n".join(lines)


def machine():
    model = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 2**20:.0f} GiB"
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({model}), {mem} RAM, Linux {os.uname().release}"


def section(out):
    meta = load(os.path.join(out, "meta.json")) or {}
    env = meta.get("env", {})
    auth = ("HS256 connection JWT per client (`--hmac-secret`)" if env.get("AUTH") == "jwt"
            else "anonymous")
    publish = ("client-side `publish` commands" if env.get("PUBLISH_MODE") == "client"
               else "`POST /api/publish` with `X-API-Key`")
    protocol = ("the Protobuf client protocol (subprotocol `centrifuge-protobuf`, binary "
                "frames; `--protocol protobuf`)" if env.get("PROTOCOL") == "protobuf"
                else "the JSON client protocol")
    wd = env.get("FANFARE_WRITE_DELAY", "0s")
    write_delay_note = ("" if wd in ("", "0s", "0") else
                        f"\n**fanfare ran with `client.write_delay = \"{wd}\"`**, which Centrifugo"
                        " OSS has no equivalent for: not an equivalent setting.")
    floor_note = ("" if env.get("FLOOR") != "1" else
                  "\n**floor** is `fanfare-loadtest floor-server` (`FLOOR=1`, memory broker only): "
                  "it accepts, answers the upgrade and every command with a fixed reply, and "
                  "writes each read's publications once per subscriber of their channel, "
                  "nothing else (no sessions, queues, pings or limits): what this machine "
                  "allows at most with this generator, not a usable server.")
    text = f"""{SECTION}

- Date: {meta.get('date', '?')}
- fanfare commit: `{meta.get('fanfare_commit', '?')}`; Centrifugo {meta.get('centrifugo_version', '?')}
  (`{meta.get('centrifugo_version_line', '?')}`, built with `go install`)
- Machine: {machine()}; servers and load generator share it (loopback).
- Command: `{meta.get('command', '?').strip()}`
  (sizes: {', '.join(f'{k}={v}' for k, v in env.items())})

Both servers run alternately (fanfare, Centrifugo, fanfare, …), each run
against a freshly started server, clients speaking {protocol},
with equivalent settings: {auth}; subscribe
and client-side publish allowed in the default namespace (fanfare
`[[namespaces]] name = "" allow_publish = true`, Centrifugo
`channel.without_namespace.allow_subscribe_for_client` +
`allow_publish_for_client`); with JWT every connection also joins its personal
channel `#<user>` on both (fanfare always does; Centrifugo
`client.subscribe_to_user_personal_channel.enabled`); history off; 25 s pings,
8 s pong timeout; log level warn; HTTP API key set; memory broker, then Redis
(fanfare `broker.kind = "redis"`, Centrifugo `engine.type = "redis"`, one
`redis-server --save ''` started by the script). Idle: `fanfare-loadtest idle
-n IDLE_N --subs 1 --ramp 0 --hold IDLE_HOLD` (RSS per connection, idle CPU,
connect rate). Fanout: `fanfare-loadtest fanout -n FANOUT_N --channels
FANOUT_CHANNELS --rate FANOUT_RATE --publishers FANOUT_PUBLISHERS` ({publish}, {env.get('PAYLOAD', '?')}-byte payloads). Same
flags for both servers; {env.get('WORKERS', '?')} load-generator worker processes.
Server CPU is the server process only (not Redis).{write_delay_note}{floor_note}

{tables(out)}"""
    return text.rstrip() + "\n"


def write_docs(path, text):
    doc = open(path).read() if os.path.exists(path) else "# fanfare benchmarks\n"
    m = re.search(r"^" + re.escape(SECTION) + r"[ \t]*$", doc, re.M)
    if not m:
        doc = doc.rstrip("\n") + "\n\n" + text
    else:
        nxt = re.search(r"^## ", doc[m.end():], re.M)
        end = m.end() + nxt.start() if nxt else len(doc)
        doc = doc[:m.start()] + text + ("\n" + doc[end:] if nxt else "")
    with open(path, "w") as f:
        f.write(doc)


def one(path):
    r = load(path)
    name = os.path.basename(path)
    if r is None:
        print(f"   {name}: no report")
        return
    parts = []
    if r.get("scenario") == "idle":
        parts.append(f"connect {fmt(get(r, 'connect', 'rate_per_second'), 'rate')}")
        parts.append(f"RSS/conn {fmt(get(r, 'server', 'rss_per_connection_bytes'), 'bytes')}")
        parts.append(f"idle CPU {fmt(get(r, 'server', 'cpu_seconds_per_second'), 'cpu')}")
    else:
        m = r.get("messages") or {}
        parts.append(f"deliveries {fmt(m.get('deliveries_per_second'), 'rate')}")
        parts.append(f"p50/p99 {fmt(us_ms(get(m, 'latency_us', 'p50')), 'ms')}"
                     f" / {fmt(us_ms(get(m, 'latency_us', 'p99')), 'ms')}")
        parts.append(f"server CPU {fmt(get(r, 'server', 'cpu_seconds_per_second'), 'cpu')}")
        parts.append(f"lost/dup/ooo {m.get('lost')}/{m.get('duplicated')}/{m.get('out_of_order')}")
    parts.append("ok" if r.get("ok") else "PROBLEMS: " + "; ".join(r.get("problems") or []))
    print(f"   {name}: " + ", ".join(parts))


def main(argv):
    if len(argv) == 2 and argv[0] == "--one":
        one(argv[1])
        return
    if not argv or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    out = argv[0]
    text = section(out)
    print(text)
    if len(argv) == 3 and argv[1] == "--write-docs":
        write_docs(argv[2], text)
        print(f"wrote the section to {argv[2]}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
