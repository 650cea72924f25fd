"""asyncpg through pgveil: its statement cache (named statements, binary results),
prepared statements reused, a cursor moved with Cursor.forward (MOVE), executemany in a
rolled-back transaction, COPY out. One line per result.

    python3 asyncpg_suite.py DSN
"""
import asyncio
import io
import sys

import asyncpg


def line(label, rows):
    print(label + ":", " ".join("[" + "|".join(str(v) for v in r.values()) + "]" for r in rows))


async def main(dsn):
    c = await asyncpg.connect(dsn)
    stmt = await c.prepare("SELECT id, phone, email FROM customers WHERE id = $1")
    for i in range(1, 8):
        line(f"prepared {i}", [await stmt.fetchrow(i)])
    for i in range(1, 4):
        line(f"cached {i}", await c.fetch("SELECT id, phone FROM customers WHERE id <= $1 ORDER BY id", i))
    async with c.transaction():
        cur = await c.cursor("SELECT id, phone FROM customers ORDER BY id")
        await cur.forward(2)
        line("cursor after forward 2", await cur.fetch(3))
    tr = c.transaction()
    await tr.start()
    await c.executemany("INSERT INTO tasks (owner, note) VALUES ($1, $2)", [("alice", "a"), ("alice", "b")])
    await tr.rollback()
    print("executemany: rolled back")
    buf = io.BytesIO()
    await c.copy_from_query("SELECT id, phone, email FROM customers ORDER BY id LIMIT 3", output=buf)
    print("copy:", buf.getvalue().decode().replace("\n", " / "))
    await c.close()


asyncio.run(main(sys.argv[1]))
