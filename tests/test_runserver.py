"""`python -m greenpatch manage.py runserver` and `serve` as real subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pymysql
import pytest
from conftest import db_params

PROJECT = Path(__file__).parent / "testproject"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def database():
    name = f"gp_rs_{uuid.uuid4().hex[:8]}"
    admin = pymysql.connect(**db_params())
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}`")
    yield name
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    admin.close()


@pytest.fixture
def project(tmp_path):
    """A private copy of the test project (the autoreload test edits it)."""
    dest = tmp_path / "project"
    shutil.copytree(PROJECT, dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


class Server:
    def __init__(self, args, cwd, port, env):
        self.port = port
        self.log = open(cwd / f"server-{port}.log", "w+b")
        self.proc = subprocess.Popen(
            [sys.executable, *args],
            cwd=cwd,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def wait_ready(self, timeout=30.0, path="/stats/"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.output()}")
            try:
                return get(self.port, path, timeout=2)
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"server not ready:\n{self.output()}")

    def stop(self, sig=signal.SIGINT, timeout=15.0) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


def get(port, path, timeout=10.0):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
        return json.loads(resp.read())


def parallel_sleeps(port, n=2, seconds=1.0):
    t0 = time.monotonic()
    with ThreadPoolExecutor(n) as ex:
        results = list(ex.map(lambda _: get(port, f"/sleep/?s={seconds}"), range(n)))
    return time.monotonic() - t0, results


@pytest.fixture
def start(project, database):
    servers = []

    def start_server(*args, env=None, **kwargs):
        port = free_port()
        full_env = dict(os.environ, GP_DB_NAME=database, PYTHONUNBUFFERED="1")
        full_env.pop("GREENPATCH", None)
        full_env.update(env or {})
        args = [a.format(port=port) for a in args]
        server = Server(args, project, port, full_env)
        servers.append(server)
        return server

    yield start_server
    for server in servers:
        server.stop(signal.SIGKILL)
        server.log.close()


def test_runserver_serves_concurrently_in_one_thread(start):
    server = start("-m", "greenpatch", "manage.py", "runserver", "--noreload", "127.0.0.1:{port}")
    server.wait_ready()
    elapsed, results = parallel_sleeps(server.port)
    assert elapsed < 1.7, elapsed
    assert all(r["worker"] for r in results)
    assert len({r["thread"] for r in results}) == 1, "all requests on the loop's thread"
    assert len({r["conn"] for r in results}) == 2
    # Connections went back to the pool when each request ended.
    pools = {p["name"]: p for p in get(server.port, "/stats/")["pools"]}
    assert pools["default/green"]["in_use"] == 0 and pools["default/green"]["checkouts"] >= 2
    assert server.stop(signal.SIGINT) == 0, server.output()
    out = server.output()
    assert "development server at http://127.0.0.1:" in out  # "Starting (WSGI) development server"
    assert '"GET /sleep/?s=1.0 HTTP/1.1" 200' in out


def test_runserver_unpatched_is_stock_django(start):
    server = start(
        "-m",
        "greenpatch",
        "manage.py",
        "runserver",
        "--noreload",
        "127.0.0.1:{port}",
        env={"GREENPATCH": "0", "GP_ENGINE": "greenpatch.django.mysql"},
    )
    server.wait_ready()
    elapsed, results = parallel_sleeps(server.port)
    # Django's threaded server: concurrent, but one thread per request.
    assert not any(r["worker"] for r in results)
    assert len({r["thread"] for r in results}) == 2
    assert server.stop(signal.SIGINT) == 0, server.output()


def test_autoreload_restarts_the_child_under_greenpatch(start, project):
    server = start("-m", "greenpatch", "manage.py", "runserver", "127.0.0.1:{port}")
    first = server.wait_ready()
    urls = project / "urls.py"
    time.sleep(1.1)  # the stat reloader compares mtimes at one-second ticks
    urls.write_text(urls.read_text().replace('os.environ.get("GP_MARKER", "")', '"reloaded"'))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if get(server.port, "/sleep/?s=0")["marker"] == "reloaded":
                break
        except OSError:
            pass
        time.sleep(0.2)
    else:
        raise AssertionError(f"no reload:\n{server.output()}")
    second = get(server.port, "/stats/")
    assert second["pid"] != first["pid"], "the child process was restarted"
    elapsed, results = parallel_sleeps(server.port)
    assert elapsed < 1.7 and all(r["worker"] for r in results), (elapsed, results)
    assert server.stop(signal.SIGINT) == 0, server.output()


def test_serve_with_two_processes_each_with_its_own_pool(start):
    server = start(
        "-m",
        "greenpatch",
        "serve",
        "--port",
        "{port}",
        "--processes",
        "2",
        "--no-access-log",
        "wsgi:application",
    )
    server.wait_ready()
    seen: dict[int, set] = {}
    for _ in range(8):
        _, results = parallel_sleeps(server.port, n=8, seconds=0.05)
        for r in results:
            assert r["worker"]
            seen.setdefault(r["pid"], set()).add(r["conn"])
        if len(seen) == 2:
            break
    assert len(seen) == 2, f"one process served everything: {seen}"
    a, b = seen.values()
    assert not a & b, "a server connection was used by two processes"
    assert server.stop(signal.SIGTERM) == 0, server.output()


def test_runserver_ctrl_c_during_requests_exits_cleanly(start):
    server = start("-m", "greenpatch", "manage.py", "runserver", "--noreload", "127.0.0.1:{port}")
    server.wait_ready()
    with ThreadPoolExecutor(4) as ex:
        pending = [ex.submit(get, server.port, "/sleep/?s=3") for _ in range(4)]
        time.sleep(0.5)
        t0 = time.monotonic()
        assert server.stop(signal.SIGINT) == 0, server.output()
        assert time.monotonic() - t0 < 5
        for fut in pending:  # the interrupted requests fail; nothing hangs
            with pytest.raises(OSError):
                fut.result(timeout=10)
