"""The patch registry: every patch patched, unpatched and double-patched."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pymysql
import pymysql.connections
import pytest
from conftest import run_green

import greenpatch
from greenpatch import config, patches
from greenpatch.socket import GreenSocket

Connection = pymysql.connections.Connection
ORIGINAL = {name: Connection.__dict__[name] for name in ("connect", "_create_ssl_ctx")}


@pytest.fixture(autouse=True)
def clean_state(monkeypatch):
    monkeypatch.delenv("GREENPATCH", raising=False)
    monkeypatch.delenv("GREENPATCH_DISABLE", raising=False)
    greenpatch.unpatch_all()
    yield
    greenpatch.unpatch_all()


def socket_type_in_worker(db):
    def fn():
        conn = pymysql.connect(**db)
        try:
            return type(conn._sock)
        finally:
            conn.close()

    return run_green(fn)


def test_unpatched_is_stock(db):
    assert greenpatch.patched() == []
    for name, fn in ORIGINAL.items():
        assert Connection.__dict__[name] is fn
    assert socket_type_in_worker(db) is not GreenSocket


ALL = ["pymysql", "mysqldb", "django_db", "django_mysql", "asgiref", "runserver"]


def _snapshot(name):
    """Everything a patch may change, by identity (wrappers compare equal to what they wrap)."""
    return {k: tuple(map(id, v)) if isinstance(v, tuple) else id(v) for k, v in _objects(name).items()}


def _objects(name):
    import django.utils.asyncio
    from django.db import connections

    from greenpatch import hub

    if name == "pymysql":
        return {k: Connection.__dict__.get(k) for k in ORIGINAL}
    if name == "mysqldb":
        return {"MySQLdb": sys.modules.get("MySQLdb")}
    if name == "django_db":
        return {
            "storage": connections._connections,
            "get_running_loop": django.utils.asyncio.get_running_loop,
            "hooks": tuple(hub._exit_hooks),
        }
    if name == "asgiref":
        from asgiref.sync import AsyncToSync

        return {"__call__": AsyncToSync.__dict__["__call__"]}
    if name == "runserver":
        import django.utils.autoreload
        from django.core.management.commands import runserver

        return {"run": runserver.run, "get_child_arguments": django.utils.autoreload.get_child_arguments}
    from django.db.backends.mysql.base import DatabaseWrapper

    return {
        k: DatabaseWrapper.__dict__.get(k)
        for k in (
            "get_connection_params",
            "get_new_connection",
            "init_connection_state",
            "_close",
            "close_if_health_check_failed",
            "mysql_server_data",
        )
    }


@pytest.fixture
def django_backend_importable():
    # Django's MySQL backend imports MySQLdb: import it once under the alias.
    from django_support import setup_django

    greenpatch.patch_all()
    setup_django()
    greenpatch.unpatch_all()


@pytest.mark.parametrize("name", ALL)
def test_each_patch_patched_unpatched_double_patched(name, django_backend_importable):
    before = _snapshot(name)
    patches.patch(name)
    assert name in greenpatch.patched()
    after = _snapshot(name)
    assert after != before
    patches.patch(name)  # idempotent: nothing wrapped twice
    assert _snapshot(name) == after
    patches.unpatch(name)
    assert name not in greenpatch.patched()
    assert _snapshot(name) == before  # originals restored exactly
    patches.unpatch(name)
    assert _snapshot(name) == before


def test_patched(db):
    assert greenpatch.patch_all() == ALL
    assert "pymysql" in greenpatch.patched()
    assert Connection.__dict__["connect"] is not ORIGINAL["connect"]
    assert Connection.__dict__["connect"].__wrapped__ is ORIGINAL["connect"]
    assert socket_type_in_worker(db) is GreenSocket


def test_double_patch_wraps_once_and_unpatch_restores_exactly(db):
    greenpatch.patch_all()
    wrapper = Connection.__dict__["connect"]
    greenpatch.patch_all()
    assert Connection.__dict__["connect"] is wrapper
    assert Connection.__dict__["connect"].__wrapped__ is ORIGINAL["connect"]
    assert socket_type_in_worker(db) is GreenSocket
    greenpatch.unpatch_all()
    greenpatch.unpatch_all()  # idempotent too
    for name, fn in ORIGINAL.items():
        assert Connection.__dict__[name] is fn
    assert greenpatch.patched() == []
    assert socket_type_in_worker(db) is not GreenSocket


def test_patch_unpatch_cycles(db):
    for _ in range(3):
        greenpatch.patch_all()
        assert socket_type_in_worker(db) is GreenSocket
        greenpatch.unpatch_all()
        assert socket_type_in_worker(db) is not GreenSocket


def test_patch_all_flags():
    assert greenpatch.patch_all(pymysql=False, django_db=False) == [
        "mysqldb",
        "django_mysql",
        "asgiref",
        "runserver",
    ]
    assert "pymysql" not in greenpatch.patched() and "django_db" not in greenpatch.patched()
    with pytest.raises(config.ConfigError, match="unknown patch 'gevent'.*accepted names: pymysql, mysqldb"):
        greenpatch.patch_all(gevent=True)
    with pytest.raises(config.ConfigError, match="expected True or False"):
        greenpatch.patch_all(pymysql="yes")


def test_env_greenpatch_0_is_a_logged_noop(monkeypatch, caplog):
    monkeypatch.setenv("GREENPATCH", "0")
    with caplog.at_level(logging.INFO, logger="greenpatch"):
        assert greenpatch.patch_all() == []
    assert greenpatch.patched() == []
    monkeypatch.setenv("GREENPATCH", "1")
    assert greenpatch.patch_all() == ALL
    assert "GREENPATCH=0" in caplog.text


@pytest.mark.parametrize("value", ["maybe", "2", "enabled"])
def test_env_greenpatch_bad_value(monkeypatch, value):
    monkeypatch.setenv("GREENPATCH", value)
    with pytest.raises(config.ConfigError, match=rf"GREENPATCH='{value}'.*accepted values: 1, 0"):
        greenpatch.patch_all()


def test_env_disable_skips_named_patch(monkeypatch):
    monkeypatch.setenv("GREENPATCH_DISABLE", " pymysql ,django_mysql")
    assert greenpatch.patch_all() == ["mysqldb", "django_db", "asgiref", "runserver"]
    assert "pymysql" not in greenpatch.patched()


def test_env_disable_unknown_name(monkeypatch):
    monkeypatch.setenv("GREENPATCH_DISABLE", "pymysql,sockets")
    expected = (
        "GREENPATCH_DISABLE.*sockets.*accepted names: asgiref, django_db, django_mysql, mysqldb, pymysql"
    )
    with pytest.raises(config.ConfigError, match=expected):
        greenpatch.patch_all()


def test_unknown_single_patch_name():
    with pytest.raises(config.ConfigError, match="unknown greenpatch patch"):
        patches.patch("nope")


def test_warns_about_connections_opened_before_patching(db, caplog):
    from greenpatch.patches import pymysql as pymysql_patch

    already = pymysql_patch._open_connections()  # e.g. Django's, from other tests
    early = pymysql.connect(**db)
    try:
        with caplog.at_level(logging.WARNING, logger="greenpatch"):
            greenpatch.patch_all()
        assert f"{already + 1} PyMySQL connection(s) were opened before greenpatch" in caplog.text
    finally:
        early.close()
    greenpatch.unpatch_all()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="greenpatch"):
        greenpatch.patch_all()
    expected = f"{already} PyMySQL connection(s)" if already else "opened before"
    assert (expected in caplog.text) == bool(already)


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    import os

    full_env = dict(os.environ, **env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
    )


def test_patch_before_import_applies_on_import():
    proc = run_python(
        """
        import sys, greenpatch
        greenpatch.patch_all()
        assert "pymysql" not in sys.modules
        assert greenpatch.patched() == []
        import pymysql
        import wrapt
        assert isinstance(pymysql.connections.Connection.__dict__["connect"], wrapt.FunctionWrapper)
        print(greenpatch.patched())
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['pymysql']"


def test_django_patches_apply_on_django_import():
    proc = run_python(
        """
        import sys, greenpatch
        greenpatch.patch_all()
        assert "django" not in sys.modules
        from django.conf import settings
        settings.configure(DATABASES={"default": {"ENGINE": "django.db.backends.mysql", "NAME": "test"}})
        from django.db import connections
        connections["default"]  # imports the MySQL backend: needs MySQLdb
        import django.core.management.commands.runserver
        print(greenpatch.patched())
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(ALL)


def test_unpatch_before_import_cancels_pending_patch():
    proc = run_python(
        """
        import greenpatch
        greenpatch.patch_all()
        greenpatch.unpatch_all()
        import pymysql
        print(greenpatch.patched())
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_socket_module_untouched(db):
    import socket

    before = {name: getattr(socket, name) for name in ("socket", "create_connection", "getaddrinfo")}
    greenpatch.patch_all()
    socket_type_in_worker(db)
    assert {name: getattr(socket, name) for name in before} == before


def test_mysqldb_patch_warns_and_keeps_an_already_imported_c_driver(monkeypatch, caplog):
    import types

    fake_c_driver = types.ModuleType("MySQLdb")
    monkeypatch.setitem(sys.modules, "MySQLdb", fake_c_driver)
    with caplog.at_level(logging.WARNING, logger="greenpatch"):
        patches.patch("mysqldb")
    assert sys.modules["MySQLdb"] is fake_c_driver
    assert "mysqlclient, the C driver" in caplog.text and "block the IOLoop" in caplog.text
    assert "mysqldb" not in greenpatch.patched()
    patches.unpatch("mysqldb")
    assert sys.modules["MySQLdb"] is fake_c_driver


def test_mysqldb_patch_aliases_submodules_to_pymysql():
    patches.patch("mysqldb")
    import MySQLdb.converters
    import MySQLdb.err

    assert MySQLdb is pymysql
    assert MySQLdb.err is pymysql.err and MySQLdb.converters is pymysql.converters
    patches.unpatch("mysqldb")
    assert "MySQLdb" not in sys.modules and "MySQLdb.err" not in sys.modules
