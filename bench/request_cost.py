"""CPU per request of the benchmark app with no HTTP server: Django alone, then with greenpatch.

Calls the WSGI handler of ``bench/tfb`` in a loop, one request at a time,
and reports CPU time (user + system) per request, in a fresh process per
configuration:

* ``stock``       Django's MySQL backend on blocking PyMySQL, one connection
                  kept (``CONN_MAX_AGE=60``): what the app itself costs;
* ``greenpatch``  ``greenpatch.patch_all()``, each request in its own worker
                  on a Tornado IOLoop, connections from the pool of
                  ``greenpatch.django.mysql``: what greenpatch adds around it
                  (a worker per request, a pool checkout and checkin, a loop
                  iteration per query), without a server's HTTP work.

Figures are the minimum and median over ``--rounds`` rounds of ``--requests``.
The server comes from ``--db-url`` (default ``GREENPATCH_TEST_DB_URL``, else
``mysql://root@127.0.0.1:3306/test``); the script creates the ``World`` table
in its own database (``gp_peers``, as ``peers.py``) and drops it at the end.

Run: ``python bench/request_cost.py [--paths /plain,/db] [--requests 1000]``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODES = ("stock", "greenpatch")


def _environ(path: str) -> dict:
    target, _, query = path.partition("?")
    return {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": target,
        "QUERY_STRING": query,
        "SERVER_NAME": "bench",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": "bench",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": sys.stderr,
        "wsgi.url_scheme": "http",
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }


def measure(mode: str, paths: list[str], requests: int, rounds: int) -> dict[str, list[float]]:
    """In this process: CPU microseconds per request of each path, per round."""
    if mode == "greenpatch":
        import greenpatch

        greenpatch.patch_all()
    import django
    from django.core.handlers.wsgi import WSGIHandler

    django.setup()
    app = WSGIHandler()

    def start_response(status: str, headers: list) -> None:
        if not status.startswith("200"):
            raise RuntimeError(f"{status} from the benchmark app")

    def one(path: str) -> None:
        response = app(_environ(path), start_response)
        b"".join(response)
        response.close()

    def timed(batch) -> dict[str, list[float]]:
        # batch(path, n) serves n requests of path.
        out: dict[str, list[float]] = {}
        for path in paths:
            batch(path, min(requests, 200))  # warm-up
            for _ in range(rounds):
                t = time.process_time()
                batch(path, requests)
                out.setdefault(path, []).append((time.process_time() - t) / requests * 1e6)
        return out

    if mode == "stock":

        def batch(path: str, n: int) -> None:
            for _ in range(n):
                one(path)

        return timed(batch)

    from tornado.ioloop import IOLoop

    import greenpatch

    async def requests_one_at_a_time(path: str, n: int) -> None:
        for _ in range(n):
            await greenpatch.spawn(one, path)

    loop = IOLoop(make_current=False)
    try:
        return timed(lambda path, n: loop.run_sync(lambda: requests_one_at_a_time(path, n)))
    finally:
        loop.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths", default="/plain,/db,/queries?q=20,/updates?q=5", help="comma-separated")
    parser.add_argument("--requests", type=int, default=1000, help="per round (default 1000)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--db-url", default=None, help="default: GREENPATCH_TEST_DB_URL or the local server")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    paths = args.paths.split(",")
    if args.child:  # one configuration, in this process: print JSON
        print(json.dumps(measure(args.child, paths, args.requests, args.rounds)))
        return 0

    sys.path.insert(0, str(HERE))
    import peers
    from query_overhead import DEFAULT_URL, parse_db_url

    url = args.db_url or os.environ.get("GREENPATCH_TEST_DB_URL", DEFAULT_URL)
    db = parse_db_url(url, setting="--db-url" if args.db_url else "GREENPATCH_TEST_DB_URL")
    peers.create_world(db)
    try:
        figures = {}
        for mode in MODES:
            env = dict(os.environ)
            env.update(
                PYTHONPATH=os.pathsep.join([str(peers.APP_DIR), str(peers.ROOT)]),
                DJANGO_SETTINGS_MODULE="tfb.settings",
                BENCH_ENGINE="greenpatch" if mode == "greenpatch" else "pymysql",
                BENCH_POOL_SIZE="20",
                BENCH_CONN_MAX_AGE="60",
                BENCH_DB_HOST=db["host"],
                BENCH_DB_PORT=str(db["port"]),
                BENCH_DB_USER=db["user"],
                BENCH_DB_PASSWORD=db["password"],
                BENCH_DB_NAME=peers.DB_NAME,
            )
            env.pop("GREENPATCH", None)
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    mode,
                    "--paths",
                    args.paths,
                    "--requests",
                    str(args.requests),
                    "--rounds",
                    str(args.rounds),
                ],
                env=env,
                cwd=peers.APP_DIR,
                check=True,
                capture_output=True,
                text=True,
            )
            figures[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        peers.drop_world(db)
    print(f"CPU per request, us (min / median of {args.rounds} rounds of {args.requests}), no HTTP server:")
    print(f"| path | {' | '.join(MODES)} | difference |")
    print("| --- | --- | --- | --- |")
    for path in paths:
        stock, green = (figures[m][path] for m in MODES)
        cells = [f"{min(v):.0f} / {statistics.median(v):.0f}" for v in (stock, green)]
        diff = statistics.median(green) - statistics.median(stock)
        print(f"| `{path}` | {cells[0]} | {cells[1]} | {diff:+.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
