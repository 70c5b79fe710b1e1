"""The patch registry: one module per patched library.

Each module in this package names the library it patches (``TARGET``) and
has ``patch()``, ``unpatch()`` and ``is_patched()``. ``patch()`` is only
called once ``TARGET`` is imported: right away if it already is, otherwise
from a wrapt post-import hook, so `patch_all` may run before or after the
application imports the library.
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
from types import ModuleType

import wrapt

from greenpatch import config

__all__ = ["PATCHES", "patch", "patch_all", "patched", "unpatch", "unpatch_all"]

log = logging.getLogger("greenpatch.patches")

#: Patch name -> module under greenpatch.patches, in the order they apply.
PATCHES: dict[str, str] = {
    "pymysql": "greenpatch.patches.pymysql",  # cooperative socket
    "mysqldb": "greenpatch.patches.mysqldb",  # PyMySQL answers `import MySQLdb`
    "django_db": "greenpatch.patches.django_db",  # greenlet-local connections
    "django_mysql": "greenpatch.patches.django_mysql",  # pool behind the MySQL backend
    "asgiref": "greenpatch.patches.asgiref",  # async_to_sync inside workers
    "runserver": "greenpatch.patches.runserver",  # runserver on Tornado
}

_lock = threading.RLock()
_requested: set[str] = set()
_hooked: set[str] = set()


def _module(name: str) -> ModuleType:
    if name not in PATCHES:
        raise config.ConfigError(f"unknown greenpatch patch {name!r}; accepted names: {', '.join(PATCHES)}")
    return importlib.import_module(PATCHES[name])


def _on_import(name: str):
    def hook(_module_object: ModuleType) -> None:
        with _lock:
            if name in _requested:
                mod = _module(name)
                if not mod.is_patched():
                    mod.patch()
                    log.debug("patched %s on import of %s", name, mod.TARGET)

    return hook


def patch(name: str) -> None:
    """Apply one patch now, or as soon as its library is imported."""
    mod = _module(name)
    with _lock:
        _requested.add(name)
        if mod.TARGET in sys.modules:
            if not mod.is_patched():
                mod.patch()
                log.debug("patched %s", name)
        elif name not in _hooked:
            # wrapt keeps hooks for good: the hook checks _requested.
            _hooked.add(name)
            wrapt.register_post_import_hook(_on_import(name), mod.TARGET)


def unpatch(name: str) -> None:
    """Remove one patch (and cancel a pending one); no-op if not applied."""
    mod = _module(name)
    with _lock:
        _requested.discard(name)
        if mod.is_patched():
            mod.unpatch()
            log.debug("unpatched %s", name)


def patch_all(**flags: bool) -> list[str]:
    """Apply every patch not switched off; return the names requested.

    ``flags`` switch single patches off (``pymysql=False``) or on. The
    environment wins: ``GREENPATCH=0`` patches nothing and
    ``GREENPATCH_DISABLE=a,b`` skips those names.
    """
    for name, value in flags.items():
        if name not in PATCHES:
            raise config.ConfigError(
                f"patch_all() got unknown patch {name!r}; accepted names: {', '.join(PATCHES)}"
            )
        if not isinstance(value, bool):
            raise config.ConfigError(f"patch_all({name}={value!r}): expected True or False")
    if not config.enabled():
        log.info("GREENPATCH=0: greenpatch.patch_all() patches nothing")
        return []
    skip = config.disabled_patches(PATCHES)
    config.turn_budget()  # a bad value fails here, not at the first connection
    names = [n for n in PATCHES if flags.get(n, True) and n not in skip]
    for name in names:
        patch(name)
    if skip:
        log.info("GREENPATCH_DISABLE: skipped %s", ", ".join(sorted(skip)))
    return names


def unpatch_all() -> None:
    """Remove every patch greenpatch applied, in reverse order."""
    for name in reversed(list(PATCHES)):
        unpatch(name)


def patched() -> list[str]:
    """Names of the patches currently applied (not merely pending)."""
    applied = []
    for name, modname in PATCHES.items():
        mod = sys.modules.get(modname)
        if mod is not None and mod.is_patched():
            applied.append(name)
    return applied
