"""GreenletLocal: attribute storage private to each greenlet.

Like `threading.local`, but keyed by greenlet: every greenlet (each worker,
and each thread's main greenlet) sees its own attributes. The values live
on the greenlet object itself, so they are released when the greenlet is
collected; call `clear` (e.g. from a worker exit hook) to release them
earlier and deterministically.

Unlike asgiref's ``Local``, the scope does not depend on whether an event
loop is running or on which ``contextvars`` context a greenlet happens to
run in.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import greenlet

__all__ = ["GreenletLocal", "reset"]

_getcurrent = greenlet.getcurrent
_SLOT = "_greenpatch_locals"
_keys = itertools.count()


class GreenletLocal:
    """An object whose attributes are private to the current greenlet."""

    __slots__ = ("_key", "__weakref__")

    def __init__(self) -> None:
        # A unique key, never reused (an id() could be, after collection).
        object.__setattr__(self, "_key", next(_keys))

    def _storage(self, create: bool) -> dict[str, Any] | None:
        g = _getcurrent()
        try:
            per_greenlet = g.__dict__[_SLOT]
        except KeyError:
            if not create:
                return None
            per_greenlet = g.__dict__[_SLOT] = {}
        key = self._key
        store = per_greenlet.get(key)
        if store is None and create:
            store = per_greenlet[key] = {}
        return store

    def __getattr__(self, name: str) -> Any:
        # The hot path (Django looks its connections up here many times per
        # request): one expression, no helper call.
        try:
            return _getcurrent().__dict__[_SLOT][self._key][name]
        except KeyError:
            pass
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r} in this greenlet")

    def __setattr__(self, name: str, value: Any) -> None:
        self._storage(True)[name] = value  # type: ignore[index]

    def __delattr__(self, name: str) -> None:
        store = self._storage(False)
        if store is None or name not in store:
            raise AttributeError(name)
        del store[name]

    def items(self, g: greenlet.greenlet | None = None) -> Iterator[tuple[str, Any]]:
        """The (name, value) pairs of greenlet ``g`` (default: the current one)."""
        g = _getcurrent() if g is None else g
        store = g.__dict__.get(_SLOT, {}).get(self._key, {})
        return iter(list(store.items()))

    def clear(self, g: greenlet.greenlet | None = None) -> dict[str, Any]:
        """Drop and return everything greenlet ``g`` (default: current) holds."""
        g = _getcurrent() if g is None else g
        return g.__dict__.get(_SLOT, {}).pop(self._key, {})


def reset(g: greenlet.greenlet) -> None:
    """Drop what every `GreenletLocal` holds for greenlet ``g``.

    greenpatch calls it when a worker ends, before its greenlet is reused.
    """
    g.__dict__.pop(_SLOT, None)
