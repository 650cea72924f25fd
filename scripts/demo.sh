#!/usr/bin/env bash
# The main job on a built-in default: a scratch PostgreSQL with the sample CRM, pgveil in
# front of it with rules/, and a few queries as two roles through the proxy; at the end,
# the audit records of those sessions and a check of their hash chain.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
echo "== building pgveil (release)"
cargo build --release --locked --quiet
work="$(mktemp -d /tmp/pgveil-demo.XXXXXX)"
pgveil_pid=""
cleanup() {
  [ -n "$pgveil_pid" ] && kill "$pgveil_pid" 2>/dev/null && wait "$pgveil_pid" 2>/dev/null
  scripts/cluster.sh stop "$work/pg"
  rm -rf "$work"
}
trap cleanup EXIT

echo "== starting a scratch PostgreSQL and loading the sample CRM"
pg_port="$(scripts/cluster.sh start "$work/pg" postgres)"
export PGPASSWORD=postgres PGCONNECT_TIMEOUT=10
psql -X -q -h 127.0.0.1 -p "$pg_port" -U postgres -c "CREATE DATABASE crm"
psql -X -q -h 127.0.0.1 -p "$pg_port" -U postgres -d crm -v ON_ERROR_STOP=1 -f tests/fixtures/crm.sql
admin_url="postgres://postgres:postgres@127.0.0.1:$pg_port/crm"
echo "== installing the recycle bin for the [[recycle]] tables of rules/"
./target/release/pgveil trash init --rules rules/ --upstream-url "$admin_url"

proxy_port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
echo "== pgveil on 127.0.0.1:$proxy_port -> PostgreSQL on 127.0.0.1:$pg_port, rules from rules/"
PGVEIL_LOG=warn ./target/release/pgveil serve --listen "127.0.0.1:$proxy_port" \
  --upstream "127.0.0.1:$pg_port" --rules rules/ --audit-log "$work/audit.jsonl" &
pgveil_pid=$!
for _ in $(seq 50); do
  psql -X -q -h 127.0.0.1 -p "$proxy_port" -U postgres -d crm -c "SELECT 1" >/dev/null 2>&1 && break
  sleep 0.2
done

via_pgveil() { # user password psql-args...: psql through pgveil, errors shown, not fatal
  local user="$1" password="$2"
  shift 2
  PGPASSWORD="$password" psql -X -h 127.0.0.1 -p "$proxy_port" -U "$user" -d crm "$@" 2>&1 || true
}

query="SELECT id, full_name, phone, email, national_id, birth_date, balance FROM customers ORDER BY id LIMIT 3"
show() { # user password title
  echo
  echo "== as $1 ($3), through pgveil:"
  via_pgveil "$1" "$2" -c "$query"
}
show crm_admin admin_pw "crm_admin: exempt from every mask, sees clear values"
show alice alice_pw "crm_support: phone, email, national_id, balance masked; birth_date exempt for support"

echo
echo "== alice tries to get around the mask with an expression: it runs on the masked value"
via_pgveil alice alice_pw \
  -c "SELECT id, upper(phone) FROM customers ORDER BY id LIMIT 2" \
  -c "SELECT count(*) AS found_by_clear_prefix FROM customers WHERE phone LIKE '1391%'"
echo "== alice tries SQL hidden in a string: refused"
via_pgveil alice alice_pw \
  -c "SELECT query_to_xml('SELECT phone FROM customers', true, true, '')"

echo
echo "== alice (crm_support) tries to delete a customer, directly and hidden in a CTE: refused by pgveil"
via_pgveil alice alice_pw \
  -c "DELETE FROM customers WHERE id = 1" \
  -c "WITH d AS (DELETE FROM customers WHERE id = 1 RETURNING id) SELECT * FROM d"
echo "== alice may delete tasks, but only with a WHERE clause:"
via_pgveil alice alice_pw \
  -c "DELETE FROM tasks WHERE id = 1" -c "DELETE FROM tasks"

echo
echo "== crm_admin deletes customer 2 (allowed); the row and its cascaded contacts and deals go to the recycle bin"
via_pgveil crm_admin admin_pw \
  -c "DELETE FROM customers WHERE id = 2 RETURNING id, full_name"
./target/release/pgveil trash list --upstream-url "$admin_url" --table customers
echo "== restoring it from the recycle bin (parents first, children after)"
./target/release/pgveil trash restore --upstream-url "$admin_url" --since "$(date -u -d '-10 minutes' +%Y-%m-%dT%H:%M:%SZ)"
via_pgveil crm_admin admin_pw \
  -c "SELECT c.id, c.full_name, (SELECT count(*) FROM deals d WHERE d.customer_id = c.id) AS deals FROM customers c WHERE id = 2"

echo
echo "== the rules pgveil loaded:"
./target/release/pgveil check --rules rules/

echo
echo "== the audit log: what alice did (a table; --json gives the records for jq)"
sleep 0.3 # the disconnect records of the last sessions
./target/release/pgveil audit search "$work/audit.jsonl" --user alice
echo "== refusals, by anyone"
./target/release/pgveil audit search "$work/audit.jsonl" --decision blocked
echo "== one record in full"
./target/release/pgveil audit search "$work/audit.jsonl" --user alice --decision masked --json | head -n 1
echo "== verifying the hash chain"
./target/release/pgveil audit verify "$work/audit.jsonl"
