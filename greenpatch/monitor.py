"""Watch IOLoops for blocking code, and log pool statistics periodically.

Everything in greenpatch runs on one IOLoop thread: a worker that calls
something that does not yield - ``time.sleep``, the C ``mysqlclient``
driver, a long computation - stops every other request until it returns.
The *blocking detector* finds such code, the way gevent's monitor thread
does::

    from greenpatch import monitor
    m = monitor.start()          # on the current IOLoop; threshold 0.1 s
    ...
    m.stop()

* the loop records a heartbeat from a timer callback every ``threshold / 4``
  seconds (a clock read and a timer; see `Monitor`);
* a daemon watchdog thread wakes up when the heartbeat could first be
  overdue by ``threshold`` (so about once per threshold while the loop is
  healthy). When it is, the loop is blocked: the watchdog takes the stack
  of the loop's thread (``sys._current_frames()``), which is the stack of
  whatever runs there - usually a worker greenlet, so the offending line
  is in it. Code that holds the GIL (a long C call) keeps the watchdog
  from looking until it returns; the episode is still reported, by the
  late heartbeat, with its stack if the watchdog saw it;
* one WARNING on the ``greenpatch.monitor`` logger per blocking episode,
  with the stack and how long the loop was blocked, logged when the loop
  resumes (or, for a loop still blocked after a second, then, with the
  duration so far; an INFO line gives the total when it resumes);
* `stats` counts the episodes: ``{"blocked": n, "max_block_seconds": x,
  "blocked_seconds": total, "threshold": t, "loops": monitored loops}``.

Durations are lower bounds measured from when the heartbeat was due, so
they read short by at most ``threshold / 4``. A process that gets no CPU
for longer than the threshold (an overloaded machine, SIGSTOP, a paused
VM) is reported as blocked too, with whatever stack it had.

`greenpatch.server.serve` and ``runserver`` under greenpatch start a
detector on their loop (threshold from ``GREENPATCH_BLOCKING_THRESHOLD``,
``0`` disables it) and, when ``GREENPATCH_STATS_INTERVAL`` is set, a
`StatsLogger` that writes one INFO line per connection pool, and one of
worker counts, to the ``greenpatch.stats`` logger every that many seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from typing import Any

from tornado.ioloop import IOLoop

from greenpatch import config, hub

__all__ = [
    "Monitor",
    "Observers",
    "StatsLogger",
    "settings_from_env",
    "start",
    "start_from_env",
    "start_stats_logger",
    "stats",
]

log = logging.getLogger("greenpatch.monitor")
stats_log = logging.getLogger("greenpatch.stats")

#: An episode still going on after this many seconds is reported at once,
#: with its duration so far (when the threshold is lower).
LONG_BLOCK = 1.0
#: Frames of the blocked thread's stack shown, most recent last.
STACK_LIMIT = 64
#: Shortest heartbeat / watchdog period, whatever the threshold.
MIN_PERIOD = 0.001
# The watchdog wakes up this long after the loop could first be called blocked.
_SLACK = 0.0005

_monotonic = time.monotonic

_lock = threading.Lock()
_monitors: dict[int, Monitor] = {}  # id(io_loop) -> running monitor
_totals: dict[str, Any] = {"blocked": 0, "max_block_seconds": 0.0, "blocked_seconds": 0.0}


def stats() -> dict[str, Any]:
    """Blocking-detector statistics of this process.

    ``blocked``: blocking episodes seen by every monitor since the process
    started (or forked); ``max_block_seconds``: the longest;
    ``blocked_seconds``: their total duration (episodes that have ended);
    ``threshold``: the smallest threshold of the monitors running now, or
    None when no loop is monitored; ``loops``: how many loops are.
    """
    with _lock:
        running = [m.threshold for m in _monitors.values()]
        return {
            "blocked": _totals["blocked"],
            "max_block_seconds": _totals["max_block_seconds"],
            "blocked_seconds": _totals["blocked_seconds"],
            "threshold": min(running) if running else None,
            "loops": len(running),
        }


_loop_code_set: frozenset[Any] = frozenset()


def _loop_codes() -> frozenset[Any]:
    """Code objects of the event loop's own polling and dispatching."""
    global _loop_code_set
    if not _loop_code_set:
        import asyncio.base_events
        import selectors

        codes = {asyncio.base_events.BaseEventLoop._run_once.__code__}
        for cls in vars(selectors).values():
            if isinstance(cls, type) and issubclass(cls, selectors.BaseSelector):
                select = vars(cls).get("select")
                if select is not None and hasattr(select, "__code__"):
                    codes.add(select.__code__)
        _loop_code_set = frozenset(codes)
    return _loop_code_set


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _account(count: int = 0, duration: float | None = None, ended: bool = False) -> None:
    with _lock:
        _totals["blocked"] += count
        if duration is not None:
            _totals["max_block_seconds"] = max(_totals["max_block_seconds"], duration)
            if ended:
                _totals["blocked_seconds"] += duration


class _Episode:
    __slots__ = ("due", "stack", "thread_name", "late", "reported")

    def __init__(self, due: float, stack: traceback.StackSummary | None, thread_name: str, late: float):
        self.due = due
        self.stack = stack
        self.thread_name = thread_name
        self.late = late
        self.reported = False


class Monitor:
    """The blocking detector of one IOLoop; create it with `start`.

    ``threshold`` is in seconds; a monitor with threshold 0 is disabled:
    it has no heartbeat and no thread, and `stop` does nothing.

    The heartbeat, on the loop: every ``period`` (``threshold / 4``) a
    timer callback reads the clock, stores when the next beat is due and
    schedules it - a few microseconds of work, 4 / threshold times a
    second. The watchdog thread sleeps until that due time plus the
    threshold, then compares it with the clock; it only takes a lock and
    a stack when the loop is late. A loop that is not running (before
    ``run_sync``, between two, after ``stop``) is not blocked.

    ``blocked``, ``max_block_seconds`` and ``blocked_seconds`` count this
    loop's episodes (see `stats`).
    """

    def __init__(self, io_loop: IOLoop, threshold: float) -> None:
        self.io_loop = io_loop
        self.threshold = float(threshold)
        self.period = max(self.threshold / 4, MIN_PERIOD)
        self.blocked = 0
        self.max_block_seconds = 0.0
        self.blocked_seconds = 0.0
        self._aloop: asyncio.AbstractEventLoop = io_loop.asyncio_loop  # type: ignore[attr-defined]
        self._lock = threading.Lock()
        self._due = _monotonic() + self.period  # when the next heartbeat is due
        self._stopped_seen_at = 0.0  # last time the watchdog saw the loop not running
        self._ident: int | None = None  # the loop's thread, from its first heartbeat
        self._episode: _Episode | None = None
        self._finished: list[tuple[float, _Episode | None]] = []
        self._handle: asyncio.TimerHandle | None = None
        self._running = False
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        state = "running" if self._running else ("disabled" if not self.threshold else "stopped")
        return f"<greenpatch.monitor.Monitor threshold={self.threshold:g}s {state}>"

    @property
    def enabled(self) -> bool:
        """False when the threshold is 0."""
        return self.threshold > 0

    @property
    def running(self) -> bool:
        """True between `start` and `stop` (or the loop being closed)."""
        return self._running

    def stats(self) -> dict[str, Any]:
        """This monitor's counts: ``blocked``, ``max_block_seconds``, ``blocked_seconds``, ``threshold``."""
        with self._lock:
            return {
                "blocked": self.blocked,
                "max_block_seconds": self.max_block_seconds,
                "blocked_seconds": self.blocked_seconds,
                "threshold": self.threshold,
            }

    # -- start / stop ----------------------------------------------------------------

    def _start(self) -> None:
        if not self.enabled:
            return
        self._running = True
        _loop_codes()
        if _running_loop() is self._aloop:
            self._ident = threading.get_ident()
        elif not self._aloop.is_running():
            self._stopped_seen_at = _monotonic()
        # Thread-safe, and fine before the loop runs: the first beat happens
        # on the loop's first iteration.
        self._aloop.call_soon_threadsafe(self._first_beat)
        self._thread = threading.Thread(target=self._watch, name="greenpatch-monitor", daemon=True)
        self._thread.start()
        log.debug("monitoring %r for blocks over %g s", self.io_loop, self.threshold)

    def stop(self) -> None:
        """Stop the heartbeat and the watchdog thread (joined); report what is pending.

        Safe from any thread, on a stopped or closed loop, and twice.
        """
        with _lock:
            if _monitors.get(id(self.io_loop)) is self:
                del _monitors[id(self.io_loop)]
        if not self._running:
            return
        self._running = False
        self._cancel_heartbeat()
        self._stop_event.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._flush()

    def _cancel_heartbeat(self) -> None:
        aloop = self._aloop
        if aloop.is_closed():
            return
        if aloop.is_running() and _running_loop() is not aloop:
            with contextlib.suppress(RuntimeError):  # closed meanwhile
                aloop.call_soon_threadsafe(self._cancel_on_loop)
        else:
            self._cancel_on_loop()

    def _cancel_on_loop(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.cancel()

    # -- the heartbeat (on the loop) -------------------------------------------------------

    def _first_beat(self) -> None:
        self._ident = threading.get_ident()
        self._beat()

    def _beat(self) -> None:
        if not self._running:
            return
        now = _monotonic()
        due = self._due
        self._due = next_due = now + self.period
        if now - due > self.threshold:
            self._late(due, now)
        self._handle = self._aloop.call_at(next_due, self._beat)

    def _late(self, due: float, now: float) -> None:
        # The heartbeat ran late: the loop was blocked (or stopped) since `due`.
        with self._lock:
            late = now - max(due, self._stopped_seen_at)
            episode = self._episode
            if episode is not None:
                self._episode = None
                late = max(late, episode.late)
            elif late > self.threshold:
                self.blocked += 1
                _account(count=1)
            else:
                return  # the loop was stopped, not blocked
            self._record_locked(late, ended=True)
            self._finished.append((late, episode))

    def _record_locked(self, duration: float, ended: bool) -> None:
        self.max_block_seconds = max(self.max_block_seconds, duration)
        if ended:
            self.blocked_seconds += duration
        _account(duration=duration, ended=ended)

    # -- the watchdog (its own thread) ----------------------------------------------------------

    def _watch(self) -> None:
        # Sleeps until the loop could first be called blocked (the heartbeat
        # due + threshold): about once per threshold while the loop is
        # healthy, once per period during an episode or while it is stopped.
        aloop = self._aloop
        threshold = self.threshold
        period = self.period
        timeout = period
        try:
            while not self._stop_event.wait(timeout):
                if aloop.is_closed():
                    break
                now = _monotonic()
                timeout = period
                if not aloop.is_running():
                    self._stopped_seen_at = now
                    if self._episode is not None:
                        self._end_stopped(now)
                    timeout = 2 * period
                elif self._episode is not None:
                    self._check()
                else:
                    blocked_at = max(self._due, self._stopped_seen_at) + threshold
                    if now > blocked_at:
                        self._check()
                    else:
                        timeout = blocked_at - now + _SLACK
                if self._finished:
                    self._flush()
        except Exception:
            log.exception("the blocking detector of %r failed; it stops", self.io_loop)
        finally:
            if aloop.is_closed():
                self._running = False
            if aloop.is_closed() or not self._stop_event.is_set():  # closed, or failed
                with _lock:
                    if _monitors.get(id(self.io_loop)) is self:
                        del _monitors[id(self.io_loop)]
            self._flush()

    def _check(self) -> None:
        long_report: tuple[float, _Episode] | None = None
        with self._lock:
            due = self._due
            late = _monotonic() - max(due, self._stopped_seen_at)
            episode = self._episode
            if episode is not None and episode.due != due:
                return  # the late heartbeat is ending it
            if episode is None:
                if late <= self.threshold:
                    return
                captured = self._capture()
                if captured is None or self._due != due:
                    # The loop resumed while its stack was read: that stack
                    # may be anything. The late heartbeat reports the episode.
                    return
                episode = self._episode = _Episode(due, *captured, late)
                self.blocked += 1
                _account(count=1)
            episode.late = late
            self._record_locked(late, ended=False)
            if not episode.reported and late >= max(LONG_BLOCK, self.threshold):
                episode.reported = True
                long_report = (late, episode)
        if long_report is not None:
            self._report(*long_report, still=True)

    def _end_stopped(self, now: float) -> None:
        # The loop stopped (or closed) while blocked: the episode is over.
        with self._lock:
            episode, self._episode = self._episode, None
            if episode is None:
                return
            self._record_locked(episode.late, ended=True)
            self._finished.append((episode.late, episode))

    def _capture(self) -> tuple[traceback.StackSummary | None, str] | None:
        """The loop thread's stack and name; None if the loop is between callbacks now."""
        ident = getattr(self._aloop, "_thread_id", None) or self._ident
        name = "?"
        for thread in threading.enumerate():
            if thread.ident == ident:
                name = thread.name
                break
        frame = sys._current_frames().get(ident) if ident is not None else None
        if frame is None:
            return None, name
        if frame.f_code in _loop_codes():
            # Polling or dispatching: whatever blocked the loop (code that
            # held the GIL, so this thread could not look earlier) is over.
            return None
        # Source lines are read later, outside the lock.
        stack = traceback.StackSummary.extract(
            traceback.walk_stack(frame), limit=STACK_LIMIT, lookup_lines=False
        )
        stack.reverse()
        return stack, name

    # -- reporting (watchdog thread, or stop()) ----------------------------------------------------

    def _flush(self) -> None:
        with self._lock:
            finished, self._finished = self._finished, []
        for duration, episode in finished:
            if episode is not None and episode.reported:
                log.info(
                    "IOLoop unblocked after %.3f s (reported above)",
                    duration,
                    extra={"blocked_seconds": duration},
                )
            else:
                self._report(duration, episode, still=False)

    def _report(self, duration: float, episode: _Episode | None, still: bool) -> None:
        how_long = f"{duration:.3f} s so far, and is still blocked" if still else f"{duration:.3f} s"
        head = (
            f"IOLoop blocked for {how_long} (threshold {self.threshold:g} s): nothing else ran on "
            "the loop meanwhile. Make blocking calls cooperative (greenpatch.sleep; PyMySQL, not "
            "mysqlclient) or run them in a thread."
        )
        if episode is None or episode.stack is None:
            stack_text = (
                "\nIts stack could not be taken: the blocking code held the GIL, or the loop "
                "resumed before the watchdog looked."
            )
        else:
            stack_text = (
                f"\nStack of thread {episode.thread_name!r} when the block was detected "
                "(most recent call last):\n" + "".join(episode.stack.format()).rstrip("\n")
            )
        log.warning("%s%s", head, stack_text, extra={"blocked_seconds": duration})


def _check_seconds(name: str, value: Any) -> None:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name}={value!r} is not accepted; use a number of seconds >= 0 (0: off)")


def start(io_loop: IOLoop | None = None, threshold: float | None = None) -> Monitor:
    """Start the blocking detector on ``io_loop`` (default: the current IOLoop).

    ``threshold``: seconds the loop may be blocked before it is reported;
    None reads ``GREENPATCH_BLOCKING_THRESHOLD`` (default 0.1;
    `greenpatch.ConfigError` for a bad value); 0 returns a disabled
    `Monitor`. Idempotent per loop: while a monitor runs on ``io_loop``,
    it is returned unchanged (whatever ``threshold`` says). May be called
    before the loop runs and from any thread.
    """
    if threshold is None:
        threshold = config.blocking_threshold()
    else:
        _check_seconds("threshold", threshold)
    if io_loop is None:
        io_loop = IOLoop.current()
    if not threshold:
        return Monitor(io_loop, 0.0)
    with _lock:
        monitor = _monitors.get(id(io_loop))
        if monitor is not None:
            return monitor
        monitor = _monitors[id(io_loop)] = Monitor(io_loop, threshold)
    monitor._start()
    return monitor


# -- periodic statistics lines ------------------------------------------------------------------------


def _format_pool(s: Mapping[str, Any]) -> str:
    wait = s.get("wait", {})
    held = s.get("held", {})
    return (
        f"pool {s['name']}: size={s['size']}/{s['max_size']} idle={s['idle']} in_use={s['in_use']} "
        f"waiting={s['waiting']} timeouts={s['timeouts']} "
        f"wait_mean={wait.get('mean', 0.0) * 1000:.1f}ms waits={wait.get('count', 0)} "
        f"held_mean={held.get('mean', 0.0) * 1000:.1f}ms"
    )


class StatsLogger:
    """Log one INFO line per connection pool, and one of worker counts, every ``interval`` seconds.

    Lines go to the ``greenpatch.stats`` logger, from a timer on
    ``io_loop``. A pool's line, e.g.::

        pool default/green: size=4/10 idle=1 in_use=3 waiting=2 timeouts=0 wait_mean=12.5ms waits=40 ...

    ends with ``held_mean=8.2ms``; then a line of worker counts
    (`greenpatch.hub.stats`)::

        workers: running=35 idle_greenlets=12 started=18342 killed=3

    and a ``loop monitor`` line when a blocking detector runs in the
    process. Create it with `start_stats_logger`; an ``interval`` of
    None or 0 makes a disabled logger whose `stop` does nothing.
    """

    def __init__(self, io_loop: IOLoop, interval: float | None) -> None:
        self.io_loop = io_loop
        self.interval = interval or None
        self._aloop: asyncio.AbstractEventLoop = io_loop.asyncio_loop  # type: ignore[attr-defined]
        self._handle: asyncio.TimerHandle | None = None
        self._running = False

    @property
    def enabled(self) -> bool:
        """False when there is no interval."""
        return self.interval is not None

    def _start(self) -> None:
        if not self.enabled:
            return
        self._running = True
        self._aloop.call_soon_threadsafe(self._schedule)
        if not (stats_log.isEnabledFor(logging.INFO) and stats_log.hasHandlers()):
            # E.g. Django's runserver: its logging config leaves INFO lines
            # of other loggers unseen.
            log.warning(
                "pool statistics every %g s go to the 'greenpatch.stats' logger at INFO, which "
                "is not enabled or has no handler: configure it (in Django's LOGGING, e.g. "
                '"loggers": {"greenpatch.stats": {"handlers": ["console"], "level": "INFO"}})',
                self.interval,
            )

    def _schedule(self) -> None:
        if self._running:
            self._handle = self._aloop.call_later(self.interval, self._tick)  # type: ignore[arg-type]

    def _tick(self) -> None:
        try:
            self.log_now()
        except Exception:
            stats_log.exception("logging greenpatch statistics failed")
        self._schedule()

    def log_now(self) -> None:
        """Write the statistics lines now."""
        import greenpatch

        pools = greenpatch.stats()
        if not pools:
            stats_log.info("no connection pools")
        for pool in pools:
            stats_log.info("%s", _format_pool(pool))
        w = hub.stats()
        stats_log.info(
            "workers: running=%d idle_greenlets=%d started=%d killed=%d",
            w["running"],
            w["idle_greenlets"],
            w["started"],
            w["killed"],
        )
        m = stats()
        if m["loops"]:
            stats_log.info(
                "loop monitor: blocked=%d max_block=%.3fs threshold=%gs",
                m["blocked"],
                m["max_block_seconds"],
                m["threshold"],
            )

    def stop(self) -> None:
        """Stop logging; safe from any thread, on a stopped or closed loop, and twice."""
        if not self._running:
            return
        self._running = False
        aloop = self._aloop
        if aloop.is_closed():
            return
        if aloop.is_running() and _running_loop() is not aloop:
            with contextlib.suppress(RuntimeError):
                aloop.call_soon_threadsafe(self._cancel)
        else:
            self._cancel()

    def _cancel(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.cancel()


def start_stats_logger(io_loop: IOLoop | None = None, interval: float | None = None) -> StatsLogger:
    """Log pool statistics on ``io_loop`` (default: current) every ``interval`` seconds.

    ``interval`` None reads ``GREENPATCH_STATS_INTERVAL`` (unset: a
    disabled `StatsLogger`); 0 also disables. May be called before the
    loop runs and from any thread. Stop it with `StatsLogger.stop`.
    """
    if interval is None:
        interval = config.stats_interval()
    else:
        _check_seconds("interval", interval)
    if io_loop is None:
        io_loop = IOLoop.current()
    logger = StatsLogger(io_loop, interval)
    logger._start()
    return logger


# -- what the servers use ---------------------------------------------------------------------------


def settings_from_env(environ: Mapping[str, str] | None = None) -> tuple[float, float | None]:
    """``(blocking threshold, stats interval)`` from the environment.

    Raises `greenpatch.ConfigError` naming the variable and the accepted
    values when ``GREENPATCH_BLOCKING_THRESHOLD`` or
    ``GREENPATCH_STATS_INTERVAL`` is not a number of seconds >= 0.
    """
    return config.blocking_threshold(environ), config.stats_interval(environ)


class Observers:
    """The blocking detector and stats logger that `start_from_env` started."""

    def __init__(self, monitor: Monitor, stats_logger: StatsLogger) -> None:
        self.monitor = monitor
        self.stats_logger = stats_logger

    def stop(self) -> None:
        """Stop both."""
        self.stats_logger.stop()
        self.monitor.stop()


def start_from_env(io_loop: IOLoop, environ: Mapping[str, str] | None = None) -> Observers:
    """Start what the environment asks for on ``io_loop``: used by `greenpatch.server`.

    The blocking detector (``GREENPATCH_BLOCKING_THRESHOLD``, on by
    default) and the stats logger (``GREENPATCH_STATS_INTERVAL``, off by
    default). Raises `greenpatch.ConfigError` for a bad value.
    """
    threshold, interval = settings_from_env(environ)
    return Observers(start(io_loop, threshold), start_stats_logger(io_loop, interval or 0))


def _after_fork_in_child() -> None:
    # Watchdog threads do not survive fork(); the parent's counts are not ours.
    global _lock
    _lock = threading.Lock()
    for monitor in list(_monitors.values()):
        monitor._running = False
    _monitors.clear()
    _totals.update(blocked=0, max_block_seconds=0.0, blocked_seconds=0.0)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
