from django.contrib import admin

from catalog.models import Category, Product


@admin.register(Category)
class CategoryAdmin(admin.ModelAdmin):
    list_display = ["name", "slug"]
    prepopulated_fields = {"slug": ["name"]}
    search_fields = ["name"]


@admin.register(Product)
class ProductAdmin(admin.ModelAdmin):
    list_display = ["name", "category", "price", "stock"]
    list_editable = ["price", "stock"]
    list_filter = ["category"]
    list_select_related = ["category"]
    prepopulated_fields = {"slug": ["name"]}
    search_fields = ["name", "slug"]
