#!/usr/bin/env bash
# A scratch PostgreSQL cluster for the demo and the benchmarks (the tests have their own
# harness in tests/common). SCRAM authentication, 127.0.0.1 on a free port.
#
#   scripts/cluster.sh start DIR [PASSWORD]   # prints the port
#   scripts/cluster.sh stop DIR
#
# initdb refuses to run as root: as root, the cluster belongs to the `postgres` user.
# PGVEIL_MAX_CONNECTIONS sets the server's max_connections (200).
set -euo pipefail

pg_bin() {
  if [ -n "${PGVEIL_PG_BIN:-}" ]; then echo "$PGVEIL_PG_BIN"; return; fi
  local best=""
  for d in /usr/lib/postgresql/*/bin; do [ -x "$d/initdb" ] && best="$d"; done
  if [ -z "$best" ] && command -v pg_config >/dev/null; then best="$(pg_config --bindir)"; fi
  if [ -z "$best" ] || [ ! -x "$best/initdb" ]; then
    echo "PostgreSQL server binaries not found: apt-get install -y postgresql postgresql-contrib" >&2
    exit 1
  fi
  echo "$best"
}

as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

cmd="${1:?usage: cluster.sh start|stop DIR [PASSWORD]}"
dir="${2:?usage: cluster.sh start|stop DIR [PASSWORD]}"
bin="$(pg_bin)"

case "$cmd" in
  start)
    password="${3:-postgres}"
    mkdir -p "$dir"
    # The server's user must be able to reach DIR.
    [ "$(id -u)" = 0 ] && chmod 755 "$(dirname "$dir")"
    [ "$(id -u)" = 0 ] && chown postgres:postgres "$dir"
    printf '%s' "$password" > "$dir/pwfile"
    [ "$(id -u)" = 0 ] && chown postgres "$dir/pwfile"
    as_pg "$bin/initdb" -D "$dir/data" -U postgres --auth=scram-sha-256 \
      --pwfile="$dir/pwfile" -E UTF8 --locale=C >"$dir/initdb.log" 2>&1 \
      || { cat "$dir/initdb.log" >&2; exit 1; }
    cat >>"$dir/data/postgresql.auto.conf" <<CONF
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir'
max_connections = ${PGVEIL_MAX_CONNECTIONS:-200}
shared_buffers = 128MB
fsync = off
synchronous_commit = off
full_page_writes = off
CONF
    for _ in 1 2 3 4 5; do
      port="$(free_port)"
      if as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 -o "-p $port" start >/dev/null; then
        echo "$port" > "$dir/port"
        echo "$port"
        exit 0
      fi
    done
    echo "PostgreSQL did not start; see $dir/server.log" >&2
    exit 1
    ;;
  stop)
    [ -d "$dir/data" ] && as_pg "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$dir"
    ;;
  *)
    echo "usage: cluster.sh start|stop DIR [PASSWORD]" >&2
    exit 2
    ;;
esac
