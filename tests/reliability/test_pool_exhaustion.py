"""(3) Pool exhaustion: slow queries hold every connection.

Further requests wait in the pool's queue for its ``timeout`` and then get a
500 whose body (and the server log) names the pool, its size, holders and
waiters; with ``max_waiting`` the surplus fails at once. Throughout, a
request that needs no database (/ping) is answered within milliseconds:
waiting for a connection parks a worker greenlet, never the IOLoop.
"""

from __future__ import annotations

import threading
import time

import pytest
from rsupport import Pinger, Threads, percentile, prepare_database, report, run_threads

pytestmark = pytest.mark.private_server

PING_P99 = 0.100  # seconds
PING_MAX = 0.300


def hold_all(server, holders: int, seconds: float) -> Threads:
    """Start ``holders`` requests that each keep a connection for ``seconds``; wait until they do."""
    threads = Threads(holders, lambda i: server.get(f"/slow?s={seconds}", timeout=seconds + 20)).start()
    server.wait_pool(lambda p: p["in_use"] == holders, timeout=10)
    return threads


def staggered(server, delay: float, path: str):
    time.sleep(delay)
    return server.get(path, timeout=20)


def test_exhausted_pool_times_out_clearly_and_ping_stays_fast(db_server, start_server):
    prepare_database(db_server)
    timeout = 1.0
    server = start_server(db_server, pool={"max_size": 4, "timeout": timeout})
    waiters = 48
    with Pinger(server, interval=0.01) as pinger:
        time.sleep(0.3)
        holders = hold_all(server, 4, seconds=3.0)
        started = time.monotonic()
        # Arrivals spread over half a second, as real traffic: 48 timeouts in
        # the same instant would log 48 tracebacks in one burst of CPU work.
        queued = run_threads(waiters, lambda i: staggered(server, i * 0.01, "/slow?s=0"), timeout=30)
        held = holders.join(timeout=30)
        time.sleep(0.3)
    exhausted = [p for p in pinger.results if p.start >= started and p.end <= started + timeout + 0.5]
    pool = server.wait_pool(lambda p: p["in_use"] == 0 and p["waiting"] == 0)
    log = server.log()
    latencies = [r.elapsed for r in queued]
    report(
        "pool exhaustion (4 connections held 3 s, 48 more requests, pool timeout 1 s)",
        holders_ok=sum(r.ok for r in held),
        timed_out=sum(r.status == 500 for r in queued),
        queued_latency_min_s=round(min(latencies), 3),
        queued_latency_max_s=round(max(latencies), 3),
        ping_all=pinger.summary(),
        ping_while_exhausted=len(exhausted),
        ping_while_exhausted_p99_ms=round(percentile([p.elapsed for p in exhausted], 99) * 1000, 2),
        pool_timeouts=pool["timeouts"],
        body=queued[0].body.decode(errors="replace").strip(),
    )
    assert all(r.ok for r in held), held
    assert all(r.status == 500 for r in queued), [(r.status, r.body[:100]) for r in queued]
    for r in queued:
        assert b"pool 'default/green' timed out after 1.0 s" in r.body, r.body
        assert b"4/4 connections in use" in r.body, r.body
        assert b"PoolTimeout" in r.body, r.body
        # They waited for the pool's timeout: neither failed at once nor hung.
        assert timeout - 0.05 <= r.elapsed <= timeout + 1.0, r.elapsed
    assert "PoolTimeout: pool 'default/green' timed out after 1.0 s" in log
    assert pool["timeouts"] == waiters and pool["size"] <= 4
    assert len(exhausted) >= 20
    assert all(p.ok for p in pinger.results)
    assert percentile(pinger.latencies, 99) < PING_P99, pinger.summary()
    assert percentile([p.elapsed for p in exhausted], 99) < PING_P99
    assert max(pinger.latencies) < PING_MAX, pinger.summary()
    # The pool serves again.
    assert server.get("/slow?s=0").ok
    assert not server.forbidden_log_lines()


def test_max_waiting_fails_the_surplus_at_once(db_server, start_server):
    prepare_database(db_server)
    server = start_server(db_server, pool={"max_size": 2, "timeout": 5, "max_waiting": 3})
    holders = hold_all(server, 2, seconds=2.0)
    results: list = []
    lock = threading.Lock()

    def one(i: int) -> None:
        r = server.get("/slow?s=0", timeout=20)
        with lock:
            results.append(r)

    run_threads(8, one, timeout=30)
    held = holders.join(timeout=30)
    refused = [r for r in results if r.status == 500]
    served = [r for r in results if r.ok]
    report(
        "max_waiting=3 with 2 connections held",
        served=len(served),
        refused=len(refused),
        refused_max_latency_s=round(max(r.elapsed for r in refused), 3),
        served_min_latency_s=round(min(r.elapsed for r in served), 3),
    )
    assert all(r.ok for r in held)
    # Three waited for the holders and were served; the others failed at once.
    assert len(served) == 3 and len(refused) == 5, [(r.status, r.body[:120]) for r in results]
    for r in refused:
        assert b"PoolTooManyWaiting" in r.body and b"max_waiting=3" in r.body, r.body
        assert r.elapsed < 0.5, r.elapsed
    assert all(r.elapsed > 1.0 for r in served)
    server.wait_pool(lambda p: p["in_use"] == 0 and p["waiting"] == 0)
