"""Shared fixtures: a real MariaDB/MySQL server taken from GREENPATCH_TEST_DB_URL.

Default: mysql://root@127.0.0.1:3306/test. Each test module that needs a
database creates its own (``scratch_db``) and drops it afterwards.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from urllib.parse import unquote, urlparse

import pymysql
import pytest

import greenpatch

DEFAULT_URL = "mysql://root@127.0.0.1:3306/test"


def db_params() -> dict:
    url = urlparse(os.environ.get("GREENPATCH_TEST_DB_URL", DEFAULT_URL))
    if url.scheme not in ("mysql", "mariadb"):
        raise ValueError(
            f"GREENPATCH_TEST_DB_URL scheme {url.scheme!r} unsupported; use mysql://user:pass@host:port/db"
        )
    return {
        "host": url.hostname or "127.0.0.1",
        "port": url.port or 3306,
        "user": unquote(url.username or "root"),
        "password": unquote(url.password or ""),
        "database": (url.path or "/test").lstrip("/") or "test",
    }


@pytest.fixture(scope="session")
def db() -> dict:
    """Connection keyword arguments for the test server (checked reachable)."""
    params = db_params()
    conn = pymysql.connect(**params)
    conn.close()
    return params


@pytest.fixture
def scratch_db(db):
    """A fresh database for one test; dropped afterwards. Yields params for it."""
    name = f"gp_test_{uuid.uuid4().hex[:10]}"
    admin = pymysql.connect(**db)
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}`")
    try:
        yield dict(db, database=name)
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        admin.close()


@pytest.fixture
def patched():
    """greenpatch.patch_all() for one test, undone afterwards."""
    greenpatch.patch_all()
    try:
        yield
    finally:
        greenpatch.unpatch_all()


def run_loop(coro_fn, timeout: float = 60):
    """Run ``coro_fn()`` on a fresh Tornado IOLoop and return its result."""
    from tornado.ioloop import IOLoop

    loop = IOLoop(make_current=False)
    try:
        return loop.run_sync(coro_fn, timeout=timeout)
    finally:
        loop.close(all_fds=False)


def run_green(fn, *args, timeout: float = 60, **kwargs):
    """Run ``fn`` in one greenpatch worker on a fresh loop; return its result."""

    async def main():
        return await greenpatch.spawn(fn, *args, **kwargs)

    return run_loop(main, timeout)


@pytest.fixture
def in_place(monkeypatch):
    """Record each wait in place of a worker (``FdWatch._wait_in_place``): (result, seconds)."""
    from greenpatch import hub

    seen: list[tuple[bool, float]] = []
    original = hub.FdWatch._wait_in_place

    def recording(self):
        started = time.monotonic()
        result = original(self)
        seen.append((result, time.monotonic() - started))
        return result

    monkeypatch.setattr(hub.FdWatch, "_wait_in_place", recording)
    return seen


def park_on_a_closed_loop(fn, run_for: float = 0.05):
    """Start ``fn`` in a worker on a new loop, run the loop ``run_for`` seconds, then
    stop and close it while the worker waits.

    Returns the `greenpatch.hub.Worker`, left parked on the closed loop.
    """
    from tornado.ioloop import IOLoop

    from greenpatch import hub

    loop = IOLoop(make_current=False)
    box = {}

    async def main():
        box["worker"] = hub.start_worker(fn)
        await asyncio.sleep(run_for)

    loop.run_sync(main)
    loop.close(all_fds=False)
    return box["worker"]
