"""TechEmpower-style endpoints: ``/plain``, ``/db``, ``/queries``, ``/updates``, plus ``/slow``."""

from __future__ import annotations

from random import randint

from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse

from tfb.models import World

ROWS = 10_000


def _row() -> dict:
    world = World.objects.get(id=randint(1, ROWS))
    return {"id": world.id, "randomNumber": world.randomnumber}


def _count(request: HttpRequest) -> int:
    # The TechEmpower rule: a missing or bad ``q`` means 1, and 1..500.
    try:
        q = int(request.GET.get("q", "1"))
    except ValueError:
        return 1
    return min(max(q, 1), 500)


def plain(request: HttpRequest) -> HttpResponse:
    return HttpResponse(b"Hello, World!", content_type="text/plain")


def db(request: HttpRequest) -> JsonResponse:
    return JsonResponse(_row())


def queries(request: HttpRequest) -> JsonResponse:
    return JsonResponse([_row() for _ in range(_count(request))], safe=False)


def updates(request: HttpRequest) -> JsonResponse:
    out = []
    for _ in range(_count(request)):
        world = World.objects.get(id=randint(1, ROWS))
        world.randomnumber = randint(1, ROWS)
        world.save(update_fields=["randomnumber"])
        out.append({"id": world.id, "randomNumber": world.randomnumber})
    return JsonResponse(out, safe=False)


def slow(request: HttpRequest) -> JsonResponse:
    """A request that waits on the database (``SLEEP``), then reads a row."""
    with connection.cursor() as cur:
        cur.execute("SELECT SLEEP(%s)", [settings.SLOW_SECONDS])
    return JsonResponse(_row())
