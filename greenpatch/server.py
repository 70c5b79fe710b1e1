"""A WSGI server on Tornado: each request runs whole inside one worker greenlet.

Tornado parses HTTP/1.x on the IOLoop; for every request `WSGIContainer`
receives the body (up to ``max_body_size``, else ``413``) and then starts one
greenpatch worker (`greenpatch.hub.start_worker`) that builds the WSGI
environ, calls the application, iterates the response, writes it and calls
the response's ``close()``. All of that happens inside the worker, so
Django's ``request_finished`` (which hands the request's database
connections back to the pool) fires there too, and everything the worker
holds is released by the hub's exit hooks when it ends - normally, by
exception, or killed because the client went away.

Responses stream: headers go out with the first non-empty chunk, each chunk
is written as it is produced and the worker waits for the write to be
flushed to the socket (flow control). Without a ``Content-Length`` from the
application (or one the server can compute: a list or tuple of one chunk, or
a Django ``HttpResponse`` that is not streaming), HTTP/1.1 responses are
chunked. A client that disconnects while its worker is still in the
application gets that worker killed (``GreenletExit`` at its current wait);
the response's ``close()`` and the exit hooks still run, and are never
interrupted themselves.

::

    from greenpatch.server import serve
    serve("mysite.wsgi:application", port=8000, processes=4)

or, on an IOLoop you run yourself::

    server = GreenWSGIServer(application)
    server.listen(8000)
    ...
    await server.shutdown(timeout=30)

`run_django` replaces ``django.core.management.commands.runserver.run``
(see `greenpatch.patches.runserver`).

Logging: errors and server events go to the ``greenpatch.server`` logger;
access lines to ``greenpatch.server.access`` (Apache common log format) or,
with ``log_style="django"``, to ``django.server`` exactly as Django's
development server writes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import importlib
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from datetime import timedelta
from io import BytesIO
from typing import Any
from urllib.parse import unquote_to_bytes
from wsgiref.util import FileWrapper

from tornado import gen, httpserver, httputil, iostream, netutil
from tornado.http1connection import HTTP1Connection, HTTP1ServerConnection
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop, PeriodicCallback

from greenpatch import gc_tuning, hub
from greenpatch import monitor as _monitor  # greenpatch.monitor: blocking detector, stats lines
from greenpatch.config import ConfigError, gc_policy

__all__ = [
    "AppLoadError",
    "GreenWSGIServer",
    "WSGIContainer",
    "load_app",
    "run_django",
    "serve",
]

log = logging.getLogger("greenpatch.server")
access_logger = logging.getLogger("greenpatch.server.access")
django_logger = logging.getLogger("django.server")

#: A WSGI application: ``app(environ, start_response) -> iterable of bytes``.
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

DEFAULT_MAX_BODY_SIZE = 10 * 1024 * 1024
#: Bytes a connection reads from its socket at a time (Tornado's
#: ``chunk_size``). Tornado's default, 64 KiB, is a fresh zero-filled
#: buffer at every read - two per request, the second one finding nothing
#: - which cost about 7 % of the instructions of a plain request and evicts
#: the CPU caches. A request head rarely exceeds 8 KiB (gunicorn reads that
#: much at a time too); bigger heads and bodies take more reads.
READ_CHUNK_SIZE = 8 * 1024
LOG_STYLES = ("common", "django")

# Listen backlog (the kernel caps it at net.core.somaxconn); gunicorn's default.
_BACKLOG = 2048
# Tornado's own body limit answers "400 Bad Request"; ours answers 413, so
# Tornado's is set out of reach and the limit is enforced by the delegate.
_TORNADO_BODY_LIMIT = 1 << 62
# After a 413 sent before the body was read: how long and how much of the
# unread body to read and drop before closing, so that the client - which
# may still be sending - gets the response instead of a connection reset.
_LINGER_SECONDS = 2.0
_LINGER_BYTES = 16 * 1024 * 1024
# A second SIGTERM/SIGINT later than this after the first stops at once; an
# earlier one is the same event seen twice (e.g. Ctrl-C reaching the parent
# and the children, and the parent forwarding it).
_FORCE_SIGNAL_DELAY = 0.5
_MAX_RESTARTS = 100

_GreenletExit = hub.GreenletExit
_start_worker = hub.start_worker
_hub_wait = hub.wait
_ResponseStartLine = httputil.ResponseStartLine
_HTTPHeaders = httputil.HTTPHeaders
_StreamClosedError = iostream.StreamClosedError


class AppLoadError(ImportError):
    """`load_app` could not find the WSGI application a path names."""


class _ClientGone(Exception):
    """The client closed the connection while the response was being written."""


# -- small cached strings -------------------------------------------------------------

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_date_cache: list[Any] = [0, ""]
_log_time_cache: list[Any] = [0, "", ""]


def _http_date() -> str:
    """The ``Date`` header value for now, recomputed once a second."""
    now = int(time.time())
    cache = _date_cache
    if cache[0] != now:
        cache[1] = email.utils.formatdate(now, usegmt=True)
        cache[0] = now
    return cache[1]


def _log_times() -> tuple[str, str]:
    """Local time as Apache's ``%t`` and as Django's ``log_date_time_string()``."""
    now = int(time.time())
    cache = _log_time_cache
    if cache[0] != now:
        t = time.localtime(now)
        offset = t.tm_gmtoff // 60
        sign = "-" if offset < 0 else "+"
        offset = abs(offset)
        month = _MONTHS[t.tm_mon - 1]
        cache[1] = (
            f"{t.tm_mday:02d}/{month}/{t.tm_year:04d}:{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} "
            f"{sign}{offset // 60:02d}{offset % 60:02d}"
        )
        cache[2] = f"{t.tm_mday:02d}/{month}/{t.tm_year:04d} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
        cache[0] = now
    return cache[1], cache[2]


# Header name (as Tornado normalises it) -> environ key; "" drops the header.
_ENVIRON_KEYS: dict[str, str] = {"Content-Type": "CONTENT_TYPE", "Content-Length": "CONTENT_LENGTH"}


def _environ_key(name: str) -> str:
    key = _ENVIRON_KEYS.get(name)
    if key is None:
        # Names with "_" are dropped, as by Django's runserver, nginx and
        # gunicorn: "X-Auth_User" and "X-Auth-User" would both become
        # HTTP_X_AUTH_USER, so one could spoof the other.
        key = "" if "_" in name else "HTTP_" + name.upper().replace("-", "_")
        if len(_ENVIRON_KEYS) < 4096:
            _ENVIRON_KEYS[name] = key
    return key


# Response header name -> its lower-case form, for names already validated.
_HEADER_NAMES: dict[str, str] = {}
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_HOP_BY_HOP = frozenset(
    ("connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade")
)


def _header_name(name: str) -> str:
    if type(name) is not str or not _TOKEN.fullmatch(name):
        raise ValueError(f"invalid WSGI response header name {name!r}")
    lower = name.lower()
    if len(_HEADER_NAMES) < 4096:
        _HEADER_NAMES[name] = lower
    return lower


def _printable(text: str) -> str:
    """``text`` safe for a log line (control characters escaped)."""
    if text.isascii() and text.isprintable():
        return text
    return text.encode("unicode_escape").decode("ascii")


# -- the container ----------------------------------------------------------------------


class WSGIContainer(httputil.HTTPServerConnectionDelegate):
    """Serve a WSGI application from Tornado's HTTP server, one worker per request.

    Pass it to ``tornado.httpserver.HTTPServer`` (with a ``max_body_size``
    at least as large as this one's, or Tornado answers over-large bodies
    with ``400`` itself), or use `GreenWSGIServer`, which does that.

    :arg app: the WSGI application.
    :arg max_body_size: largest accepted request body in bytes; a larger
        one - announced by ``Content-Length`` or streamed with chunked
        encoding - gets ``413 Payload Too Large`` and the application is
        not called.
    :arg access_log: write one log line per request.
    :arg log_style: ``"common"``: Apache's common log format on the
        ``greenpatch.server.access`` logger, at INFO;
        ``"django"``: Django's development server lines
        (``"GET / HTTP/1.1" 200 123``) on the ``django.server`` logger, at
        INFO, WARNING (4xx) or ERROR (5xx), with the ``extra`` Django
        passes (``request``: the client socket, ``server_time``,
        ``status_code``).
    :arg multiprocess: the value of ``wsgi.multiprocess`` (True when the
        application is served by several processes).

    `in_flight` counts the requests between their headers being received
    and their worker having ended.
    """

    def __init__(
        self,
        app: WSGIApp,
        *,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        access_log: bool = True,
        log_style: str = "common",
        multiprocess: bool = False,
    ) -> None:
        if log_style not in LOG_STYLES:
            raise ValueError(f"log_style={log_style!r} is not accepted; use 'common' or 'django'")
        if not isinstance(max_body_size, int) or isinstance(max_body_size, bool) or max_body_size < 0:
            raise ValueError(f"max_body_size={max_body_size!r} is not accepted; use an integer >= 0")
        if not callable(app):
            raise TypeError(f"the WSGI application must be callable, not {type(app).__name__}")
        self.app = app
        self.max_body_size = max_body_size
        self.access_log = access_log
        self.log_style = log_style
        self.multiprocess = multiprocess
        self._active: set[_Request] = set()
        self._draining = False
        self._drained: asyncio.Event | None = None
        self._lingering: set[asyncio.Future] = set()

    @property
    def in_flight(self) -> int:
        """Requests being received or handled now (headers seen, worker not ended)."""
        return len(self._active)

    def start_request(self, server_conn: object, request_conn: httputil.HTTPConnection) -> _Request:
        """Called by Tornado for each request a connection may carry."""
        return _Request(self, server_conn, request_conn)

    # -- bookkeeping ------------------------------------------------------------

    def _done(self, request: _Request) -> None:
        active = self._active
        active.discard(request)
        if not active and self._drained is not None:
            self._drained.set()

    def _begin_drain(self) -> None:
        """Shutting down: every response from now on closes its connection."""
        self._draining = True
        if self._drained is None:
            self._drained = asyncio.Event()
        if not self._active:
            self._drained.set()
        for request in self._active:
            request._close_after_response()

    def _kill_all(self) -> None:
        """Kill every running worker; close connections still receiving a body."""
        for request in list(self._active):
            request._abort()

    def _close_lingering(self) -> None:
        for task in list(self._lingering):
            task.cancel()

    # -- logging -------------------------------------------------------------------

    def _log_access(self, request: _Request, status: int, size: int) -> None:
        start_line = request.start_line
        if start_line is None:
            return
        if self.log_style == "common":
            logger = access_logger
            if logger.isEnabledFor(logging.INFO):
                logger.info(
                    '%s - - [%s] "%s" %d %s',
                    request.conn.context.remote_ip,  # type: ignore[attr-defined]
                    _log_times()[0],
                    _printable(f"{start_line.method} {start_line.path} {start_line.version}"),
                    status,
                    size or "-",
                )
            return
        if status >= 500:
            level = logging.ERROR
        elif status >= 400:
            level = logging.WARNING
        else:
            level = logging.INFO
        logger = django_logger
        if logger.isEnabledFor(level):
            line = _printable(f"{start_line.method} {start_line.path} {start_line.version}")
            stream = request.conn.stream  # type: ignore[attr-defined]
            extra = {
                "request": stream.socket if stream is not None else None,
                "server_time": _log_times()[1],
                "status_code": status,
            }
            logger.log(level, '"%s" %s %s', line, str(status), str(size), extra=extra)


class _Request(httputil.HTTPMessageDelegate):
    """One request: receives it on the loop, then serves it in a worker."""

    __slots__ = (
        "container",
        "server_conn",
        "conn",
        "start_line",
        "headers",
        "chunks",
        "size",
        "rejected",
        "worker",
        "killable",
        "status",
        "response_headers",
        "headers_sent",
        "discard_body",
        "finished",
        "gone",
        "sent",
        "code",
    )

    def __init__(self, container: WSGIContainer, server_conn: object, conn: httputil.HTTPConnection) -> None:
        self.container = container
        self.server_conn = server_conn
        self.conn: Any = conn
        self.start_line: httputil.RequestStartLine | None = None
        self.headers: httputil.HTTPHeaders | None = None
        self.chunks: list[bytes] | None = None
        self.size = 0
        self.rejected = False
        self.worker: hub.Worker | None = None
        self.killable = False
        self.status: str | None = None
        self.response_headers: list[tuple[str, str]] | None = None
        self.headers_sent = False
        self.discard_body = False
        self.finished = False
        self.gone = False
        self.sent = 0
        self.code = 0

    # -- receiving (on the loop) ---------------------------------------------------

    def headers_received(
        self,
        start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
        headers: httputil.HTTPHeaders,
    ) -> None:
        self.start_line = start_line  # type: ignore[assignment]
        self.headers = headers
        if isinstance(self.server_conn, _ServerConnection):
            self.server_conn.waiting_since = None
        container = self.container
        if "Content-Length" in headers:
            try:
                declared = int(headers["Content-Length"])
            except ValueError:
                declared = -1  # Tornado answers 400 for a malformed length
            if declared > container.max_body_size:
                self._reject_unread(declared)
                return
        container._active.add(self)
        if container._draining:
            self._close_after_response()

    def data_received(self, chunk: bytes) -> None:
        if self.rejected:
            return
        size = self.size + len(chunk)
        if size > self.container.max_body_size:
            self._reject_streamed()
            return
        self.size = size
        if self.chunks is None:
            self.chunks = [chunk]
        else:
            self.chunks.append(chunk)

    def finish(self) -> None:
        if self.rejected:
            return
        self.conn.set_close_callback(self._on_disconnect)
        # The worker starts at once and runs until its first wait (a simple
        # request is answered before this returns).
        worker = self.worker = _start_worker(self._serve)
        if worker.dead:  # done already, exit hooks included
            self._worker_ended(worker.future)
        else:
            worker.future.add_done_callback(self._worker_ended)
            if isinstance(self.server_conn, _ServerConnection):
                self.server_conn.answered_inline = False

    def on_connection_close(self) -> None:
        # The connection closed before the whole request was received: no
        # worker was started for it.
        self.chunks = None
        if self.worker is None:
            self.container._done(self)

    # -- 413 ---------------------------------------------------------------------------

    def _payload_too_large(self) -> bytes:
        return (
            f"413 Payload Too Large: the request body exceeds the limit of "
            f"{self.container.max_body_size} bytes\n"
        ).encode()

    def _reject_unread(self, declared: int) -> None:
        """Answer 413 before reading a body whose Content-Length is too large."""
        self.rejected = True
        body = self._payload_too_large()
        head = (
            "HTTP/1.1 413 Payload Too Large\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n"
            f"Date: {_http_date()}\r\n\r\n"
        ).encode("latin-1")
        container = self.container
        if container.access_log:
            container._log_access(self, 413, len(body))
        log.debug(
            "rejected a body of %d bytes from %s (limit %d)",
            declared,
            self.conn.context,
            container.max_body_size,
        )
        # Take the stream from Tornado (allowed during headers_received), so
        # the unread body is drained here instead of read as a request.
        stream = self.conn.detach()
        task = gen.convert_yielded(_linger(stream, head + body))
        container._lingering.add(task)
        task.add_done_callback(container._lingering.discard)

    def _reject_streamed(self) -> None:
        """Answer 413 when a chunked body grows past the limit; the connection then closes."""
        self.rejected = True
        self.chunks = None
        container = self.container
        body = self._payload_too_large()
        headers = _HTTPHeaders()
        headers["Content-Type"] = "text/plain; charset=utf-8"
        headers["Content-Length"] = str(len(body))
        headers["Connection"] = "close"
        headers["Date"] = _http_date()
        conn = self.conn
        conn.write_headers(_ResponseStartLine("HTTP/1.1", 413, "Payload Too Large"), headers, body)
        conn.finish()  # the body is unread: Tornado closes the connection once this is sent
        if container.access_log:
            container._log_access(self, 413, len(body))
        container._done(self)

    # -- disconnects, shutdown -----------------------------------------------------------

    def _on_disconnect(self) -> None:
        # Runs on the loop when the client closes the connection while the
        # worker runs. Kill the worker while it is in the application; its
        # cleanup (close(), exit hooks) is never interrupted.
        worker = self.worker
        if worker is not None and self.killable and not worker.dead:
            log.debug("client %s closed the connection; killing %r", self.conn.context, worker)
            worker.kill()

    def _close_after_response(self) -> None:
        # Tornado's HTTP1Connection has no public switch for this; its
        # _disconnect_on_finish is what "Connection: close" on the request
        # sets (and it then says so in the response's headers).
        self.conn._disconnect_on_finish = True

    def _abort(self) -> None:
        worker = self.worker
        if worker is not None:
            if not worker.dead:
                worker.kill()
        else:
            self.conn.close()

    def _worker_ended(self, future: asyncio.Future) -> None:
        self.container._done(self)
        if not future.cancelled() and future.exception() is not None:
            # Only an internal error gets here: _serve handles the app's.
            log.error("greenpatch.server: request handling failed", exc_info=future.exception())

    # -- serving (inside the worker) ---------------------------------------------------

    def start_response(
        self,
        status: str,
        headers: list[tuple[str, str]],
        exc_info: Any = None,
    ) -> Callable[[bytes], None]:
        """PEP 3333 ``start_response``."""
        if exc_info is not None:
            try:
                if self.headers_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise AssertionError("start_response() was already called (pass exc_info to call it again)")
        if not isinstance(status, str):
            raise TypeError(f"the WSGI status must be a str, not {type(status).__name__}")
        self.status = status
        self.response_headers = headers
        return self.write

    def _environ(self) -> dict[str, Any]:
        start_line: Any = self.start_line
        conn = self.conn
        context = conn.context
        target = start_line.path
        query_at = target.find("?")
        if query_at >= 0:
            path = target[:query_at]
            query = target[query_at + 1 :]
        else:
            path = target
            query = ""
        if path[:1] != "/" and "://" in path:  # absolute-form: http://host/path
            rest = path.split("://", 1)[1]
            slash = rest.find("/")
            path = rest[slash:] if slash >= 0 else "/"
        if "%" in path:
            path = unquote_to_bytes(path).decode("latin-1")
        server = getattr(context, "_greenpatch_server", None)
        if server is None:
            server = _server_address(conn.stream, context.protocol)
            with contextlib.suppress(AttributeError):
                context._greenpatch_server = server
        chunks = self.chunks
        if chunks is None:
            body = b""
        elif len(chunks) == 1:
            body = chunks[0]
        else:
            body = b"".join(chunks)
        self.chunks = None
        environ: dict[str, Any] = {
            "REQUEST_METHOD": start_line.method,
            "SCRIPT_NAME": "",
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "SERVER_NAME": server[0],
            "SERVER_PORT": server[1],
            "SERVER_PROTOCOL": start_line.version,
            "REMOTE_ADDR": context.remote_ip,
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": context.protocol,
            "wsgi.input": BytesIO(body),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": False,
            "wsgi.multiprocess": self.container.multiprocess,
            "wsgi.run_once": False,
            "wsgi.input_terminated": True,
            "wsgi.file_wrapper": FileWrapper,
        }
        headers: Any = self.headers
        as_list = getattr(headers, "_as_list", None)  # Tornado >= 6.5: name -> [values]
        if type(as_list) is dict:
            for name, values in as_list.items():
                key = _ENVIRON_KEYS.get(name) or _environ_key(name)
                if key:
                    environ[key] = values[0] if len(values) == 1 else ",".join(values)
        else:
            for name in headers:
                key = _environ_key(name)
                if key:
                    environ[key] = headers[name]
        if body and "CONTENT_LENGTH" not in environ:
            # A chunked body: it was read whole, so its length is known (and
            # Django reads no body without CONTENT_LENGTH).
            environ["CONTENT_LENGTH"] = str(len(body))
        return environ

    def _serve(self) -> None:
        container = self.container
        conn = self.conn
        result: Any = None
        self.killable = True
        try:
            try:
                result = container.app(self._environ(), self.start_response)
                self._send(result)
            except (_ClientGone, _StreamClosedError):
                self._client_gone()
            except Exception:
                self._fail()
            finally:
                self.killable = False
                if result is not None:
                    close = getattr(result, "close", None)
                    if close is not None:
                        try:
                            close()
                        except Exception:
                            log.exception("close() of the WSGI response to %s failed", self._describe())
                            if not self.finished:
                                self._fail(logged=True)
            if container.access_log and self.finished and not self.gone:
                container._log_access(self, self.code, self.sent)
        except _GreenletExit:
            # Killed: the client went away, or shutdown ran out of time.
            if not self.finished:
                conn.close()
            raise
        except (KeyboardInterrupt, SystemExit) as exc:
            # A signal (or sys.exit()) landed in this greenlet: hand it to the
            # loop's greenlet, where it stops the server as it would have.
            if not self.finished:
                conn.close()
            IOLoop.current().add_callback(_reraise, exc)

    def _send(self, result: Iterable[bytes]) -> None:
        """Write the response iterable; then finish the HTTP response."""
        kind = type(result)
        if self.headers_sent:  # by the legacy write()
            pass
        elif kind is list or kind is tuple:
            if len(result) == 1:  # type: ignore[arg-type]
                # PEP 3333: the length of a one-item iterable is known.
                self._send_headers(result[0] or b"", True)  # type: ignore[index]
                self.conn.finish()
                self.finished = True
                return
        elif getattr(result, "streaming", None) is False:
            # A Django HttpResponse that is not streaming: its content is in
            # memory already; send it with its length, in one write.
            self._send_headers(b"".join(result), True)
            self.conn.finish()
            self.finished = True
            return
        write = self.write
        for chunk in result:
            if chunk:
                if self.headers_sent:
                    write(chunk)
                else:
                    self._send_headers(chunk, False)
        if not self.headers_sent:
            self._send_headers(b"", True)
        self.conn.finish()
        self.finished = True

    def write(self, data: bytes) -> None:
        """Write one chunk of the body (also PEP 3333's legacy ``write()``)."""
        if not self.headers_sent:
            if data:
                self._send_headers(data, False)
            return
        if self.discard_body or not data:
            return
        conn = self.conn
        if conn.stream.closed():
            raise _ClientGone
        if not isinstance(data, bytes):
            raise TypeError(f"WSGI response chunks must be bytes, not {type(data).__name__}")
        self.sent += len(data)
        future = conn.write(data)
        if not future.done():
            _hub_wait(future)
        if conn.stream.closed():
            raise _ClientGone

    def _send_headers(self, chunk: bytes, complete: bool) -> None:
        """Send the status line and headers, with the first chunk of the body.

        ``complete``: ``chunk`` is the whole body, so its length may be sent.
        """
        status = self.status
        if status is None:
            raise RuntimeError("the WSGI application did not call start_response()")
        if not isinstance(chunk, bytes):
            raise TypeError(f"WSGI response chunks must be bytes, not {type(chunk).__name__}")
        try:
            code = int(status[:3])
        except ValueError:
            raise ValueError(f"invalid WSGI status {status!r}") from None
        reason = status[4:].strip()
        # HTTPHeaders.add() validates each header with two regular
        # expressions; checking names once (cached) and values with one
        # search is several times cheaper. Tornado refuses CR/LF again.
        headers = _HTTPHeaders()
        seen: set[str] = set()
        for name, value in self.response_headers or ():
            lower = _HEADER_NAMES.get(name) or _header_name(name)
            if type(value) is not str:
                raise TypeError(f"WSGI header {name!r} has a {type(value).__name__} value, not str")
            if _BAD_VALUE_CHARS.search(value):
                raise ValueError(f"invalid characters in WSGI header {name!r}: {value!r}")
            if lower in _HOP_BY_HOP:
                # Hop-by-hop headers belong to the server (PEP 3333); an
                # application's "Connection: close" is honoured.
                if lower == "connection" and "close" in value.lower():
                    self._close_after_response()
                continue
            if lower in seen:
                headers.add(name, value)
            else:
                seen.add(lower)
                headers[name] = value
        if "date" not in seen:
            headers["Date"] = _http_date()
        conn = self.conn
        start_line: Any = self.start_line
        method = start_line.method
        if code in (204, 304) or code < 200:
            self.discard_body = True
            chunk = b""
        else:
            if "content-length" not in seen:
                if complete:
                    if method != "HEAD" or chunk:
                        headers["Content-Length"] = str(len(chunk))
                elif start_line.version == "HTTP/1.0":
                    # No length and no chunked encoding in HTTP/1.0: the
                    # body ends when the connection closes.
                    self._close_after_response()
            if method == "HEAD":
                self.discard_body = True
                chunk = b""
        if self.container._draining:
            self._close_after_response()
        self.code = code
        if conn.stream.closed():
            raise _ClientGone
        future = conn.write_headers(_ResponseStartLine("HTTP/1.1", code, reason), headers, chunk)
        self.headers_sent = True
        self.sent = len(chunk)
        if not future.done():
            _hub_wait(future)
        if conn.stream.closed():
            raise _ClientGone

    def _describe(self) -> str:
        start_line: Any = self.start_line
        return f"{start_line.method} {_printable(start_line.path)} from {self.conn.context}"

    def _client_gone(self) -> None:
        log.debug("client closed the connection during %s", self._describe())
        self.finished = True  # nothing more can be sent
        self.gone = True
        if self.container.log_style == "django":
            django_logger.info("- Broken pipe from %s", self.conn.context.address)

    def _fail(self, logged: bool = False) -> None:
        """The application failed: 500 if nothing was sent yet, else drop the connection."""
        if not logged:
            log.exception("error in the WSGI application handling %s", self._describe())
        conn = self.conn
        if self.finished:
            return
        self.finished = True
        if self.headers_sent or conn.stream.closed():
            conn.close()
            return
        body = b"500 Internal Server Error\n"
        headers = _HTTPHeaders()
        headers["Content-Type"] = "text/plain; charset=utf-8"
        headers["Content-Length"] = str(len(body))
        headers["Date"] = _http_date()
        if self.container._draining:
            self._close_after_response()
        if self.start_line.method == "HEAD":  # type: ignore[union-attr]
            body = b""
        try:
            conn.write_headers(_ResponseStartLine("HTTP/1.1", 500, "Internal Server Error"), headers, body)
            conn.finish()
        except Exception:
            log.debug("could not send the 500 response", exc_info=True)
            conn.close()
            return
        self.headers_sent = True
        self.code = 500
        self.sent = len(body)


def _reraise(exc: BaseException) -> None:
    raise exc


def _server_address(stream: Any, scheme: str) -> tuple[str, str]:
    """(SERVER_NAME, SERVER_PORT) of the local end of a connection."""
    default_port = "443" if scheme == "https" else "80"
    try:
        name = stream.socket.getsockname()
    except (AttributeError, OSError):
        return "localhost", default_port
    if isinstance(name, tuple):
        return str(name[0]), str(name[1])
    return "localhost", default_port  # unix socket


async def _linger(stream: iostream.IOStream, data: bytes) -> None:
    """Send ``data``, half-close, drop what the client still sends, close."""
    try:
        await stream.write(data)
        sock = stream.socket
        if sock is None:
            return
        sock.shutdown(socket.SHUT_WR)
        deadline = IOLoop.current().time() + _LINGER_SECONDS
        dropped = 0
        while dropped < _LINGER_BYTES:
            remaining = deadline - IOLoop.current().time()
            if remaining <= 0:
                break
            chunk = await gen.with_timeout(
                timedelta(seconds=remaining),
                stream.read_bytes(65536, partial=True),
                quiet_exceptions=(_StreamClosedError,),
            )
            dropped += len(chunk)
    except (TimeoutError, _StreamClosedError, OSError, asyncio.CancelledError):
        pass
    finally:
        stream.close()


# A request head (request line and headers) longer than Tornado's
# max_header_size, or a chunk-size line longer than 64 bytes, makes the
# IOStream close the connection itself, before HTTP1Connection could answer.
_UNSATISFIABLE_READ_BODY = b"400 Bad Request: request head or chunk line too long\n"
_UNSATISFIABLE_READ_RESPONSE = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
) % (len(_UNSATISFIABLE_READ_BODY), _UNSATISFIABLE_READ_BODY)


def _answer_unsatisfiable_reads(stream: iostream.IOStream) -> None:
    """Make ``stream`` answer 400 before it closes itself on an over-long request head."""
    close = stream.close

    def close_with_400(exc_info: Any = False) -> None:
        if isinstance(exc_info, iostream.UnsatisfiableReadError) and not stream.closed():
            # Nothing else is being written: a response is only started
            # once the whole request was read. Best effort, non-blocking.
            with contextlib.suppress(OSError):
                stream.socket.send(_UNSATISFIABLE_READ_RESPONSE)
        close(exc_info)

    stream.close = close_with_400  # type: ignore[method-assign]


def _keep_nodelay(stream: iostream.IOStream) -> None:
    """Turn TCP_NODELAY on for the life of ``stream``.

    Tornado turns it on before the last write of every response and off
    after it (two ``setsockopt`` calls per request), so that Nagle's
    algorithm may merge the writes of the next response. A response here is
    written whole, or in chunks the application chose to stream: on for
    good, as most servers do.
    """
    sock = stream.socket
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with contextlib.suppress(OSError):  # the client may be gone already
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    stream.set_nodelay = _ignore_nodelay  # type: ignore[method-assign]


def _ignore_nodelay(value: bool) -> None:
    pass


class _ServerConnection(HTTP1ServerConnection):
    """Tornado's HTTP/1 server connection, minus a loop turn per request.

    The idle timeout is kept by `GreenWSGIServer` with one periodic sweep
    (``waiting_since``) instead of Tornado's timer around every header read.

    Tornado ends each request with ``await asyncio.sleep(0)``, so that a
    client pipelining requests that are answered without waiting cannot
    starve the loop. After a request whose worker waited (for the database,
    say) the loop has turned many times already, and the extra turn only
    lets the loop read the client's next request into the stream's buffer
    before the reader is back - which makes Tornado unregister the socket
    and register it again (two ``epoll_ctl`` calls, and asyncio bookkeeping)
    at every request. Here the turn is taken only after a request answered
    without waiting (``answered_inline``, cleared by `_Request.finish`).
    """

    answered_inline = True
    #: ``time.monotonic()`` when the connection began waiting for the head of
    #: its next request; None while a request is being received or served.
    #: `GreenWSGIServer` closes connections that wait too long.
    waiting_since: float | None = None

    async def _server_request_loop(self, delegate: httputil.HTTPServerConnectionDelegate) -> None:
        # As HTTP1ServerConnection._server_request_loop (Tornado 6.x), but
        # for the condition on the loop turn.
        try:
            while True:
                conn = HTTP1Connection(self.stream, False, self.params, self.context)
                request_delegate = delegate.start_request(self, conn)
                self.answered_inline = True
                self.waiting_since = time.monotonic()
                try:
                    ret = await conn.read_response(request_delegate)
                except (
                    iostream.StreamClosedError,
                    iostream.UnsatisfiableReadError,
                    asyncio.CancelledError,
                ):
                    return
                except Exception:
                    log.error("Uncaught exception serving %r", self.context, exc_info=True)
                    conn.close()
                    return
                if not ret:
                    return
                if self.answered_inline:
                    await asyncio.sleep(0)
        finally:
            delegate.on_close(self)


# -- the server ---------------------------------------------------------------------------


class GreenWSGIServer(HTTPServer):
    """A Tornado ``HTTPServer`` serving a WSGI application through `WSGIContainer`.

    Use it like any ``HTTPServer`` (``listen``, ``bind``/``start``,
    ``add_sockets``) on a running IOLoop; stop it with `shutdown`.

    :arg app: the WSGI application.
    :arg max_body_size, access_log, log_style: see `WSGIContainer`.
    :arg idle_connection_timeout: seconds a connection may wait for the
        head of its next request (keep-alive, or a head that trickles in)
        before it is closed; checked by a sweep every ``min(timeout / 10,
        1)`` seconds, not by a timer per request. None: never.
    :arg multiprocess: ``wsgi.multiprocess``.
    :arg http_server_kwargs: passed to ``HTTPServer`` (``xheaders``,
        ``ssl_options``, ``no_keep_alive``, ``body_timeout``,
        ``max_header_size``, ``decompress_request``...), and ``chunk_size``
        (default `READ_CHUNK_SIZE`).

    The container is `container`; ``server.in_flight`` is its `in_flight`.
    """

    container: WSGIContainer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Tornado's HTTPServer is Configurable: the arguments go to
        # initialize() (documented in the class docstring).
        pass

    def initialize(  # type: ignore[override]
        self,
        app: WSGIApp,
        *,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        access_log: bool = True,
        log_style: str = "common",
        idle_connection_timeout: float | None = 60.0,
        multiprocess: bool = False,
        **http_server_kwargs: Any,
    ) -> None:
        if idle_connection_timeout is not None and not idle_connection_timeout > 0:
            raise ValueError(
                "idle_connection_timeout must be a number of seconds > 0 or None, "
                f"not {idle_connection_timeout!r}"
            )
        self.container = WSGIContainer(
            app,
            max_body_size=max_body_size,
            access_log=access_log,
            log_style=log_style,
            multiprocess=multiprocess,
        )
        self._forced: asyncio.Event | None = None
        self.idle_connection_timeout = idle_connection_timeout
        self._sweeper: PeriodicCallback | None = None
        http_server_kwargs.setdefault("chunk_size", READ_CHUNK_SIZE)
        super().initialize(
            self.container,
            max_body_size=_TORNADO_BODY_LIMIT,
            **http_server_kwargs,
        )
        self.conn_params.header_timeout = None  # the sweep below keeps the idle timeout

    @property
    def in_flight(self) -> int:
        """Requests being received or handled now."""
        return self.container.in_flight

    def handle_stream(self, stream: iostream.IOStream, address: tuple) -> None:
        # As HTTPServer.handle_stream, with the connection class above.
        _answer_unsatisfiable_reads(stream)
        _keep_nodelay(stream)
        context = httpserver._HTTPRequestContext(stream, address, self.protocol, self.trusted_downstream)
        conn = _ServerConnection(stream, self.conn_params, context)
        self._connections.add(conn)
        conn.start_serving(self)
        if self._sweeper is None and self.idle_connection_timeout is not None:
            interval = min(self.idle_connection_timeout / 10, 1.0)
            self._sweeper = PeriodicCallback(self._close_connections_idle_too_long, interval * 1000)
            self._sweeper.start()

    def _close_connections_idle_too_long(self) -> None:
        assert self.idle_connection_timeout is not None
        deadline = time.monotonic() - self.idle_connection_timeout
        for conn in list(self._connections):  # all made by handle_stream: _ServerConnection
            since = conn.waiting_since  # type: ignore[attr-defined]
            if since is not None and since <= deadline:
                conn.stream.close()

    def stop(self) -> None:
        """Stop listening (see ``TCPServer.stop``) and stop the idle-connection sweep."""
        super().stop()
        if self._sweeper is not None:
            self._sweeper.stop()
            self._sweeper = None

    def _close_idle_connections(self) -> None:
        busy = {request.server_conn for request in self.container._active}
        for conn in list(self._connections):
            if conn not in busy:
                conn.stream.close()

    def _force_shutdown(self) -> None:
        """Make a running `shutdown` stop waiting for requests now."""
        if self._forced is None:
            self._forced = asyncio.Event()
        self._forced.set()

    async def shutdown(self, timeout: float = 30.0) -> bool:
        """Stop gracefully; return True if every request finished in time.

        Stops accepting connections, closes idle keep-alive connections,
        lets in-flight requests finish (their responses close their
        connections) for up to ``timeout`` seconds, then kills the workers
        still running and closes every connection left. Finally closes all
        greenpatch connection pools of the process
        (`greenpatch.pool.all_pools`). Call it on the server's IOLoop.
        """
        container = self.container
        self.stop()
        container._begin_drain()
        self._close_idle_connections()
        if self._forced is None:
            self._forced = asyncio.Event()
        clean = True
        if container._active:
            log.info("waiting up to %g s for %d request(s) in flight", timeout, container.in_flight)
            clean = await self._wait_drained(timeout)
            if not clean:
                log.warning(
                    "%d request(s) still in flight after %g s: killing their workers",
                    container.in_flight,
                    timeout,
                )
                container._kill_all()
                await self._wait_drained(5.0, forceable=False)
        self._close_idle_connections()
        try:
            await asyncio.wait_for(self.close_all_connections(), 5.0)
        except TimeoutError:
            log.warning("some connections did not close within 5 s")
        container._close_lingering()
        from greenpatch.pool import all_pools

        for pool in all_pools():
            try:
                pool.close()
            except Exception:
                log.exception("closing pool %r failed", getattr(pool, "name", pool))
        return clean

    async def _wait_drained(self, timeout: float, forceable: bool = True) -> bool:
        container = self.container
        drained = container._drained
        assert drained is not None
        waits = [asyncio.ensure_future(drained.wait())]
        if forceable and self._forced is not None:
            waits.append(asyncio.ensure_future(self._forced.wait()))
        try:
            await asyncio.wait(waits, timeout=max(timeout, 0.0), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()
        return not container._active


# -- loading an application ---------------------------------------------------------------


def load_app(path: str) -> WSGIApp:
    """Import a WSGI application named ``"package.module:attr"``.

    ``attr`` defaults to ``application`` (Django's name) and may be dotted.
    Raises `AppLoadError` (an ``ImportError``) naming ``path`` when the
    module does not exist, lacks the attribute, or the attribute is not
    callable. Errors raised while the module itself is imported (e.g.
    Django's ``ImproperlyConfigured``) propagate unchanged.
    """
    if not isinstance(path, str):
        raise TypeError(f"load_app() needs a 'module:attr' string, not {type(path).__name__}")
    module_name, _, attr = path.partition(":")
    module_name = module_name.strip()
    attr = attr.strip() or "application"
    if not module_name or not all(part.isidentifier() for part in module_name.split(".")):
        raise AppLoadError(f"invalid WSGI application path {path!r}: use 'package.module:attr'")
    if not all(part.isidentifier() for part in attr.split(".")):
        raise AppLoadError(f"invalid WSGI application path {path!r}: {attr!r} is not a Python name")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise AppLoadError(
                f"cannot load WSGI application {path!r}: no module named {missing!r} "
                f"(sys.path[0] is {sys.path[0]!r})"
            ) from exc
        raise
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AppLoadError(
                f"cannot load WSGI application {path!r}: module {module_name!r} has no attribute {attr!r}"
            ) from None
    if not callable(obj):
        raise AppLoadError(
            f"cannot load WSGI application {path!r}: {attr!r} is a {type(obj).__name__}, not callable"
        )
    return obj


# -- serve() -----------------------------------------------------------------------------------


def _describe_sockets(sockets: list[socket.socket], unix_socket: str | None) -> str:
    if unix_socket is not None:
        return f"unix:{unix_socket}"
    host, port = sockets[0].getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _bind(
    port: int,
    address: str,
    unix_socket: str | None,
    reuse_port: bool = False,
    family: socket.AddressFamily = socket.AF_UNSPEC,
) -> list[socket.socket]:
    if unix_socket is not None:
        return [netutil.bind_unix_socket(unix_socket, mode=0o666, backlog=_BACKLOG)]
    return netutil.bind_sockets(port, address or None, family=family, backlog=_BACKLOG, reuse_port=reuse_port)


def _socket_inode(path: str | None) -> int | None:
    if path is None:
        return None
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _remove_unix_socket(path: str | None, inode: int | None) -> None:
    # Remove the socket file only if it is still ours (a newer server may
    # have replaced it).
    if path is not None and inode is not None and _socket_inode(path) == inode:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _run_process(
    app: WSGIApp | str,
    make_sockets: Callable[[], list[socket.socket]],
    *,
    access_log: bool,
    max_body_size: int,
    graceful_timeout: float,
    multiprocess: bool,
    on_listening: Callable[[list[socket.socket]], None],
) -> int:
    """Serve in this process until SIGTERM/SIGINT; return the exit code."""
    if isinstance(app, str):
        try:
            app = load_app(app)
        except AppLoadError as exc:
            log.error("%s", exc)
            return 1
        except Exception:
            log.exception("cannot load the WSGI application %r", app)
            return 1
    gc_tuning.tune()  # GREENPATCH_GC, checked by serve()
    io_loop = IOLoop(make_current=False)
    aloop: asyncio.AbstractEventLoop = io_loop.asyncio_loop  # type: ignore[attr-defined]
    code = 1
    observers = _monitor.start_from_env(io_loop)  # greenpatch.monitor (checked by serve())

    async def main() -> int:
        try:
            sockets = make_sockets()
        except OSError as exc:
            log.error("cannot listen: %s", exc)
            return 1
        server = GreenWSGIServer(
            app,
            max_body_size=max_body_size,
            access_log=access_log,
            multiprocess=multiprocess,
        )
        server.add_sockets(sockets)
        stop = asyncio.Event()
        first: list[float] = []

        def on_signal(signame: str) -> None:
            now = aloop.time()
            if not first:
                first.append(now)
                log.info("%s received: shutting down (graceful timeout %g s)", signame, graceful_timeout)
                stop.set()
            elif now - first[0] > _FORCE_SIGNAL_DELAY:
                log.warning("%s received again: stopping now", signame)
                server._force_shutdown()

        installed = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                aloop.add_signal_handler(sig, on_signal, sig.name)
                installed.append(sig)
            except (ValueError, RuntimeError):  # not the main thread
                log.debug("cannot handle %s here (not the main thread)", sig.name)
        try:
            on_listening(sockets)
            await stop.wait()
            clean = await server.shutdown(graceful_timeout)
            log.info("stopped%s", "" if clean else " (requests were cut short)")
            return 0
        finally:
            for sig in installed:
                aloop.remove_signal_handler(sig)

    try:
        code = io_loop.run_sync(main)
    finally:
        observers.stop()  # greenpatch.monitor
        io_loop.close(all_fds=True)
    return code


def serve(
    app: WSGIApp | str,
    *,
    port: int = 8000,
    address: str = "127.0.0.1",
    unix_socket: str | None = None,
    processes: int = 1,
    access_log: bool = True,
    max_body_size: int = DEFAULT_MAX_BODY_SIZE,
    graceful_timeout: float = 30.0,
    on_ready: Callable[[], None] | None = None,
) -> int:
    """Serve a WSGI application until SIGTERM or SIGINT; return an exit code.

    :arg app: a WSGI callable, or a ``"package.module:attr"`` path loaded
        with `load_app` (in each process, after forking).
    :arg port, address: TCP port and address (``""``: all interfaces;
        port 0: any free port, logged).
    :arg unix_socket: listen on this unix socket path instead of TCP.
    :arg processes: processes serving the application; 0 means one per
        CPU. With more than one the calling process forks them and
        supervises: each binds its own ``SO_REUSEPORT`` socket (the kernel
        balances connections between them; a unix socket is shared), a
        process that dies is restarted, and SIGTERM/SIGINT to the parent
        stop them all gracefully.
    :arg graceful_timeout: seconds in-flight requests get to finish after
        the signal; then their workers are killed. A second signal stops
        at once.
    :arg on_ready: called (in the calling process) once every process
        listens.

    Returns 0 after a signal-initiated shutdown, 1 when the application
    cannot be loaded or the address cannot be bound (logged on the
    ``greenpatch.server`` logger). Must not be called on a running event
    loop.

    Each process runs `greenpatch.monitor`'s blocking detector
    (``GREENPATCH_BLOCKING_THRESHOLD``, default 0.1 s, 0: off) and, when
    ``GREENPATCH_STATS_INTERVAL`` is set, logs pool statistics that
    often. Once its application is loaded, each process also freezes what
    loading created and raises the garbage collector's first threshold
    (`greenpatch.gc_tuning`; ``GREENPATCH_GC=python`` leaves the collector
    alone). An invalid value of any of these settings is logged and
    returns 2.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError("serve() blocks and runs its own event loop; do not call it from a running one")
    # -- greenpatch.monitor: check its settings before binding or forking --
    try:
        _monitor.settings_from_env()
        gc_policy()  # GREENPATCH_GC (greenpatch.gc_tuning)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    # -- end greenpatch.monitor --
    if not isinstance(processes, int) or processes < 0:
        raise ValueError(
            f"processes={processes!r} is not accepted; use 0 (one per CPU) or a positive integer"
        )
    if processes == 0:
        processes = os.cpu_count() or 1
    if processes == 1:
        return _serve_single(
            app,
            port=port,
            address=address,
            unix_socket=unix_socket,
            access_log=access_log,
            max_body_size=max_body_size,
            graceful_timeout=graceful_timeout,
            on_ready=on_ready,
        )
    return _serve_forked(
        app,
        processes,
        port=port,
        address=address,
        unix_socket=unix_socket,
        access_log=access_log,
        max_body_size=max_body_size,
        graceful_timeout=graceful_timeout,
        on_ready=on_ready,
    )


def _serve_single(
    app: WSGIApp | str,
    *,
    port: int,
    address: str,
    unix_socket: str | None,
    access_log: bool,
    max_body_size: int,
    graceful_timeout: float,
    on_ready: Callable[[], None] | None,
) -> int:
    inode: list[int | None] = [None]

    def make_sockets() -> list[socket.socket]:
        sockets = _bind(port, address, unix_socket)
        inode[0] = _socket_inode(unix_socket)
        return sockets

    def on_listening(sockets: list[socket.socket]) -> None:
        log.info("serving on %s (pid %d)", _describe_sockets(sockets, unix_socket), os.getpid())
        if on_ready is not None:
            on_ready()

    try:
        return _run_process(
            app,
            make_sockets,
            access_log=access_log,
            max_body_size=max_body_size,
            graceful_timeout=graceful_timeout,
            multiprocess=False,
            on_listening=on_listening,
        )
    finally:
        _remove_unix_socket(unix_socket, inode[0])


def _serve_forked(
    app: WSGIApp | str,
    processes: int,
    *,
    port: int,
    address: str,
    unix_socket: str | None,
    access_log: bool,
    max_body_size: int,
    graceful_timeout: float,
    on_ready: Callable[[], None] | None,
) -> int:
    # Bind in the parent: a unix socket is shared by the children; a TCP
    # address is only probed (errors surface here, port 0 is resolved) and
    # each child binds its own SO_REUSEPORT socket on the same port.
    shared: list[socket.socket] = []
    inode = None
    try:
        if unix_socket is not None:
            shared = _bind(port, address, unix_socket)
            inode = _socket_inode(unix_socket)
            where = f"unix:{unix_socket}"
        else:
            probe = _bind(port, address, None, reuse_port=True)
            where = _describe_sockets(probe, None)
            port = probe[0].getsockname()[1]
            for sock in probe:
                sock.close()
    except OSError as exc:
        log.error("cannot listen on %s: %s", unix_socket or f"{address or '*'}:{port}", exc)
        return 1

    def make_sockets() -> list[socket.socket]:
        if shared:
            return shared
        return _bind(port, address, None, reuse_port=True)

    try:
        return _supervise(
            processes,
            lambda slot, ready_fd: _child(
                slot,
                ready_fd,
                app,
                make_sockets,
                access_log=access_log,
                max_body_size=max_body_size,
                graceful_timeout=graceful_timeout,
            ),
            where=where,
            on_ready=on_ready,
        )
    finally:
        for sock in shared:
            sock.close()
        _remove_unix_socket(unix_socket, inode)


def _child(
    slot: int,
    ready_fd: int | None,
    app: WSGIApp | str,
    make_sockets: Callable[[], list[socket.socket]],
    *,
    access_log: bool,
    max_body_size: int,
    graceful_timeout: float,
) -> int:
    """The body of a forked process: serve, return the exit code."""

    def on_listening(sockets: list[socket.socket]) -> None:
        log.debug("process %d (pid %d) listening", slot, os.getpid())
        if ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(ready_fd, b"\x01")
                os.close(ready_fd)

    return _run_process(
        app,
        make_sockets,
        access_log=access_log,
        max_body_size=max_body_size,
        graceful_timeout=graceful_timeout,
        multiprocess=True,
        on_listening=on_listening,
    )


def _supervise(
    processes: int,
    child_main: Callable[[int, int | None], int],
    *,
    where: str,
    on_ready: Callable[[], None] | None,
) -> int:
    """Fork ``processes`` children running ``child_main(slot, ready_fd)``; supervise them.

    Like ``tornado.process.fork_processes`` (a child that ends is replaced,
    up to a limit), plus what it cannot do: SIGTERM/SIGINT
    to the parent are forwarded to the children (as SIGTERM), and the
    parent learns when every child listens (a byte on a pipe) to call
    ``on_ready``. A child that fails before it listens (say, the
    application does not import) stops them all with exit code 1.
    """
    parent = os.getpid()
    children: dict[int, int] = {}  # pid -> slot
    stopping = False

    def forward(signum: int, frame: Any) -> None:
        nonlocal stopping
        if os.getpid() != parent:  # a child before it reset its handlers
            return
        if not stopping:
            log.info("%s received: stopping %d process(es)", signal.Signals(signum).name, len(children))
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def spawn(slot: int, ready_fd: int | None, read_fd: int | None) -> None:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                if read_fd is not None:
                    os.close(read_fd)
                _set_task_id(slot)
                code = child_main(slot, ready_fd)
            except BaseException:
                with contextlib.suppress(Exception):
                    log.exception("process %d failed", slot)
            finally:
                with contextlib.suppress(Exception):
                    logging.shutdown()
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        children[pid] = slot
        if stopping:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    previous: dict[int, Any] = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, forward)
    except ValueError:
        log.warning("serve() is not running in the main thread: signals will not stop the processes")
    read_fd, write_fd = os.pipe()
    exit_code = 0
    restarts = 0
    try:
        for slot in range(processes):
            spawn(slot, write_fd, read_fd)
        os.close(write_fd)
        write_fd = -1
        ready = 0
        while ready < processes:
            data = os.read(read_fd, processes - ready)
            if not data:  # every child exited or closed its end
                break
            ready += len(data)
        all_ready = ready >= processes
        if all_ready and not stopping:
            log.info("serving on %s with %d processes (pid %d)", where, processes, parent)
            if on_ready is not None:
                on_ready()
        while children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            slot = children.pop(pid, None)
            if slot is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if stopping:
                if code not in (0, -signal.SIGTERM, -signal.SIGINT):
                    log.warning("process %d (pid %d) exited with %d", slot, pid, code)
                continue
            if not all_ready:
                log.error("process %d (pid %d) failed to start (exit %d): stopping", slot, pid, code)
                exit_code = 1
                forward(signal.SIGTERM, None)
                continue
            restarts += 1
            if restarts > _MAX_RESTARTS:
                log.error("too many restarts (%d): stopping", restarts)
                exit_code = 1
                forward(signal.SIGTERM, None)
                continue
            # Died, or stopped by a signal sent to it alone: replace it.
            log.warning("process %d (pid %d) ended (exit %d): starting another", slot, pid, code)
            spawn(slot, None, read_fd)
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return exit_code


def _set_task_id(slot: int) -> None:
    # What tornado.process.fork_processes sets, so tornado.process.task_id() works.
    import tornado.process

    if hasattr(tornado.process, "_task_id"):
        tornado.process._task_id = slot  # type: ignore[attr-defined]


# -- Django's runserver --------------------------------------------------------------------------


def run_django(
    addr: str,
    port: int,
    wsgi_handler: WSGIApp,
    ipv6: bool = False,
    on_bind: Callable[[int], None] | None = None,
    **ignored: Any,
) -> None:
    """Stand-in for ``django.core.management.commands.runserver.run``.

    Binds ``addr:port`` (IPv6 when ``ipv6``; port 0 picks a free port),
    calls ``on_bind(port)`` with the bound port - where Django prints its
    banner - and serves ``wsgi_handler`` until ``KeyboardInterrupt``, which
    propagates (Django's runserver catches it and exits 0). Request lines
    go to the ``django.server`` logger as Django's own server writes them.
    A bind error raises ``OSError`` with its errno, which runserver turns
    into its usual messages. Django's other arguments (``threading``,
    ``server_cls``) are accepted and ignored: requests always run
    concurrently, each in its own worker greenlet.

    Runs its own IOLoop in the calling thread (Django runs it in the
    ``django-main-thread`` thread under the autoreloader). In the main
    thread (``--noreload``) it handles SIGINT itself while it serves: a
    KeyboardInterrupt raised at an arbitrary point - inside a worker, or
    in Tornado code that logs and swallows exceptions - could be lost and
    leave the server running, so the signal stops the loop instead and
    KeyboardInterrupt is raised once the loop has stopped. A second
    Ctrl-C raises at once.

    Like `serve`, runs the blocking detector and the stats logger of
    `greenpatch.monitor` on its loop; an invalid setting raises
    `greenpatch.ConfigError` before binding.
    """
    _monitor.settings_from_env()  # greenpatch.monitor: ConfigError before binding
    family = socket.AF_INET6 if ipv6 else socket.AF_INET
    sockets = netutil.bind_sockets(port, addr or None, family=family, backlog=_BACKLOG)
    bound = sockets[0].getsockname()[1]
    io_loop = IOLoop(make_current=False)
    observers = _monitor.start_from_env(io_loop)  # greenpatch.monitor
    state: dict[str, Any] = {}

    async def main() -> None:
        server = state["server"] = GreenWSGIServer(wsgi_handler, log_style="django", access_log=True)
        stop = state["stop"] = asyncio.Event()
        server.add_sockets(sockets)
        if on_bind is not None:
            on_bind(bound)
        await stop.wait()
        # Quick cleanup (after KeyboardInterrupt): no grace period.
        await server.shutdown(0.0)

    async def cleanup() -> None:
        stop = state.get("stop")
        if stop is not None:
            stop.set()
        task = state.get("task")
        if task is not None:
            await asyncio.wait([task], timeout=5.0)

    def start() -> Any:
        task = state["task"] = asyncio.ensure_future(main())
        return task

    interrupted: list[int] = []
    previous_handler: Any = None
    in_main_thread = threading.current_thread() is threading.main_thread()

    def stop_serving() -> None:
        stop = state.get("stop")
        if stop is not None:
            stop.set()

    def on_sigint(signum: int, frame: Any) -> None:
        if interrupted:
            raise KeyboardInterrupt
        interrupted.append(signum)
        io_loop.asyncio_loop.call_soon_threadsafe(stop_serving)  # type: ignore[attr-defined]

    if in_main_thread:
        previous_handler = signal.signal(signal.SIGINT, on_sigint)
    try:
        io_loop.run_sync(start)
        if interrupted:
            raise KeyboardInterrupt
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous_handler)
        try:
            if "server" in state:
                io_loop.run_sync(cleanup)
            else:
                for sock in sockets:
                    sock.close()
        except BaseException:
            log.debug("runserver cleanup failed", exc_info=True)
        finally:
            observers.stop()  # greenpatch.monitor
            io_loop.close(all_fds=True)
