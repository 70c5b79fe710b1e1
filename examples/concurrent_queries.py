"""greenpatch in thirty lines: ten slow PyMySQL queries on one IOLoop.

Run: python examples/concurrent_queries.py   (or scripts/demo)

Each worker runs ordinary blocking PyMySQL code. Patched, the ten
``SELECT SLEEP(0.5)`` overlap and finish in about 0.5 s while a loop
callback keeps ticking; with GREENPATCH=0 the same code takes about 5 s and
the loop is frozen meanwhile.
"""

import asyncio
import os
import time
from urllib.parse import urlparse

import greenpatch

greenpatch.patch_all()  # a logged no-op when GREENPATCH=0

import pymysql  # noqa: E402
from tornado.ioloop import IOLoop, PeriodicCallback  # noqa: E402

url = urlparse(os.environ.get("GREENPATCH_TEST_DB_URL", "mysql://root@127.0.0.1:3306/test"))
PARAMS = {
    "host": url.hostname or "127.0.0.1",
    "port": url.port or 3306,
    "user": url.username or "root",
    "password": url.password or "",
}


def query(n: int):
    conn = pymysql.connect(**PARAMS)
    with conn.cursor() as cur:
        cur.execute("SELECT SLEEP(0.5), %s", (n,))
        row = cur.fetchone()
    conn.close()
    return row


async def main() -> None:
    ticks = 0

    def tick() -> None:
        nonlocal ticks
        ticks += 1

    ticker = PeriodicCallback(tick, 50)
    ticker.start()
    start = time.monotonic()
    rows = await asyncio.gather(*(greenpatch.spawn(query, n) for n in range(10)))
    elapsed = time.monotonic() - start
    ticker.stop()
    print(f"patched: {greenpatch.patched() or 'nothing (GREENPATCH=0)'}")
    print(f"10 x SELECT SLEEP(0.5) took {elapsed:.2f} s; rows: {[r[1] for r in rows]}")
    print(f"the loop ticked {ticks} times meanwhile (every 50 ms when free)")


if __name__ == "__main__":
    IOLoop.current().run_sync(main)
