"""GreenSocket: the part of the socket API that PyMySQL uses, cooperative.

A GreenSocket owns a non-blocking socket (plain or TLS). Every operation
first tries the socket directly; only when it would block does it wait:

* inside a greenpatch worker, the worker parks (`hub.wait_fd`) and the
  worker's IOLoop runs on until the socket is ready;
* anywhere else (the main greenlet, another thread) it blocks in
  ``select()``, so the connection behaves like a plain blocking socket.

The socket is registered with a loop only for the duration of one wait.
That is what lets a pooled connection move freely between loops, threads
and blocking use: Tornado's ``IOStream`` keeps an idle socket registered
for reads on the loop that created it (to notice a close), which would
read - steal - a reply meant for a blocking caller in another thread, and
ties the connection to a loop that may be gone; and it reads ahead into a
buffer of its own. Names are resolved asynchronously with Tornado's
``Resolver``.

Timeouts follow the socket module: `settimeout` applies to each following
wait, and an expired one closes the socket and raises `socket.timeout`
(`TimeoutError`), so a half-read reply can never be reused. A worker killed
mid-operation also closes it.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket as _socket
import ssl
import threading
from typing import Any

from tornado.netutil import Resolver

from greenpatch import hub

__all__ = ["GreenSocket", "connect_tcp", "connect_unix"]

log = logging.getLogger("greenpatch.socket")

# Bytes asked of recv() at a time when more is needed.
_CHUNK = 256 * 1024

_Worker = hub.Worker
_getcurrent = hub.getcurrent


class _Reader:
    """What ``GreenSocket.makefile("rb")`` returns: ``read(n)`` and ``close()``."""

    __slots__ = ("_sock",)

    def __init__(self, sock: GreenSocket) -> None:
        self._sock = sock

    def read(self, n: int = -1) -> bytes:
        return self._sock._read_exact(n)

    def close(self) -> None:
        pass

    @property
    def closed(self) -> bool:
        return self._sock._sock is None


class GreenSocket:
    """A connected stream socket that cooperates with greenpatch workers."""

    def __init__(self, sock: _socket.socket) -> None:
        sock.setblocking(False)
        self._sock: _socket.socket | None = sock
        self.family = sock.family
        self.type = _socket.SOCK_STREAM
        self._timeout: float | None = None
        self._buf = bytearray()

    def __repr__(self) -> str:
        state = "closed" if self._sock is None else f"fd={self._sock.fileno()}"
        return f"<greenpatch.GreenSocket {state}>"

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

    def makefile(self, mode: str = "r", *args: Any, **kwargs: Any) -> _Reader:
        if mode not in ("rb", "br"):
            raise ValueError(f"GreenSocket.makefile() supports mode 'rb' only, not {mode!r}")
        return _Reader(self)

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

    def close(self) -> None:
        sock, self._sock = self._sock, None
        self._buf.clear()
        if sock is not None:
            sock.close()

    def start_tls(self, context: ssl.SSLContext, server_hostname: str | None) -> GreenSocket:
        """Upgrade to TLS in place (handshake cooperative in a worker); return self."""
        raw = self._open()
        if self._buf:
            raise ssl.SSLError("cannot start TLS with unread data buffered")
        try:
            tls = context.wrap_socket(
                raw, server_hostname=server_hostname, do_handshake_on_connect=False
            )
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

    def _wait(self, sock: _socket.socket, write: bool) -> None:
        """Wait until ``sock`` is ready; on timeout or any failure, close."""
        try:
            if isinstance(_getcurrent(), _Worker):
                hub.wait_fd(sock.fileno(), write, self._timeout)
            else:
                fd = sock.fileno()
                ready = select.select([] if write else [fd], [fd] if write else [], [], self._timeout)
                if not (ready[0] or ready[1]):
                    raise TimeoutError("timed out")
        except TimeoutError:
            self.close()
            raise TimeoutError("timed out") from None
        except BaseException:
            # GreenletExit (worker killed) or anything unexpected: whatever
            # was half sent or half read makes the connection unusable.
            self.close()
            raise

    def _read_exact(self, n: int) -> bytes:
        """Return ``n`` bytes, or fewer only at end of stream."""
        buf = self._buf
        if len(buf) >= n:
            data = bytes(buf[:n])
            del buf[:n]
            return data
        while len(buf) < n:
            chunk = self._recv(max(n - len(buf), _CHUNK))
            if not chunk:
                break
            if not buf and len(chunk) == n:
                return chunk
            buf += chunk
        data = bytes(buf[:n])
        del buf[:n]
        return data

    def _recv(self, limit: int) -> bytes:
        sock = self._open()
        while True:
            try:
                data = sock.recv(limit)
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
                if not data:
                    self.close()
                return data


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
