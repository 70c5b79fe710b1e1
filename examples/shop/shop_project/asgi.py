"""ASGI entry point (Django runs the sync views in threads; greenpatch pools their connections)."""

import os

import greenpatch

greenpatch.patch_all()  # before Django is imported; idempotent

from django.core.asgi import get_asgi_application  # noqa: E402

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop_project.settings")

application = get_asgi_application()
