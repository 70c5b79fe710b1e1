"""(6) Soak: N mixed requests; nothing grows after warm-up.

The mix: /ping, writes, reads, transfers (with rollbacks), short queries,
session probes, requests on fresh HTTP connections, and clients that
disconnect mid-query (their workers are killed). The run is cut into
rounds; between rounds, with nothing in flight, the server reports its
greenlets (a ``gc`` count, after a collection, less the worker greenlets
kept idle for reuse: their number follows the round's busiest moment, up
to ``REUSED_GREENLETS``), open file descriptors, RSS and pools, and the
private server its application connections. After
the warm-up rounds these stay flat, and the server log has no "Already
reading", unclosed-resource or leak warnings and no traceback.

``GREENPATCH_SOAK_REQUESTS`` sets N (default 2000: about ten seconds, what
CI runs); a real soak is e.g. ``GREENPATCH_SOAK_REQUESTS=200000``.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import threading
import time

import pytest
from rsupport import Threads, admin_connect, app_connection_ids, prepare_database, report

from greenpatch import hub

pytestmark = [pytest.mark.private_server, pytest.mark.soak]

REQUESTS = int(os.environ.get("GREENPATCH_SOAK_REQUESTS", "2000"))
ROUNDS = 10
WARMUP_ROUNDS = 3
CLIENTS = 16
ACCOUNTS = 10
OPENING = 1_000
POOL = {"max_size": 8, "timeout": 10, "leak_threshold": 5}
MIX = {
    "ping": 25,
    "write": 15,
    "read": 15,
    "transfer": 15,
    "slow": 10,
    "session": 8,
    "fresh_connection": 7,
    "disconnect": 5,
}
# Allowed drift between the first sample after warm-up and any later one.
MAX_GREENLET_DRIFT = 2
MAX_FD_DRIFT = 2
MAX_RSS_DRIFT_KB = 12 * 1024


def disconnect_mid_query(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /slow?s=0.3 HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.03)


def test_soak_mixed_requests_stay_flat(db_server, start_server):
    prepare_database(db_server)
    with contextlib.closing(admin_connect(db_server)) as admin, admin.cursor() as cur:
        cur.executemany(
            "INSERT INTO rp_account (id, balance) VALUES (%s, %s)", [(i, OPENING) for i in range(ACCOUNTS)]
        )
    server = start_server(db_server, pool=POOL)
    kinds = [k for k, weight in MIX.items() for _ in range(weight)]
    lock = threading.Lock()
    counts: dict[str, int] = {}
    failures: list = []
    written: list[str] = []
    samples: list[dict] = []
    per_round = max(CLIENTS, REQUESTS // ROUNDS)
    started = time.monotonic()

    def client_loop(round_no: int, i: int) -> None:
        rng = random.Random(round_no * 1000 + i)
        client = server.client(timeout=20)
        try:
            for n in range(per_round // CLIENTS):
                kind = rng.choice(kinds)
                uid = f"s{round_no}-{i}-{n}"
                if kind == "disconnect":
                    disconnect_mid_query(server.port)
                    result = None
                elif kind == "ping":
                    result = client.request("GET", "/ping")
                elif kind == "write":
                    result = client.request("POST", f"/write?uid={uid}&v={n}")
                    if result.ok:
                        with lock:
                            written.append(uid)
                elif kind == "read":
                    with lock:
                        target = rng.choice(written) if written else "none"
                    result = client.request("GET", f"/read?uid={target}")
                    if result.status == 404 and target == "none":
                        result.status = 200
                elif kind == "transfer":
                    src, dst = rng.sample(range(ACCOUNTS), 2)
                    mode = rng.choice(["commit", "commit", "rollback", "savepoint", "set_rollback"])
                    amount = rng.randint(1, 9)
                    result = client.request(
                        "POST", f"/transfer?tid={uid}&src={src}&dst={dst}&amount={amount}&mode={mode}"
                    )
                elif kind == "slow":
                    result = client.request("GET", "/slow?s=0.01")
                elif kind == "session":
                    result = client.request("GET", "/session")
                else:  # fresh_connection
                    result = server.get("/ping")
                with lock:
                    counts[kind] = counts.get(kind, 0) + 1
                    if result is not None and not result.ok:
                        failures.append(result)
        finally:
            client.close()

    for round_no in range(ROUNDS):
        Threads(CLIENTS, lambda i, r=round_no: client_loop(r, i)).start().join(timeout=300)
        # Quiet: no request in flight, and the KILLs of cut queries (a worker
        # each, for CANCEL_GRACE and the KILL) are done.
        pool = server.wait_pool(
            lambda p: p["in_use"] == 0 and p["waiting"] == 0 and p["cancelling"] == 0, timeout=10
        )
        stats = server.stats(gc=True)
        samples.append(
            {
                "round": round_no,
                # Idle reusable worker greenlets are as many as ran at once
                # at the round's busiest moment: not a leak.
                "greenlets": stats["greenlets"] - stats["idle_worker_greenlets"],
                "idle_worker_greenlets": stats["idle_worker_greenlets"],
                "greenlets_uncollected": stats["greenlets_uncollected"],
                "fds": stats["fds"],
                # Each pooled connection is one fd; the rest must not grow.
                "other_fds": stats["fds"] - pool["size"],
                "rss_kb": stats["rss_kb"],
                "threads": stats["threads"],
                "pool_size": pool["size"],
                "server_connections": len(app_connection_ids(db_server)),
            }
        )
    elapsed = time.monotonic() - started
    with contextlib.closing(admin_connect(db_server)) as admin, admin.cursor() as cur:
        cur.execute("SELECT SUM(balance) FROM rp_account")
        total = int(cur.fetchone()[0])
    pool = server.pool()
    steady = samples[WARMUP_ROUNDS:]
    first = steady[0]
    report(
        f"soak ({sum(counts.values())} requests, {ROUNDS} rounds, {CLIENTS} clients)",
        seconds=round(elapsed, 1),
        per_second=round(sum(counts.values()) / elapsed),
        mix=counts,
        failed=len(failures),
        samples=samples,
        rss_growth_after_warmup_kb=steady[-1]["rss_kb"] - first["rss_kb"],
        pool=pool,
    )
    assert not failures, [(r.path, r.status, r.body[:200]) for r in failures[:5]]
    assert total == OPENING * ACCOUNTS
    for sample in steady:
        assert sample["greenlets"] <= first["greenlets"] + MAX_GREENLET_DRIFT, samples
        assert sample["idle_worker_greenlets"] <= hub.REUSED_GREENLETS, samples
        assert sample["other_fds"] <= first["other_fds"] + MAX_FD_DRIFT, samples
        assert sample["rss_kb"] <= first["rss_kb"] + MAX_RSS_DRIFT_KB, samples
        assert sample["threads"] == first["threads"], samples
        assert sample["pool_size"] <= POOL["max_size"]
    # Discarded connections are closed for good: the server sees no more
    # application connections than the pool holds (once it has noticed the
    # closed sockets of the cut queries).
    deadline = time.monotonic() + 5
    while len(app_connection_ids(db_server)) > pool["size"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(app_connection_ids(db_server)) <= server.pool()["size"]
    log = server.log()
    assert not server.forbidden_log_lines(), server.forbidden_log_lines()[:10]
    assert "Traceback" not in log, log[-3000:]
    assert "leak_threshold" not in log, log[-3000:]
