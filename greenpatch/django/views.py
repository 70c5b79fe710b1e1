"""Django views exposing greenpatch's statistics.

Mount the view in your URLconf, behind whatever protects internal pages
(the pool names and sizes it shows are not for the public)::

    from django.contrib.admin.views.decorators import staff_member_required
    from django.urls import path

    from greenpatch.django import views as greenpatch_views

    urlpatterns = [
        path("internal/greenpatch/", staff_member_required(greenpatch_views.stats)),
    ]

With ``serve --processes N`` each process has its own pools and monitor:
a request sees the process that served it (``pid``).
"""

from __future__ import annotations

import os

from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, JsonResponse
from django.utils.cache import add_never_cache_headers

import greenpatch
from greenpatch import hub, monitor

__all__ = ["stats", "stats_payload"]


def stats_payload() -> dict:
    """What `stats` answers: ``{"pid", "pools", "workers", "monitor"}``.

    ``pools`` is `greenpatch.stats` (one entry per connection pool of this
    process), ``workers`` is `greenpatch.hub.stats`, ``monitor`` is
    `greenpatch.monitor.stats`.
    """
    return {
        "pid": os.getpid(),
        "pools": greenpatch.stats(),
        "workers": hub.stats(),
        "monitor": monitor.stats(),
    }


def stats(request: HttpRequest) -> HttpResponse:
    """GET (or HEAD): this process's pool, worker and blocking-detector statistics as JSON, never cached."""
    if request.method not in ("GET", "HEAD"):
        return HttpResponseNotAllowed(["GET", "HEAD"])
    response = JsonResponse(stats_payload())
    add_never_cache_headers(response)
    return response
