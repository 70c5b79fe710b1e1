"""(1) The database server restarts (or crashes) while 64 clients write and read.

Through the whole stack (HTTP -> Tornado -> worker greenlet -> Django ORM ->
greenpatch pool -> PyMySQL on a GreenSocket -> mariadbd):

* before the fault every request succeeds;
* during the outage requests fail fast with a 5xx (never a hang, never a
  dropped HTTP connection);
* once mariadbd accepts logins again, every request started more than
  RECOVERY_BOUND seconds later succeeds;
* afterwards every write acknowledged with a 2xx is in the table, whole
  (count and checksum), and no write that got an error is half applied;
* the pool ends with nothing in use or waiting.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from rsupport import Pinger, WriteReadLoad, check_writes, prepare_database, report

pytestmark = pytest.mark.private_server

CLIENTS = 64
POOL = {"max_size": 20, "timeout": 5}
DB_OPTIONS = {"connect_timeout": 2, "read_timeout": 10, "write_timeout": 10}
# A request failing during the outage answers within this: the slowest path is
# connect_timeout (a refused connect is immediate) plus a little CPU.
FAIL_FAST = 2.5
# Seconds after mariadbd accepts logins again by which every request succeeds.
RECOVERY_BOUND = 2.0
WARMUP = 1.5
AFTER = 3.0


@pytest.mark.parametrize(
    "how, outage, check",
    [("stop", 2.0, "auto"), ("kill", 2.0, "auto"), ("kill", 0.0, "auto"), ("kill", 0.0, "always")],
    ids=[
        "clean-stop-2s",
        "sigkill-2s",
        "sigkill-immediate-restart",
        "sigkill-immediate-restart-check-always",
    ],
)
def test_database_restart_under_load(db_server, start_server, how, outage, check):
    prepare_database(db_server)
    server = start_server(db_server, pool={**POOL, "check": check}, db_options=DB_OPTIONS)
    load = WriteReadLoad(server, CLIENTS, prefix=f"{how}{outage:g}{check}-", max_seconds=60).start()
    try:
        time.sleep(WARMUP)
        down = time.monotonic()
        if how == "stop":
            db_server.stop()
        else:
            db_server.kill()
        down_done = time.monotonic()
        time.sleep(outage)
        db_server.start()
        up = time.monotonic()
        time.sleep(AFTER)
    finally:
        load.stop(timeout=60)

    results = load.results
    transport_errors = [r for r in results if r.status is None]
    failures = [r for r in results if not r.ok]
    before = [r for r in results if r.end < down]
    after = [r for r in results if r.start >= up + RECOVERY_BOUND]
    failed_after_up = [r for r in failures if r.end >= up]
    recovery = max((r.end for r in failed_after_up), default=up) - up
    data = check_writes(db_server, load.sent, load.acked)
    pool = server.wait_pool(lambda p: p["in_use"] == 0 and p["waiting"] == 0)
    figures = dict(
        requests=len(results),
        writes=len(load.writes),
        acked=len(load.acked),
        failed=len(failures),
        failed_statuses=sorted({r.status for r in failures}, key=str),
        max_failure_latency_s=round(max((r.elapsed for r in failures), default=0), 3),
        max_latency_s=round(max(r.elapsed for r in results), 3),
        stop_took_s=round(down_done - down, 3),
        db_down_s=round(up - down, 3),
        failed_after_db_back=len(failed_after_up),
        recovery_s=round(recovery, 3),
        rows=data.rows,
        checksum_ok=data.checksum_ok,
        errored_but_committed=data.errored_but_committed,
        errored_absent=data.errored_absent,
        pool_discards=pool["discards"],
        pool_connect_errors=pool["connect_errors"],
    )
    report(f"restart under load ({how}, outage {outage:g} s, check={check})", **figures)

    assert not transport_errors, transport_errors[:5]
    assert all(r.status in (200, 500) for r in results), {r.status for r in results}
    assert before and all(r.ok for r in before), [r for r in before if not r.ok][:5]
    assert failures, "the outage was not noticed: the test did not test anything"
    slow_failures = [r for r in failures if r.elapsed > FAIL_FAST]
    assert not slow_failures, slow_failures[:5]
    assert after and all(r.ok for r in after), [r for r in after if not r.ok][:5]
    assert recovery <= RECOVERY_BOUND, figures
    if check == "always":
        # Every stale connection is caught by its ping: nothing that started
        # once the server was back failed.
        assert not [r for r in failures if r.start >= up], figures
    assert not load.bad_reads, load.bad_reads[:5]
    assert data.ok, data
    assert pool["size"] <= POOL["max_size"]
    assert not server.forbidden_log_lines(), server.forbidden_log_lines()[:10]


def test_database_frozen_under_load(db_server, start_server):
    """mariadbd stopped with SIGSTOP for 4 s: TCP still accepts, nothing answers.

    Only the configured timeouts bound a request then: read_timeout (2 s)
    for queries and for the greeting of a new connection, plus the pool's
    timeout for a request queued behind them. /ping stays fast meanwhile.
    """
    prepare_database(db_server)
    read_timeout, pool_timeout = 2.0, 5.0
    server = start_server(
        db_server,
        pool={**POOL, "timeout": pool_timeout},
        db_options={**DB_OPTIONS, "read_timeout": read_timeout},
    )
    load = WriteReadLoad(server, CLIENTS, prefix="frozen-", max_seconds=60).start()
    with Pinger(server, interval=0.02) as pinger:
        try:
            time.sleep(WARMUP)
            frozen = time.monotonic()
            os.kill(db_server.pid, signal.SIGSTOP)
            try:
                time.sleep(4.0)
            finally:
                os.kill(db_server.pid, signal.SIGCONT)
            thawed = time.monotonic()
            time.sleep(AFTER + read_timeout)
        finally:
            load.stop(timeout=60)
    results = load.results
    failures = [r for r in results if not r.ok]
    bound = pool_timeout + read_timeout + 1.0
    after = [r for r in results if r.start >= thawed + read_timeout + RECOVERY_BOUND]
    failed_after = [r for r in failures if r.end >= thawed]
    check = check_writes(db_server, load.sent, load.acked)
    pool = server.wait_pool(lambda p: p["in_use"] == 0 and p["waiting"] == 0)
    during = [p.elapsed for p in pinger.results if frozen <= p.start <= thawed]
    figures = dict(
        requests=len(results),
        acked=len(load.acked),
        failed=len(failures),
        failure_kinds=sorted({r.body.decode(errors="replace").splitlines()[0][:100] for r in failures}),
        max_latency_s=round(max(r.elapsed for r in results), 3),
        latency_bound_s=bound,
        recovery_after_thaw_s=round(max((r.end for r in failed_after), default=thawed) - thawed, 3),
        ping_while_frozen=pinger.summary(),
        ping_while_frozen_max_ms=round(max(during, default=0) * 1000, 1),
        rows=check.rows,
        checksum_ok=check.checksum_ok,
        errored_but_committed=check.errored_but_committed,
        discards=pool["discards"],
    )
    report("database frozen (SIGSTOP 4 s) under load", **figures)
    assert all(r.status in (200, 500) for r in results), {r.status for r in results}
    assert failures, "the freeze was not noticed: the test did not test anything"
    assert max(r.elapsed for r in results) <= bound, figures
    assert after and all(r.ok for r in after), [r for r in after if not r.ok][:5]
    assert not load.bad_reads
    assert check.ok, check
    assert all(p.ok for p in pinger.results)
    assert max(during) < 0.3, figures
