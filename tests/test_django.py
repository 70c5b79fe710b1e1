"""Django's ORM on greenlets: greenlet-local connections and the MySQL pool."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pymysql
import pytest
from conftest import db_params, run_green, run_loop

import greenpatch
from greenpatch.socket import GreenSocket


@pytest.fixture(scope="module", autouse=True)
def django_patched():
    greenpatch.patch_all()
    from django_support import setup_django

    setup_django()
    yield
    greenpatch.unpatch_all()


@pytest.fixture
def pool_options():
    """Set OPTIONS['pool'] for one test (pools rebuilt before and after)."""
    from django.db import connections

    from greenpatch.django import pooling

    options = connections.settings["default"]["OPTIONS"]
    saved = dict(options)

    def set_options(**pool):
        pooling.close_pools()
        options["pool"] = dict(saved.get("pool", {}), **pool)

    yield set_options
    _close_main_connection()
    pooling.close_pools()
    options.clear()
    options.update(saved)


def _close_main_connection():
    from django.db import connection

    connection.close()


def green_pool():
    from greenpatch.pool import all_pools

    pools = [p for p in all_pools() if p.name == "default/green" and not p._closed]
    assert len(pools) == 1, pools
    return pools[0]


def server_connections(admin) -> int:
    """Server-side count of connections using the Django test database."""
    from django.db import connections

    with admin.cursor() as cur:
        cur.execute(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB = %s",
            (connections.settings["default"]["NAME"],),
        )
        return int(cur.fetchone()[0])


def gather(fn, n, *args):
    async def main():
        return await asyncio.gather(*(greenpatch.spawn(fn, *args) for _ in range(n)), return_exceptions=True)

    return run_loop(main)


# -- connections are greenlet-local ----------------------------------------


def test_each_worker_has_its_own_connection_and_returns_it():
    from django.db import connection, connections

    def fn():
        connection.ensure_connection()
        raw = connection.connection
        greenpatch.sleep(0.05)
        assert connection.connection is raw
        return id(connections["default"]), raw.thread_id(), type(raw._sock)

    results = gather(fn, 4)
    assert len({r[0] for r in results}) == 4, "wrappers shared between workers"
    assert len({r[1] for r in results}) == 4, "server connections shared between workers"
    assert all(r[2] is GreenSocket for r in results)
    pool = green_pool()
    stats = pool.stats()
    assert stats["in_use"] == 0 and stats["idle"] == 4
    assert [s for s in greenpatch.stats() if s["name"] == "default/green"] == [stats]


def test_connection_returned_when_worker_fails():
    from django.db import connection

    def fails():
        connection.ensure_connection()
        raise ValueError("view failed")

    with pytest.raises(ValueError):
        run_green(fails)
    assert green_pool().stats()["in_use"] == 0


def test_clean_wrappers_are_reused_by_later_workers_and_dirty_ones_are_not():
    from django.db import connection, connections, transaction

    from greenpatch.patches import django_db

    def query():
        with connection.cursor() as cur:
            cur.execute("SELECT 1")
        return connections["default"]

    def leaves_an_execute_wrapper():
        wrapper = connections["default"]
        wrapper.execute_wrappers.append(lambda execute, *args: execute(*args))
        query()
        return wrapper

    def leaves_atomic_open():
        transaction.atomic().__enter__()  # never exited
        query()
        return connections["default"]

    django_db._spares.clear()
    first = run_green(query)
    assert run_green(query) is first, "a clean wrapper is reused"
    assert first.connection is None and not first.queries_log

    def query_and_hold():
        wrapper = query()
        greenpatch.sleep(0.05)  # all three overlap
        return wrapper

    # Concurrent workers each get their own, clean, wrapper.
    many = gather(query_and_hold, 3)
    assert len({id(w) for w in many}) == 3
    assert first in many

    dirty = run_green(leaves_an_execute_wrapper)
    assert run_green(query) is not dirty, "a wrapper with an execute_wrapper left is not reused"
    assert dirty not in django_db._spares["default"]

    from django.test import override_settings

    def cached_zone():
        return connections["default"].timezone_name  # a cached_property of the wrapper

    assert run_green(cached_zone) == "UTC"
    assert django_db._spares["default"]
    with override_settings(USE_TZ=False, TIME_ZONE="Asia/Tokyo"):
        assert not django_db._spares.get("default"), "spares are dropped when a setting changes"
        assert run_green(cached_zone) == "Asia/Tokyo"

    stale = run_green(leaves_atomic_open)
    assert stale.in_atomic_block
    assert stale not in django_db._spares.get("default", []), "a wrapper left inside atomic() is dropped"
    assert run_green(query) is not stale
    assert green_pool().stats()["in_use"] == 0


def test_transactions_never_mix_under_concurrency():
    """200 workers, pool max 5: exact totals, no dirty reads, cap respected."""
    from django.db import transaction
    from djangoapp.models import Counter

    Counter.objects.update_or_create(name="shared", defaults={"value": 0})
    admin = pymysql.connect(**db_params())
    baseline = server_connections(admin)
    samples = []
    dirty = []
    committed = []
    stop = threading.Event()

    def sampler():
        conn = pymysql.connect(**db_params())
        while not stop.is_set():
            samples.append(server_connections(conn))
            time.sleep(0.005)
        conn.close()

    def worker(n):
        rollback = n % 2 == 1
        try:
            with transaction.atomic():
                c = Counter.objects.select_for_update().get(name="shared")
                c.value += 1
                c.save()
                Counter.objects.create(name=f"w{n}", value=n)
                greenpatch.sleep(random.random() * 0.002)
                # Nobody else's uncommitted private row is visible here.
                others = Counter.objects.filter(name__startswith="w").exclude(name=f"w{n}")
                dirty.extend(o.name for o in others if int(o.name[1:]) % 2 == 1)
                if rollback:
                    raise RuntimeError("roll back")
        except RuntimeError:
            return
        committed.append(n)

    async def main():
        return await asyncio.gather(*(greenpatch.spawn(worker, n) for n in range(200)))

    t = threading.Thread(target=sampler)
    t.start()
    try:
        run_loop(main, timeout=120)
    finally:
        stop.set()
        t.join()
    assert Counter.objects.get(name="shared").value == 100
    assert sorted(Counter.objects.filter(name__startswith="w").values_list("value", flat=True)) == sorted(
        committed
    )
    assert len(committed) == 100
    assert dirty == []
    assert samples and max(samples) <= baseline + 5, (baseline, max(samples))
    stats = green_pool().stats()
    assert stats["size"] <= 5 and stats["in_use"] == 0 and stats["waiting"] == 0
    admin.close()
    Counter.objects.filter(name__startswith="w").delete()


# -- async safety is scoped to workers --------------------------------------


def test_orm_in_worker_but_not_in_a_coroutine():
    from django.core.exceptions import SynchronousOnlyOperation
    from djangoapp.models import Counter

    async def main():
        with pytest.raises(SynchronousOnlyOperation):
            Counter.objects.count()
        return await greenpatch.spawn(Counter.objects.count)

    assert isinstance(run_loop(main), int)


# -- one round trip per query ------------------------------------------------


def _session_questions() -> int:
    """Statements the server counted on the (single) pooled connection."""
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute("SHOW SESSION STATUS LIKE 'Questions'")
        return int(cur.fetchone()[1])


def _statements_per_request(view, requests=20) -> float:
    run_green(view)  # warm: connect and session setup happen once here
    before = run_green(_session_questions)
    for _ in range(requests):
        run_green(view)
    after = run_green(_session_questions)
    # The counter includes the SHOW STATUS that read it: one of them.
    return (after - before - 1) / requests


def test_a_view_doing_one_query_costs_one_statement(pool_options):
    """Counted server-side on the pooled connection: no version probe, no SET per request."""
    from djangoapp.models import Counter

    pool_options(check="never", max_size=1)
    Counter.objects.update_or_create(name="rt", defaults={"value": 1})
    assert _statements_per_request(lambda: Counter.objects.get(name="rt").value) == 1
    assert green_pool().stats()["connects"] == 1


def test_checkout_check_is_a_ping_not_a_statement(pool_options):
    from djangoapp.models import Counter

    pool_options(check="always", max_size=1)
    assert _statements_per_request(Counter.objects.count, 10) == 1
    stats = green_pool().stats()
    assert stats["checkouts"] == 13 and stats["connects"] == 1


# -- faults and dirty state --------------------------------------------------


def test_killed_pooled_connection_is_not_handed_out(pool_options):
    from djangoapp.models import Counter

    pool_options(check="always")

    victim = run_green(_thread_id)
    admin = pymysql.connect(**db_params())
    with admin.cursor() as cur:
        cur.execute("KILL %s", (victim,))
    admin.close()
    time.sleep(0.05)
    assert isinstance(run_green(Counter.objects.count), int)
    stats = green_pool().stats()
    assert stats["discards"].get("check_failed") == 1, stats


def _thread_id():
    from django.db import connection

    connection.ensure_connection()
    return connection.connection.thread_id()


def test_killed_while_idle_is_caught_by_the_idle_check(pool_options):
    from djangoapp.models import Counter

    pool_options(check="auto", max_size=1)
    victim = run_green(_thread_id)
    green_pool().check_idle = 0.05  # "auto" pings connections idle this long
    admin = pymysql.connect(**db_params())
    with admin.cursor() as cur:
        cur.execute("KILL %s", (victim,))
    admin.close()
    time.sleep(0.1)
    assert isinstance(run_green(Counter.objects.count), int)
    assert run_green(_thread_id) != victim
    assert green_pool().stats()["discards"].get("check_failed") == 1


def test_open_transaction_is_rolled_back_before_reuse(pool_options):
    from django.db import connection, transaction
    from djangoapp.models import Counter

    pool_options(max_size=1)
    Counter.objects.filter(name="leak").delete()

    def leaves_transaction_open():
        transaction.set_autocommit(False)
        Counter.objects.create(name="leak", value=1)
        return connection.connection.thread_id()

    def next_holder():
        connection.ensure_connection()
        raw = connection.connection
        return raw.thread_id(), bool(raw.server_status & 1), Counter.objects.filter(name="leak").exists()

    first = run_green(leaves_transaction_open)
    second, in_trans, exists = run_green(next_holder)
    assert not in_trans and not exists
    # Django noticed autocommit was left off and the pool discarded or rolled back.
    assert first == second or green_pool().stats()["discards"]


@pytest.mark.parametrize("reset", ["rollback", "full"])
def test_session_state_does_not_leak(pool_options, reset):
    from django.db import ProgrammingError, connection

    pool_options(reset=reset, max_size=1)

    def dirty():
        with connection.cursor() as cur:
            cur.execute("SET @secret = 42")
            cur.execute("SET foreign_key_checks = 0")
            cur.execute("CREATE TEMPORARY TABLE gp_tmp (x INT)")
        return connection.connection.thread_id()

    def inspect():
        with connection.cursor() as cur:
            cur.execute(
                "SHOW SESSION VARIABLES WHERE Variable_name IN ('tx_isolation', 'transaction_isolation')"
            )
            isolation = cur.fetchone()[1]
            cur.execute("SELECT @secret, @@foreign_key_checks, @@autocommit")
            row = (*cur.fetchone(), isolation)
            try:
                cur.execute("SELECT COUNT(*) FROM gp_tmp")
                tmp = 1
            except ProgrammingError:  # 1146: the temporary table is gone
                tmp = 0
        return connection.connection.thread_id(), row, tmp

    first = run_green(dirty)
    second, (secret, fk, autocommit, isolation), tmp = run_green(inspect)
    assert second == first, "max_size=1: the same connection is reused"
    if reset == "full":
        assert (secret, fk, tmp) == (None, 1, 0)
        # Django's session setup ran again after the server reset it.
        assert isolation == "READ-COMMITTED" and autocommit == 1
    else:
        # A light reset cannot undo these: documented; "full" is the cure.
        assert (secret, fk, tmp) == (42, 0, 1)


def test_worker_killed_mid_query_discards_its_connection():
    from django.db import connection

    def slow():
        with connection.cursor() as cur:
            cur.execute("SELECT SLEEP(3)")

    async def main():
        fut = greenpatch.spawn(slow)
        await asyncio.sleep(0.3)
        fut.cancel()
        # The pool waits CANCEL_GRACE (0.1 s) for the reply, to recover the
        # connection; SLEEP(3) does not answer in time: it is discarded.
        while pool.stats()["in_use"] and time.monotonic() - t0 < 2:
            await asyncio.sleep(0.01)

    run_green(_thread_id)
    pool = green_pool()
    before = pool.stats()
    t0 = time.monotonic()
    run_loop(main)
    assert time.monotonic() - t0 < 1
    after = pool.stats()
    assert after["in_use"] == 0
    assert after["recoveries"] == before["recoveries"]
    assert sum(after["discards"].values()) == sum(before["discards"].values()) + 1
    assert after["size"] == before["size"] or after["size"] == before["size"] - 1 + (
        after["connects"] - before["connects"]
    )


def test_pool_timeout_is_a_django_operational_error(pool_options):
    from django.db import OperationalError, connection

    pool_options(max_size=1, timeout=0.2)
    errors = []

    def holder():
        connection.ensure_connection()
        greenpatch.sleep(0.6)

    def waiter():
        greenpatch.sleep(0.05)
        try:
            connection.ensure_connection()
        except OperationalError as exc:
            errors.append(str(exc))

    async def main():
        await asyncio.gather(greenpatch.spawn(holder), greenpatch.spawn(waiter))

    run_loop(main)
    assert len(errors) == 1
    assert "default/green" in errors[0] and "1/1" in errors[0], errors[0]


def test_bad_pool_options_are_clear_errors(pool_options):
    from django.core.exceptions import ImproperlyConfigured
    from djangoapp.models import Counter

    for bad, match in (
        ({"max_size": -1}, r"\['pool'\].*max_size=-1"),
        ({"reset": "partial"}, r"reset='partial' is not accepted; use 'rollback', 'full' or 'none'"),
        ({"maxsize": 3}, r"unknown option\(s\) maxsize; accepted: min_size, max_size"),
    ):
        pool_options(**bad)
        with pytest.raises(ImproperlyConfigured, match=match):
            run_green(Counter.objects.count)


def test_pool_false_disables_pooling(pool_options):
    from django.db import connection

    from greenpatch.pool import all_pools

    pool_options()
    from django.db import connections

    connections.settings["default"]["OPTIONS"]["pool"] = False

    def fn():
        connection.ensure_connection()
        return getattr(connection.connection, "_greenpatch_pool", None)

    assert run_green(fn) is None
    assert not [p for p in all_pools() if p.name.startswith("default/") and not p._closed]


def test_connection_params_are_built_once_per_alias_until_its_settings_change(pool_options):
    from django.db import connections

    from greenpatch.django import pooling
    from greenpatch.patches import django_db

    pool_options()
    django_db._spares.clear()  # the first worker builds a wrapper and leaves it as the only spare

    def fn():
        conn = connections["default"]
        seen = []
        for change in (False, False, True):
            if change:  # in place, as the test runner renames NAME
                conn.settings_dict["OPTIONS"]["read_timeout"] = 30
            conn.ensure_connection()
            seen.append((pooling._params[type(conn), "default"], conn.connection._greenpatch_pool))
            conn.close()
        params = conn.get_connection_params()
        return seen, params, params is conn.get_connection_params()

    (first, second, third), params, same_dict = run_green(fn)
    assert first[0] is second[0] and first[1] is second[1]  # cached: same params, same pool
    assert third[0] is not second[0] and third[1] is not second[1]  # settings changed: rebuilt
    assert params["read_timeout"] == 30 and not same_dict  # callers get their own copy

    def new_or_spare_wrapper():
        conn = connections["default"]
        new = "isolation_level" not in conn.__dict__
        greenpatch.sleep(0.01)  # both workers hold a wrapper at once
        conn.ensure_connection()
        conn.close()
        return new, conn.__dict__["_greenpatch_params"], conn.isolation_level

    results = gather(new_or_spare_wrapper, 2)
    assert sorted(new for new, _, _ in results) == [False, True]  # one spare, one new wrapper
    for _, entry, level in results:  # the new one shares the entry but ran Django's method
        assert entry is third[0] and level == "read committed"


def test_blocking_callers_use_their_own_pool_and_never_get_green_connections():
    from django.db import connection

    connection.ensure_connection()
    assert not isinstance(connection.connection._sock, GreenSocket)
    connection.close()
    out = []

    def in_thread():
        from django.db import connection as c

        c.ensure_connection()
        out.append(type(c.connection._sock))
        c.close()

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    assert out and out[0] is not GreenSocket


# -- async_to_sync inside workers ------------------------------------------


def test_async_to_sync_inside_a_worker_runs_on_the_loop():
    from asgiref.sync import async_to_sync

    async def double(x):
        await asyncio.sleep(0.01)
        return 2 * x, asyncio.get_running_loop()

    def fn():
        return async_to_sync(double)(21)

    async def main():
        return await greenpatch.spawn(fn), asyncio.get_running_loop()

    (value, coro_loop), loop = run_loop(main)
    assert value == 42
    assert coro_loop is loop  # ran on the worker's own loop, not a new one
    # Outside workers asgiref behaves as stock (a plain thread with no loop).
    assert async_to_sync(double)(1)[0] == 2


def test_async_middleware_under_wsgi_in_a_worker():
    from django.core.handlers.wsgi import WSGIHandler
    from django.test import override_settings

    with override_settings(ROOT_URLCONF="djangoapp.urls", MIDDLEWARE=["djangoapp.middleware.async_header"]):
        handler = WSGIHandler()
        environ = {
            "REQUEST_METHOD": "GET",
            "PATH_INFO": "/count/",
            "SERVER_NAME": "testserver",
            "SERVER_PORT": "80",
            "wsgi.input": __import__("io").BytesIO(b""),
            "wsgi.url_scheme": "http",
        }
        statuses = []

        def start_response(status, headers):
            statuses.append((status, dict(headers)))

        def request():
            return b"".join(handler(environ, start_response))

        bodies = gather(request, 3)
    assert all(isinstance(b, bytes) and b.startswith(b'{"count"') for b in bodies), bodies
    assert [s[0] for s in statuses] == ["200 OK"] * 3
    assert all(s[1]["X-Async"] == "yes" for s in statuses)
