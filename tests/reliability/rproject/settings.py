"""Settings from the environment (set by rsupport.RServer).

RP_DB_HOST, RP_DB_PORT, RP_DB_USER, RP_DB_PASSWORD, RP_DB_NAME: the database;
RP_ENGINE: the engine (default: Django's stock MySQL backend, pooled by
greenpatch's patch); RP_POOL: JSON for OPTIONS["pool"]; RP_DB_OPTIONS: JSON
merged into OPTIONS (connect_timeout, read_timeout...); RP_EXTRA_DBS: JSON
{alias: {settings overrides}} for more aliases (the bad-input probes).
"""

import json
import os

SECRET_KEY = "greenpatch-reliability"
DEBUG = False
ALLOWED_HOSTS = ["*"]
INSTALLED_APPS = ["rproject"]
MIDDLEWARE = ["rproject.middleware.DatabaseErrorMiddleware"]
ROOT_URLCONF = "rproject.urls"
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
# `python -m greenpatch serve` has set up logging (stderr, INFO): keep it, so
# django.request's "Internal Server Error" tracebacks reach the server log.
LOGGING_CONFIG = None

_options = {"pool": json.loads(os.environ.get("RP_POOL", "true"))}
_options.update(json.loads(os.environ.get("RP_DB_OPTIONS", "{}")))

DATABASES = {
    "default": {
        "ENGINE": os.environ.get("RP_ENGINE", "django.db.backends.mysql"),
        "NAME": os.environ.get("RP_DB_NAME", "test"),
        "USER": os.environ.get("RP_DB_USER", "root"),
        "PASSWORD": os.environ.get("RP_DB_PASSWORD", ""),
        "HOST": os.environ.get("RP_DB_HOST", "127.0.0.1"),
        "PORT": os.environ.get("RP_DB_PORT", "3306"),
        "CONN_HEALTH_CHECKS": os.environ.get("RP_HEALTH_CHECKS", "") == "1",
        "OPTIONS": _options,
    }
}
for _alias, _overrides in json.loads(os.environ.get("RP_EXTRA_DBS", "{}")).items():
    _db = {**DATABASES["default"], **_overrides}
    _db["OPTIONS"] = {**DATABASES["default"]["OPTIONS"], **_overrides.get("OPTIONS", {})}
    DATABASES[_alias] = _db
