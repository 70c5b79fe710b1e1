"""How `greenpatch.server.serve` sets up Python's cyclic garbage collector.

A server process loads its application once and then serves requests that
each allocate thousands of objects and free nearly all of them by reference
counting. Python's default collector counts allocations net of frees since
its last pass, and runs a young pass whenever that count exceeds
``threshold0`` (700 before Python 3.13, 2000 since). With dozens of requests
in flight at once their live objects keep that count up, and on the
benchmark app (`bench/`), 64 concurrent ``/db`` requests started a young
pass about every ten requests: about 60 us of CPU per request, some 8 % of
it. Each full pass also walked every object the application created at
startup (Django's models, URL patterns, modules).

With ``GREENPATCH_GC=tuned`` (the default) each serving process, once its
application is loaded:

* collects what loading left behind, then *freezes* the survivors
  (`gc.freeze`): they live for the whole process, and full passes no
  longer walk them;
* raises ``threshold0`` to `GEN0_THRESHOLD`, so that passes run when garbage
  with reference cycles has piled up, not whenever requests overlap. The
  other thresholds are kept. Cyclic garbage is still collected, at most
  `GEN0_THRESHOLD` container objects later.

The collector is left alone when it was disabled, or when its thresholds
were changed after greenpatch was imported (by the application as it
loaded, say): those are the application's choices. ``GREENPATCH_GC=python``
leaves it alone in any case.
"""

from __future__ import annotations

import gc
import logging

from greenpatch import config

__all__ = ["GEN0_THRESHOLD", "tune"]

log = logging.getLogger("greenpatch.gc_tuning")

#: ``threshold0`` of a tuned process.
GEN0_THRESHOLD = 10_000

# The thresholds as they were when greenpatch was first imported: other
# values found later were set on purpose, and are kept.
_initial_thresholds = gc.get_threshold()
_tuned = False


def tune(policy: str | None = None) -> bool:
    """Apply ``policy`` (default: ``GREENPATCH_GC``) to this process's collector.

    Call it once the application is loaded, in each serving process. Returns
    True when the collector was tuned, False when it was left alone (or
    tuned already).
    Raises `greenpatch.ConfigError` for a value other than ``tuned`` or
    ``python``.
    """
    global _tuned
    policy = config.gc_policy() if policy is None else config.parse_gc_policy("policy", policy)
    if policy == "python" or _tuned:
        return False
    if not gc.isenabled():
        log.debug("garbage collector disabled by the application: left alone")
        return False
    thresholds = gc.get_threshold()
    if thresholds != _initial_thresholds:
        log.debug("garbage collector thresholds %r set by the application: left alone", thresholds)
        return False
    _tuned = True
    gc.collect()
    gc.freeze()
    if thresholds[0] < GEN0_THRESHOLD:
        gc.set_threshold(GEN0_THRESHOLD, *thresholds[1:])
    log.debug(
        "garbage collector tuned: %d objects of the loaded application frozen, thresholds %r -> %r",
        gc.get_freeze_count(),
        thresholds,
        gc.get_threshold(),
    )
    return True
