from django.conf import settings
from django.urls import path

from tfb import views

urlpatterns = [
    path("plain", views.plain),
    path("db", views.db),
    path("queries", views.queries),
    path("updates", views.updates),
    path("slow", views.slow),
]

if settings.ENGINE_KIND == "greenpatch":
    from greenpatch.django.views import stats

    urlpatterns.append(path("stats", stats))
