"""psycopg2 through pgveil: the same query with new literals, a scrollable named cursor
moved with scroll() (MOVE) and fetched in parts, executemany rolled back, COPY out. One
line per result.

    python3 psycopg2_suite.py DSN
"""
import io
import sys

import psycopg2


def line(label, rows):
    print(label + ":", " ".join("[" + "|".join(str(v) for v in r) + "]" for r in rows))


conn = psycopg2.connect(sys.argv[1])
cur = conn.cursor()
for i in range(1, 8):
    cur.execute("SELECT id, phone, email FROM customers WHERE id = %s", (i,))
    line(f"query {i}", cur.fetchall())
conn.rollback()
named = conn.cursor("drivers_cursor", scrollable=True)
named.itersize = 2
named.execute("SELECT id, phone FROM customers ORDER BY id")
named.scroll(2)
line("scroll 2, fetchmany 3", named.fetchmany(3))
named.scroll(0, mode="absolute")
line("scroll absolute 0, fetchone", [named.fetchone()])
named.scroll(-1)
line("scroll -1, fetchone", [named.fetchone()])
named.close()
conn.rollback()
cur.executemany("INSERT INTO tasks (owner, note) VALUES (%s, %s)", [("alice", "a"), ("alice", "b")])
conn.rollback()
print("executemany: rolled back")
buf = io.StringIO()
cur.copy_expert("COPY (SELECT id, phone, email FROM customers ORDER BY id LIMIT 3) TO STDOUT", buf)
print("copy:", buf.getvalue().replace("\n", " / "))
conn.close()
