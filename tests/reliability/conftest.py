"""Fixtures of the reliability suite; registers the ``soak`` marker.

The suite drives the real stack - ``python -m greenpatch serve`` with the
Django project in ``rproject/`` - over HTTP, against a private ``mariadbd``
per test module (restarted, killed and reconfigured at will; the shared
server is never touched).

``tests/`` and this directory have no ``__init__.py``, so this file and
``tests/conftest.py`` are both imported under the module name ``conftest``;
pytest replaces ``sys.modules["conftest"]`` with whichever it imported last.
Test modules everywhere do ``from conftest import ...`` meaning
``tests/conftest.py``, so `pytest_configure` puts that one back.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from private_mariadb import private_mariadb_fixture
from rsupport import RServer, prepare_database


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "soak: long mixed-load run; short by default, GREENPATCH_SOAK_REQUESTS=N for a real soak",
    )
    parent = config.pluginmanager.get_plugin(str(Path(__file__).resolve().parent.parent / "conftest.py"))
    if parent is not None:
        sys.modules["conftest"] = parent


# One private server per test module. innodb_flush_log_at_trx_commit=2:
# a COMMIT is written to the OS at once, so it survives a SIGKILL of mariadbd
# (the private server's default, 0, may lose the last second of commits).
_mariadb = private_mariadb_fixture(name="_mariadb", innodb_flush_log_at_trx_commit=2, max_connections=300)


@pytest.fixture(scope="module")
def rdb(_mariadb):
    """The module's private server with the schema and the ``app`` account ready."""
    prepare_database(_mariadb)
    return _mariadb


@pytest.fixture
def db_server(rdb):
    """`rdb`, started again after a test that stopped or killed it (tests call prepare_database)."""
    yield rdb
    if not rdb.running:
        rdb.start()


@pytest.fixture
def start_server(tmp_path) -> Iterator:
    """Factory: ``start_server(db, **RServer options)`` -> a ready `RServer`; all stopped afterwards."""
    servers: list[RServer] = []

    def start(db, wait: bool = True, **kwargs) -> RServer:
        server = RServer(db, tmp_path, name=kwargs.pop("name", f"server{len(servers)}"), **kwargs)
        servers.append(server)
        if wait:
            server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop(timeout=10)
        if os.environ.get("GREENPATCH_RELIABILITY_KEEP_LOGS"):
            print(f"server log: {server.log_path}")
