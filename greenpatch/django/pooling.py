"""The connection pool behind Django's MySQL backend.

Shared by the patch of the stock backend (``patches/django_mysql.py``) and
the explicit ``ENGINE: "greenpatch.django.mysql"``; each method below takes
the ``DatabaseWrapper`` and the method it replaces. Mirrors Django's own
PostgreSQL pool: check out in ``get_new_connection``, check in from
``_close`` (clearing ``self.connection``), and let the pool - not Django's
health check - vouch for connections it hands out.

Settings follow Django 5.1's ``OPTIONS["pool"]`` convention::

    "OPTIONS": {"pool": {"min_size": 2, "max_size": 20, "timeout": 10}}

``True`` (or no "pool" key) uses the defaults, ``False`` turns pooling off.
Workers and plain threads draw from separate pools per alias: connections
opened in a worker are cooperative, others block, and a blocking one must
never be handed to a worker.
"""

from __future__ import annotations

import copy
import logging
import threading
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db.backends.base.base import NO_DB_ALIAS, BaseDatabaseWrapper

from greenpatch import hub
from greenpatch.pool import Pool, PoolError, PyMySQLOps

log = logging.getLogger("greenpatch.django")

#: Accepted keys of OPTIONS["pool"] and their defaults.
POOL_DEFAULTS: dict[str, Any] = {
    "min_size": 0,
    "max_size": 10,
    "timeout": 30.0,
    "max_waiting": 0,
    "max_lifetime": 3600.0,
    "max_idle": 600.0,
    "check": "auto",
    "reset": "rollback",
    "leak_threshold": None,
}

_INITIALIZED = "_greenpatch_initialized"
_POOL = "_greenpatch_pool"
# (wrapper class, alias) -> (settings_dict copy, connection params, pool key):
# one per alias, not per wrapper (each in-flight request has a wrapper); a
# wrapper that computed its own refers to the entry under _PARAMS.
_params: dict[tuple, tuple[dict, dict, tuple]] = {}
_PARAMS = "_greenpatch_params"

_lock = threading.Lock()
_pools: dict[tuple, Pool | None] = {}  # None: pooling off for that alias
_server_data: dict[tuple, dict] = {}


def pool_options(alias: str, settings_dict: dict) -> dict[str, Any] | None:
    """Validated pool options of one database, or None when pooling is off."""
    where = f"DATABASES[{alias!r}]['OPTIONS']['pool']"
    raw = settings_dict.get("OPTIONS", {}).get("pool", True)
    if raw is False or raw is None:
        return None
    if raw is True:
        raw = {}
    if not isinstance(raw, dict):
        raise ImproperlyConfigured(f"{where} must be True, False or a dict of pool options, not {raw!r}")
    unknown = sorted(set(raw) - set(POOL_DEFAULTS))
    if unknown:
        raise ImproperlyConfigured(
            f"{where} has unknown option(s) {', '.join(unknown)}; accepted: {', '.join(POOL_DEFAULTS)}"
        )
    options = dict(POOL_DEFAULTS, **raw)
    if settings_dict.get("CONN_HEALTH_CHECKS") and "check" not in raw:
        options["check"] = "always"
    try:
        Pool(_never_called, name=alias, **options)  # validates every option
    except ValueError as exc:
        raise ImproperlyConfigured(f"{where}: {exc}") from None
    return options


def _never_called() -> Any:
    raise AssertionError("validation pool must not connect")


class DjangoOps(PyMySQLOps):
    """PyMySQL operations, plus: a full reset makes Django re-run its setup."""

    def reset(self, conn: Any, mode: str) -> bool:
        ok = super().reset(conn, mode)
        if ok and mode == "full":
            setattr(conn, _INITIALIZED, False)
        return ok


def _params_key(conn_params: dict) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in conn_params.items() if k != "conv"))


def _cached_params_key(wrapper: Any, conn_params: dict) -> tuple:
    cached = _params.get((type(wrapper), wrapper.alias))
    if cached is not None and cached[1] == conn_params:
        return cached[2]
    return _params_key(conn_params)


def pool_for(wrapper: Any, conn_params: dict) -> Pool | None:
    """The pool for this alias, settings and kind of caller (worker or not).

    None when pooling is off for the alias. Looked up on every checkout:
    options are parsed and validated only when a pool is first built.
    """
    kind = "green" if hub.is_worker() else "blocking"
    key = (wrapper.alias, kind, _cached_params_key(wrapper, conn_params))
    try:
        return _pools[key]
    except KeyError:
        pass
    database = wrapper.Database
    with _lock:
        if key in _pools:
            return _pools[key]
        # Settings changed (e.g. the test runner switched NAME to the test
        # database): retire the pools built for the old ones.
        for old_key in [k for k in _pools if k[:2] == key[:2]]:
            old = _pools.pop(old_key)
            if old is not None:
                old.close()
        options = None
        if wrapper.alias != NO_DB_ALIAS:  # server-level connections (test DB setup): not pooled
            options = pool_options(wrapper.alias, wrapper.settings_dict)
        if options is None:
            _pools[key] = None
            return None

        def connect() -> Any:
            conn = database.connect(**conn_params)
            if conn.encoders.get(bytes) is bytes:
                conn.encoders.pop(bytes)
            return conn

        pool = _pools[key] = Pool(connect, name=f"{wrapper.alias}/{kind}", ops=DjangoOps(), **options)
    return pool


def close_pools(alias: str | None = None) -> None:
    """Close the pools of ``alias`` (default: all); in-use connections close at checkin."""
    with _lock:
        for key in [k for k in _pools if alias is None or k[0] == alias]:
            pool = _pools.pop(key)
            if pool is not None:
                pool.close()


# -- DatabaseWrapper methods ------------------------------------------------


def get_connection_params(wrapper: Any, wrapped: Any) -> dict:
    """Django's connection parameters, computed once per alias and settings.

    Every request connects (its connection returns to the pool at the end),
    and building the parameters (and the pool key from them) cost more than
    checking the pool out. They are kept per backend class and alias with a
    copy of the ``settings_dict`` they came from, and built again when that
    changed (the test runner, for one, renames the database in place).
    """
    settings = wrapper.settings_dict
    where = (type(wrapper), wrapper.alias)
    entry = _params.get(where)
    if entry is not None and wrapper.__dict__.get(_PARAMS) is entry and entry[0] == settings:
        return dict(entry[1])
    # Django's method also sets attributes of the wrapper (isolation_level):
    # each wrapper runs it once.
    params = wrapped()
    params.pop("pool", None)  # pool options never reach PyMySQL
    # PyMySQL would open with SET AUTOCOMMIT=0 and Django then send
    # SET AUTOCOMMIT=1: open in Django's mode and save both round trips.
    params.setdefault("autocommit", settings["AUTOCOMMIT"])
    if entry is None or entry[0] != settings:
        try:
            entry = (copy.deepcopy(settings), params, _params_key(params))
        except Exception:  # e.g. an ssl.SSLContext in OPTIONS: do not cache
            _params.pop(where, None)
            wrapper.__dict__.pop(_PARAMS, None)
            return params
        _params[where] = entry
    wrapper.__dict__[_PARAMS] = entry
    return dict(params)


def get_new_connection(wrapper: Any, wrapped: Any, conn_params: dict) -> Any:
    pool = pool_for(wrapper, conn_params)
    if pool is None:
        return wrapped(conn_params)
    conn = pool.checkout()
    setattr(conn, _POOL, pool)
    return conn


def init_connection_state(wrapper: Any, wrapped: Any) -> None:
    conn = wrapper.connection
    if conn is not None and getattr(conn, _INITIALIZED, False):
        # A pooled connection Django already set up: skip the SET round
        # trip, keep the base class's once-per-alias version check.
        BaseDatabaseWrapper.init_connection_state(wrapper)
        return
    wrapped()
    if conn is not None and getattr(conn, _POOL, None) is not None:
        setattr(conn, _INITIALIZED, True)


def close(wrapper: Any, wrapped: Any) -> None:
    """``_close``: give a pooled connection back (or away if it had errors)."""
    conn = wrapper.connection
    pool = getattr(conn, _POOL, None) if conn is not None else None
    if pool is None:
        return wrapped()
    wrapper.connection = None
    setattr(conn, _POOL, None)
    if wrapper.errors_occurred:
        pool.discard(conn, "errors_occurred")
    else:
        try:
            pool.checkin(conn)
        except PoolError:
            log.exception("returning a connection to %r failed", pool)
    return None


def discard_raw(wrapper: Any, reason: str) -> None:
    """Drop a wrapper's pooled connection without reuse (after a failure)."""
    conn = getattr(wrapper, "connection", None)
    pool = getattr(conn, _POOL, None) if conn is not None else None
    if pool is not None:
        wrapper.connection = None
        setattr(conn, _POOL, None)
        pool.discard(conn, reason)


def close_if_health_check_failed(wrapper: Any, wrapped: Any) -> None:
    if getattr(wrapper.connection, _POOL, None) is not None:
        return  # the pool checked it on checkout
    return wrapped()


class CachedServerData:
    """``mysql_server_data`` computed once per alias and server, not per wrapper.

    Each worker has its own ``DatabaseWrapper``; without this cache each
    request would first send ``SELECT VERSION(), @@sql_mode, ...``.
    """

    def __init__(self, original: Any) -> None:
        self.original = original
        self.func = getattr(original, "func", original)
        self.name = "mysql_server_data"

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        key = (instance.alias, _cached_params_key(instance, instance.get_connection_params()))
        data = _server_data.get(key)
        if data is None:
            data = _server_data[key] = self.func(instance)
        instance.__dict__[self.name] = data
        return data


def forget_server_data() -> None:
    _server_data.clear()
    _params.clear()
