"""GreenSocket: the part of the socket API that PyMySQL uses, cooperative.

A GreenSocket owns a non-blocking socket (plain or TLS). Every operation
first tries the socket directly; only when it would block does it wait:

* inside a greenpatch worker, the worker parks (`hub.wait_fd`) and the
  worker's IOLoop runs on until the socket is ready;
* anywhere else (the main greenlet, another thread) it blocks in
  ``poll()``, so the connection behaves like a plain blocking socket.

A worker waits through a `hub.FdWatch`: the socket's registration with
the worker's loop, kept from one wait to the next - across queries, across
requests, while the connection is idle in a pool - and moved when the
socket is next used from another loop. Unlike Tornado's ``IOStream``, the
registration never reads (an idle ``IOStream`` reads ahead into a buffer of
its own, which would steal a reply meant for a blocking caller in another
thread): it only wakes the worker that waits, and removes itself when an
event comes with nobody waiting. Closing removes it first, through its
loop when that runs in another thread, so that the fd number is never
reused while a loop still has it. Names are resolved asynchronously with
Tornado's ``Resolver``.

The first read after a send, the reply to it, waits before it reads: a
worker lets the loop's other work run first, as every worker does at every
query, so no request holds the loop while others wait. A turn budget
(``GREENPATCH_TURN_BUDGET`` seconds, 0 by default) trades a little of that
for less CPU where replies are often there at once: each turn of the loop
then lets its workers read replies already there at once for that long,
and a turn lasts at most the budget plus one step of each worker.

Timeouts follow the socket module: `settimeout` applies to each following
wait, and an expired one closes the socket and raises `socket.timeout`
(`TimeoutError`), so a half-read reply can never be reused. A worker killed
mid-operation also closes it. Either way `GreenSocket.cut` becomes True:
this side gave up half way, and the peer may still be working on a request
(a database server on a query) that nobody will read the answer of.

One exception, for connection pools (`keep_on_kill`): a worker killed while
it waits for the reply to a request it sent whole - the usual place a
request is when its client goes away - leaves the socket open but *held*:
closed to its driver, which sees a dead connection, while the pool may
`reattach` it, read the reply that comes and use the connection again
(see `greenpatch.pool.Pool`) instead of opening a new one. A second
`close` closes a held socket for good.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import select
import socket as _socket
import ssl
import threading
from typing import Any

from tornado.netutil import Resolver

from greenpatch import config, hub

__all__ = ["GreenSocket", "connect_tcp", "connect_unix"]

log = logging.getLogger("greenpatch.socket")

# Read buffer of makefile("rb"): one per connection (socket.makefile: 8 KiB).
_BUFFER_SIZE = 64 * 1024

_WorkerGreenlet = hub.WorkerGreenlet
_getcurrent = hub.getcurrent


class GreenSocket:
    """A connected stream socket that cooperates with greenpatch workers."""

    def __init__(self, sock: _socket.socket) -> None:
        sock.setblocking(False)
        self._sock: _socket.socket | None = sock
        self.family = sock.family
        self.type = _socket.SOCK_STREAM
        self._timeout: float | None = None
        #: True once this side closed the socket in the middle of an
        #: operation (timeout, worker killed) rather than at the peer's end
        #: of stream or by `close`.
        self.cut = False
        # Set by sendall() on a plain socket: the next read is the reply to
        # what was just sent. recv_into() then waits for a turn of the loop
        # first, which keeps the loop fair, unless the loop's current turn
        # is within its GREENPATCH_TURN_BUDGET (`hub.within_turn_budget`).
        # Under load the reply is often there already (the database
        # answered while the worker ran on), and a connection's next query
        # then follows its reply while the server's thread is still awake
        # and on the same core - which saved CPU in some benchmark runs and
        # cost some in others (README, Performance).
        self._awaiting_reply = False
        self._turn_budget = config.turn_budget()
        # Set by sendall() on a plain socket, cleared when bytes arrive:
        # nothing of the reply to the last request has been read.
        self._reply_unread = False
        #: When True, a worker killed while it waits for the reply to a
        #: whole request leaves the socket open but held (see `reattach`).
        self.keep_on_kill = False
        self._hold_on_close = False
        self._held: _socket.socket | None = None
        # The registration with the loop of the last worker that waited.
        self._watch: hub.FdWatch | None = None
        # Removals of registrations handed to loops of other threads and not
        # done yet; a close meanwhile leaves the fd open (`_closing`) until
        # they are.
        self._lock = threading.Lock()
        self._releasing = 0
        self._closing: _socket.socket | None = None

    def __del__(self) -> None:
        # Dropped without close(): the registration must go before the socket
        # object's own finalizer frees the fd number.
        d = self.__dict__
        if d.get("_sock") is not None or d.get("_held") is not None:
            with contextlib.suppress(Exception):
                self._close_for_good()

    def __repr__(self) -> str:
        if self._sock is not None:
            state = f"fd={self._sock.fileno()}"
        else:
            state = "closed" if self._held is None else f"held fd={self._held.fileno()}"
        return f"<greenpatch.GreenSocket {state}>"

    @property
    def held(self) -> bool:
        """True while a kill left the socket open for `reattach` (see `keep_on_kill`)."""
        return self._held is not None

    def reattach(self) -> bool:
        """Open again a socket held since its worker was killed; False if there is none.

        The reply to the request sent before the kill is still to be read,
        all of it. `cut` is cleared.
        """
        sock, self._held = self._held, None
        if sock is None:
            return False
        self._sock = sock
        self.cut = False
        return True

    # -- socket API used by PyMySQL ---------------------------------------

    def settimeout(self, timeout: float | None) -> None:
        if timeout is not None and timeout < 0:
            raise ValueError("Timeout value out of range")
        self._timeout = timeout

    def gettimeout(self) -> float | None:
        return self._timeout

    def setsockopt(self, *args: Any) -> None:
        self._open().setsockopt(*args)

    def getsockopt(self, *args: Any) -> Any:
        return self._open().getsockopt(*args)

    def fileno(self) -> int:
        return -1 if self._sock is None else self._sock.fileno()

    def getpeername(self) -> Any:
        return self._open().getpeername()

    def getsockname(self) -> Any:
        return self._open().getsockname()

    def makefile(self, mode: str = "r", *args: Any, **kwargs: Any) -> io.BufferedReader:
        # What socket.makefile("rb") returns: reads served from the buffer
        # stay in C; only a refill calls recv_into() below.
        if mode not in ("rb", "br"):
            raise ValueError(f"GreenSocket.makefile() supports mode 'rb' only, not {mode!r}")
        return io.BufferedReader(_socket.SocketIO(self, "rb"), _BUFFER_SIZE)  # type: ignore[arg-type]

    def _decref_socketios(self) -> None:  # SocketIO.close() calls it
        pass

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        """Receive into ``buffer``; 0 means end of stream (the socket is then closed)."""
        sock = self._open()
        if self._awaiting_reply:
            self._awaiting_reply = False
            if not (self._turn_budget and hub.within_turn_budget(self._turn_budget)):
                self._wait(sock, write=False)
        while True:
            try:
                n = sock.recv_into(buffer, nbytes)
            except (BlockingIOError, ssl.SSLWantReadError):
                self._wait(sock, write=False)
            except ssl.SSLWantWriteError:
                self._wait(sock, write=True)
            except InterruptedError:
                continue
            except OSError:
                self.close()
                raise
            else:
                if n:
                    self._reply_unread = False
                else:
                    self.close()
                return n

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        sock = self._open()
        view = memoryview(data).cast("B")
        while view:
            try:
                sent = sock.send(view)
            except (BlockingIOError, ssl.SSLWantWriteError):
                self._wait(sock, write=True)
                continue
            except ssl.SSLWantReadError:
                self._wait(sock, write=False)
                continue
            except InterruptedError:
                continue
            except OSError:
                self.close()
                raise
            view = view[sent:]
        # TLS may hold decrypted bytes the fd does not show: read first there
        # (and hold no socket on a kill: TLS state is not only on the wire).
        self._awaiting_reply = self._reply_unread = not isinstance(sock, ssl.SSLSocket)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            sock, self._held = self._held, None  # a held socket: closed for good now
            if sock is None:
                return
        elif self._hold_on_close:
            self._hold_on_close = False
            self._held = sock
            return
        self._drop_watch()  # before the fd number can be reused
        with self._lock:
            if self._releasing:
                # A loop in another thread still has the fd: end the
                # connection now, free the fd once that loop let go of it.
                self._closing = sock
                with contextlib.suppress(OSError):
                    sock.shutdown(_socket.SHUT_RDWR)
                return
        sock.close()

    def abandon(self) -> None:
        """Close for good, held or not: its holder can never run again (its thread ended).

        Marked `cut` when nothing of the reply to the last request had
        arrived: the server may still be working on it.
        """
        if self._reply_unread and (self._sock is not None or self._held is not None):
            self.cut = True
        self._close_for_good()

    def start_tls(self, context: ssl.SSLContext, server_hostname: str | None) -> GreenSocket:
        """Upgrade to TLS in place (handshake cooperative in a worker); return self."""
        raw = self._open()
        try:
            tls = context.wrap_socket(raw, server_hostname=server_hostname, do_handshake_on_connect=False)
        except BaseException:
            self.close()
            raise
        tls.setblocking(False)
        self._sock = tls
        while True:
            try:
                tls.do_handshake()
                return self
            except ssl.SSLWantReadError:
                self._wait(tls, write=False)
            except ssl.SSLWantWriteError:
                self._wait(tls, write=True)
            except BaseException:
                self.close()
                raise

    # -- internals ----------------------------------------------------------

    def _open(self) -> _socket.socket:
        sock = self._sock
        if sock is None:
            raise OSError(errno.EBADF, "Bad file descriptor")
        return sock

    def _close_for_good(self) -> None:
        self._hold_on_close = False  # so close() closes an open socket or a held one
        self.close()

    def _drop_watch(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None and watch.registered:
            with self._lock:
                self._releasing += 1
            watch.release(self._released)  # now, or later on the watch's loop

    def _released(self) -> None:
        with self._lock:
            self._releasing -= 1
            sock = self._closing if not self._releasing else None
            if sock is not None:
                self._closing = None
        if sock is not None:
            sock.close()

    def _wait(self, sock: _socket.socket, write: bool) -> None:
        """Wait until ``sock`` is ready; on timeout or any failure, close."""
        try:
            carrier = _getcurrent()
            if isinstance(carrier, _WorkerGreenlet):
                fd = sock.fileno()
                watch = self._watch
                aloop = carrier.worker.loop.asyncio_loop  # type: ignore[union-attr]
                if watch is None or not watch.serves(fd, write, aloop):
                    self._drop_watch()
                    watch = self._watch = hub.FdWatch(fd, write)
                watch.wait(self._timeout)
            else:
                # poll(), not select(): a server's fds go past select()'s 1024.
                poller = select.poll()
                poller.register(sock.fileno(), select.POLLOUT if write else select.POLLIN)
                if not poller.poll(None if self._timeout is None else self._timeout * 1000):
                    raise TimeoutError("timed out")
        except TimeoutError:
            self.cut = True
            self.close()
            raise TimeoutError("timed out") from None
        except BaseException as exc:
            # GreenletExit (worker killed) or anything unexpected: whatever
            # was half sent or half read makes the connection unusable -
            # unless nothing of the reply to a whole request was read yet.
            self.cut = True
            if self.keep_on_kill and self._reply_unread and not write and isinstance(exc, hub.GreenletExit):
                self._hold_on_close = True  # the driver's close() holds it
            else:
                self.close()
            raise


# -- connecting --------------------------------------------------------------

_resolvers = threading.local()


def _resolver() -> Resolver:
    resolver = getattr(_resolvers, "resolver", None)
    if resolver is None:
        resolver = _resolvers.resolver = Resolver()
    return resolver


def _connect_raw(sock: _socket.socket, address: Any, timeout: float | None) -> GreenSocket:
    """Connect non-blocking ``sock`` to ``address``, parking the worker meanwhile."""
    green = GreenSocket(sock)
    green.settimeout(timeout)
    try:
        err = sock.connect_ex(address)
        if err in (errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK):
            green._wait(sock, write=True)
            err = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_ERROR)
        if err:
            raise OSError(err, f"{os.strerror(err)}: {address!r}")
    except BaseException:
        green.close()
        raise
    green.settimeout(None)
    return green


def connect_tcp(
    host: str,
    port: int,
    timeout: float | None = None,
    source_address: tuple[str, int] | None = None,
) -> GreenSocket:
    """Resolve ``host`` asynchronously and connect (IPv4 or IPv6) from a worker.

    Like ``socket.create_connection``: the addresses are tried in order,
    ``timeout`` applies to the name lookup and to each attempt, and the last
    error is raised if none connects.
    """
    try:
        # An IP literal needs no lookup: getaddrinfo answers at once, without
        # the resolver's round trip through a thread pool.
        infos = _socket.getaddrinfo(host, port, 0, _socket.SOCK_STREAM, 0, _socket.AI_NUMERICHOST)
        addresses = [(family, address) for family, _, _, _, address in infos]
    except _socket.gaierror:
        try:
            addresses = hub.wait(_resolver().resolve(host, port), timeout)
        except TimeoutError:
            raise TimeoutError(f"timed out resolving {host!r}") from None
    error: OSError | None = None
    for family, address in addresses:
        sock = _socket.socket(family, _socket.SOCK_STREAM)
        try:
            if source_address:
                sock.bind(source_address)
            green = _connect_raw(sock, address, timeout)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_KEEPALIVE, 1)
        return green
    raise error if error is not None else OSError(f"getaddrinfo returned no address for {host!r}")


def connect_unix(path: str, timeout: float | None = None) -> GreenSocket:
    """Connect to a unix socket from a worker."""
    return _connect_raw(_socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM), path, timeout)
