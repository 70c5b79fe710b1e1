"""Django's MySQL backend with connections from a SQLAlchemy ``QueuePool``.

The pooled peer for gunicorn's gevent workers: there Django's connections are
per greenlet (gevent patches ``threading.local``), so without a pool every
request would open its own connection. ``get_new_connection`` checks one out
of a process-wide ``QueuePool`` (``BENCH_POOL_SIZE``, no overflow, 30 s
timeout, rollback on return); Django's ``close()`` of the proxy returns it.
"""

from __future__ import annotations

import threading
from typing import Any

from django.conf import settings
from django.db.backends.mysql import base
from sqlalchemy.pool import QueuePool

_pools: dict[str, QueuePool] = {}
_lock = threading.Lock()


class DatabaseWrapper(base.DatabaseWrapper):
    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        key = repr(sorted(conn_params.items()))
        with _lock:
            pool = _pools.get(key)
            if pool is None:
                pool = _pools[key] = QueuePool(
                    lambda: base.Database.connect(**conn_params),
                    pool_size=settings.POOL_SIZE,
                    max_overflow=0,
                    timeout=30,
                )
        return pool.connect()
