"""Endpoints the reliability tests drive over HTTP."""

import gc
import os
import threading

import greenlet
from django.db import connection, connections, transaction
from django.db.models import F
from django.http import HttpResponse, JsonResponse

import greenpatch
from greenpatch import hub

from .models import Account, Item, Part, Transfer

PARTS = 3


def ping(request):
    """No database at all: answers at once unless the loop is blocked."""
    return HttpResponse(b"pong", content_type="text/plain")


def write(request):
    """Insert item ``uid`` with ``PARTS`` parts in one transaction; 200 only after COMMIT.

    ``hold``: seconds of ``SELECT SLEEP`` between the item and its parts, so
    the transaction is open (and half done) for that long.
    """
    uid = request.GET["uid"]
    value = int(request.GET.get("v", "0"))
    hold = float(request.GET.get("hold", "0"))
    with transaction.atomic():
        Item.objects.create(uid=uid, value=value)
        if hold:
            with connection.cursor() as cur:
                cur.execute("SELECT SLEEP(%s)", [hold])
        Part.objects.bulk_create([Part(item_uid=uid, n=n, value=value) for n in range(PARTS)])
    return JsonResponse({"uid": uid, "committed": True})


def read(request):
    uid = request.GET["uid"]
    item = Item.objects.filter(uid=uid).values("uid", "value").first()
    if item is None:
        return JsonResponse({"uid": uid}, status=404)
    item["parts"] = Part.objects.filter(item_uid=uid).count()
    return JsonResponse(item)


def slow(request):
    seconds = float(request.GET.get("s", "1"))
    with connection.cursor() as cur:
        cur.execute("SELECT SLEEP(%s), CONNECTION_ID()", [seconds])
        conn_id = cur.fetchone()[1]
    return JsonResponse({"conn": conn_id})


class _Rollback(Exception):
    pass


def transfer(request):
    """Move ``amount`` from ``src`` to ``dst`` in one atomic block.

    ``mode``: ``commit``; ``rollback`` (an exception leaves the block);
    ``set_rollback`` (``transaction.set_rollback(True)``); ``savepoint`` (a
    nested block moves a huge amount back and is rolled back to its
    savepoint; the outer transfer commits). ``lock``: ``ordered`` locks both
    rows in id order first (no deadlocks); ``none`` updates src then dst
    (deadlocks possible: the loser must be rolled back whole).
    """
    q = request.GET
    tid, src, dst, amount = q["tid"], int(q["src"]), int(q["dst"]), int(q["amount"])
    mode = q.get("mode", "commit")
    try:
        with transaction.atomic():
            if q.get("lock", "ordered") == "ordered":
                list(Account.objects.select_for_update().filter(id__in=(src, dst)).order_by("id"))
            Account.objects.filter(id=src).update(balance=F("balance") - amount)
            Account.objects.filter(id=dst).update(balance=F("balance") + amount)
            Transfer.objects.create(tid=tid, src=src, dst=dst, amount=amount)
            if mode == "savepoint":
                try:
                    with transaction.atomic():
                        Account.objects.filter(id=dst).update(balance=F("balance") - 1_000_000)
                        Account.objects.filter(id=src).update(balance=F("balance") + 1_000_000)
                        raise _Rollback
                except _Rollback:
                    pass
            elif mode == "set_rollback":
                transaction.set_rollback(True)
            elif mode == "rollback":
                raise _Rollback
    except _Rollback:
        return JsonResponse({"tid": tid, "committed": False})
    return JsonResponse({"tid": tid, "committed": mode != "set_rollback"})


def dirty(request):
    """Leave session state behind: user variable, temporary table, named lock, open transaction."""
    uid = request.GET.get("uid", "dirty")
    with connection.cursor() as cur:
        cur.execute("SET @rp_dirty = 1")
        cur.execute("CREATE TEMPORARY TABLE IF NOT EXISTS rp_tmp (x INT)")
        cur.execute("SELECT GET_LOCK('rp_lock', 0), CONNECTION_ID()")
        conn_id = cur.fetchone()[1]
    transaction.set_autocommit(False)
    Item.objects.create(uid=uid, value=-1)  # never committed
    return JsonResponse({"conn": conn_id})


def session(request):
    """What the connection this request got looks like."""
    with connection.cursor() as cur:
        cur.execute(
            "SELECT CONNECTION_ID(), @@in_transaction, @@autocommit, @rp_dirty, "
            "IS_USED_LOCK('rp_lock') = CONNECTION_ID(), @@session.tx_isolation"
        )
        conn_id, in_trans, autocommit, var, lock, isolation = cur.fetchone()
        cur.execute("CREATE TEMPORARY TABLE IF NOT EXISTS rp_tmp (x INT)")
        cur.execute("SELECT @@warning_count")
        temp = bool(cur.fetchone()[0])  # "already exists"
        if not temp:
            cur.execute("DROP TEMPORARY TABLE rp_tmp")
    return JsonResponse(
        {
            "conn": conn_id,
            "in_transaction": in_trans,
            "autocommit": autocommit,
            "user_var": var,
            "lock": bool(lock),
            "temp_table": temp,
            "isolation": isolation,
        }
    )


def probe(request):
    """One query on the alias given; what a request to a misconfigured database gets."""
    alias = request.GET.get("alias", "default")
    with connections[alias].cursor() as cur:
        cur.execute("SELECT 1")
        cur.fetchone()
    return HttpResponse(b"ok", content_type="text/plain")


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def _greenlets() -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, greenlet.greenlet))


def stats(request):
    """Pools, greenlets (``gc`` count, before and after a collection), RSS, fds, threads.

    ``idle_worker_greenlets``: how many of the greenlets are worker greenlets
    kept idle for reuse - as many as ran at once at the busiest moment, up
    to ``hub.REUSED_GREENLETS`` per thread.
    """
    data = {"pid": os.getpid(), "pools": greenpatch.stats(), "worker": greenpatch.is_worker()}
    if request.GET.get("gc"):
        data["greenlets_uncollected"] = _greenlets()
        gc.collect()
        data["greenlets"] = _greenlets()
        data["idle_worker_greenlets"] = hub.stats()["idle_greenlets"]
        data["gc_garbage"] = len(gc.garbage)
    data["rss_kb"] = _rss_kb()
    data["fds"] = len(os.listdir("/proc/self/fd"))
    data["threads"] = threading.active_count()
    return JsonResponse(data)
