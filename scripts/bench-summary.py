#!/usr/bin/env python3
"""Medians (and the runs) of the headline figures of scripts/bench-unicast.sh's reports, per target and
reactor count, plus each run's unicast ratio against the bare loop of the same round."""
import glob, json, os, re, statistics, sys

FIELDS = ["unicast_publishes_per_sec", "unicast_publish_p99_us", "unicast_delivery_p99_us",
          "handshakes_per_sec", "broadcast_deliveries_per_sec", "server_rss_bytes_per_conn"]
out = sys.argv[1]
runs = {}
for path in sorted(glob.glob(os.path.join(out, "*.json"))):
    m = re.match(r"(.+)-r(\d+)-run(\d+)\.json", os.path.basename(path))
    if not m:
        continue
    with open(path) as f:
        report = json.load(f)
    h = report.get("headline") or {}
    runs.setdefault((m[1], int(m[2])), {})[int(m[3])] = (h, report.get("ok"))
bare = {k: v for (n, r), rs in runs.items() if n.startswith("bare") for k, v in rs.items()}
for (name, r), rs in sorted(runs.items()):
    print(f"{name} reactors={r} runs={sorted(rs)} ok={[rs[k][1] for k in sorted(rs)]}")
    for field in FIELDS:
        vals = [rs[k][0].get(field) for k in sorted(rs)]
        vals = [v for v in vals if v is not None]
        if vals:
            print(f"  {field:32} median {statistics.median(vals):>12,.0f}   runs {', '.join(f'{v:,.0f}' for v in vals)}")
    ratios = []
    for k in sorted(rs):
        b = bare.get(k, ({}, None))[0].get("unicast_publishes_per_sec")
        u = rs[k][0].get("unicast_publishes_per_sec")
        if b and u:
            ratios.append(u / b)
    if ratios:
        print(f"  {'unicast / bare (same round)':32} median {statistics.median(ratios):>12.2f}   runs {', '.join(f'{x:.2f}' for x in ratios)}")
