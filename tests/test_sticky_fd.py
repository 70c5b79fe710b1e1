"""Proposed tests for wait_fd(owner=...): the registration outlives a wait only while the worker runs."""

import pymysql
from conftest import run_loop

import greenpatch
from greenpatch import hub


def _registered(loop, fd):
    return fd in loop.asyncio_loop._selector.get_map()


def test_fd_registered_only_while_the_worker_runs(db, patched):
    seen = {}

    def work(loop):
        conn = pymysql.connect(**db)
        fd = conn._sock.fileno()
        seen["fd"] = fd
        with conn.cursor() as cur:
            for _ in range(20):
                cur.execute("SELECT SLEEP(0.001)")  # the worker waits on the socket each time
                cur.fetchone()
        seen["kept_while_running"] = _registered(loop, fd)
        greenpatch.sleep(0.01)  # parking on anything else drops it
        seen["after_other_park"] = _registered(loop, fd)
        with conn.cursor() as cur:
            cur.execute("SELECT SLEEP(0.001)")
            cur.fetchone()
        conn.close()  # closing drops it before the fd can be reused
        seen["after_close"] = _registered(loop, fd)
        return conn

    async def main():
        from tornado.ioloop import IOLoop

        loop = IOLoop.current()
        conn = await greenpatch.spawn(work, loop)
        seen["after_exit"] = _registered(loop, seen["fd"])
        return conn

    run_loop(main)
    assert seen == {
        "fd": seen["fd"],
        "kept_while_running": True,
        "after_other_park": False,
        "after_close": False,
        "after_exit": False,
    }


def test_registration_dropped_when_worker_ends_without_closing(db, patched):
    held = []

    def work():
        conn = pymysql.connect(**db)
        held.append(conn)
        with conn.cursor() as cur:
            cur.execute("SELECT SLEEP(0.001)")
            cur.fetchone()
        return conn._sock.fileno()

    async def main():
        from tornado.ioloop import IOLoop

        fd = await greenpatch.spawn(work)
        return _registered(IOLoop.current(), fd)

    assert run_loop(main) is False
    # The connection still works outside any worker (blocking fallback).
    with held[0].cursor() as cur:
        cur.execute("SELECT 7")
        assert cur.fetchone() == (7,)
    held[0].close()


def test_release_fd_outside_worker_is_a_noop():
    hub.release_fd(object())
