from django.contrib import admin
from django.urls import path

from catalog import views

urlpatterns = [
    path("", views.index),
    path("admin/", admin.site.urls),
    path("products/", views.product_list),
    path("products/<int:pk>/", views.product_detail),
    path("products/<int:pk>/buy/", views.product_buy),
    path("slow/", views.slow),
    path("stats/", views.stats),
    path("plain/", views.plain),
]
