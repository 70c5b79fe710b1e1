"""Cooperative PyMySQL: connections opened inside a worker use a GreenSocket.

``pymysql.connections.Connection.connect`` is wrapped. Inside a greenpatch
worker it resolves and connects cooperatively and hands PyMySQL a
`GreenSocket` through its ``sock=`` argument; everywhere else PyMySQL runs
untouched with its own blocking socket. The global ``socket`` module is
never changed.

TLS: PyMySQL upgrades with ``self.ctx.wrap_socket(sock)``, which needs a
real socket, so a green connection's ``ctx`` is wrapped to run the
handshake cooperatively through `GreenSocket.start_tls` instead.
"""

from __future__ import annotations

import gc
import logging
import traceback
from typing import Any

import wrapt

from greenpatch import hub
from greenpatch.socket import GreenSocket, connect_tcp, connect_unix

TARGET = "pymysql"

log = logging.getLogger("greenpatch.patches.pymysql")

_originals: dict[str, Any] = {}
_preferred_tls_ctx: Any = None


class _GreenTLSContext(wrapt.ObjectProxy):
    """An ``ssl.SSLContext`` whose ``wrap_socket`` accepts a GreenSocket."""

    def wrap_socket(self, sock: Any, *args: Any, server_hostname: str | None = None, **kwargs: Any) -> Any:
        if isinstance(sock, GreenSocket):
            return sock.start_tls(self.__wrapped__, server_hostname)
        return self.__wrapped__.wrap_socket(sock, *args, server_hostname=server_hostname, **kwargs)


def _green_socket(conn: Any) -> GreenSocket:
    if conn.unix_socket:
        sock = connect_unix(conn.unix_socket, conn.connect_timeout)
        conn.host_info = "Localhost via UNIX socket"
        conn._secure = True
        return sock
    source = (conn.bind_address, 0) if conn.bind_address is not None else None
    sock = connect_tcp(conn.host, conn.port, conn.connect_timeout, source)
    conn.host_info = f"socket {conn.host}:{conn.port:d}"
    return sock


def _connect(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    if args or kwargs.get("sock") is not None or not hub.is_worker():
        return wrapped(*args, **kwargs)
    from pymysql import err
    from pymysql.constants import CR

    instance._closed = False
    try:
        sock = _green_socket(instance)
    except OSError as e:
        exc = err.OperationalError(
            CR.CR_CONN_HOST_ERROR, f"Can't connect to MySQL server on {instance.host!r} ({e})"
        )
        exc.original_exception = e
        exc.traceback = traceback.format_exc()
        raise exc from e
    ctx = getattr(instance, "ctx", None)
    if ctx is not None and not isinstance(ctx, _GreenTLSContext):
        instance.ctx = _GreenTLSContext(ctx)
    instance._greenpatch_socket = sock  # see green_socket_of()
    return wrapped(sock=sock)


def green_socket_of(conn: Any) -> GreenSocket | None:
    """The `GreenSocket` a PyMySQL connection was opened with in a worker, or None.

    Still there after PyMySQL dropped its own reference (``_sock = None``,
    when a read failed): the pool asks it whether *this side* cut the
    connection mid-query (`GreenSocket.cut`) to cancel the query on the server.
    """
    return getattr(conn, "_greenpatch_socket", None)


def _create_ssl_ctx(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    # PyMySQL builds a fresh SSLContext (loading the system CA store, about
    # 20 ms of CPU that blocks the loop) for every connection in its default
    # "preferred TLS" mode. That context depends on no argument, so one per
    # process serves them all. Contexts for explicit ``ssl=`` settings are
    # built as before: they may name files that change.
    global _preferred_tls_ctx
    sslp = args[0] if args else kwargs.get("sslp")
    if type(sslp) is not dict or sslp:
        return wrapped(*args, **kwargs)
    if _preferred_tls_ctx is None:
        _preferred_tls_ctx = wrapped(*args, **kwargs)
    return _preferred_tls_ctx


def _open_connections() -> int:
    import pymysql.connections

    cls = pymysql.connections.Connection
    # type(), not isinstance(): isinstance() asks obj.__class__, which makes
    # lazy proxies (Django's LazyObject...) set themselves up.
    return sum(
        1
        for obj in gc.get_objects()
        if issubclass(type(obj), cls) and getattr(obj, "_sock", None) is not None
    )


_WRAPPERS = {"connect": _connect, "_create_ssl_ctx": _create_ssl_ctx}


def patch() -> None:
    if is_patched():
        return
    import pymysql.connections

    cls = pymysql.connections.Connection
    for attr, wrapper in _WRAPPERS.items():
        _originals[attr] = cls.__dict__[attr]
        wrapt.wrap_function_wrapper(cls, attr, wrapper)
    opened = _open_connections()
    if opened:
        log.warning(
            "%d PyMySQL connection(s) were opened before greenpatch patched PyMySQL; "
            "they keep blocking sockets and will block the IOLoop. Call "
            "greenpatch.patch_all() before opening connections.",
            opened,
        )


def unpatch() -> None:
    if not is_patched():
        return
    import pymysql.connections

    cls = pymysql.connections.Connection
    for attr in _WRAPPERS:
        setattr(cls, attr, _originals.pop(attr))


def is_patched() -> bool:
    import sys

    mod = sys.modules.get("pymysql.connections")
    if mod is None:
        return False
    return isinstance(mod.Connection.__dict__.get("connect"), wrapt.FunctionWrapper)


__all__ = ["TARGET", "green_socket_of", "is_patched", "patch", "unpatch"]
