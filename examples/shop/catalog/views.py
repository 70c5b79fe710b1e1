"""JSON views of the shop. Each one is ordinary blocking Django code."""

from __future__ import annotations

import threading

import greenpatch
from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST
from greenpatch.django.views import stats_payload

from catalog import services
from catalog.models import Product


def _error(status: int, message: str) -> JsonResponse:
    return JsonResponse({"error": message}, status=status)


@require_GET
def index(request):
    return JsonResponse(
        {
            "endpoints": [
                "GET /products/?category=<slug>",
                "GET /products/<id>/",
                "POST /products/<id>/buy/",
                "GET /slow/?seconds=0.5",
                "GET /stats/",
                "GET /plain/",
                "/admin/",
            ]
        }
    )


@require_GET
def product_list(request):
    return JsonResponse({"products": services.list_products(request.GET.get("category"))})


@require_GET
def product_detail(request, pk: int):
    try:
        return JsonResponse(services.get_product(pk))
    except Product.DoesNotExist:
        return _error(404, f"no product {pk}")


@csrf_exempt
@require_POST
def product_buy(request, pk: int):
    try:
        return JsonResponse(services.buy(pk))
    except Product.DoesNotExist:
        return _error(404, f"no product {pk}")
    except services.OutOfStock as exc:
        return _error(409, str(exc))


@require_GET
def slow(request):
    try:
        seconds = services.parse_seconds(request.GET.get("seconds"))
    except ValueError as exc:
        return _error(400, str(exc))
    return JsonResponse(services.slow_query(seconds))


@require_GET
def stats(request):
    """What ``greenpatch.django.views.stats`` answers (the pools, workers and
    blocking detector of this process), with the patches applied."""
    return JsonResponse({**stats_payload(), "patched": greenpatch.patched()})


@require_GET
def plain(request):
    """No database at all: shows the server stays responsive during /slow/."""
    return JsonResponse({"hello": "world", "thread": threading.get_ident()})
