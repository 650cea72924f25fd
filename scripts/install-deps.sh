#!/usr/bin/env bash
# Installs what the tests, demo and benchmarks need on a fresh Debian machine:
# PostgreSQL 15 server and client (initdb, pg_ctl, psql), pgbench (postgresql-contrib),
# PgBouncer (for the benchmarks), curl, jq and openssl (for the README walk-through), and
# the drivers the tests run through pgveil (psycopg 3, psycopg2, asyncpg, pgjdbc and a JDK).
# Does nothing when they are already there.
set -euo pipefail
need=()
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need+=(postgresql)
command -v psql >/dev/null || need+=(postgresql-client)
command -v pgbench >/dev/null || compgen -G "/usr/lib/postgresql/*/bin/pgbench" >/dev/null || need+=(postgresql-contrib)
command -v pgbouncer >/dev/null || [ -x /usr/sbin/pgbouncer ] || need+=(pgbouncer)
# The README walk-through (run by tests/readme.rs) uses these.
for tool in curl jq openssl; do command -v "$tool" >/dev/null || need+=("$tool"); done
# Drivers the tests run through pgveil: psycopg 3, psycopg2, asyncpg, SQLAlchemy (an ORM
# application flow) and pgjdbc (with a JDK to compile its suite). The system Python is asked: a version manager's may differ.
for module in psycopg psycopg2 asyncpg sqlalchemy; do
  /usr/bin/python3 -c "import $module" 2>/dev/null || need+=("python3-$module")
done
command -v javac >/dev/null || need+=(default-jdk-headless)
[ -f /usr/share/java/postgresql.jar ] || need+=(libpostgresql-jdbc-java)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing: ${need[*]}; install them with: sudo apt-get install -y ${need[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" postgresql-contrib >/dev/null
  # Debian's package starts a cluster on 5432; the tests use their own, on free ports.
  if command -v pg_ctlcluster >/dev/null; then
    for c in /etc/postgresql/*/main; do
      [ -d "$c" ] && pg_ctlcluster "$(basename "$(dirname "$c")")" main stop 2>/dev/null || true
    done
  fi
fi
# pgbench lives next to the server binaries on some installs.
if ! command -v pgbench >/dev/null; then
  for d in /usr/lib/postgresql/*/bin; do [ -x "$d/pgbench" ] && ln -sf "$d/pgbench" /usr/local/bin/pgbench; done
fi
