"""PyMySQL through the green socket, against the real server."""

from __future__ import annotations

import asyncio
import fcntl
import socket
import threading
import time

import pymysql
import pytest
from conftest import run_green, run_loop
from pymysql.constants import CR
from tornado.ioloop import PeriodicCallback

import greenpatch
from greenpatch.socket import GreenSocket


def sleep_query(params, seconds=0.5):
    conn = pymysql.connect(**params)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT SLEEP(%s), CONNECTION_ID()", (seconds,))
            return cur.fetchone(), type(conn._sock)
    finally:
        conn.close()


def _concurrent_sleeps(db, n=10, seconds=0.5):
    ticks = []

    async def main():
        pc = PeriodicCallback(lambda: ticks.append(1), 20)
        pc.start()
        t0 = time.monotonic()
        results = await asyncio.gather(*(greenpatch.spawn(sleep_query, db, seconds) for _ in range(n)))
        pc.stop()
        return time.monotonic() - t0, results

    elapsed, results = run_loop(main)
    return elapsed, results, len(ticks)


def test_ten_sleeps_run_concurrently_when_patched(db, patched):
    elapsed, results, ticks = _concurrent_sleeps(db)
    assert all(sock is GreenSocket for _, sock in results)
    assert len({row[1] for row, _ in results}) == 10
    assert elapsed < 1.0, f"10 x SLEEP(0.5) took {elapsed:.2f}s: not concurrent"
    # The loop kept serving its own callbacks while the queries ran.
    assert ticks >= 0.5 * elapsed / 0.02


def test_same_workload_unpatched_takes_the_sum(db):
    greenpatch.unpatch_all()
    elapsed, results, ticks = _concurrent_sleeps(db, n=4)
    assert all(sock is socket.socket for _, sock in results)
    assert elapsed >= 4 * 0.5 * 0.95
    # The loop was blocked throughout: hardly a tick.
    assert ticks <= 3


def test_read_timeout_raises_2013_and_closes(db, patched):
    def fn():
        conn = pymysql.connect(**db, read_timeout=0.3)
        t0 = time.monotonic()
        with pytest.raises(pymysql.OperationalError) as info:
            with conn.cursor() as cur:
                cur.execute("SELECT SLEEP(2)")
        took = time.monotonic() - t0
        assert info.value.args[0] == CR.CR_SERVER_LOST
        assert not conn.open
        with pytest.raises(pymysql.err.InterfaceError):
            conn.cursor().execute("SELECT 1")
        # The worker goes on with a fresh connection.
        conn2 = pymysql.connect(**db)
        with conn2.cursor() as cur:
            cur.execute("SELECT 42")
            assert cur.fetchone() == (42,)
        conn2.close()
        return took

    took = run_green(fn)
    assert 0.25 <= took < 1.0, took


@pytest.fixture
def black_hole():
    """A loopback port whose accept queue is full: connects hang."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(5):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(s)
    time.sleep(0.05)
    yield port
    for s in fillers:
        s.close()
    listener.close()


def test_connect_timeout_raises_2003(black_hole, patched):
    def fn():
        t0 = time.monotonic()
        with pytest.raises(pymysql.OperationalError) as info:
            pymysql.connect(host="127.0.0.1", port=black_hole, user="root", connect_timeout=0.3)
        return info.value, time.monotonic() - t0

    exc, took = run_green(fn)
    assert exc.args[0] == CR.CR_CONN_HOST_ERROR
    assert "timed out" in exc.args[1]
    assert 0.25 <= took < 1.5


def test_refused_and_unknown_host_raise_2003(patched):
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()

    def fn():
        errors = []
        for kwargs in ({"host": "127.0.0.1", "port": port}, {"host": "no-such-host.invalid"}):
            with pytest.raises(pymysql.OperationalError) as info:
                pymysql.connect(user="root", connect_timeout=5, **kwargs)
            errors.append(info.value.args)
        return errors

    (refused, unknown) = run_green(fn)
    assert refused[0] == CR.CR_CONN_HOST_ERROR and "refused" in refused[1].lower()
    assert unknown[0] == CR.CR_CONN_HOST_ERROR


def test_server_side_kill_during_query(db, patched):
    def victim():
        conn = pymysql.connect(**db)
        with conn.cursor() as cur:
            cur.execute("SELECT CONNECTION_ID()")
            ids.append(cur.fetchone()[0])
            with pytest.raises(pymysql.OperationalError) as info:
                cur.execute("SELECT SLEEP(5)")
        assert not conn.open or info.value.args[0] in (CR.CR_SERVER_LOST, 1927)
        return info.value.args[0]

    def killer():
        while not ids:
            greenpatch.sleep(0.01)
        greenpatch.sleep(0.1)
        conn = pymysql.connect(**db)
        with conn.cursor() as cur:
            cur.execute("KILL %s", (ids[0],))
        conn.close()

    ids = []

    async def main():
        t0 = time.monotonic()
        code, _ = await asyncio.gather(greenpatch.spawn(victim), greenpatch.spawn(killer))
        return code, time.monotonic() - t0

    code, took = run_loop(main)
    # MariaDB answers a killed query with "Connection was killed" (1927) or drops it (2013).
    assert code in (1927, CR.CR_SERVER_LOST)
    assert took < 2


def test_unix_socket(db, patched):
    admin = pymysql.connect(**db)
    with admin.cursor() as cur:
        cur.execute("SELECT @@socket")
        path = cur.fetchone()[0]
    admin.close()

    def fn():
        conn = pymysql.connect(unix_socket=path, user=db["user"], password=db["password"])
        try:
            assert isinstance(conn._sock, GreenSocket)
            assert conn._sock.family == socket.AF_UNIX
            with conn.cursor() as cur:
                cur.execute("SELECT SLEEP(0.3), 'unix'")
                return cur.fetchone(), conn.host_info
        finally:
            conn.close()

    async def main():
        t0 = time.monotonic()
        results = await asyncio.gather(*(greenpatch.spawn(fn) for _ in range(3)))
        return results, time.monotonic() - t0

    results, took = run_loop(main)
    assert all(r == ((0, "unix"), "Localhost via UNIX socket") for r in results)
    assert took < 0.8


def test_blocking_fallback_from_thread_and_main_greenlet_while_workers_run(db, patched):
    outside = {}

    def plain_query(tag):
        conn = pymysql.connect(**db)
        with conn.cursor() as cur:
            cur.execute("SELECT SLEEP(0.2), %s", (tag,))
            outside[tag] = (cur.fetchone()[1], type(conn._sock))
        conn.close()

    async def main():
        workers = [greenpatch.spawn(sleep_query, db, 0.4) for _ in range(3)]
        thread = threading.Thread(target=plain_query, args=("thread",))
        thread.start()
        # The main greenlet (the hub itself) uses a blocking socket: it
        # blocks the loop for its 0.2 s, but works.
        plain_query("main")
        results = await asyncio.gather(*workers)
        thread.join()
        return results

    results = run_loop(main)
    assert all(sock is GreenSocket for _, sock in results)
    assert outside == {"thread": ("thread", socket.socket), "main": ("main", socket.socket)}


def test_green_connection_used_outside_worker_after_loop_stops(db, patched):
    conn = run_green(pymysql.connect, **db)
    assert isinstance(conn._sock, GreenSocket)
    with conn.cursor() as cur:
        cur.execute("SELECT SLEEP(0.05), 'blocking'")
        assert cur.fetchone() == (0, "blocking")
    # And from another thread.
    out = []

    def use():
        with conn.cursor() as cur:
            cur.execute("SELECT 'thread'")
            out.append(cur.fetchone()[0])

    t = threading.Thread(target=use)
    t.start()
    t.join()
    assert out == ["thread"]
    conn.close()
    assert not conn.open


def test_worker_killed_mid_query_closes_its_connection(db, patched):
    held = []

    def victim():
        conn = pymysql.connect(**db)
        held.append(conn)
        with conn.cursor() as cur:
            cur.execute("SELECT SLEEP(3)")

    async def main():
        fut = greenpatch.spawn(victim)
        await asyncio.sleep(0.2)
        fut.cancel()
        await asyncio.sleep(0.05)
        return fut

    t0 = time.monotonic()
    fut = run_loop(main)
    assert time.monotonic() - t0 < 1.5
    assert fut.cancelled()
    assert not held[0].open, "a killed query must not leave its connection usable"


@pytest.mark.parametrize("keep_on_kill", [False, True])
@pytest.mark.parametrize("then", ["reattach", "close again", "drop"])
def test_a_kill_while_a_reply_is_due_holds_the_socket_only_when_asked(keep_on_kill, then):
    # keep_on_kill (set by the pool): a worker killed while it waits for the
    # reply to what it sent whole leaves the socket open but held - closed to
    # the driver (close() holds it) until reattach() opens it again or a
    # second close(), or the GreenSocket's end, closes it for good.
    import gc

    a, peer = socket.socketpair()
    green = GreenSocket(a)
    green.keep_on_kill = keep_on_kill
    fd = a.fileno()

    def ask():
        green.sendall(b"request")
        green.recv_into(bytearray(16))

    async def main():
        fut = greenpatch.spawn(ask)
        await asyncio.sleep(0.05)
        fut.cancel()
        await asyncio.sleep(0.01)
        green.close()  # what PyMySQL does on the way out of the kill

    try:
        run_loop(main)
        assert peer.recv(16) == b"request"
        assert green.cut and green.fileno() == -1
        assert green.held is keep_on_kill
        if not keep_on_kill:
            assert not green.reattach()
            assert peer.recv(16) == b""  # closed at the kill
            return
        if then == "reattach":
            assert green.reattach() and not green.cut and green.fileno() == fd
            peer.sendall(b"reply")
            buf = bytearray(16)
            assert run_green(green.recv_into, buf) == 5 and bytes(buf[:5]) == b"reply"
            green.close()
        elif then == "close again":
            green.close()
        else:
            del green
            gc.collect()
        peer.settimeout(2)
        assert peer.recv(16) == b""  # closed for good
    finally:
        peer.close()


def test_a_reply_already_there_after_a_send_is_read_at_once_in_and_out_of_workers():
    # After sendall() a plain GreenSocket waits for readability before its
    # first recv (the reply to what was sent cannot be there yet, usually);
    # when it already is, the wait returns at once and nothing is lost.
    def exchange(green, peer):
        peer.sendall(b"early reply")  # in the socket before the request is even sent
        green.sendall(b"request")
        assert green._awaiting_reply
        buf = bytearray(64)
        n = green.recv_into(buf)
        assert not green._awaiting_reply
        assert peer.recv(64) == b"request"
        peer.sendall(b"second")
        m = green.recv_into(memoryview(buf)[n:])  # no send in between: straight to recv
        return bytes(buf[: n + m])

    for where in ("worker", "main greenlet"):
        a, b = socket.socketpair()
        green = GreenSocket(a)
        try:
            if where == "worker":
                got = run_green(exchange, green, b)
            else:
                got = exchange(green, b)
            assert got == b"early replysecond", where
        finally:
            green.close()
            b.close()


def test_blocking_fallback_waits_on_fds_above_1024():
    # A server process has more than 1024 fds open: select() cannot take
    # them (ValueError), so the blocking fallback must not use it.
    a, b = socket.socketpair()
    high = socket.socket(fileno=fcntl.fcntl(a.fileno(), fcntl.F_DUPFD, 1500))
    a.close()
    assert high.fileno() >= 1024
    green = GreenSocket(high)
    timer = threading.Timer(0.1, b.sendall, (b"late",))
    timer.start()
    try:
        buf = bytearray(16)
        green.sendall(b"request")  # then wait for the reply, which comes 0.1 s later
        started = time.monotonic()
        n = green.recv_into(buf)
        assert bytes(buf[:n]) == b"late"
        assert time.monotonic() - started >= 0.05
        green.settimeout(0.05)
        with pytest.raises(TimeoutError):
            green.recv_into(buf)  # nothing more comes
    finally:
        timer.join()
        green.close()
        b.close()
