"""Per-query overhead of greenpatch's green socket versus stock blocking PyMySQL.

One connection per configuration runs small queries back to back:

* ``stock``     blocking PyMySQL in the main thread (connection opened
                outside any worker, so PyMySQL keeps its own socket);
* ``green``     ``greenpatch.patch_all()``; the connection is opened and used
                inside one worker on a Tornado IOLoop (a ``GreenSocket``);
* ``green+idle``      ``green`` while N other workers loop on ``greenpatch.sleep``;
* ``green+periodic``  ``green`` while a ``PeriodicCallback`` ticks on the loop.

Configurations run in interleaved rounds (stock, green, ..., stock, green, ...)
so that drift of the machine or the server hits them alike; the table shows
the median over rounds of the per-query time, and the ratio to ``stock``.
Connect time (connect + close, stock and green) is measured separately.

The server comes from ``GREENPATCH_TEST_DB_URL`` (default
``mysql://root@127.0.0.1:3306/test``). The benchmark creates its own database
``greenpatch_bench`` (10,000-row table ``bench_pk``) and drops it at the end.

Run: ``python bench/query_overhead.py [--queries 1000] [--rounds 7]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata
from urllib.parse import unquote, urlparse

import pymysql
from tornado.ioloop import IOLoop, PeriodicCallback

import greenpatch
from greenpatch import patches
from greenpatch.socket import GreenSocket

DEFAULT_URL = "mysql://root@127.0.0.1:3306/test"
BENCH_DB = "greenpatch_bench"
TABLE_ROWS = 10_000
PK_SQL = "SELECT id, name, value FROM bench_pk WHERE id = %s"


def parse_db_url(url: str, setting: str = "GREENPATCH_TEST_DB_URL") -> dict:
    """Connection arguments from a ``mysql://user:pass@host:port/db`` URL (as tests/conftest.py).

    ``setting`` names where the URL came from, for the error message.
    """
    parsed = urlparse(url)
    if parsed.scheme not in ("mysql", "mariadb"):
        raise SystemExit(
            f"{setting}: scheme {parsed.scheme!r} unsupported; use mysql://user:pass@host:port/db"
        )
    return {
        "host": parsed.hostname or "127.0.0.1",
        "port": parsed.port or 3306,
        "user": unquote(parsed.username or "root"),
        "password": unquote(parsed.password or ""),
        "database": (parsed.path or "/test").lstrip("/") or "test",
    }


def db_params() -> dict:
    """Connection arguments from GREENPATCH_TEST_DB_URL."""
    return parse_db_url(os.environ.get("GREENPATCH_TEST_DB_URL", DEFAULT_URL))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Server: env GREENPATCH_TEST_DB_URL (default " + DEFAULT_URL + ").",
    )
    parser.add_argument("--queries", type=int, default=1000, help="queries per round and kind (default 1000)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per configuration (default 7)")
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed rounds per configuration first (default 1)"
    )
    parser.add_argument(
        "--connects", type=int, default=50, help="timed connects per kind (default 50; 0: skip)"
    )
    parser.add_argument(
        "--idle-workers", type=int, default=50, help="sleeping workers in green+idle (default 50; 0: skip)"
    )
    parser.add_argument(
        "--idle-interval",
        type=float,
        default=0.01,
        help="greenpatch.sleep() of each idle worker, s (default 0.01)",
    )
    parser.add_argument(
        "--periodic-ms",
        type=float,
        default=1.0,
        help="PeriodicCallback period in green+periodic (default 1; 0: skip)",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the primary-key sequence (default 1)")
    parser.add_argument("--json", help="also write the per-query figures here (used by bench/peers.py)")
    args = parser.parse_args(argv)
    if args.queries < 1 or args.rounds < 1 or args.warmup < 0 or args.connects < 0:
        parser.error("--queries and --rounds must be >= 1, --warmup and --connects >= 0")
    return args


# -- the measured work ---------------------------------------------------------


def run_queries(conn: pymysql.connections.Connection, kind: str, ids: list[int]) -> tuple[float, float]:
    """Run len(ids) queries of ``kind``; return (wall, process CPU) seconds."""
    cur = conn.cursor()
    execute, fetchone = cur.execute, cur.fetchone
    clock, cpu = time.perf_counter, time.process_time
    if kind == "select1":
        t0, c0 = clock(), cpu()
        for _ in ids:
            execute("SELECT 1")
            fetchone()
        elapsed, used = clock() - t0, cpu() - c0
    else:
        t0, c0 = clock(), cpu()
        for i in ids:
            execute(PK_SQL, (i,))
            if fetchone() is None:
                raise RuntimeError(f"row {i} missing")
        elapsed, used = clock() - t0, cpu() - c0
    cur.close()
    return elapsed, used


class GreenRunner:
    """A Tornado IOLoop with one green connection, opened in a worker."""

    def __init__(self, params: dict) -> None:
        self.loop = IOLoop(make_current=False)
        self.params = params
        self.conn: pymysql.connections.Connection | None = None

    def run(self, fn: Callable, *args):
        """Run ``fn(*args)`` in a worker on this loop; return its result."""

        async def main():
            return await greenpatch.spawn(fn, *args)

        return self.loop.run_sync(main)

    def run_loaded(self, fn: Callable, args: tuple, load: str, opts: argparse.Namespace):
        """Like `run`, with the loop kept busy by ``load`` ("idle" or "periodic")."""

        async def main():
            stop = False
            helpers = []
            periodic = None
            if load == "idle":

                def idle() -> None:
                    while not stop:
                        greenpatch.sleep(opts.idle_interval)

                helpers = [greenpatch.spawn(idle) for _ in range(opts.idle_workers)]
            else:
                periodic = PeriodicCallback(lambda: None, opts.periodic_ms)
                periodic.start()
            try:
                return await greenpatch.spawn(fn, *args)
            finally:
                stop = True
                if periodic is not None:
                    periodic.stop()
                for h in helpers:
                    await h

        return self.loop.run_sync(main)

    def open(self) -> None:
        def connect():
            return pymysql.connect(**self.params)

        self.conn = self.run(connect)
        if not isinstance(self.conn._sock, GreenSocket):
            raise SystemExit(
                f"green connection has a {type(self.conn._sock).__name__}, not a GreenSocket: "
                "is GREENPATCH=0 or GREENPATCH_DISABLE set?"
            )

    def close(self) -> None:
        if self.conn is not None:
            self.run(self.conn.close)
        self.loop.close(all_fds=False)


# -- connect time ----------------------------------------------------------------


def time_connect(params: dict) -> float:
    t0 = time.perf_counter()
    conn = pymysql.connect(**params)
    elapsed = time.perf_counter() - t0
    conn.close()
    return elapsed


def bench_connect(params: dict, green: GreenRunner, n: int) -> dict[str, list[float]]:
    """Interleaved connects: stock unpatched, stock patched (outside a worker), green.

    Unpatched PyMySQL builds a new SSLContext (loading the CA store) for every
    connection in its default "preferred TLS" mode, even when the server offers
    no TLS; the pymysql patch shares one, for blocking connections too.
    """
    times: dict[str, list[float]] = {"stock (unpatched)": [], "stock (patched, no worker)": [], "green": []}

    def green_connect() -> float:
        t0 = time.perf_counter()
        conn = pymysql.connect(**params)
        elapsed = time.perf_counter() - t0
        if not isinstance(conn._sock, GreenSocket):
            raise RuntimeError("green connect did not use a GreenSocket")
        conn.close()
        return elapsed

    for i in range(n + 1):  # the first connect of each kind is a warm-up
        patches.unpatch("pymysql")  # PyMySQL as shipped
        t_unpatched = time_connect(params)
        patches.patch("pymysql")
        t_patched = time_connect(params)
        t_green = green.run(green_connect)
        if i:
            times["stock (unpatched)"].append(t_unpatched)
            times["stock (patched, no worker)"].append(t_patched)
            times["green"].append(t_green)
    return times


# -- setup / report -----------------------------------------------------------------


def setup_db(params: dict) -> dict:
    admin = pymysql.connect(**params)
    try:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{BENCH_DB}`")
            cur.execute(f"CREATE DATABASE `{BENCH_DB}`")
            cur.execute(
                f"CREATE TABLE `{BENCH_DB}`.bench_pk ("
                " id INT NOT NULL PRIMARY KEY, name VARCHAR(64) NOT NULL, value DOUBLE NOT NULL"
                ") ENGINE=InnoDB"
            )
            rows = [(i, f"name-{i:05d}", i * 1.5) for i in range(1, TABLE_ROWS + 1)]
            cur.executemany(f"INSERT INTO `{BENCH_DB}`.bench_pk (id, name, value) VALUES (%s, %s, %s)", rows)
        admin.commit()
    finally:
        admin.close()
    return dict(params, database=BENCH_DB)


def drop_db(params: dict) -> None:
    admin = pymysql.connect(**params)
    try:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{BENCH_DB}`")
    finally:
        admin.close()


def versions(conn: pymysql.connections.Connection) -> list[str]:
    def ver(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "?"

    with conn.cursor() as cur:
        cur.execute("SELECT VERSION()")
        server = cur.fetchone()[0]
        cur.execute("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
        row = cur.fetchone()
    tls = (
        row[1]
        if row and row[1]
        else "off (server offers none)"
        if not conn.server_capabilities & 2048
        else "off"
    )
    return [
        f"Python     {platform.python_version()} ({platform.python_implementation()}, {sys.platform})",
        f"greenlet   {ver('greenlet')}",
        f"tornado    {ver('tornado')}",
        f"PyMySQL    {ver('PyMySQL')}",
        f"greenpatch {greenpatch.__version__} ({os.path.dirname(greenpatch.__file__)})",
        f"server     {server} at {conn.host}:{conn.port}, TLS {tls}",
    ]


def median_us(values: list[float], per: int) -> float:
    return statistics.median(values) / per * 1e6


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(r: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )

    print(title)
    print(fmt(header))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(fmt(r))
    print()


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    base = db_params()
    greenpatch.patch_all()
    if "pymysql" not in greenpatch.patched():
        raise SystemExit("greenpatch.patch_all() did not patch PyMySQL (GREENPATCH=0 or GREENPATCH_DISABLE?)")
    params = setup_db(base)
    green = GreenRunner(params)
    stock: pymysql.connections.Connection | None = None
    try:
        connect_times = bench_connect(params, green, opts.connects) if opts.connects else {}

        stock = pymysql.connect(**params)  # main thread, outside any worker: a plain socket
        green.open()
        assert green.conn is not None

        configs: list[tuple[str, Callable[[str, list[int]], tuple[float, float]]]] = [
            ("stock", lambda kind, ids: run_queries(stock, kind, ids)),
            ("green", lambda kind, ids: green.run(run_queries, green.conn, kind, ids)),
        ]
        if opts.idle_workers > 0:
            configs.append(
                (
                    f"green+idle({opts.idle_workers}x sleep {opts.idle_interval:g}s)",
                    lambda kind, ids: green.run_loaded(run_queries, (green.conn, kind, ids), "idle", opts),
                )
            )
        if opts.periodic_ms > 0:
            configs.append(
                (
                    f"green+periodic({opts.periodic_ms:g}ms)",
                    lambda kind, ids: green.run_loaded(
                        run_queries, (green.conn, kind, ids), "periodic", opts
                    ),
                )
            )

        rng = random.Random(opts.seed)
        kinds = ["select1", "pk"]
        # (config, kind) -> one (wall, cpu) pair per timed round
        results: dict[tuple[str, str], list[tuple[float, float]]] = {
            (c, k): [] for c, _ in configs for k in kinds
        }
        print(
            f"{len(configs)} configs x {len(kinds)} query kinds x {opts.rounds} rounds"
            f" x {opts.queries} queries (+{opts.warmup} warm-up round), interleaved ...",
            file=sys.stderr,
            flush=True,
        )
        for r in range(opts.warmup + opts.rounds):
            for kind in kinds:
                ids = [rng.randint(1, TABLE_ROWS) for _ in range(opts.queries)]
                # Every other round runs the configs in reverse order, so that
                # none always runs first (or right after the same neighbour).
                for name, fn in configs if r % 2 == 0 else configs[::-1]:
                    gc.collect()
                    measured = fn(kind, ids)
                    if r >= opts.warmup:
                        results[(name, kind)].append(measured)

        print("greenpatch query overhead benchmark")
        for line in versions(stock):
            print("  " + line)
        print(
            f"  {opts.rounds} rounds x {opts.queries} queries per config and kind, interleaved"
            f" (+{opts.warmup} warm-up round)"
        )
        print("  stock: connection opened in the main thread, outside any worker (a plain blocking socket)")
        print("  green: patch_all(); connection opened and used inside one worker on a Tornado IOLoop")
        print()

        rows = []
        figures: dict[str, dict[str, dict[str, float]]] = {}
        for name, _ in configs:
            row = [name]
            for kind in kinds:
                walls = [w for w, _ in results[(name, kind)]]
                stock_walls = [w for w, _ in results[("stock", kind)]]
                us = median_us(walls, opts.queries)
                ratio = us / median_us(stock_walls, opts.queries)
                paired = statistics.median(w / s for w, s in zip(walls, stock_walls, strict=True))
                cpu = median_us([c for _, c in results[(name, kind)]], opts.queries)
                figures.setdefault(kind, {})[name] = {
                    "us": us,
                    "ratio": ratio,
                    "paired": paired,
                    "cpu_us": cpu,
                }
                row += [
                    f"{us:.1f}",
                    f"{min(walls) / opts.queries * 1e6:.0f}-{max(walls) / opts.queries * 1e6:.0f}",
                    f"{ratio:.2f}x",
                    f"{paired:.2f}x",
                    f"{cpu:.1f}",
                ]
            rows.append(row)
        print_table(
            "Per-query wall time on one connection, us (median of rounds)",
            [
                "config",
                "SELECT 1",
                "range",
                "ratio",
                "paired",
                "cpu",
                "pk select",
                "range",
                "ratio",
                "paired",
                "cpu",
            ],
            rows,
        )
        print(
            "range: fastest-slowest round; ratio: median / stock median; paired: median over rounds of\n"
            "(config / stock of the same round); cpu: client process CPU per query (includes the kernel's\n"
            "loopback TCP work done in the client's send()/recv()).\n"
        )
        if opts.json:
            with open(opts.json, "w") as f:
                json.dump({"rounds": opts.rounds, "queries": opts.queries, "figures": figures}, f, indent=1)

        if connect_times:
            stock_ms = statistics.median(connect_times["stock (unpatched)"]) * 1e3
            crows = []
            for name, values in connect_times.items():
                ms = statistics.median(values) * 1e3
                crows.append(
                    [
                        name,
                        f"{ms:.2f}",
                        f"{min(values) * 1e3:.2f}-{max(values) * 1e3:.2f}",
                        f"{ms / stock_ms:.2f}x",
                    ]
                )
            print_table(
                f"Connect + handshake time, {opts.connects} connects each, interleaved"
                " (ms, default TLS settings)",
                ["kind", "median", "range", "ratio"],
                crows,
            )
    finally:
        if stock is not None:
            stock.close()
        green.close()
        drop_db(base)
    return 0


if __name__ == "__main__":
    sys.exit(main())
