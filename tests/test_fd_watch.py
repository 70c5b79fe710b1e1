"""A GreenSocket keeps its registration with a loop between waits (hub.FdWatch).

Kept across queries, workers and idle time in a pool; moved when the socket
is used from another loop; removed - through its loop when that runs in
another thread - before the fd is closed, so that a reused fd number never
meets a stale selector entry.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import os
import signal
import socket
import threading
import time

import greenlet
import pymysql
import pytest
from conftest import run_green, run_loop
from tornado.ioloop import IOLoop

import greenpatch
from greenpatch import hub


def _registered(loop: IOLoop, fd: int) -> bool:
    return fd in loop.asyncio_loop._selector.get_map()


def _query(conn, sql="SELECT 1"):
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchone()


def _connected(db: dict, **kwargs):
    """A connection opened in the current worker that has waited on its socket once."""
    conn = pymysql.connect(**db, **kwargs)
    _query(conn)
    return conn


def _connected_on(loop: IOLoop, db: dict):
    """`_connected` in a worker on ``loop`` (not running; run here until done)."""

    async def main():
        return await greenpatch.spawn(_connected, db)

    return loop.run_sync(main)


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


class LoopThread:
    """An IOLoop running in its own thread, with helpers to run code there."""

    def __init__(self) -> None:
        started = threading.Event()

        def run() -> None:
            self.loop = IOLoop(make_current=False)
            self.loop.add_callback(started.set)
            self.loop.start()
            self.loop.close(all_fds=False)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert started.wait(10)

    def call(self, fn, *args):
        """Run fn(*args) as a loop callback in the thread; return its result."""
        out: concurrent.futures.Future = concurrent.futures.Future()

        def cb() -> None:
            try:
                out.set_result(fn(*args))
            except BaseException as e:
                out.set_exception(e)

        self.loop.add_callback(cb)
        return out.result(10)

    def green(self, fn, *args):
        """Run fn(*args) in a worker on the thread's loop; return its result."""
        out: concurrent.futures.Future = concurrent.futures.Future()

        async def main() -> None:
            try:
                out.set_result(await greenpatch.spawn(fn, *args))
            except BaseException as e:
                out.set_exception(e)

        self.loop.add_callback(main)
        return out.result(10)

    def stop(self) -> None:
        self.loop.add_callback(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def loop_thread():
    lt = LoopThread()
    yield lt
    lt.stop()


def test_registration_kept_across_queries_and_workers(db, patched):
    seen = {}

    async def main():
        loop = IOLoop.current()

        def first():
            conn = pymysql.connect(**db)
            for _ in range(5):
                assert _query(conn, "SELECT SLEEP(0.001)") == (0,)
            return conn

        conn = await greenpatch.spawn(first)
        fd, watch = conn._sock.fileno(), conn._sock._watch
        seen["idle"] = _registered(loop, fd) and watch.registered

        def second():
            assert _query(conn) == (1,)
            return conn._sock._watch

        seen["same_watch"] = await greenpatch.spawn(second) is watch
        await greenpatch.spawn(conn.close)
        seen["after_close"] = _registered(loop, fd) or watch.registered
        seen["fd_open"] = _fd_open(fd) and conn._sock is not None and conn._sock.fileno() == fd

    run_loop(main)
    assert seen == {"idle": True, "same_watch": True, "after_close": False, "fd_open": False}


def test_close_in_the_loops_thread_outside_a_worker(db, patched):
    loop = IOLoop(make_current=False)
    try:
        conn = _connected_on(loop, db)
        fd = conn._sock.fileno()
        assert _registered(loop, fd)
        conn.close()  # main greenlet, loop stopped: removed at once
        assert not _registered(loop, fd)
    finally:
        loop.close(all_fds=False)


def test_blocking_use_while_registered_with_a_stopped_loop(db, patched):
    loop = IOLoop(make_current=False)
    try:
        conn = _connected_on(loop, db)
        assert _registered(loop, conn._sock.fileno())
        # Outside any worker the socket blocks in select(): the registration
        # does not read, so it cannot take the reply.
        assert _query(conn, "SELECT 42") == (42,)
        conn.close()
    finally:
        loop.close(all_fds=False)


def test_event_with_nobody_waiting_removes_the_registration(db, patched):
    admin = pymysql.connect(**db)
    try:

        async def main():
            loop = IOLoop.current()
            conn = await greenpatch.spawn(_connected, db)
            fd, watch = conn._sock.fileno(), conn._sock._watch
            _query(admin, f"KILL CONNECTION {conn.thread_id():d}")  # the idle connection gets EOF
            for _ in range(100):
                await greenpatch.spawn(greenpatch.sleep, 0.01)
                if not watch.registered:
                    break
            removed = not watch.registered and not _registered(loop, fd)

            def use():
                with pytest.raises(pymysql.err.OperationalError):
                    _query(conn)
                return conn._sock is None or conn._closed

            return removed, await greenpatch.spawn(use)

        assert run_loop(main) == (True, True)
    finally:
        admin.close()


def test_close_from_another_thread_frees_the_fd_after_the_loop_removed_it(db, patched, loop_thread):
    conn = loop_thread.green(_connected, db)
    fd, thread_id = conn._sock.fileno(), conn.thread_id()
    assert loop_thread.call(_registered, loop_thread.loop, fd)

    # Hold the loop's thread, then close from here: the fd must stay open
    # (the loop still has it) while the connection itself ends at once.
    holding, release = threading.Event(), threading.Event()
    loop_thread.loop.add_callback(lambda: (holding.set(), release.wait(10)))
    assert holding.wait(10)
    try:
        conn.close()
        assert _fd_open(fd)
        admin = pymysql.connect(**db)
        try:
            for _ in range(100):
                ids = {r[0] for r in _query_all(admin, "SELECT ID FROM information_schema.PROCESSLIST")}
                if thread_id not in ids:
                    break
                threading.Event().wait(0.02)
            assert thread_id not in ids
        finally:
            admin.close()
    finally:
        release.set()

    assert loop_thread.call(_registered, loop_thread.loop, fd) is False
    assert not _fd_open(fd) or loop_thread.call(lambda: True)  # freed, or reused by now

    # fd numbers are reused lowest first: new connections on that loop work.
    def many():
        conns = [pymysql.connect(**db) for _ in range(3)]
        out = [_query(c, "SELECT 5") for c in conns]
        for c in conns:
            c.close()
        return out

    assert loop_thread.green(many) == [(5,)] * 3


def _query_all(conn, sql):
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchall()


def test_socket_moves_to_a_loop_in_another_thread(db, patched, loop_thread):
    conn = loop_thread.green(_connected, db)
    fd, first_watch = conn._sock.fileno(), conn._sock._watch

    async def main():
        loop = IOLoop.current()
        assert await greenpatch.spawn(_query, conn, "SELECT 6") == (6,)
        watch = conn._sock._watch
        return watch is not first_watch and watch.registered and _registered(loop, fd)

    assert run_loop(main)
    # The other loop let go of it (the removal was handed to it).
    assert loop_thread.call(_registered, loop_thread.loop, fd) is False
    assert first_watch.registered is False
    conn.close()  # its current loop is closed: nothing to remove, closed at once
    assert not _fd_open(fd) or conn._sock is None


def test_socket_back_on_a_loop_before_that_loop_removed_its_old_registration(db, patched, loop_thread):
    # Loop A has the socket registered; a worker on loop B uses it, which
    # hands A the removal of that registration; before A gets to it, a worker
    # already running on A uses the socket again and registers it anew. A's
    # late removal must then leave the new registration alone (or the worker
    # on A never wakes: here, a read timeout).
    conn = loop_thread.green(lambda: _connected(db, read_timeout=3))
    on_a, b_done = threading.Event(), threading.Event()

    def worker_on_a():
        on_a.set()
        assert b_done.wait(10)  # blocks loop A meanwhile, deliberately
        return _query(conn, "SELECT 2")

    result: concurrent.futures.Future = concurrent.futures.Future()
    threading.Thread(target=lambda: result.set_result(loop_thread.green(worker_on_a)), daemon=True).start()
    assert on_a.wait(10)
    try:
        assert run_green(_query, conn, "SELECT 1") == (1,)  # on loop B, in this thread
    finally:
        b_done.set()
    assert result.result(10) == (2,)
    assert loop_thread.call(_registered, loop_thread.loop, conn._sock.fileno())
    loop_thread.green(conn.close)


def test_socket_outlives_its_loop(db, patched):
    conn = run_green(_connected, db)  # that loop is closed now
    assert run_green(_query, conn, "SELECT 3") == (3,)
    assert run_green(_query, conn, "SELECT 4") == (4,)
    run_green(conn.close)


def test_dropped_without_close_removes_the_registration(db, patched):
    async def main():
        loop = IOLoop.current()

        def work():
            conn = pymysql.connect(**db)
            _query(conn)
            return conn._sock.fileno()

        fd = await greenpatch.spawn(work)  # the connection is garbage now
        gc.collect()
        return _registered(loop, fd)

    assert run_loop(main) is False


def test_read_and_write_registrations_replace_each_other(patched, monkeypatch):
    monkeypatch.setenv("GREENPATCH_TURN_BUDGET", "0")  # the reply waits: on a read registration
    a, b = socket.socketpair()
    try:
        green = greenpatch.socket.GreenSocket(a)
        big = b"x" * (8 << 20)  # more than the socket buffers: sendall waits for writable

        def work():
            green.sendall(big)
            return green._watch

        async def main():
            loop = IOLoop.current()
            received = bytearray()

            def drain():
                b.setblocking(False)
                while len(received) < len(big):
                    try:
                        received.extend(b.recv(1 << 20))
                    except BlockingIOError:
                        greenpatch.sleep(0.001)

            drainer = greenpatch.spawn(drain)
            watch = await greenpatch.spawn(work)
            await drainer
            write_watch = (watch.write, watch.registered, _registered(loop, a.fileno()))
            b.sendall(b"hello")
            buf = bytearray(5)
            n = await greenpatch.spawn(green.recv_into, buf)
            read_watch = green._watch
            return write_watch, watch.registered, read_watch.write, n, bytes(buf)

        assert run_loop(main) == ((True, True, True), False, False, 5, b"hello")
    finally:
        green.close()
        b.close()


def test_wait_fd_registers_only_for_the_call(patched):
    a, b = socket.socketpair()
    try:

        async def main():
            loop = IOLoop.current()
            during = []

            def work():
                loop.add_callback(lambda: (during.append(_registered(loop, a.fileno())), b.send(b"!")))
                hub.wait_fd(a.fileno())
                return a.recv(1)

            data = await greenpatch.spawn(work)
            return data, during, _registered(loop, a.fileno())

        assert run_loop(main) == (b"!", [True], False)
    finally:
        a.close()
        b.close()


def test_fd_watch_outside_a_worker_is_refused():
    a, b = socket.socketpair()
    try:
        with pytest.raises(hub.NotInWorkerError):
            hub.FdWatch(a.fileno())
    finally:
        a.close()
        b.close()


# -- waiting in place ------------------------------------------------------------------------


def _switches_during(fn):
    """fn()'s result and the number of greenlet switches while it ran."""
    switches = []
    previous = greenlet.settrace(lambda event, args: switches.append(event))
    try:
        result = fn()
    finally:
        greenlet.settrace(previous)
    return result, len(switches)


def test_a_worker_the_loop_resumed_waits_in_place_while_the_loop_is_idle(patched, in_place):
    # No loop iteration, no greenlet switch: the reply is read where the
    # worker waited.
    a, b = socket.socketpair()

    def waiter():
        greenpatch.sleep(0.01)  # resumed by the loop from here on
        watch = hub.FdWatch(a.fileno())
        threading.Timer(0.1, b.sendall, (b"x",)).start()
        _, switches = _switches_during(watch.wait)
        watch.release()
        return switches

    try:
        assert run_green(waiter) == 0
        assert [result for result, _ in in_place] == [True]
        assert 0.05 < in_place[0][1] < 1.0
    finally:
        a.close()
        b.close()


def test_a_worker_started_from_loop_code_switches_back_at_its_first_wait(patched, in_place):
    # spawn() from a coroutine runs the worker until its first wait: the
    # coroutine must get control back then, not when the socket is ready.
    a, b = socket.socketpair()
    order = []

    def waiter():
        hub.wait_fd(a.fileno())
        order.append("worker")

    async def main():
        future = greenpatch.spawn(waiter)
        order.append("coroutine")
        IOLoop.current().call_later(0.05, b.sendall, b"x")
        await future

    try:
        run_loop(main)
        assert order == ["coroutine", "worker"]
        assert in_place == []
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("other", ["timer", "threadsafe callback", "another worker's socket"])
def test_other_work_ends_a_wait_in_place_at_once(patched, in_place, other):
    # The worker waits in place for a reply 0.6 s away; whatever else the
    # loop has to do 0.1 s in runs then, not when the reply comes.
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    ran = {}

    def mark(what):
        ran[what] = time.monotonic() - started

    def first():
        greenpatch.sleep(0.01)  # resumed by the loop from here on
        if other == "timer":
            IOLoop.current().call_later(0.1, mark, "other")
        elif other == "threadsafe callback":
            loop = IOLoop.current()
            threading.Timer(0.1, loop.add_callback, (mark, "other")).start()
        threading.Timer(0.6, b.sendall, (b"x",)).start()
        hub.wait_fd(a.fileno())
        mark("first")

    def second():
        hub.wait_fd(c.fileno())
        mark("other")

    async def main():
        waits = [greenpatch.spawn(first)]
        if other == "another worker's socket":
            waits.append(greenpatch.spawn(second))  # parked: it was started by this coroutine
            threading.Timer(0.1, d.sendall, (b"x",)).start()
        await asyncio.gather(*waits)

    started = time.monotonic()
    try:
        run_loop(main)
    finally:
        for s in (a, b, c, d):
            s.close()
    assert 0.09 < ran["other"] < 0.35, ran
    assert 0.55 < ran["first"] < 2, ran
    assert in_place and in_place[0][0] is False  # it did wait in place, and gave up for the other
    assert 0.05 < in_place[0][1] < 0.35, in_place


def test_an_exception_in_a_wait_in_place_removes_the_registration(patched):
    # A signal handler that raises while the worker waits in place (the
    # worker runs in the main thread, so the handler runs in it): the
    # exception reaches the worker, and the fd is not left registered.
    a, b = socket.socketpair()

    class Alarm(Exception):
        pass

    def on_alarm(signum, frame):
        raise Alarm

    def waiter():
        greenpatch.sleep(0.01)  # resumed by the loop from here on
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        with pytest.raises(Alarm):
            hub.wait_fd(a.fileno())
        return _registered(IOLoop.current(), a.fileno())

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        assert run_green(waiter) is False
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        a.close()
        b.close()


def test_close_after_the_loops_thread_ended_frees_the_fd_at_once(db, patched):
    # Nothing will run that loop again: the removal cannot wait for it.
    box = {}

    def run():
        loop = box["loop"] = IOLoop(make_current=False)
        box["conn"] = loop.run_sync(lambda: greenpatch.spawn(_connected, db))
        # The thread ends with its loop stopped, not closed.

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    loop, conn = box["loop"], box.pop("conn")
    fd = conn._sock.fileno()
    assert _registered(loop, fd)
    conn.close()
    assert not _registered(loop, fd)
    assert not _fd_open(fd)
    loop.close(all_fds=False)
