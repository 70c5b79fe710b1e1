"""Settings of the benchmark app, chosen by ``bench/peers.py`` through the environment.

``BENCH_ENGINE``  which database stack serves the app:

    ``greenpatch``   ``greenpatch.django.mysql`` with greenpatch's pool
                     (``BENCH_POOL_SIZE`` connections per process); run it
                     under ``python -m greenpatch serve``
    ``pymysql``      Django's MySQL backend on PyMySQL (``install_as_MySQLdb``)
    ``mysqlclient``  Django's MySQL backend on mysqlclient (the C driver)
    ``sqla-pool``    Django's MySQL backend on PyMySQL, connections from a
                     SQLAlchemy ``QueuePool`` of ``BENCH_POOL_SIZE`` (for
                     gunicorn's gevent workers, where Django alone would open
                     one connection per request greenlet)

``BENCH_DB_HOST``, ``BENCH_DB_PORT``, ``BENCH_DB_USER``, ``BENCH_DB_PASSWORD``,
``BENCH_DB_NAME``  the server; ``BENCH_CONN_MAX_AGE`` Django's
``CONN_MAX_AGE`` (default 0); ``BENCH_SLOW_SECONDS`` the ``SLEEP`` of ``/slow``
(default 0.05); ``BENCH_LOG_LEVEL`` greenpatch's log level (default WARNING).
"""

import os

ENGINE_KIND = os.environ.get("BENCH_ENGINE", "greenpatch")
ENGINES = {
    "greenpatch": "greenpatch.django.mysql",
    "pymysql": "django.db.backends.mysql",
    "mysqlclient": "django.db.backends.mysql",
    "sqla-pool": "tfb.sqla_mysql",
}
if ENGINE_KIND not in ENGINES:
    raise ValueError(f"BENCH_ENGINE={ENGINE_KIND!r} is not accepted; use one of {', '.join(ENGINES)}")
if ENGINE_KIND in ("pymysql", "sqla-pool"):
    import pymysql

    pymysql.install_as_MySQLdb()

POOL_SIZE = int(os.environ.get("BENCH_POOL_SIZE", "20"))
SLOW_SECONDS = float(os.environ.get("BENCH_SLOW_SECONDS", "0.05"))

SECRET_KEY = "benchmark-only"
DEBUG = False
ALLOWED_HOSTS = ["*"]
INSTALLED_APPS = ["tfb"]
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "tfb.urls"
WSGI_APPLICATION = "tfb.wsgi.application"
USE_TZ = False
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

OPTIONS: dict = {"charset": "utf8mb4"}
if ENGINE_KIND == "greenpatch":
    OPTIONS["pool"] = {"max_size": POOL_SIZE, "timeout": 30}

DATABASES = {
    "default": {
        "ENGINE": ENGINES[ENGINE_KIND],
        "HOST": os.environ.get("BENCH_DB_HOST", "127.0.0.1"),
        "PORT": os.environ.get("BENCH_DB_PORT", "3306"),
        "USER": os.environ.get("BENCH_DB_USER", "root"),
        "PASSWORD": os.environ.get("BENCH_DB_PASSWORD", ""),
        "NAME": os.environ.get("BENCH_DB_NAME", "gp_peers"),
        "CONN_MAX_AGE": float(os.environ.get("BENCH_CONN_MAX_AGE", "0")),
        "OPTIONS": OPTIONS,
    }
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {"greenpatch": {"level": os.environ.get("BENCH_LOG_LEVEL", "WARNING")}},
}
