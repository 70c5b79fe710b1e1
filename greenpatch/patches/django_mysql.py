"""A connection pool behind Django's stock MySQL backend, no settings change.

Wraps ``django.db.backends.mysql.base.DatabaseWrapper`` with the methods of
`greenpatch.django.pooling` (the same ones ``ENGINE:
"greenpatch.django.mysql"`` uses). Instances of that explicit engine pass
straight through, so using both never pools twice.
"""

from __future__ import annotations

from typing import Any

import wrapt

TARGET = "django.db.backends.mysql.base"

#: DatabaseWrapper method -> name of its replacement in greenpatch.django.pooling
_METHODS = {
    "get_connection_params": "get_connection_params",
    "get_new_connection": "get_new_connection",
    "init_connection_state": "init_connection_state",
    "_close": "close",
    "close_if_health_check_failed": "close_if_health_check_failed",
}
_originals: dict[str, Any] = {}
_INHERITED = object()  # the stock class had no own attribute: delete on unpatch


def _wrapper_for(impl: Any) -> Any:
    def wrapper(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        if getattr(instance, "greenpatch_pooled_engine", False):
            return wrapped(*args, **kwargs)
        return impl(instance, wrapped, *args, **kwargs)

    return wrapper


def patch() -> None:
    if is_patched():
        return
    from django.db.backends.mysql.base import DatabaseWrapper

    from greenpatch.django import pooling

    for name, impl in _METHODS.items():
        _originals[name] = DatabaseWrapper.__dict__.get(name, _INHERITED)
        wrapt.wrap_function_wrapper(DatabaseWrapper, name, _wrapper_for(getattr(pooling, impl)))
    _originals["mysql_server_data"] = DatabaseWrapper.__dict__["mysql_server_data"]
    cached = pooling.CachedServerData(_originals["mysql_server_data"])
    DatabaseWrapper.mysql_server_data = cached


def unpatch() -> None:
    if not is_patched():
        return
    from django.db.backends.mysql.base import DatabaseWrapper

    from greenpatch.django import pooling

    for name, original in _originals.items():
        if original is _INHERITED:
            delattr(DatabaseWrapper, name)
        else:
            setattr(DatabaseWrapper, name, original)
    _originals.clear()
    pooling.close_pools()


def is_patched() -> bool:
    return bool(_originals)
