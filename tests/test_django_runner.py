"""Django's own test runner on a project using the pooled backend."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pymysql
import pytest
from conftest import db_params

PROJECT = Path(__file__).parent / "testproject"


@pytest.mark.parametrize("engine", ["greenpatch.django.mysql", "django.db.backends.mysql"])
def test_manage_py_test_creates_and_destroys_the_test_database(engine):
    name = f"gp_runner_{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, GP_DB_NAME=name, GP_ENGINE=engine)
    env.pop("GREENPATCH", None)
    proc = subprocess.run(
        [sys.executable, "-m", "greenpatch", "manage.py", "test", "shop", "-v", "2", "--noinput"],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Ran 2 tests" in output and "OK" in output and "skipped" not in output, output
    assert f"Creating test database for alias 'default' ('test_{name}')" in output
    conn = pymysql.connect(**db_params())
    with conn.cursor() as cur:
        cur.execute("SHOW DATABASES LIKE %s", (f"test_{name}",))
        assert cur.fetchall() == ()
    conn.close()
