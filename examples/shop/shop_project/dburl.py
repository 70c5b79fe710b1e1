"""Parse the demo's database URL, ``mysql://user:password@host:port/name``.

Imports nothing from Django, so ``setup_db.py`` can use it before the
database (and therefore the project) is usable.
"""

from __future__ import annotations

import os
import re
from urllib.parse import unquote, urlparse

DEFAULT_URL = "mysql://root@127.0.0.1:3306/greenpatch_shop"

_NAME = re.compile(r"^[A-Za-z0-9_$]{1,64}$")


def db_url() -> str:
    """The URL from ``SHOP_DB_URL``, or the default."""
    return os.environ.get("SHOP_DB_URL") or DEFAULT_URL


def parse(url: str) -> dict:
    """``host``, ``port``, ``user``, ``password`` and ``name`` of a mysql:// URL."""
    parsed = urlparse(url)
    if parsed.scheme not in ("mysql", "mariadb"):
        raise ValueError(
            f"SHOP_DB_URL={url!r}: scheme {parsed.scheme!r} unsupported; "
            "use mysql://user:password@host:port/name"
        )
    name = unquote(parsed.path.lstrip("/"))
    if not _NAME.match(name):
        raise ValueError(f"SHOP_DB_URL={url!r}: database name {name!r} must be 1-64 letters, digits, _ or $")
    return {
        "host": parsed.hostname or "127.0.0.1",
        "port": parsed.port or 3306,
        "user": unquote(parsed.username or "root"),
        "password": unquote(parsed.password or ""),
        "name": name,
    }
