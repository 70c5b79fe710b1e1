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
  kill} wins and later events are ignored; timers are cancelled.

A `Worker` is one function call; the greenlet it runs in, a
`WorkerGreenlet`, is reused. Creating a greenlet is not cheap: each new one
maps and faults in fresh memory for its Python frames, which cost tens of
microseconds per request (measured: 55-85 us of a ~700 us Django request).
When a worker ends, its greenlet drops everything the worker left behind -
`GreenletLocal` values, the ``contextvars`` context (each worker starts in an
empty one, as a new greenlet would), the registration of a socket - and
waits, idle, for the next worker started on its thread. Greenlets are kept
only while a thread has at most `REUSED_GREENLETS` of them, running or
idle: a reused greenlet keeps the frame-stack pages its deepest worker
touched, so under a burst of many long requests (1,000 in flight: +4 MB)
greenlets end with their workers as if there were no reuse. A greenlet
whose worker was killed is not reused.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import greenlet
from tornado.gen import convert_yielded
from tornado.ioloop import IOLoop

from greenpatch import local as _local

__all__ = [
    "NotInWorkerError",
    "Worker",
    "WorkerGreenlet",
    "add_exit_hook",
    "current_worker",
    "green",
    "is_worker",
    "release_fd",
    "remove_exit_hook",
    "sleep",
    "spawn",
    "start_worker",
    "wait",
    "wait_fd",
]

log = logging.getLogger("greenpatch.hub")

T = TypeVar("T")

getcurrent = greenlet.getcurrent
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


class _Carriers(threading.local):
    """The worker greenlets of one thread: idle ones, and how many run a worker."""

    def __init__(self) -> None:
        self.idle: list[WorkerGreenlet] = []
        self.busy = 0


_carriers = _Carriers()


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

    # -- lifecycle ---------------------------------------------------------

    def _start(self) -> None:
        # Always called in the greenlet that runs the loop: that greenlet
        # becomes the hub the worker suspends to.
        if self._done:
            return
        if self.future.done():  # cancelled before it started
            self._done = True
            return
        carriers = _carriers
        carrier = carriers.idle.pop() if carriers.idle else WorkerGreenlet()
        carriers.busy += 1
        carrier.parent = getcurrent()
        carrier.worker = self
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
            carrier.throw(GreenletExit)
        else:
            self.loop.add_callback(self._kill_from_hub)

    def _kill_from_hub(self) -> None:
        carrier = self._greenlet
        if not self._done and carrier is not None and carrier.worker is self:
            carrier.throw(GreenletExit)


class WorkerGreenlet(greenlet.greenlet):
    """The greenlet workers run in: one worker at a time, then the next.

    ``worker`` is the `Worker` it runs now (None while idle). Its parent is
    the hub, the greenlet that runs the loop.
    """

    def __init__(self) -> None:
        super().__init__()
        self.worker: Worker | None = None
        self._wait_token: object | None = None
        # The fd registration kept between back-to-back wait_fd(owner=...)
        # calls; dropped as soon as the worker parks on anything else or ends.
        self._fd_watch: _FdWatch | None = None

    def __repr__(self) -> str:
        return f"<greenpatch.WorkerGreenlet running {self.worker!r}>"

    def run(self) -> None:  # type: ignore[override]
        # Everything is inline here: each Python frame between this and the
        # worker's function is stack memory every parked worker holds.
        while True:
            worker = self.worker
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
                    future.cancel()
            except BaseException as exc:
                if not future.done():
                    future.set_exception(exc)
                elif not isinstance(exc, Exception):
                    raise
                else:
                    log.debug("%r failed after its future was cancelled", worker, exc_info=True)
            else:
                if not future.done():
                    future.set_result(result)
            finally:
                worker._done = True
                worker._greenlet = None
                self.worker = None
                carriers = _carriers
                carriers.busy -= 1
                self._drop_fd_watch()
                # Nothing a worker stored is seen by the next: its
                # GreenletLocals and its contextvars context go (the next
                # starts with an empty one, as a new greenlet would).
                _local.reset(self)
                self.gr_context = None
            if killed:
                return  # unwound by GreenletExit: let this greenlet end
            if carriers.busy + len(carriers.idle) >= REUSED_GREENLETS:
                return
            carriers.idle.append(self)
            try:
                self.parent.switch()  # idle until Worker._start hands over the next one
            except GreenletExit:  # collected while idle
                return

    # -- waiting -----------------------------------------------------------

    def _drop_fd_watch(self) -> None:
        watch, self._fd_watch = self._fd_watch, None
        if watch is not None:
            watch.remove()

    def _suspend(
        self, arm: Callable[[Callable[..., None]], Callable[[], None]], timeout: float | None
    ) -> None:
        """Switch to the hub until resumed, or until ``timeout`` seconds.

        ``arm(resume)`` registers the resume path and returns what undoes
        it. Exactly one of {resume, timeout, kill} wins: the token makes a
        late resume or timer a no-op, and both are removed on the way out.
        """
        token = self._wait_token = object()

        def resume(*_: Any) -> None:
            if self._wait_token is token:
                self._wait_token = None
                self.switch(_RESUMED)

        def expire() -> None:
            if self._wait_token is token:
                self._wait_token = None
                self.switch(_TIMED_OUT)

        disarm = arm(resume)
        timer = None
        if timeout is not None:
            aloop = self.worker.loop.asyncio_loop  # type: ignore[union-attr]
            timer = aloop.call_later(max(timeout, 0.0), expire)
        try:
            how = self.parent.switch()
        finally:
            self._wait_token = None
            if timer is not None:
                timer.cancel()
            disarm()
        if how is _TIMED_OUT:
            raise TimeoutError(f"timed out after {timeout:g} s")
        if how is not _RESUMED:
            # Someone switched into a parked worker by hand: a bug in the caller.
            raise RuntimeError(f"{self.worker!r} was resumed by an unexpected switch ({how!r})")

    def _park(self, future: asyncio.Future, timeout: float | None) -> Any:
        self._drop_fd_watch()

        def arm(resume: Callable[..., None]) -> Callable[[], None]:
            future.add_done_callback(resume)
            return lambda: future.done() or future.remove_done_callback(resume)

        try:
            self._suspend(arm, timeout)
        except TimeoutError:
            future.add_done_callback(_silence)
            raise
        return future.result()


class _FdWatch:
    """A worker's registration of one fd for one event (see `wait_fd`)."""

    __slots__ = ("carrier", "aloop", "fd", "write", "owner", "resume")

    def __init__(self, carrier: WorkerGreenlet, fd: int, write: bool, owner: object | None) -> None:
        self.carrier = carrier
        self.aloop = carrier.worker.loop.asyncio_loop  # type: ignore[union-attr]
        self.fd = fd
        self.write = write
        self.owner = owner
        self.resume: Callable[..., None] | None = None
        if write:
            self.aloop.add_writer(fd, self.ready)
        else:
            self.aloop.add_reader(fd, self.ready)

    def matches(self, fd: int, write: bool, owner: object | None) -> bool:
        return self.fd == fd and self.write is write and self.owner is owner

    def arm(self, resume: Callable[..., None]) -> Callable[[], None]:
        self.resume = resume
        return self.disarm

    def disarm(self) -> None:
        self.resume = None

    def ready(self) -> None:
        if self.resume is not None:
            self.resume()
        elif self.carrier._fd_watch is self:  # nobody waits (level-triggered): stop watching
            self.carrier._drop_fd_watch()

    def remove(self) -> None:
        if self.aloop.is_closed():
            return
        if self.write:
            self.aloop.remove_writer(self.fd)
        else:
            self.aloop.remove_reader(self.fd)


def release_fd(owner: object) -> None:
    """Drop the registration the current worker keeps for ``owner``; call before closing its fd."""
    carrier = getcurrent()
    if isinstance(carrier, WorkerGreenlet):
        watch = carrier._fd_watch
        if watch is not None and watch.owner is owner:
            carrier._drop_fd_watch()


def wait_fd(fd: int, write: bool = False, timeout: float | None = None, owner: object | None = None) -> None:
    """Park the current worker until ``fd`` is readable (or writable).

    Without ``owner`` the descriptor is watched only for the duration of
    the call, so it is never left registered with a loop: a socket may move
    between loops, threads and blocking use. Raises `TimeoutError` after
    ``timeout``.

    With ``owner`` (the object that owns ``fd``), the registration is kept
    after the wait for as long as the worker keeps running, so that the
    next wait of the same worker on the same fd and event costs no
    (un)registration; it is dropped as soon as the worker parks on anything
    else, waits on another fd, times out, is killed or ends. The owner must
    call `release_fd` before it closes ``fd``.
    """
    carrier = getcurrent()
    if not isinstance(carrier, WorkerGreenlet):
        raise NotInWorkerError("greenpatch.wait_fd() can only be called inside a greenpatch worker")
    watch = carrier._fd_watch
    if watch is None or not watch.matches(fd, write, owner):
        carrier._drop_fd_watch()
        watch = carrier._fd_watch = _FdWatch(carrier, fd, write, owner)
    try:
        carrier._suspend(watch.arm, timeout)
    except BaseException:  # timed out, killed, or a stray switch
        carrier._drop_fd_watch()
        raise
    if owner is None:
        carrier._drop_fd_watch()


def current_worker() -> Worker | None:
    """The worker running now, or None outside workers."""
    cur = getcurrent()
    return cur.worker if isinstance(cur, WorkerGreenlet) else None


def is_worker() -> bool:
    """True when called inside a greenpatch worker."""
    return isinstance(getcurrent(), WorkerGreenlet)


def start_worker(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Worker:
    """Like `spawn`, but return the `Worker` (its ``future`` is what spawn returns)."""
    cur = getcurrent()
    if isinstance(cur, WorkerGreenlet):
        worker = Worker(fn, args, kwargs, cur.worker.loop)  # type: ignore[union-attr]
        worker.loop.add_callback(worker._start)
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
