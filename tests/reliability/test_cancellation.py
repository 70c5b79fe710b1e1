"""(4) Killed and cancelled work: nothing leaks, nothing half-done survives.

A client that disconnects mid-transaction gets its worker killed; a
``read_timeout`` fires in the middle of a transaction; a client gives up
while its request waits in the pool's queue; the server is stopped with
requests in flight. Each time: the pool ends with nothing in use or
waiting, the connection that was cut is discarded (never handed out again),
the transaction's writes are not there, and the next holder of a pooled
connection sees a clean session.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import time

import pytest
from rsupport import APP_USER, Threads, admin_connect, app_connection_ids, prepare_database, report

pytestmark = pytest.mark.private_server

READ_TIMEOUT = 2.0
CLEAN = {"in_transaction": 0, "autocommit": 1, "user_var": None, "lock": False, "temp_table": False}


@pytest.fixture
def server(db_server, start_server):
    prepare_database(db_server)
    server = start_server(
        db_server,
        pool={"max_size": 2, "timeout": 5, "reset": "full"},
        db_options={"read_timeout": READ_TIMEOUT, "connect_timeout": 2},
        graceful_timeout=1.0,
    )
    assert server.get("/session").ok  # the pool exists from now on
    server.wait_pool(lambda p: p["in_use"] == 0)
    return server


def send_raw(server, request: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(request)
    return sock


def post(path: str) -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode()


def sleeping_connection(db, timeout: float = 10.0) -> int:
    """Server-side id of the application connection running SELECT SLEEP (waits for one)."""
    deadline = time.monotonic() + timeout
    with contextlib.closing(admin_connect(db)) as admin, admin.cursor() as cur:
        while time.monotonic() < deadline:
            cur.execute(
                "SELECT ID FROM information_schema.PROCESSLIST"
                " WHERE USER = %s AND INFO LIKE 'SELECT SLEEP%%'",
                (APP_USER,),
            )
            row = cur.fetchone()
            if row:
                return row[0]
            time.sleep(0.02)
    raise AssertionError("no application connection ran SELECT SLEEP")


def row_exists(db, uid: str) -> bool:
    with contextlib.closing(admin_connect(db)) as admin, admin.cursor() as cur:
        cur.execute(
            "SELECT (SELECT COUNT(*) FROM rp_item WHERE uid = %s)"
            " + (SELECT COUNT(*) FROM rp_part WHERE item_uid = %s)",
            (uid, uid),
        )
        return cur.fetchone()[0] > 0


def session(server) -> dict:
    result = server.get("/session")
    assert result.ok, result
    return result.json()


def discards(pool: dict) -> int:
    return sum(pool["discards"].values())


def test_client_disconnect_mid_transaction(server, db_server):
    before = server.pool()
    sock = send_raw(server, post("/write?uid=gone-1&v=1&hold=30"))
    victim = sleeping_connection(db_server)  # the item is inserted, the transaction open
    assert server.pool()["in_use"] == 1
    sock.close()
    closed = time.monotonic()
    pool = server.wait_pool(lambda p: p["in_use"] == 0, timeout=5)
    released = time.monotonic() - closed
    state = session(server)
    # The pool KILLs the cut session from a fresh connection (without it the
    # server would run SLEEP on until it noticed the closed socket: up to 5 s).
    deadline = time.monotonic() + 10
    while victim in app_connection_ids(db_server) and time.monotonic() < deadline:
        time.sleep(0.05)
    server_side = time.monotonic() - closed
    again = server.get("/write?uid=gone-1&v=2")
    report(
        "client disconnect mid-transaction",
        pool_released_s=round(released, 3),
        server_side_transaction_outlived_request_s=round(server_side, 3),
        discards=pool["discards"],
        next_session=state,
    )
    assert released < 1.0
    assert server_side < 1.0
    assert discards(pool) == discards(before) + 1
    assert pool["size"] <= 1 and pool["waiting"] == 0
    assert state["conn"] != victim
    assert {k: state[k] for k in CLEAN} == CLEAN
    assert victim not in app_connection_ids(db_server)
    assert again.ok, again  # the abandoned transaction left no row behind


def test_client_disconnect_releases_the_transactions_locks_promptly(server, db_server):
    sock = send_raw(server, post("/write?uid=locked-1&v=1&hold=30"))
    sleeping_connection(db_server)
    sock.close()
    server.wait_pool(lambda p: p["in_use"] == 0, timeout=5)
    time.sleep(0.3)
    again = server.get("/write?uid=locked-1&v=2")  # waits for the row lock; read_timeout is 2 s
    report("same row written 0.3 s after a disconnect", status=again.status, elapsed=round(again.elapsed, 3))
    assert again.ok, again


def test_read_timeout_mid_transaction(server, db_server):
    before = server.pool()
    result = server.get("/write?uid=slow-1&v=1&hold=30")
    pool = server.wait_pool(lambda p: p["in_use"] == 0, timeout=5)
    state = session(server)
    report(
        "read_timeout (2 s) during a transaction",
        status=result.status,
        elapsed_s=round(result.elapsed, 3),
        body=result.body.decode(errors="replace").strip(),
        discards=pool["discards"],
        next_session=state,
    )
    assert result.status == 500
    assert b"OperationalError" in result.body and b"2013" in result.body, result.body
    assert READ_TIMEOUT <= result.elapsed < READ_TIMEOUT + 1.0
    assert discards(pool) == discards(before) + 1
    assert not row_exists(db_server, "slow-1")
    assert {k: state[k] for k in CLEAN} == CLEAN


def test_client_gives_up_while_waiting_for_the_pool(server, db_server):
    before = server.pool()
    holders = Threads(2, lambda i: server.get("/slow?s=1.5")).start()
    server.wait_pool(lambda p: p["in_use"] == 2)
    sock = send_raw(server, post("/write?uid=queued-1&v=1"))
    server.wait_pool(lambda p: p["waiting"] == 1)
    sock.close()
    gave_up = time.monotonic()
    server.wait_pool(lambda p: p["waiting"] == 0, timeout=5)
    left_queue = time.monotonic() - gave_up
    held = holders.join(timeout=20)
    pool = server.wait_pool(lambda p: p["in_use"] == 0)
    report("client gives up while queued for a connection", left_queue_s=round(left_queue, 3), pool=pool)
    assert left_queue < 1.0
    assert all(r.ok for r in held), held
    assert pool["timeouts"] == before["timeouts"]  # abandoned, not timed out
    assert pool["size"] <= 2 and pool["connecting"] == 0
    assert not row_exists(db_server, "queued-1")
    # Both connections serve again.
    again = Threads(2, lambda i: server.get("/slow?s=0.2")).start().join(timeout=20)
    assert all(r.ok for r in again), again


def test_next_holder_gets_a_clean_session_after_a_dirty_request(server, db_server):
    dirty = server.get("/dirty?uid=dirty-1")
    assert dirty.ok, dirty
    # The response is sent before the request's cleanup (request_finished:
    # checkin and reset) has run; wait for it, or /session gets the other one.
    server.wait_pool(lambda p: p["in_use"] == 0)
    state = session(server)
    pool = server.pool()
    report("session after a request left state behind (reset=full)", dirty=dirty.json(), next_session=state)
    assert state["conn"] == dirty.json()["conn"], "expected the same pooled connection back"
    assert {k: state[k] for k in CLEAN} == CLEAN
    assert state["isolation"] == "READ-COMMITTED"  # Django's session setup was redone
    assert not row_exists(db_server, "dirty-1")
    assert pool["discards"] == {}


def test_sigterm_with_transactions_in_flight(server, db_server):
    socks = [send_raw(server, post(f"/write?uid=term-{i}&v=1&hold=30")) for i in range(2)]
    try:
        deadline = time.monotonic() + 10
        while len(app_connection_ids(db_server)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        sleeping_connection(db_server)
        began = time.monotonic()
        code = server.stop(signal.SIGTERM, timeout=15)
        stopped = time.monotonic() - began
        answers = []
        for sock in socks:
            sock.settimeout(5)
            with contextlib.suppress(OSError):
                answers.append(sock.recv(1000))
    finally:
        for sock in socks:
            sock.close()
    report(
        "SIGTERM with 2 transactions in flight (graceful timeout 1 s)",
        exit_code=code,
        stopped_s=round(stopped, 3),
        answers=answers,
    )
    assert code == 0, server.log()
    assert stopped < 1.0 + 3.0
    assert answers == [b"", b""]  # the connections were closed, no partial response
    assert not row_exists(db_server, "term-0") and not row_exists(db_server, "term-1")
    assert "request(s) still in flight after 1 s: killing their workers" in server.log()
    assert not server.forbidden_log_lines()
