"""Django's database layer on greenlets.

* ``django.db.connections`` keeps its connections in a `GreenletLocal`
  (replaced in place: ``ConnectionProxy`` and ``transaction`` hold the
  handler itself), so every worker - every request - has its own
  connections and transactions never mix.
* When a worker ends, for any reason, its connections are closed, which
  returns pooled ones to the pool: no ``close_connection`` decorator needed.
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


def _get_running_loop(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    if isinstance(hub.getcurrent(), hub.Worker):
        raise RuntimeError("no running event loop in a greenpatch worker")
    return wrapped(*args, **kwargs)


def release_connections(worker: Any = None) -> None:
    """Close (return to their pool) the Django connections a greenlet holds."""
    storage = _state.get("storage")
    if storage is None:
        return
    for alias, conn in storage.items(worker):
        try:
            conn.close()
        except Exception:
            log.exception("closing Django connection %r at the end of %r failed", alias, worker)
            from greenpatch.django import pooling

            pooling.discard_raw(conn, "close_failed")
    storage.clear(worker)


def patch() -> None:
    if is_patched():
        return
    import django.utils.asyncio
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
    wrapt.wrap_function_wrapper(django.utils.asyncio, "get_running_loop", _get_running_loop)
    hub.add_exit_hook(release_connections)


def unpatch() -> None:
    if not is_patched():
        return
    import django.utils.asyncio
    from django.db import connections

    hub.remove_exit_hook(release_connections)
    wrapper = django.utils.asyncio.get_running_loop
    django.utils.asyncio.get_running_loop = wrapper.__wrapped__
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
