"""A generic, thread-safe connection pool that lets greenpatch workers wait.

`Pool` hands out connections made by a ``connect`` callable and takes them
back. It is modelled on SQLAlchemy's ``QueuePool`` and uses the option names
of Django 5.1's PostgreSQL pool (``min_size``, ``max_size``, ``timeout``,
``max_waiting``, ``max_lifetime``, ``max_idle``, ``check``)::

    pool = Pool(lambda: pymysql.connect(**params), name="default", max_size=5)
    with pool.connection() as conn:
        ...

What a pool guarantees:

* ``max_size`` is a hard cap on open connections *including those being
  opened*: a slot is reserved before ``connect`` runs (which may yield to the
  IOLoop) and freed again if it fails;
* callers that find no connection wait in one first-come first-served queue,
  whether they are greenpatch workers (parked with `greenpatch.hub.wait`, so
  the IOLoop keeps running) or plain threads (blocked on an event). Each
  waiter has its own timer; one that gives up - timeout, worker killed - is
  removed from the queue and never receives a connection later;
* a returned connection goes straight to the first waiter, otherwise onto a
  LIFO idle stack (newest first, so surplus connections age out);
* a connection is never held by two callers: checking one in twice, or one
  the pool does not know, raises `PoolError`;
* a connection is never lost from the count. The pool holds a checked-out
  connection only weakly: one that is garbage-collected without being
  checked in (its holder dropped it) frees its slot, with a warning. A
  worker parked when its thread ends can never run again, and greenlet
  never frees it: the connections it holds are closed and their slots freed
  by a `checkout` that has to wait (as it starts waiting, and about once a
  second while it waits) or by `stats`, with a warning.
  That call also kills its own thread's workers left parked on a closed
  loop (so that they give back what they hold), runs in a thread a
  recovery or a ``KILL`` that was scheduled on a loop closed before it ran,
  and settles one whose worker's thread ended first: a recovery's
  connection is closed (its statement killed) and its slot freed, a
  ``KILL`` is sent from a thread;
* a connection whose holder was killed while it waited for a reply (a
  client that went away) is *recovered* when the ops can
  (`ConnectionOps.recoverable`): the reply is read to its end within
  `CANCEL_GRACE`, an open transaction rolled back, and the connection
  goes back to the pool instead of being closed, reopened and its
  statement killed. It keeps its slot meanwhile;
* after ``os.fork()`` the child forgets the parent's connections without
  touching their sockets and starts with an empty pool.

The pool knows nothing about Django; how to ping, reset and close a
connection is the job of a `ConnectionOps` (by default `PyMySQLOps`).
One lock protects the pool's state; it is never held while connecting,
pinging, resetting, closing or waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import pymysql.err

from greenpatch import hub
from greenpatch.patches.pymysql import green_socket_of

__all__ = [
    "ConnectionOps",
    "Pool",
    "PoolClosed",
    "PoolError",
    "PoolTimeout",
    "PoolTooManyWaiting",
    "PyMySQLOps",
    "all_pools",
]

log = logging.getLogger("greenpatch.pool")

CHECK_MODES = ("auto", "always", "never")
RESET_MODES = ("rollback", "full", "none")

# pymysql.constants.SERVER_STATUS.SERVER_STATUS_IN_TRANS, SERVER_MORE_RESULTS_EXISTS
_SERVER_STATUS_IN_TRANS = 1
_SERVER_MORE_RESULTS_EXISTS = 8
# pymysql.constants.CLIENT.DEPRECATE_EOF
_CLIENT_DEPRECATE_EOF = 1 << 24
# pymysql.constants.COMMAND.COM_RESET_CONNECTION (MySQL 5.7.3+, MariaDB 10.2.4+)
_COM_RESET_CONNECTION = 0x1F
# pymysql.constants.ER.NO_SUCH_THREAD ("Unknown thread id")
_ER_NO_SUCH_THREAD = 1094

#: How often a `Pool.checkout` that has to wait looks for what nobody will
#: hand back, as it starts waiting and then while it waits, unless another
#: caller looked meanwhile (`Pool.stats` always looks): connections held by
#: workers whose thread has ended, recoveries and cancellers whose loop was
#: closed before they started or whose thread has ended.
LOST_CHECK_INTERVAL = 1.0

#: Seconds the pool waits before it KILLs the statement of a connection cut
#: mid-query (it lets short statements end by themselves); also how long it
#: waits for the reply of a connection it tries to recover.
CANCEL_GRACE = 0.1

# Connections of a parent process seen by a forked child. They stay
# referenced here for the life of the child so that no finalizer (PyMySQL's
# ``__del__`` closes its socket) ever touches the descriptors it shares with
# the parent.
_forked_connections: list[Any] = []

_pools: weakref.WeakSet[Pool] = weakref.WeakSet()


def all_pools() -> list[Pool]:
    """Every `Pool` that is still referenced, in no particular order."""
    return list(_pools)


class PoolError(pymysql.err.OperationalError):
    """Base class of the errors raised by `Pool`.

    A PyMySQL ``OperationalError``, so code that handles a lost or refused
    connection handles these too, and Django raises them as
    ``django.db.OperationalError``.
    """


class PoolTimeout(PoolError):
    """`Pool.checkout` waited longer than its timeout for a connection."""


class PoolTooManyWaiting(PoolTimeout):
    """`Pool.checkout` failed at once: ``max_waiting`` callers already wait."""


class PoolClosed(PoolError):
    """The pool was closed; it gives out no more connections."""


class ConnectionOps:
    """How a `Pool` checks, resets and closes its connections.

    Subclass it and override what your driver needs. The defaults only
    assume a DB-API connection: ``ping()`` if the connection has one,
    ``rollback()`` for every reset mode, ``close()``.
    """

    def ping(self, conn: Any) -> bool:
        """Return True if ``conn`` answers; never raises."""
        ping = getattr(conn, "ping", None)
        if ping is None:
            return True
        try:
            ping()
        except Exception:
            return False
        return True

    def reset(self, conn: Any, mode: str) -> bool:
        """Make ``conn`` fit for its next holder.

        ``mode`` is one of ``"rollback"``, ``"full"`` or ``"none"``. Returns
        False when the connection must be discarded instead; never raises
        `Exception`.
        """
        if mode == "none":
            return True
        try:
            conn.rollback()
        except Exception:
            return False
        return True

    def is_usable(self, conn: Any) -> bool:
        """Return False when ``conn`` is known to be closed or broken."""
        return True

    def close(self, conn: Any) -> None:
        """Close ``conn``; never raises `Exception`."""
        try:
            conn.close()
        except Exception:
            log.debug("closing %r failed", conn, exc_info=True)

    def abandon(self, conn: Any) -> None:
        """Close ``conn`` for a holder that can never run again (its thread
        ended while it waited, maybe in the middle of a read that holds the
        driver's own locks); never raises `Exception`. By default, `close`."""
        self.close(conn)

    def prepare(self, conn: Any) -> None:
        """Called once for each connection the pool opened, before its first use."""

    def recoverable(self, conn: Any) -> bool:
        """True if ``conn``, found closed at checkin, may be made fit again by `recover`."""
        return False

    def recover(self, conn: Any, timeout: float) -> bool:
        """Make a `recoverable` connection fit for reuse within ``timeout`` seconds.

        True when it is: open, its whole reply read, no transaction open.
        False otherwise, leaving what the server may still run for it to
        `orphaned_work`. Never raises `Exception`.
        """
        return False

    def orphaned_work(self, conn: Any) -> Any:
        """What the server may still be running for ``conn``, or None.

        Called when the pool discards ``conn``. Non-None means this side cut
        the connection in the middle of a request (worker killed, read
        timeout) and the server may go on running it - holding a
        transaction's locks - until it notices; the pool then passes the
        value to `cancel_orphaned_work` on a fresh connection. The default
        knows of no such work.
        """
        return None

    def cancel_orphaned_work(self, conn: Any, work: Any) -> None:
        """Stop ``work`` (from `orphaned_work`) using ``conn``, a fresh connection."""

    def is_fatal_error(self, exc: BaseException) -> bool:
        """True if ``exc``, raised in a `Pool.connection` block, ruins the connection.

        Used by `Pool.connection`. The default recognises DB-API
        ``OperationalError`` and ``InterfaceError`` (of any driver, and
        Django's wrappers of them) by class name.
        """
        if isinstance(exc, PoolError):
            return False  # about another checkout, not this connection
        names = {cls.__name__ for cls in type(exc).__mro__}
        return bool(names & {"OperationalError", "InterfaceError"})


class PyMySQLOps(ConnectionOps):
    """`ConnectionOps` for ``pymysql.connections.Connection``.

    Reset modes: ``"rollback"`` rolls back when a transaction is open or
    autocommit is off; ``"full"`` sends ``COM_RESET_CONNECTION`` (clears
    user variables, session variables such as ``foreign_key_checks``,
    temporary tables, locks, prepared statements) and then restores what
    PyMySQL set up when it connected: character set and collation,
    ``sql_mode``, ``init_command`` and autocommit mode.
    """

    def ping(self, conn: Any) -> bool:
        try:
            conn.ping(reconnect=False)
        except Exception:
            return False
        return True

    def reset(self, conn: Any, mode: str) -> bool:
        try:
            if mode == "rollback":
                if conn.server_status & _SERVER_STATUS_IN_TRANS or not conn.get_autocommit():
                    conn.rollback()
            elif mode == "full":
                conn._execute_command(_COM_RESET_CONNECTION, b"")
                conn._read_ok_packet()
                self._resync(conn)
        except Exception:
            log.debug("resetting %r (%s) failed", conn, mode, exc_info=True)
            return False
        return True

    def _resync(self, conn: Any) -> None:
        # The server has just reset the session to its defaults: redo, in the
        # same order, what pymysql.connections.Connection.connect() does after
        # authenticating.
        conn.set_character_set(conn.charset, conn.collation)
        if conn.sql_mode is not None:
            with conn.cursor() as cur:
                cur.execute("SET sql_mode=%s", (conn.sql_mode,))
        if conn.init_command is not None:
            with conn.cursor() as cur:
                cur.execute(conn.init_command)
        if conn.autocommit_mode is not None:
            conn.autocommit(conn.autocommit_mode)

    def is_usable(self, conn: Any) -> bool:
        sock = getattr(conn, "_sock", None)
        if sock is None:  # conn.open is False
            return False
        try:
            return sock.fileno() != -1
        except Exception:
            return False

    def prepare(self, conn: Any) -> None:
        sock = green_socket_of(conn)
        if sock is not None:
            sock.keep_on_kill = True

    def recoverable(self, conn: Any) -> bool:
        # A green connection whose worker was killed while it waited for the
        # reply to a whole command: its GreenSocket held the socket open.
        sock = green_socket_of(conn)
        # _drain_reply reads the protocol PyMySQL speaks: with EOF packets.
        return sock is not None and sock.held and not conn.client_flag & _CLIENT_DEPRECATE_EOF

    def recover(self, conn: Any, timeout: float) -> bool:
        sock = green_socket_of(conn)
        if sock is None or not sock.reattach():
            return False
        conn._sock = sock
        conn._rfile = sock.makefile("rb")
        read_timeout = conn._read_timeout
        conn._read_timeout = timeout  # each read; _drain_reply bounds the whole
        try:
            _drain_reply(conn, time.monotonic() + timeout)
            if conn.server_status & _SERVER_STATUS_IN_TRANS or not conn.get_autocommit():
                conn.rollback()
        except Exception:
            log.debug("recovering %r failed", conn, exc_info=True)
            sock.cut = True  # the server may still be on that command: cancel it
            return False
        finally:
            conn._read_timeout = read_timeout
        return True

    def orphaned_work(self, conn: Any) -> int | None:
        # The server thread id of a green connection whose GreenSocket was
        # cut mid-operation. Connections with PyMySQL's own socket are not
        # tracked (their timeouts behave as without greenpatch).
        sock = green_socket_of(conn)
        thread_id = getattr(conn, "server_thread_id", None)
        if sock is None or not sock.cut or not thread_id:
            return None
        return thread_id[0]

    def cancel_orphaned_work(self, conn: Any, work: int) -> None:
        # KILL ends the statement and the session, which rolls the
        # transaction back and releases its locks. Any user may kill its own
        # sessions. Thread ids grow for the life of a server, so a fresh
        # connection with a smaller id means the server restarted since and
        # ``work`` may name someone else's session: leave it alone.
        if conn.thread_id() <= work:
            log.debug("not killing server thread %d: the server restarted since", work)
            return
        try:
            with conn.cursor() as cur:
                cur.execute(f"KILL CONNECTION {int(work):d}")
        except pymysql.err.MySQLError as e:
            if e.args and e.args[0] == _ER_NO_SUCH_THREAD:
                return  # it ended by itself meanwhile
            raise

    def close(self, conn: Any) -> None:
        try:
            if getattr(conn, "_closed", False):
                conn._force_close()
            else:
                conn.close()
        except Exception:
            try:
                conn._force_close()
            except Exception:
                log.debug("closing %r failed", conn, exc_info=True)
        sock = green_socket_of(conn)
        if sock is not None and sock.held:
            sock.close()  # held since a kill and not recovered

    def abandon(self, conn: Any) -> None:
        # Only the socket: PyMySQL's close() would take the lock of its
        # buffered reader, which the parked holder may hold for good.
        sock = green_socket_of(conn)
        if sock is None:  # not opened in a worker: no parked worker holds it
            self.close(conn)
            return
        try:
            sock.abandon()
        except Exception:
            log.debug("closing %r failed", conn, exc_info=True)


def _drain_reply(conn: Any, deadline: float) -> None:
    """Read and drop the whole reply to the command ``conn`` sent last.

    Every result set of it (a multi-statement or a procedure has several),
    row by row; an error reply ends it. Raises `TimeoutError` past
    ``deadline``, and `pymysql.err.OperationalError` when the connection is
    lost or the reply asks for a local file (LOAD DATA LOCAL).
    """
    from pymysql.protocol import EOFPacketWrapper, OKPacketWrapper

    while True:
        try:
            packet = conn._read_packet()
        except pymysql.err.MySQLError:
            if conn._sock is None:
                raise  # lost, not an error reply
            return  # an error reply ends the command
        if packet.is_ok_packet():
            status = OKPacketWrapper(packet).server_status
        elif packet.is_load_local_packet():
            raise pymysql.err.OperationalError(2027, "a cut LOAD DATA LOCAL cannot be recovered")
        else:
            for _ in range(packet.read_length_encoded_integer()):
                conn._read_packet()  # column definitions
            if not conn._read_packet().is_eof_packet():
                raise pymysql.err.OperationalError(2027, "no EOF after the column definitions")
            while True:
                row = conn._read_packet()
                if row.is_eof_packet():
                    status = EOFPacketWrapper(row).server_status
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError("the reply of a cut connection took too long")
        conn.server_status = status
        if not status & _SERVER_MORE_RESULTS_EXISTS:
            return


# -- internal state -------------------------------------------------------------

# What a waiter can be granted besides a connection record.
_CONNECT = object()  # a reserved slot: the waiter opens the connection itself
_CLOSED = object()  # the pool was closed while it waited
_GONE = object()  # it could not be woken (its loop was closed): it gets nothing

_IDLE = "idle"
_IN_USE = "in_use"  # held by a caller, or granted to a waiter not yet running
_RETURNING = "returning"  # being reset by checkin


class _Internal:
    """A recovery or a canceller that the pool runs in a worker (see
    `Pool._start_internal`).

    Settled exactly once (`Pool._settle`): by its own code, or by
    ``fallback(pool)`` when its worker can never run again - its thread
    ended while it was parked or before it started. The fallback takes the
    pool as an argument: the worker, which may stay parked for good, must
    not keep the pool alive.
    """

    __slots__ = ("worker", "thread", "fallback", "settled")

    worker: hub.Worker  # set by Pool._start_internal before the pool lists it

    def __init__(self, fallback: Callable[[Pool], None]) -> None:
        # The thread whose loop runs the worker: the caller's, a worker.
        self.thread = threading.current_thread()
        self.fallback = fallback
        self.settled = False


class _Record:
    __slots__ = (
        "conn",
        "key",
        "lent",
        "created",
        "deadline",
        "last_used",
        "state",
        "checked_out",
        "stack",
        "leak_logged",
        "thread",
    )

    def __init__(self, conn: Any, created: float, deadline: float | None) -> None:
        # While the connection is checked out, the record holds it only
        # through ``lent``, and ``conn`` is None (see `lend`).
        self.conn: Any = conn
        self.key = id(conn)  # in Pool._records
        self.lent: _Lent | None = None
        self.created = created
        self.deadline = deadline
        self.last_used = created
        self.state = _IN_USE
        self.checked_out = created
        self.stack: str | None = None
        self.leak_logged = False
        # The thread whose loop runs the worker holding it; None if checked
        # out outside a worker (see Pool._reclaim_from_ended_threads).
        self.thread: threading.Thread | None = None

    def current(self) -> Any:
        """The connection, or None once a lent one was garbage-collected."""
        lent = self.lent
        return self.conn if lent is None else lent()

    def lend(self, pool_ref: weakref.ref[Pool]) -> Any:
        """Hold the connection weakly from now on, until `take_back`; return it."""
        conn = self.conn
        try:
            self.lent = _Lent(conn, _collected_while_lent)
        except TypeError:  # a connection type without weak references: held as before
            return conn
        self.lent.record = self
        self.lent.pool_ref = pool_ref
        self.conn = None
        return conn

    def take_back(self, conn: Any) -> None:
        self.conn = conn
        self.lent = None  # a dropped weak reference never calls back


def _checked_out_at(rec: _Record) -> str:
    # Where a leaked connection was checked out, for a warning (leak_threshold set).
    return "" if rec.stack is None else f"; it was checked out at:\n{rec.stack}"


class _Lent(weakref.ref):
    """The pool's weak reference to a checked-out connection."""

    __slots__ = ("record", "pool_ref")
    record: _Record
    pool_ref: weakref.ref[Pool]


def _collected_while_lent(lent: _Lent) -> None:
    # A checked-out connection was garbage-collected. This runs wherever the
    # collection happened, maybe inside the pool's own locked code in this
    # same thread: the record is queued, and handled now only if the lock is
    # free, else by the pool's next checkout, checkin or stats.
    pool = lent.pool_ref()
    if pool is None or pool._pid != os.getpid():
        return
    pool._collected.append(lent.record)
    if pool._lock.acquire(blocking=False):
        messages: list[str] = []
        try:
            pool._reclaim_locked(messages)
        finally:
            pool._lock.release()
        pool._log_leaks(messages)


class _Waiter:
    """One caller in the queue: a worker (``future``) or a thread (``event``)."""

    __slots__ = ("event", "future", "grant", "since", "thread")

    def __init__(self, since: float) -> None:
        self.grant: Any = None  # set under the lock, once: a record, _CONNECT or _CLOSED
        self.since = since
        self.thread = 0  # that runs the worker's loop
        self.future: asyncio.Future | None = None
        self.event: threading.Event | None = None

    def notify(self) -> None:
        """Wake the waiter; safe from any thread. Raises RuntimeError if its loop is closed.

        (Tornado's ``add_callback`` would swallow that error, and the
        grant with it: the connection would be lost to a worker that can
        never run.)

        On the worker's own thread the future is resolved at once, so the
        worker resumes on the next loop iteration. Every iteration the
        connection waits to be picked up is time it serves nobody: under
        load an iteration lasts milliseconds, and resolving the future
        through one more ``call_soon`` cost ``/slow`` at c=256 (40
        connections, one process) about 9 % of its requests per second.
        """
        if self.event is not None:
            self.event.set()
            return
        future: asyncio.Future = self.future  # type: ignore[assignment]
        aloop = future.get_loop()
        if threading.get_ident() != self.thread:
            aloop.call_soon_threadsafe(_resolve, future)
        elif aloop.is_closed():
            # set_result() on a future without callbacks would not notice.
            raise RuntimeError("Event loop is closed")
        elif not future.done():
            future.set_result(None)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _check_number(
    name: str,
    value: Any,
    *,
    integer: bool = False,
    minimum: float = 0,
    strict: bool = False,
    optional: bool = False,
) -> None:
    if value is None and optional:
        return
    types: tuple[type, ...] = (int,) if integer else (int, float)
    ok = isinstance(value, types) and not isinstance(value, bool)
    if ok:
        ok = value > minimum if strict else value >= minimum
    if not ok:
        kind = "an integer" if integer else "a number of seconds"
        bound = f"{'>' if strict else '>='} {minimum:g}"
        extra = " or None" if optional else ""
        raise ValueError(f"{name}={value!r} is not accepted; use {kind} {bound}{extra}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        quoted = [repr(c) for c in choices]
        raise ValueError(f"{name}={value!r} is not accepted; use {', '.join(quoted[:-1])} or {quoted[-1]}")


class Pool:
    """A pool of at most ``max_size`` connections made by ``connect()``.

    :arg connect: called with no argument to open a connection; it runs
        outside the pool's lock and may block or, inside a greenpatch
        worker, yield to the IOLoop. Its exceptions reach the caller of
        `checkout`.
    :arg name: shown in errors, logs and `stats`.
    :arg min_size: connections kept open by `prefill` and spared by the
        ``max_idle`` sweep. The pool does not reopen them by itself.
    :arg max_size: hard cap on open connections, counting those being
        opened.
    :arg timeout: default seconds `checkout` waits before `PoolTimeout`.
    :arg max_waiting: with this many callers already waiting, `checkout`
        raises `PoolTooManyWaiting` at once; 0 means no limit.
    :arg max_lifetime: seconds after which a connection is closed instead
        of reused (each one gets a deadline between 90 % and 100 % of it,
        so connections opened together do not expire together); None
        keeps connections forever.
    :arg max_idle: idle connections unused for longer are closed, keeping
        ``min_size`` open; checked whenever a connection is checked out
        or in. None never closes idle connections.
    :arg check: ``"auto"`` pings a connection on checkout when it was idle
        for ``check_idle`` seconds or more, or when it was last used before
        the pool last found a connection dropped by the server (a restart
        drops them all); ``"always"`` pings every time; ``"never"`` does
        not. A connection that fails its ping is discarded and another one
        is used or opened.
    :arg check_idle: idle seconds that trigger a ping in ``"auto"`` mode.
    :arg reset: what `checkin` does before reuse, passed to
        `ConnectionOps.reset`: ``"rollback"``, ``"full"`` or ``"none"``.
    :arg leak_threshold: when set, the stack of each checkout is recorded
        and a warning with it is logged for a connection held longer than
        this many seconds.
    :arg ops: the `ConnectionOps`; defaults to `PyMySQLOps`.
    """

    def __init__(
        self,
        connect: Callable[[], Any],
        *,
        name: str = "pool",
        min_size: int = 0,
        max_size: int = 10,
        timeout: float = 30.0,
        max_waiting: int = 0,
        max_lifetime: float | None = 3600.0,
        max_idle: float | None = 600.0,
        check: str = "auto",
        check_idle: float = 1.0,
        reset: str = "rollback",
        leak_threshold: float | None = None,
        ops: ConnectionOps | None = None,
    ) -> None:
        if not callable(connect):
            raise ValueError(f"connect={connect!r} is not accepted; use a callable returning a connection")
        if not isinstance(name, str):
            raise ValueError(f"name={name!r} is not accepted; use a string")
        _check_number("min_size", min_size, integer=True)
        _check_number("max_size", max_size, integer=True, minimum=1)
        if min_size > max_size:
            raise ValueError(
                f"min_size={min_size!r} is not accepted; use an integer <= max_size ({max_size!r})"
            )
        _check_number("timeout", timeout, strict=True)
        _check_number("max_waiting", max_waiting, integer=True)
        _check_number("max_lifetime", max_lifetime, strict=True, optional=True)
        _check_number("max_idle", max_idle, strict=True, optional=True)
        _check_choice("check", check, CHECK_MODES)
        _check_number("check_idle", check_idle)
        _check_choice("reset", reset, RESET_MODES)
        _check_number("leak_threshold", leak_threshold, strict=True, optional=True)
        if ops is None:
            ops = PyMySQLOps()
        else:
            missing = [
                m for m in ("ping", "reset", "is_usable", "close") if not callable(getattr(ops, m, None))
            ]
            if missing:
                raise ValueError(
                    f"ops={ops!r} is not accepted; use a ConnectionOps (missing {', '.join(missing)})"
                )
        self._connect = connect
        self.name = name
        self.min_size = min_size
        self.max_size = max_size
        self.timeout = float(timeout)
        self.max_waiting = max_waiting
        self.max_lifetime = max_lifetime
        self.max_idle = max_idle
        self.check = check
        self.check_idle = check_idle
        self.reset = reset
        self.leak_threshold = leak_threshold
        self.ops = ops
        # Optional in ops that are not ConnectionOps subclasses.
        self._prepare = getattr(ops, "prepare", None)
        self._abandon_conn = getattr(ops, "abandon", ops.close)
        self._recoverable = getattr(ops, "recoverable", None)
        self._pid = os.getpid()
        self._ref = weakref.ref(self)  # what lent connections call back (see _Record.lend)
        self._init_state()
        _pools.add(self)

    def _init_state(self) -> None:
        self._lock = threading.Lock()
        self._closed = False
        self._records: dict[int, _Record] = {}  # id(conn) -> record, every open connection
        self._idle: list[_Record] = []  # LIFO: newest at the end
        self._waiters: deque[_Waiter] = deque()
        self._connecting = 0  # reserved slots: connects in progress or granted to a waiter
        self._orphans: set[int] = set()  # id() of a parent process's connections
        self._collected: list[_Record] = []  # lent connections garbage-collected (see _reclaim_locked)
        self._internal: list[_Internal] = []  # recoveries and cancellers whose worker has not ended
        self._lost_checked = 0.0  # when _look_for_lost last looked
        self._connects = 0
        self._connect_errors = 0
        self._checkouts = 0
        self._checkins = 0
        self._timeouts = 0
        self._discards: dict[str, int] = {}
        self._cancels = 0
        self._cancelling = 0  # cancel connections open or being opened (outside max_size)
        self._recoveries = 0
        self._recovering = 0  # cut connections whose reply is being read (in max_size)
        self._lost_at = -1.0  # when a connection was last found dropped by the server
        self._wait_count = 0
        self._wait_total = 0.0
        self._wait_max = 0.0
        self._held_count = 0
        self._held_total = 0.0
        self._held_max = 0.0

    def __repr__(self) -> str:
        return f"<greenpatch.pool.Pool {self.name!r} {len(self._records)}/{self.max_size}>"

    # -- public API -------------------------------------------------------------

    def checkout(self, timeout: float | None = None) -> Any:
        """Return a connection for the caller's exclusive use.

        Takes the most recently used idle connection (pinged first as the
        ``check`` mode says), opens a new one while under ``max_size``, or
        waits in line. A worker waits cooperatively; any other caller
        blocks its thread. ``timeout`` (default: the pool's) bounds the
        wait for a connection, not the time ``connect`` takes.

        Raises `PoolTimeout`, `PoolTooManyWaiting`, `PoolClosed`, or what
        ``connect`` raised.
        """
        self._check_fork()
        if timeout is None:
            timeout = self.timeout
        else:
            _check_number("timeout", timeout)
        start = time.monotonic()
        to_close: list[_Record] = []
        waiter: _Waiter | None = None
        leaks: list[str] = []
        with self._lock:
            if self._closed:
                raise PoolClosed(f"pool {self.name!r} is closed")
            if self._collected:
                self._reclaim_locked(leaks)
            self._sweep_locked(start, to_close)
            self._scan_leaks_locked(start, leaks)
            if not self._waiters and self._idle:
                grant: Any = self._idle.pop()
                grant.state = _IN_USE
            elif not self._waiters and len(self._records) + self._connecting < self.max_size:
                self._connecting += 1
                grant = _CONNECT
            else:
                if self.max_waiting and len(self._waiters) >= self.max_waiting:
                    self._timeouts += 1
                    raise PoolTooManyWaiting(
                        f"pool {self.name!r} has too many waiting: {self._occupancy_locked()} "
                        f"(max_waiting={self.max_waiting})"
                    )
                waiter = self._enqueue_locked(start)
                self._dispatch_locked()  # in case a slot is free but was not passed on
        self._log_leaks(leaks)
        self._close_all(to_close)
        if waiter is not None:
            grant = self._wait_for(waiter, timeout)
        return self._claim(grant)

    def checkin(self, conn: Any) -> None:
        """Give back a connection obtained from `checkout`.

        The connection is reset (see ``reset``) and handed to the first
        waiter or kept idle. One that is closed, past its lifetime, fails
        its reset, or belongs to a closed pool is closed instead. Raises
        `PoolError` for a connection already checked in or not from this
        pool.
        """
        self._check_fork()
        if self._orphans and id(conn) in self._orphans:
            log.debug("pool %r: ignoring checkin of %r, opened before fork", self.name, conn)
            return
        now = time.monotonic()
        leaks: list[str] = []
        with self._lock:
            rec = self._held_record_locked(conn, "check in")
            rec.state = _RETURNING
            self._checkins += 1
            self._count_held_locked(rec, now)
            self._scan_leaks_locked(now, leaks, also=rec)
        self._log_leaks(leaks)
        reason = None
        try:
            if not self.ops.is_usable(conn):
                reason = "closed"
            elif rec.deadline is not None and now >= rec.deadline:
                reason = "lifetime"
            elif self._closed:
                reason = ""
            elif not self.ops.reset(conn, self.reset):
                reason = "reset_failed"
        except BaseException:
            # E.g. the worker was killed during the reset: the connection
            # may have half a reply unread.
            self._remove(rec, "reset_failed")
            raise
        if reason is not None:
            self._remove(rec, reason)
            return
        to_close: list[_Record] = []
        reclaimed: list[str] = []
        with self._lock:
            if self._collected:
                self._reclaim_locked(reclaimed)
            if self._closed:
                self._forget_locked(rec, None)
                to_close.append(rec)
            else:
                self._reuse_locked(rec, to_close)
            self._dispatch_locked()
        self._log_leaks(reclaimed)
        self._close_all(to_close)

    def discard(self, conn: Any, reason: str = "discarded") -> None:
        """Close a checked-out connection its holder found unusable.

        Its slot is freed for a new connection. ``reason`` is counted in
        `stats` under ``discards``. Raises `PoolError` like `checkin`.
        """
        self._check_fork()
        if self._orphans and id(conn) in self._orphans:
            log.debug("pool %r: ignoring discard of %r, opened before fork", self.name, conn)
            return
        with self._lock:
            rec = self._held_record_locked(conn, "discard")
            rec.state = _RETURNING
            self._count_held_locked(rec, time.monotonic())
        self._remove(rec, reason)

    @contextlib.contextmanager
    def connection(self, timeout: float | None = None) -> Iterator[Any]:
        """Check a connection out for the ``with`` block, then back in.

        The connection is discarded rather than reused when the block
        raised an error that `ConnectionOps.is_fatal_error` calls fatal
        (``OperationalError``, ``InterfaceError``), or was interrupted
        (e.g. the worker killed), since the connection may then be half
        way through a reply.
        """
        conn = self.checkout(timeout)
        try:
            yield conn
        except Exception as exc:
            if self.ops.is_fatal_error(exc):
                self.discard(conn, "error")
            else:
                self.checkin(conn)
            raise
        except BaseException:
            self.discard(conn, "interrupted")
            raise
        else:
            self.checkin(conn)

    def stats(self) -> dict[str, Any]:
        """A snapshot of the pool's state and counters.

        ``size`` (open connections), ``idle``, ``in_use`` (including
        ``recovering``: cut connections whose reply is being read),
        ``connecting`` (slots reserved for connects), ``waiting``,
        ``cancelling`` (connections busy cancelling the server-side work of
        cut ones, outside ``max_size``); totals since creation
        (or fork): ``connects``, ``connect_errors``, ``checkouts``,
        ``checkins``, ``discards`` (by reason), ``recoveries`` (cut
        connections made fit and reused), ``cancels`` (server-side work
        of cut connections cancelled), ``timeouts`` (including
        `PoolTooManyWaiting`), ``wait`` - ``count``, ``mean`` and
        ``max`` seconds spent queued by checkouts that had to wait and
        were served - and ``held``: the same for the time from checkout to
        checkin (or discard). A pool whose callers wait is short of
        connections, or its connections are held for longer than their
        queries take: with Django, from the request's first query to the
        end of its response.

        Like a `checkout` that has to wait, it first looks for what nobody
        will hand back (see the module's notes): it may kill workers of the
        calling thread left parked on a closed loop.
        """
        self._check_fork()
        self._look_for_lost(time.monotonic())
        leaks: list[str] = []
        with self._lock:
            if self._collected:
                self._reclaim_locked(leaks)
            self._scan_leaks_locked(time.monotonic(), leaks)
            size = len(self._records)
            idle = len(self._idle)
            stats = {
                "name": self.name,
                "max_size": self.max_size,
                "size": size,
                "idle": idle,
                "in_use": size - idle,
                "connecting": self._connecting,
                "waiting": len(self._waiters),
                "connects": self._connects,
                "connect_errors": self._connect_errors,
                "checkouts": self._checkouts,
                "checkins": self._checkins,
                "discards": dict(self._discards),
                "cancels": self._cancels,
                "cancelling": self._cancelling,
                "recoveries": self._recoveries,
                "recovering": self._recovering,
                "timeouts": self._timeouts,
                "wait": {
                    "count": self._wait_count,
                    "mean": self._wait_total / self._wait_count if self._wait_count else 0.0,
                    "max": self._wait_max,
                },
                "held": {
                    "count": self._held_count,
                    "mean": self._held_total / self._held_count if self._held_count else 0.0,
                    "max": self._held_max,
                },
            }
        self._log_leaks(leaks)
        return stats

    def close(self) -> None:
        """Close the pool: idle connections now, checked-out ones at checkin.

        Waiting callers get `PoolClosed`, and so does every later
        `checkout`. Closing twice is harmless.
        """
        self._check_fork()
        with self._lock:
            self._closed = True
            to_close = self._idle
            self._idle = []
            for rec in to_close:
                self._forget_locked(rec, None)
            waiters = list(self._waiters)
            self._waiters.clear()
            for waiter in waiters:
                waiter.grant = _CLOSED
                self._notify_locked(waiter)
        self._close_all(to_close)
        log.debug("pool %r closed", self.name)

    def prefill(self) -> None:
        """Open connections until ``min_size`` are open (or being opened).

        Connects one at a time; the first error propagates.
        """
        self._check_fork()
        while True:
            with self._lock:
                if self._closed:
                    raise PoolClosed(f"pool {self.name!r} is closed")
                if len(self._records) + self._connecting >= self.min_size:
                    return
                self._connecting += 1
            conn = self._open_reserved()
            with self._lock:
                rec = self._records[id(conn)]
                rec.state = _IDLE
                self._idle.append(rec)
                self._dispatch_locked()

    # -- checkout internals ------------------------------------------------------

    def _enqueue_locked(self, start: float) -> _Waiter:
        waiter = _Waiter(start)
        worker = hub.current_worker()
        if worker is not None:
            waiter.thread = threading.get_ident()
            waiter.future = worker.loop.asyncio_loop.create_future()  # type: ignore[attr-defined]
        else:
            waiter.event = threading.Event()
        self._waiters.append(waiter)
        return waiter

    def _wait_for(self, waiter: _Waiter, timeout: float) -> Any:
        # Waits in slices: once per LOST_CHECK_INTERVAL the waiter looks for
        # what nobody will hand back (a holder's thread may end meanwhile),
        # unless another caller looked in the meantime.
        deadline = waiter.since + timeout
        try:
            if waiter.event is not None:
                self._warn_if_blocking_loop()
            while True:
                now = time.monotonic()
                if now - self._lost_checked >= LOST_CHECK_INTERVAL:
                    self._look_for_lost(now)  # may grant this waiter a freed slot
                if now >= deadline:
                    break
                wait = min(deadline - now, self._lost_checked + LOST_CHECK_INTERVAL - now)
                if waiter.event is not None:
                    if waiter.event.wait(wait):
                        break
                else:
                    try:
                        hub.wait(waiter.future, wait)  # type: ignore[arg-type]
                        break
                    except TimeoutError:
                        pass
        except BaseException:
            # Killed (GreenletExit), KeyboardInterrupt...: leave the queue,
            # and pass on whatever was granted meanwhile.
            self._abandon(waiter)
            raise
        now = time.monotonic()
        with self._lock:
            grant = waiter.grant
            if grant is None:
                occupancy = self._occupancy_locked()
                self._waiters.remove(waiter)
                self._timeouts += 1
                raise PoolTimeout(f"pool {self.name!r} timed out after {float(timeout)!r} s: {occupancy}")
            if grant is not _CLOSED:
                waited = now - waiter.since
                self._wait_count += 1
                self._wait_total += waited
                self._wait_max = max(self._wait_max, waited)
        if grant is _CLOSED:
            raise PoolClosed(f"pool {self.name!r} was closed while waiting for a connection")
        return grant

    def _abandon(self, waiter: _Waiter) -> None:
        with self._lock:
            grant = waiter.grant
            if grant is None:
                self._waiters.remove(waiter)
            elif grant is _CONNECT:
                self._connecting -= 1
                self._dispatch_locked()
            elif isinstance(grant, _Record):
                self._return_idle_locked(grant)
                self._dispatch_locked()

    def _reuse_locked(self, rec: _Record, to_close: list[_Record]) -> None:
        # Put a connection fit for reuse on top of the idle stack (the
        # caller then serves the waiters); what idled too long goes.
        rec.state = _IDLE
        rec.last_used = time.monotonic()
        self._idle.append(rec)
        self._sweep_locked(rec.last_used, to_close)

    def _return_idle_locked(self, rec: _Record) -> None:
        # Put back a connection nobody used (its grantee gave up).
        rec.state = _IDLE
        self._idle.append(rec)

    def _claim(self, grant: Any) -> Any:
        # Turn a grant (an idle record or a reserved slot) into a checked-out
        # connection, replacing records that are expired or fail their check.
        while True:
            if grant is _CONNECT:
                conn = self._open_reserved()
                rec = self._records[id(conn)]
            else:
                rec = grant
                try:
                    reason = self._unfit(rec)
                except BaseException:
                    self._remove(rec, "check_failed")
                    raise
                if reason is not None:
                    to_close = [rec]
                    with self._lock:
                        self._forget_locked(rec, reason)
                        if self._closed:
                            self._dispatch_locked()
                            grant = _CLOSED
                        elif self._idle:
                            grant = self._idle.pop()
                            grant.state = _IN_USE
                        else:  # the slot just freed is ours
                            self._connecting += 1
                            grant = _CONNECT
                    self._close_all(to_close)
                    if grant is _CLOSED:
                        raise PoolClosed(f"pool {self.name!r} is closed")
                    continue
            now = time.monotonic()
            thread = threading.current_thread() if hub.is_worker() else None
            with self._lock:
                self._checkouts += 1
                rec.checked_out = now
                rec.leak_logged = False
                rec.thread = thread
            if self.leak_threshold is not None:
                rec.stack = "".join(traceback.format_stack()[:-2])
                self._schedule_leak_check()
            return rec.lend(self._ref)

    def _unfit(self, rec: _Record) -> str | None:
        """Why ``rec`` must not be handed out, or None if it is fine."""
        now = time.monotonic()
        if rec.deadline is not None and now >= rec.deadline:
            return "lifetime"
        if not self.ops.is_usable(rec.conn):
            return "closed"
        stale = now - rec.last_used >= self.check_idle or rec.last_used <= self._lost_at
        if self.check == "always" or (self.check == "auto" and stale):
            if not self.ops.ping(rec.conn):
                return "check_failed"
        return None

    def _open_reserved(self) -> Any:
        """Open a connection in a slot already counted in ``_connecting``."""
        try:
            conn = self._connect()
        except BaseException:
            with self._lock:
                self._connecting -= 1
                self._connect_errors += 1
                self._dispatch_locked()
            log.debug("pool %r: connect failed", self.name, exc_info=True)
            raise
        if self._prepare is not None:
            self._prepare(conn)
        now = time.monotonic()
        deadline = None
        if self.max_lifetime is not None:
            deadline = now + self.max_lifetime * random.uniform(0.9, 1.0)
        rec = _Record(conn, now, deadline)
        with self._lock:
            self._connecting -= 1
            self._connects += 1
            closed = self._closed
            if closed:
                self._dispatch_locked()
            else:
                self._records[id(conn)] = rec
        if closed:
            self.ops.close(conn)
            raise PoolClosed(f"pool {self.name!r} was closed while connecting")
        log.debug("pool %r: opened %r", self.name, conn)
        return conn

    # -- shared internals --------------------------------------------------------

    def _held_record_locked(self, conn: Any, what: str) -> _Record:
        rec = self._records.get(id(conn))
        if rec is None or rec.current() is not conn:
            raise PoolError(f"cannot {what} {conn!r}: it is not a connection of pool {self.name!r}")
        if rec.state != _IN_USE:
            raise PoolError(f"cannot {what} {conn!r}: it is not checked out of pool {self.name!r}")
        rec.take_back(conn)
        rec.thread = None  # a grant to a waiter not running yet is not its holder's
        return rec

    def _forget_locked(self, rec: _Record, reason: str | None) -> None:
        del self._records[rec.key]
        if reason:
            self._discards[reason] = self._discards.get(reason, 0) + 1

    def _remove(
        self, rec: _Record, reason: str | None, grace: float | None = None, abandoned: bool = False
    ) -> None:
        """Forget and close a record that is not idle; its slot is freed.

        A connection the ops can recover (see `_recover`) is recovered
        instead. When the server may still be working for the connection
        (see `ConnectionOps.orphaned_work`), a short-lived extra connection,
        outside ``max_size``, cancels that work after ``grace`` seconds
        (default: `CANCEL_GRACE`). The slot is not kept reserved meanwhile:
        MariaDB's ``KILL`` can take up to 2 s (it retries a lock the victim
        may hold), and a burst of disconnects under overload must not
        starve the pool. There is one such connection per cut connection,
        for as long as its ``KILL`` takes (``cancelling`` in `stats`).
        """
        if abandoned:  # its holder can never run again (see _reclaim_from_ended_threads)
            self._abandon_conn(rec.conn)
        elif self._recoverable is not None and self._recover(rec, reason):
            return
        work = None
        try:
            work = self.ops.orphaned_work(rec.conn)
            lost = work is None and not abandoned and not self.ops.is_usable(rec.conn)
        except Exception:
            log.debug("pool %r: inspecting %r failed", self.name, rec.conn, exc_info=True)
            lost = False
        with self._lock:
            self._forget_locked(rec, reason)
            if lost:
                # The server dropped a connection (restart, KILL, timeout on
                # its side): the idle ones from before may be gone too.
                self._lost_at = time.monotonic()
            if work is not None:
                self._cancelling += 1
            self._dispatch_locked()
        if reason:
            log.debug("pool %r: discarding %r (%s)", self.name, rec.conn, reason)
        if not abandoned:
            self.ops.close(rec.conn)
        if work is not None:
            self._cancel_orphaned_work(work, grace)

    def _recover(self, rec: _Record, reason: str | None) -> bool:
        """Start recovering a cut connection; False if it cannot be.

        A worker of the current worker's loop reads the reply the killed
        holder left (`ConnectionOps.recover`, within `CANCEL_GRACE`), then
        resets the connection as `checkin` does and puts it back; the slot
        stays taken meanwhile (``recovering`` in `stats`). If that fails,
        the connection is removed for ``reason`` and its statement
        cancelled at once: the grace is over.
        """
        try:
            if not self._recoverable(rec.conn):  # type: ignore[misc]
                return False
        except Exception:
            log.debug("pool %r: inspecting %r failed", self.name, rec.conn, exc_info=True)
            return False
        worker = hub.current_worker()
        if worker is None or worker.loop.asyncio_loop.is_closed():  # type: ignore[attr-defined]
            return False
        with self._lock:
            if self._closed:
                return False
            self._recovering += 1
        ref = weakref.ref(self)  # like the canceller: a retired pool is not kept alive
        ops = self.ops
        pid = self._pid
        entry = _Internal(lambda pool: pool._recovery_lost(rec))

        def recover() -> None:
            ok = False
            try:
                ok = ops.recover(rec.conn, CANCEL_GRACE)
                pool = ref()
                if ok and pool is not None and pool.reset != "rollback":  # recover() rolled back
                    ok = ops.reset(rec.conn, pool.reset)
            finally:
                pool = ref()
                if pool is None:
                    ops.close(rec.conn)
                elif pool._pid == pid and pool._settle(entry):
                    pool._recovered(rec, ok, reason)

        self._start_internal(recover, entry)
        return True

    def _recovered(self, rec: _Record, ok: bool, reason: str | None) -> None:
        to_close: list[_Record] = []
        with self._lock:
            self._recovering -= 1
            reuse = ok and not self._closed and (rec.deadline is None or time.monotonic() < rec.deadline)
            if reuse:
                self._recoveries += 1
                self._reuse_locked(rec, to_close)
                self._dispatch_locked()
        self._close_all(to_close)
        if reuse:
            log.debug("pool %r: recovered %r", self.name, rec.conn)
        else:
            self._remove(rec, reason if not self._closed else "", grace=0.0)

    def _recovery_lost(self, rec: _Record) -> None:
        # The worker reading the reply can never run again: its thread
        # ended. Nobody reads the reply now: close the connection (its
        # socket only: the parked worker holds PyMySQL's reader), kill its
        # statement at once and free the slot.
        with self._lock:
            self._recovering -= 1
        log.warning(
            "pool %r: closing a connection being recovered by a worker whose thread ended; "
            "its slot is free again",
            self.name,
        )
        self._remove(rec, "holder_thread_ended", grace=0.0, abandoned=True)

    def _cancel_orphaned_work(self, work: Any, grace: float | None = None) -> None:
        # The canceller holds the pool weakly: a retired pool is not kept
        # alive by a canceller whose loop stopped before it could run.
        if grace is None:
            grace = CANCEL_GRACE
        ref = weakref.ref(self)
        pid = self._pid
        thread_name = f"greenpatch-cancel-{self.name}"

        def deliver() -> None:
            try:
                pool = ref()
                if pool is not None:
                    pool._send_cancel(work)
            finally:
                pool = ref()
                if pool is not None:
                    with pool._lock:
                        if pool._pid == pid:
                            pool._cancelling -= 1

        def send() -> None:
            pool = ref()
            if pool is not None and pool._settle(entry):  # else the fallback sends it
                deliver()

        def cancel() -> None:
            # Most cut statements are short and end by themselves within the
            # grace; their sessions then see the closed socket and go.
            # KILLing them anyway is not free: a burst of KILLs was seen to
            # stall other sessions' SLEEP() on MariaDB for 2 s.
            if grace > 0:
                if not hub.is_worker():
                    time.sleep(grace)
                else:
                    try:
                        hub.sleep(grace)
                    except BaseException:
                        # Killed: its loop was closed meanwhile. The KILL is
                        # still due: a thread sends it.
                        threading.Thread(target=send, name=thread_name, daemon=True).start()
                        raise
            send()

        def fallback(pool: Pool) -> None:  # the worker's thread ended during the grace
            threading.Thread(target=deliver, name=thread_name, daemon=True).start()

        entry = _Internal(fallback)

        # Not in the caller, which may be a worker being killed. A worker's
        # connection is cancelled from a new worker on the same loop: a thread
        # would fight the busy loop thread for the GIL at every step of its
        # connect (a burst of disconnects then stalled the loop for ~1 s).
        # Elsewhere (or when that loop was closed under a killed worker), a
        # short-lived thread with a blocking connection.
        worker = hub.current_worker()
        if worker is not None and not worker.loop.asyncio_loop.is_closed():  # type: ignore[attr-defined]
            self._start_internal(cancel, entry)  # so its loop runs: the new worker starts on its next turn
            return
        threading.Thread(target=cancel, name=thread_name, daemon=True).start()

    def _start_internal(self, fn: Callable[[], None], entry: _Internal) -> None:
        # A recovery or a canceller, started from a worker: it runs on that
        # worker's loop, on its next turn. Kept until its worker ends, in
        # case the loop is closed before it starts or its thread ends
        # before it is done (see _run_stranded_workers).
        entry.worker = hub.start_worker(fn)
        with self._lock:
            self._internal = [e for e in self._internal if not e.worker.dead]
            self._internal.append(entry)

    def _settle(self, entry: _Internal) -> bool:
        # True for the first of a recovery's or canceller's own code and its fallback.
        with self._lock:
            if entry.settled:
                return False
            entry.settled = True
            return True

    def _run_stranded_workers(self) -> None:
        # A recovery or canceller whose loop was closed before it started
        # (a request killed in a loop's last turn) never runs there: it runs
        # in a short-lived thread instead, with blocking sockets, as it
        # would outside a worker. One whose thread ended before it was done
        # (parked on its loop, or not started on a loop left open) never
        # runs again, and greenlet never frees it: its fallback settles it.
        # Else the recovering slot, or the cut statement, would be lost.
        with self._lock:
            internal, self._internal = self._internal, []
            calls = []
            lost = []
            alive: dict[threading.Thread, bool] = {}
            for entry in internal:
                worker = entry.worker
                if worker.dead or entry.settled:
                    continue
                call = worker.take_back_if_stranded()
                if call is not None:
                    calls.append(call)
                    continue
                thread = entry.thread
                if thread not in alive:
                    alive[thread] = thread.is_alive()
                if alive[thread]:
                    self._internal.append(entry)
                else:
                    entry.settled = True
                    lost.append(entry)
        for entry in lost:
            entry.fallback(self)
        for fn, args, kwargs in calls:
            log.debug("pool %r: running %r in a thread: its loop was closed before it started", self.name, fn)
            threading.Thread(
                target=fn, args=args, kwargs=kwargs, name=f"greenpatch-pool-{self.name}", daemon=True
            ).start()

    def _send_cancel(self, work: Any) -> None:
        """Open a connection and cancel ``work`` with it; never raises `Exception`."""
        try:
            conn = self._connect()
            try:
                self.ops.cancel_orphaned_work(conn, work)
            finally:
                self.ops.close(conn)
        except Exception as e:
            log.warning(
                "pool %r: could not cancel the server-side work (%r) of a connection cut mid-request: %s",
                self.name,
                work,
                e,
            )
            return
        with self._lock:
            self._cancels += 1
        log.debug("pool %r: cancelled the server-side work %r of a cut connection", self.name, work)

    def _close_all(self, records: list[_Record]) -> None:
        for rec in records:
            self.ops.close(rec.conn)

    def _sweep_locked(self, now: float, to_close: list[_Record]) -> None:
        # Close the connections idle longer than max_idle, oldest (bottom of
        # the stack) first, keeping min_size open.
        if self.max_idle is None:
            return
        idle = self._idle
        while idle and len(self._records) > self.min_size and now - idle[0].last_used > self.max_idle:
            rec = idle.pop(0)
            self._forget_locked(rec, "idle")
            to_close.append(rec)

    def _dispatch_locked(self) -> None:
        # Serve waiters in arrival order while there is an idle connection
        # or a free slot.
        waiters = self._waiters
        while waiters:
            if self._idle:
                grant: Any = self._idle.pop()
                grant.state = _IN_USE
            elif len(self._records) + self._connecting < self.max_size:
                self._connecting += 1
                grant = _CONNECT
            else:
                return
            waiter = waiters.popleft()
            waiter.grant = grant
            if not self._notify_locked(waiter):
                waiter.grant = _GONE  # were it killed later (see _abandon), it has nothing to give back
                if grant is _CONNECT:
                    self._connecting -= 1
                else:
                    self._return_idle_locked(grant)

    def _notify_locked(self, waiter: _Waiter) -> bool:
        try:
            waiter.notify()
        except Exception:
            # Its IOLoop was closed: nobody will ever resume that worker.
            log.debug("pool %r: cannot wake a waiter", self.name, exc_info=True)
            return False
        return True

    def _count_held_locked(self, rec: _Record, now: float) -> None:
        held = now - rec.checked_out
        self._held_count += 1
        self._held_total += held
        if held > self._held_max:
            self._held_max = held

    def _occupancy_locked(self) -> str:
        in_use = len(self._records) - len(self._idle)
        text = f"{in_use}/{self.max_size} connections in use"
        if self._connecting:
            text += f", {self._connecting} connecting"
        return f"{text}, {len(self._waiters)} waiting"

    def _warn_if_blocking_loop(self) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        log.warning(
            "pool %r: checkout is blocking the thread of a running event loop until a connection "
            "is free; call it inside a greenpatch worker",
            self.name,
        )

    # -- leak detection -----------------------------------------------------------

    def _scan_leaks_locked(self, now: float, out: list[str], also: _Record | None = None) -> None:
        threshold = self.leak_threshold
        if threshold is None:
            return
        candidates = [r for r in self._records.values() if r.state == _IN_USE and r.stack is not None]
        if also is not None and also.stack is not None:
            candidates.append(also)
        for rec in candidates:
            held = now - rec.checked_out
            if held > threshold and not rec.leak_logged:
                rec.leak_logged = True
                out.append(
                    f"pool {self.name!r}: connection {rec.current()!r} held for {held:.1f} s "
                    f"(leak_threshold={threshold:g} s){_checked_out_at(rec)}"
                )

    def _reclaim_locked(self, out: list[str]) -> None:
        # Free the slots of lent connections that were garbage-collected (see
        # _collected_while_lent); their sockets closed as they went. A record
        # no longer in _records was replaced by a connection that got the
        # same id() since: its slot is already counted as free.
        collected, self._collected = self._collected, []
        now = time.monotonic()
        for rec in collected:
            if self._records.get(rec.key) is not rec or rec.state != _IN_USE:
                continue
            self._count_held_locked(rec, now)
            self._forget_locked(rec, "not_checked_in")
            out.append(
                f"pool {self.name!r}: a connection checked out {now - rec.checked_out:.1f} s ago was "
                "garbage-collected without being checked in (its holder dropped it, or its thread "
                f"ended while it was held); its slot is free again{_checked_out_at(rec)}"
            )
        self._dispatch_locked()

    def _look_for_lost(self, now: float) -> None:
        # What nobody will ever hand back: workers of this thread parked on
        # a closed loop (killed here, so that their exit code gives back what
        # they hold), recoveries and cancellers stranded on a closed loop
        # before they started or left behind by their thread, connections of
        # workers whose thread ended.
        self._lost_checked = now
        if not hub.is_worker():  # a worker starting on a new loop did it already
            hub.reap_closed_loops()
        self._run_stranded_workers()
        self._reclaim_from_ended_threads(now)

    def _reclaim_from_ended_threads(self, now: float) -> None:
        # A worker parked on a loop whose thread has ended never runs again,
        # so it never checks its connections in; and greenlet never frees
        # it (a suspended greenlet's frames are not seen by the garbage
        # collector), so the weak reference never calls back either. Close
        # those connections (cancelling a statement still running) and free
        # their slots. Only connections checked out inside a worker are
        # considered: those belong to their loop's thread.
        ended: list[_Record] = []
        messages: list[str] = []
        with self._lock:
            alive: dict[threading.Thread, bool] = {}
            for rec in self._records.values():
                thread = rec.thread
                if rec.state != _IN_USE or thread is None:
                    continue
                if thread not in alive:
                    alive[thread] = thread.is_alive()
                if alive[thread]:
                    continue
                conn = rec.current()
                if conn is None:  # collected: _reclaim_locked frees it
                    continue
                rec.take_back(conn)
                rec.state = _RETURNING
                self._count_held_locked(rec, now)
                ended.append(rec)
                messages.append(
                    f"pool {self.name!r}: closing a connection checked out "
                    f"{now - rec.checked_out:.1f} s ago by a worker whose thread "
                    f"({thread.name}) ended before it was checked in; its slot is free again"
                    f"{_checked_out_at(rec)}"
                )
        self._log_leaks(messages)
        for rec in ended:
            self._remove(rec, "holder_thread_ended", abandoned=True)

    def _log_leaks(self, messages: list[str]) -> None:
        for message in messages:
            log.warning("%s", message)

    def _schedule_leak_check(self) -> None:
        # Inside a worker, look again once the threshold has passed, so a
        # connection that is never returned is reported even when the pool
        # sees no other activity.
        worker = hub.current_worker()
        if worker is None or self.leak_threshold is None:
            return
        ref = weakref.ref(self)

        def check() -> None:
            pool = ref()
            if pool is not None and pool._pid == os.getpid():
                leaks: list[str] = []
                with pool._lock:
                    pool._scan_leaks_locked(time.monotonic(), leaks)
                pool._log_leaks(leaks)

        with contextlib.suppress(RuntimeError):
            worker.loop.call_later(self.leak_threshold + 0.01, check)

    # -- fork safety ---------------------------------------------------------------

    def _check_fork(self) -> None:
        """Start afresh if this process is a fork of the one that made the pool."""
        if self._pid != os.getpid():
            self._forget_parent()

    def _forget_parent(self) -> None:
        # The parent's lock may have been held by another thread at fork
        # time: replace it unacquired. The parent's connections share their
        # sockets with it, so they are neither closed nor used here.
        closed = self._closed
        conns = [c for c in (rec.current() for rec in self._records.values()) if c is not None]
        orphans = self._orphans
        _forked_connections.extend(conns)
        self._init_state()
        self._closed = closed
        self._orphans = orphans | {id(c) for c in conns}
        self._pid = os.getpid()
        log.debug("pool %r: forked; forgot %d connection(s) of the parent", self.name, len(conns))


def _after_fork_in_child() -> None:
    for pool in list(_pools):
        pool._check_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
