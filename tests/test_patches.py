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


def test_patched(db):
    assert greenpatch.patch_all() == ["pymysql"]
    assert greenpatch.patched() == ["pymysql"]
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
    assert greenpatch.patch_all(pymysql=False) == []
    assert greenpatch.patched() == []
    with pytest.raises(config.ConfigError, match="unknown patch 'mysqldb'.*accepted names: pymysql"):
        greenpatch.patch_all(mysqldb=True)
    with pytest.raises(config.ConfigError, match="expected True or False"):
        greenpatch.patch_all(pymysql="yes")


def test_env_greenpatch_0_is_a_logged_noop(monkeypatch, caplog):
    monkeypatch.setenv("GREENPATCH", "0")
    with caplog.at_level(logging.INFO, logger="greenpatch"):
        assert greenpatch.patch_all() == []
    assert greenpatch.patched() == []
    assert "GREENPATCH=0" in caplog.text


@pytest.mark.parametrize("value", ["maybe", "2", "enabled"])
def test_env_greenpatch_bad_value(monkeypatch, value):
    monkeypatch.setenv("GREENPATCH", value)
    with pytest.raises(config.ConfigError, match=rf"GREENPATCH='{value}'.*accepted values: 1, 0"):
        greenpatch.patch_all()


def test_env_disable_skips_named_patch(monkeypatch):
    monkeypatch.setenv("GREENPATCH_DISABLE", " pymysql ")
    assert greenpatch.patch_all() == []
    assert greenpatch.patched() == []


def test_env_disable_unknown_name(monkeypatch):
    monkeypatch.setenv("GREENPATCH_DISABLE", "pymysql,sockets")
    with pytest.raises(config.ConfigError, match="GREENPATCH_DISABLE.*sockets.*accepted names: pymysql"):
        greenpatch.patch_all()


def test_unknown_single_patch_name():
    with pytest.raises(config.ConfigError, match="unknown greenpatch patch"):
        patches.patch("nope")


def test_warns_about_connections_opened_before_patching(db, caplog):
    early = pymysql.connect(**db)
    try:
        with caplog.at_level(logging.WARNING, logger="greenpatch"):
            greenpatch.patch_all()
        assert "opened before greenpatch patched PyMySQL" in caplog.text
    finally:
        early.close()
    greenpatch.unpatch_all()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="greenpatch"):
        greenpatch.patch_all()
    assert "opened before" not in caplog.text


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
