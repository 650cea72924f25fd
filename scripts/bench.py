#!/usr/bin/env python3
"""Relay benchmark: pgbench select-only (-S) and TPC-B, each in simple and prepared mode,
8 clients, interleaved in one run against PostgreSQL directly, pgveil (no rules) and
PgBouncer (session mode); plus a 1,000,000-row SELECT * fetched with psql. Prints TPS,
latency, ratios against direct, and each proxy's CPU time per transaction (user+system
from /proc/PID/stat over the run). With --unix every leg is a Unix-domain socket: pgbench
to each target, and each proxy to the server.

    scripts/bench.py [--duration 10] [--rounds 3] [--clients 8] [--fetch-reps 5] [--unix]
"""
import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PASSWORD = "postgres"
TICK = os.sysconf("SC_CLK_TCK")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def env():
    e = dict(os.environ, PGPASSWORD=PASSWORD, PGCONNECT_TIMEOUT="10")
    e.pop("PGSSLMODE", None)
    return e


def psql(port, db, sql):
    return run(["psql", "-X", "-q", "-A", "-t", "-h", "127.0.0.1", "-p", str(port),
                "-U", "postgres", "-d", db, "-c", sql], env=env()).stdout.strip()


def wait_ready(port, db="bench"):
    for _ in range(100):
        try:
            psql(port, db, "SELECT 1")
            return
        except subprocess.CalledProcessError:
            time.sleep(0.1)
    sys.exit(f"nothing answers on port {port}")


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14 and 15)


def as_postgres(cmd):
    return ["runuser", "-u", "postgres", "--"] + cmd if os.geteuid() == 0 else cmd


def start_pgbouncer(work, pg_port, max_client_conn=200, pool_size=50, unix=False):
    """Starts PgBouncer in front of pg_port; returns (port, pid, host clients use)."""
    port = free_port()
    d = os.path.join(work, "pgbouncer")
    os.makedirs(d)
    with open(os.path.join(d, "userlist.txt"), "w") as f:
        f.write(f'"postgres" "{PASSWORD}"\n')
    cfg = os.path.join(d, "pgbouncer.ini")
    with open(cfg, "w") as f:
        f.write(f"""[databases]
bench = host={os.path.join(work, "pg") if unix else "127.0.0.1"} port={pg_port} dbname=bench
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir = {d if unix else ""}
auth_type = scram-sha-256
auth_file = {d}/userlist.txt
pool_mode = session
max_client_conn = {max_client_conn}
default_pool_size = {pool_size}
logfile = {d}/pgbouncer.log
pidfile = {d}/pgbouncer.pid
""")
    if os.geteuid() == 0:
        shutil.chown(d, "postgres")
        for name in os.listdir(d):
            shutil.chown(os.path.join(d, name), "postgres")
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    # runuser starts it with PAM's default of 1024 open files; it needs about three per client.
    files = max(4096, 3 * max_client_conn + 1024)
    run(as_postgres(["prlimit", f"--nofile={files}:{files}", binary, "-d", cfg]))
    for _ in range(100):
        if os.path.exists(os.path.join(d, "pgbouncer.pid")):
            break
        time.sleep(0.05)
    with open(os.path.join(d, "pgbouncer.pid")) as f:
        pid = int(f.read().strip())
    wait_ready(port)
    return port, pid, d if unix else "127.0.0.1"


def start_pgveil(work, pg_port, rules, extra_args="", binary=None, unix=False):
    """Starts the release pgveil (or `binary`) in front of pg_port; returns (process, port)
    once it answers. With `unix`, it also listens in a socket directory of its own and
    reaches the server through the server's socket (see `veil_host`)."""
    port = free_port()
    upstream = f"127.0.0.1:{pg_port}"
    sockets = []
    if unix:
        os.makedirs(veil_host(work, port))
        upstream = f"unix:{os.path.join(work, 'pg')}/.s.PGSQL.{pg_port}"
        sockets = ["--unix-socket-dir", veil_host(work, port)]
    proc = subprocess.Popen(
        [binary or os.path.join(ROOT, "target/release/pgveil"), "serve", "--listen", f"127.0.0.1:{port}",
         "--upstream", upstream, "--upstream-tls", "disable", "--rules", rules,
         "--audit-log", os.path.join(work, f"audit-{port}.jsonl")] + sockets + extra_args.split(),
        env=dict(os.environ, PGVEIL_LOG="warn"))
    wait_ready(port)
    return proc, port


def veil_host(work, port):
    """The socket directory of the pgveil listening on `port` (started with unix=True)."""
    return os.path.join(work, f"veil-{port}")


def pgbench(port, args, duration, clients, host="127.0.0.1"):
    cmd = ["pgbench", "-n", "-h", host, "-p", str(port), "-U", "postgres",
           "-c", str(clients), "-j", "2", "-T", str(duration)] + args + ["bench"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env())
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stdout}{done.stderr}")
    out = done.stdout
    tps = float(re.search(r"tps = ([\d.]+) \(without initial", out).group(1))
    lat = float(re.search(r"latency average = ([\d.]+) ms", out).group(1))
    txns = int(re.search(r"actually processed: (\d+)", out).group(1))
    return tps, lat, txns


def timed_fetch(port, host="127.0.0.1"):
    start = time.perf_counter()
    subprocess.run(["psql", "-X", "-A", "-t", "-h", host, "-p", str(port), "-U", "postgres",
                    "-d", "bench", "-c", "SELECT * FROM big", "-o", "/dev/null"],
                   check=True, env=env())
    return time.perf_counter() - start


def start_bench_cluster(work, scale=10):
    """A scratch cluster in work/pg with database bench initialized by pgbench; its port."""
    pg_port = int(run([os.path.join(ROOT, "scripts/cluster.sh"), "start", os.path.join(work, "pg"),
                       PASSWORD]).stdout.strip())
    psql(pg_port, "postgres", "CREATE DATABASE bench")
    run(["pgbench", "-i", "-q", "-s", str(scale), "-h", "127.0.0.1", "-p", str(pg_port), "-U", "postgres",
         "bench"], env=env())
    return pg_port


def cluster_with(work, setup, rules_text, scale=10):
    """A scratch cluster (pgbench -i -s scale) with `setup` run in database bench, then
    VACUUM ANALYZE, and a rules directory holding `rules_text`: (pg_port, rules_dir)."""
    pg_port = start_bench_cluster(work, scale)
    run(["psql", "-X", "-q", "-h", "127.0.0.1", "-p", str(pg_port), "-U", "postgres", "-d", "bench",
         "-v", "ON_ERROR_STOP=1", "-c", setup], env=env())
    psql(pg_port, "bench", "VACUUM ANALYZE")
    rules = os.path.join(work, "rules")
    os.makedirs(rules)
    with open(os.path.join(rules, "bench.toml"), "w") as f:
        f.write(rules_text)
    return pg_port, rules


def prepare(prefix):
    """Installs what the benchmarks need, builds the release pgveil, returns a work dir."""
    subprocess.run([os.path.join(ROOT, "scripts/install-deps.sh")], check=True)
    print("building pgveil (release) ...", flush=True)
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    work = tempfile.mkdtemp(prefix=prefix)
    os.chmod(work, 0o755)
    return work


def stop_all(work, procs):
    """Stops the pgveil processes, a PgBouncer started in work, the cluster; removes work."""
    for p in procs:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=40)
        except subprocess.TimeoutExpired:
            p.kill()
    pidfile = os.path.join(work, "pgbouncer", "pgbouncer.pid")
    if os.path.exists(pidfile):
        with open(pidfile) as f:
            try:
                os.kill(int(f.read().strip()), signal.SIGTERM)
            except (ValueError, ProcessLookupError):
                pass
    subprocess.run([os.path.join(ROOT, "scripts/cluster.sh"), "stop", os.path.join(work, "pg")])
    shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10, help="seconds per pgbench run")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--fetch-reps", type=int, default=5)
    ap.add_argument("--no-pgbouncer", action="store_true")
    ap.add_argument("--pgveil-args", default="", help="extra flags for pgveil serve")
    ap.add_argument("--also", action="append", default=[],
                    help="LABEL=PATH: another pgveil binary to measure in the same rounds")
    ap.add_argument("--unix", action="store_true", help="Unix-domain sockets on every leg")
    a = ap.parse_args()

    work = prepare("pgveil-bench.")
    procs = []
    try:
        print(f"pgbench -i -s {a.scale} and a 1,000,000-row table ...", flush=True)
        pg_port = start_bench_cluster(work, a.scale)
        psql(pg_port, "bench", "CREATE TABLE big AS SELECT g AS id, md5(g::text) AS a, g * 2 AS b, "
                               "now() AS ts, 'customer ' || g AS name FROM generate_series(1, 1000000) g")
        psql(pg_port, "bench", "VACUUM ANALYZE big")

        rules = os.path.join(work, "rules")
        os.makedirs(rules)
        with open(os.path.join(rules, "relay.toml"), "w") as f:
            f.write("[settings]\nprotected = []\n")  # the relay alone: no guard
        def host_of(port):
            return veil_host(work, port) if a.unix else "127.0.0.1"

        veil, veil_port = start_pgveil(work, pg_port, rules, a.pgveil_args, unix=a.unix)
        procs.append(veil)
        direct_host = os.path.join(work, "pg") if a.unix else "127.0.0.1"
        targets = [("direct", pg_port, None, direct_host), ("pgveil", veil_port, veil.pid, host_of(veil_port))]
        for other in a.also:
            label, path = other.split("=", 1)
            proc, port = start_pgveil(work, pg_port, rules, a.pgveil_args, binary=path, unix=a.unix)
            procs.append(proc)
            targets.append((label, port, proc.pid, host_of(port)))
        if not a.no_pgbouncer:
            bouncer_port, bouncer_pid, bouncer_host = start_pgbouncer(work, pg_port, unix=a.unix)
            targets.append(("pgbouncer", bouncer_port, bouncer_pid, bouncer_host))

        workloads = [("select-only simple", ["-S", "-M", "simple"]),
                     ("select-only prepared", ["-S", "-M", "prepared"]),
                     ("tpc-b simple", ["-M", "simple"]),
                     ("tpc-b prepared", ["-M", "prepared"])]
        results = {}
        for r in range(a.rounds):
            for wname, args in workloads:
                for tname, port, pid, host in targets:
                    before = cpu_ticks(pid) if pid else 0
                    tps, lat, txns = pgbench(port, args, a.duration, a.clients, host)
                    cpu_us = (cpu_ticks(pid) - before) * 1e6 / TICK / txns if pid else None
                    results.setdefault((wname, tname), []).append((tps, lat, cpu_us))
                    print(f"  round {r + 1} {wname:22} {tname:10} {tps:10.0f} tps", flush=True)

        legs = "Unix-domain sockets" if a.unix else "TCP"
        print(f"\npgbench over {legs}, {a.clients} clients, {a.duration}s x {a.rounds} interleaved rounds, medians")
        print(f"{'workload':22} {'target':10} {'tps':>10} {'lat ms':>8} {'ratio':>7} {'cpu us/txn':>11}")
        for wname, _ in workloads:
            direct = statistics.median(t for t, _, _ in results[(wname, "direct")])
            for tname, _, pid, _ in targets:
                rows = results[(wname, tname)]
                tps = statistics.median(t for t, _, _ in rows)
                lat = statistics.median(l for _, l, _ in rows)
                cpu = f"{statistics.median(c for _, _, c in rows):.1f}" if pid else "-"
                print(f"{wname:22} {tname:10} {tps:10.0f} {lat:8.3f} {tps / direct:7.2f} {cpu:>11}")

        print(f"\n1,000,000-row SELECT * with psql, {a.fetch_reps} interleaved reps, median seconds")
        fetch = {}
        for _ in range(a.fetch_reps):
            for tname, port, _, host in targets:
                fetch.setdefault(tname, []).append(timed_fetch(port, host))
        base = statistics.median(fetch["direct"])
        for tname, _, _, _ in targets:
            m = statistics.median(fetch[tname])
            print(f"{tname:10} {m:8.3f} s  ratio {m / base:5.2f}")
    finally:
        stop_all(work, procs)


if __name__ == "__main__":
    main()
