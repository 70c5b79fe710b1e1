"""WSGI entry point, e.g. ``python -m greenpatch serve shop_project.wsgi:application``."""

import os

import greenpatch

greenpatch.patch_all()  # before Django is imported; idempotent

from django.core.wsgi import get_wsgi_application  # noqa: E402

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop_project.settings")

application = get_wsgi_application()
