#!/usr/bin/env python3
"""Guard and recycle-bin benchmark, interleaved in one run on a scratch cluster:

1. pgbench's default TPC-B mix (simple and prepared protocol), 8 clients, through a pgveil
   with no rules (`protected = []`) and through a pgveil whose guard protects every kind
   TPC-B uses (insert, update, delete, truncate, drop) with an allow rule for the bench
   role on public.pgbench_*: every statement is analysed and judged. Direct and PgBouncer
   runs in the same rounds give the context.
2. A DELETE of 100,000 rows through pgveil from a table with a [[recycle]] rule (rows
   copied into pgveil_trash by the capture trigger) against the same DELETE from an
   identical table without one; the tables are rebuilt before every repetition.

    scripts/bench_guard.py [--duration 10] [--rounds 3] [--delete-reps 5]
"""
import argparse
import os
import re
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (shared helpers: cluster, psql, pgbench)

ROOT = bench.ROOT
GUARD_RULES = """
[settings]
protected = ["insert", "update", "delete", "truncate", "drop"]

[[allow]]
roles = ["postgres"]
statements = ["insert", "update", "delete", "truncate", "drop"]
tables = ["public.pgbench_*", "public.del_*"]

[[recycle]]
table = "public.del_recycled"

[[recycle]]
table = "public.del_crm_recycled"
"""


def timed_delete(port, table):
    """Server-side time of one DELETE of the whole table, through psql's \\timing."""
    out = subprocess.run(["psql", "-X", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", "bench",
                          "-c", "\\timing on", "-c", f"DELETE FROM {table}"],
                         check=True, capture_output=True, text=True, env=bench.env()).stdout
    assert "DELETE 100000" in out, out
    return float(re.search(r"Time: ([\d.]+) ms", out).group(1)) / 1000


def refill(pg_port, table):
    """The same 100,000 rows in `table` again (directly, the bin emptied, its capture of
    the refill's TRUNCATE switched off), vacuumed and checkpointed."""
    if table.startswith("del_crm"):
        bench.psql(pg_port, "bench",
                   f"ALTER TABLE {table} DISABLE TRIGGER USER; TRUNCATE {table} CASCADE; "
                   f"ALTER TABLE {table} ENABLE TRIGGER USER; "
                   f"INSERT INTO {table} SELECT g, 'Customer ' || g, 'user' || g || '@example.com', "
                   f"'139' || lpad(g::text, 8, '0') FROM generate_series(1, 100000) g; "
                   f"INSERT INTO {table}_deals SELECT g, g, g * 1.5 FROM generate_series(1, 100000) g")
        for t in (table, table + "_deals"):
            bench.psql(pg_port, "bench", f"VACUUM ANALYZE {t}")
        bench.psql(pg_port, "bench", "CHECKPOINT")
        return
    bench.psql(pg_port, "bench",
               "DO $$DECLARE b text; BEGIN FOR b IN SELECT bin FROM pgveil_trash.tables LOOP "
               "EXECUTE format('TRUNCATE pgveil_trash.%I', b); END LOOP; END$$; TRUNCATE pgveil_trash.deletions; "
               f"ALTER TABLE {table} DISABLE TRIGGER ALL; TRUNCATE {table}; ALTER TABLE {table} ENABLE TRIGGER ALL; "
               f"INSERT INTO {table} SELECT g, 'customer ' || g, g * 1.5, now() FROM generate_series(1, 100000) g")
    bench.psql(pg_port, "bench", f"VACUUM ANALYZE {table}")
    bench.psql(pg_port, "bench", "CHECKPOINT")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--delete-reps", type=int, default=5)
    ap.add_argument("--no-pgbouncer", action="store_true")
    ap.add_argument("--delete-only", action="store_true", help="skip the pgbench part")
    a = ap.parse_args()

    work = bench.prepare("pgveil-bench-guard.")
    procs = []
    try:
        pg_port = bench.start_bench_cluster(work)
        for t in ("del_plain", "del_recycled"):
            bench.psql(pg_port, "bench", f"CREATE TABLE {t} (id int PRIMARY KEY, name text, amount numeric, "
                                         "at timestamptz)")
        # CRM-shaped: customers with a deals table that references them ON DELETE CASCADE.
        for t in ("del_crm_plain", "del_crm_recycled"):
            bench.psql(pg_port, "bench",
                       f"CREATE TABLE {t} (id int PRIMARY KEY, full_name text, email text, phone text, "
                       f"created_at timestamptz DEFAULT now()); CREATE TABLE {t}_deals (id int PRIMARY KEY, "
                       f"customer_id int REFERENCES {t} ON DELETE CASCADE, amount numeric); "
                       f"CREATE INDEX ON {t}_deals (customer_id)")

        dirs = {}
        for name, text in (("none", "[settings]\nprotected = []\n"), ("guard", GUARD_RULES)):
            d = os.path.join(work, "rules-" + name)
            os.makedirs(d)
            with open(os.path.join(d, "rules.toml"), "w") as f:
                f.write(text)
            dirs[name] = d
        url = f"postgres://postgres:{bench.PASSWORD}@127.0.0.1:{pg_port}/bench"
        subprocess.run([os.path.join(ROOT, "target/release/pgveil"), "trash", "init", "--rules", dirs["guard"],
                        "--upstream-url", url], check=True)
        plain, plain_port = bench.start_pgveil(work, pg_port, dirs["none"])
        procs.append(plain)
        guarded, guarded_port = bench.start_pgveil(work, pg_port, dirs["guard"])
        procs.append(guarded)
        targets = [("direct", pg_port, None), ("pgveil no rules", plain_port, plain.pid),
                   ("pgveil guards", guarded_port, guarded.pid)]
        if not a.no_pgbouncer:
            bouncer_port, bouncer_pid, _ = bench.start_pgbouncer(work, pg_port)
            targets.append(("pgbouncer", bouncer_port, bouncer_pid))

        workloads = [] if a.delete_only else [("tpc-b simple", ["-M", "simple"]),
                                              ("tpc-b prepared", ["-M", "prepared"])]
        results = {}
        for r in range(a.rounds):
            for wname, args in workloads:
                for tname, port, pid in targets:
                    before = bench.cpu_ticks(pid) if pid else 0
                    tps, _, txns = bench.pgbench(port, args, a.duration, a.clients)
                    cpu = (bench.cpu_ticks(pid) - before) * 1e6 / bench.TICK / txns if pid else None
                    results.setdefault((wname, tname), []).append((tps, cpu))
                    print(f"  round {r + 1} {wname:15} {tname:16} {tps:9.0f} tps", flush=True)

        if workloads:
            print(f"\npgbench TPC-B, {a.clients} clients, {a.duration}s x {a.rounds} interleaved rounds, medians")
            print(f"{'workload':15} {'target':16} {'tps':>9} {'vs direct':>10} {'vs no rules':>12} {'cpu us/txn':>11}")
        for wname, _ in workloads:
            direct = statistics.median(t for t, _ in results[(wname, "direct")])
            none = statistics.median(t for t, _ in results[(wname, "pgveil no rules")])
            for tname, _, pid in targets:
                rows = results[(wname, tname)]
                tps = statistics.median(t for t, _ in rows)
                cpu = f"{statistics.median(c for _, c in rows):.1f}" if pid else "-"
                print(f"{wname:15} {tname:16} {tps:9.0f} {tps / direct:10.2f} {tps / none:12.2f} {cpu:>11}")

        print(f"\nDELETE of 100,000 rows through pgveil (guards), {a.delete_reps} interleaved reps, median seconds")
        times = {t: [] for t in ("del_plain", "del_recycled", "del_crm_plain", "del_crm_recycled")}
        for _ in range(a.delete_reps):
            for t in times:
                refill(pg_port, t)
                times[t].append(timed_delete(guarded_port, t))
        for shape, plain, recycled in (("bare table (4 columns, primary key)", "del_plain", "del_recycled"),
                                       ("customers-like table, a deals table cascading from it",
                                        "del_crm_plain", "del_crm_recycled")):
            plain_s = statistics.median(times[plain])
            recycled_s = statistics.median(times[recycled])
            kept = bench.psql(pg_port, "bench", "SELECT count(*) FROM pgveil_trash.t_{}".format(
                bench.psql(pg_port, "bench", f"SELECT '{recycled}'::regclass::oid")))
            print(f"{shape}:")
            print(f"  without recycle rule {plain_s:8.3f} s")
            print(f"  with recycle rule    {recycled_s:8.3f} s  ratio {recycled_s / plain_s:5.2f}  (rows kept: {kept})")
    finally:
        bench.stop_all(work, procs)


if __name__ == "__main__":
    main()
