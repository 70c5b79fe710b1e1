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


class CountingSocket(socket.socket):
    """A socket that counts its reads that found nothing (EAGAIN)."""

    empty_reads = 0

    def recv_into(self, *args):
        try:
            return super().recv_into(*args)
        except BlockingIOError:
            self.empty_reads += 1
            raise


def counting_pair():
    a, peer = socket.socketpair()
    return CountingSocket(fileno=a.detach()), peer


def run_ticking(fn, *args):
    """Run ``fn(ticks, *args)`` in a worker while a loop callback counts the
    loop's iterations in ``ticks[0]`` (it keeps one callback always queued)."""
    ticks = [0]
    done = False

    def tick():
        ticks[0] += 1
        if not done:
            asyncio.get_running_loop().call_soon(tick)

    async def main():
        nonlocal done
        asyncio.get_running_loop().call_soon(tick)
        try:
            return await greenpatch.spawn(fn, ticks, *args)
        finally:
            done = True

    return run_loop(main)


def _exchanges(ticks, green, peer, n, between=None):
    """``n`` request/reply exchanges whose reply is in the socket before the
    request is sent; the loop iterations counted after each (``between(i)``
    runs before exchange ``i``)."""
    seen = []
    for i in range(n):
        if between is not None:
            between(i)
        peer.sendall(b"reply %d" % i)
        green.sendall(b"request %d" % i)
        buf = bytearray(16)
        got = bytes(buf[: green.recv_into(buf)])
        assert got == b"reply %d" % i and peer.recv(16) == b"request %d" % i
        seen.append(ticks[0])
    return seen


def test_by_default_there_is_no_turn_budget(monkeypatch):
    from greenpatch import config

    monkeypatch.delenv("GREENPATCH_TURN_BUDGET", raising=False)
    a, peer = socket.socketpair()
    green = GreenSocket(a)
    try:
        assert green._turn_budget == config.DEFAULT_TURN_BUDGET == 0.0
    finally:
        green.close()
        peer.close()


@pytest.mark.parametrize("turn_budget", [None, "0"], ids=["unset", "0"])
def test_with_no_turn_budget_every_reply_waits_for_a_turn_of_the_loop(monkeypatch, turn_budget):
    # GREENPATCH_TURN_BUDGET unset or 0: a worker that sent a request waits for the
    # next turn of its loop before it reads the reply, even one already
    # there, so the loop's other callbacks (other workers) run between its
    # queries.
    if turn_budget is None:
        monkeypatch.delenv("GREENPATCH_TURN_BUDGET", raising=False)
    else:
        monkeypatch.setenv("GREENPATCH_TURN_BUDGET", turn_budget)
    a, peer = counting_pair()
    green = GreenSocket(a)
    try:
        seen = run_ticking(_exchanges, green, peer, 5)
    finally:
        green.close()
        peer.close()
    assert seen == sorted(set(seen)), seen  # strictly increasing
    assert a.empty_reads == 0


def test_within_the_turn_budget_a_reply_already_there_is_read_without_a_turn(monkeypatch):
    # For GREENPATCH_TURN_BUDGET seconds of a turn of the loop, a worker
    # reads the replies that are already there at once; then it waits for
    # the next turn, which has a budget of its own.
    monkeypatch.setenv("GREENPATCH_TURN_BUDGET", "0.2")
    a, peer = counting_pair()
    green = GreenSocket(a)

    def between(i):
        if i == 3:
            time.sleep(0.25)  # the budget runs out (a blocking call: no turn)

    try:
        seen = run_ticking(_exchanges, green, peer, 6, between)
    finally:
        green.close()
        peer.close()
    # 0, 1, 2: read first; 3: waits for the next turn; 4, 5: read first in it
    assert seen[0] == seen[1] == seen[2] < seen[3] == seen[4] == seen[5], seen
    assert a.empty_reads == 0


@pytest.mark.parametrize("spent", [False, True], ids=["left", "spent"])
def test_the_workers_of_a_turn_share_its_budget(monkeypatch, spent):
    # Two workers run in the same turn of the loop: what the first spends of
    # the turn's budget, the second does not have. With the budget spent,
    # the second's reply waits for the next turn, which has a new budget.
    monkeypatch.setenv("GREENPATCH_TURN_BUDGET", "0.2")
    pairs = [counting_pair() for _ in range(2)]
    greens = [GreenSocket(a) for a, _ in pairs]

    def first(ticks):
        _exchanges(ticks, greens[0], pairs[0][1], 1)
        if spent:
            time.sleep(0.25)  # blocking: the turn's budget is gone

    def second(ticks):
        before = ticks[0]
        return (before, *_exchanges(ticks, greens[1], pairs[1][1], 2))

    def both(ticks):  # started in the same turn, first before second
        a, b = greenpatch.spawn(first, ticks), greenpatch.spawn(second, ticks)
        greenpatch.wait(a)
        return greenpatch.wait(b)

    try:
        before, after, after_next = run_ticking(both)
    finally:
        for green, (_, peer) in zip(greens, pairs, strict=True):
            green.close()
            peer.close()
    if spent:
        assert after > before  # waited for the next turn
        assert after_next == after  # whose budget it had: read first
    else:
        assert after == after_next == before  # both read first, in the first worker's turn
    assert [a.empty_reads for a, _ in pairs] == [0, 0]


def test_a_closed_loop_is_not_kept_for_its_turn_budget(monkeypatch):
    # A loop stopped and closed right after a reply read first never runs the
    # callback that ends its turn: its entry goes when a worker of another
    # loop of the thread reads first.
    from tornado.ioloop import IOLoop

    from greenpatch import hub

    monkeypatch.setenv("GREENPATCH_TURN_BUDGET", "10")
    a, peer = counting_pair()
    green = GreenSocket(a)
    loop = IOLoop(make_current=False)
    aloop = loop.asyncio_loop

    def exchange_then_stop():
        aloop.call_soon(lambda: None)  # something else queued: read first
        _exchanges([0], green, peer, 1)
        loop.stop()

    try:
        loop.add_callback(greenpatch.spawn, exchange_then_stop)
        loop.start()
        loop.close(all_fds=False)
        assert aloop in hub._by_loop.turns  # left behind
        run_ticking(_exchanges, green, peer, 1)
    finally:
        green.close()
        peer.close()
    assert aloop not in hub._by_loop.turns


def _late_reply(ticks, green, peer):
    # One exchange whose reply is there, then one whose reply comes later.
    out = []
    for reply_later in (False, True):
        green.sendall(b"request")
        if reply_later:
            threading.Timer(0.05, peer.sendall, (b"late reply",)).start()
        else:
            peer.sendall(b"reply")
        buf = bytearray(16)
        t0 = time.monotonic()
        out.append((bytes(buf[: green.recv_into(buf)]), time.monotonic() - t0))
        assert peer.recv(16) == b"request"
    return out


def test_a_reply_read_first_that_is_not_there_yet_is_waited_for(monkeypatch):
    # Reading first finds nothing (EAGAIN): the worker waits for the reply as
    # usual.
    monkeypatch.setenv("GREENPATCH_TURN_BUDGET", "10")
    a, peer = counting_pair()
    green = GreenSocket(a)
    try:
        (first, _), (second, waited) = run_ticking(_late_reply, green, peer)
    finally:
        green.close()
        peer.close()
    assert (first, second) == (b"reply", b"late reply")
    assert waited >= 0.04
    assert a.empty_reads == 1


def test_with_nothing_else_queued_on_the_loop_a_worker_does_not_read_first(monkeypatch):
    # Nobody else waits for a turn: the worker waits in place until the reply
    # is there (no read that fails with EAGAIN), within the budget or not.
    monkeypatch.setenv("GREENPATCH_TURN_BUDGET", "10")
    a, peer = counting_pair()
    green = GreenSocket(a)
    try:
        (first, _), (second, waited) = run_green(_late_reply, [0], green, peer)
    finally:
        green.close()
        peer.close()
    assert (first, second) == (b"reply", b"late reply") and waited >= 0.04
    assert a.empty_reads == 0


@pytest.mark.parametrize("turn_budget", ["0", "0.001", "10"])
def test_workers_each_get_their_own_replies_with_any_turn_budget(db, patched, monkeypatch, turn_budget):
    # Many workers on one loop, each on its own connection, queries of
    # results large and small: whether a worker reads first or waits first,
    # every reply goes to the worker that asked for it, and a reply larger
    # than what one read takes is read whole.
    monkeypatch.setenv("GREENPATCH_TURN_BUDGET", turn_budget)

    def asker(n):
        conn = pymysql.connect(**db)
        try:
            assert isinstance(conn._sock, GreenSocket)
            got = []
            with conn.cursor() as cur:
                for i in range(25):
                    size = 100_000 if i % 5 == 0 else 10
                    cur.execute("SELECT %s, %s, REPEAT('x', %s)", (n, i, size))
                    a, b, text = cur.fetchone()
                    got.append((a, b, len(text)))
            return got
        finally:
            conn.close()

    async def main():
        return await asyncio.gather(*(greenpatch.spawn(asker, n) for n in range(8)))

    results = run_loop(main)
    assert results == [[(n, i, 100_000 if i % 5 == 0 else 10) for i in range(25)] for n in range(8)]


@pytest.mark.parametrize("value", ["-1", "soon", "nan", "inf"])
def test_a_bad_turn_budget_is_refused_at_patch_all_naming_the_setting(monkeypatch, value):
    from greenpatch import config
    from greenpatch.config import ConfigError

    assert config.turn_budget({}) == config.DEFAULT_TURN_BUDGET
    assert config.turn_budget({"GREENPATCH_TURN_BUDGET": "0"}) == 0.0
    assert config.turn_budget({"GREENPATCH_TURN_BUDGET": " 0.001 "}) == 0.001
    monkeypatch.setenv("GREENPATCH_TURN_BUDGET", value)
    before = greenpatch.patched()
    with pytest.raises(ConfigError) as info:
        greenpatch.patch_all()
    assert str(info.value).startswith(f"GREENPATCH_TURN_BUDGET={value!r} is not accepted; accepted values:")
    assert greenpatch.patched() == before  # refused before patching anything


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
