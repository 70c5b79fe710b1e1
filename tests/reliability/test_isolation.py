"""(5) Isolation: thousands of concurrent atomic() transfers with random rollbacks.

Each request runs in its own worker greenlet with its own Django connection
(greenlet-local), so transactions of concurrent requests never share a
connection. Checked exactly: the total is conserved, every account's
balance equals its opening balance plus the transfers acknowledged as
committed, and the transfer log holds exactly those transfers.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
from collections import Counter

import pytest
from rsupport import Threads, admin_connect, prepare_database, report

pytestmark = pytest.mark.private_server

OPENING = 10_000
MODES = ["commit"] * 55 + ["rollback"] * 15 + ["set_rollback"] * 15 + ["savepoint"] * 15


def open_accounts(db, count: int) -> None:
    with contextlib.closing(admin_connect(db)) as admin, admin.cursor() as cur:
        rows = [(i, OPENING) for i in range(count)]
        cur.executemany("INSERT INTO rp_account (id, balance) VALUES (%s, %s)", rows)


def ledger(db) -> tuple[dict[int, int], set[str]]:
    with contextlib.closing(admin_connect(db)) as admin, admin.cursor() as cur:
        cur.execute("SELECT id, balance FROM rp_account")
        balances = dict(cur.fetchall())
        cur.execute("SELECT tid FROM rp_transfer")
        tids = {row[0] for row in cur.fetchall()}
    return balances, tids


def run_transfers(server, *, accounts: int, clients: int, transfers: int, lock: str, seed: int):
    lock_ = threading.Lock()
    expected = Counter({i: OPENING for i in range(accounts)})
    committed: set[str] = set()
    results = []
    per_client = transfers // clients

    def client_loop(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        client = server.client(timeout=30)
        try:
            for n in range(per_client):
                src, dst = rng.sample(range(accounts), 2)
                amount = rng.randint(1, 100)
                mode = rng.choice(MODES)
                tid = f"{lock}-{i}-{n}"
                path = f"/transfer?tid={tid}&src={src}&dst={dst}&amount={amount}&mode={mode}&lock={lock}"
                result = client.request("POST", path, tag=(tid, src, dst, amount, mode))
                with lock_:
                    results.append(result)
                    if result.ok:
                        body = result.json()
                        assert body["committed"] == (mode in ("commit", "savepoint")), (mode, body)
                        if body["committed"]:
                            committed.add(tid)
                            expected[src] -= amount
                            expected[dst] += amount
        finally:
            client.close()

    Threads(clients, client_loop).start().join(timeout=150)
    return results, expected, committed


@pytest.mark.parametrize(
    "lock, accounts", [("ordered", 20), ("none", 4)], ids=["locked-in-order", "deadlocks"]
)
def test_concurrent_transfers_conserve_money(db_server, start_server, lock, accounts):
    prepare_database(db_server)
    open_accounts(db_server, accounts)
    server = start_server(db_server, pool={"max_size": 10, "timeout": 20})
    transfers = int(os.environ.get("GREENPATCH_TRANSFERS", "2016" if lock == "ordered" else "800"))
    results, expected, committed = run_transfers(
        server, accounts=accounts, clients=32, transfers=transfers, lock=lock, seed=accounts
    )
    balances, tids = ledger(db_server)
    failures = [r for r in results if not r.ok]
    elapsed = max(r.end for r in results) - min(r.start for r in results)
    pool = server.wait_pool(lambda p: p["in_use"] == 0 and p["waiting"] == 0)
    report(
        f"concurrent atomic() transfers ({lock})",
        transfers=len(results),
        per_second=round(len(results) / elapsed),
        committed=len(committed),
        modes=dict(Counter(r.tag[4] for r in results)),
        failed=len(failures),
        failure_kinds=sorted({r.body.decode(errors="replace")[:90] for r in failures}),
        total=sum(balances.values()),
        connections_opened=pool["connects"],
    )
    assert len(results) == transfers // 32 * 32
    assert sum(balances.values()) == OPENING * accounts
    assert balances == dict(expected)
    assert tids == committed
    if lock == "ordered":
        assert not failures, failures[:3]
    else:
        # Deadlock victims are rolled back whole (their effects are absent,
        # checked above); nothing else fails.
        assert all(r.status == 500 and b"1213" in r.body for r in failures), failures[:3]
    assert not server.forbidden_log_lines()
