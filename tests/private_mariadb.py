"""A private, throw-away MariaDB server for tests that break their server.

The shared test server (``GREENPATCH_TEST_DB_URL``) must never be stopped or
reconfigured; tests that kill, restart or specially configure a server use a
`PrivateMariaDB` instead::

    with PrivateMariaDB(wait_timeout=2) as server:
        conn = pymysql.connect(**server.params)
        server.kill()          # SIGKILL
        server.start()         # same port, same data

In a test module, build module-scoped fixtures with the factory (the
attribute name is the fixture name; each module gets its own server)::

    from private_mariadb import private_mariadb_fixture

    private_mariadb = private_mariadb_fixture()
    short_timeout_server = private_mariadb_fixture(wait_timeout=1)

or take the ready-made ``private_mariadb`` fixture, either by registering
this module as a plugin (``pytest_plugins = ["private_mariadb"]`` in the test
module, without also importing from it there, or pytest warns that it
cannot assertion-rewrite it) or by importing it, which needs two ``noqa``
for ruff: ``from private_mariadb import private_mariadb  # noqa: F401`` and
``def test_x(private_mariadb):  # noqa: F811``.

``tests/`` has no ``__init__.py`` (none is needed): pytest's default
"prepend" import mode puts ``tests/`` itself on ``sys.path``, which is how
test modules already reach ``conftest`` (``from conftest import run_green``);
``from tests.private_mariadb import ...`` would only work when the project
root happens to be on ``sys.path`` as well (``python -m pytest``), and adding
``tests/__init__.py`` would break every ``from conftest import ...``.

How the server is made (MariaDB 10.11.19, Debian 12, run as root; measured
here):

* ``mariadb-install-db --no-defaults --auth-root-authentication-method=normal
  --skip-test-db --skip-name-resolve`` bootstraps a datadir in ~0.9 s with
  real grant tables: ``root@127.0.0.1``, ``root@::1`` and ``root@localhost``,
  all with an empty password (``normal``; the default ``socket`` method would
  only admit the Unix user root over the Unix socket). As root it also runs
  without ``--user``, but then every file is owned by root and a server
  running as ``mysql`` cannot open them, so ``--user=mysql`` is passed (the
  directory is chowned to ``mysql`` first: ``tempfile.mkdtemp`` makes it
  0700 root). Not root: no ``--user``, everything runs as the current user.
  Root without a ``mysql`` account: ``--user=root`` for both programs.
  A ``test`` database is created during bootstrap (``--extra-file``).
* That bootstrap is done once per process into a template datadir; each
  server gets a copy (~0.08 s), so only the first server pays for it.
* ``mariadbd --no-defaults`` then accepts logins after ~0.12 s, with a 16 MB
  buffer pool, a 4 MB redo log, a 1 MB temporary tablespace, no binlog, no
  doublewrite and lazy log flushing (nothing here needs durability; crash
  recovery after `kill` works). As root it is started directly as ``mysql``
  (``subprocess`` ``user=``) rather than with ``--user=mysql``, so that the
  ``PR_SET_PDEATHSIG`` set in the child survives (a uid change clears it): if
  pytest dies, the server gets SIGKILL instead of lingering. Only when
  started from the main thread: the signal follows the thread that forked,
  so a server (re)started from an executor thread would die with that
  thread; those are covered by the ``atexit`` hook and the sweep below.
* Readiness is polled with a real PyMySQL login over TCP, so `start` only
  returns once queries work; on timeout or early exit the exception carries
  the command line and this start's part of the error log.

Totals: first server of a process ~1.0 s, later ones ~0.2 s, `restart` ~0.17
s, `kill` + `start` ~0.14 s.

Call `start`/`stop`/`restart` outside workers (fixture code, the main
greenlet, or ``loop.run_in_executor`` to keep a loop running): they block.

Everything lives in one temporary directory (datadir, Unix socket, pid file,
error log, files added with `write_file`), removed by `close` / ``__exit__``
whatever the test's outcome; an ``atexit`` hook catches servers a test
forgot, and directories left by a test process that was itself killed are
swept by the next one (only those whose ``owner.pid`` process is gone; a
server still running there is SIGKILLed first). No
system option file is read (``--no-defaults``).
"""

from __future__ import annotations

import atexit
import ctypes
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymysql

try:
    import pytest
except ImportError:  # used outside the tests too (bench/peers.py): no fixtures then
    pytest = None  # type: ignore[assignment]

__all__ = [
    "MariaDBUnavailable",
    "PrivateMariaDB",
    "private_mariadb",
    "private_mariadb_fixture",
]

SERVER_BINARIES = ("mariadbd", "mysqld")
INSTALL_BINARIES = ("mariadb-install-db", "mysql_install_db")
SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/usr/local/mysql/bin"]
)

# Options that keep the server small and quick to start. Later options win,
# so anything here can be overridden through the constructor.
BASE_OPTIONS: dict[str, Any] = {
    "innodb_buffer_pool_size": "16M",
    "innodb_log_file_size": "4M",
    "innodb_log_buffer_size": "2M",
    "innodb_temp_data_file_path": "ibtmp1:1M:autoextend",
    "innodb_doublewrite": 0,
    "innodb_flush_log_at_trx_commit": 0,
    "innodb_fast_shutdown": 2,
    "skip_log_bin": True,
    "skip_name_resolve": True,
    "loose_feedback": "OFF",
    "character_set_server": "utf8mb4",
    "collation_server": "utf8mb4_general_ci",
    "max_connections": 200,
}

_live: weakref.WeakSet[PrivateMariaDB] = weakref.WeakSet()


class MariaDBUnavailable(RuntimeError):
    """No MariaDB/MySQL server binaries here: tests needing one are skipped."""


def _which(names: tuple[str, ...]) -> str:
    for name in names:
        found = shutil.which(name, path=SEARCH_PATH)
        if found:
            return found
    raise MariaDBUnavailable(f"none of {', '.join(names)} found on PATH or in /usr/sbin")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _option_args(options: dict[str, Any]) -> list[str]:
    args = []
    for key, value in options.items():
        name = "--" + key.replace("_", "-")
        if value is True:
            args.append(name)
        elif value is False or value is None:
            continue
        else:
            args.append(f"{name}={value}")
    return args


def _pdeathsig() -> None:  # runs in the child, after setuid, before exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class PrivateMariaDB:
    """A MariaDB server in a temporary directory, owned by one test (module).

    ``PrivateMariaDB(*args, **options)``: ``args`` are raw ``mariadbd``
    arguments, ``options`` become ``--name-with-dashes=value`` (``True``
    gives a bare flag), e.g. ``wait_timeout=2`` or ``ssl_ca=path``. Nothing
    runs until `start` (``__enter__`` starts it).
    """

    def __init__(
        self,
        *args: str,
        startup_timeout: float = 30.0,
        user: str = "root",
        database: str = "test",
        **options: Any,
    ) -> None:
        self.mariadbd = _which(SERVER_BINARIES)
        self.install_db = _which(INSTALL_BINARIES)
        self.startup_timeout = startup_timeout
        self.extra_args = list(args)
        self.options = dict(options)
        self.user = user
        self.database = database
        self.host = "127.0.0.1"
        self.port = _free_port()
        self.process: subprocess.Popen | None = None
        self.startup_seconds: float | None = None  # duration of the last start()
        self.install_seconds: float | None = None

        self._run_as = self._server_account()
        _sweep_stale()
        self.dir = _owned_tempdir("gp-mariadb-")
        if self._run_as is not None:
            shutil.chown(self.dir, self._run_as.pw_uid, self._run_as.pw_gid)
        self.datadir = self.dir / "data"
        self.unix_socket = str(self.dir / "mysqld.sock")
        self.error_log = self.dir / "error.log"
        self.pid_file = self.dir / "mysqld.pid"
        self.files_dir = self.dir / "files"
        self._installed = False
        self._closed = False
        _live.add(self)

    @staticmethod
    def _server_account() -> pwd.struct_passwd | None:
        """The account the server runs as when we are root (None: ourselves)."""
        if os.geteuid() != 0:
            return None
        for name in ("mysql", "mariadb"):
            try:
                return pwd.getpwnam(name)
            except KeyError:
                continue
        return None  # root without a mysql account: run as root (--user=root)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<PrivateMariaDB {self.host}:{self.port} {state} {self.dir}>"

    # -- what tests use -------------------------------------------------------

    @property
    def params(self) -> dict[str, Any]:
        """Keyword arguments for ``pymysql.connect`` (TCP, root, no password)."""
        return {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": "",
            "database": self.database,
        }

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.running else None  # type: ignore[union-attr]

    def connect(self, **kwargs: Any) -> pymysql.connections.Connection:
        """A (blocking, or green inside a worker) PyMySQL connection to this server."""
        return pymysql.connect(**{**self.params, **kwargs})

    def write_file(self, name: str, data: bytes | str) -> Path:
        """Write a file the server can read (certificates, SQL); return its path."""
        self.files_dir.mkdir(exist_ok=True)
        self._give(self.files_dir)
        path = self.files_dir / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        os.chmod(path, 0o600)
        self._give(path)
        return path

    def error_log_tail(self, lines: int = 40) -> str:
        try:
            text = self.error_log.read_text(errors="replace")
        except OSError:
            return "(no error log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- lifecycle ----------------------------------------------------------

    def start(self, *args: str, **options: Any) -> PrivateMariaDB:
        """Start the server (installing the datadir the first time); wait until ready.

        Extra ``args``/``options`` are added to the ones given at construction
        and kept for later restarts. Same port and data on every start.
        """
        if self._closed:
            raise RuntimeError("this PrivateMariaDB was closed")
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        self.extra_args += args
        self.options.update(options)
        if not self._installed:
            self._install()
        begin = time.monotonic()
        for attempt in range(3):
            self._spawn()
            try:
                self._wait_ready()
                break
            except _PortTaken:
                # Another process grabbed the port between _free_port() and
                # the bind (or while this server was stopped): take another.
                self._reap()
                if attempt == 2:
                    raise
                self.port = _free_port()
        self.startup_seconds = time.monotonic() - begin
        return self

    def stop(self, timeout: float = 20.0) -> None:
        """Clean shutdown (SIGTERM), SIGKILL if it takes longer than ``timeout``."""
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.process = None

    def kill(self) -> None:
        """SIGKILL the server, as a crash would; `start` recovers the data."""
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        self.process = None

    def restart(self, *args: str, **options: Any) -> PrivateMariaDB:
        self.stop()
        return self.start(*args, **options)

    def close(self) -> None:
        """Stop the server (SIGKILL: nothing is kept) and remove its directory."""
        if self._closed:
            return
        self._closed = True
        try:
            self.kill()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            _live.discard(self)

    def __enter__(self) -> PrivateMariaDB:
        try:
            if not self.running:
                self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- internals ------------------------------------------------------------

    def _give(self, path: Path) -> None:
        if self._run_as is not None:
            shutil.chown(path, self._run_as.pw_uid, self._run_as.pw_gid)

    def _user_arg(self) -> list[str]:
        if os.geteuid() != 0:
            return []
        return [f"--user={self._run_as.pw_name if self._run_as else 'root'}"]

    def _install(self) -> None:
        # mariadb-install-db is most of the cost of a first start (~0.9 s of
        # ~1 s), and its result depends on nothing per-server: bootstrap one
        # template datadir per process and copy it (~0.05 s) for every server.
        begin = time.monotonic()
        template = _template_datadir(self.install_db, self.database, self._run_as, self._user_arg())
        shutil.copytree(template, self.datadir, symlinks=True)
        if self._run_as is not None:
            for root, _dirs, files in os.walk(self.datadir):
                self._give(Path(root))
                for name in files:
                    self._give(Path(root, name))
        self.install_seconds = time.monotonic() - begin
        self._installed = True

    def command(self) -> list[str]:
        """The ``mariadbd`` command line used by `start`."""
        options = {
            **BASE_OPTIONS,
            "datadir": self.datadir,
            "tmpdir": self.dir,
            "port": self.port,
            "bind_address": self.host,
            "socket": self.unix_socket,
            "pid_file": self.pid_file,
            "log_error": self.error_log,
            **self.options,
        }
        user = [] if self._run_as is not None or os.geteuid() != 0 else ["--user=root"]
        return [self.mariadbd, "--no-defaults", *user, *_option_args(options), *self.extra_args]

    def _spawn(self) -> None:
        kwargs: dict[str, Any] = {}
        if self._run_as is not None:
            kwargs.update(user=self._run_as.pw_uid, group=self._run_as.pw_gid, extra_groups=[])
        if sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread():
            # PR_SET_PDEATHSIG follows the *thread* that forked: from any other
            # thread (e.g. restart() in loop.run_in_executor) the server would
            # be killed when that thread ends. Those rely on atexit / the sweep.
            kwargs["preexec_fn"] = _pdeathsig
        # Mark where this start's messages begin in the (shared) error log.
        self._log_offset = self.error_log.stat().st_size if self.error_log.exists() else 0
        self.process = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            cwd=self.dir,
            **kwargs,
        )

    def _new_log(self) -> str:
        try:
            with open(self.error_log, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last_error: Exception | None = None
        while True:
            proc = self.process
            assert proc is not None
            code = proc.poll()
            if code is not None:
                log = self._new_log()
                if "Address already in use" in log or "Bind on TCP/IP port" in log:
                    raise _PortTaken(log)
                raise RuntimeError(
                    f"mariadbd exited with code {code} during startup\n"
                    f"command: {' '.join(self.command())}\nerror log:\n{log[-4000:]}"
                )
            try:
                conn = pymysql.connect(**self.params, connect_timeout=2, ssl_disabled=True)
            except pymysql.err.OperationalError as exc:
                last_error = exc
                if exc.args and isinstance(exc.args[0], int) and exc.args[0] < 2000:
                    return  # the server itself answered (e.g. require_secure_transport)
            else:
                conn.close()
                return
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"mariadbd not accepting connections on {self.host}:{self.port} after "
                    f"{self.startup_timeout:g} s (last error: {last_error})\n"
                    f"error log:\n{self._new_log()[-4000:]}"
                )
            time.sleep(0.02)

    def _reap(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait()
            self.process = None


class _PortTaken(RuntimeError):
    pass


_OWNER_FILE = "owner.pid"
_swept = False


def _owned_tempdir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    (path / _OWNER_FILE).write_text(str(os.getpid()))
    return path


def _sweep_stale() -> None:
    """Remove directories left by test processes that died (SIGKILL, OOM...).

    Their servers are gone already (``PR_SET_PDEATHSIG``); only directories
    whose owner process no longer exists are touched.
    """
    global _swept
    if _swept:
        return
    _swept = True
    for path in Path(tempfile.gettempdir()).glob("gp-mariadb-*"):
        try:
            owner = int((path / _OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        try:
            os.kill(owner, 0)
        except ProcessLookupError:
            _kill_orphan_server(path)
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def _kill_orphan_server(path: Path) -> None:
    """SIGKILL a server still running from ``path`` (started without pdeathsig)."""
    try:
        pid = int((path / "mysqld.pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    if f"--datadir={path}/data".encode() in cmdline:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


_templates: dict[tuple[str, str], Path] = {}


def _template_datadir(
    install_db: str, database: str, run_as: pwd.struct_passwd | None, user_arg: list[str]
) -> Path:
    key = (install_db, database)
    if key in _templates:
        return _templates[key]
    base = _owned_tempdir("gp-mariadb-template-")
    try:
        if run_as is not None:
            shutil.chown(base, run_as.pw_uid, run_as.pw_gid)
        extra_sql = base / "bootstrap.sql"
        extra_sql.write_text(f"CREATE DATABASE IF NOT EXISTS `{database}`;\n")
        datadir = base / "data"
        cmd = [
            install_db,
            "--no-defaults",
            *user_arg,
            f"--datadir={datadir}",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
            "--skip-name-resolve",
            f"--extra-file={extra_sql}",
            *_option_args({k: v for k, v in BASE_OPTIONS.items() if k.startswith("innodb")}),
        ]
        result = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed (exit {result.returncode}):\n"
                + result.stdout.decode(errors="replace")[-4000:]
            )
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    _templates[key] = datadir
    return datadir


@atexit.register
def _cleanup() -> None:
    for server in list(_live):
        server.close()
    for datadir in _templates.values():
        shutil.rmtree(datadir.parent, ignore_errors=True)
    _templates.clear()


def skip_or_fail(exc: MariaDBUnavailable) -> None:
    """No mariadbd here: fail, unless GREENPATCH_TEST_ALLOW_NO_MARIADBD=1 allows a skip.

    A silent skip would let a machine without the server binaries pass the
    destructive tests without running them.
    """
    if os.environ.get("GREENPATCH_TEST_ALLOW_NO_MARIADBD") == "1":
        pytest.skip(str(exc))
    pytest.fail(f"{exc} (set GREENPATCH_TEST_ALLOW_NO_MARIADBD=1 to skip these tests instead)")


def private_mariadb_fixture(*args: str, scope: str = "module", name: str | None = None, **options: Any):
    """A pytest fixture yielding a started `PrivateMariaDB(*args, **options)`.

    Assign it to a module attribute; the attribute name is the fixture name
    unless ``name`` is given. Skips the test when no MariaDB binaries exist.
    """

    @pytest.fixture(scope=scope, name=name)  # type: ignore[call-overload]
    def _private_mariadb() -> Iterator[PrivateMariaDB]:
        try:
            server = PrivateMariaDB(*args, **options)
        except MariaDBUnavailable as exc:
            skip_or_fail(exc)
        with server:
            yield server

    return _private_mariadb


if pytest is not None:
    #: A default private server per test module: ``from private_mariadb import private_mariadb``.
    private_mariadb = private_mariadb_fixture(name="private_mariadb")
