"""greenpatch: Django's ORM and PyMySQL, concurrent on one Tornado IOLoop.

Call `patch_all` once at startup (or run under ``python -m greenpatch``);
then run blocking database code in workers with `spawn` or `green`::

    import greenpatch
    greenpatch.patch_all()

    async def handler():
        row = await greenpatch.spawn(query, 42)   # query() may block on PyMySQL

Inside a worker, PyMySQL's socket I/O parks the worker and the IOLoop keeps
running; outside one, everything behaves as stock.
"""

from __future__ import annotations

from greenpatch import (
    gc_tuning,  # serve()'s garbage collector set-up (greenpatch.gc_tuning)
    monitor,  # blocking detector and stats logger (greenpatch.monitor)
)
from greenpatch.config import ConfigError
from greenpatch.hub import (
    NotInWorkerError,
    Worker,
    current_worker,
    green,
    is_worker,
    sleep,
    spawn,
    wait,
)
from greenpatch.patches import patch_all, patched, unpatch_all

__version__ = "0.1.0"


def stats() -> list[dict]:
    """Statistics of every live connection pool in this process (see `Pool.stats`)."""
    from greenpatch.pool import all_pools

    return sorted((pool.stats() for pool in all_pools()), key=lambda s: s["name"])


__all__ = [
    "ConfigError",
    "NotInWorkerError",
    "Worker",
    "__version__",
    "current_worker",
    "gc_tuning",
    "green",
    "is_worker",
    "monitor",
    "patch_all",
    "patched",
    "sleep",
    "spawn",
    "stats",
    "unpatch_all",
    "wait",
]
