"""The bridge between greenlets and Tornado's IOLoop.

Each thread that runs an IOLoop has one *hub*: the greenlet that runs the
loop (normally the thread's main greenlet). Code that should run "blocking
style" runs in a `Worker` greenlet whose parent is the hub. When a worker
has to wait for I/O it parks itself with `wait`, which switches to the hub;
the loop then goes on serving other work until a loop callback resumes the
worker.

Rules that keep this correct:

* a worker always suspends to its hub, never to whoever started it, so
  nested spawns cannot resume the wrong greenlet;
* a worker is only ever resumed from a loop callback running in the hub;
* each `wait` has exactly one resume path: the first of {result, timeout,
  kill} wins and later events are ignored; timers are cancelled;
* a worker that the loop itself resumed (from a loop callback that does
  nothing else) and whose loop has nothing else to do - no callback ready,
  not stopping - waits for its socket in place (`FdWatch.wait`), polling
  the socket and the loop's selector until the next timer is due, instead
  of switching to the hub for a loop iteration that would block in the
  same system call. Anything else becoming ready sends it to the hub at
  once. A worker started from loop code (``spawn`` in a coroutine) always
  switches back at its first wait: that code has more to do;
* a loop closed with workers still parked on it can never resume them:
  they are killed when a worker of another loop next starts in the same
  thread, or by `reap_closed_loops` (which the pool calls outside workers),
  and a wait on a closed loop raises. A worker that had not started yet
  never will: `Worker.take_back_if_stranded` hands its call back.

A `Worker` is one function call; the greenlet it runs in, a
`WorkerGreenlet`, is reused. Creating a greenlet is not cheap: each new one
maps and faults in fresh memory for its Python frames, which cost tens of
microseconds per request (measured: 55-85 us of a ~700 us Django request).
When a worker ends, its greenlet drops everything the worker left behind -
`GreenletLocal` values, the ``contextvars`` context (each worker starts in an
empty one, as a new greenlet would) - and waits, idle, for the next worker
started on its thread. Greenlets are kept only while a thread has at most
`REUSED_GREENLETS` of them, running or idle: a reused greenlet keeps the
frame-stack pages its deepest worker touched, so under a burst of many long
requests (1,000 in flight: +4 MB) greenlets end with their workers as if
there were no reuse. A greenlet whose worker was killed is not reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import itertools
import logging
import os
import select
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import greenlet
from tornado.gen import convert_yielded
from tornado.ioloop import IOLoop

from greenpatch import local as _local

__all__ = [
    "FdWatch",
    "NotInWorkerError",
    "Worker",
    "WorkerGreenlet",
    "add_exit_hook",
    "current_worker",
    "green",
    "is_worker",
    "reap_closed_loops",
    "remove_exit_hook",
    "sleep",
    "spawn",
    "start_worker",
    "stats",
    "wait",
    "wait_fd",
]

log = logging.getLogger("greenpatch.hub")

T = TypeVar("T")

getcurrent = greenlet.getcurrent
_monotonic = time.monotonic
GreenletExit = greenlet.GreenletExit

# Sentinels passed to Worker.switch() by the resume paths of a wait.
_RESUMED = object()
_TIMED_OUT = object()

# Callables run inside every worker as it ends (normally, by exception or
# killed), newest last. Used to release what the worker holds, e.g. the
# Django connections of a request.
_exit_hooks: list[Callable[[Worker], None]] = []


class NotInWorkerError(RuntimeError):
    """Raised when a cooperative call is made outside a greenpatch worker."""


def add_exit_hook(hook: Callable[[Worker], None]) -> None:
    """Run ``hook(worker)`` inside every worker greenlet when it ends."""
    if hook not in _exit_hooks:
        _exit_hooks.append(hook)


def remove_exit_hook(hook: Callable[[Worker], None]) -> None:
    """Undo `add_exit_hook`; unknown hooks are ignored."""
    try:
        _exit_hooks.remove(hook)
    except ValueError:
        pass


def _silence(future: asyncio.Future) -> None:
    # Retrieve the outcome of a future nobody waits for any more, so asyncio
    # does not log "exception was never retrieved" when it fails late.
    if not future.cancelled():
        future.exception()


#: Worker greenlets are kept for reuse while a thread has at most this many
#: (running a worker or idle).
REUSED_GREENLETS = 128


class _Counts:
    """One thread's worker counts, readable from any thread (see `stats`)."""

    __slots__ = ("busy", "started", "killed")

    def __init__(self) -> None:
        self.busy = 0  # workers running or parked
        self.started = 0
        self.killed = 0


class _IdleList(list):
    """A thread's idle worker greenlets (weakly referenced by `stats`)."""

    __slots__ = ("__weakref__",)


class _Carriers(threading.local):
    """The worker greenlets of one thread: idle ones, and its counts."""

    def __init__(self) -> None:
        self.idle: _IdleList = _IdleList()
        self.counts = _Counts()
        # The workers started and not ended, by the asyncio loop they run on
        # (see _reap_closed_loops). A loop leaves with its last worker. Only
        # this thread reads it: stats() reads counts.busy, from any thread.
        self.running: dict[asyncio.AbstractEventLoop, set[Worker]] = {}
        # For stats(), which reads every thread's counts. The idle greenlets
        # are only referenced weakly: they go when the thread ends.
        ident = threading.get_ident()
        with _threads_lock:
            if ident in _threads:  # the ident of a thread that has ended
                _retire_locked(ident)
            _threads[ident] = (threading.current_thread(), self.counts, weakref.ref(self.idle))


_threads_lock = threading.Lock()
_threads: dict[int, tuple[threading.Thread, _Counts, weakref.ref]] = {}
_ended = _Counts()  # started and killed of threads that have ended


def _retire_locked(ident: int) -> None:
    # Its parked workers and idle greenlets went with the thread.
    _, counts, _ = _threads.pop(ident)
    _ended.started += counts.started
    _ended.killed += counts.killed


_carriers = _Carriers()


def _reset_lock_in_child() -> None:
    # Another thread may have held it when the process forked.
    global _threads_lock
    _threads_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_lock_in_child)


def stats() -> dict[str, int]:
    """Worker statistics of this process, all threads together.

    ``running``: workers started and not ended (running, or parked on a
    wait) - the requests in flight, for a server; ``idle_greenlets``: worker
    greenlets kept for the next workers (at most `REUSED_GREENLETS` per
    thread); ``started`` and ``killed``: workers started, and workers ended
    by `Worker.kill` (a cancelled future, a client that went away), since
    the process started (a forked child goes on from its parent's counts).
    """
    with _threads_lock:
        for ident, (thread, _, _) in list(_threads.items()):
            if not thread.is_alive():
                _retire_locked(ident)
        totals = {"running": 0, "idle_greenlets": 0, "started": _ended.started, "killed": _ended.killed}
        for _, counts, idle_ref in _threads.values():
            idle = idle_ref()
            totals["running"] += counts.busy
            totals["idle_greenlets"] += len(idle) if idle is not None else 0
            totals["started"] += counts.started
            totals["killed"] += counts.killed
    return totals


class Worker:
    """One function running cooperatively on an IOLoop, in a `WorkerGreenlet`.

    Create workers with `spawn` or `start_worker`; the worker's `future`
    carries the function's result, or its exception with the traceback.
    """

    __slots__ = ("fn", "args", "kwargs", "loop", "future", "_greenlet", "_done", "__weakref__")

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple,
        kwargs: dict[str, Any],
        loop: IOLoop,
    ) -> None:
        self.fn: Callable[..., Any] | None = fn
        self.args: tuple | None = args
        self.kwargs: dict[str, Any] | None = kwargs
        self.loop = loop
        self.future: asyncio.Future = asyncio.Future(loop=loop.asyncio_loop)  # type: ignore[attr-defined]
        self.future.add_done_callback(self._on_future_done)
        self._greenlet: WorkerGreenlet | None = None  # while running
        self._done = False

    def __repr__(self) -> str:
        fn = self.fn
        name = getattr(fn, "__qualname__", repr(fn)) if fn is not None else "-"
        state = "dead" if self._done else ("running" if self._greenlet is not None else "pending")
        return f"<greenpatch.Worker {name} {state}>"

    @property
    def dead(self) -> bool:
        """True once the function has returned or raised, or the worker was killed."""
        return self._done

    @property
    def pending(self) -> bool:
        """True until the worker starts (or is cancelled before it does)."""
        return self._greenlet is None and not self._done

    def take_back_if_stranded(self) -> tuple[Callable[..., Any], tuple, dict[str, Any]] | None:
        """``(fn, args, kwargs)`` of a worker that never started and never will,
        its loop closed meanwhile, for the caller to run some other way; the
        worker is then dead. None for any other worker.
        """
        if not self.pending or not self.loop.asyncio_loop.is_closed():  # type: ignore[attr-defined]
            return None
        call = (self.fn, self.args or (), self.kwargs or {})
        self.fn = self.args = self.kwargs = None
        self._done = True
        if not self.future.done():
            with contextlib.suppress(RuntimeError):  # its callbacks cannot be scheduled any more
                self.future.cancel()
        return call  # type: ignore[return-value]

    # -- lifecycle ---------------------------------------------------------

    def _start(self, by_loop: bool = False) -> None:
        # Always called in the greenlet that runs the loop: that greenlet
        # becomes the hub the worker suspends to. ``by_loop``: called as a
        # loop callback of its own, which does nothing after this returns.
        if self._done:
            return
        if self.future.done():  # cancelled before it started
            self._done = True
            return
        carriers = _carriers
        running = carriers.running
        aloop = self.loop.asyncio_loop  # type: ignore[attr-defined]
        workers = running.get(aloop)
        if workers is None:
            if running:  # workers of another loop: has it been closed under them?
                _reap_closed_loops(running)
            workers = running[aloop] = set()
        workers.add(self)
        carrier = carriers.idle.pop() if carriers.idle else WorkerGreenlet()
        counts = carriers.counts
        counts.busy += 1
        counts.started += 1
        carrier.parent = getcurrent()
        carrier.worker = self
        carrier._by_loop = by_loop
        self._greenlet = carrier
        carrier.switch()

    def _run_exit_hooks(self) -> None:
        for hook in list(_exit_hooks):
            try:
                hook(self)
            except GreenletExit:
                raise
            except Exception:
                log.exception("greenpatch exit hook %r failed in %r", hook, self)

    def _on_future_done(self, future: asyncio.Future) -> None:
        # Cancelling the future (e.g. asyncio.wait_for timing out on it)
        # kills the worker, so a cancelled request stops its query.
        if future.cancelled() and not self._done:
            self.kill()

    def kill(self) -> None:
        """Raise GreenletExit in the worker at its current wait point.

        From the hub the worker is killed at once; from anywhere else the
        kill is scheduled on the worker's loop. A worker that never started
        is simply cancelled; one that has ended is left alone.
        """
        if self._done:
            return
        carrier = self._greenlet
        if carrier is None:  # never started
            self._done = True
            if not self.future.done():
                self.future.cancel()
            return
        if getcurrent() is carrier.parent:
            carrier._by_loop = False
            carrier.throw(GreenletExit)
        else:
            self.loop.add_callback(self._kill_from_hub)

    def _kill_from_hub(self) -> None:
        carrier = self._greenlet
        if not self._done and carrier is not None and carrier.worker is self:
            carrier._by_loop = False
            carrier.throw(GreenletExit)


def _reap_closed_loops(running: dict[asyncio.AbstractEventLoop, set[Worker]]) -> None:
    """Kill the workers left parked on loops of this thread that were closed.

    A loop stopped and closed with workers still waiting (``run_sync`` timed
    out, a test's loop torn down) can never resume them: they would hold
    what they hold - a pooled connection, above all - for good. Each is
    killed here, as a worker of a new loop of the same thread starts, so
    its exit hooks give its connections back (or discard them: a wait on a
    closed loop raises). Only workers whose hub is the current greenlet
    can be killed from here; others are left as they are.
    """
    me = getcurrent()
    for aloop in [loop for loop in running if loop.is_closed()]:
        workers = [w for w in running[aloop] if w._greenlet is not None and w._greenlet.parent is me]
        if workers:
            log.warning(
                "killing %d greenpatch worker(s) left waiting on a closed IOLoop, e.g. %r",
                len(workers),
                workers[0],
            )
        for worker in workers:
            worker.kill()


def reap_closed_loops() -> None:
    """Kill now the workers this thread left parked on IOLoops closed since.

    Otherwise that happens when the thread next starts a worker on another
    loop. Only workers whose hub is the calling greenlet (normally the
    thread's main greenlet) can be killed: call it outside workers.
    """
    running = _carriers.running
    if running:
        _reap_closed_loops(running)


def _settle(method: Callable[..., Any], *args: Any) -> None:
    # Complete a worker's future. On a closed loop (a worker killed by
    # _reap_closed_loops) the future takes the outcome but its callbacks
    # cannot be scheduled any more: that is no error of the worker's.
    try:
        method(*args)
    except RuntimeError:
        if not method.__self__.get_loop().is_closed():  # type: ignore[attr-defined]
            raise


def _carry() -> None:
    # The body of every WorkerGreenlet: run its worker, then wait, idle, for
    # the next one. Everything is inline: each Python frame between this and
    # the worker's function is stack memory every parked worker holds. While
    # idle, the frame holds nothing of the last worker (its function,
    # arguments, result) and no reference to its own greenlet: a suspended
    # greenlet referenced by its own frame is never freed, so the idle
    # greenlets of a thread that ended would leak.
    while True:
        me: WorkerGreenlet = getcurrent()  # type: ignore[assignment]
        worker = me.worker
        assert worker is not None
        future = worker.future
        fn, args, kwargs = worker.fn, worker.args, worker.kwargs
        # Drop references early: the future may outlive the worker.
        worker.fn = worker.args = worker.kwargs = None
        killed = False
        try:
            try:
                result = fn(*args, **kwargs)  # type: ignore[misc]
            finally:
                worker._run_exit_hooks()
        except GreenletExit:
            killed = True
            if not future.done():
                _settle(future.cancel)
        except BaseException as exc:
            if not future.done():
                _settle(future.set_exception, exc)
            elif not isinstance(exc, Exception):
                raise
            else:
                log.debug("%r failed after its future was cancelled", worker, exc_info=True)
        else:
            if not future.done():
                _settle(future.set_result, result)
        finally:
            worker._done = True
            worker._greenlet = None
            me.worker = None
            carriers = _carriers
            counts = carriers.counts
            counts.busy -= 1
            aloop = worker.loop.asyncio_loop  # type: ignore[attr-defined]
            workers = carriers.running.get(aloop)
            if workers is not None:
                workers.discard(worker)
                if not workers:
                    del carriers.running[aloop]
            # Nothing a worker stored is seen by the next: its
            # GreenletLocals and its contextvars context go (the next
            # starts with an empty one, as a new greenlet would).
            _local.reset(me)
            me.gr_context = None
        if killed:
            counts.killed += 1
            return  # unwound by GreenletExit: let this greenlet end
        if counts.busy + len(carriers.idle) >= REUSED_GREENLETS:
            return
        carriers.idle.append(me)
        me = worker = future = fn = args = kwargs = result = aloop = workers = None  # type: ignore[assignment]
        try:
            getcurrent().parent.switch()  # idle until Worker._start hands over the next one
        except GreenletExit:  # collected while idle
            return


class WorkerGreenlet(greenlet.greenlet):
    """The greenlet workers run in: one worker at a time, then the next.

    ``worker`` is the `Worker` it runs now (None while idle). Its parent is
    the hub, the greenlet that runs the loop.
    """

    def __init__(self) -> None:
        super().__init__(_carry)
        self.worker: Worker | None = None
        self._wait_token: object | None = None
        # True while the worker runs because a loop callback of its own
        # switched to it (a resume, a start scheduled on the loop): when it
        # suspends, the hub goes straight back to the loop (see FdWatch.wait).
        self._by_loop = False

    def __repr__(self) -> str:
        return f"<greenpatch.WorkerGreenlet running {self.worker!r}>"

    # -- waiting -----------------------------------------------------------

    def _suspend(
        self, arm: Callable[[Callable[..., None]], Callable[[], None]], timeout: float | None
    ) -> None:
        """Switch to the hub until resumed, or until ``timeout`` seconds.

        ``arm(resume)`` registers the resume path and returns what undoes
        it. Exactly one of {resume, timeout, kill} wins: the token makes a
        late resume or timer a no-op, and both are removed on the way out.
        """
        aloop = self.worker.loop.asyncio_loop  # type: ignore[union-attr]
        if aloop.is_closed():
            # Killed by _reap_closed_loops and waiting on the way out (a
            # rollback at checkin...): nothing could ever resume it.
            raise RuntimeError(f"{self.worker!r} cannot wait: its IOLoop is closed")
        token = self._wait_token = object()

        def resume(*_: Any) -> None:
            if self._wait_token is token:
                self._wait_token = None
                self._by_loop = True
                self.switch(_RESUMED)

        disarm = arm(resume)
        deadline = None
        if timeout is not None:
            deadlines = _by_loop.deadlines.get(aloop)
            if deadlines is None:
                deadlines = _Deadlines.for_loop(aloop)
            deadline = deadlines.add(aloop.time() + max(timeout, 0.0), self, token)
        try:
            how = self.parent.switch()
        finally:
            self._wait_token = None
            if deadline is not None:
                deadlines.cancel(deadline)
            disarm()
        if how is _TIMED_OUT:
            raise TimeoutError(f"timed out after {timeout:g} s")
        if how is not _RESUMED:
            # Someone switched into a parked worker by hand: a bug in the caller.
            raise RuntimeError(f"{self.worker!r} was resumed by an unexpected switch ({how!r})")

    def _expire(self, token: object) -> None:
        # The timeout of the wait ``token`` is due (see _Deadlines).
        if self._wait_token is token:
            self._wait_token = None
            self._by_loop = True
            self.switch(_TIMED_OUT)

    def _park(self, future: asyncio.Future, timeout: float | None) -> Any:
        def arm(resume: Callable[..., None]) -> Callable[[], None]:
            future.add_done_callback(resume)
            return lambda: future.done() or future.remove_done_callback(resume)

        try:
            self._suspend(arm, timeout)
        except TimeoutError:
            future.add_done_callback(_silence)
            raise
        return future.result()


class _Deadlines:
    """The timeouts of the waits on one asyncio loop, behind one loop timer.

    Most timed waits end long before their timeout (a pool checkout waits
    milliseconds with a 30 s timeout), and an asyncio timer per wait cost
    several microseconds: a ``TimerHandle``, pushed on the loop's heap with
    a Python-level comparison per level, then cancelled and left there
    until the loop cleans it up. Here a deadline is a list pushed on a heap
    compared in C, and a cancelled one only drops its reference to the
    worker. One loop timer is armed for the earliest deadline; when it
    fires it expires what is due, drops the cancelled entries on top and is
    armed for the next live one. Cancelled entries also go all at once when
    they are more than half of the heap (as asyncio does with its timers).
    Only the loop's own thread uses it: waits happen there.
    """

    __slots__ = ("aloop", "heap", "dead", "handle")

    #: Fewer cancelled entries than this are never swept out at once.
    SWEEP_MIN = 256

    def __init__(self, aloop: asyncio.AbstractEventLoop) -> None:
        self.aloop = aloop
        # [when, seq, carrier or None once cancelled or due, wait token]
        self.heap: list[list[Any]] = []
        self.dead = 0
        self.handle: asyncio.TimerHandle | None = None  # armed for the earliest deadline

    @staticmethod
    def for_loop(aloop: asyncio.AbstractEventLoop) -> _Deadlines:
        by_loop = _by_loop.deadlines
        for closed in [loop for loop in by_loop if loop.is_closed()]:
            del by_loop[closed]  # its timer can never fire
        deadlines = by_loop[aloop] = _Deadlines(aloop)
        return deadlines

    def add(self, when: float, carrier: WorkerGreenlet, token: object) -> list[Any]:
        entry = [when, next(_deadline_seq), carrier, token]
        heapq.heappush(self.heap, entry)
        if self.handle is None or when < self.handle.when():
            self._arm(when)
        return entry

    def cancel(self, entry: list[Any]) -> None:
        if entry[2] is None:  # due already
            return
        entry[2] = None
        self.dead += 1
        if self.dead > self.SWEEP_MIN and self.dead * 2 > len(self.heap):
            heap = self.heap
            heap[:] = [e for e in heap if e[2] is not None]  # in place: _fire may be iterating
            heapq.heapify(heap)
            self.dead = 0

    def _arm(self, when: float) -> None:
        if self.handle is not None:
            self.handle.cancel()
        self.handle = self.aloop.call_at(when, self._fire)

    def _fire(self) -> None:
        # Only the armed handle can fire: _arm cancels the one it replaces.
        handle, self.handle = self.handle, None
        heap = self.heap
        # The loop calls a timer a little early (within its clock's
        # resolution): whatever was due by then is due now.
        due = max(handle.when(), self.aloop.time())  # type: ignore[union-attr]
        try:
            while heap and heap[0][0] <= due:
                entry = heapq.heappop(heap)
                carrier = entry[2]
                if carrier is None:
                    self.dead -= 1
                    continue
                entry[2] = None
                carrier._expire(entry[3])  # runs that worker until its next wait
        finally:
            while heap and heap[0][2] is None:
                heapq.heappop(heap)
                self.dead -= 1
            if heap and (self.handle is None or heap[0][0] < self.handle.when()):
                self._arm(heap[0][0])


class _ByLoop(threading.local):
    """What this thread keeps per loop it runs: the registered `FdWatch` of
    each (fd, event), the `_Deadlines` of the waits, and when the turn
    budget of the loop's current turn began (see `within_turn_budget`)."""

    def __init__(self) -> None:
        self.watches: dict[asyncio.AbstractEventLoop, dict[tuple[int, bool], FdWatch]] = {}
        self.deadlines: dict[asyncio.AbstractEventLoop, _Deadlines] = {}
        self.turns: dict[asyncio.AbstractEventLoop, float] = {}


_by_loop = _ByLoop()
_deadline_seq = itertools.count()


class FdWatch:
    """A registration of one fd with one loop, for reading or for writing,
    that its owner keeps between waits.

    Registering a socket with the loop and removing it again cost two system
    calls and a few microseconds of asyncio bookkeeping each time. A pooled
    database connection waits on its socket at every query of every request,
    so its `~greenpatch.socket.GreenSocket` keeps one ``FdWatch`` for as
    long as it is used from the same loop: across waits, across workers and
    while it sits idle in the pool.

    Rules that keep this safe:

    * an ``FdWatch`` is made and waited on in a worker on the loop's thread,
      and removed in that thread too; `release` from any other thread hands
      the removal to the loop (``call_soon_threadsafe``);
    * the fd must not be closed while the loop may still have it: a stale
      selector entry for a reused fd number makes the next registration of
      that number fail (or never fire). `release` therefore runs its
      ``then`` (normally: close the socket) only after the removal;
    * once the loop's thread has ended, nothing runs that loop any more:
      `release` from another thread then removes the registration at once;
    * while nobody waits, a ready event (the peer closed an idle
      connection) removes the registration, as the loop would otherwise see
      the same level-triggered event at every iteration;
    * a removal handed to the loop may run after the same socket came back
      to that loop and was registered again (a worker there checked it out
      of the pool meanwhile): the newer watch takes the registration over,
      and the older one's removal then leaves it alone;
    * in a forked child the loop belongs to the parent (its epoll set is
      shared with it): the child never touches it.
    """

    __slots__ = ("aloop", "thread", "owner", "pid", "fd", "write", "registered", "resume")

    def __init__(self, fd: int, write: bool = False) -> None:
        carrier = getcurrent()
        if not isinstance(carrier, WorkerGreenlet):
            raise NotInWorkerError("greenpatch.FdWatch() can only be made inside a greenpatch worker")
        self.aloop: asyncio.AbstractEventLoop = carrier.worker.loop.asyncio_loop  # type: ignore[union-attr]
        self.thread = threading.get_ident()
        self.owner = threading.current_thread()
        self.pid = os.getpid()
        self.fd = fd
        self.write = write
        self.resume: Callable[..., None] | None = None
        watches = _by_loop.watches.setdefault(self.aloop, {})
        older = watches.get((fd, write))
        if older is not None:  # its removal is on its way: this one replaces it
            older.registered = False
        if write:
            self.aloop.add_writer(fd, self._ready)
        else:
            self.aloop.add_reader(fd, self._ready)
        watches[(fd, write)] = self
        self.registered = True

    def __repr__(self) -> str:
        state = "registered" if self.registered else "removed"
        return f"<greenpatch.FdWatch fd={self.fd} {'write' if self.write else 'read'} {state}>"

    def serves(self, fd: int, write: bool, aloop: asyncio.AbstractEventLoop) -> bool:
        """True if a worker on ``aloop`` can wait on ``fd`` (for writing or not) with this watch."""
        return self.registered and self.fd == fd and self.write is write and self.aloop is aloop

    def wait(self, timeout: float | None = None) -> None:
        """Park the current worker until the fd is ready; `TimeoutError` after ``timeout``.

        On a timeout, a kill or any other exception the registration is removed.
        """
        carrier = getcurrent()
        try:
            if timeout is None and carrier._by_loop and self._wait_in_place():  # type: ignore[union-attr]
                return
            carrier._suspend(self._arm, timeout)  # type: ignore[union-attr]
        except BaseException:
            self._remove()
            raise

    def release(self, then: Callable[[], None] | None = None) -> bool:
        """Remove the registration, then call ``then()``.

        From the loop's own thread (or when the loop is closed, or in a
        forked child) both happen now and True is returned. From another
        thread the removal is scheduled on the loop, ``then`` runs there
        after it, and False is returned; if the loop never runs again,
        neither does ``then`` - unless its thread has ended: both then
        happen now.
        """
        if (
            self.registered
            and self.pid == os.getpid()
            and threading.get_ident() != self.thread
            and self.owner.is_alive()
        ):
            try:
                self.aloop.call_soon_threadsafe(self._remove_then, then)
                return False
            except RuntimeError:  # the loop is closed: so is its selector
                pass
        self._remove()
        if then is not None:
            then()
        return True

    # -- internals ----------------------------------------------------------

    def _wait_in_place(self) -> bool:
        """Wait here while the loop has nothing else to do; True once the fd is ready.

        Saves a loop iteration and two greenlet switches per wait (about
        8 us of CPU per query on one connection). Reads asyncio's event
        loop internals; any other loop waits the usual way.
        """
        aloop = self.aloop
        try:
            if aloop._ready or aloop._stopping:  # type: ignore[attr-defined]
                return False
            scheduled = aloop._scheduled  # type: ignore[attr-defined]
            selector_fd = aloop._selector.fileno()  # type: ignore[attr-defined]
        except AttributeError:
            return False
        ms = None
        if scheduled:  # wake up when the loop's next timer is due
            ms = (scheduled[0].when() - aloop.time()) * 1000
            if ms <= 0:
                return False
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT if self.write else select.POLLIN)
        poller.register(selector_fd, select.POLLIN)
        for fd, _ in poller.poll(ms):  # our fd makes the selector ready too
            if fd == self.fd:
                return True
        return False

    def _arm(self, resume: Callable[..., None]) -> Callable[[], None]:
        self.resume = resume
        return self._disarm

    def _disarm(self) -> None:
        self.resume = None

    def _ready(self) -> None:
        if self.resume is not None:
            self.resume()
        else:  # nobody waits (level-triggered): stop watching
            self._remove()

    def _remove(self) -> None:
        # Only ever in the loop's thread (or with the loop closed, or forked).
        if not self.registered:
            return
        if self.pid == os.getpid():
            watches = _by_loop.watches.get(self.aloop)
            if watches is not None and watches.get((self.fd, self.write)) is self:
                del watches[(self.fd, self.write)]
                if not watches:
                    del _by_loop.watches[self.aloop]
            if not self.aloop.is_closed():
                if self.write:
                    self.aloop.remove_writer(self.fd)
                else:
                    self.aloop.remove_reader(self.fd)
        self.registered = False  # after the removal: other threads read it

    def _remove_then(self, then: Callable[[], None] | None) -> None:
        try:
            self._remove()
        finally:
            if then is not None:
                then()


def wait_fd(fd: int, write: bool = False, timeout: float | None = None) -> None:
    """Park the current worker until ``fd`` is readable (or writable).

    The descriptor is watched only for the duration of the call, so it is
    never left registered with a loop. Raises `TimeoutError` after
    ``timeout``. Code that waits on the same fd again and again (a socket)
    can keep an `FdWatch` instead.
    """
    if not isinstance(getcurrent(), WorkerGreenlet):
        raise NotInWorkerError("greenpatch.wait_fd() can only be called inside a greenpatch worker")
    watch = FdWatch(fd, write)
    watch.wait(timeout)
    watch._remove()


def current_worker() -> Worker | None:
    """The worker running now, or None outside workers."""
    cur = getcurrent()
    return cur.worker if isinstance(cur, WorkerGreenlet) else None


def within_turn_budget(budget: float) -> bool:
    """Whether the current worker may go on at once, without letting the
    other callbacks queued on its loop run first.

    A turn of the loop (one pass over its ready callbacks) has ``budget``
    seconds for that, shared by all the workers it runs, from the first
    time it is asked in that turn; later in the turn the answer is False,
    and the next turn has a new budget. So a turn lasts at most the budget
    plus one step of each worker, and every worker gets a step every turn.

    False outside workers, and while nothing else is queued (nobody waits
    for a turn: the worker waits in place instead). Reads asyncio's event
    loop internals; on any other loop, something is taken to be queued.
    """
    cur = getcurrent()
    if not isinstance(cur, WorkerGreenlet):
        return False
    aloop = cur.worker.loop.asyncio_loop  # type: ignore[union-attr]
    try:
        if not aloop._ready:
            return False
    except AttributeError:
        pass
    turns = _by_loop.turns
    began = turns.get(aloop)
    now = _monotonic()
    if began is None:
        if turns:  # another loop of this thread's: drop it if it was closed meanwhile
            for closed in [loop for loop in turns if loop.is_closed()]:
                del turns[closed]
        turns[aloop] = now
        aloop.call_soon(turns.pop, aloop, None)  # runs first thing in the next turn
        return budget > 0
    return now - began < budget


def is_worker() -> bool:
    """True when called inside a greenpatch worker."""
    return isinstance(getcurrent(), WorkerGreenlet)


def start_worker(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Worker:
    """Like `spawn`, but return the `Worker` (its ``future`` is what spawn returns)."""
    cur = getcurrent()
    if isinstance(cur, WorkerGreenlet):
        worker = Worker(fn, args, kwargs, cur.worker.loop)  # type: ignore[union-attr]
        worker.loop.add_callback(worker._start, True)
    else:
        worker = Worker(fn, args, kwargs, IOLoop.current())
        worker._start()
    return worker


def spawn(fn: Callable[..., T], *args: Any, **kwargs: Any) -> asyncio.Future:
    """Run ``fn(*args, **kwargs)`` in a new worker on the current IOLoop.

    Returns an awaitable future with the result, or the exception and its
    traceback. Called from loop code (a coroutine or callback) the worker
    starts at once and runs until its first wait; called from inside a
    worker, it starts on the next loop iteration. Cancelling the future
    kills the worker.
    """
    return start_worker(fn, *args, **kwargs).future


def green(fn: Callable[..., T]) -> Callable[..., asyncio.Future]:
    """Decorate ``fn`` so that each call runs it in a new worker.

    The decorated function returns the worker's future; await it from a
    coroutine. Tornado ``RequestHandler`` methods may be decorated too.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> asyncio.Future:
        return spawn(fn, *args, **kwargs)

    wrapper.__greenpatch_green__ = True  # type: ignore[attr-defined]
    return wrapper


def wait(future: Awaitable[T] | asyncio.Future, timeout: float | None = None) -> T:
    """Block the current worker until ``future`` is done; return its result.

    ``future`` may be any awaitable that Tornado accepts (asyncio futures,
    coroutines, ``concurrent.futures.Future``). The IOLoop keeps running
    while the worker waits. Raises `TimeoutError` after ``timeout`` seconds
    (the future itself is left alone) and `NotInWorkerError` outside a
    worker, where waiting would block the loop forever.
    """
    carrier = getcurrent()
    if not isinstance(carrier, WorkerGreenlet):
        raise NotInWorkerError(
            "greenpatch.wait() can only be called inside a greenpatch worker "
            "(started by greenpatch.spawn() or a @greenpatch.green function)"
        )
    if not isinstance(future, asyncio.Future):
        future = convert_yielded(future)
    if future.done():
        return future.result()
    return carrier._park(future, timeout)


def sleep(seconds: float) -> None:
    """Pause the current worker for ``seconds`` while the loop runs on."""
    carrier = getcurrent()
    if not isinstance(carrier, WorkerGreenlet):
        raise NotInWorkerError(
            "greenpatch.sleep() can only be called inside a greenpatch worker; "
            "use time.sleep() or asyncio.sleep() elsewhere"
        )
    future: asyncio.Future = carrier.worker.loop.asyncio_loop.create_future()  # type: ignore[union-attr]
    try:
        carrier._park(future, seconds)
    except TimeoutError:
        return
