"""GreenSocket: the part of the socket API that PyMySQL uses, over IOStream.

Inside a worker of the loop that owns the stream, every read, write, connect
and TLS handshake parks the worker and lets the IOLoop run. Anywhere else
(the main greenlet, another thread, a worker of another loop) the same
object does plain blocking I/O on the underlying socket, so a connection
opened by a worker can still be used - or closed - from outside one.

Timeouts follow the socket module: `settimeout` applies to each following
read or write, and an expired one raises `socket.timeout` (`TimeoutError`)
after closing the stream, so no read is ever left pending and the connection
can never be reused half-read.
"""

from __future__ import annotations

import errno
import logging
import select
import socket as _socket
import ssl
import threading
from datetime import timedelta
from typing import Any

from tornado.gen import convert_yielded
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream, StreamClosedError
from tornado.tcpclient import TCPClient

from greenpatch import hub

__all__ = ["GreenSocket", "connect_tcp", "connect_unix"]

log = logging.getLogger("greenpatch.socket")

# Largest chunk asked of IOStream per read; the stream returns less when
# less is available.
_CHUNK = 256 * 1024

_TLS_RETRY = (ssl.SSLWantReadError, ssl.SSLWantWriteError)


def _owner_worker(stream: IOStream) -> hub.Worker | None:
    """The current worker if it runs on the loop that owns ``stream``."""
    cur = hub.getcurrent()
    if isinstance(cur, hub.Worker) and cur.loop is stream.io_loop:
        return cur
    return None


def _closed_error(exc: StreamClosedError) -> OSError:
    real = exc.real_error
    if isinstance(real, OSError):
        return real
    return ConnectionResetError(errno.ECONNRESET, "connection closed")


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
        return self._sock._stream is None


class GreenSocket:
    """A connected stream socket that cooperates with greenpatch workers."""

    def __init__(self, stream: IOStream, family: int) -> None:
        self._stream: IOStream | None = stream
        self.family = family
        self.type = _socket.SOCK_STREAM
        self._timeout: float | None = None
        self._buf = bytearray()

    def __repr__(self) -> str:
        state = "closed" if self._stream is None else f"fd={self._stream.fileno()}"
        return f"<greenpatch.GreenSocket {state}>"

    # -- socket API used by PyMySQL ---------------------------------------

    def settimeout(self, timeout: float | None) -> None:
        if timeout is not None and timeout < 0:
            raise ValueError("Timeout value out of range")
        self._timeout = timeout

    def gettimeout(self) -> float | None:
        return self._timeout

    def setsockopt(self, *args: Any) -> None:
        self._raw().setsockopt(*args)

    def getsockopt(self, *args: Any) -> Any:
        return self._raw().getsockopt(*args)

    def fileno(self) -> int:
        return self._raw().fileno() if self._stream is not None else -1

    def getpeername(self) -> Any:
        return self._raw().getpeername()

    def getsockname(self) -> Any:
        return self._raw().getsockname()

    def makefile(self, mode: str = "r", *args: Any, **kwargs: Any) -> _Reader:
        if mode not in ("rb", "br"):
            raise ValueError(f"GreenSocket.makefile() supports mode 'rb' only, not {mode!r}")
        return _Reader(self)

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        stream = self._open_stream()
        if _owner_worker(stream) is None:
            self._blocking_sendall(stream, data)
            return
        try:
            future = stream.write(bytes(data))
        except StreamClosedError as exc:
            self._abort()
            raise _closed_error(exc) from None
        if not future.done():
            self._wait(future)
        elif future.exception() is not None:
            self._abort()
            raise _closed_error(future.exception()) from None  # type: ignore[arg-type]

    def close(self) -> None:
        stream, self._stream = self._stream, None
        self._buf.clear()
        if stream is None:
            return
        loop = stream.io_loop
        try:
            if IOLoop.current(instance=False) is loop:
                stream.close()
                return
        except RuntimeError:
            pass
        # Another thread: IOStream and its loop belong to the loop's thread.
        try:
            loop.add_callback(stream.close)
        except RuntimeError:  # that loop is closed: nothing watches the fd
            stream.socket.close()

    def start_tls(self, context: ssl.SSLContext, server_hostname: str | None) -> GreenSocket:
        """Upgrade to TLS in place (cooperative handshake); return self."""
        stream = self._open_stream()
        if self._buf:
            raise ssl.SSLError("cannot start TLS with unread data buffered")
        if _owner_worker(stream) is None:
            raw = stream.socket
            stream.io_loop.remove_handler(raw)
            stream.socket = None  # type: ignore[assignment]
            raw.setblocking(True)
            raw.settimeout(self._timeout)
            tls = context.wrap_socket(raw, server_hostname=server_hostname)
            tls.setblocking(False)
            self._stream = IOStream(tls)
            return self
        future = stream.start_tls(False, context, server_hostname=server_hostname)
        self._stream = None  # the old stream must not be used any more
        try:
            self._stream = hub.wait(future, self._timeout)
        except TimeoutError:
            future.cancel()
            raise TimeoutError("TLS handshake timed out") from None
        except StreamClosedError as exc:
            raise _closed_error(exc) from None
        return self

    # -- internals ----------------------------------------------------------

    def _open_stream(self) -> IOStream:
        stream = self._stream
        if stream is None or stream.closed():
            error = stream.error if stream is not None else None
            if isinstance(error, OSError):
                raise error
            raise OSError(errno.EBADF, "Bad file descriptor")
        return stream

    def _raw(self) -> _socket.socket:
        return self._open_stream().socket

    def _abort(self) -> None:
        # Close after a failed or interrupted operation: whatever was half
        # sent or half read makes the connection unusable.
        self.close()

    def _wait(self, future: Any) -> Any:
        try:
            return hub.wait(future, self._timeout)
        except TimeoutError:
            self._abort()
            raise TimeoutError("timed out") from None
        except StreamClosedError as exc:
            self._abort()
            raise _closed_error(exc) from None
        except BaseException:
            # GreenletExit (worker killed) or anything unexpected.
            self._abort()
            raise

    def _read_exact(self, n: int) -> bytes:
        """Return ``n`` bytes, or fewer only at end of stream."""
        buf = self._buf
        while len(buf) < n:
            chunk = self._recv(max(n - len(buf), _CHUNK))
            if not chunk:
                break
            if buf:
                buf += chunk
            else:
                if len(chunk) == n:
                    return chunk
                buf += chunk
        data = bytes(buf[:n])
        del buf[:n]
        return data

    def _recv(self, limit: int) -> bytes:
        stream = self._open_stream()
        if _owner_worker(stream) is None:
            return self._blocking_recv(stream, limit)
        try:
            future = stream.read_bytes(limit, partial=True)
        except StreamClosedError as exc:
            return self._eof_or_raise(exc)
        if future.done():
            exc = future.exception()
            if exc is None:
                return future.result()
            return self._eof_or_raise(exc)  # type: ignore[arg-type]
        return self._wait(future)

    def _eof_or_raise(self, exc: StreamClosedError) -> bytes:
        self._abort()
        if isinstance(exc.real_error, OSError):
            raise exc.real_error
        return b""

    # Blocking fallback: the stream has no pending operation and an empty
    # read buffer here (every cooperative read drains it), so the raw
    # non-blocking socket can be driven directly with select().

    def _poll(self, sock: _socket.socket, want_write: bool) -> None:
        fd = sock.fileno()
        r, w, _ = select.select([] if want_write else [fd], [fd] if want_write else [], [], self._timeout)
        if not r and not w:
            self._abort()
            raise TimeoutError("timed out")

    def _blocking_recv(self, stream: IOStream, limit: int) -> bytes:
        buffered = stream._read_buffer_size  # left by an earlier cooperative read
        if buffered:
            return stream.read_bytes(buffered, partial=True).result()  # type: ignore[attr-defined]
        sock = stream.socket
        while True:
            try:
                data = sock.recv(limit)
            except (BlockingIOError, ssl.SSLWantReadError):
                self._poll(sock, False)
            except ssl.SSLWantWriteError:
                self._poll(sock, True)
            except InterruptedError:
                continue
            except OSError:
                self._abort()
                raise
            else:
                if not data:
                    self._abort()
                return data

    def _blocking_sendall(self, stream: IOStream, data: bytes | bytearray | memoryview) -> None:
        sock = stream.socket
        view = memoryview(data).cast("B")
        while view:
            try:
                sent = sock.send(view)
            except (BlockingIOError, ssl.SSLWantWriteError):
                self._poll(sock, True)
                continue
            except ssl.SSLWantReadError:
                self._poll(sock, False)
                continue
            except InterruptedError:
                continue
            except OSError:
                self._abort()
                raise
            view = view[sent:]


# -- connecting --------------------------------------------------------------

_tcp_clients = threading.local()


def _tcp_client() -> TCPClient:
    client = getattr(_tcp_clients, "client", None)
    if client is None:
        client = _tcp_clients.client = TCPClient()
    return client


def _connect_wait(future: Any, timeout: float | None, what: str) -> IOStream:
    try:
        return hub.wait(future, timeout)
    except TimeoutError:
        future.cancel()
        raise TimeoutError(f"timed out connecting to {what}") from None
    except StreamClosedError as exc:
        raise _closed_error(exc) from None
    except BaseException:
        future.cancel()  # worker killed: do not leave the connect running
        raise


def connect_tcp(
    host: str,
    port: int,
    timeout: float | None = None,
    source_address: tuple[str, int] | None = None,
) -> GreenSocket:
    """Resolve ``host`` asynchronously and connect (IPv4 or IPv6) from a worker."""
    source_ip, source_port = source_address if source_address else (None, None)
    coro = _tcp_client().connect(
        host,
        port,
        source_ip=source_ip,
        source_port=source_port or None,
        timeout=None if timeout is None else timedelta(seconds=timeout),
    )
    stream = _connect_wait(convert_yielded(coro), None, f"{host}:{port}")
    stream.set_nodelay(True)
    stream.socket.setsockopt(_socket.SOL_SOCKET, _socket.SO_KEEPALIVE, 1)
    return GreenSocket(stream, stream.socket.family)


def connect_unix(path: str, timeout: float | None = None) -> GreenSocket:
    """Connect to a unix socket from a worker."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    stream = IOStream(sock)
    future = stream.connect(path)
    try:
        _connect_wait(future, timeout, path)
    except BaseException:
        stream.close()
        raise
    return GreenSocket(stream, _socket.AF_UNIX)
