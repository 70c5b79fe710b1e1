"""PyMySQL as ``MySQLdb``, so Django's MySQL backend runs on the green driver.

Applied when Django is imported, before its MySQL backend imports
``MySQLdb``. If the C driver (mysqlclient) was imported already, it stays in
place - it cannot be swapped under code that holds it - and a warning says
that its queries will block the IOLoop.
"""

from __future__ import annotations

import logging
import sys

TARGET = "django"

log = logging.getLogger("greenpatch.patches.mysqldb")

_installed = False


def _is_pymysql(module: object) -> bool:
    return getattr(module, "__name__", "") == "pymysql"


def patch() -> None:
    global _installed
    if _installed:
        return
    current = sys.modules.get("MySQLdb")
    if current is not None and not _is_pymysql(current):
        log.warning(
            "MySQLdb (mysqlclient, the C driver) was imported before greenpatch.patch_all(): "
            "Django will use it and every query will block the IOLoop. Call patch_all() "
            "before anything imports MySQLdb, or uninstall mysqlclient."
        )
        return
    _alias_modules()
    _installed = True


def _alias_modules() -> None:
    # pymysql.install_as_MySQLdb() aliases the package only: `import
    # MySQLdb.converters` (as Django does) then loads a second copy of
    # pymysql's modules, whose exception classes differ from pymysql's and
    # which rebinds attributes such as `pymysql.err`. Alias every submodule
    # Django imports to the one already loaded.
    import pymysql
    import pymysql.connections
    import pymysql.constants.CLIENT
    import pymysql.constants.FIELD_TYPE
    import pymysql.converters
    import pymysql.cursors
    import pymysql.err  # noqa: F401

    for name, module in list(sys.modules.items()):
        if name == "pymysql" or name.startswith("pymysql."):
            sys.modules.setdefault("MySQLdb" + name[len("pymysql") :], module)


def unpatch() -> None:
    global _installed
    if not _installed:
        return
    for name in [n for n in sys.modules if n == "MySQLdb" or n.startswith("MySQLdb.")]:
        if getattr(sys.modules[name], "__name__", "").startswith("pymysql"):
            del sys.modules[name]
    _installed = False


def is_patched() -> bool:
    return _installed and _is_pymysql(sys.modules.get("MySQLdb"))
