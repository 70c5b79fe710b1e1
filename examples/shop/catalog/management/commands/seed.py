"""``manage.py seed``: fill the catalog with demo data (idempotent).

Running it again restores the seed state: the same categories and
products, with prices and stock reset to the values below.
"""

from decimal import Decimal

from django.core.management.base import BaseCommand
from django.db import transaction

from catalog.models import Category, Product

CATALOG = {
    ("Books", "books"): [
        ("The Pragmatic Programmer", "pragmatic-programmer", "39.90", 12),
        ("Fluent Python", "fluent-python", "54.00", 8),
        ("High Performance MySQL", "high-performance-mysql", "47.50", 5),
    ],
    ("Coffee", "coffee"): [
        ("Ethiopia Yirgacheffe 250 g", "ethiopia-yirgacheffe", "11.90", 40),
        ("Colombia Huila 250 g", "colombia-huila", "10.50", 35),
        ("Espresso blend 1 kg", "espresso-blend", "29.00", 15),
    ],
    ("Gadgets", "gadgets"): [
        ("Mechanical keyboard", "mechanical-keyboard", "129.00", 7),
        ("USB-C hub", "usb-c-hub", "34.99", 20),
        ("Noise-cancelling headphones", "headphones", "249.00", 3),
        ("Limited edition greenlet mug", "greenlet-mug", "15.00", 5),
    ],
}


class Command(BaseCommand):
    help = "Create (or restore) the demo categories and products."

    @transaction.atomic
    def handle(self, *args, **options):
        created = 0
        for (cat_name, cat_slug), products in CATALOG.items():
            category, new = Category.objects.update_or_create(slug=cat_slug, defaults={"name": cat_name})
            created += new
            for name, slug, price, stock in products:
                _, new = Product.objects.update_or_create(
                    slug=slug,
                    defaults={"category": category, "name": name, "price": Decimal(price), "stock": stock},
                )
                created += new
        total = len(CATALOG) + sum(len(products) for products in CATALOG.values())
        self.stdout.write(
            self.style.SUCCESS(
                f"Seeded {len(CATALOG)} categories and {total - len(CATALOG)} products "
                f"({created} created, {total - created} restored)."
            )
        )
