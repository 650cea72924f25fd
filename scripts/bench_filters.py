#!/usr/bin/env python3
"""Row filter benchmark, interleaved in one run on a scratch cluster: pgbench -S -M prepared
(8 clients) through pgveil as a role with a [[filter]] on pgbench_accounts, as a role the
filter does not apply to, and (for scale) directly. The filter keeps every row (`bid >= 1`)
so that both roles read the same rows: the difference is what the filter costs, pgveil's
analysis and rewrite plus the condition the server evaluates.

    scripts/bench_filters.py [--duration 10] [--rounds 3] [--clients 8]
"""
import argparse
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (shared helpers: cluster, psql, pgbench)

RULES = """
[settings]
protected = []  # the filter alone (scripts/bench_guard.py measures the guard)

[[filter]]
table = "public.pgbench_accounts"
roles = ["bench_filtered"]
where = "bid >= 1"
"""

SETUP = """
CREATE ROLE bench_filtered NOLOGIN;
CREATE ROLE filtered_user LOGIN PASSWORD 'pw' IN ROLE bench_filtered;
CREATE ROLE plain_user LOGIN PASSWORD 'pw';
GRANT SELECT ON ALL TABLES IN SCHEMA public TO PUBLIC;
"""


def pgbench_as(port, user, password, duration, clients):
    out = subprocess.run(["pgbench", "-n", "-S", "-M", "prepared", "-h", "127.0.0.1", "-p", str(port), "-U", user,
                          "-c", str(clients), "-j", "2", "-T", str(duration), "bench"],
                         check=True, capture_output=True, text=True,
                         env=dict(bench.env(), PGPASSWORD=password)).stdout
    return float(out.split("tps = ")[1].split()[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--pgveil-args", default="")
    a = ap.parse_args()
    work = bench.prepare("pgveil-bench-filters.")
    veil = None
    try:
        print("loading: pgbench -i -s 10 ...", flush=True)
        pg_port, rules = bench.cluster_with(work, SETUP, RULES)
        veil, veil_port = bench.start_pgveil(work, pg_port, rules, a.pgveil_args)
        # Sanity: the filter is applied (pgveil explain shows the statement as it is sent).
        shown = subprocess.run([os.path.join(bench.ROOT, "target/release/pgveil"), "explain", "--rules", rules,
                                "--role", "filtered_user", "--upstream-url",
                                f"postgres://postgres:{bench.PASSWORD}@127.0.0.1:{pg_port}/bench",
                                "SELECT abalance FROM pgbench_accounts WHERE aid = $1"],
                               check=True, capture_output=True, text=True).stdout
        assert "OPERATOR(pg_catalog.>=) 1" in shown, shown
        print("filtered_user's statement:", [l for l in shown.splitlines() if l.startswith("rewritten")], flush=True)
        cases = [("direct", pg_port, "postgres", bench.PASSWORD),
                 ("pgveil, filtered role", veil_port, "filtered_user", "pw"),
                 ("pgveil, unfiltered role", veil_port, "plain_user", "pw")]
        tps = {}
        for _ in range(a.rounds):
            for name, port, user, pw in cases:
                tps.setdefault(name, []).append(pgbench_as(port, user, pw, a.duration, a.clients))
        print(f"\npgbench -S -M prepared, {a.clients} clients, {a.duration}s x {a.rounds} interleaved, median")
        for name, *_ in cases:
            print(f"{name:26} {statistics.median(tps[name]):9.0f} tps")
        ratio = statistics.median(tps["pgveil, filtered role"]) / statistics.median(tps["pgveil, unfiltered role"])
        print(f"{'ratio filtered/unfiltered':26} {ratio:9.2f}")
    finally:
        bench.stop_all(work, [veil] if veil else [])


if __name__ == "__main__":
    main()
