"""(7) Bad input: misconfigured databases and malformed HTTP.

A request to a database that refuses it - wrong password, unknown
database, unknown host, refused port, a host that drops packets, a server
that never greets - gets Django's ``OperationalError`` (a 500 naming it)
within the configured timeouts, never a hang; the pool keeps no slot for
the failed connects. Malformed HTTP requests get ``400`` from the real
server process, which goes on serving; odd but valid requests get no 500.
"""

from __future__ import annotations

import http.client
import socket
import subprocess
import time

import pytest
from rsupport import APP_PASSWORD, Pinger, free_port, prepare_database, report, run_threads

pytestmark = pytest.mark.private_server

CONNECT_TIMEOUT = 1.0
READ_TIMEOUT = 1.5
# A failing request answers within this on top of the timeout that applies.
SLACK = 0.5


@pytest.fixture
def traps():
    """Two local ports that misbehave: one drops SYNs (full backlog), one accepts and stays mute."""
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    filler = socket.create_connection(blackhole.getsockname(), timeout=2)  # the backlog is now full
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(64)  # the kernel completes handshakes; nobody ever answers
    yield {"blackhole": blackhole.getsockname()[1], "mute": mute.getsockname()[1]}
    for sock in (filler, blackhole, mute):
        sock.close()


def bad_databases(db, traps) -> dict[str, tuple[dict, float, bytes]]:
    """alias -> (settings overrides, the timeout that bounds the failure, text the error shows)."""
    refused = free_port()
    return {
        "badpass": ({"PASSWORD": APP_PASSWORD + "-wrong"}, 0.0, b"(1045"),
        "nodb": ({"NAME": "no_such_database"}, 0.0, b"(1044"),
        "refused": ({"PORT": str(refused)}, 0.0, b"(2003"),
        "blackhole": ({"PORT": str(traps["blackhole"])}, CONNECT_TIMEOUT, b"(2003"),
        "mute": ({"PORT": str(traps["mute"])}, READ_TIMEOUT, b"(2013"),
    }


def test_misconfigured_databases_fail_promptly(db_server, start_server, traps):
    prepare_database(db_server)
    cases = bad_databases(db_server, traps)
    server = start_server(
        db_server,
        pool={"max_size": 2, "timeout": 10},
        db_options={"connect_timeout": CONNECT_TIMEOUT, "read_timeout": READ_TIMEOUT},
        extra_dbs={alias: overrides for alias, (overrides, _, _) in cases.items()},
    )
    figures = {}
    with Pinger(server, interval=0.01) as pinger:
        for alias, (_, bound, text) in cases.items():
            results = [server.get(f"/probe?alias={alias}") for _ in range(3)]
            figures[alias] = {
                "status": results[0].status,
                "max_s": round(max(r.elapsed for r in results), 3),
                "error": results[0].body.decode(errors="replace").splitlines()[0][:120],
            }
            for r in results:
                assert r.status == 500, (alias, r)
                assert b"django.db.utils.OperationalError" in r.body and text in r.body, (alias, r.body)
                assert r.elapsed < bound + SLACK, (alias, r.elapsed)
            pool = server.pool(f"{alias}/green")
            assert pool["size"] == pool["in_use"] == pool["connecting"] == 0, (alias, pool)
            assert pool["connect_errors"] == 3, (alias, pool)
        # Many at once: failed connects free their slots, the queue drains.
        burst = run_threads(16, lambda i: server.get("/probe?alias=refused"), timeout=30)
    report("misconfigured databases", **figures, burst_max_s=round(max(r.elapsed for r in burst), 3))
    report("ping meanwhile", **pinger.summary())
    assert all(r.status == 500 for r in burst)
    assert max(r.elapsed for r in burst) < 1.0
    assert server.pool("refused/green")["connecting"] == 0
    assert pinger.summary()["failed"] == 0 and pinger.summary()["max_ms"] < 300
    # The good database is unaffected.
    assert server.get("/probe?alias=default").ok
    assert not server.forbidden_log_lines()


def _netns_available() -> bool:
    try:
        return subprocess.run(["unshare", "--net", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_unknown_host_fails_promptly(start_server):
    """A host name that does not resolve. The server runs in a network
    namespace of its own (loopback only), so the name lookup fails without
    a packet leaving the machine; it listens on a unix socket."""
    if not _netns_available():
        pytest.skip("needs `unshare --net` (root)")
    server = start_server(
        None,
        netns=True,
        db_options={"connect_timeout": CONNECT_TIMEOUT},
        extra_dbs={"nohost": {"HOST": "no-such-host.invalid"}},
    )
    results = [server.get("/probe?alias=nohost") for _ in range(3)]
    report(
        "unknown host",
        status=results[0].status,
        max_s=round(max(r.elapsed for r in results), 3),
        error=results[0].body.decode(errors="replace").splitlines()[0][:160],
    )
    for r in results:
        assert r.status == 500, r
        assert b"django.db.utils.OperationalError" in r.body and b"(2003" in r.body, r.body
        assert b"no-such-host.invalid" in r.body, r.body
        assert r.elapsed < CONNECT_TIMEOUT + SLACK
    pool = server.pool("nohost/green")
    assert pool["size"] == pool["connecting"] == 0 and pool["connect_errors"] == 3


MALFORMED = {
    "not-http": b"GARBAGE\r\n\r\n",
    "bad-version": b"GET /ping HTTP/9.9\r\nHost: x\r\n\r\n",
    "header-without-colon": b"GET /ping HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    "content-length-not-a-number": b"POST /write HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    "content-length-negative": b"POST /write HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    "content-length-plus": b"POST /write HTTP/1.1\r\nHost: x\r\nContent-Length: +1\r\n\r\nx",
    "content-length-conflicting": b"POST /write HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
    b"Content-Length: 2\r\n\r\nxy",
    "content-length-and-chunked": b"POST /write HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "bad-chunk-size": b"POST /write HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "unknown-transfer-encoding": b"POST /write HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
    "control-character-in-method": b"G\x01T /ping HTTP/1.1\r\nHost: x\r\n\r\n",
    "space-in-target": b"GET /pi ng HTTP/1.1\r\nHost: x\r\n\r\n",
    "nul-in-header-value": b"GET /ping HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "obsolete-line-folding": b"GET /ping HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
}

ODD_BUT_VALID = {
    # What Django answers; never a 500.
    "non-ascii-path": (b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    "bad-percent-escape": (b"GET /read?uid=%zz HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    "percent-encoded-nul": (b"GET /read%00 HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    "absolute-form": (b"GET http://example.test/ping HTTP/1.1\r\nHost: x\r\n\r\n", 200),
    "lf-only-line-ends": (b"GET /ping HTTP/1.1\nHost: x\n\n", 200),
    # RFC 9112 wants a 400 here; Tornado, gunicorn and Django's runserver all serve it.
    "http-1.1-without-host": (b"GET /ping HTTP/1.1\r\n\r\n", 200),
    "huge-query-string": (b"GET /ping?" + b"a=1&" * 4000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 200),
}


def exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data`` on a new connection; return the first response (or what came before EOF).

    The connection is not half-closed: Tornado takes a client's EOF for a
    disconnect and would kill the request's worker.
    """
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            head, sep, body = received.partition(b"\r\n\r\n")
            if sep:
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                if len(body) >= length:
                    break
            try:
                chunk = sock.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            received += chunk
    return received


@pytest.fixture(scope="module")
def http_server(rdb, tmp_path_factory):
    from rsupport import RServer

    server = RServer(rdb, tmp_path_factory.mktemp("http"), access_log=True, name="http").wait_ready()
    yield server
    server.stop()


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_http_gets_400(http_server, name):
    response = exchange(http_server.port, MALFORMED[name])
    assert response.startswith(b"HTTP/1.1 400 "), response[:200]
    assert http_server.get("/ping").ok


@pytest.mark.parametrize("name", list(ODD_BUT_VALID))
def test_odd_but_valid_http_is_no_server_error(http_server, name):
    data, status = ODD_BUT_VALID[name]
    response = exchange(http_server.port, data)
    assert response.startswith(f"HTTP/1.1 {status} ".encode()), response[:200]


OVERLONG_LINES = {
    "header-over-64-KiB": b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
    "request-line-over-64-KiB": b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "chunk-size-line-over-64-bytes": b"POST /write HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    + b"1" * 100
    + b"\r\n",
}


@pytest.mark.parametrize("name", list(OVERLONG_LINES))
def test_overlong_request_lines_get_an_answer(http_server, name):
    response = exchange(http_server.port, OVERLONG_LINES[name])
    # Django's own runserver answers 414/431 here; nginx and gunicorn 400.
    assert response.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 414 ", b"HTTP/1.1 431 ")), response[:200]


def test_pipelined_requests_are_answered_in_order(http_server):
    """Three requests in one write, the middle one using the database."""
    paths = ["/ping", "/read?uid=nothing", "/slow?s=0.05", "/ping"]
    data = b"".join(f"GET {p} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for p in paths)
    with socket.create_connection(("127.0.0.1", http_server.port), timeout=10) as sock:
        sock.sendall(data)
        rfile = sock.makefile("rb")

        class _Shared:  # one buffer for all responses; HTTPResponse closes its file when done
            def __getattr__(self, name):
                return getattr(rfile, name)

            def close(self):
                pass

        class _Source:
            def makefile(self, mode):
                return _Shared()

        statuses = []
        for _ in paths:
            response = http.client.HTTPResponse(_Source())  # type: ignore[arg-type]
            response.begin()
            response.read()
            statuses.append(response.status)
    assert statuses == [200, 404, 200, 200]


def test_server_survived_the_bad_requests_without_a_traceback(http_server):
    assert http_server.get("/ping").ok
    log = http_server.log()
    assert "Traceback" not in log, log[-3000:]
    assert not http_server.forbidden_log_lines()
