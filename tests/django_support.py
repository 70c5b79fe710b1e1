"""Configure Django once per test process against a scratch database."""

from __future__ import annotations

import atexit
import uuid

import pymysql
from conftest import db_params

_configured: dict = {}


def setup_django(**database_overrides) -> dict:
    """Configure settings (once), create the schema, return the DATABASES entry."""
    if _configured:
        return _configured["db"]
    import django
    from django.conf import settings

    params = db_params()
    name = f"gp_django_{uuid.uuid4().hex[:10]}"
    admin = pymysql.connect(**params)
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}`")
    admin.close()

    def drop() -> None:
        conn = pymysql.connect(**params)
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
            cur.execute(f"DROP DATABASE IF EXISTS `test_{name}`")
        conn.close()

    atexit.register(drop)
    database = {
        "ENGINE": "django.db.backends.mysql",
        "NAME": name,
        "USER": params["user"],
        "PASSWORD": params["password"],
        "HOST": params["host"],
        "PORT": str(params["port"]),
        "OPTIONS": {"pool": {"max_size": 5, "timeout": 10}},
        **database_overrides,
    }
    settings.configure(
        DATABASES={"default": database},
        INSTALLED_APPS=["djangoapp"],
        USE_TZ=True,
        TIME_ZONE="UTC",
        DEFAULT_AUTO_FIELD="django.db.models.AutoField",
    )
    django.setup()
    from django.core.management import call_command

    call_command("migrate", run_syncdb=True, verbosity=0)
    _configured["db"] = database
    _configured["name"] = name
    return database
