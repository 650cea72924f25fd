#!/usr/bin/env python3
"""Memory under bursts of sessions: for each target (pgveil, and PgBouncer in session mode,
in the same run), six bursts of 2,000 concurrent sessions that each log in (SCRAM), run a
query and a prepared statement, wait until all 2,000 are open, and close. Reports the
process's resident memory (VmRSS) idle before the first burst, with all sessions of a burst
open (and per session), and idle after each burst (settled for a few seconds), so growth
across bursts shows. Several pgveil binaries can be compared (--pgveil LABEL=PATH).

    scripts/bench_memory.py [--sessions 2000] [--bursts 6] [--pgveil label=path ...]
"""
import argparse
import asyncio
import os
import resource
import subprocess
import sys
import time

if __name__ == "__main__":
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        # The system Python has Debian's python3-asyncpg; a version manager's may not.
        if sys.executable != "/usr/bin/python3" and os.path.exists("/usr/bin/python3"):
            os.execv("/usr/bin/python3", ["/usr/bin/python3"] + sys.argv)
        sys.exit("asyncpg is missing: run scripts/install-deps.sh")
import asyncpg  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def one_session(conn, opened, everyone_in):
    try:
        await conn.fetchval("SELECT count(*) FROM pgbench_branches")
        stmt = await conn.prepare("SELECT abalance FROM pgbench_accounts WHERE aid = $1")
        await stmt.fetchval(7)
        opened()
        await everyone_in.wait()
    finally:
        await conn.close()


async def burst(port, sessions, pid):
    """Opens `sessions` sessions at once; returns the RSS with all of them open."""
    everyone_in = asyncio.Event()
    count = 0

    def opened():
        nonlocal count
        count += 1

    limit = asyncio.Semaphore(200)  # logins in flight at once (SCRAM is CPU-bound)

    async def paced():
        async with limit:
            conn = await asyncpg.connect(host="127.0.0.1", port=port, user="postgres",
                                         password=bench.PASSWORD, database="bench", ssl=False,
                                         timeout=60, statement_cache_size=0)
        await one_session(conn, opened, everyone_in)

    tasks = [asyncio.create_task(paced()) for _ in range(sessions)]
    while count < sessions:
        failed = [t for t in tasks if t.done() and t.exception()]
        if failed:
            everyone_in.set()
            raise failed[0].exception()
        await asyncio.sleep(0.05)
    peak = rss_kib(pid)
    everyone_in.set()
    await asyncio.gather(*tasks)
    return peak


def settled_rss(pid, seconds=3.0):
    time.sleep(seconds)
    return rss_kib(pid)


def measure(name, port, pid, sessions, bursts):
    idle = [settled_rss(pid, 1.0)]
    peaks = []
    for _ in range(bursts):
        peaks.append(asyncio.run(asyncio.wait_for(burst(port, sessions, pid), 600)))
        idle.append(settled_rss(pid))
    # The first burst's sessions against the idle process before it: later bursts reuse
    # memory the first one left (what they add shows in the idle figures).
    per_session = (peaks[0] - idle[0]) / sessions
    mib = lambda k: f"{k / 1024:.0f}"
    print(f"{name:24} idle MiB: {' -> '.join(mib(k) for k in idle)}; with {sessions} open: "
          f"{' '.join(mib(k) for k in peaks)}; {per_session:.1f} KiB per session (first burst)",
          flush=True)
    return idle, peaks, per_session


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=2000)
    ap.add_argument("--bursts", type=int, default=6)
    ap.add_argument("--pgveil", action="append", default=[],
                    help="LABEL=PATH of a pgveil binary (default: the release build)")
    ap.add_argument("--no-pgbouncer", action="store_true")
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 4 * a.sessions + 1024)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    os.environ["PGVEIL_MAX_CONNECTIONS"] = str(a.sessions + 100)

    work = bench.prepare("pgveil-memory.")
    binaries = [tuple(p.split("=", 1)) for p in a.pgveil] or [
        ("pgveil", os.path.join(bench.ROOT, "target/release/pgveil"))]
    procs = []
    try:
        pg_port = bench.start_bench_cluster(work, scale=1)
        rules = os.path.join(work, "rules")
        os.makedirs(rules)
        with open(os.path.join(rules, "crm.toml"), "w") as f:
            f.write("")  # the default guard
        print(f"{a.bursts} bursts of {a.sessions} concurrent sessions; resident memory (VmRSS)")
        for label, path in binaries:
            port = bench.free_port()
            proc = subprocess.Popen(
                [path, "serve", "--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{pg_port}",
                 "--upstream-tls", "disable", "--rules", rules, "--max-client-conn", str(a.sessions + 100),
                 "--audit-log", os.path.join(work, f"audit-{label}.jsonl"), "--audit-flush", "interval"],
                env=dict(os.environ, PGVEIL_LOG="warn"))
            procs.append(proc)
            bench.wait_ready(port)
            measure(label, port, proc.pid, a.sessions, a.bursts)
            proc.terminate()
            proc.wait(timeout=60)
            procs.remove(proc)
        if not a.no_pgbouncer:
            port, pid, _ = bench.start_pgbouncer(work, pg_port, max_client_conn=a.sessions + 100,
                                             pool_size=a.sessions + 100)
            measure("pgbouncer", port, pid, a.sessions, a.bursts)
    finally:
        bench.stop_all(work, procs)


if __name__ == "__main__":
    main()
