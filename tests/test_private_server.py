"""Faults that need a server we are allowed to break (a `PrivateMariaDB`).

The shared server is only used, read-only, by bystander workers that must
not notice the private server's trouble.
"""

from __future__ import annotations

import asyncio
import time

import pymysql
import pytest
from conftest import run_green, run_loop
from private_mariadb import private_mariadb_fixture
from pymysql.constants import CR
from tornado.ioloop import PeriodicCallback

import greenpatch
from greenpatch.socket import GreenSocket

pytestmark = pytest.mark.private_server

LOST = (CR.CR_SERVER_GONE_ERROR, CR.CR_SERVER_LOST)  # 2006, 2013

# This module's private server (killed and restarted by the tests)...
private_mariadb = private_mariadb_fixture()
# ...and a second one, only for the wait_timeout tests.
short_wait_server = private_mariadb_fixture(wait_timeout=1)


@pytest.fixture
def server(private_mariadb):
    """The module's private server, running again after each test."""
    yield private_mariadb
    if not private_mariadb.running:
        private_mariadb.start()


def _scalar(conn, sql: str, args=None):
    with conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchone()[0]


def test_server_killed_during_query(patched, server, db):
    ticks: list[float] = []
    state: dict = {}

    def victim():
        conn = pymysql.connect(**server.params)
        try:
            assert isinstance(conn._sock, GreenSocket)
            state["query_sent"] = time.monotonic()
            with pytest.raises(pymysql.err.OperationalError) as info:
                _scalar(conn, "SELECT SLEEP(5)")
            state["failed"] = time.monotonic()
            return info.value
        finally:
            conn.close()

    def bystander():
        # Uses the shared server: keeps querying through the whole episode.
        conn = pymysql.connect(**db)
        done = after = 0
        try:
            # Go on until a few queries were served after the failure too.
            while "failed" not in state or done < 5 or after < 3:
                assert _scalar(conn, "SELECT %s + 1", (done,)) == done + 1
                done += 1
                after += "failed" in state
                greenpatch.sleep(0.02)
        finally:
            conn.close()
        return done

    async def main():
        pc = PeriodicCallback(lambda: ticks.append(time.monotonic()), 10)
        pc.start()
        try:
            victim_future = greenpatch.spawn(victim)
            bystander_future = greenpatch.spawn(bystander)
            while "query_sent" not in state:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)  # SLEEP(5) is now running on the server
            assert not victim_future.done()
            state["killed"] = time.monotonic()
            server.kill()  # SIGKILL; returns once the process is reaped (ms)
            error = await asyncio.wait_for(victim_future, 3)
            done = await asyncio.wait_for(bystander_future, 5)
        finally:
            pc.stop()
        return error, done

    error, done = run_loop(main, timeout=30)
    assert error.args[0] in LOST, error
    assert state["failed"] - state["killed"] < 1.0
    assert done >= 5
    # The loop ran callbacks before, during and after the failure.
    assert any(t < state["killed"] for t in ticks)
    assert any(t > state["failed"] for t in ticks)
    assert len(ticks) >= 20


def test_connect_while_server_down_fails_promptly(patched, server):
    server.kill()

    def work():
        begin = time.monotonic()
        with pytest.raises(pymysql.err.OperationalError) as info:
            pymysql.connect(**server.params, connect_timeout=5)
        return info.value, time.monotonic() - begin

    error, elapsed = run_green(work, timeout=20)
    assert error.args[0] == CR.CR_CONN_HOST_ERROR
    assert elapsed < 1.0


def test_server_restarted(patched, server):
    async def main():
        def before():
            conn = pymysql.connect(**server.params)
            assert _scalar(conn, "SELECT 1") == 1
            return conn

        old_conn = await greenpatch.spawn(before)
        # Restart from a thread so that this loop keeps running meanwhile.
        await asyncio.get_running_loop().run_in_executor(None, server.restart)

        def after():
            # The connection from before the restart is gone...
            with pytest.raises(pymysql.err.OperationalError) as info:
                _scalar(old_conn, "SELECT 1")
            old_conn.close()
            # ...a new one works, and so does a green reconnect.
            conn = pymysql.connect(**server.params)
            try:
                assert isinstance(conn._sock, GreenSocket)
                assert _scalar(conn, "SELECT 41 + 1") == 42
            finally:
                conn.close()
            conn.connect()  # reopening the same Connection object is green too
            try:
                assert isinstance(conn._sock, GreenSocket)
                return info.value, _scalar(conn, "SELECT 1")
            finally:
                conn.close()

        return await greenpatch.spawn(after)

    error, one = run_loop(main, timeout=30)
    assert error.args[0] in LOST, error
    assert one == 1


def test_idle_green_connection_after_wait_timeout(patched, short_wait_server):
    def work():
        conn = pymysql.connect(**short_wait_server.params)
        try:
            assert _scalar(conn, "SELECT @@session.wait_timeout") == 1
            greenpatch.sleep(2)  # the loop runs; the server drops us after 1 s
            begin = time.monotonic()
            with pytest.raises(pymysql.err.OperationalError) as info:
                _scalar(conn, "SELECT 1")
            return info.value, time.monotonic() - begin
        finally:
            conn.close()

    error, elapsed = run_green(work, timeout=20)
    assert error.args[0] in LOST, error
    assert elapsed < 1.0


def test_idle_green_connection_used_outside_loop_after_wait_timeout(patched, short_wait_server):
    # Opened in a worker, then idle with no loop running at all, then used
    # from the main greenlet (blocking fallback): still an error, not a hang.
    def open_conn():
        conn = pymysql.connect(**short_wait_server.params, read_timeout=10)
        assert _scalar(conn, "SELECT 1") == 1
        return conn

    conn = run_green(open_conn)
    try:
        time.sleep(2)
        begin = time.monotonic()
        with pytest.raises(pymysql.err.OperationalError) as info:
            _scalar(conn, "SELECT 1")
        elapsed = time.monotonic() - begin
    finally:
        conn.close()
    assert info.value.args[0] in LOST, info.value
    assert elapsed < 1.0
