"""Prometheus metrics for greenpatch's pools, workers and blocking detector.

Needs ``prometheus_client`` (``pip install 'greenpatch[prometheus]'``)::

    import greenpatch.metrics
    greenpatch.metrics.register()          # prometheus_client.REGISTRY

then expose the registry as usual (``prometheus_client.start_http_server``,
``make_wsgi_app``, or ``generate_latest()`` in a view). The collector reads
`greenpatch.stats`, `greenpatch.hub.stats` and `greenpatch.monitor.stats`
at each scrape; nothing is updated on the hot path.

Metrics (label ``pool``: the pool's name, e.g. ``default/green``; pools
sharing a name are added up):

=========================================== ======= ==============================
``greenpatch_pool_size``                     gauge   open connections
``greenpatch_pool_max_size``                 gauge   cap on open connections
``greenpatch_pool_idle``                     gauge   idle connections
``greenpatch_pool_in_use``                   gauge   checked-out connections
``greenpatch_pool_connecting``               gauge   connects in progress
``greenpatch_pool_waiting``                  gauge   callers waiting for a connection
``greenpatch_pool_cancelling``               gauge   extra connections killing cut connections' queries
``greenpatch_pool_recovering``               gauge   cut connections whose reply is being read
``greenpatch_pool_connects_total``           counter connections opened
``greenpatch_pool_connect_errors_total``     counter failed connects
``greenpatch_pool_checkouts_total``          counter checkouts
``greenpatch_pool_checkins_total``           counter checkins
``greenpatch_pool_timeouts_total``           counter checkouts that timed out or were refused
``greenpatch_pool_discards_total``           counter connections discarded (label ``reason``)
``greenpatch_pool_cancels_total``            counter queries of cut connections killed on the server
``greenpatch_pool_recoveries_total``         counter cut connections recovered and reused
``greenpatch_pool_wait_seconds``             summary time queued by checkouts that waited
``greenpatch_pool_wait_max_seconds``         gauge   longest such wait
``greenpatch_pool_held_seconds``             summary time from checkout to checkin
``greenpatch_pool_held_max_seconds``         gauge   longest such hold
``greenpatch_workers_running``               gauge   workers started and not ended (requests in flight)
``greenpatch_worker_greenlets_idle``          gauge   worker greenlets kept idle for reuse
``greenpatch_workers_started_total``          counter workers started
``greenpatch_workers_killed_total``           counter workers killed (cancelled, client gone)
``greenpatch_loop_blocked_total``            counter IOLoop blocking episodes
``greenpatch_loop_blocked_seconds_total``    counter their total duration
``greenpatch_loop_block_max_seconds``        gauge   the longest
``greenpatch_loop_blocking_threshold_seconds`` gauge threshold of the running detector
=========================================== ======= ==============================

Values are per process: with ``serve --processes N`` each process has its
own pools, so scrape each process (or use one process per port).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

try:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
    from prometheus_client.registry import REGISTRY, CollectorRegistry
except ImportError as exc:  # pragma: no cover - exercised in a test with the module hidden
    raise ImportError(
        "greenpatch.metrics needs the prometheus_client package; install it with "
        "pip install 'greenpatch[prometheus]' (or pip install prometheus_client)"
    ) from exc

try:
    from prometheus_client.registry import Collector as _CollectorBase
except ImportError:  # pragma: no cover - prometheus_client < 0.14
    _CollectorBase = object  # type: ignore[assignment,misc]

import greenpatch
from greenpatch import hub, monitor

__all__ = ["GreenpatchCollector", "register", "unregister"]

_GAUGES = (
    ("size", "Open connections of the pool"),
    ("max_size", "Cap on the pool's open connections"),
    ("idle", "Idle connections of the pool"),
    ("in_use", "Connections checked out of the pool"),
    ("connecting", "Connects in progress for the pool"),
    ("waiting", "Callers waiting for a connection of the pool"),
    ("cancelling", "Extra connections cancelling the server-side queries of cut ones"),
    ("recovering", "Connections cut mid-request whose reply the pool is reading"),
)
_COUNTERS = (
    ("connects", "Connections the pool opened"),
    ("connect_errors", "Connects of the pool that failed"),
    ("checkouts", "Connections checked out of the pool"),
    ("checkins", "Connections checked back into the pool"),
    ("timeouts", "Checkouts that timed out or were refused (max_waiting)"),
    ("cancels", "Server-side queries of connections cut mid-request that were killed"),
    ("recoveries", "Connections cut mid-request that the pool recovered and reused"),
)


# Timings of stats(): (key, summary's help, max gauge's help).
_TIMINGS = {
    "wait": (
        "Seconds queued by checkouts that had to wait and were served",
        "Longest time a checkout of the pool waited",
    ),
    "held": (
        "Seconds from checkout to checkin (or discard) of the pool's connections",
        "Longest time a connection of the pool was held",
    ),
}


def _by_name(pools: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Pool statistics keyed by name; pools sharing a name are added up."""
    merged: dict[str, dict[str, Any]] = {}
    for s in pools:
        m = merged.get(s["name"])
        if m is None:
            m = merged[s["name"]] = {key: s[key] for key, _ in _GAUGES + _COUNTERS}
            m["discards"] = dict(s.get("discards", {}))
            for timing in _TIMINGS:
                m[f"{timing}_count"] = m[f"{timing}_sum"] = m[f"{timing}_max"] = 0
        else:
            for key, _ in _GAUGES + _COUNTERS:
                m[key] += s[key]
            for reason, n in s.get("discards", {}).items():
                m["discards"][reason] = m["discards"].get(reason, 0) + n
        for timing in _TIMINGS:
            figures = s.get(timing, {})
            count = figures.get("count", 0)
            m[f"{timing}_count"] += count
            m[f"{timing}_sum"] += figures.get("mean", 0.0) * count
            m[f"{timing}_max"] = max(m[f"{timing}_max"], figures.get("max", 0.0))
    return merged


class GreenpatchCollector(_CollectorBase):
    """A ``prometheus_client`` collector of greenpatch's statistics (see the module doc)."""

    def describe(self) -> Iterator[Any]:
        """The metric families, without samples (so registering has no side effects)."""
        return self._families({}, None, None)

    def collect(self) -> Iterator[Any]:
        """Read the statistics now and yield the metric families."""
        return self._families(_by_name(greenpatch.stats()), hub.stats(), monitor.stats())

    def _families(
        self,
        pools: dict[str, dict[str, Any]],
        workers: dict[str, int] | None,
        loop: dict[str, Any] | None,
    ) -> Iterator[Any]:
        for key, doc in _GAUGES:
            family = GaugeMetricFamily(f"greenpatch_pool_{key}", doc, labels=["pool"])
            for name, s in pools.items():
                family.add_metric([name], s[key])
            yield family
        for key, doc in _COUNTERS:
            family = CounterMetricFamily(f"greenpatch_pool_{key}", doc, labels=["pool"])
            for name, s in pools.items():
                family.add_metric([name], s[key])
            yield family
        discards = CounterMetricFamily(
            "greenpatch_pool_discards",
            "Connections the pool discarded, by reason (closed, lifetime, idle, check_failed, ...)",
            labels=["pool", "reason"],
        )
        for name, s in pools.items():
            for reason, n in sorted(s["discards"].items()):
                discards.add_metric([name, reason], n)
        yield discards
        for timing, (doc, max_doc) in _TIMINGS.items():
            summary = SummaryMetricFamily(f"greenpatch_pool_{timing}_seconds", doc, labels=["pool"])
            longest = GaugeMetricFamily(f"greenpatch_pool_{timing}_max_seconds", max_doc, labels=["pool"])
            for name, s in pools.items():
                summary.add_metric([name], s[f"{timing}_count"], s[f"{timing}_sum"])
                longest.add_metric([name], s[f"{timing}_max"])
            yield summary
            yield longest

        running = GaugeMetricFamily(
            "greenpatch_workers_running", "Workers started and not ended (requests in flight)"
        )
        idle = GaugeMetricFamily("greenpatch_worker_greenlets_idle", "Worker greenlets kept idle for reuse")
        started = CounterMetricFamily("greenpatch_workers_started", "Workers started")
        killed = CounterMetricFamily("greenpatch_workers_killed", "Workers killed (cancelled, client gone)")
        if workers is not None:
            running.add_metric([], workers["running"])
            idle.add_metric([], workers["idle_greenlets"])
            started.add_metric([], workers["started"])
            killed.add_metric([], workers["killed"])
        yield running
        yield idle
        yield started
        yield killed

        blocked = CounterMetricFamily(
            "greenpatch_loop_blocked", "IOLoop blocking episodes longer than the threshold"
        )
        blocked_seconds = CounterMetricFamily(
            "greenpatch_loop_blocked_seconds", "Total seconds IOLoops were blocked (episodes that ended)"
        )
        block_max = GaugeMetricFamily("greenpatch_loop_block_max_seconds", "Longest IOLoop blocking episode")
        threshold = GaugeMetricFamily(
            "greenpatch_loop_blocking_threshold_seconds", "Threshold of the running blocking detector"
        )
        if loop is not None:
            blocked.add_metric([], loop["blocked"])
            blocked_seconds.add_metric([], loop["blocked_seconds"])
            block_max.add_metric([], loop["max_block_seconds"])
            if loop["threshold"] is not None:
                threshold.add_metric([], loop["threshold"])
        yield blocked
        yield blocked_seconds
        yield block_max
        yield threshold


_registered: dict[int, tuple[CollectorRegistry, GreenpatchCollector]] = {}


def register(registry: CollectorRegistry | None = None) -> GreenpatchCollector:
    """Register the collector with ``registry`` (default: ``prometheus_client.REGISTRY``).

    Idempotent: registering again with the same registry returns the
    collector already registered there.
    """
    if registry is None:
        registry = REGISTRY
    entry = _registered.get(id(registry))
    if entry is not None and entry[0] is registry:
        return entry[1]
    collector = GreenpatchCollector()
    registry.register(collector)
    _registered[id(registry)] = (registry, collector)
    return collector


def unregister(registry: CollectorRegistry | None = None) -> None:
    """Undo `register` for ``registry`` (default: ``prometheus_client.REGISTRY``)."""
    if registry is None:
        registry = REGISTRY
    entry = _registered.pop(id(registry), None)
    if entry is not None and entry[0] is registry:
        registry.unregister(entry[1])
