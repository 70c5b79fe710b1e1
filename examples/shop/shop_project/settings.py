"""Settings of the greenpatch shop demo.

Environment:

``SHOP_DB_URL``      ``mysql://user:password@host:port/name``
                     (default ``mysql://root@127.0.0.1:3306/greenpatch_shop``)
``SHOP_DEBUG``       ``1`` (default) or ``0``
``SHOP_SECRET_KEY``  a real secret outside the demo

Every entry point (``manage.py``, ``wsgi.py``, ``asgi.py``,
``examples/tornado_app.py``) calls ``greenpatch.patch_all()`` before Django
is imported: the stock MySQL engine below then runs on PyMySQL with
greenlet-local connections and greenpatch's pool (``OPTIONS["pool"]``).
"""

import os
from pathlib import Path

import greenpatch

from shop_project import dburl

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("SHOP_SECRET_KEY", "greenpatch-demo-secret-not-for-production")
DEBUG = os.environ.get("SHOP_DEBUG", "1").strip().lower() in ("1", "true", "yes", "on")
ALLOWED_HOSTS = ["*"]  # a local demo only

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "catalog",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "shop_project.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = "shop_project.wsgi.application"

# With GREENPATCH=0, patch_all() did nothing: run stock Django on plain
# PyMySQL instead (no MySQLdb alias, and no pool to pass options to).
GREENPATCHED = "mysqldb" in greenpatch.patched()
if not GREENPATCHED:
    import pymysql

    pymysql.install_as_MySQLdb()

_db = dburl.parse(dburl.db_url())
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.mysql",
        "NAME": _db["name"],
        "USER": _db["user"],
        "PASSWORD": _db["password"],
        "HOST": _db["host"],
        "PORT": str(_db["port"]),
        "OPTIONS": {"pool": {"max_size": 20, "timeout": 10}} if GREENPATCHED else {},
    }
}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"  # MariaDB has no time zone tables by default
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"greenpatch": {"handlers": ["console"], "level": "WARNING"}},
}
