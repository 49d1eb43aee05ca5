#!/usr/bin/env python3
"""Turns bench/out/results.tsv (written by bench/run.sh) into the Markdown summary.

Usage: table.py RESULTS.tsv NOTES.txt IDLE_RSS_OURS_KB IDLE_RSS_PEER_KB [PDP_INPROC_OUTPUT]
Machine and run details come from BENCH_META_* environment variables set by run.sh.
"""

import os
import sys

ORDER = [
    "health",
    "token-es256",
    "token-rs256",
    "authn-get",
    "apikey-get",
    "introspect",
    "pdp-http",
    "pdp-inproc",
    "login",
]
COLUMNS = [
    "side", "name", "requests", "rps", "p50", "p99", "status_errors", "socket_errors",
    "peak_kb", "conns", "duration", "max_ms", "load", "busy",
]


def mib(kb):
    return f"{int(kb) / 1024:.1f}"


def main():
    results_path, notes_path, idle_ours, idle_peer = sys.argv[1:5]
    inproc_path = sys.argv[5] if len(sys.argv) > 5 else None
    inproc = None
    if inproc_path and os.path.exists(inproc_path):
        with open(inproc_path) as f:
            inproc = f.read().strip() or None
    rows = {}
    with open(results_path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            r = dict(zip(COLUMNS, line.split("\t")))
            rows[(r["side"], r["name"])] = r
    with open(notes_path) as f:
        notes = [n.strip() for n in f if n.strip()]

    def cells(side, name):
        r = rows.get((side, name))
        if r is None:
            return ["—"] * 5
        errors = int(r["status_errors"]) + int(r["socket_errors"])
        return [f"{float(r['rps']):,.0f}", r["p50"], r["p99"], str(errors), mib(r["peak_kb"])]

    env = os.environ.get
    out = []
    out.append("## make bench: agentidp vs oidc-provider\n")
    out.append(f"- date: {env('BENCH_META_DATE', '?')}")
    out.append(f"- machine: {env('BENCH_META_NPROC', '?')} × {env('BENCH_META_CPU', '?')}")
    out.append(f"- agentidp: {env('BENCH_META_REV', '?')}; oidc-provider {env('BENCH_META_OIDC', '?')} "
               f"on node {env('BENCH_META_NODE', '?')}")
    out.append(f"- load: {env('BENCH_META_WRK', '?')}; wrk, the server under test and everything else "
               f"share the same cores")
    peer_idle = f"{mib(idle_peer)} MiB" if int(idle_peer) else "not run"
    out.append(f"- idle RSS after start-up: agentidp {mib(idle_ours)} MiB, oidc-provider {peer_idle}")
    out.append("")
    out.append("| scenario | agentidp req/s | p50 ms | p99 ms | errors | peak RSS MiB "
               "| oidc-provider req/s | p50 ms | p99 ms | errors | peak RSS MiB | ratio |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    names = ORDER + sorted({n for (_, n) in rows} - set(ORDER))
    for name in names:
        ours, theirs = rows.get(("agentidp", name)), rows.get(("peer", name))
        skipped = any(n.startswith(name + " skipped") or n.startswith(name + " failed") for n in notes)
        if name == "pdp-inproc" and inproc and ours is None:
            out.append("| pdp-inproc | see below | | | | | — | — | — | — | — | — |")
            continue
        if ours is None and theirs is None and not skipped:
            continue
        ratio = "—"
        if ours and theirs and float(theirs["rps"]) > 0:
            ratio = f"{float(ours['rps']) / float(theirs['rps']):.2f}×"
        label = name + (" (skipped)" if skipped and ours is None else "")
        out.append("| " + " | ".join([label] + cells("agentidp", name) + cells("peer", name) + [ratio]) + " |")
    out.append("")
    out.append("ratio = agentidp req/s ÷ oidc-provider req/s. errors = responses with status ≥ 400 plus socket "
               "errors and timeouts, as wrk counts them. peak RSS = the server's VmHWM during the measured run.")
    out.append("")
    out.append("Other processes using ≥ 20 % of a core in the middle of each run (besides the server and wrk):")
    out.append("")
    for (side, name), r in sorted(rows.items(), key=lambda kv: (kv[0][0], names.index(kv[0][1]))):
        out.append(f"- {side} {name}: {r['busy']} (1-min load average at start {r['load']}; "
                   f"{r['requests']} requests, -c{r['conns']} -d{r['duration']}, max latency {r['max_ms']} ms)")
    if inproc:
        out.append("")
        out.append("pdp-inproc, the output of `cargo bench --bench pdp`:")
        out.append("")
        out.append("```")
        out.append(inproc)
        out.append("```")
    if notes:
        out.append("")
        out.append("Notes:")
        out.append("")
        for n in notes:
            out.append(f"- {n}")
    print("\n".join(out))


if __name__ == "__main__":
    main()
