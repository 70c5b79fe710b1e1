from django.http import JsonResponse
from django.urls import path

from djangoapp.models import Counter


async def async_view(request):
    return JsonResponse({"async": True})


def count(request):
    return JsonResponse({"count": Counter.objects.count()})


urlpatterns = [path("count/", count), path("async/", async_view)]
