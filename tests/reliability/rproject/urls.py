from django.urls import path

from . import views

urlpatterns = [
    path("ping", views.ping),
    path("write", views.write),
    path("read", views.read),
    path("slow", views.slow),
    path("transfer", views.transfer),
    path("dirty", views.dirty),
    path("session", views.session),
    path("probe", views.probe),
    path("stats", views.stats),
]
