"""greenpatch.server over real HTTP: in-thread servers and `serve()` in subprocesses."""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import greenlet
import pymysql
import pytest
from serve_support import ServeProcess, fetch, wait_until
from tornado import netutil
from tornado.ioloop import IOLoop

import greenpatch
from greenpatch.pool import Pool
from greenpatch.server import READ_CHUNK_SIZE, AppLoadError, GreenWSGIServer, WSGIContainer, load_app

TESTS = Path(__file__).resolve().parent


# -- helpers ---------------------------------------------------------------------------------


class ThreadServer:
    """A GreenWSGIServer on its own IOLoop in a background thread."""

    def __init__(self, app, **kwargs):
        self.app = app
        self.kwargs = kwargs
        self.ready = threading.Event()
        self.shutdown_timeout = 5.0
        self.shutdown_result = None
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="test-server")
        self.thread.start()
        assert self.ready.wait(10), self.error
        if self.error:
            raise self.error

    def _run(self):
        loop = IOLoop(make_current=False)
        try:
            loop.run_sync(self._main)
        except BaseException as exc:  # pragma: no cover - reported by the test
            self.error = exc
            self.ready.set()
        finally:
            loop.close(all_fds=True)

    async def _main(self):
        self.server = GreenWSGIServer(self.app, **self.kwargs)
        sockets = netutil.bind_sockets(0, "127.0.0.1")
        self.server.add_sockets(sockets)
        self.port = sockets[0].getsockname()[1]
        self.aloop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.ready.set()
        await self._stop.wait()
        self.shutdown_result = await self.server.shutdown(self.shutdown_timeout)

    def call(self, fn, *args):
        """Run ``fn(*args)`` on the server's loop; return its result."""
        future = concurrent.futures.Future()

        def run():
            try:
                future.set_result(fn(*args))
            except BaseException as exc:
                future.set_exception(exc)

        self.aloop.call_soon_threadsafe(run)
        return future.result(5)

    def shutdown(self, timeout=5.0, wait=True):
        self.shutdown_timeout = timeout
        if self.thread.is_alive():
            self.aloop.call_soon_threadsafe(self._stop.set)
        if wait:
            self.thread.join(timeout + 10)
            assert not self.thread.is_alive()
        return self.shutdown_result

    def connection(self, timeout=10):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def get(self, path="/", method="GET", body=None, headers=None):
        conn = self.connection()
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def raw(self, data, timeout=5.0):
        """Send raw bytes on a new connection; return everything read until EOF."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(data)
            return read_until_eof(sock, timeout)


def read_until_eof(sock, timeout=5.0):
    chunks = []
    deadline = time.monotonic() + timeout
    sock.settimeout(timeout)
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def read_response(sock, timeout=5.0):
    """Read one response with a Content-Length from ``sock`` (keep-alive friendly)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk
        rest += chunk
    return head.decode("latin-1"), rest[:length]


@pytest.fixture
def serve_app():
    servers = []

    def start(app, **kwargs):
        server = ThreadServer(app, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()


def hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


# -- 1. one worker per request, PEP 3333 environ ------------------------------------------------


def test_environ_follows_pep_3333(serve_app):
    seen = {}

    def app(environ, start_response):
        seen.update(environ)
        seen["body"] = environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    srv = serve_app(app)
    request = (
        b"POST /caf%C3%A9/x%2Fy?a=1&b=%20 HTTP/1.1\r\n"
        b"Host: example.com:8080\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: 7\r\n"
        b"X-Multi: one\r\n"
        b"X-Multi: two\r\n"
        b"X-Spoof_Me: yes\r\n"
        b"Connection: close\r\n\r\n"
        b'{"a":1}'
    )
    assert srv.raw(request).startswith(b"HTTP/1.1 200 OK\r\n")
    assert seen["REQUEST_METHOD"] == "POST"
    assert seen["SCRIPT_NAME"] == ""
    assert seen["PATH_INFO"] == "/caf\xc3\xa9/x/y"  # bytes decoded as latin-1
    assert seen["PATH_INFO"].encode("latin-1").decode("utf-8") == "/café/x/y"
    assert seen["QUERY_STRING"] == "a=1&b=%20"
    assert seen["CONTENT_TYPE"] == "application/json"
    assert seen["CONTENT_LENGTH"] == "7"
    assert "HTTP_CONTENT_TYPE" not in seen and "HTTP_CONTENT_LENGTH" not in seen
    assert seen["HTTP_HOST"] == "example.com:8080"
    assert seen["HTTP_X_MULTI"] == "one,two"
    assert not any("SPOOF" in key for key in seen)  # names with "_" are dropped
    assert seen["SERVER_NAME"] == "127.0.0.1"
    assert seen["SERVER_PORT"] == str(srv.port)
    assert seen["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert seen["REMOTE_ADDR"] == "127.0.0.1"
    assert seen["wsgi.version"] == (1, 0)
    assert seen["wsgi.url_scheme"] == "http"
    assert seen["wsgi.multithread"] is False
    assert seen["wsgi.multiprocess"] is False
    assert seen["wsgi.run_once"] is False
    assert seen["wsgi.errors"] is sys.stderr
    assert seen["body"] == b'{"a":1}'


def test_absolute_form_request_target(serve_app):
    seen = {}

    def app(environ, start_response):
        seen.update(path=environ["PATH_INFO"], query=environ["QUERY_STRING"], host=environ["HTTP_HOST"])
        start_response("200 OK", [])
        return [b""]

    srv = serve_app(app)
    srv.raw(
        b"GET http://example.com:81/abs/p%41th?x=1 HTTP/1.1\r\n"
        b"Host: example.com:81\r\nConnection: close\r\n\r\n"
    )
    assert seen == {"path": "/abs/pAth", "query": "x=1", "host": "example.com:81"}


def test_chunked_request_body_gets_a_content_length(serve_app):
    seen = {}

    def app(environ, start_response):
        seen["length"] = environ.get("CONTENT_LENGTH")
        seen["body"] = environ["wsgi.input"].read()
        start_response("200 OK", [])
        return [b""]

    srv = serve_app(app)
    request = (
        b"PUT /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    assert srv.raw(request).startswith(b"HTTP/1.1 200 OK\r\n")
    assert seen == {"length": "11", "body": b"hello world"}


@pytest.mark.parametrize("kwargs, chunk", [({}, READ_CHUNK_SIZE), ({"chunk_size": 65536}, 65536)])
def test_reads_in_small_chunks_and_big_heads_and_bodies_arrive_whole(serve_app, kwargs, chunk):
    # Tornado's default reads 64 KiB into a fresh zero-filled buffer each
    # time; the server reads READ_CHUNK_SIZE unless told otherwise, and a
    # head or body bigger than that takes several reads.
    seen = {}

    def app(environ, start_response):
        seen["cookie"] = environ["HTTP_COOKIE"]
        seen["body"] = environ["wsgi.input"].read()
        start_response("200 OK", [])
        return [b""]

    srv = serve_app(app, **kwargs)
    cookie = "c=" + "k" * 40_000
    body = os.urandom(3 * 1024 * 1024)
    conn = srv.connection()
    try:
        conn.request("PUT", "/up", body=body, headers={"Cookie": cookie})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
        assert srv.call(lambda: [c.stream.read_chunk_size for c in srv.server._connections]) == [chunk]
    finally:
        conn.close()
    assert READ_CHUNK_SIZE == 8192
    assert seen["cookie"] == cookie
    assert seen["body"] == body


def test_app_iteration_and_close_all_run_in_one_worker(serve_app):
    where = []

    class Response:
        def __init__(self):
            where.append(("app", greenpatch.current_worker()))

        def __iter__(self):
            where.append(("iter", greenpatch.current_worker()))
            greenpatch.sleep(0.01)  # parks: the rest still runs in the same worker
            yield b"a"
            where.append(("iter", greenpatch.current_worker()))
            yield b"b"

        def close(self):
            where.append(("close", greenpatch.current_worker()))

    def app(environ, start_response):
        start_response("200 OK", [])
        return Response()

    srv = serve_app(app)
    assert srv.get()[2] == b"ab"
    assert wait_until(lambda: len(where) == 4)
    assert [w[0] for w in where] == ["app", "iter", "iter", "close"]
    workers = {w[1] for w in where}
    assert len(workers) == 1 and isinstance(workers.pop(), greenpatch.Worker)
    # A second request gets another worker.
    srv.get()
    assert wait_until(lambda: len(where) == 8)
    assert where[4][1] is not where[0][1]


def test_requests_run_concurrently(serve_app):
    def app(environ, start_response):
        greenpatch.sleep(0.5)
        start_response("200 OK", [])
        return [b"done"]

    srv = serve_app(app)
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda _: srv.get(), range(10)))
    assert [r[0] for r in results] == [200] * 10
    assert time.monotonic() - started < 2.0


@pytest.fixture
def django_patched():
    greenpatch.patch_all()
    from django_support import setup_django

    setup_django()
    yield
    greenpatch.unpatch_all()


def test_django_request_finished_fires_in_the_worker_and_returns_connections(django_patched, serve_app):
    from django.core.handlers.wsgi import WSGIHandler
    from django.core.signals import request_finished
    from django.test import override_settings

    from greenpatch.pool import all_pools

    finished_in = []

    def on_finished(**kwargs):
        finished_in.append(greenpatch.current_worker())

    request_finished.connect(on_finished)
    try:
        with override_settings(ROOT_URLCONF="djangoapp.urls", MIDDLEWARE=[]):
            srv = serve_app(WSGIHandler())
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                results = list(pool.map(lambda _: srv.get("/count/"), range(16)))
            # The response is finished before close(), which sends request_finished.
            assert wait_until(lambda: len(finished_in) == 16)
    finally:
        request_finished.disconnect(on_finished)
    assert all(status == 200 and re.fullmatch(rb'\{"count": \d+\}', body) for status, _, body in results)
    # A non-streaming HttpResponse is sent with its length.
    assert all(headers.get("Content-Length") == str(len(body)) for _, headers, body in results)
    assert all(isinstance(worker, greenpatch.Worker) for worker in finished_in)
    pools = [p for p in all_pools() if p.name == "default/green" and not p._closed]
    assert pools and wait_until(lambda: all(p.stats()["in_use"] == 0 for p in pools))
    assert sum(p.stats()["checkouts"] for p in pools) >= 16


# -- 2. streaming ------------------------------------------------------------------------------


def test_response_streams_chunk_by_chunk(serve_app):
    produced = {}

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])

        def body():
            yield b"first;"
            for i in range(3):
                greenpatch.sleep(0.2)
                yield b"more%d;" % i
            produced["last"] = time.monotonic()

        return body()

    srv = serve_app(app)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while b"first;" not in data:
            data += sock.recv(65536)
        first_at = time.monotonic()
        while not data.endswith(b"0\r\n\r\n"):
            data += sock.recv(65536)
    assert first_at < produced["last"] - 0.3
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    assert b"Content-Length" not in head
    assert body == b"6\r\nfirst;\r\n6\r\nmore0;\r\n6\r\nmore1;\r\n6\r\nmore2;\r\n0\r\n\r\n"


def test_content_length_from_the_app_means_no_chunking(serve_app):
    def app(environ, start_response):
        start_response("200 OK", [("Content-Length", "6")])
        return iter([b"abc", b"def"])

    srv = serve_app(app)
    status, headers, body = srv.get()
    assert (status, body) == (200, b"abcdef")
    assert headers["Content-Length"] == "6"
    assert "Transfer-Encoding" not in headers
    assert "Date" in headers


def test_large_response_flows_with_a_slow_reader(serve_app):
    chunk = b"x" * 65536
    progress = []

    def app(environ, start_response):
        start_response("200 OK", [("Content-Length", str(len(chunk) * 200))])

        def body():
            for i in range(200):
                progress.append(i)
                yield chunk

        return body()

    srv = serve_app(app)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        time.sleep(0.3)
        # The worker waits for its writes: it is far from done while we do not read.
        assert len(progress) < 150
        data = read_until_eof(sock, 10)
    assert data.endswith(chunk) and len(data.partition(b"\r\n\r\n")[2]) == len(chunk) * 200


def test_legacy_write_callable(serve_app):
    def app(environ, start_response):
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"written;")
        return [b"returned"]

    srv = serve_app(app)
    assert srv.get()[2] == b"written;returned"


def test_file_wrapper(serve_app, tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"0123456789" * 1000)

    def app(environ, start_response):
        start_response("200 OK", [("Content-Length", "10000")])
        return environ["wsgi.file_wrapper"](open(path, "rb"), 4096)

    srv = serve_app(app)
    assert srv.get()[2] == path.read_bytes()


def test_head_and_204_and_304_have_no_body(serve_app):
    def app(environ, start_response):
        status = environ["QUERY_STRING"] or "200 OK"
        start_response(status.replace("+", " "), [("Content-Type", "text/plain")])
        return [b"body!"]

    srv = serve_app(app)
    for request, expect in [
        (b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 200 OK"),
        (b"GET /?204+No+Content HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 204 No Content"),
        (b"GET /?304+Not+Modified HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 304 Not Modified"),
    ]:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
            sock.sendall(request + b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = read_until_eof(sock)
        # The next response on the connection follows the head directly: no body.
        first, _, rest = data.partition(b"\r\n\r\n")
        assert first.startswith(expect), data
        assert rest.startswith(b"HTTP/1.1 200 OK"), data
        assert rest.endswith(b"body!")


def test_start_response_with_exc_info_replaces_headers_before_they_are_sent(serve_app):
    def app(environ, start_response):
        start_response("200 OK", [("X-First", "1")])
        try:
            raise KeyError("x")
        except KeyError:
            start_response("503 Service Unavailable", [("X-Second", "1")], sys.exc_info())
        return [b"sorry"]

    srv = serve_app(app)
    status, headers, body = srv.get()
    assert (status, body) == (503, b"sorry")
    assert "X-Second" in headers and "X-First" not in headers


# -- 3. request body limit -----------------------------------------------------------------------


def test_body_over_the_limit_by_content_length_gets_413(serve_app):
    calls = []

    def app(environ, start_response):
        calls.append(environ["wsgi.input"].read())
        start_response("200 OK", [])
        return [b"ok"]

    srv = serve_app(app, max_body_size=1000)
    assert srv.get("/", "POST", b"x" * 1000)[0] == 200  # at the limit
    assert calls == [b"x" * 1000]
    status, headers, body = srv.get("/", "POST", b"x" * 1001)
    assert status == 413
    assert headers["Connection"] == "close"
    assert b"Payload Too Large" in body and b"1000 bytes" in body
    # Announced but never sent: answered at once, before any body.
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n")
        data = read_until_eof(sock)
    assert data.startswith(b"HTTP/1.1 413 Payload Too Large\r\n")
    assert len(calls) == 1


def test_expect_100_continue_over_the_limit_gets_413_not_continue(serve_app):
    srv = serve_app(hello, max_body_size=10)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n")
        data = read_until_eof(sock)
    assert data.startswith(b"HTTP/1.1 413 ")
    assert b"100" not in data.split(b"\r\n")[0][9:]
    # Within the limit, Tornado sends "100 Continue".
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 100")
        sock.sendall(b"abcde")
        assert read_response(sock)[1] == b"hello"


def test_streamed_body_over_the_limit_gets_413(serve_app):
    calls = []

    def app(environ, start_response):
        calls.append(1)
        start_response("200 OK", [])
        return [b"ok"]

    srv = serve_app(app, max_body_size=100)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        sock.sendall(b"40\r\n" + b"a" * 64 + b"\r\n")
        sock.sendall(b"40\r\n" + b"b" * 64 + b"\r\n")
        data = read_until_eof(sock)
    assert data.startswith(b"HTTP/1.1 413 Payload Too Large\r\n")
    assert b"Connection: close" in data
    assert calls == []
    assert wait_until(lambda: srv.server.in_flight == 0)


# -- 4. keep-alive, HTTP/1.0, Connection: close, malformed requests -----------------------------


def test_keep_alive_serves_several_requests_on_one_connection(serve_app):
    srv = serve_app(hello)
    conn = srv.connection()
    try:
        for _ in range(5):
            conn.request("GET", "/")
            resp = conn.getresponse()
            assert resp.read() == b"hello"
            assert resp.getheader("Connection") is None
        assert srv.call(lambda: len(srv.server._connections)) == 1
    finally:
        conn.close()


class _BlockLoopOnClose:
    """A response body whose close() holds the loop for a moment after the response went out."""

    def __init__(self, body, seconds):
        self.body, self.seconds = body, seconds

    def __iter__(self):
        return iter([self.body])

    def close(self):
        time.sleep(self.seconds)  # deliberately blocking: the client's next request arrives meanwhile


def test_keep_alive_after_a_waiting_request_does_not_reregister_the_socket(serve_app):
    # After a request whose worker waited, the server goes straight back to
    # reading: a next request that arrived in the meantime is read by the
    # reader, not by the idle-connection listener - which would unregister
    # the socket and register it again at every request.
    def app(environ, start_response):
        greenpatch.sleep(0.001)
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return _BlockLoopOnClose(b"ok", 0.02)

    srv = serve_app(app)
    changes = []

    def watch():
        loop = IOLoop.current()
        update = loop.update_handler
        loop.update_handler = lambda fd, events: (changes.append((fd, events)), update(fd, events))[1]

    srv.call(watch)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        for _ in range(6):
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            head, body = read_response(sock)
            assert body == b"ok", head
    assert changes == []


def test_accepted_sockets_keep_tcp_nodelay(serve_app):
    def app(environ, start_response):
        greenpatch.sleep(0.001)
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    srv = serve_app(app)
    conn = srv.connection()
    try:
        for _ in range(2):
            conn.request("GET", "/")
            assert conn.getresponse().read() == b"ok"

        def nodelay():
            (server_conn,) = srv.server._connections
            return server_conn.stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)

        assert srv.call(nodelay) != 0  # Tornado would have turned it off after the response
    finally:
        conn.close()


def test_pipelined_requests_answered_at_once_do_not_starve_other_clients(serve_app):
    # Requests answered without waiting still end with a loop turn, so a
    # client pipelining many of them cannot hold the loop.
    def app(environ, start_response):
        time.sleep(0.0005)  # answered inline, but not free
        start_response("200 OK", [("Content-Length", "1")])
        return [b"x"]

    srv = serve_app(app)
    n = 400
    with (
        socket.create_connection(("127.0.0.1", srv.port), timeout=10) as a,
        socket.create_connection(("127.0.0.1", srv.port), timeout=10) as b,
    ):
        request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        a.sendall(request * n)  # n x 0.5 ms of work, queued at once
        time.sleep(0.02)
        t0 = time.monotonic()
        b.sendall(request)
        read_response(b)
        b_done = time.monotonic()
        responses = 0
        data = b""
        a.settimeout(10)
        while responses < n:
            chunk = a.recv(65536)
            assert chunk
            data += chunk
            responses = data.count(b"HTTP/1.1 200")
        a_done = time.monotonic()
    # b was answered within a few of a's requests, not after all of them.
    assert b_done - t0 < (a_done - t0) / 4, (b_done - t0, a_done - t0)


def _closed_by_server(sock, timeout=5.0):
    """Seconds until the server closed ``sock`` (reading and dropping anything else)."""
    t0 = time.monotonic()
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - t0


def test_idle_connection_timeout_closes_waiting_connections_only(serve_app):
    def app(environ, start_response):
        greenpatch.sleep(float(environ["QUERY_STRING"] or 0))
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    srv = serve_app(app, idle_connection_timeout=0.3)
    request = b"GET /?%s HTTP/1.1\r\nHost: x\r\n\r\n"
    with (
        socket.create_connection(("127.0.0.1", srv.port), timeout=10) as silent,
        socket.create_connection(("127.0.0.1", srv.port), timeout=10) as keep_alive,
        socket.create_connection(("127.0.0.1", srv.port), timeout=10) as trickle,
    ):
        # A request that takes longer than the timeout is served whole, and
        # its connection is kept for the next one.
        keep_alive.sendall(request % b"0.8")
        assert read_response(keep_alive)[1] == b"ok"
        keep_alive.sendall(request % b"0")
        assert read_response(keep_alive)[1] == b"ok"
        # Never sends anything: closed.
        assert _closed_by_server(silent) < 2
        # A head that trickles in is closed once it took longer than the timeout.
        for byte in b"GET / HTTP/1.1\r\n":
            try:
                trickle.send(bytes([byte]))
            except OSError:
                break
            time.sleep(0.05)
        assert _closed_by_server(trickle) < 2
        # Idle after its requests: closed too, about the timeout later.
        idle = _closed_by_server(keep_alive)
        assert idle < 2, idle


def test_idle_connection_timeout_none_keeps_connections(serve_app):
    srv = serve_app(hello, idle_connection_timeout=None)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        time.sleep(0.3)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock)[1] == b"hello"
    with pytest.raises(ValueError, match="idle_connection_timeout must be"):
        GreenWSGIServer(hello, idle_connection_timeout=0)


def test_keep_alive_with_chunked_responses(serve_app):
    def app(environ, start_response):
        start_response("200 OK", [])
        return iter([b"a", b"b"])

    srv = serve_app(app)
    conn = srv.connection()
    try:
        for _ in range(3):
            conn.request("GET", "/")
            resp = conn.getresponse()
            assert resp.getheader("Transfer-Encoding") == "chunked"
            assert resp.read() == b"ab"
        assert srv.call(lambda: len(srv.server._connections)) == 1
    finally:
        conn.close()


def test_http_1_0(serve_app):
    def app(environ, start_response):
        start_response("200 OK", [])
        if environ["PATH_INFO"] == "/stream":
            return iter([b"a", b"b"])
        return [environ["SERVER_PROTOCOL"].encode()]

    srv = serve_app(app)
    # No keep-alive asked: the connection closes after the response.
    data = srv.raw(b"GET / HTTP/1.0\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and data.endswith(b"\r\n\r\nHTTP/1.0")
    # Keep-alive asked: two requests on one connection.
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        for _ in range(2):
            sock.sendall(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            head, body = read_response(sock)
            assert "Connection: Keep-Alive" in head and body == b"HTTP/1.0"
    # Streaming without a length: HTTP/1.0 has no chunking, the close ends the body.
    data = srv.raw(b"GET /stream HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert data.endswith(b"\r\n\r\nab") and b"chunked" not in data


def test_connection_close_is_honoured(serve_app):
    srv = serve_app(hello)
    data = srv.raw(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")  # returns at EOF
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Connection: close" in data and data.endswith(b"hello")

    # An application asking for it is honoured too.
    def closing(environ, start_response):
        start_response("200 OK", [("Connection", "close")])
        return [b"bye"]

    srv2 = serve_app(closing)
    data = srv2.raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"Connection: close" in data and data.endswith(b"bye")


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
def test_malformed_requests_get_400_and_the_server_goes_on(serve_app, request_bytes):
    srv = serve_app(hello)
    assert srv.raw(request_bytes).startswith(b"HTTP/1.1 400 Bad Request")
    assert srv.get()[2] == b"hello"
    assert wait_until(lambda: srv.server.in_flight == 0)


# -- 5. client disconnect -------------------------------------------------------------------------


def test_client_disconnect_kills_the_worker_and_returns_the_pool_connection(serve_app, db, patched):
    pool = Pool(lambda: pymysql.connect(**db), name="server-test", max_size=2)
    events = []

    def app(environ, start_response):
        with pool.connection() as conn:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
            events.append("holding")
            try:
                greenpatch.sleep(30)
            except greenlet.GreenletExit:
                events.append("killed")
                raise
        start_response("200 OK", [])
        return [b"never"]

    srv = serve_app(app)
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert wait_until(lambda: "holding" in events)
            assert srv.server.in_flight == 1
            assert pool.stats()["in_use"] == 1
        started = time.monotonic()
        assert wait_until(lambda: srv.server.in_flight == 0, 5)
        assert time.monotonic() - started < 2
        assert events == ["holding", "killed"]
        stats = pool.stats()
        assert stats["in_use"] == 0
        assert stats["discards"].get("interrupted") == 1  # half-used: not reused
    finally:
        pool.close()


def test_client_disconnect_during_a_short_query_keeps_the_pool_connection(
    serve_app, db, patched, monkeypatch
):
    # The worker is killed while it waits for the reply to its query: the
    # pool reads that reply and keeps the connection (no reconnect, no KILL).
    # (A grace longer than the statement, so that a slow machine passes too.)
    monkeypatch.setattr("greenpatch.pool.CANCEL_GRACE", 2.0)
    pool = Pool(lambda: pymysql.connect(**db), name="server-recover", max_size=1)
    admin = pymysql.connect(**db)
    ids = []

    def app(environ, start_response):
        with pool.connection() as conn, conn.cursor() as cur:
            ids.append(conn.thread_id())
            cur.execute("SELECT SLEEP(0.3)" if environ["PATH_INFO"] == "/cut" else "SELECT 0")
        start_response("200 OK", [])
        return [str(ids[-1]).encode()]

    def sleeping() -> bool:
        with admin.cursor() as cur:
            cur.execute("SELECT 1 FROM information_schema.PROCESSLIST WHERE INFO = 'SELECT SLEEP(0.3)'")
            return cur.fetchone() is not None

    srv = serve_app(app)
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
            sock.sendall(b"GET /cut HTTP/1.1\r\nHost: x\r\n\r\n")
            assert wait_until(sleeping, interval=0.002)
        assert wait_until(lambda: srv.server.in_flight == 0 and pool.stats()["recoveries"] == 1)
        status, _, body = srv.get("/next")
        stats = pool.stats()
    finally:
        pool.close()
        admin.close()
    assert status == 200 and int(body) == ids[0]  # the same server session
    assert (stats["connects"], stats["discards"], stats["cancels"]) == (1, {}, 0)


def test_client_disconnect_while_streaming_stops_the_worker(serve_app):
    state = {"produced": 0, "closed": False}

    class Body:
        def __iter__(self):
            while True:
                state["produced"] += 1
                yield b"x" * 1000
                greenpatch.sleep(0.05)

        def close(self):
            state["closed"] = True

    def app(environ, start_response):
        start_response("200 OK", [])
        return Body()

    srv = serve_app(app)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.recv(100)
    assert wait_until(lambda: srv.server.in_flight == 0)
    assert state["closed"]
    produced = state["produced"]
    time.sleep(0.2)
    assert state["produced"] == produced


def test_client_gone_before_the_body_arrives(serve_app):
    calls = []

    def app(environ, start_response):
        calls.append(1)
        start_response("200 OK", [])
        return [b""]

    srv = serve_app(app)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly part")
        assert wait_until(lambda: srv.server.in_flight == 1)
    assert wait_until(lambda: srv.server.in_flight == 0)
    assert calls == []


# -- 6. errors --------------------------------------------------------------------------------------


def test_app_exception_gives_500_and_is_logged_with_traceback(serve_app, caplog):
    def app(environ, start_response):
        raise ValueError("boom in the app")

    caplog.set_level(logging.ERROR, logger="greenpatch.server")
    srv = serve_app(app)
    status, headers, body = srv.get("/broken")
    assert status == 500
    assert body == b"500 Internal Server Error\n"
    assert headers["Content-Type"].startswith("text/plain")
    assert wait_until(lambda: any(r.name == "greenpatch.server" for r in caplog.records))
    record = next(r for r in caplog.records if r.name == "greenpatch.server")
    assert "GET /broken" in record.getMessage()
    assert record.exc_info and record.exc_info[0] is ValueError
    # The server goes on, on the same connection too.
    assert srv.get()[0] == 500


def test_bad_responses_are_500s(serve_app, caplog):
    def app(environ, start_response):
        kind = environ["PATH_INFO"]
        if kind == "/no-start":
            return [b"x"]
        if kind == "/str-body":
            start_response("200 OK", [])
            return ["text"]
        if kind == "/bad-status":
            start_response("OK", [])
            return [b"x"]
        if kind == "/bad-header":
            start_response("200 OK", [("X-Bad", "a\r\nInjected: 1")])
            return [b"x"]
        start_response("200 OK", [])
        return [b"fine"]

    caplog.set_level(logging.ERROR, logger="greenpatch.server")
    srv = serve_app(app)
    for path in ["/no-start", "/str-body", "/bad-status", "/bad-header"]:
        status, headers, body = srv.get(path)
        assert status == 500, path
        assert "Injected" not in headers
    assert srv.get()[2] == b"fine"


def test_exception_after_headers_were_sent_closes_the_connection(serve_app, caplog):
    def app(environ, start_response):
        start_response("200 OK", [])

        def body():
            yield b"partial"
            greenpatch.sleep(0.01)
            raise RuntimeError("late failure")

        return body()

    caplog.set_level(logging.ERROR, logger="greenpatch.server")
    srv = serve_app(app)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # keep-alive, yet closed
        data = read_until_eof(sock)
    assert data.startswith(b"HTTP/1.1 200 OK") and b"partial" in data
    assert not data.endswith(b"0\r\n\r\n")  # the chunked body was never terminated
    assert wait_until(lambda: any("late failure" in str(r.exc_info[1]) for r in caplog.records if r.exc_info))
    assert wait_until(lambda: srv.server.in_flight == 0)


def test_content_length_mismatch_closes_the_connection(serve_app):
    def app(environ, start_response):
        start_response("200 OK", [("Content-Length", "100")])
        return iter([b"short", b"er"])

    srv = serve_app(app)
    data = srv.raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert data.endswith(b"shorter")
    assert wait_until(lambda: srv.server.in_flight == 0)


# -- graceful shutdown of a GreenWSGIServer ---------------------------------------------------------


def test_shutdown_waits_for_in_flight_requests_and_closes_idle_connections(serve_app):
    started_app = threading.Event()

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/slow":
            started_app.set()
            greenpatch.sleep(1)
        start_response("200 OK", [])
        return [b"done"]

    srv = serve_app(app)
    idle = srv.connection()
    idle.request("GET", "/")
    assert idle.getresponse().read() == b"done"
    results = []
    slow = threading.Thread(target=lambda: results.append(srv.get("/slow")))
    slow.start()
    assert started_app.wait(5)
    pool = Pool(lambda: None, name="closed-by-shutdown")
    started = time.monotonic()
    assert srv.shutdown(timeout=5) is True
    assert time.monotonic() - started >= 0.5
    slow.join(5)
    status, headers, body = results[0]
    assert (status, body) == (200, b"done")
    assert headers["Connection"] == "close"
    assert pool._closed
    # The idle keep-alive connection was closed by the server.
    assert idle.sock.recv(10) == b""
    idle.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", srv.port), timeout=2)


def test_shutdown_timeout_kills_remaining_workers(serve_app):
    events = []

    def app(environ, start_response):
        try:
            greenpatch.sleep(30)
        except greenlet.GreenletExit:
            events.append("killed")
            raise
        start_response("200 OK", [])
        return [b"never"]

    srv = serve_app(app)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert wait_until(lambda: srv.server.in_flight == 1)
        started = time.monotonic()
        assert srv.shutdown(timeout=0.3) is False
        assert time.monotonic() - started < 3
        assert read_until_eof(sock) == b""
    assert events == ["killed"]
    assert srv.server.in_flight == 0


# -- 10. access log ---------------------------------------------------------------------------------


def test_access_log_common_format(serve_app, caplog):
    caplog.set_level(logging.INFO, logger="greenpatch.server.access")
    srv = serve_app(hello)
    srv.get("/path?q=1")
    assert wait_until(lambda: any(r.name == "greenpatch.server.access" for r in caplog.records))
    (record,) = [r for r in caplog.records if r.name == "greenpatch.server.access"]
    assert record.levelno == logging.INFO
    assert re.fullmatch(
        r'127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] "GET /path\?q=1 HTTP/1\.1" 200 5',
        record.getMessage(),
    ), record.getMessage()


def test_access_log_off(serve_app, caplog):
    caplog.set_level(logging.DEBUG)
    srv = serve_app(hello, access_log=False)
    srv.get("/")
    srv.get("/", "POST", b"x" * 100)
    time.sleep(0.1)
    assert not [r for r in caplog.records if r.name in ("greenpatch.server.access", "django.server")]


def test_access_log_django_style(serve_app, caplog):
    def app(environ, start_response):
        status = "404 Not Found" if environ["PATH_INFO"] == "/missing" else "200 OK"
        start_response(status, [])
        return [b"12345"]

    caplog.set_level(logging.INFO, logger="django.server")
    srv = serve_app(app, log_style="django")
    srv.get("/a?b=1")
    srv.get("/missing")
    assert wait_until(lambda: len([r for r in caplog.records if r.name == "django.server"]) == 2)
    ok, missing = [r for r in caplog.records if r.name == "django.server"]
    assert ok.getMessage() == '"GET /a?b=1 HTTP/1.1" 200 5'
    assert ok.levelno == logging.INFO and ok.status_code == 200
    assert re.fullmatch(r"\d\d/\w{3}/\d{4} \d\d:\d\d:\d\d", ok.server_time)
    assert isinstance(ok.request, socket.socket)
    assert missing.getMessage() == '"GET /missing HTTP/1.1" 404 5'
    assert missing.levelno == logging.WARNING and missing.status_code == 404
    assert not [r for r in caplog.records if r.name == "greenpatch.server.access"]


def test_container_rejects_bad_options():
    with pytest.raises(ValueError, match="log_style"):
        WSGIContainer(hello, log_style="apache")
    with pytest.raises(ValueError, match="max_body_size"):
        WSGIContainer(hello, max_body_size=-1)
    with pytest.raises(TypeError):
        WSGIContainer(42)


# -- load_app ---------------------------------------------------------------------------------------


def test_load_app(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    import wsgi_apps

    assert load_app("wsgi_apps:app") is wsgi_apps.app
    monkeypatch.setattr(wsgi_apps, "application", wsgi_apps.app, raising=False)
    assert load_app("wsgi_apps") is wsgi_apps.app  # attr defaults to "application"
    with pytest.raises(AppLoadError, match=r"'no_such_module_x:app'.*no module named 'no_such_module_x'"):
        load_app("no_such_module_x:app")
    with pytest.raises(AppLoadError, match=r"'wsgi_apps:nothing'.*has no attribute 'nothing'"):
        load_app("wsgi_apps:nothing")
    with pytest.raises(AppLoadError, match=r"'wsgi_apps:not_callable'.*not callable"):
        load_app("wsgi_apps:not_callable")
    with pytest.raises(AppLoadError, match="invalid"):
        load_app("a b:c")
    assert issubclass(AppLoadError, ImportError)


# -- serve() in subprocesses ------------------------------------------------------------------------


@pytest.fixture
def serve_process():
    procs = []

    def start(*args, **kwargs):
        proc = ServeProcess(*args, **kwargs)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.kill()


def test_serve_sigterm_is_graceful(serve_process):
    proc = serve_process(port=0, graceful_timeout=10)
    port = proc.wait_ready()
    assert fetch(port)[2] == b"hello"
    results = []
    slow = threading.Thread(target=lambda: results.append(fetch(port, "/slow?1.5")))
    slow.start()
    time.sleep(0.3)  # the slow request is in flight
    proc.proc.send_signal(signal.SIGTERM)

    def refused():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        return False

    assert wait_until(refused, 3)
    slow.join(10)
    assert results and results[0][0] == 200 and results[0][2] == b"slow done"
    assert proc.wait() == 0, proc.output()
    assert "EXIT 0\n" in proc.stdout


def test_serve_sigint_is_graceful_too(serve_process):
    proc = serve_process(port=0)
    port = proc.wait_ready()
    assert fetch(port)[0] == 200
    proc.proc.send_signal(signal.SIGINT)
    assert proc.wait() == 0, proc.output()


def test_serve_second_signal_stops_at_once(serve_process):
    proc = serve_process(port=0, graceful_timeout=60)
    port = proc.wait_ready()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /slow?30 HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.3)
        started = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        time.sleep(0.8)  # a second signal this much later means "now"
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, proc.output()
        assert time.monotonic() - started < 5
        assert read_until_eof(sock) == b""  # cut short: closed without a response


def test_serve_reports_a_bad_app_path(serve_process):
    proc = serve_process(app="wsgi_apps:nothing", port=0)
    assert proc.wait() == 1
    assert "'wsgi_apps:nothing'" in proc.output() and "has no attribute" in proc.output()
    assert "READY" not in proc.output()


def test_serve_reports_an_address_in_use(serve_process):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = serve_process(port=port)
        assert proc.wait() == 1
        assert "cannot listen" in proc.output()
        proc2 = serve_process(port=port, processes=2)
        assert proc2.wait() == 1
        assert "cannot listen" in proc2.output()


def test_serve_processes_spreads_connections_over_processes(serve_process):
    proc = serve_process(port=0, processes=2, access_log=False)
    port = proc.wait_ready()
    parent = proc.proc.pid
    pids = set()
    for _ in range(100):
        status, _, body = fetch(port, "/pid")
        assert status == 200
        pids.add(int(body))
        if len(pids) == 2:
            break
    assert len(pids) == 2, pids
    assert parent not in pids
    assert fetch(port, "/multiprocess")[2] == b"True"
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 0, proc.output()
    for pid in pids:
        assert wait_until(lambda pid=pid: not _alive(pid), 5)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_serve_processes_replaces_a_process_that_ends(serve_process, how):
    proc = serve_process(port=0, processes=2, access_log=False)
    port = proc.wait_ready()
    pids = {int(fetch(port, "/pid")[2]) for _ in range(50)}
    victim = pids.pop()
    os.kill(victim, how)

    def restarted():
        try:
            seen = {int(fetch(port, "/pid", timeout=2)[2]) for _ in range(20)}
        except OSError:
            return False
        return len(seen - {victim}) == 2

    assert wait_until(restarted, 10), proc.output()
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 0, proc.output()


def test_serve_processes_graceful_shutdown(serve_process):
    proc = serve_process(port=0, processes=2, graceful_timeout=10)
    port = proc.wait_ready()
    results = []
    slow = [threading.Thread(target=lambda: results.append(fetch(port, "/slow?1"))) for _ in range(4)]
    for t in slow:
        t.start()
    time.sleep(0.3)
    proc.proc.send_signal(signal.SIGTERM)
    for t in slow:
        t.join(10)
    assert [r[2] for r in results] == [b"slow done"] * 4
    assert proc.wait() == 0, proc.output()


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (not reaped yet by an exited parent) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


@pytest.fixture
def socket_path():
    """A short path for a Unix socket (``sun_path`` holds 107 bytes), in a directory removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="gp-") as tmp:
        yield os.path.join(tmp, "s.sock")


def test_serve_on_a_unix_socket(serve_process, socket_path):
    path = socket_path
    proc = serve_process(unix_socket=path)
    proc.wait_ready()
    assert any(f"unix:{path}" in line for line in proc.stderr)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(path)
        sock.sendall(b"GET /pid HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head, body = read_response(sock)
    assert head.startswith("HTTP/1.1 200 OK") and int(body) == proc.proc.pid
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(path)
        sock.sendall(b"GET /multiprocess HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert read_response(sock)[1] == b"False"
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 0, proc.output()
    assert not os.path.exists(path)


def test_serve_on_a_unix_socket_with_processes(serve_process, socket_path):
    path = socket_path
    proc = serve_process(unix_socket=path, processes=2)
    proc.wait_ready()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(path)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert read_response(sock)[1] == b"hello"
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 0, proc.output()
    assert not os.path.exists(path)


# -- run_django --------------------------------------------------------------------------------------


RUN_DJANGO_SCRIPT = """\
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
sys.path.insert(0, {tests!r})
import wsgi_apps
from greenpatch.server import run_django
try:
    run_django({addr!r}, 0, wsgi_apps.app, ipv6={ipv6!r},
               on_bind=lambda port: print("BOUND", port, flush=True), threading=True, server_cls=None)
except KeyboardInterrupt:
    print("KEYBOARDINTERRUPT", flush=True)
"""


@pytest.mark.parametrize("addr, ipv6", [("127.0.0.1", False), ("::1", True)])
def test_run_django_serves_logs_like_django_and_stops_on_keyboard_interrupt(addr, ipv6):
    if ipv6 and not socket.has_ipv6:
        pytest.skip("no IPv6")
    code = RUN_DJANGO_SCRIPT.format(tests=str(TESTS), addr=addr, ipv6=ipv6)
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("BOUND "), line + proc.stderr.read()
        port = int(line.split()[1])
        assert port > 0
        family = socket.AF_INET6 if ipv6 else socket.AF_INET
        with socket.socket(family) as sock:
            sock.settimeout(5)
            sock.connect((addr, port))
            sock.sendall(b"GET /slow?0.01 HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(sock)[1] == b"slow done"
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "KEYBOARDINTERRUPT" in out, err
    assert 'django.server INFO "GET /slow?0.01 HTTP/1.1" 200 9' in err
    assert proc.returncode == 0


def test_run_django_bind_error_is_an_oserror_with_errno():
    from greenpatch.server import run_django

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError) as info:
            run_django("127.0.0.1", taken.getsockname()[1], hello)
    assert info.value.errno == __import__("errno").EADDRINUSE


def test_serve_refuses_a_running_loop():
    from greenpatch.server import serve

    async def main():
        with pytest.raises(RuntimeError, match="running"):
            serve(hello, port=0)

    # Not asyncio.run(): it leaves the main thread's event loop "set" (to
    # None), which changes asyncio.get_event_loop() for later tests.
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def test_serve_rejects_bad_processes():
    from greenpatch.server import serve

    with pytest.raises(ValueError, match="processes"):
        serve(hello, processes=-1)
