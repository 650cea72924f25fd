#!/usr/bin/env python3
"""COPY benchmark, interleaved in one run on a scratch cluster: a 1,000,000-row
`COPY people TO STDOUT` (text, CSV and binary) of a table whose card number is masked with
`tokenize`, e-mail with `hash`, phone with `partial` and national ID with `redact`, fetched
with psql (a simple-query COPY) and written to /dev/null:

- directly, unmasked (the baseline of every ratio);
- through pgveil as a masked role (rows masked in flight);
- through pgveil as an exempt role (rows relayed as they are);
- through PgBouncer (session mode), unmasked.

pgveil runs with its audit log on. Prints each case's median wall time and its ratio to
the direct COPY, and pgveil's CPU time per COPY.

    scripts/bench_copy.py [--reps 5] [--rows 1000000]
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (shared helpers: cluster, pgveil, PgBouncer)

RULES = """
[settings]
protected = []
[[mask]]
column = "people.card_number"
function = "tokenize"
key_env = "PGVEIL_BENCH_KEY"
unmasked_for = ["bench_exempt"]

[[mask]]
column = "people.email"
function = "hash"
key_env = "PGVEIL_BENCH_KEY"
unmasked_for = ["bench_exempt"]

[[mask]]
column = "people.phone"
function = "partial"
keep_first = 3
keep_last = 4
unmasked_for = ["bench_exempt"]

[[mask]]
column = "people.national_id"
function = "redact"
unmasked_for = ["bench_exempt"]
"""

SETUP = """
CREATE ROLE bench_exempt NOLOGIN;
CREATE ROLE exempt_user LOGIN PASSWORD 'pw' IN ROLE bench_exempt;
CREATE ROLE masked_user LOGIN PASSWORD 'pw';
CREATE TABLE people AS SELECT g::bigint AS id, 'Person ' || g AS name,
  '139' || lpad((g * 7919 % 100000000)::text, 8, '0') AS phone,
  'user' || g || '@example.com' AS email, 'ID' || lpad(g::text, 9, '0') AS national_id,
  '4111' || lpad((g * 104729 % 1000000000000)::text, 12, '0') AS card_number,
  round((g % 100000) / 3.0, 2)::numeric(12,2) AS balance
  FROM generate_series(1::bigint, {rows}) g;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO PUBLIC;
"""

FORMATS = {
    "text": "COPY people TO STDOUT",
    "csv": "COPY people TO STDOUT (FORMAT csv)",
    "binary": "COPY people TO STDOUT (FORMAT binary)",
}


def copy(port, user, password, sql):
    env = dict(bench.env(), PGPASSWORD=password)
    start = time.perf_counter()
    subprocess.run(["psql", "-X", "-q", "-h", "127.0.0.1", "-p", str(port), "-U", user, "-d", "bench",
                    "-c", sql, "-o", "/dev/null"], check=True, env=env)
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--pgveil-args", default="")
    a = ap.parse_args()
    os.environ["PGVEIL_BENCH_KEY"] = "a bench key of at least thirty-two bytes"
    work = bench.prepare("pgveil-bench-copy.")
    veil = None
    try:
        print(f"loading {a.rows:,} people ...", flush=True)
        pg_port = bench.start_bench_cluster(work, scale=1)
        bench.run(["psql", "-X", "-q", "-h", "127.0.0.1", "-p", str(pg_port), "-U", "postgres", "-d", "bench",
                   "-v", "ON_ERROR_STOP=1", "-c", SETUP.format(rows=a.rows)], env=bench.env())
        bench.psql(pg_port, "bench", "VACUUM ANALYZE")
        rules = os.path.join(work, "rules")
        os.makedirs(rules)
        with open(os.path.join(rules, "bench.toml"), "w") as f:
            f.write(RULES)
        veil, veil_port = bench.start_pgveil(work, pg_port, rules, a.pgveil_args)
        bouncer_port, _, _ = bench.start_pgbouncer(work, pg_port)
        sample = subprocess.run(["psql", "-X", "-A", "-t", "-h", "127.0.0.1", "-p", str(veil_port), "-U",
                                 "masked_user", "-d", "bench", "-c",
                                 "COPY (SELECT card_number, email, phone FROM people WHERE id = 1) TO STDOUT"],
                                check=True, capture_output=True, text=True, env=dict(bench.env(), PGPASSWORD="pw"))
        print("masked_user's COPY gives:", sample.stdout.strip(), flush=True)

        cases = [("direct, unmasked", pg_port, "postgres", bench.PASSWORD),
                 ("pgveil, masked role", veil_port, "masked_user", "pw"),
                 ("pgveil, exempt role", veil_port, "exempt_user", "pw"),
                 ("PgBouncer, unmasked", bouncer_port, "postgres", bench.PASSWORD)]
        times = {}
        cpu = {}
        for _ in range(a.reps):
            for fmt, sql in FORMATS.items():
                for name, port, user, pw in cases:
                    before = bench.cpu_ticks(veil.pid)
                    times.setdefault((fmt, name), []).append(copy(port, user, pw, sql))
                    cpu.setdefault((fmt, name), []).append((bench.cpu_ticks(veil.pid) - before) / bench.TICK)
        print(f"\n{a.rows:,}-row COPY people TO STDOUT (4 masked columns: tokenize, hash, partial, redact), "
              f"{a.reps} interleaved reps, median")
        for fmt in FORMATS:
            base = statistics.median(times[(fmt, "direct, unmasked")])
            print(f"\n{fmt}")
            for name, *_ in cases:
                m = statistics.median(times[(fmt, name)])
                c = statistics.median(cpu[(fmt, name)])
                veil_cpu = f"  pgveil CPU {c:6.2f} s" if name.startswith("pgveil") else ""
                print(f"  {name:22} {m:7.3f} s  ratio {m / base:5.2f}{veil_cpu}")
    finally:
        bench.stop_all(work, [veil] if veil else [])


if __name__ == "__main__":
    main()
