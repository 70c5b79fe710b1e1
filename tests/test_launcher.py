"""``python -m greenpatch SCRIPT|-m MODULE`` as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import greenpatch

SCRIPT = """\
import sys, greenpatch, pymysql
print(repr(sys.argv), greenpatch.patched(), __name__, sys.path[0] == {dir!r})
if "fail" in sys.argv:
    raise ValueError("boom from target")
sys.exit(int(sys.argv[-1]) if sys.argv[-1].isdigit() else 0)
"""


def launch(*args, env=None, cwd=None):
    full_env = dict(os.environ)
    full_env.pop("GREENPATCH", None)
    full_env.pop("GREENPATCH_DISABLE", None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "greenpatch", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=60,
    )


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "target.py"
    path.write_text(SCRIPT.format(dir=str(tmp_path)))
    return path


def test_runs_script_patched_with_its_argv(script):
    proc = launch(str(script), "a", "--flag", "b")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{[str(script), 'a', '--flag', 'b']!r} ['pymysql'] __main__ True"


def test_exit_code_passes_through(script):
    assert launch(str(script), "7").returncode == 7


def test_traceback_passes_through(script):
    proc = launch(str(script), "fail")
    assert proc.returncode == 1
    assert "ValueError: boom from target" in proc.stderr
    assert str(script) in proc.stderr


def test_runs_module(tmp_path):
    (tmp_path / "gp_target_mod.py").write_text(
        "import sys, greenpatch\nprint(sys.argv[1:], greenpatch.patched(), __name__)\n"
        "import pymysql\nprint(greenpatch.patched())\n"
    )
    proc = launch("-m", "gp_target_mod", "x", "-m", "y", env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["['x', '-m', 'y'] [] __main__", "['pymysql']"]


def test_greenpatch_0_runs_unpatched(script):
    proc = launch(str(script), env={"GREENPATCH": "0"})
    assert proc.returncode == 0, proc.stderr
    assert "[] __main__" in proc.stdout


def test_bad_setting_is_a_clear_error(script):
    proc = launch(str(script), env={"GREENPATCH_DISABLE": "bogus"})
    assert proc.returncode == 2
    assert "GREENPATCH_DISABLE" in proc.stderr and "accepted names" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_and_version():
    proc = launch("--help")
    assert proc.returncode == 0
    assert "SCRIPT|-m MODULE" in proc.stdout and "GREENPATCH=0" in proc.stdout
    proc = launch("--version")
    assert proc.stdout.strip() == f"greenpatch {greenpatch.__version__}"
    proc = launch()
    assert proc.returncode == 2 and "nothing to run" in proc.stderr


def test_concurrent_queries_under_launcher(db, tmp_path):
    target = tmp_path / "conc.py"
    target.write_text(
        textwrap.dedent(
            f"""
            import asyncio, time, pymysql, greenpatch
            from tornado.ioloop import IOLoop

            def q():
                conn = pymysql.connect(**{db!r})
                with conn.cursor() as cur:
                    cur.execute("SELECT SLEEP(0.5)")
                conn.close()

            async def main():
                t0 = time.monotonic()
                await asyncio.gather(*(greenpatch.spawn(q) for _ in range(5)))
                return time.monotonic() - t0

            print(round(IOLoop.current().run_sync(main), 2))
            """
        )
    )
    patched = float(launch(str(target)).stdout)
    unpatched = float(launch(str(target), env={"GREENPATCH": "0"}).stdout)
    assert patched < 1.0
    assert unpatched >= 2.4
