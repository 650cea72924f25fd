#!/usr/bin/env python3
"""Masking benchmark, interleaved in one run on a scratch cluster:

1. A 1,000,000-row SELECT * of a table with four masked columns (partial, email, redact,
   round), fetched with psql: as a masked role through pgveil, as an exempt role through
   pgveil, unmasked directly, and through an in-database masking view (what a DBA would
   build instead). Ratios are against the direct unmasked fetch.
2. pgbench -S -M prepared, 8 clients, as a role whose pgbench_accounts.abalance carries a
   `round` mask, against an exempt role, both through pgveil.

With --pending-mask the rules also mask a column of a table that does not exist yet, so
every masked session asks the server, before each batch, whether it exists now (the probe
that makes masks apply the moment a migration creates their table): its cost is the
masked/exempt ratio against a run without it.

    scripts/bench_masking.py [--duration 10] [--rounds 3] [--fetch-reps 5] [--pending-mask]
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (shared helpers: cluster, psql, pgbench)

ROOT = bench.ROOT
RULES = """
[settings]
protected = []  # masking alone (scripts/bench_guard.py measures the guard)
[[mask]]
column = "people.phone"
function = "partial"
keep_first = 3
keep_last = 4
unmasked_for = ["bench_exempt"]

[[mask]]
column = "people.email"
function = "email"
unmasked_for = ["bench_exempt"]

[[mask]]
column = "people.national_id"
function = "redact"
unmasked_for = ["bench_exempt"]

[[mask]]
column = "people.balance"
function = "round"
step = 1000
unmasked_for = ["bench_exempt"]

[[mask]]
column = "pgbench_accounts.abalance"
function = "round"
step = 100
unmasked_for = ["bench_exempt"]
"""

SETUP = """
CREATE ROLE bench_exempt NOLOGIN;
CREATE ROLE exempt_user LOGIN PASSWORD 'pw' IN ROLE bench_exempt;
CREATE ROLE masked_user LOGIN PASSWORD 'pw';
CREATE TABLE people AS SELECT g::bigint AS id, 'Person ' || g AS name,
  '139' || lpad((g * 7919 % 100000000)::text, 8, '0') AS phone,
  'user' || g || '@example.com' AS email, 'ID' || lpad(g::text, 9, '0') AS national_id,
  date '1960-01-01' + (g % 15000)::int AS birth_date, round((g % 100000) / 3.0, 2)::numeric(12,2) AS balance
  FROM generate_series(1::bigint, 1000000) g;
CREATE VIEW people_masked AS SELECT id, name,
  left(phone, 3) || repeat('*', greatest(length(phone) - 7, 0)) || right(phone, 4) AS phone,
  left(email, 1) || '***@' || split_part(email, '@', 2) AS email,
  '****'::text AS national_id, birth_date, round(balance / 1000) * 1000 AS balance FROM people;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO PUBLIC;
"""


def fetch(port, user, password, table):
    env = dict(bench.env(), PGPASSWORD=password)
    start = time.perf_counter()
    subprocess.run(["psql", "-X", "-A", "-t", "-h", "127.0.0.1", "-p", str(port), "-U", user, "-d", "bench",
                    "-c", f"SELECT * FROM {table}", "-o", "/dev/null"], check=True, env=env)
    return time.perf_counter() - start


def pgbench_as(port, user, duration, clients):
    out = subprocess.run(["pgbench", "-n", "-S", "-M", "prepared", "-h", "127.0.0.1", "-p", str(port), "-U", user,
                          "-c", str(clients), "-j", "2", "-T", str(duration), "bench"],
                         check=True, capture_output=True, text=True, env=dict(bench.env(), PGPASSWORD="pw")).stdout
    return float(out.split("tps = ")[1].split()[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fetch-reps", type=int, default=5)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--pgveil-args", default="")
    ap.add_argument("--pending-mask", action="store_true",
                    help="also mask a column of a table that does not exist yet")
    a = ap.parse_args()
    work = bench.prepare("pgveil-bench-masking.")
    veil = None
    try:
        print("loading: pgbench -i -s 10 and 1,000,000 people ...", flush=True)
        rules_text = RULES
        if a.pending_mask:
            rules_text += ('\n[[mask]]\ncolumn = "public.not_created_yet.secret"\nfunction = "redact"\n'
                           'unmasked_for = ["bench_exempt"]\n')
        pg_port, rules = bench.cluster_with(work, SETUP, rules_text)
        veil, veil_port = bench.start_pgveil(work, pg_port, rules, a.pgveil_args)
        # Sanity: the masked role really gets masked values.
        sample = subprocess.run(["psql", "-X", "-A", "-t", "-h", "127.0.0.1", "-p", str(veil_port), "-U", "masked_user",
                                 "-d", "bench", "-c", "SELECT phone, email FROM people WHERE id = 1"],
                                check=True, capture_output=True, text=True, env=dict(bench.env(), PGPASSWORD="pw"))
        print("masked_user sees:", sample.stdout.strip(), flush=True)

        cases = [("direct, unmasked", pg_port, "postgres", bench.PASSWORD, "people"),
                 ("pgveil, masked role", veil_port, "masked_user", "pw", "people"),
                 ("pgveil, exempt role", veil_port, "exempt_user", "pw", "people"),
                 ("direct, masking view", pg_port, "postgres", bench.PASSWORD, "people_masked")]
        times = {}
        for _ in range(a.fetch_reps):
            for name, port, user, pw, table in cases:
                times.setdefault(name, []).append(fetch(port, user, pw, table))
        tps = {}
        for _ in range(a.rounds):
            for user in ("masked_user", "exempt_user"):
                tps.setdefault(user, []).append(pgbench_as(veil_port, user, a.duration, a.clients))

        base = statistics.median(times["direct, unmasked"])
        print(f"\n1,000,000-row SELECT * (4 masked columns), {a.fetch_reps} interleaved reps, median")
        for name, *_ in cases:
            m = statistics.median(times[name])
            print(f"{name:22} {m:7.3f} s  ratio {m / base:5.2f}")
        masked = statistics.median(tps["masked_user"])
        exempt = statistics.median(tps["exempt_user"])
        print(f"\npgbench -S -M prepared through pgveil, {a.clients} clients, {a.duration}s x {a.rounds}, median")
        print(f"masked role (round on abalance) {masked:9.0f} tps")
        print(f"exempt role                     {exempt:9.0f} tps")
        print(f"ratio masked/exempt             {masked / exempt:9.2f}")
    finally:
        bench.stop_all(work, [veil] if veil else [])


if __name__ == "__main__":
    main()
