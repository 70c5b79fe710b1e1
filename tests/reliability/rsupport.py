"""Helpers of the reliability tests: the server under test, HTTP clients, data checks.

`RServer` runs ``python -m greenpatch serve rproject.wsgi:application`` as a
subprocess (the real launcher, patch and server stack) against a database of
a `PrivateMariaDB`, configured through the environment (see
``rproject/settings.py``). `Client` is one keep-alive HTTP/1.1 connection
that records, for every request, when it started, how long it took and what
came back (a status, or the transport error). Everything is bounded: every
socket has a timeout, every loop a deadline.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pymysql

HERE = Path(__file__).resolve().parent
APP_USER = "app"
APP_PASSWORD = "app-secret"
DATABASE = "rp"
PARTS = 3  # rproject.views.PARTS

SCHEMA = [
    "CREATE TABLE rp_item (id BIGINT AUTO_INCREMENT PRIMARY KEY, uid VARCHAR(64) NOT NULL UNIQUE,"
    " value BIGINT NOT NULL) ENGINE=InnoDB",
    "CREATE TABLE rp_part (id BIGINT AUTO_INCREMENT PRIMARY KEY, item_uid VARCHAR(64) NOT NULL,"
    " n INT NOT NULL, value BIGINT NOT NULL, UNIQUE KEY (item_uid, n)) ENGINE=InnoDB",
    "CREATE TABLE rp_account (id INT PRIMARY KEY, balance BIGINT NOT NULL) ENGINE=InnoDB",
    "CREATE TABLE rp_transfer (id BIGINT AUTO_INCREMENT PRIMARY KEY, tid VARCHAR(64) NOT NULL UNIQUE,"
    " src INT NOT NULL, dst INT NOT NULL, amount BIGINT NOT NULL) ENGINE=InnoDB",
]

# Lines that must never appear in a server log.
FORBIDDEN_LOG_TEXT = (
    "Already reading",
    "ResourceWarning",
    "unclosed",
    "Exception ignored",
    "was never retrieved",
    "Task was destroyed",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the database -----------------------------------------------------------------------------


def admin_connect(server: Any, database: str | None = DATABASE, **kwargs: Any) -> pymysql.Connection:
    """A plain (blocking) root connection to the private server."""
    params = dict(server.params, database=database, connect_timeout=5, read_timeout=30, autocommit=True)
    params.update(kwargs)
    return pymysql.connect(**params)


def prepare_database(server: Any, database: str = DATABASE) -> None:
    """(Re)create the schema, and the application's own account (``app``, with a password)."""
    conn = admin_connect(server, database=None)
    try:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{database}`")
            cur.execute(f"CREATE DATABASE `{database}`")
            cur.execute(f"USE `{database}`")
            for statement in SCHEMA:
                cur.execute(statement)
            for host in ("127.0.0.1", "localhost"):
                account = f"'{APP_USER}'@'{host}'"
                cur.execute(f"CREATE USER IF NOT EXISTS {account} IDENTIFIED BY %s", (APP_PASSWORD,))
                cur.execute(f"GRANT ALL ON `{database}`.* TO {account}")
    finally:
        conn.close()


def app_connection_ids(server: Any, command: str | None = None) -> list[int]:
    """Server-side ids of the application's connections (optionally only in state ``command``)."""
    conn = admin_connect(server)
    try:
        with conn.cursor() as cur:
            sql = "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = %s"
            args: list[Any] = [APP_USER]
            if command is not None:
                sql += " AND COMMAND = %s"
                args.append(command)
            cur.execute(sql, args)
            return [row[0] for row in cur.fetchall()]
    finally:
        conn.close()


def item_checksum(pairs: Iterable[tuple[str, int]]) -> tuple[int, int]:
    """(count, checksum) as ``SELECT COUNT(*), SUM(CRC32(CONCAT(uid, ':', value)))`` computes them."""
    count = total = 0
    for uid, value in pairs:
        count += 1
        total += zlib.crc32(f"{uid}:{value}".encode())
    return count, total


@dataclass
class WriteCheck:
    """What the table says about the writes a test sent."""

    rows: int
    checksum_ok: bool
    missing_acked: list[str]
    unknown: list[str]
    wrong_value: list[str]
    half_applied: list[str]
    orphan_parts: list[str]
    errored_but_committed: int
    errored_absent: int

    @property
    def ok(self) -> bool:
        return self.checksum_ok and not (
            self.missing_acked or self.unknown or self.wrong_value or self.half_applied or self.orphan_parts
        )


def check_writes(server: Any, sent: dict[str, int], acked: set[str]) -> WriteCheck:
    """Compare rp_item/rp_part with what was sent (uid -> value) and acknowledged (2xx).

    Every acknowledged write must be there whole; a write that got an error
    may be absent or there whole (an error can follow a COMMIT that the
    server applied), never in part; nothing else may be there.
    """
    conn = admin_connect(server)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT uid, value FROM rp_item")
            items = dict(cur.fetchall())
            cur.execute("SELECT COUNT(*), COALESCE(SUM(CRC32(CONCAT(uid, ':', value))), 0) FROM rp_item")
            count, checksum = cur.fetchone()
            cur.execute(
                "SELECT i.uid FROM rp_item i LEFT JOIN rp_part p ON p.item_uid = i.uid AND p.value = i.value "
                "GROUP BY i.uid HAVING COUNT(p.id) <> %s",
                (PARTS,),
            )
            half = [row[0] for row in cur.fetchall()]
            cur.execute(
                "SELECT DISTINCT item_uid FROM rp_part WHERE item_uid NOT IN (SELECT uid FROM rp_item)"
            )
            orphans = [row[0] for row in cur.fetchall()]
    finally:
        conn.close()
    expected = item_checksum((uid, sent[uid]) for uid in items if uid in sent)
    errored = set(sent) - acked
    return WriteCheck(
        rows=count,
        checksum_ok=(count, int(checksum)) == expected,
        missing_acked=sorted(acked - set(items)),
        unknown=sorted(set(items) - set(sent)),
        wrong_value=sorted(uid for uid, value in items.items() if uid in sent and sent[uid] != value),
        half_applied=half,
        orphan_parts=orphans,
        errored_but_committed=len(errored & set(items)),
        errored_absent=len(errored - set(items)),
    )


# -- the server under test ---------------------------------------------------------------------


class RServer:
    """``python -m greenpatch serve rproject.wsgi:application`` in a subprocess.

    ``pool`` becomes ``OPTIONS["pool"]``, ``db_options`` the rest of
    ``OPTIONS`` (e.g. ``read_timeout``), ``extra_dbs`` more aliases. With
    ``netns=True`` the server runs in a new network namespace (loopback
    only, no route anywhere) and listens on a unix socket.
    """

    def __init__(
        self,
        db: Any,
        log_dir: Path,
        *,
        database: str = DATABASE,
        user: str = APP_USER,
        password: str = APP_PASSWORD,
        pool: Any = None,
        db_options: dict | None = None,
        extra_dbs: dict | None = None,
        health_checks: bool = False,
        access_log: bool = False,
        graceful_timeout: float = 3.0,
        netns: bool = False,
        env: dict | None = None,
        name: str = "server",
    ) -> None:
        self.port = free_port()
        self.unix_socket: str | None = str(log_dir / f"{name}.sock") if netns else None
        self.log_path = log_dir / f"{name}-{self.port}.log"
        full_env = dict(os.environ)
        for key in ("GREENPATCH", "GREENPATCH_DISABLE", "DJANGO_SETTINGS_MODULE"):
            full_env.pop(key, None)
        full_env.update(
            PYTHONUNBUFFERED="1",
            PYTHONWARNINGS="always::ResourceWarning",
            RP_DB_HOST=db.host if db is not None else "127.0.0.1",
            RP_DB_PORT=str(db.port if db is not None else 1),
            RP_DB_USER=user,
            RP_DB_PASSWORD=password,
            RP_DB_NAME=database,
            RP_POOL=json.dumps(True if pool is None else pool),
            RP_DB_OPTIONS=json.dumps(db_options or {}),
            RP_EXTRA_DBS=json.dumps(extra_dbs or {}),
            RP_HEALTH_CHECKS="1" if health_checks else "",
        )
        full_env.update(env or {})
        command = [sys.executable, "-m", "greenpatch", "serve", "rproject.wsgi:application"]
        command += ["--graceful-timeout", str(graceful_timeout)]
        command += ["--access-log" if access_log else "--no-access-log"]
        if self.unix_socket:
            command += ["--unix-socket", self.unix_socket]
        else:
            command += ["--port", str(self.port)]
        if netns:
            command = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *command]
        self.command = command
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            command,
            cwd=HERE,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.returncode: int | None = None

    # -- lifecycle ------------------------------------------------------------

    def wait_ready(self, timeout: float = 30.0) -> RServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            result = self.client(timeout=2).request("GET", "/ping")
            if result.status == 200:
                return self
            time.sleep(0.05)
        raise AssertionError(f"server not ready after {timeout} s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal the server; wait for it (SIGKILL after ``timeout``); return its exit code."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.returncode = self.proc.returncode
        self._log.close()
        return self.returncode

    def log(self) -> str:
        with contextlib.suppress(ValueError):
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def forbidden_log_lines(self) -> list[str]:
        return [line for line in self.log().splitlines() if any(t in line for t in FORBIDDEN_LOG_TEXT)]

    # -- talking to it ------------------------------------------------------------

    def client(self, timeout: float = 15.0) -> Client:
        return Client(self.port, timeout=timeout, unix_socket=self.unix_socket)

    def get(self, path: str, timeout: float = 15.0) -> Result:
        client = self.client(timeout)
        try:
            return client.request("GET", path)
        finally:
            client.close()

    def stats(self, gc: bool = False) -> dict:
        result = self.get("/stats?gc=1" if gc else "/stats")
        assert result.status == 200, result
        return json.loads(result.body)

    def pool(self, name: str = "default/green") -> dict:
        pools = {p["name"]: p for p in self.stats()["pools"]}
        return pools.get(name, {})

    def wait_pool(
        self, predicate: Callable[[dict], bool], timeout: float = 10.0, name: str = "default/green"
    ) -> dict:
        """Poll the pool's stats until ``predicate`` holds; return them (assert on timeout)."""
        deadline = time.monotonic() + timeout
        stats: dict = {}
        while time.monotonic() < deadline:
            stats = self.pool(name)
            if stats and predicate(stats):
                return stats
            time.sleep(0.05)
        raise AssertionError(f"pool {name} never got there: {stats}")


# -- HTTP clients -----------------------------------------------------------------------------


@dataclass
class Result:
    """One request: ``status`` is None when the transport failed (``error`` says how)."""

    method: str
    path: str
    start: float
    elapsed: float
    status: int | None
    body: bytes = b""
    error: str = ""
    tag: Any = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def end(self) -> float:
        return self.start + self.elapsed

    def json(self) -> Any:
        return json.loads(self.body)


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class Client:
    """One HTTP/1.1 keep-alive connection; reconnects after a transport error."""

    def __init__(self, port: int, timeout: float = 15.0, unix_socket: str | None = None) -> None:
        self.port = port
        self.timeout = timeout
        self.unix_socket = unix_socket
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self.unix_socket:
                self._conn = _UnixHTTPConnection(self.unix_socket, self.timeout)
            else:
                self._conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        return self._conn

    def request(self, method: str, path: str, tag: Any = None) -> Result:
        start = time.monotonic()
        conn = self._connection()
        try:
            conn.request(method, path, headers={"Content-Length": "0"} if method == "POST" else {})
            resp = conn.getresponse()
            body = resp.read()
            status = resp.status
            if resp.will_close:
                self.close()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            return Result(method, path, start, time.monotonic() - start, None, error=repr(exc), tag=tag)
        return Result(method, path, start, time.monotonic() - start, status, body, tag=tag)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class Threads:
    """``target(i)`` for i in range(count), each in its own thread."""

    def __init__(self, count: int, target: Callable[[int], Any]) -> None:
        self.results: list[Any] = [None] * count
        self.errors: list[BaseException] = []
        self._target = target
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True, name=f"client-{i}")
            for i in range(count)
        ]

    def _run(self, i: int) -> None:
        try:
            self.results[i] = self._target(i)
        except BaseException as exc:  # re-raised by join()
            self.errors.append(exc)

    def start(self) -> Threads:
        for thread in self._threads:
            thread.start()
        return self

    def join(self, timeout: float) -> list[Any]:
        """Wait for every thread (asserting they all end within ``timeout``); return the results."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        assert not alive, f"{len(alive)} client thread(s) still running after {timeout} s"
        if self.errors:
            raise self.errors[0]
        return self.results


def run_threads(count: int, target: Callable[[int], Any], timeout: float) -> list[Any]:
    """Run ``target(i)`` for i in range(count) in threads; return the results in order."""
    return Threads(count, target).start().join(timeout)


class WriteReadLoad:
    """``clients`` threads, each looping: POST /write (a new uid), then GET /read of it when acknowledged.

    Bounded by `stop`, ``max_seconds`` and ``per_client`` writes. `sent`
    maps every uid tried to its value; `bad_reads` lists reads of an
    acknowledged write that came back 200 but wrong.
    """

    def __init__(
        self,
        server: RServer,
        clients: int,
        prefix: str = "w",
        per_client: int = 100_000,
        max_seconds: float = 60.0,
        timeout: float = 20.0,
        pause: float = 0.0,
    ) -> None:
        self.server = server
        self.prefix = prefix
        self.per_client = per_client
        self.max_seconds = max_seconds
        self.timeout = timeout
        self.pause = pause
        self.sent: dict[str, int] = {}
        self.writes: list[Result] = []
        self.reads: list[Result] = []
        self.bad_reads: list[Result] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = Threads(clients, self._client)

    def _client(self, i: int) -> None:
        client = self.server.client(self.timeout)
        deadline = time.monotonic() + self.max_seconds
        try:
            for n in range(self.per_client):
                if self._stop.is_set() or time.monotonic() > deadline:
                    break
                uid = f"{self.prefix}{i}-{n}"
                value = zlib.crc32(uid.encode()) % 1_000_000
                with self._lock:
                    self.sent[uid] = value
                write = client.request("POST", f"/write?uid={uid}&v={value}", tag=uid)
                with self._lock:
                    self.writes.append(write)
                if write.ok:
                    read = client.request("GET", f"/read?uid={uid}", tag=uid)
                    with self._lock:
                        self.reads.append(read)
                        if read.ok and read.json() != {"uid": uid, "value": value, "parts": PARTS}:
                            self.bad_reads.append(read)
                if self.pause:
                    self._stop.wait(self.pause)
        finally:
            client.close()

    def start(self) -> WriteReadLoad:
        self._threads.start()
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self._stop.set()
        self._threads.join(timeout)

    @property
    def acked(self) -> set[str]:
        return {r.tag for r in self.writes if r.ok}

    @property
    def results(self) -> list[Result]:
        return sorted(self.writes + self.reads, key=lambda r: r.start)


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


@dataclass
class Pinger:
    """A thread that GETs /ping every ``interval`` seconds and records each latency."""

    server: RServer
    interval: float = 0.01
    timeout: float = 5.0
    max_seconds: float = 60.0
    results: list[Result] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="pinger")

    def _run(self) -> None:
        client = self.server.client(self.timeout)
        deadline = time.monotonic() + self.max_seconds
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                self.results.append(client.request("GET", "/ping"))
                self._stop.wait(self.interval)
        finally:
            client.close()

    def __enter__(self) -> Pinger:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(self.timeout + 1)

    @property
    def latencies(self) -> list[float]:
        return [r.elapsed for r in self.results]

    def summary(self) -> dict:
        lat = self.latencies
        return {
            "pings": len(lat),
            "failed": sum(1 for r in self.results if not r.ok),
            "p50_ms": round(percentile(lat, 50) * 1000, 2),
            "p99_ms": round(percentile(lat, 99) * 1000, 2),
            "max_ms": round(max(lat, default=0) * 1000, 2),
        }


def report(title: str, **figures: Any) -> None:
    """Print measured figures (shown with ``pytest -s`` / ``-rP``) and append them to a JSON-lines file.

    The file is ``$GREENPATCH_RELIABILITY_REPORT`` when set.
    """
    print(f"\n[reliability] {title}: {json.dumps(figures, sort_keys=True, default=str)}")
    path = os.environ.get("GREENPATCH_RELIABILITY_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"title": title, **figures}, sort_keys=True, default=str) + "\n")
