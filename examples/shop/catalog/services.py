"""The shop's database work, as plain blocking functions.

Shared by the Django views (``catalog/views.py``) and the Tornado handlers
(``examples/tornado_app.py``). Nothing here knows about greenpatch: run in a
greenpatch worker, each query parks the worker instead of blocking the
IOLoop; run in a plain thread, it blocks that thread as usual.
"""

from __future__ import annotations

import threading

from django.db import connection, transaction
from django.forms.models import model_to_dict

from catalog.models import Category, Product

#: Upper bound for ``/slow`` so a typo cannot hold a connection for hours.
MAX_SLOW_SECONDS = 30.0


class OutOfStock(Exception):
    """The product exists but its stock is 0."""


def product_as_dict(product: Product) -> dict:
    data = model_to_dict(product)  # id, category (its id), name, slug, price, stock
    data["category_slug"] = product.category.slug
    return data


def list_products(category: str | None = None) -> list[dict]:
    """Every product (of the category with slug ``category``, if given)."""
    products = Product.objects.select_related("category")
    if category:
        products = products.filter(category__slug=category)
    return [product_as_dict(p) for p in products]


def get_product(pk: int) -> dict:
    """One product; raises ``Product.DoesNotExist``."""
    return product_as_dict(Product.objects.select_related("category").get(pk=pk))


def list_categories() -> list[dict]:
    return [model_to_dict(c) for c in Category.objects.all()]


def count_products() -> int:
    return Product.objects.count()


def buy(pk: int) -> dict:
    """Take one item of product ``pk`` out of stock, atomically.

    ``select_for_update`` locks the row until the transaction ends, so
    concurrent buyers queue on the lock and never sell the same item twice.
    Raises ``Product.DoesNotExist`` or `OutOfStock`.
    """
    with transaction.atomic():
        product = Product.objects.select_for_update().select_related("category").get(pk=pk)
        if product.stock <= 0:
            raise OutOfStock(f"{product.name} is out of stock")
        product.stock -= 1
        product.save(update_fields=["stock"])
    return product_as_dict(product)


def parse_seconds(raw: str | None, default: float = 0.5) -> float:
    """``?seconds=`` of ``/slow``: a number in [0, MAX_SLOW_SECONDS]; raises ValueError."""
    try:
        seconds = default if raw in (None, "") else float(raw)
    except ValueError:
        raise ValueError(f"seconds must be a number, not {raw!r}") from None
    if not 0 <= seconds <= MAX_SLOW_SECONDS:  # also rejects nan
        raise ValueError(f"seconds must be between 0 and {MAX_SLOW_SECONDS:g}, not {raw!r}")
    return seconds


def slow_query(seconds: float) -> dict:
    """``SELECT SLEEP(seconds)``, then count the products: the concurrency demo."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT SLEEP(%s)", [seconds])
        cursor.fetchone()
    return {"slept": seconds, "products": count_products(), "thread": threading.get_ident()}
