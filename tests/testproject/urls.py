import os
import threading

from django.db import connection
from django.http import JsonResponse
from django.urls import path

import greenpatch


def sleep(request):
    seconds = float(request.GET.get("s", "1"))
    with connection.cursor() as cur:
        cur.execute("SELECT SLEEP(%s), CONNECTION_ID()", [seconds])
        conn_id = cur.fetchone()[1]
    return JsonResponse(
        {
            "thread": threading.get_ident(),
            "worker": greenpatch.is_worker(),
            "pid": os.getpid(),
            "conn": conn_id,
            "marker": os.environ.get("GP_MARKER", ""),
        }
    )


def stats(request):
    return JsonResponse({"pid": os.getpid(), "pools": greenpatch.stats()})


urlpatterns = [path("sleep/", sleep), path("stats/", stats)]
