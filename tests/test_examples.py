"""The examples end to end: real subprocesses, real HTTP, a real database.

One scratch database (``gp_shop_<random>``, passed as ``SHOP_DB_URL``) is
created with ``examples/shop/setup_db.py``, migrated and seeded through the
shop's ``manage.py``, and dropped at the end. Servers run as subprocesses on
free ports and are always stopped in teardown. Nothing Django is imported in
the test process itself (other modules configure Django in-process).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import pymysql
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SHOP = EXAMPLES / "shop"
MANAGE = str(SHOP / "manage.py")
TORNADO_APP = str(EXAMPLES / "tornado_app.py")

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an http_proxy


# -- helpers -----------------------------------------------------------------


def run(*args: str, env: dict, timeout: float = 60) -> str:
    """Run a command to completion; assert it succeeded; return its output."""
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(args[1:])} failed ({proc.returncode}):\n{output}"
    return output


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(method: str, url: str, timeout: float = 15) -> tuple[int, object]:
    """Status and decoded JSON body (or text) of one request."""
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with _opener.open(request, timeout=timeout) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode("utf-8", "replace")


def sql(params: dict, query: str, args: tuple = ()) -> tuple:
    conn = pymysql.connect(**params)
    try:
        with conn.cursor() as cur:
            cur.execute(query, args)
            rows = cur.fetchall()
        conn.commit()
        return rows
    finally:
        conn.close()


def product_id(params: dict, slug: str) -> int:
    return sql(params, "SELECT id FROM catalog_product WHERE slug = %s", (slug,))[0][0]


class Server:
    """A server subprocess, its log file and base URL."""

    def __init__(self, args: list[str], env: dict, log_path: Path, port: int, ready_path: str) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "w")  # a file, not a pipe: a full pipe would stall the server
        self.proc = subprocess.Popen(args, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                self.stop()
                pytest.fail(f"{args} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if http("GET", self.base + ready_path, timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"{args} did not answer {ready_path} within 30 s:\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        """Send ``sig``; kill after ``timeout`` s. Returns the exit code (None if it had to be killed)."""
        code = None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        else:
            code = self.proc.returncode
        self._log.close()
        return code


def parallel(n: int, fn, *args) -> tuple[list, float]:
    """Call ``fn(*args)`` ``n`` times at once; results and the elapsed seconds."""
    with ThreadPoolExecutor(n) as pool:
        start = time.monotonic()
        results = list(pool.map(lambda _: fn(*args), range(n)))
        return results, time.monotonic() - start


def pool_stats(base: str, stats_path: str) -> list[dict]:
    status, data = http("GET", base + stats_path)
    assert status == 200, data
    return data["pools"]


# -- fixtures ----------------------------------------------------------------


@pytest.fixture(scope="module")
def shop(db):
    """A created, migrated and seeded scratch database; yields env and pymysql params."""
    name = f"gp_shop_{uuid.uuid4().hex[:10]}"
    auth = quote(db["user"], safe="") + (f":{quote(db['password'], safe='')}" if db["password"] else "")
    url = f"mysql://{auth}@{db['host']}:{db['port']}/{name}"
    env = dict(os.environ, SHOP_DB_URL=url, PYTHONUNBUFFERED="1")
    for var in ("GREENPATCH", "GREENPATCH_DISABLE", "DJANGO_SETTINGS_MODULE", "SHOP_DEBUG"):
        env.pop(var, None)
    params = dict(db, database=name)
    try:
        assert f"database {name} created" in run(sys.executable, str(SHOP / "setup_db.py"), env=env)
        out = run(sys.executable, MANAGE, "migrate", "--noinput", env=env)
        assert "Applying catalog.0001_initial... OK" in out
        out = run(sys.executable, "-m", "greenpatch", MANAGE, "seed", env=env)
        assert "Seeded 3 categories and 10 products (13 created, 0 restored)." in out
        yield {"env": env, "params": params}
    finally:
        sql(db, f"DROP DATABASE IF EXISTS `{name}`")


@pytest.fixture(scope="module")
def tornado_app(shop, tmp_path_factory):
    port = free_port()
    server = Server(
        [sys.executable, TORNADO_APP, "--port", str(port)],
        shop["env"],
        tmp_path_factory.mktemp("tornado_app") / "log",
        port,
        "/ping",
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def runserver(shop, tmp_path_factory):
    port = free_port()
    env = dict(shop["env"])
    server = Server(
        [sys.executable, "-m", "greenpatch", MANAGE, "runserver", "--noreload", f"127.0.0.1:{port}"],
        env,
        tmp_path_factory.mktemp("runserver") / "log",
        port,
        "/plain/",
    )
    try:
        yield server
    finally:
        server.stop()


# -- the Django project ------------------------------------------------------


def test_setup_db_is_idempotent(shop):
    out = run(sys.executable, str(SHOP / "setup_db.py"), env=shop["env"])
    assert f"database {shop['params']['database']} already exists" in out


def test_migrations_match_the_models(shop):
    run(sys.executable, MANAGE, "makemigrations", "--check", "--dry-run", env=shop["env"])


@pytest.mark.parametrize(
    "launch, extra_env",
    [([], {}), (["-m", "greenpatch"], {}), ([], {"GREENPATCH": "0"})],
    ids=["plain", "launcher", "GREENPATCH=0"],
)
def test_check_passes(shop, launch, extra_env):
    out = run(sys.executable, *launch, MANAGE, "check", env=dict(shop["env"], **extra_env))
    assert "System check identified no issues" in out


def test_seed_is_idempotent(shop):
    params = shop["params"]
    sql(params, "UPDATE catalog_product SET stock = 0, price = 1 WHERE slug = 'fluent-python'")
    out = run(sys.executable, MANAGE, "seed", env=shop["env"])
    assert "(0 created, 13 restored)" in out
    assert sql(params, "SELECT COUNT(*) FROM catalog_category") == ((3,),)
    assert sql(params, "SELECT COUNT(*) FROM catalog_product") == ((10,),)
    row = sql(params, "SELECT stock, price FROM catalog_product WHERE slug = 'fluent-python'")
    assert row[0][0] == 8 and str(row[0][1]) == "54.00"


# -- shared HTTP checks for both servers --------------------------------------


def check_slow_requests_overlap(server: Server, slow: str, plain: str) -> set:
    """10 x SELECT SLEEP(0.5) at once finish in about 0.5 s; the server answers meanwhile."""
    with ThreadPoolExecutor(1) as background:
        slow_batch = background.submit(parallel, 10, http, "GET", server.base + slow + "?seconds=0.5")
        time.sleep(0.15)
        start = time.monotonic()
        status, _ = http("GET", server.base + plain)
        ping = time.monotonic() - start
        overlapped = not slow_batch.done()
        results, elapsed = slow_batch.result()
    assert status == 200
    assert ping < 0.3, f"{plain} took {ping:.2f} s while the slow queries ran"
    assert overlapped, f"{plain} was answered only after the slow queries"
    assert [s for s, _ in results] == [200] * 10, results
    assert all(body["slept"] == 0.5 and body["products"] == 10 for _, body in results), results
    assert 0.5 <= elapsed < 2.5, f"10 parallel SLEEP(0.5) took {elapsed:.2f} s: not concurrent"
    return {body["thread"] for _, body in results}


def check_concurrent_buys(server: Server, params: dict, slug: str, buy_path: str) -> None:
    """20 buyers, stock 5: exactly 5 succeed, 15 get 409, stock ends at 0."""
    pk = product_id(params, slug)
    sql(params, "UPDATE catalog_product SET stock = 5 WHERE id = %s", (pk,))
    results, _ = parallel(20, http, "POST", server.base + buy_path.format(pk))
    statuses = sorted(s for s, _ in results)
    assert statuses == [200] * 5 + [409] * 15, results
    assert sorted(body["stock"] for s, body in results if s == 200) == [0, 1, 2, 3, 4]
    assert all("out of stock" in body["error"] for s, body in results if s == 409)
    assert sql(params, "SELECT stock FROM catalog_product WHERE id = %s", (pk,)) == ((0,),)


# -- the Tornado example -----------------------------------------------------


def test_tornado_product_detail(tornado_app, shop):
    pk = product_id(shop["params"], "fluent-python")
    status, body = http("GET", f"{tornado_app.base}/products/{pk}")
    assert status == 200
    assert body == {
        "id": pk,
        "category": body["category"],
        "name": "Fluent Python",
        "slug": "fluent-python",
        "price": "54.00",
        "stock": 8,
    }
    assert http("GET", f"{tornado_app.base}/products/999999") == (404, {"error": "no product 999999"})


def test_tornado_product_list_and_async_handler(tornado_app):
    status, body = http("GET", f"{tornado_app.base}/products?category=coffee")
    assert status == 200
    slugs = [p["slug"] for p in body["products"]]
    assert slugs == ["colombia-huila", "espresso-blend", "ethiopia-yirgacheffe"]
    status, body = http("GET", f"{tornado_app.base}/categories")  # async def + greenpatch.spawn
    assert status == 200
    assert [c["slug"] for c in body["categories"]] == ["books", "coffee", "gadgets"]
    assert body["products"] == 10


def test_tornado_slow_requests_run_concurrently_in_one_thread(tornado_app):
    threads = check_slow_requests_overlap(tornado_app, "/slow", "/ping")
    assert len(threads) == 1, "every request ran in the one IOLoop thread"
    pools = pool_stats(tornado_app.base, "/stats")
    assert [p["name"] for p in pools] == ["default/green"]
    # Each handler's worker has ended, and with it the hold on its connection.
    assert pools[0]["in_use"] == 0 and pools[0]["waiting"] == 0 and pools[0]["size"] >= 1, pools
    workers = http("GET", f"{tornado_app.base}/stats")[1]["workers"]
    assert workers["started"] >= 10 and workers["running"] == 0, workers  # /stats is not green
    assert http("GET", f"{tornado_app.base}/slow?seconds=abc")[0] == 400


def test_tornado_buys_are_atomic(tornado_app, shop):
    check_concurrent_buys(tornado_app, shop["params"], "greenlet-mug", "/products/{}/buy")
    pools = pool_stats(tornado_app.base, "/stats")
    assert pools[0]["in_use"] == 0 and pools[0]["timeouts"] == 0, pools


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_tornado_app_stops_cleanly(shop, tmp_path, sig):
    port = free_port()
    args = [sys.executable, TORNADO_APP, "--port", str(port)]
    server = Server(args, shop["env"], tmp_path / "log", port, "/ping")
    try:
        assert http("GET", f"{server.base}/products")[0] == 200
    finally:
        code = server.stop(sig)
    log = server.log_path.read_text()
    assert code == 0, log
    assert f"tornado_app listening on http://127.0.0.1:{port}/" in log
    assert "shutting down" in log and "stopped" in log and "Traceback" not in log, log


# -- the Django project under runserver --------------------------------------
# Today: Django's threaded dev server (the runserver patch is switched off
# until greenpatch.server exists). Once it does, the same tests run against
# runserver on Tornado and additionally check one thread and green pools.


def test_runserver_views(runserver, shop):
    base = runserver.base
    status, body = http("GET", f"{base}/products/?category=books")
    assert status == 200 and len(body["products"]) == 3
    pk = body["products"][0]["id"]
    status, body = http("GET", f"{base}/products/{pk}/")
    assert status == 200 and body["id"] == pk and body["category_slug"] == "books"
    assert http("GET", f"{base}/products/999999/") == (404, {"error": "no product 999999"})
    assert http("GET", f"{base}/products/{pk}/buy/")[0] == 405
    assert http("GET", f"{base}/slow/?seconds=-1")[0] == 400
    status, _ = http("GET", f"{base}/admin/login/")
    assert status == 200, runserver.log()  # the admin is wired up (its tables exist)
    # Static files from django.contrib.staticfiles (DEBUG on), served by runserver's handler.
    with urllib.request.urlopen(f"{base}/static/admin/css/base.css", timeout=10) as resp:
        assert resp.status == 200 and b"{" in resp.read()


def test_runserver_slow_requests_overlap(runserver):
    threads = check_slow_requests_overlap(runserver, "/slow/", "/plain/")
    assert len(threads) == 1, "runserver on Tornado: every request in the one IOLoop thread"
    # The server answers before the worker's close() returns the connection
    # (request_finished): allow a moment.
    deadline = time.monotonic() + 5
    while True:
        pools = [p for p in pool_stats(runserver.base, "/stats/") if p["name"] == "default/green"]
        if (pools and pools[0]["in_use"] == 0) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert pools and pools[0]["in_use"] == 0 and pools[0]["waiting"] == 0, pools
    workers = http("GET", f"{runserver.base}/stats/")[1]["workers"]
    assert workers["started"] >= 11 and workers["running"] == 1, workers  # 1: this /stats/ request


def test_runserver_buys_are_atomic(runserver, shop):
    check_concurrent_buys(runserver, shop["params"], "headphones", "/products/{}/buy/")
