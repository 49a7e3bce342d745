#!/usr/bin/env python3
"""Checks the Grafana dashboard against a live node.

- the JSON parses, panel ids are unique, every query uses the ${datasource} variable;
- every fanfare_* metric a query uses exists in the node's /metrics text
  (histograms queried as _bucket series);
- every query is valid PromQL: written as recording rules (dashboard variables
  replaced by sample values) to RULES_OUT for `promtool check rules`.

Usage: check_dashboard.py DASHBOARD.json METRICS.txt RULES_OUT.yml
"""
import json
import re
import sys

import yaml


def walk_panels(panels):
    for p in panels:
        yield p
        yield from walk_panels(p.get("panels") or [])


def main():
    dash_path, metrics_path, rules_out = sys.argv[1:4]
    with open(dash_path) as f:
        dash = json.load(f)
    with open(metrics_path) as f:
        live = {line.split("{")[0].split(" ")[0] for line in f if line.startswith("fanfare_")}
    errors = []
    ids = set()
    exprs = []
    for p in walk_panels(dash.get("panels") or []):
        if p.get("id") in ids:
            errors.append(f"panel id {p.get('id')} is used twice")
        ids.add(p.get("id"))
        for t in p.get("targets") or []:
            if (t.get("datasource") or {}).get("uid") != "${datasource}":
                errors.append(f"panel {p.get('title')!r}: query not on the ${{datasource}} variable")
            exprs.append((p.get("title"), t["expr"]))
    for v in dash.get("templating", {}).get("list", []):
        q = v.get("query")
        if isinstance(q, dict):
            q = q.get("query", "")
        if v.get("type") == "query":
            m = re.fullmatch(r"label_values\((.*),\s*\w+\)", q or "")
            if not m:
                errors.append(f"variable {v['name']}: unexpected query {q!r}")
            else:
                exprs.append((f"variable {v['name']}", m.group(1)))
    used = set()
    for title, e in exprs:
        for name in re.findall(r"\bfanfare_[a-z0-9_]+\b", e):
            used.add(name)
            if name not in live:
                errors.append(f"{title!r}: metric {name} is not exported by the live node")
    rules = []
    for i, (title, e) in enumerate(exprs):
        e = (e.replace("$__rate_interval", "1m").replace("$job", ".+").replace("$instance", ".+"))
        rules.append({"record": f"dashboard:query_{i}", "expr": e})
    with open(rules_out, "w") as f:
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, f, sort_keys=False)
    if errors:
        print("\n".join(f"dashboard: {e}" for e in errors), file=sys.stderr)
        sys.exit(1)
    print(f"dashboard: {len(exprs)} queries over {len(used)} metrics, all exported by a live node: "
          + ", ".join(sorted(used)))


if __name__ == "__main__":
    main()
