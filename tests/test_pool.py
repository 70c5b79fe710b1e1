"""greenpatch.pool against the real server, with real PyMySQL connections."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import re
import socket
import sys
import threading
import time

import pymysql
import pytest
from conftest import park_on_a_closed_loop, run_green, run_loop
from tornado.ioloop import IOLoop, PeriodicCallback

import greenpatch
from greenpatch import hub
from greenpatch.pool import (
    ConnectionOps,
    Pool,
    PoolClosed,
    PoolError,
    PoolTimeout,
    PoolTooManyWaiting,
    PyMySQLOps,
    all_pools,
)

# -- helpers -----------------------------------------------------------------------


@pytest.fixture
def pools():
    """Make pools with ``pools(params, **options)``; all are closed afterwards."""
    made: list[Pool] = []

    def make(params: dict, **options) -> Pool:
        options.setdefault("name", "test")
        pool = Pool(lambda: pymysql.connect(**params), **options)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        pool.close()


def scalar(conn, sql: str, args=None):
    with conn.cursor() as cur:
        cur.execute(sql, args)
        row = cur.fetchone()
    return None if row is None else row[0]


def scalar_from(pool, sql: str):
    """Check a connection out of ``pool``, run ``sql`` on it, check it back in."""
    conn = pool.checkout()
    try:
        return scalar(conn, sql)
    finally:
        pool.checkin(conn)


async def until(predicate, timeout: float = 5.0) -> None:
    """Let the loop run until ``predicate()`` is true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.002)


def wait_until(predicate, timeout: float = 5.0) -> None:
    """Block the thread until ``predicate()`` is true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.002)


def server_count(admin, database: str) -> int:
    """Server sessions currently connected to ``database``."""
    return scalar(admin, "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB = %s", (database,))


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- size cap ------------------------------------------------------------------------


def test_cap_never_exceeded_with_50_workers(scratch_db, db, patched):
    database = scratch_db["database"]
    connecting_now = 0
    peak_connecting = 0

    def connect():
        nonlocal connecting_now, peak_connecting
        connecting_now += 1
        peak_connecting = max(peak_connecting, connecting_now)
        try:
            # Yield between the pool's size check and the connection's
            # existence: a pool that does not reserve its slot overshoots.
            greenpatch.sleep(0.01)
            return pymysql.connect(**scratch_db)
        finally:
            connecting_now -= 1

    pool = Pool(connect, name="cap", max_size=5, timeout=20)
    holders = 0
    peak_holders = 0
    peak_pool = 0

    def job(i):
        nonlocal holders, peak_holders
        conn = pool.checkout()
        holders += 1
        peak_holders = max(peak_holders, holders)
        try:
            assert scalar(conn, "SELECT SLEEP(0.02) + %s", (i,)) == i
        finally:
            holders -= 1
            pool.checkin(conn)
        return i

    # The server's view, sampled from another thread and connection.
    server_samples: list[int] = []
    threads_connected: list[int] = []
    stop = threading.Event()

    def sample_server():
        admin = pymysql.connect(**db)
        try:
            while not stop.is_set():
                server_samples.append(server_count(admin, database))
                with admin.cursor() as cur:
                    cur.execute("SHOW STATUS LIKE 'Threads_connected'")
                    threads_connected.append(int(cur.fetchone()[1]))
                time.sleep(0.003)
        finally:
            admin.close()

    def sample_pool():
        nonlocal peak_pool
        s = pool.stats()
        peak_pool = max(peak_pool, s["size"] + s["connecting"])
        assert s["size"] + s["connecting"] <= 5

    async def main():
        sampler = PeriodicCallback(sample_pool, 2)
        sampler.start()
        results = await asyncio.gather(*(greenpatch.spawn(job, i) for i in range(50)))
        sampler.stop()
        after = pool.stats()
        pool.close()
        return results, after

    thread = threading.Thread(target=sample_server)
    thread.start()
    try:
        results, after = run_loop(main)
    finally:
        stop.set()
        thread.join()

    assert results == list(range(50))
    assert peak_holders == 5
    assert peak_connecting <= 5
    assert peak_pool == 5
    assert server_samples and max(server_samples) <= 5
    # Threads_connected counts every client of the server (other test runs
    # included), so it is recorded for the failure message only.
    assert max(server_samples) >= 1, (server_samples, threads_connected)
    assert after["connects"] == 5
    assert after["checkouts"] == after["checkins"] == 50
    assert (after["size"], after["idle"], after["in_use"]) == (5, 5, 0)
    assert (after["connecting"], after["waiting"], after["timeouts"]) == (0, 0, 0)
    assert after["wait"]["count"] == 45 and after["wait"]["max"] > 0
    # Closed: back to zero on both sides.
    assert pool.stats()["size"] == 0
    admin = pymysql.connect(**db)
    try:
        wait_until(lambda: server_count(admin, database) == 0)
    finally:
        admin.close()


# -- waiting ---------------------------------------------------------------------------


def test_greenlet_waiters_are_served_in_arrival_order(db, patched, pools):
    pool = pools(db, max_size=1, timeout=10)
    order = []
    ticks = []

    def holder():
        conn = pool.checkout()
        greenpatch.sleep(0.15)
        pool.checkin(conn)

    def waiter(i):
        conn = pool.checkout()
        order.append(i)
        try:
            assert scalar(conn, "SELECT %s", (i,)) == i
            greenpatch.sleep(0.002)
        finally:
            pool.checkin(conn)

    async def main():
        first = greenpatch.spawn(holder)
        await until(lambda: pool.stats()["in_use"] == 1)
        # Each spawn runs the worker up to its first wait: it queues now.
        futures = [greenpatch.spawn(waiter, i) for i in range(10)]
        assert pool.stats()["waiting"] == 10
        ticker = PeriodicCallback(lambda: ticks.append(1), 10)
        ticker.start()
        await asyncio.gather(first, *futures)
        ticker.stop()

    run_loop(main)
    assert order == list(range(10))
    assert len(ticks) >= 5  # the loop ran while workers waited
    s = pool.stats()
    assert s["connects"] == 1 and s["waiting"] == 0 and s["in_use"] == 0


def test_checkin_from_another_thread_wakes_a_worker(db, patched, pools):
    pool = pools(db, max_size=1, timeout=10)
    conn = pool.checkout()  # this thread holds the only connection

    def waiter():
        return scalar_from(pool, "SELECT 9")

    async def main():
        future = greenpatch.spawn(waiter)
        await until(lambda: pool.stats()["waiting"] == 1)
        threading.Thread(target=pool.checkin, args=(conn,)).start()
        return await future

    # (Django keeps blocking and green connections in separate pools; this
    # one is shared on purpose: what is tested is the grant across threads.)
    assert run_loop(main) == 9


def test_timeouts_only_hit_waiters_beyond_their_timeout(db, patched, pools):
    pool = pools(db, name="tq", max_size=2, timeout=10)
    served = []

    def holder():
        conn = pool.checkout()
        greenpatch.sleep(0.5)
        pool.checkin(conn)

    def waiter(name, timeout):
        t0 = time.monotonic()
        try:
            conn = pool.checkout(timeout=timeout)
        except PoolTimeout as exc:
            return name, exc, time.monotonic() - t0
        served.append((name, conn.thread_id()))
        pool.checkin(conn)
        return name, None, time.monotonic() - t0

    async def main():
        holding = [greenpatch.spawn(holder) for _ in range(2)]
        await until(lambda: pool.stats()["in_use"] == 2)
        plan = [("B1", 0.2), ("A1", 2.0), ("B2", 0.2), ("A2", 2.0), ("B3", 0.2)]
        waiting = [greenpatch.spawn(waiter, name, t) for name, t in plan]
        assert pool.stats()["waiting"] == 5
        await asyncio.sleep(0.3)
        mid = pool.stats()
        results = await asyncio.gather(*waiting)
        await asyncio.gather(*holding)
        return mid, results

    mid, results = run_loop(main)
    # The three short waiters gave up and left the queue; the others stayed.
    assert mid["waiting"] == 2 and mid["timeouts"] == 3
    outcome = {name: (exc, took) for name, exc, took in results}
    for name in ("B1", "B2", "B3"):
        exc, took = outcome[name]
        assert isinstance(exc, PoolTimeout), name
        assert 0.19 <= took < 0.45, (name, took)
    assert str(outcome["B1"][0]) == "pool 'tq' timed out after 0.2 s: 2/2 connections in use, 5 waiting"
    assert re.fullmatch(
        r"pool 'tq' timed out after 0\.2 s: 2/2 connections in use, \d waiting", str(outcome["B3"][0])
    )
    for name in ("A1", "A2"):
        exc, took = outcome[name]
        assert exc is None and 0.45 <= took < 1.5, (name, took)
    assert [name for name, _ in served] == ["A1", "A2"]
    s = pool.stats()
    # No connection went to a waiter that had given up: all are back.
    assert s["connects"] == 2 and s["checkouts"] == s["checkins"] == 4
    assert (s["size"], s["idle"], s["in_use"], s["waiting"], s["connecting"]) == (2, 2, 0, 0, 0)
    assert s["wait"]["count"] == 2


def test_stats_report_how_long_connections_are_held(db, patched, pools):
    pool = pools(db, name="held", max_size=2, timeout=10)

    def hold(seconds, discard):
        conn = pool.checkout()
        greenpatch.sleep(seconds)
        if discard:
            pool.discard(conn, "error")
        else:
            pool.checkin(conn)

    async def main():
        await asyncio.gather(greenpatch.spawn(hold, 0.05, False), greenpatch.spawn(hold, 0.15, True))

    assert pool.stats()["held"] == {"count": 0, "mean": 0.0, "max": 0.0}
    run_loop(main)
    held = pool.stats()["held"]
    assert held["count"] == 2  # a discarded connection was held too
    assert 0.15 <= held["max"] < 0.5, held
    assert 0.1 <= held["mean"] < held["max"], held  # (0.05 + 0.15) / 2
    conn = pool.checkout()  # still held: not counted
    assert pool.stats()["held"]["count"] == 2
    pool.checkin(conn)
    assert pool.stats()["held"]["count"] == 3


def test_max_waiting_fails_fast(db, patched, pools):
    pool = pools(db, name="mw", max_size=1, max_waiting=2, timeout=10)

    def holder():
        conn = pool.checkout()
        greenpatch.sleep(0.2)
        pool.checkin(conn)

    def waiter():
        conn = pool.checkout()
        pool.checkin(conn)
        return "served"

    def one_too_many():
        t0 = time.monotonic()
        try:
            pool.checkout()
        except PoolTooManyWaiting as exc:
            return exc, time.monotonic() - t0
        raise AssertionError("checkout should have failed")

    async def main():
        first = greenpatch.spawn(holder)
        await until(lambda: pool.stats()["in_use"] == 1)
        waiting = [greenpatch.spawn(waiter) for _ in range(2)]
        exc, took = await greenpatch.spawn(one_too_many)
        return exc, took, await asyncio.gather(*waiting), await first

    exc, took, served, _ = run_loop(main)
    assert isinstance(exc, PoolTimeout)
    # Django's error wrapper turns it into django.db.OperationalError
    # (greenpatch.django.pooling relies on this).
    assert isinstance(exc, pymysql.err.OperationalError)
    assert took < 0.05
    assert str(exc) == "pool 'mw' has too many waiting: 1/1 connections in use, 2 waiting (max_waiting=2)"
    assert served == ["served", "served"]
    s = pool.stats()
    assert s["timeouts"] == 1 and s["waiting"] == 0 and s["in_use"] == 0


def test_thread_waiters_in_order_and_timeout(db, pools):
    pool = pools(db, max_size=1, timeout=10)
    holder = pool.checkout()
    order = []
    errors = []

    def waiter(i):
        try:
            conn = pool.checkout()
            order.append(i)
            assert scalar(conn, "SELECT %s", (i,)) == i
            time.sleep(0.005)
            pool.checkin(conn)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = []
    for i in range(6):
        t = threading.Thread(target=waiter, args=(i,))
        t.start()
        threads.append(t)
        wait_until(lambda n=i + 1: pool.stats()["waiting"] == n)
    t0 = time.monotonic()
    with pytest.raises(PoolTimeout, match=r"timed out after 0\.1 s: 1/1 connections in use, 7 waiting"):
        pool.checkout(timeout=0.1)
    assert time.monotonic() - t0 >= 0.1
    assert pool.stats()["waiting"] == 6
    pool.checkin(holder)
    for t in threads:
        t.join(10)
    assert not errors
    assert order == list(range(6))
    s = pool.stats()
    assert (s["size"], s["in_use"], s["waiting"], s["timeouts"]) == (1, 0, 0, 1)


def test_thread_and_greenlet_waiters_share_one_fifo_queue(db, patched, pools):
    pool = pools(db, max_size=1, timeout=10)
    order = []
    errors = []
    release = None

    def holder():
        conn = pool.checkout()
        hub.wait(release)
        pool.checkin(conn)

    def green_waiter(i):
        conn = pool.checkout()
        order.append(("green", i))
        assert scalar(conn, "SELECT %s", (i,)) == i
        greenpatch.sleep(0.003)
        pool.checkin(conn)

    def thread_waiter(i):
        try:
            conn = pool.checkout()
            order.append(("thread", i))
            assert scalar(conn, "SELECT %s", (i,)) == i
            time.sleep(0.003)
            pool.checkin(conn)  # wakes a greenlet from this thread when it is next
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    async def main():
        nonlocal release
        release = asyncio.get_running_loop().create_future()
        first = greenpatch.spawn(holder)
        await until(lambda: pool.stats()["in_use"] == 1)
        futures, threads = [], []
        for i in range(8):
            if i % 2:
                t = threading.Thread(target=thread_waiter, args=(i,))
                t.start()
                threads.append(t)
            else:
                futures.append(greenpatch.spawn(green_waiter, i))
            await until(lambda n=i + 1: pool.stats()["waiting"] == n)
        release.set_result(None)
        await asyncio.gather(first, *futures)
        await until(lambda: not any(t.is_alive() for t in threads))

    run_loop(main)
    assert not errors
    assert order == [("thread" if i % 2 else "green", i) for i in range(8)]
    s = pool.stats()
    assert s["connects"] == 1 and s["in_use"] == 0 and s["waiting"] == 0


def test_threads_and_workers_hammering_one_pool(db, patched, pools):
    pool = pools(db, max_size=3, timeout=20)
    holders: dict[int, str] = {}
    guard = threading.Lock()
    errors = []
    peak = 0

    def use(who):
        nonlocal peak
        conn = pool.checkout()
        with guard:
            if id(conn) in holders:
                errors.append(f"{who} got a connection held by {holders[id(conn)]}")
            holders[id(conn)] = who
            peak = max(peak, len(holders))
        try:
            assert scalar(conn, "SELECT %s", (who,)) == who
        finally:
            with guard:
                del holders[id(conn)]
            pool.checkin(conn)

    def thread_main(n):
        try:
            for i in range(25):
                use(f"t{n}.{i}")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def worker_main(n):
        for i in range(15):
            use(f"w{n}.{i}")
            if i % 3 == 0:
                greenpatch.sleep(0)

    async def main():
        threads = [threading.Thread(target=thread_main, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        await asyncio.gather(*(greenpatch.spawn(worker_main, n) for n in range(12)))
        await until(lambda: not any(t.is_alive() for t in threads), timeout=20)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        run_loop(main)
    finally:
        sys.setswitchinterval(interval)
    assert not errors
    assert peak <= 3
    s = pool.stats()
    assert s["checkouts"] == s["checkins"] == 6 * 25 + 12 * 15
    assert (s["in_use"], s["waiting"], s["connecting"]) == (0, 0, 0)
    assert s["size"] <= 3 and s["connects"] == s["size"]


def test_pool_state_stays_consistent_under_thread_contention():
    # Pool logic only (plain objects for connections): many threads, tiny
    # GIL switch interval, so unguarded state would show.
    pool = Pool(object, ops=ConnectionOps(), name="contention", max_size=4, timeout=20, reset="none")
    holders: set[int] = set()
    guard = threading.Lock()
    errors = []

    def hammer():
        try:
            for _ in range(800):
                conn = pool.checkout()
                with guard:
                    if id(conn) in holders:
                        errors.append("connection handed to two holders")
                    holders.add(id(conn))
                with guard:
                    holders.discard(id(conn))
                pool.checkin(conn)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=hammer) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        sys.setswitchinterval(interval)
    assert not errors
    s = pool.stats()
    assert s["checkouts"] == s["checkins"] == 8 * 800
    assert (s["in_use"], s["waiting"], s["connecting"]) == (0, 0, 0)
    assert s["size"] == s["connects"] <= 4


def test_killed_waiters_leave_the_queue(db, patched, pools):
    pool = pools(db, max_size=1, timeout=10)
    got = []
    workers = {}

    def holder():
        conn = pool.checkout()
        greenpatch.sleep(0.1)
        pool.checkin(conn)

    def waiter(i):
        workers[i] = hub.current_worker()
        conn = pool.checkout()
        got.append(i)
        pool.checkin(conn)

    async def main():
        first = greenpatch.spawn(holder)
        await until(lambda: pool.stats()["in_use"] == 1)
        f0, f1, f2 = (greenpatch.spawn(waiter, i) for i in range(3))
        assert pool.stats()["waiting"] == 3
        f0.cancel()  # cancelling the spawn future kills the worker
        workers[1].kill()
        await until(lambda: pool.stats()["waiting"] == 1)
        await asyncio.gather(first, f2)
        return f0, f1

    f0, f1 = run_loop(main)
    assert f0.cancelled() and f1.cancelled()
    assert got == [2]
    s = pool.stats()
    assert (s["in_use"], s["waiting"], s["connecting"], s["size"]) == (0, 0, 0, 1)


def test_a_waiter_whose_loop_was_closed_does_not_swallow_the_connection(db, patched, pools):
    pool = pools(db, max_size=1, timeout=10)
    conn = pool.checkout()  # this thread holds the only connection

    async def main():
        greenpatch.spawn(pool.checkout)  # queued, and still queued when its loop is closed
        await until(lambda: pool.stats()["waiting"] == 1)

    run_loop(main)
    pool.checkin(conn)  # first in line is that waiter: it can never run
    s = pool.stats()
    assert (s["size"], s["idle"], s["in_use"], s["waiting"]) == (1, 1, 0, 0)
    again = pool.checkout(timeout=1)
    assert again is conn
    pool.checkin(again)


def test_a_waiting_worker_resumes_on_the_next_loop_iteration_after_checkin(db, patched, pools):
    # The connection serves nobody until its new holder runs: the handoff
    # must not cost more than the one iteration that resumes the worker.
    pool = pools(db, max_size=1, timeout=10)
    order = []

    def waiter():
        conn = pool.checkout()
        order.append("waiter resumed")
        pool.checkin(conn)

    def holder(started):
        conn = pool.checkout()
        started.set_result(None)
        while not pool.stats()["waiting"]:
            greenpatch.sleep(0.001)
        pool.checkin(conn)  # granted to the waiter...
        # ...which runs before anything scheduled after the checkin:
        IOLoop.current().add_callback(order.append, "next iteration")

    async def main():
        started = asyncio.get_running_loop().create_future()
        held = greenpatch.spawn(holder, started)
        await started
        waited = greenpatch.spawn(waiter)
        await held
        await waited
        await asyncio.sleep(0)

    run_loop(main)
    assert order == ["waiter resumed", "next iteration"]


def test_connection_granted_to_a_waiter_killed_before_it_ran_goes_to_the_next(db, patched, pools):
    pool = pools(db, max_size=1, timeout=10)
    got = []

    def take():
        return pool.checkout()

    def waiter(i):
        conn = pool.checkout()
        got.append((i, conn.thread_id()))
        pool.checkin(conn)

    async def main():
        conn = await greenpatch.spawn(take)  # held, not returned by its worker
        w1 = hub.start_worker(waiter, 1)
        f2 = greenpatch.spawn(waiter, 2)
        pool.checkin(conn)  # granted to waiter 1, whose wake-up is only scheduled...
        assert pool.stats()["waiting"] == 1
        w1.kill()  # ...and killed before it runs: waiter 2 must get it
        await f2
        return w1.future, conn.thread_id()

    f1, thread_id = run_loop(main)
    assert f1.cancelled()
    assert got == [(2, thread_id)]
    s = pool.stats()
    assert (s["size"], s["idle"], s["in_use"], s["waiting"], s["connects"]) == (1, 1, 0, 0, 1)


# -- connecting --------------------------------------------------------------------------


def test_failed_connect_frees_its_slot(db, patched):
    pool = Pool(
        lambda: pymysql.connect(**dict(db, port=unused_port(), connect_timeout=2)), name="bad", max_size=1
    )

    def attempt():
        try:
            pool.checkout(timeout=1)
        except pymysql.err.OperationalError as exc:
            return exc
        raise AssertionError("connect to a closed port succeeded")

    for _ in range(3):
        exc = run_green(attempt)
        assert exc.args[0] == 2003
    s = pool.stats()
    assert (s["size"], s["connecting"], s["connect_errors"], s["connects"]) == (0, 0, 3, 0)
    pool.close()


def test_failed_connect_lets_the_next_waiter_connect(db, patched):
    bad = dict(db, port=unused_port(), connect_timeout=2)
    attempts = []

    def connect():
        attempts.append(hub.current_worker())
        if len(attempts) == 1:
            greenpatch.sleep(0.1)
            return pymysql.connect(**bad)
        return pymysql.connect(**db)

    pool = Pool(connect, name="retry", max_size=1, timeout=5)

    def use():
        return scalar_from(pool, "SELECT 7")

    async def main():
        first = greenpatch.spawn(use)
        second = greenpatch.spawn(use)
        # The first connect is in progress: it holds the only slot.
        s = pool.stats()
        assert (s["connecting"], s["waiting"]) == (1, 1)
        results = await asyncio.gather(first, second, return_exceptions=True)
        pool.close()
        return results

    first, second = run_loop(main)
    assert isinstance(first, pymysql.err.OperationalError)
    assert second == 7
    assert len(attempts) == 2
    s = pool.stats()
    assert (s["connect_errors"], s["connects"], s["connecting"], s["size"]) == (1, 1, 0, 0)


def test_prefill_opens_min_size(db, patched, pools):
    pool = pools(db, min_size=3, max_size=5)
    run_green(pool.prefill)
    s = pool.stats()
    assert (s["size"], s["idle"], s["connects"]) == (3, 3, 3)
    run_green(pool.prefill)
    assert pool.stats()["connects"] == 3


# -- checks, lifetime, idle --------------------------------------------------------------


@pytest.mark.parametrize("check", ["always", "auto", "never"])
def test_connection_killed_server_side(db, patched, pools, check):
    pool = pools(db, max_size=1, check=check, check_idle=0.05)
    admin = pymysql.connect(**db)

    def scenario():
        conn = pool.checkout()
        killed = conn.thread_id()
        pool.checkin(conn)
        admin.kill(killed)
        greenpatch.sleep(0.1)
        conn = pool.checkout()
        try:
            try:
                return killed, conn.thread_id(), scalar(conn, "SELECT CONNECTION_ID()")
            except pymysql.err.OperationalError as exc:
                return killed, conn.thread_id(), exc
        finally:
            pool.checkin(conn)

    try:
        killed, handed, answer = run_green(scenario)
    finally:
        admin.close()
    s = pool.stats()
    if check == "never":
        # Without a check the dead connection is handed out and fails.
        assert handed == killed
        assert isinstance(answer, pymysql.err.OperationalError)
        assert s["discards"] == {"closed": 1}
    else:
        assert handed != killed and answer == handed
        assert s["discards"] == {"check_failed": 1}
        assert s["connects"] == 2 and s["size"] == 1
    assert s["cancels"] == 0  # the server ended it: nothing to cancel


def test_after_one_dropped_connection_auto_checks_the_older_idle_ones(db, patched, pools):
    # A restart drops every connection at once. check="auto" does not ping
    # connections idle for less than check_idle, so the first one handed
    # out fails; once the pool has seen that, it pings every connection
    # last used before it, and nobody else gets a dead one.
    pool = pools(db, max_size=3, check="auto", check_idle=60)
    admin = pymysql.connect(**db)

    def use(results):
        try:
            with pool.connection() as conn:
                results.append(scalar(conn, "SELECT CONNECTION_ID()"))
        except pymysql.err.OperationalError as exc:
            results.append(exc)

    def scenario():
        held = [pool.checkout() for _ in range(3)]
        ids = [c.thread_id() for c in held]
        for conn in held:
            pool.checkin(conn)
        for thread_id in ids:
            admin.kill(thread_id)
        greenpatch.sleep(0.1)
        results: list = []
        for _ in range(4):
            use(results)
        return ids, results

    try:
        ids, results = run_green(scenario)
    finally:
        admin.close()
    failed = [r for r in results if isinstance(r, Exception)]
    assert len(failed) == 1, results
    assert all(r not in ids for r in results[1:]), (ids, results)
    s = pool.stats()
    assert s["discards"] == {"error": 1, "check_failed": 2}, s


# -- cut connections: the server-side work is cancelled ----------------------------------


def server_threads(admin) -> set[int]:
    return {row[0] for row in _rows(admin, "SELECT ID FROM information_schema.PROCESSLIST")}


def _rows(conn, sql: str, args=None) -> list[tuple]:
    with conn.cursor() as cur:
        cur.execute(sql, args)
        return list(cur.fetchall())


@pytest.mark.parametrize("cut_by", ["worker_killed", "read_timeout"])
def test_query_of_a_cut_connection_is_killed_on_the_server(scratch_db, patched, cut_by):
    # A transaction holds a row lock and runs a long statement; this side
    # cuts the connection. Without a KILL the server would keep the session
    # - and the lock - until SLEEP notices the closed socket (up to 5 s).
    admin = pymysql.connect(**scratch_db, autocommit=True)
    scalar(admin, "CREATE TABLE t (id INT PRIMARY KEY, v INT) ENGINE=InnoDB")
    scalar(admin, "INSERT INTO t VALUES (1, 0)")
    read_timeout = 0.5 if cut_by == "read_timeout" else None
    pool = Pool(lambda: pymysql.connect(**scratch_db, read_timeout=read_timeout), name="cut", max_size=1)
    victim = []

    def txn():
        with pool.connection() as conn:
            victim.append(conn.thread_id())
            conn.begin()
            scalar(conn, "UPDATE t SET v = 1 WHERE id = 1")
            scalar(conn, "SELECT SLEEP(30)")

    async def main():
        fut = greenpatch.spawn(txn)
        if cut_by == "worker_killed":
            sql = "SELECT 1 FROM information_schema.PROCESSLIST WHERE ID = %s AND INFO LIKE 'SELECT SLEEP%%'"
            await until(lambda: victim and _rows(admin, sql, (victim[0],)))
            fut.cancel()
        with contextlib.suppress(asyncio.CancelledError, pymysql.err.OperationalError):
            await fut
        # The KILL is sent by a new worker on this loop: keep the loop running.
        await until(lambda: pool.stats()["cancels"] == 1)
        return fut

    try:
        fut = run_loop(main)
        cut = time.monotonic()
        wait_until(lambda: victim[0] not in server_threads(admin), timeout=3)
        gone_after = time.monotonic() - cut
        scalar(admin, "SET SESSION innodb_lock_wait_timeout = 1")
        scalar(admin, "UPDATE t SET v = v + 10 WHERE id = 1")  # the row lock is free
        value = scalar(admin, "SELECT v FROM t WHERE id = 1")
        s = pool.stats()
    finally:
        pool.close()
        admin.close()
    assert fut.cancelled() if cut_by == "worker_killed" else "2013" in str(fut.exception())
    assert gone_after < 1.0, f"the server kept the cut session {gone_after:.2f} s"
    assert value == 10  # the cut transaction was rolled back
    assert (s["in_use"], s["connecting"], s["size"], s["cancels"]) == (0, 0, 0, 1)
    assert sum(s["discards"].values()) == 1


def test_cancelling_does_not_hold_the_slot(scratch_db, patched):
    # The KILL runs on an extra connection outside max_size (MariaDB's KILL
    # may take up to 2 s); the cut connection's slot is free at once.
    pool = Pool(lambda: pymysql.connect(**scratch_db, read_timeout=0.3), name="slot", max_size=1)
    admin = pymysql.connect(**scratch_db)
    seen = []

    def cut_then_use():
        with contextlib.suppress(pymysql.err.OperationalError), pool.connection() as conn:
            scalar(conn, "SELECT SLEEP(30)")
        s = pool.stats()
        seen.append((s["size"], s["connecting"], s["cancelling"]))
        with pool.connection(timeout=0.5) as conn:  # no wait for the KILL
            answer = scalar(conn, "SELECT 1")
        while pool.stats()["cancelling"]:  # the KILL runs in a worker of this loop
            greenpatch.sleep(0.005)
        return answer

    try:
        assert run_green(cut_then_use) == 1
        s = pool.stats()
        sessions = server_count(admin, scratch_db["database"])
    finally:
        pool.close()
        admin.close()
    assert seen == [(0, 0, 1)]
    assert (s["size"], s["connecting"], s["connects"], s["cancels"]) == (1, 0, 2, 1)
    assert sessions <= 2  # admin + max_size


def test_a_canceller_that_never_runs_does_not_keep_its_pool_alive(scratch_db, patched):
    # run_green's loop stops right after the cut, before the canceller's
    # grace is over: the parked canceller must not pin the (closed) pool.
    import weakref

    pool = Pool(lambda: pymysql.connect(**scratch_db, read_timeout=0.2), name="dropped", max_size=1)

    def cut(p):
        with contextlib.suppress(pymysql.err.OperationalError), p.connection() as conn:
            scalar(conn, "SELECT SLEEP(30)")
        return p.stats()["cancelling"]

    assert run_green(cut, pool) == 1
    pool.close()
    ref = weakref.ref(pool)
    del pool
    gc.collect()
    assert ref() is None


# -- cut connections whose reply is due: recovered ---------------------------------------

RUNNING_SLEEP = "SELECT 1 FROM information_schema.PROCESSLIST WHERE ID = %s AND INFO LIKE 'SELECT SLEEP%%'"


async def cancel_in_sleep(pool, admin, seconds: float, held: list) -> asyncio.Future:
    """Spawn a worker that holds a connection of ``pool`` in ``SELECT SLEEP(seconds)``
    (its server thread id goes to ``held``) and cancel it once the server runs it."""

    def hold():
        with pool.connection() as conn:
            held.append(conn.thread_id())
            scalar(conn, f"SELECT SLEEP({seconds})")

    fut = greenpatch.spawn(hold)
    await until(lambda: held and _rows(admin, RUNNING_SLEEP, (held[0],)))
    fut.cancel()
    return fut


def kill_during_sleep(pool, admin, job):
    """Run ``job(conn, thread_ids)`` in a worker holding a connection of ``pool``,
    kill the worker once the connection runs a SLEEP, then check a connection
    out again: (that connection's thread id, its answer to SELECT 3, the
    first connection's thread id)."""
    held = []

    def hold():
        with pool.connection() as conn:
            held.append(conn.thread_id())
            job(conn)

    def again():
        with pool.connection() as conn:
            return conn.thread_id(), scalar(conn, "SELECT 3")

    async def main():
        fut = greenpatch.spawn(hold)
        await until(lambda: held and _rows(admin, RUNNING_SLEEP, (held[0],)))
        fut.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await fut
        return (*await greenpatch.spawn(again), held[0])

    return run_loop(main)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT SLEEP(0.2), 1",
        # several results, one larger than the read buffer, one with many rows
        "SELECT SLEEP(0.2); SELECT REPEAT('x', 200000); SELECT ID FROM information_schema.COLLATIONS",
        "SELECT SLEEP(0.2); SELECT * FROM no_such_table",  # ends with an error reply
    ],
    ids=["one result", "several results", "error reply"],
)
@pytest.mark.parametrize("turn_budget", ["0", "10"])
def test_a_connection_killed_while_its_reply_is_due_is_recovered(
    scratch_db, patched, sql, turn_budget, monkeypatch
):
    # A client went away mid-request: the worker is killed while it waits for
    # the reply to a whole statement. The pool reads that reply to its end and
    # hands the same connection out again: no reconnect, no KILL. (A grace
    # longer than the statement, so that a slow machine passes too.) With a
    # turn budget the worker read first, found nothing and waited: the same.
    from pymysql.constants import CLIENT

    monkeypatch.setattr("greenpatch.pool.CANCEL_GRACE", 2.0)
    monkeypatch.setenv("GREENPATCH_TURN_BUDGET", turn_budget)

    admin = pymysql.connect(**scratch_db, autocommit=True)
    pool = Pool(
        lambda: pymysql.connect(**scratch_db, client_flag=CLIENT.MULTI_STATEMENTS), name="recover", max_size=1
    )

    def job(conn):
        with conn.cursor() as cur:
            cur.execute(sql)

    try:
        thread_id, answer, cut_thread_id = kill_during_sleep(pool, admin, job)
        s = pool.stats()
    finally:
        pool.close()
        admin.close()
    assert (thread_id, answer) == (cut_thread_id, 3)
    assert (s["recoveries"], s["connects"], s["discards"], s["cancels"]) == (1, 1, {}, 0)
    assert (s["size"], s["in_use"], s["recovering"]) == (1, 0, 0)


def test_a_recovered_connection_has_its_transaction_rolled_back(scratch_db, patched, monkeypatch):
    monkeypatch.setattr("greenpatch.pool.CANCEL_GRACE", 2.0)
    admin = pymysql.connect(**scratch_db, autocommit=True)
    scalar(admin, "CREATE TABLE t (id INT PRIMARY KEY, v INT) ENGINE=InnoDB")
    scalar(admin, "INSERT INTO t VALUES (1, 0)")
    pool = Pool(lambda: pymysql.connect(**scratch_db, autocommit=True), name="recover-txn", max_size=1)

    def job(conn):
        conn.begin()
        scalar(conn, "UPDATE t SET v = 1 WHERE id = 1")
        scalar(conn, "SELECT SLEEP(0.2)")

    try:
        thread_id, answer, cut_thread_id = kill_during_sleep(pool, admin, job)
        scalar(admin, "SET SESSION innodb_lock_wait_timeout = 1")
        scalar(admin, "UPDATE t SET v = v + 10 WHERE id = 1")  # the row lock is free
        value = scalar(admin, "SELECT v FROM t WHERE id = 1")
        in_transaction = run_green(lambda: scalar_from(pool, "SELECT @@in_transaction"))
        s = pool.stats()
    finally:
        pool.close()
        admin.close()
    assert thread_id == cut_thread_id and answer == 3
    assert value == 10  # the cut UPDATE was rolled back
    assert in_transaction == 0
    assert (s["recoveries"], s["connects"], s["cancels"]) == (1, 1, 0)


def test_recovery_is_given_up_after_the_grace_and_the_statement_killed(scratch_db, patched, monkeypatch):
    # The reply does not come within CANCEL_GRACE: the connection is closed and
    # its statement killed at once (the grace is over), as without recovery.
    monkeypatch.setattr("greenpatch.pool.CANCEL_GRACE", 0.2)
    admin = pymysql.connect(**scratch_db, autocommit=True)
    pool = Pool(lambda: pymysql.connect(**scratch_db), name="recover-late", max_size=1)
    held = []

    async def main():
        await cancel_in_sleep(pool, admin, 30, held)
        # While the reply is awaited the slot stays taken (in_use, recovering).
        await until(lambda: pool.stats()["recovering"] == 1)
        started, during = time.monotonic(), pool.stats()
        await until(lambda: pool.stats()["cancels"] == 1)
        return during, time.monotonic() - started

    try:
        during, until_cancelled = run_loop(main)
        wait_until(lambda: held[0] not in server_threads(admin), timeout=3)
        s = pool.stats()
    finally:
        pool.close()
        admin.close()
    assert (during["size"], during["in_use"], during["idle"]) == (1, 1, 0)
    assert 0.15 < until_cancelled < 1.5
    assert (s["recoveries"], s["recovering"], s["cancels"], s["size"]) == (0, 0, 1, 0)
    assert s["discards"] == {"interrupted": 1}


def test_kill_is_skipped_when_the_server_restarted_since(db):
    # Thread ids grow for the life of a server; a fresh connection with a
    # smaller id than the cut one means a restart, and the id may be reused.
    from greenpatch.pool import PyMySQLOps

    ops = PyMySQLOps()
    older = pymysql.connect(**db)
    victim = pymysql.connect(**db)
    newer = pymysql.connect(**db)
    try:
        ops.cancel_orphaned_work(older, victim.thread_id())  # looks like a restart: no KILL
        assert scalar(victim, "SELECT 1") == 1
        ops.cancel_orphaned_work(newer, victim.thread_id())
        with pytest.raises(pymysql.err.OperationalError):
            scalar(victim, "SELECT 1")
        ops.cancel_orphaned_work(newer, victim.thread_id())  # already gone: no error
    finally:
        for conn in (older, victim, newer):
            with contextlib.suppress(Exception):
                conn.close()


def test_lifetime_expiry(db, pools):
    pool = pools(db, max_lifetime=0.2)
    conn = pool.checkout()
    first = conn.thread_id()
    pool.checkin(conn)
    time.sleep(0.25)
    conn = pool.checkout()
    assert conn.thread_id() != first
    assert pool.stats()["discards"] == {"lifetime": 1}
    time.sleep(0.25)
    pool.checkin(conn)  # expired while held: closed at checkin
    s = pool.stats()
    assert s["discards"] == {"lifetime": 2} and s["size"] == 0


def test_lifetime_has_jitter():
    pool = Pool(object, ops=ConnectionOps(), min_size=20, max_size=20, max_lifetime=100)
    pool.prefill()
    spans = [rec.deadline - rec.created for rec in pool._records.values()]
    assert len(spans) == 20
    assert all(90 <= span <= 100 for span in spans)
    assert len(set(spans)) > 1


def test_max_idle_sweep_keeps_min_size(db, pools):
    pool = pools(db, min_size=1, max_size=3, max_idle=0.2)
    conns = [pool.checkout() for _ in range(3)]
    for conn in conns:
        pool.checkin(conn)
    time.sleep(0.25)
    conn = pool.checkout()
    s = pool.stats()
    assert s["discards"] == {"idle": 2}
    assert s["size"] == 1 and conn is conns[-1]  # the newest survived
    assert scalar(conn, "SELECT 1") == 1
    pool.checkin(conn)


def test_idle_connections_are_reused_newest_first(db, pools):
    pool = pools(db, max_size=3)
    a, b = pool.checkout(), pool.checkout()
    pool.checkin(a)
    pool.checkin(b)
    assert pool.checkout() is b
    assert pool.checkout() is a


# -- reset on checkin ----------------------------------------------------------------------


@pytest.mark.parametrize("autocommit", [False, True])
@pytest.mark.parametrize("reset", ["rollback", "none"])
def test_reset_rollback_ends_the_transaction(scratch_db, patched, reset, autocommit):
    admin = pymysql.connect(**scratch_db, autocommit=True)
    with admin.cursor() as cur:
        cur.execute("CREATE TABLE t (i INT) ENGINE=InnoDB")
    pool = Pool(
        lambda: pymysql.connect(**scratch_db, autocommit=autocommit), name="rb", max_size=1, reset=reset
    )

    def scenario():
        conn = pool.checkout()
        if autocommit:
            conn.begin()
        with conn.cursor() as cur:
            cur.execute("INSERT INTO t VALUES (1)")
        assert scalar(conn, "SELECT @@in_transaction") == 1
        pool.checkin(conn)
        again = pool.checkout()
        assert again is conn
        try:
            return scalar(again, "SELECT @@in_transaction"), scalar(again, "SELECT COUNT(*) FROM t")
        finally:
            again.rollback()
            pool.checkin(again)

    try:
        in_trans, rows = run_green(scenario)
        assert scalar(admin, "SELECT COUNT(*) FROM t") == 0
    finally:
        pool.close()
        admin.close()
    if reset == "rollback":
        assert (in_trans, rows) == (0, 0)
    else:  # the next holder inherits the open transaction
        assert (in_trans, rows) == (1, 1)


@pytest.mark.parametrize("autocommit", [True, False])
def test_reset_full_clears_the_session(scratch_db, patched, autocommit):
    options = dict(scratch_db, autocommit=autocommit, sql_mode="ANSI_QUOTES", init_command="SET @init=42")
    pool = Pool(lambda: pymysql.connect(**options), name="full", max_size=1, reset="full")

    def dirty(conn):
        with conn.cursor() as cur:
            cur.execute("SET @x = 1")
            cur.execute("SET foreign_key_checks = 0")
            cur.execute("CREATE TEMPORARY TABLE tmp_t (i INT)")
            cur.execute("SET NAMES latin1")

    def scenario():
        conn = pool.checkout()
        thread_id = conn.thread_id()
        dirty(conn)
        pool.checkin(conn)
        conn = pool.checkout()
        try:
            seen = {
                "same": conn.thread_id() == thread_id,
                "x": scalar(conn, "SELECT @x"),
                "fkc": scalar(conn, "SELECT @@foreign_key_checks"),
                "charset": scalar(conn, "SELECT @@character_set_client"),
                "init": scalar(conn, "SELECT @init"),
                "ansi": "ANSI_QUOTES" in scalar(conn, "SELECT @@sql_mode"),
                "autocommit": scalar(conn, "SELECT @@autocommit"),
                "client_autocommit": conn.get_autocommit(),
            }
            with pytest.raises(pymysql.err.ProgrammingError) as info:
                scalar(conn, "SELECT * FROM tmp_t")
            seen["tmp"] = info.value.args[0]
            seen["works"] = scalar(conn, "SELECT 'ok'")
            return seen
        finally:
            pool.checkin(conn)

    try:
        seen = run_green(scenario)
    finally:
        pool.close()
    assert seen == {
        "same": True,  # reset, not reconnected
        "x": None,
        "fkc": 1,
        "charset": "utf8mb4",
        "init": 42,
        "ansi": True,
        "autocommit": int(autocommit),
        "client_autocommit": autocommit,
        "tmp": 1146,  # no such table
        "works": "ok",
    }
    assert pool.stats()["discards"] == {}


def test_reset_rollback_keeps_session_state(db, pools):
    # What "full" is for: a light reset leaves user SETs behind.
    pool = pools(db, max_size=1, reset="rollback")
    conn = pool.checkout()
    with conn.cursor() as cur:
        cur.execute("SET @x = 1")
        cur.execute("SET foreign_key_checks = 0")
    pool.checkin(conn)
    conn = pool.checkout()
    assert (scalar(conn, "SELECT @x"), scalar(conn, "SELECT @@foreign_key_checks")) == (1, 0)
    pool.checkin(conn)


# -- holder errors -------------------------------------------------------------------------


def test_double_checkin_and_foreign_connections(db, pools):
    pool = pools(db, max_size=2)
    conn = pool.checkout()
    pool.checkin(conn)
    with pytest.raises(PoolError, match="not checked out of pool 'test'"):
        pool.checkin(conn)
    stranger = pymysql.connect(**db)
    try:
        with pytest.raises(PoolError, match="not a connection of pool 'test'"):
            pool.checkin(stranger)
    finally:
        stranger.close()
    conn = pool.checkout()
    pool.discard(conn, "broken")
    with pytest.raises(PoolError):
        pool.checkin(conn)
    with pytest.raises(PoolError):
        pool.discard(conn)
    assert not conn.open
    s = pool.stats()
    assert s["discards"] == {"broken": 1} and s["size"] == 0 and s["checkins"] == 1


def test_connection_context_manager(db, pools):
    pool = pools(db, max_size=2)
    admin = pymysql.connect(**db)
    try:
        with pool.connection() as conn:
            first = conn
            assert scalar(conn, "SELECT 1") == 1
        assert pool.stats()["idle"] == 1
        with pytest.raises(ValueError):
            with pool.connection() as conn:
                assert conn is first
                raise ValueError("not the connection's fault")
        assert pool.stats()["idle"] == 1 and pool.stats()["discards"] == {}
        with pytest.raises(pymysql.err.OperationalError):
            with pool.connection() as conn:
                admin.kill(conn.thread_id())
                time.sleep(0.05)
                scalar(conn, "SELECT 1")
        s = pool.stats()
        assert s["discards"] == {"error": 1} and s["size"] == 0
    finally:
        admin.close()


def test_leak_threshold_logs_the_checkout_stack(db, patched, pools, caplog):
    pool = pools(db, max_size=2, leak_threshold=0.1)
    seen_before_checkin = []

    def leaky_function():
        conn = pool.checkout()
        greenpatch.sleep(0.2)  # no pool activity meanwhile
        seen_before_checkin.append(list(caplog.records))
        pool.checkin(conn)

    with caplog.at_level(logging.WARNING, logger="greenpatch.pool"):
        run_green(leaky_function)
        conn = pool.checkout()  # held briefly: no warning
        pool.checkin(conn)
    warnings = [r for r in caplog.records if r.name == "greenpatch.pool"]
    assert len(warnings) == 1
    assert len(seen_before_checkin[0]) == 1  # reported while still held
    message = warnings[0].getMessage()
    assert "held for" in message and "leak_threshold=0.1 s" in message
    assert "leaky_function" in message


# -- closing --------------------------------------------------------------------------------


def test_close_wakes_waiters_and_closes_connections_at_checkin(db, patched):
    pool = Pool(lambda: pymysql.connect(**db), name="closing", max_size=2, timeout=10)
    outcomes = []

    def waiter(kind):
        try:
            pool.checkout()
        except PoolClosed as exc:
            outcomes.append((kind, str(exc)))

    async def main():
        a = await greenpatch.spawn(pool.checkout)
        b = await greenpatch.spawn(pool.checkout)
        thread = threading.Thread(target=waiter, args=("thread",))
        thread.start()
        await until(lambda: pool.stats()["waiting"] == 1)
        green = greenpatch.spawn(waiter, "green")
        assert pool.stats()["waiting"] == 2
        pool.close()
        await green
        await until(lambda: not thread.is_alive())
        assert a.open and b.open  # in use: closed when checked in
        pool.checkin(a)
        pool.checkin(b)
        return a, b

    a, b = run_loop(main)
    message = "pool 'closing' was closed while waiting for a connection"
    assert sorted(outcomes) == [("green", message), ("thread", message)]
    assert not a.open and not b.open
    s = pool.stats()
    assert (s["size"], s["waiting"], s["discards"]) == (0, 0, {})
    with pytest.raises(PoolClosed, match="pool 'closing' is closed"):
        pool.checkout()


def test_close_closes_idle_connections_now(db):
    pool = Pool(lambda: pymysql.connect(**db), name="closing", max_size=2)
    conn = pool.checkout()
    pool.checkin(conn)
    assert conn.open
    pool.close()
    assert not conn.open and pool.stats()["size"] == 0
    pool.close()  # harmless


# -- fork -------------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
# Python 3.12+ warns when forking a multi-threaded process. In the whole suite
# an earlier test leaves an idle thread (the default executor of a loop that
# resolved a host name); the child uses no lock such a thread could hold.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded, use of fork:DeprecationWarning")
def test_fork_child_starts_fresh_and_parent_keeps_its_connections(scratch_db):
    admin = pymysql.connect(**scratch_db, autocommit=True)
    with admin.cursor() as cur:
        cur.execute("CREATE TABLE t (i INT) ENGINE=InnoDB")
    pool = Pool(lambda: pymysql.connect(**scratch_db), name="forked", max_size=2)
    idle = pool.checkout()
    idle_id = idle.thread_id()
    held = pool.checkout()  # with an open transaction the child must not touch
    pool.checkin(idle)
    with held.cursor() as cur:
        cur.execute("INSERT INTO t VALUES (1)")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report through the pipe, never return into pytest
        code = 1
        try:
            pool.checkin(held)  # a parent's connection: ignored, no ROLLBACK sent
            conn = pool.checkout()
            fresh = conn is not idle and conn is not held
            answer = scalar(conn, "SELECT CONNECTION_ID()")
            size = pool.stats()["size"]
            pool.checkin(conn)
            pool.close()  # would send COM_QUIT on the parent's sessions if it knew them
            gc.collect()
            os.write(write, f"{int(fresh)} {answer} {size}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    try:
        report = os.read(read, 200).decode()
    finally:
        os.close(read)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    fresh, child_thread, child_size = report.split()
    assert fresh == "1" and child_size == "1"
    assert int(child_thread) not in (idle_id, held.thread_id())
    # The parent's connections are intact, transaction included.
    held.commit()
    pool.checkin(held)
    assert scalar(admin, "SELECT COUNT(*) FROM t") == 1
    conn = pool.checkout()
    assert conn is held  # newest first
    other = pool.checkout()
    assert other is idle and scalar(other, "SELECT CONNECTION_ID()") == idle_id
    pool.checkin(conn)
    pool.checkin(other)
    pool.close()
    admin.close()


# -- construction ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"reset": "partial"}, "reset='partial' is not accepted; use 'rollback', 'full' or 'none'"),
        ({"check": "sometimes"}, "check='sometimes' is not accepted; use 'auto', 'always' or 'never'"),
        ({"min_size": -1}, "min_size=-1 is not accepted; use an integer >= 0"),
        ({"max_size": 0}, "max_size=0 is not accepted; use an integer >= 1"),
        ({"max_size": 2.5}, "max_size=2.5 is not accepted; use an integer >= 1"),
        ({"max_size": True}, "max_size=True is not accepted; use an integer >= 1"),
        ({"min_size": 3, "max_size": 2}, "min_size=3 is not accepted; use an integer <= max_size (2)"),
        ({"timeout": 0}, "timeout=0 is not accepted; use a number of seconds > 0"),
        ({"timeout": -1.5}, "timeout=-1.5 is not accepted; use a number of seconds > 0"),
        ({"timeout": "5"}, "timeout='5' is not accepted; use a number of seconds > 0"),
        ({"max_waiting": -1}, "max_waiting=-1 is not accepted; use an integer >= 0"),
        ({"max_lifetime": 0}, "max_lifetime=0 is not accepted; use a number of seconds > 0 or None"),
        ({"max_idle": -5}, "max_idle=-5 is not accepted; use a number of seconds > 0 or None"),
        ({"check_idle": -1}, "check_idle=-1 is not accepted; use a number of seconds >= 0"),
        ({"leak_threshold": 0}, "leak_threshold=0 is not accepted; use a number of seconds > 0 or None"),
        ({"ops": object()}, "is not accepted; use a ConnectionOps (missing ping, reset, is_usable, close)"),
    ],
)
def test_bad_constructor_values(options, message):
    with pytest.raises(ValueError) as info:
        Pool(object, **options)
    assert message in str(info.value)


def test_bad_connect_and_checkout_timeout():
    with pytest.raises(ValueError, match="connect=None is not accepted"):
        Pool(None)  # type: ignore[arg-type]
    pool = Pool(object, ops=ConnectionOps())
    with pytest.raises(ValueError, match="timeout=-1 is not accepted"):
        pool.checkout(timeout=-1)


def test_all_pools_is_a_weak_registry():
    pool = Pool(object, name="registered")
    assert pool in all_pools()
    del pool
    gc.collect()
    assert "registered" not in [p.name for p in all_pools()]


# -- holders left on a closed loop ----------------------------------------------------------


@pytest.mark.parametrize("waiting_on", ["a sleep", "its query"])
def test_a_connection_held_by_a_worker_left_on_a_closed_loop_is_not_lost(db, patched, pools, waiting_on):
    # The worker is killed as the next worker of this thread starts: its
    # connection is discarded (it cannot be reset without a loop) and its
    # slot freed; a statement cut mid-way is cancelled from a thread.
    pool = pools(db, max_size=1, timeout=2)

    def holder():
        with pool.connection() as conn, conn.cursor() as cur:
            cur.execute("BEGIN")
            if waiting_on == "a sleep":
                greenpatch.sleep(60)
            else:
                cur.execute("SELECT SLEEP(30)")

    park_on_a_closed_loop(holder, run_for=0.2)  # into its SLEEP
    assert len(pool._records) == 1 and not pool._idle  # held (stats() would kill the worker now)

    def next_request():
        with pool.connection() as conn:
            return scalar(conn, "SELECT 1")

    assert run_green(next_request) == 1  # not a PoolTimeout
    s = pool.stats()
    assert (s["size"], s["in_use"], s["discards"]) == (1, 0, {"interrupted": 1})
    if waiting_on == "its query":
        wait_until(lambda: pool.stats()["cancels"] == 1 and pool.stats()["cancelling"] == 0)


# -- connections never checked in -----------------------------------------------------------


@pytest.mark.parametrize("mode", ["unpatched", "patched"])
def test_a_dropped_connection_frees_its_slot(db, pools, caplog, mode):
    if mode == "patched":
        greenpatch.patch_all()
    try:
        pool = pools(db, max_size=1, timeout=0.5)
        conn = pool.checkout()
        thread_id = conn.thread_id()
        del conn  # never checked in: CPython frees it here, its socket with it
        s = pool.stats()
        assert (s["size"], s["in_use"], s["discards"]) == (0, 0, {"not_checked_in": 1})
        assert "garbage-collected without being checked in" in caplog.text
        assert scalar_from(pool, "SELECT 1") == 1  # the slot is free: no PoolTimeout
        admin = pymysql.connect(**db)
        try:
            wait_until(lambda: thread_id not in server_threads(admin))
        finally:
            admin.close()
    finally:
        if mode == "patched":
            greenpatch.unpatch_all()


def test_a_connection_collected_inside_the_pools_lock_is_freed_by_the_next_call(db, pools):
    # The collection can happen anywhere, also inside the pool's own locked
    # code in the same thread: the slot is then freed by the next call.
    pool = pools(db, max_size=1, timeout=0.5)
    conn = pool.checkout()
    with pool._lock:
        del conn
        assert len(pool._records) == 1  # not freed yet: the lock is held
    assert scalar_from(pool, "SELECT 1") == 1  # no PoolTimeout
    assert pool.stats()["discards"] == {"not_checked_in": 1}


def test_a_waiter_gets_the_slot_of_a_dropped_connection(db, pools):
    pool = pools(db, max_size=1, timeout=5)
    held = [pool.checkout()]
    got = []
    thread = threading.Thread(target=lambda: got.append(scalar_from(pool, "SELECT 7")))
    thread.start()
    wait_until(lambda: pool.stats()["waiting"] == 1)
    t0 = time.monotonic()
    held.clear()
    thread.join(5)
    assert got == [7]
    assert time.monotonic() - t0 < 1.0  # woken by the collection, not a timeout


def test_a_connection_that_cannot_be_weakly_referenced_is_held_as_before():
    pool = Pool(object, ops=ConnectionOps(), name="strong", max_size=1, timeout=0.1, reset="none")
    pool.checkout()  # dropped, but the pool cannot tell: it stays checked out
    with pytest.raises(PoolTimeout):
        pool.checkout()
    assert pool.stats()["in_use"] == 1


def start_a_thread_that_ends(main, loop_end: str = "closed") -> threading.Thread:
    """Start a thread named "ended" that runs the coroutine function ``main``
    on a new loop, then closes the loop (or leaves it open) and ends."""

    def thread():
        loop = IOLoop(make_current=False)
        loop.run_sync(main)
        if loop_end == "closed":
            loop.close(all_fds=False)

    t = threading.Thread(target=thread, name="ended")
    t.start()
    return t


def in_a_thread_that_ends(main, loop_end: str) -> None:
    """`start_a_thread_that_ends`, and wait until it has ended."""
    t = start_a_thread_that_ends(main, loop_end)
    t.join(10)
    assert not t.is_alive()


@pytest.mark.parametrize("loop_end", ["closed", "left open"])
@pytest.mark.parametrize("waiting_on", ["a sleep", "its query"])
def test_a_connection_held_by_a_worker_whose_thread_ended_is_not_lost(
    db, patched, pools, caplog, waiting_on, loop_end
):
    # The worker can never run again, and greenlet never frees it: its
    # connection is closed (its statement killed) and its slot freed by the
    # next checkout that has to wait.
    pool = pools(db, max_size=1, timeout=3)
    ids = []

    def holder():
        with pool.connection() as conn, conn.cursor() as cur:
            ids.append(conn.thread_id())
            if waiting_on == "a sleep":
                greenpatch.sleep(60)
            else:
                cur.execute("SELECT SLEEP(30)")

    async def main():
        hub.start_worker(holder)
        await asyncio.sleep(0.2)

    in_a_thread_that_ends(main, loop_end)
    assert ids
    t0 = time.monotonic()
    assert scalar_from(pool, "SELECT 1") == 1  # from this thread, blocking
    assert time.monotonic() - t0 < 1.0  # not a PoolTimeout after 3 s
    assert "worker whose thread (ended) ended before it was checked in" in caplog.text
    admin = pymysql.connect(**db)
    try:
        wait_until(lambda: ids[0] not in server_threads(admin))
    finally:
        admin.close()
    s = pool.stats()
    assert (s["size"], s["in_use"], s["discards"]) == (1, 0, {"holder_thread_ended": 1})
    if waiting_on == "its query":
        wait_until(lambda: pool.stats()["cancels"] == 1 and pool.stats()["cancelling"] == 0)


@pytest.mark.parametrize("waiter", ["a thread", "a worker"])
def test_a_waiting_checkout_looks_again_while_it_waits(db, patched, pools, caplog, waiter):
    # The checkout starts waiting just after the pool looked (stats()), so it
    # does not look as it starts; the holder's thread ends 1.5 s into the
    # wait. The waiter looks again about once a second: it gets the slot
    # then, not a PoolTimeout after 5 s.
    pool = pools(db, max_size=1, timeout=5)
    held = threading.Event()

    def holder():
        with pool.connection():
            held.set()
            greenpatch.sleep(60)

    async def main():
        hub.start_worker(holder)
        await asyncio.sleep(1.5)

    t = start_a_thread_that_ends(main)
    try:
        assert held.wait(5)
        assert pool.stats()["in_use"] == 1  # a look: the next is a second away

        def wait_for_one() -> float:
            t0 = time.monotonic()
            conn = pool.checkout()
            waited = time.monotonic() - t0
            pool.checkin(conn)
            return waited

        waited = wait_for_one() if waiter == "a thread" else run_green(wait_for_one)
    finally:
        t.join(10)
    assert 1.0 < waited < 3.5
    assert pool.stats()["discards"] == {"holder_thread_ended": 1}
    assert "worker whose thread (ended) ended before it was checked in" in caplog.text


def test_a_checkout_that_may_not_wait_still_looks_first(db, patched, pools):
    # timeout=0: no time to wait, but the look as it starts frees the slot of
    # a holder whose thread ended, and the slot is its own.
    pool = pools(db, max_size=1, timeout=5)

    def holder():
        with pool.connection():
            greenpatch.sleep(60)

    async def main():
        hub.start_worker(holder)
        await asyncio.sleep(0.1)

    in_a_thread_that_ends(main, "closed")
    conn = pool.checkout(timeout=0)
    pool.checkin(conn)
    assert pool.stats()["discards"] == {"holder_thread_ended": 1}


def test_a_connection_held_in_a_live_thread_is_left_alone(db, patched, pools):
    pool = pools(db, max_size=1, timeout=0.3)
    done = threading.Event()

    def holder():
        with pool.connection():
            while not done.is_set():
                greenpatch.sleep(0.01)

    def thread():
        loop = IOLoop(make_current=False)
        loop.run_sync(lambda: greenpatch.spawn(holder))
        loop.close(all_fds=False)

    t = threading.Thread(target=thread)
    t.start()
    try:
        wait_until(lambda: pool.stats()["in_use"] == 1)
        with pytest.raises(PoolTimeout):
            pool.checkout()
    finally:
        done.set()
        t.join(10)
    s = pool.stats()
    assert (s["in_use"], s["checkins"], s["discards"]) == (0, 1, {})


def test_a_connection_granted_to_a_waiter_not_yet_running_is_not_its_last_holders(db, patched, pools):
    # A worker in another thread checks its connection in to a waiter here
    # and its thread ends before the waiter runs: the connection is the
    # waiter's now, not a dead thread's.
    pool = pools(db, max_size=1, timeout=5)
    checked_out = threading.Event()

    def other_thread():
        loop = IOLoop(make_current=False)

        def hold():
            conn = pool.checkout()
            checked_out.set()
            greenpatch.sleep(0.2)  # meanwhile the waiter here queues
            pool.checkin(conn)

        loop.run_sync(lambda: greenpatch.spawn(hold))
        loop.close(all_fds=False)

    async def main():
        t = threading.Thread(target=other_thread)
        t.start()
        await until(checked_out.is_set)
        waiter = greenpatch.spawn(scalar_from, pool, "SELECT 9")
        await until(lambda: pool.stats()["waiting"] == 1)
        t.join(10)  # blocks this loop: the waiter is granted the connection but cannot run yet
        s = pool.stats()
        assert (s["in_use"], s["waiting"], s["discards"]) == (1, 0, {})
        return await waiter

    assert run_loop(main) == 9
    assert pool.stats()["discards"] == {}


def test_a_dropped_connection_is_reported_with_its_checkout_stack(db, pools, caplog):
    pool = pools(db, max_size=1, leak_threshold=60)

    def forgetful_caller():
        pool.checkout()  # and never checked in

    forgetful_caller()
    assert pool.stats()["discards"] == {"not_checked_in": 1}
    assert "it was checked out at:" in caplog.text
    assert "in forgetful_caller" in caplog.text


# -- recoveries and cancellers whose loop was closed ------------------------------------------


@pytest.mark.parametrize("reply", ["within the grace", "too late"])
@pytest.mark.parametrize("stranded", ["before it started", "while it waited"])
def test_a_recovery_whose_loop_was_closed_is_not_lost(scratch_db, patched, monkeypatch, stranded, reply):
    # A request killed in its loop's last turn: the recovery of its
    # connection was scheduled on that loop, which then closed. A recovery
    # that had not started runs in a thread instead; one parked on the
    # closed loop is killed by the next checkout of this thread. Either way
    # the slot comes back, and a statement still running is killed.
    monkeypatch.setattr("greenpatch.pool.CANCEL_GRACE", 2.0 if reply == "within the grace" else 0.2)
    seconds = 0.5 if reply == "within the grace" else 30
    admin = pymysql.connect(**scratch_db, autocommit=True)
    pool = Pool(lambda: pymysql.connect(**scratch_db), name="stranded", max_size=1, timeout=5)
    held = []

    async def main():
        await cancel_in_sleep(pool, admin, seconds, held)
        if stranded == "while it waited":
            await asyncio.sleep(0.05)  # the recovery starts and waits for the reply

    try:
        run_loop(main)  # closes the loop
        assert sum(e.worker.pending for e in pool._internal) == (stranded == "before it started")
        t0 = time.monotonic()
        conn = pool.checkout()  # from this thread, outside a worker
        waited = time.monotonic() - t0
        thread_id = conn.thread_id()
        pool.checkin(conn)
        wait_until(lambda: pool.stats()["cancelling"] == 0)
        s = pool.stats()
        gone = held[0] not in server_threads(admin)
    finally:
        pool.close()
        admin.close()
    assert (s["size"], s["in_use"], s["recovering"]) == (1, 0, 0)
    if stranded == "before it started" and reply == "within the grace":
        assert waited < 1.5  # the reply came after SLEEP(0.5)
        assert thread_id == held[0]
        assert (s["recoveries"], s["discards"], s["cancels"]) == (1, {}, 0)
    else:
        assert waited < 1.0
        assert thread_id != held[0] and gone
        assert (s["recoveries"], s["discards"]) == (0, {"interrupted": 1})
        if reply == "too late":
            assert s["cancels"] == 1


class _NoRecovery(PyMySQLOps):
    def recoverable(self, conn):
        return False


@pytest.mark.parametrize("stranded", ["before it started", "during its grace"])
def test_a_canceller_whose_loop_was_closed_still_kills_the_statement(scratch_db, patched, stranded):
    # A request killed mid-statement in its loop's last turn: the KILL of
    # that statement was scheduled on the loop, which then closed.
    admin = pymysql.connect(**scratch_db, autocommit=True)
    pool = Pool(lambda: pymysql.connect(**scratch_db), name="stranded-cancel", max_size=1, ops=_NoRecovery())
    held = []

    async def main():
        await cancel_in_sleep(pool, admin, 30, held)
        if stranded == "during its grace":
            await asyncio.sleep(0.02)

    try:
        run_loop(main)
        assert sum(e.worker.pending for e in pool._internal) == (stranded == "before it started")
        assert pool.stats()["cancelling"] == 1  # stats() looks: the canceller goes on in a thread
        wait_until(lambda: pool.stats()["cancels"] == 1 and pool.stats()["cancelling"] == 0)
        wait_until(lambda: held[0] not in server_threads(admin), timeout=3)
        s = pool.stats()
    finally:
        pool.close()
        admin.close()
    assert (s["size"], s["in_use"], s["discards"]) == (0, 0, {"interrupted": 1})


@pytest.mark.parametrize("loop_end", ["closed", "left open"])
def test_a_recovery_whose_thread_ended_is_not_lost(scratch_db, patched, monkeypatch, caplog, loop_end):
    # The recovery waits for the reply on a loop whose thread then ends: it
    # never runs again, and greenlet never frees it. The next look (stats(),
    # a checkout that has to wait) closes that connection, kills its
    # statement and frees the slot, instead of a PoolTimeout for good.
    monkeypatch.setattr("greenpatch.pool.CANCEL_GRACE", 5.0)  # the recovery would wait that long
    admin = pymysql.connect(**scratch_db, autocommit=True)
    pool = Pool(lambda: pymysql.connect(**scratch_db), name="recovery-ended", max_size=1, timeout=3)
    held = []
    during = []

    async def main():
        await cancel_in_sleep(pool, admin, 30, held)
        await asyncio.sleep(0.1)  # the recovery starts and waits for the reply
        during.append((pool._recovering, [(e.worker.pending, e.worker.dead) for e in pool._internal]))

    try:
        in_a_thread_that_ends(main, loop_end)
        assert during == [(1, [(False, False)])]  # parked: no thread would take it back
        looked = pool.stats()
        t0 = time.monotonic()
        conn = pool.checkout()  # from this thread, outside a worker
        waited = time.monotonic() - t0
        thread_id = conn.thread_id()
        pool.checkin(conn)
        wait_until(lambda: held[0] not in server_threads(admin), timeout=3)
        wait_until(lambda: pool.stats()["cancelling"] == 0)
        s = pool.stats()
    finally:
        pool.close()
        admin.close()
    assert (looked["size"], looked["in_use"], looked["recovering"]) == (0, 0, 0)
    assert waited < 1.0  # the slot was free
    assert thread_id != held[0]
    assert (s["size"], s["in_use"], s["recovering"], s["recoveries"]) == (1, 0, 0, 0)
    assert s["discards"] == {"holder_thread_ended": 1}
    assert s["cancels"] == 1
    assert "being recovered by a worker whose thread ended" in caplog.text
    assert pool._internal == []


@pytest.mark.parametrize("loop_end", ["closed", "left open"])
def test_a_canceller_whose_thread_ended_still_kills_the_statement(scratch_db, patched, monkeypatch, loop_end):
    # The canceller sleeps out its grace on a loop whose thread then ends:
    # the next look sends its KILL from a thread, once.
    monkeypatch.setattr("greenpatch.pool.CANCEL_GRACE", 5.0)
    admin = pymysql.connect(**scratch_db, autocommit=True)
    pool = Pool(lambda: pymysql.connect(**scratch_db), name="cancel-ended", max_size=1, ops=_NoRecovery())
    held = []

    async def main():
        await cancel_in_sleep(pool, admin, 30, held)
        await asyncio.sleep(0.05)  # the canceller starts its grace

    try:
        in_a_thread_that_ends(main, loop_end)
        t0 = time.monotonic()
        wait_until(lambda: pool.stats()["cancels"] == 1 and pool.stats()["cancelling"] == 0)
        killed_after = time.monotonic() - t0
        wait_until(lambda: held[0] not in server_threads(admin), timeout=3)
        time.sleep(0.2)
        s = pool.stats()
    finally:
        pool.close()
        admin.close()
    assert killed_after < 3.0  # not after the 5 s grace: that sleep never ends
    assert (s["cancels"], s["cancelling"]) == (1, 0)
    assert (s["size"], s["in_use"], s["discards"]) == (0, 0, {"interrupted": 1})
