#!/usr/bin/env python3
"""Audit log benchmark, interleaved in one run on a scratch cluster.

pgbench -S (select-only) with the prepared protocol, 8 clients, through three pgveils with
empty rules that differ only in the audit log: off (--no-audit), on with
--audit-flush interval (the default: each record written before its result is released,
synced every second), and on with --audit-flush always (fdatasync before a result is
released). Direct and PgBouncer runs in the same rounds give the context. Also reported:
pgveil CPU per transaction, audit bytes per statement, and that each log verifies.

    scripts/bench_audit.py [--duration 10] [--rounds 3] [--clients 8] [--mode prepared]
"""
import argparse
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (shared helpers: cluster, psql, pgbench)

ROOT = bench.ROOT


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--mode", default="prepared", choices=["prepared", "simple", "extended"])
    ap.add_argument("--no-pgbouncer", action="store_true")
    a = ap.parse_args()

    work = bench.prepare("pgveil-bench-audit.")
    procs = []
    try:
        pg_port = bench.start_bench_cluster(work)
        rules = os.path.join(work, "rules")
        os.makedirs(rules)
        with open(os.path.join(rules, "rules.toml"), "w") as f:
            f.write("[settings]\nprotected = []\n")
        logs = {}
        targets = [("direct", pg_port, None)]
        for name, args in (("audit off", "--no-audit"),
                           ("audit interval", "--audit-flush interval"),
                           ("audit always", "--audit-flush always")):
            d = os.path.join(work, name.replace(" ", "-"))
            os.makedirs(d)
            logs[name] = os.path.join(d, "audit.jsonl")
            proc, port = bench.start_pgveil(d, pg_port, rules, args)
            procs.append(proc)
            targets.append((name, port, proc.pid))
        if not a.no_pgbouncer:
            bouncer_port, bouncer_pid, _ = bench.start_pgbouncer(work, pg_port)
            targets.append(("pgbouncer", bouncer_port, bouncer_pid))

        results = {}
        for r in range(a.rounds):
            for tname, port, pid in targets:
                before = bench.cpu_ticks(pid) if pid else 0
                tps, _, txns = bench.pgbench(port, ["-S", "-M", a.mode], a.duration, a.clients)
                cpu = (bench.cpu_ticks(pid) - before) * 1e6 / bench.TICK / txns if pid else None
                results.setdefault(tname, []).append((tps, cpu))
                print(f"  round {r + 1} {tname:15} {tps:9.0f} tps", flush=True)

        print(f"\npgbench -S -M {a.mode}, {a.clients} clients, {a.duration}s x {a.rounds} interleaved rounds, medians")
        print(f"{'target':15} {'tps':>9} {'vs direct':>10} {'vs audit off':>13} {'cpu us/txn':>11}")
        direct = statistics.median(t for t, _ in results["direct"])
        off = statistics.median(t for t, _ in results["audit off"])
        for tname, _, pid in targets:
            rows = results[tname]
            tps = statistics.median(t for t, _ in rows)
            cpu = f"{statistics.median(c for _, c in rows):.1f}" if pid else "-"
            print(f"{tname:15} {tps:9.0f} {tps / direct:10.2f} {tps / off:13.2f} {cpu:>11}")
        for name in ("audit interval", "audit always"):
            path = logs[name]
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                lines = sum(1 for _ in f)
            check = subprocess.run([os.path.join(ROOT, "target/release/pgveil"), "audit", "verify", path],
                                   capture_output=True, text=True)
            print(f"{name}: {lines} records, {size / max(lines, 1):.0f} bytes each; verify: "
                  f"{check.stdout.strip().splitlines()[-1] if check.stdout.strip() else check.stderr.strip()}")
    finally:
        bench.stop_all(work, procs)


if __name__ == "__main__":
    main()
