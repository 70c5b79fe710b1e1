"""Django's database layer on greenlets.

* ``django.db.connections`` keeps its connections in a `GreenletLocal`
  (replaced in place: ``ConnectionProxy`` and ``transaction`` hold the
  handler itself), so every worker - every request - has its own
  connections and transactions never mix.
* When a worker ends, for any reason, its connections are closed, which
  returns pooled ones to the pool: no ``close_connection`` decorator needed.
  A ``DatabaseWrapper`` left in a clean state (closed, no transaction, no
  ``execute_wrapper``, no pending ``on_commit``) is kept and handed to the
  next worker that asks for that alias, instead of building a new one (with
  its ``ops``, ``features``, ``introspection``... objects) per request.
* Django's ``async_unsafe`` guard passes inside greenpatch workers only:
  ``django.utils.asyncio.get_running_loop`` reports "no running loop" there,
  while real coroutines on the loop still get ``SynchronousOnlyOperation``.
  ``DJANGO_ALLOW_ASYNC_UNSAFE`` is not used.
"""

from __future__ import annotations

import logging
from typing import Any

import wrapt

from greenpatch import hub
from greenpatch.local import GreenletLocal

TARGET = "django.db"

log = logging.getLogger("greenpatch.patches.django_db")

_state: dict[str, Any] = {}

# Clean DatabaseWrappers of ended workers, per alias, for the next workers.
# Bounded: after a burst of concurrent requests the surplus is dropped.
SPARE_WRAPPERS = 64
_spares: dict[str, list[Any]] = {}


def _get_running_loop(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    if isinstance(hub.getcurrent(), hub.WorkerGreenlet):
        raise RuntimeError("no running event loop in a greenpatch worker")
    return wrapped(*args, **kwargs)


def release_connections(worker: Any = None) -> None:
    """Close (return to their pool) the Django connections the current greenlet holds.

    A worker exit hook: it runs inside the worker's greenlet as it ends.
    """
    storage = _state.get("storage")
    if storage is None:
        return
    for alias, conn in storage.items():
        try:
            conn.close()
        except Exception:
            log.exception("closing Django connection %r at the end of %r failed", alias, worker)
            from greenpatch.django import pooling

            pooling.discard_raw(conn, "close_failed")
        else:
            _keep_spare(alias, conn)
    storage.clear()


def _is_clean(conn: Any) -> bool:
    # What BaseDatabaseWrapper.connect() does not reset must be as new.
    return (
        conn.connection is None
        and not conn.in_atomic_block
        and not conn.savepoint_ids
        and not conn.run_on_commit
        and not conn.execute_wrappers
        and not conn.force_debug_cursor
        and not conn.run_commit_hooks_on_set_autocommit_on
        and getattr(conn, "_thread_sharing_count", 0) == 0
    )


def _keep_spare(alias: str, conn: Any) -> None:
    spares = _spares.setdefault(alias, [])
    if len(spares) < SPARE_WRAPPERS and _is_clean(conn):
        conn.queries_log.clear()
        spares.append(conn)


def _forget_spares(**kwargs: Any) -> None:
    # A setting changed (override_settings in tests): spare wrappers may hold
    # values computed from the old one (e.g. their cached time zone).
    _spares.clear()


def _create_connection(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    if isinstance(hub.getcurrent(), hub.WorkerGreenlet):
        alias = args[0] if args else kwargs["alias"]
        spares = _spares.get(alias)
        if spares:
            conn = spares.pop()
            # Reuse only while the settings are those it was made with
            # (override_settings or the test runner may replace them).
            if conn.settings_dict is instance.settings[alias]:
                return conn
            spares.clear()
    return wrapped(*args, **kwargs)


def patch() -> None:
    if is_patched():
        return
    import django.utils.asyncio
    from django.core.signals import setting_changed
    from django.db import connections

    original = connections._connections
    storage = GreenletLocal()
    # Carry over what the current greenlet already has (e.g. the main
    # thread's connection opened before patching).
    for alias in connections.settings if _settings_ready() else ():
        try:
            setattr(storage, alias, getattr(original, alias))
        except AttributeError:
            pass
    _state.update(original=original, storage=storage)
    connections._connections = storage
    wrapt.wrap_function_wrapper(connections, "create_connection", _create_connection)
    setting_changed.connect(_forget_spares, dispatch_uid="greenpatch.django_db.spares")
    wrapt.wrap_function_wrapper(django.utils.asyncio, "get_running_loop", _get_running_loop)
    hub.add_exit_hook(release_connections)


def unpatch() -> None:
    if not is_patched():
        return
    import django.utils.asyncio
    from django.core.signals import setting_changed
    from django.db import connections

    hub.remove_exit_hook(release_connections)
    wrapper = django.utils.asyncio.get_running_loop
    django.utils.asyncio.get_running_loop = wrapper.__wrapped__
    del connections.create_connection  # the instance attribute; the class method shows again
    setting_changed.disconnect(dispatch_uid="greenpatch.django_db.spares")
    _spares.clear()
    storage = _state.pop("storage")
    original = _state.pop("original")
    for alias, conn in storage.items():
        setattr(original, alias, conn)
    connections._connections = original


def is_patched() -> bool:
    return "storage" in _state


def _settings_ready() -> bool:
    from django.conf import settings

    return settings.configured
